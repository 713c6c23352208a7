"""Shared test fixtures: tiny synthetic TFRecord data dirs written through the real writers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs one xdist worker per core, plus one. TensorFlow and OpenMP would give
    # every worker, and every app a test starts, a thread pool as wide as the machine: the
    # workers would fight over the cores. Each worker gets its share instead (at least one
    # thread), set before anything imports TensorFlow or numpy and inherited by the apps the
    # tests start.
    _threads = str(max(1, len(os.sched_getaffinity(0))
                       // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

import numpy as np  # noqa: E402  (after the thread settings)
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config) -> int | None:
    """``-n auto`` (``make test``): one xdist worker more than the cores.

    A worker is not always computing: it waits for the processes a test starts (kill -9 and
    resume, two training workers, the tools), for a shared run another worker is building, and
    it idles at the end of the call; one more worker fills those gaps. Measured on 2 cores, the
    whole suite one run each: 532 s with 2 workers, 487 s with 3, 495 s with 4.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` and ``-n logical`` keep xdist's own meaning (None).
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or config.option.numprocesses != "auto":
        return None
    return len(os.sched_getaffinity(0)) + 1


# Module-scoped fixtures that train, export or evaluate, by the test module that defines them.
# xdist builds a module fixture once per worker that runs one of its tests: the tests that use
# one of these get an ``xdist_group`` of their own, which ``--dist loadgroup`` (``make test``)
# keeps on one worker, so the fixture is built once. Cheap module fixtures are left out: their
# tests spread.
ONE_WORKER_FIXTURES = {
    "tests/evaluation/test_ensemble.py": ("ensemble_run",),
    "tests/evaluation/test_evaluator.py": ("evaluated",),
    "tests/evaluation/test_site_calibration.py": ("run_and_site",),
    "tests/explain/test_grids.py": ("phantom_run",),
    "tests/serving/test_lung_export.py": ("lung_export",),
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that uses a fixture of :data:`ONE_WORKER_FIXTURES` with the group
    ``<module name>.<fixture>``."""
    for item in items:
        if not item.path.is_relative_to(REPO):
            continue
        module = item.path.relative_to(REPO).as_posix()
        for name in ONE_WORKER_FIXTURES.get(module, ()):
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(f"{item.path.stem}.{name}"))


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repo root, its output captured as text.

    A new process: for what only a process shows (imports before TensorFlow, TensorFlow's
    start-up lines, ``python -m`` flag registration). A command's own behaviour is faster to test
    with :func:`run_command`.
    """
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def imported_modules(stderr: str) -> set[str]:
    """The modules a process run with ``python -X importtime`` imported, from its stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
            if line.startswith("import time:")}


def run_command(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` run inside this test process: what :func:`run_module` returns
    (exit status, stdout, stderr as text) without starting Python and TensorFlow again.

    The command runs as a new process would run it: from the repo root, flags at their defaults
    before parsing, absl's INFO verbosity, a fresh Keras session and float32 policy; everything
    written to stdout and stderr is captured (Python objects, absl's log handler and the file
    descriptors, so C++ lines count too); ``sys.exit("message")`` gives status 1 with the
    message on stderr and an uncaught exception its traceback, as the interpreter does. Tests of
    process-wide behaviour (start-up lines, what is imported, signals, devices, and runs that
    would change the process for the tests after them: ``--deterministic``, ``--cpu_devices``)
    use :func:`run_module`.
    """
    import importlib
    import io
    import traceback

    import keras
    from absl import flags
    from absl import logging as absl_logging

    from pneumo_tf.core import quiet_tf

    command = importlib.import_module(module)
    # A new process makes its first device query (and TensorFlow's CUDA line) quietly, through
    # pneumo_tf.core.quiet_tf: make this process's first one before the capture.
    import tensorflow as tf

    tf.config.list_physical_devices("GPU")
    argv = [module, *args]
    handler = absl_logging.get_absl_handler().python_handler
    verbosity = flags.FLAGS["verbosity"]
    saved = (os.getcwd(), sys.argv, handler.stream, verbosity.default)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    # Keras' names and graph state as in a new process; without its full garbage collection
    # (0.3 s a command, 23 s over the suite): Python collects as usual.
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy("float32")
    flags.FLAGS.unparse_flags()
    verbosity.default = 0  # absl's app.run sets INFO in a new process; on a rerun it would not
    try:
        os.chdir(REPO)
        sys.argv = argv
        handler.stream = err
        with quiet_tf.captured_fd(1) as fd_out, quiet_tf.captured_fd(2) as fd_err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                command.run()
            except SystemExit as e:
                if isinstance(e.code, str):
                    err.write(e.code + "\n")
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # uncaught: the interpreter prints it and exits with 1
                traceback.print_exc(file=err)
                status = 1
    finally:
        os.chdir(saved[0])
        sys.argv, handler.stream, verbosity.default = saved[1:]
        flags.FLAGS.unparse_flags()
        keras.mixed_precision.set_global_policy("float32")
    return subprocess.CompletedProcess(argv, status, out.getvalue() + fd_out[0],
                                       err.getvalue() + fd_err[0])


def tiny_image(label: int, size: int, rng: np.random.Generator,
               brightness_offset: float = 0.0) -> np.ndarray:
    """``[size, size] uint8``: noisy gray field; label 1 adds a bright square blob.

    ``brightness_offset`` (grey levels) is added before clipping: a film from a brighter site.
    """
    img = rng.normal(90, 12, (size, size)).clip(0, 255)
    if label == 1:
        s = max(2, size // 4)
        y, x = rng.integers(0, size - s, 2)
        img[y:y + s, x:x + s] += 90
    return (img + brightness_offset).clip(0, 255).astype(np.uint8)


# Subtypes of a tiny data dir's PNEUMONIA records, in turn (NORMAL ones are 0).
TINY_PNEUMONIA_SUBTYPES = (1, 1, 2, -1)


def write_tiny_dataset(out_dir: str | os.PathLike, counts: dict | None = None, image_size: int = 32,
                       encoding: str = "raw", compression: str = "none", num_shards: int = 2,
                       crop: str = "fixed", seed: int = 0, version: int = 2,
                       brightness_offset: float = 0.0) -> Path:
    """Write a converter-shaped data dir without the converter.

    Args:
        counts: ``{split: (n_normal, n_pneumonia)}``; default 12/12 train, 6/6 val, 6/6 test.
        version: 2 writes subtypes (NORMAL 0; the PNEUMONIA records of a split take
            :data:`TINY_PNEUMONIA_SUBTYPES` in turn, by their index in the split) and the
            manifest's subtype counts and weights; 1 writes records and a manifest of the old
            format, without them.
        brightness_offset: grey levels added to every image (a second site's brighter films).
            The manifest's ``source`` records it and ``seed``, as the converter records a
            checksum of its source, so data dirs of other images have other manifests.

    Returns:
        The data dir path (shards + manifest.json).
    """
    import cv2

    from pneumo_tf.data import records

    counts = counts or {"train": (12, 12), "val": (6, 6), "test": (6, 6)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, (n0, n1) in counts.items():
        labels = [0] * n0 + [1] * n1
        rng.shuffle(labels)
        n = len(labels)
        pneumonia_index = np.cumsum(labels) - 1
        subtypes = [0 if y == 0 else TINY_PNEUMONIA_SUBTYPES[k % len(TINY_PNEUMONIA_SUBTYPES)]
                    for y, k in zip(labels, pneumonia_index)]
        shards, shard_counts = [], []
        per = [list(range(n))[i::num_shards] for i in range(num_shards)]
        for si, idx in enumerate(per):
            name = records.shard_name(split, si, num_shards, compression)
            with records.ShardWriter(out / name, compression) as w:
                for j in idx:
                    img = tiny_image(labels[j], image_size, rng, brightness_offset)
                    data = img.tobytes() if encoding == "raw" else cv2.imencode(".png", img)[1].tobytes()
                    w.write(records.serialize_example(
                        data, labels[j], subtypes[j] if version >= 2 else None,
                        f"{split}-p{j // 2}", f"{split}/{j}.png", (image_size, image_size),
                        (image_size, image_size), (0, image_size, 0, image_size), crop))
            shards.append(name)
            shard_counts.append(len(idx))
        splits[split] = {"count": n, "class_counts": {"NORMAL": n0, "PNEUMONIA": n1},
                         "patients": (n + 1) // 2, "shards": shards, "shard_counts": shard_counts}
        if version >= 2:
            splits[split]["subtype_counts"] = records.subtype_counts(subtypes)
    n0, n1 = splits["train"]["class_counts"].values() if "train" in splits else (1, 1)
    total = n0 + n1
    manifest = {"version": version, "tool_version": "test", "image_size": image_size,
                "channels": 1, "crop": crop, "encoding": encoding, "compression": compression,
                "splits": splits, "class_weights": {"0": total / (2 * n0), "1": total / (2 * n1)},
                "rejected": 0, "duplicates_dropped": 0, "flags": {},
                "source": {"kind": "test", "seed": seed, "brightness_offset": brightness_offset}}
    if version >= 2 and "train" in splits:
        known = [splits["train"]["subtype_counts"][name] for name in records.SUBTYPE_NAMES]
        manifest["subtype_class_weights"] = {str(c): sum(known) / (3 * n) if n else 1.0
                                             for c, n in enumerate(known)}
    records.write_manifest(out, manifest)
    return out


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    """A 48-image raw-encoded data dir at 32x32 with train/val/test splits."""
    return write_tiny_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(run_dir, data_dir)``: a :func:`tiny_data_dir` and one epoch of small_cnn on it
    (:func:`support_runs.make_run`), built once for all xdist workers. Read-only: a test that
    writes into the run takes a copy."""
    from shared_runs import shared_result
    from support_runs import make_run

    def make(root):
        data = write_tiny_dataset(root / "data")
        return make_run(root / "run", data, epochs=1), data

    return shared_result(tmp_path_factory, "tiny_run", make)


# Finished runs shared by several test files, each built once for all pytest-xdist workers of a
# pytest call (tests/shared_runs.py). Tests must not change them: copy a run before writing into it.


# The calibration of :func:`tiny_export` (what its assertions compute with).
TINY_EXPORT_TEMPERATURE = 1.7
TINY_EXPORT_THRESHOLD = 0.45


def write_calibration(run_dir: Path, temperature: float = TINY_EXPORT_TEMPERATURE,
                      threshold: float = TINY_EXPORT_THRESHOLD) -> None:
    """A val calibration (``calibration.json``, threshold method val_youden) written as given."""
    from pneumo_tf.core import atomic_files, rundir

    atomic_files.write_json_atomic(rundir.RunPaths(run_dir).calibration, {
        "temperature": temperature, "threshold": threshold, "threshold_method": "val_youden",
        "source": "val", "threshold_applies_to": "probability"})


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory):
    """``(run_dir, data_dir, export report)``: a copy of :func:`tiny_run` with the calibration of
    :func:`write_calibration`, exported in both formats (parity on its 12 val images)."""
    from shared_runs import shared_result

    def make(root):
        import shutil

        from pneumo_tf.serving import export

        run, data = Path(shutil.copytree(tiny_run[0], root / "run")), tiny_run[1]
        write_calibration(run)
        report = export.export_run(run, ["saved_model", "tflite"], data_dir=data,
                                   parity_count=12)
        return run, data, report

    return shared_result(tmp_path_factory, "tiny_export", make)


@pytest.fixture(scope="session")
def phantom_ood_run(tmp_path_factory):
    """``(run_dir, data_dir, phantom source dir)``: a phantom-trained run with its OOD guard."""
    from shared_runs import shared_result
    from support_runs import make_phantom_ood_run

    return shared_result(tmp_path_factory, "phantom_ood", make_phantom_ood_run)


@pytest.fixture(scope="session")
def phantom_ood_export(phantom_ood_run, tmp_path_factory):
    """``{"run_dir", "saved_model", "tflite"}``: a copy of :func:`phantom_ood_run` exported in both
    formats (its guard in every model; parity on 16 val images), and its float16 TFLite model."""
    from shared_runs import shared_result

    def make(root):
        import shutil

        from pneumo_tf.serving import export

        run, data, _ = phantom_ood_run
        copy = Path(shutil.copytree(run, root / "run"))
        export.export_run(copy, ["saved_model", "tflite"], data_dir=data, parity_count=16)
        return {"run_dir": copy, "saved_model": copy / "export" / "saved_model",
                "tflite": copy / "export" / "model_fp16.tflite"}

    return shared_result(tmp_path_factory, "phantom_ood_export", make)


@pytest.fixture(scope="session")
def subtype_run(tmp_path_factory):
    """``(run_dir, data_dir)``: a calibrated three-class run with its OOD guard."""
    from shared_runs import shared_result
    from support_runs import make_subtype_run

    return shared_result(tmp_path_factory, "subtype", make_subtype_run)


@pytest.fixture(scope="session")
def subtype_export(subtype_run, tmp_path_factory):
    """``(run_dir, data_dir, export report)``: a copy of :func:`subtype_run` (with its guard)
    exported in both formats, parity on 12 val images."""
    from shared_runs import shared_result

    def make(root):
        import shutil

        from pneumo_tf.serving import export

        run, data = subtype_run
        copy = Path(shutil.copytree(run, root / "run"))
        report = export.export_run(copy, ["saved_model", "tflite"], data_dir=data,
                                   parity_count=12)
        return copy, data, report

    return shared_result(tmp_path_factory, "subtype_export", make)


@pytest.fixture(scope="session")
def phantom_lungs(tmp_path_factory):
    """Phantoms with lung masks, a classifier on them and a tiny lung model
    (:func:`support_runs.make_phantom_lungs`: ``src``, ``data``, ``plain``, ``run``, ``lungs``)."""
    from shared_runs import shared_result
    from support_runs import make_phantom_lungs

    return shared_result(tmp_path_factory, "phantom_lungs", make_phantom_lungs)


@pytest.fixture(scope="session")
def lung_run(tmp_path_factory):
    """``(lungs run dir, phantom source dir)``: a tiny lung model (32 px, 3 epochs) and its guard."""
    from shared_runs import shared_result
    from support_runs import make_lung_run

    return shared_result(tmp_path_factory, "lungs", make_lung_run)


@pytest.fixture(scope="session")
def lung_crop_run(lung_run, tmp_path_factory):
    """``(run_dir, data_dir)``: a calibrated classifier trained on phantoms cropped by
    :func:`lung_run`'s model (``--crop=lungs``)."""
    from shared_runs import shared_result
    from support_runs import make_lung_crop_run

    return shared_result(tmp_path_factory, "lung_crop",
                         lambda root: make_lung_crop_run(root, *lung_run))


@pytest.fixture(scope="session")
def lung_crop_export(lung_crop_run, tmp_path_factory):
    """``(run_dir, export report)``: a copy of :func:`lung_crop_run` exported in both formats
    (its own lung model in the graph), parity on 8 val images."""
    from shared_runs import shared_result

    def make(root):
        import shutil

        from pneumo_tf.serving import export

        run, data = lung_crop_run
        copy = shutil.copytree(run, root / "run")
        report = export.export_run(copy, ["saved_model", "tflite"], data_dir=data, parity_count=8)
        return copy, report

    return shared_result(tmp_path_factory, "lung_crop_export", make)
