"""Test helper: expensive inputs (trained runs, exports, help texts) built once per pytest call.

pytest-xdist runs every worker in its own process, so a ``scope="session"`` fixture is built once
per worker, and a ``scope="module"`` one once per worker that runs a test of the module.
:func:`build_once` builds a folder once for all workers of one ``pytest`` call: the folder lives
under the base temporary folder the workers share (the controller's basetemp, the parent of each
worker's), and a lock file serialises the builders (the pattern of pytest-xdist's docs, "Making
session-scoped fixtures execute only once", with ``fcntl.flock`` from the standard library in
place of the ``filelock`` package). Each pytest call has its own basetemp, so nothing is reused
from an earlier call.

A shared folder is read-only for tests: two workers read it at once. A test that writes into a
run takes a copy (``shutil.copytree``), which costs milliseconds, not a training. Paths recorded
inside run files (the data dir in ``calibration.json`` or ``ood.json``) keep naming the shared
folders, which live as long as the pytest call.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

DONE = ".built"
RESULT = "result.json"


def shared_root(tmp_path_factory) -> Path:
    """``<basetemp of this pytest call>/shared``: the same folder in every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is <controller's>/popen-gwN
        base = base.parent
    root = base / "shared"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """``<shared root>/name``, made by ``build(folder)`` by the first worker that asks for it.

    Other workers wait on ``<shared root>/name.lock`` and reuse the folder. A build that failed
    leaves no ``.built`` marker: the next caller removes the remains and builds again (and fails
    the same way, so every test that needs the folder reports the error).
    """
    root = shared_root(tmp_path_factory)
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / DONE).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                (folder / DONE).touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def _to_json(value):
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, dict):
        return {"dict": {key: _to_json(item) for key, item in value.items()}}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_to_json(item) for item in value]}
    return {"value": value}


def _from_json(value):
    kind, item = next(iter(value.items()))
    if kind == "path":
        return Path(item)
    if kind == "dict":
        return {key: _from_json(sub) for key, sub in item.items()}
    if kind == "tuple":
        return tuple(_from_json(sub) for sub in item)
    return item


def shared_result(tmp_path_factory, name: str, make: Callable[[Path], object]):
    """What ``make(folder)`` returned (paths, tuples and dicts of them), ``make`` called once for
    all workers of the pytest call: the result is kept in ``<folder>/result.json``."""
    def build(folder: Path) -> None:
        (folder / RESULT).write_text(json.dumps(_to_json(make(folder))), encoding="utf-8")

    folder = build_once(tmp_path_factory, name, build)
    return _from_json(json.loads((folder / RESULT).read_text(encoding="utf-8")))
