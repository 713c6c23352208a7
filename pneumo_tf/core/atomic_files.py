"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Everything the project writes that a later stage trusts (manifests, shards, run files, exports)
goes through here: the content is written under a temporary sibling name, flushed to disk
(``fsync``), and renamed over the target in one step; the folder entry is then flushed too, so a
crash or a power cut cannot leave a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

PARTIAL = ".partial"


def partial_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """The temporary sibling of ``path``: ``a.json.partial``, or ``a.partial.keras``.

    Args:
        keep_suffix: put the marker before the suffixes, for writers that insist on them
            (Keras saves only to ``*.keras`` / ``*.weights.h5``).
    """
    path = Path(path)
    if not keep_suffix:
        return path.with_name(path.name + PARTIAL)
    stem, dot, suffixes = path.name.partition(".")
    return path.with_name(f"{stem}{PARTIAL}{dot}{suffixes}")


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush ``tmp`` (a file or a folder) to disk and rename it over ``path``.

    A folder target is replaced as a whole: the old folder is removed just before the rename.
    """
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file or folder, if it exists."""
    tmp = Path(tmp)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; commit it on success.

    On an exception the temporary file or folder is removed and ``path`` is left as it was.

    Example::

        with atomic_output(run / "model.keras", keep_suffix=True) as tmp:
            model.save(tmp)
    """
    tmp = partial_path(path, keep_suffix)
    discard(tmp)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    commit(tmp, path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (with a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
