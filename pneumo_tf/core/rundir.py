"""The run directory: what one training run leaves behind, and how later stages read it.

Layout (written by ``pneumo_tf.train`` unless noted)::

    R/flags.txt            the flags of the run; usable as --flagfile to repeat it
    R/data_manifest.json   copy of the data dir's manifest.json
    R/tb/                  TensorBoard logs (train/, val/, eval/, gradcam/ subfolders)
    R/backup/              checkpoints for resume after a crash or preemption
    R/best.weights.h5      weights of the best epoch (lowest val_loss)
    R/model.keras          final model (best weights restored), loadable with safe_mode=True
    R/history.csv          one row per epoch, 0-based ``epoch`` column
    R/summary.json         precision, strategy, epochs, best epoch, throughput, ``config``
    R/calibration.json     temperature and operating threshold, fitted on val (pneumo_tf.evaluation.calibration)
    R/calibrations/        NAME.json: the same re-fitted on another site's sample (pneumo_tf.calibrate)
    R/eval/<name>/         evaluation report (pneumo_tf.evaluate); <name> is the evaluation's
                           name (evaluation_name): <split>, <split>-<data dir name>, ...
    R/gradcam/             Grad-CAM grids and cam_stats.json of the run's own data
                           (pneumo_tf.gradcam); R/gradcam/<name>/ for other data (gradcam_dir)
    R/export/              SavedModel, TFLite, parity.json (pneumo_tf.export)
    R/export_NAME/         the same with calibration NAME baked in (export --calibration=NAME)
    R/ood.json, R/ood_stats.npz   the out-of-distribution guard (pneumo_tf.ood)
    R/lung_guard.json      a lungs run (--task=lungs): its no-lungs guard, fitted on val
    R/members/seed_N/      an ensemble trained with --ensemble_seeds: its member runs

A run's calibrations are named: ``val`` is ``R/calibration.json`` (every run has it), any other
name ``R/calibrations/NAME.json`` (:func:`read_named_calibration`). Runs written before named
calibrations existed simply have no ``calibrations/`` folder.

Every file name of a run directory is spelled here only (:class:`RunPaths` and the ``*_NAME``
constants). :class:`Run` is a run directory opened once and passed on: a stage that gets one
reads the flags and the data manifest once and loads the model once (on demand); a ``Run`` is
also an ``os.PathLike``, so every function that takes a run directory path takes a ``Run``, and
the ``read_*`` functions here answer from the ``Run`` they are given.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from pathlib import Path

from pneumo_tf.core import atomic_files
from pneumo_tf.data import records


# The calibration every run has: R/calibration.json, fitted on its own val split.
VAL_CALIBRATION = "val"
# Files of an evaluation folder (R/eval/<name>/, :func:`evaluation_dir`).
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
REPORT_MD_NAME = "report.md"
REPORT_HTML_NAME = "report.html"
# Files of R/gradcam/ and R/export*/.
CAM_STATS_NAME = "cam_stats.json"
PARITY_NAME = "parity.json"
# The out-of-distribution guard (pneumo_tf.serving.ood): settings and statistics.
OOD_JSON = "ood.json"
OOD_STATS = "ood_stats.npz"
# A lungs run's guard (pneumo_tf.serving.lungs): the lung confidence under which no lungs are found.
LUNG_GUARD_NAME = "lung_guard.json"
_CALIBRATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RunDirError(ValueError):
    """A run directory is missing something a command needs; the message names the fix."""


class RunPaths:
    """Paths inside one run directory (nothing is created by constructing it)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.flags = self.root / "flags.txt"
        self.data_manifest = self.root / "data_manifest.json"
        self.tb = self.root / "tb"
        self.backup = self.root / "backup"
        self.best_weights = self.root / "best.weights.h5"
        self.model = self.root / "model.keras"
        self.history = self.root / "history.csv"
        self.summary = self.root / "summary.json"
        self.calibration = self.root / "calibration.json"
        self.calibrations = self.root / "calibrations"  # the site calibrations, NAME.json each
        self.eval = self.root / "eval"
        self.gradcam = self.root / "gradcam"
        self.cam_stats = self.gradcam / CAM_STATS_NAME
        self.export = self.root / "export"
        self.ood_json = self.root / OOD_JSON
        self.ood_stats = self.root / OOD_STATS
        self.lung_guard = self.root / LUNG_GUARD_NAME
        self.members = self.root / "members"  # an ensemble's member runs (--ensemble_seeds)
        # TensorBoard folders of the later stages (training writes tb/train, tb/val).
        self.tb_eval = self.tb / "eval"
        self.tb_gradcam = self.tb / "gradcam"

    def eval_dir(self, split: str) -> Path:
        return self.eval / split

    def entries(self) -> tuple[Path, ...]:
        """Every file and folder a run may hold directly in it, but ``export_<name>/``."""
        return (self.flags, self.data_manifest, self.tb, self.backup, self.best_weights,
                self.model, self.history, self.summary, self.calibration, self.calibrations,
                self.eval, self.gradcam, self.export, self.ood_json, self.ood_stats,
                self.lung_guard, self.members)

    def calibration_file(self, name: str = VAL_CALIBRATION) -> Path:
        """``calibration.json`` for ``val``, else ``calibrations/<name>.json``."""
        if name == VAL_CALIBRATION:
            return self.calibration
        return self.calibrations / f"{check_calibration_name(name)}.json"

    def export_dir(self, calibration: str = VAL_CALIBRATION) -> Path:
        """``export/`` for the ``val`` calibration, else ``export_<name>/`` (same layout)."""
        if calibration == VAL_CALIBRATION:
            return self.export
        return self.root / f"export_{check_calibration_name(calibration)}"


# The names of :meth:`RunPaths.entries` (:func:`is_run_entry`).
RUN_ENTRIES = frozenset(path.name for path in RunPaths("run").entries())


def is_run_entry(name: str) -> bool:
    """Whether a file or folder named ``name`` directly in a folder is one a run writes, or the
    temporary sibling of one being written (:func:`pneumo_tf.core.atomic_files.partial_path`).
    A multi-worker run's other workers check the folder while the chief writes its first file."""
    name = name.replace(atomic_files.PARTIAL, "", 1)
    return name in RUN_ENTRIES or name.startswith("export_")


class Run:
    """One run directory, opened once and passed on (see the module docstring).

    ``flags`` (``flags.txt``), ``manifest`` (``data_manifest.json``), ``data_dir`` (the data it
    was trained on) and ``model`` (``model.keras``, loaded on first use) are read once;
    ``summary`` and the calibrations are read when asked (later steps rewrite them).

    Args:
        run_dir: the run directory (or a :class:`Run`, see :meth:`open`).
        model: the run's model already in memory (the training loop passes the one it has just
            saved as ``model.keras``); None loads ``model.keras`` when first asked for.
    """

    def __init__(self, run_dir: str | os.PathLike, model=None):
        self.paths = RunPaths(run_dir)
        self.root = self.paths.root
        if model is not None:
            self.model = model  # takes the place of the cached property below

    @classmethod
    def open(cls, run_dir: "str | os.PathLike | Run") -> "Run":
        """``run_dir`` itself when it is a :class:`Run` already, else a new one."""
        return run_dir if isinstance(run_dir, Run) else cls(run_dir)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    @functools.cached_property
    def flags(self) -> dict[str, str]:
        """The flags of ``flags.txt`` (:func:`parse_flags_text`); empty without one."""
        if not self.paths.flags.is_file():
            return {}
        return parse_flags_text(self.paths.flags.read_text(encoding="utf-8"))

    @functools.cached_property
    def manifest(self) -> dict:
        """``data_manifest.json``: the data contract the run was trained on."""
        return _read_json(self.paths.data_manifest, "the data manifest of the run",
                          "is this a run directory written by `python -m pneumo_tf.train`?")

    @property
    def summary(self) -> dict:
        """``summary.json`` of a finished run (its ``config`` holds backbone, input_norm, ...)."""
        return _read_json(self.paths.summary, "the run has not finished training",
                          "train it first with `python -m pneumo_tf.train --run_dir=...`")

    @functools.cached_property
    def data_dir(self) -> str | None:
        """The data dir the run was trained on: ``summary.json``'s ``config.data_dir``, else
        the ``--data_dir`` of ``flags.txt``; None when neither names one."""
        return self._trained_with("data_dir")

    @property
    def task(self) -> str:
        """The run's ``--task`` (``binary`` when summary.json and flags.txt name none)."""
        return self._trained_with("task") or "binary"

    def _trained_with(self, key: str) -> str | None:
        """``summary.json``'s ``config[key]`` (an unreadable summary counts as none), else the
        ``--key`` of ``flags.txt``; None when neither names one."""
        if self.paths.summary.is_file():
            try:
                value = (json.loads(self.paths.summary.read_text(encoding="utf-8"))
                         .get("config") or {}).get(key)
            except json.JSONDecodeError:
                value = None
            if value:
                return str(value)
        return self.flags.get(key) or None

    def calibration(self, name: str = VAL_CALIBRATION) -> dict | None:
        """The run's calibration ``name`` (:func:`read_named_calibration`)."""
        return read_named_calibration(self, name)

    def evaluation_dir(self, data_dir: str | Path | None, split: str,
                       calibration: str = VAL_CALIBRATION) -> Path:
        """Where one evaluation of the run lives (:func:`evaluation_dir`)."""
        return evaluation_dir(self, data_dir, split, calibration)

    @functools.cached_property
    def model(self):
        """``model.keras``, loaded (Keras safe mode) the first time it is asked for."""
        return _load_keras_model(self.paths.model)


def check_calibration_name(name: str) -> str:
    """``name`` if it can name a calibration file (letters, digits, ``_.-``; 64 at most).

    Raises:
        ValueError: naming ``--name``/``--calibration`` and the allowed characters.
    """
    if not isinstance(name, str) or not _CALIBRATION_NAME.fullmatch(name):
        raise ValueError(f"calibration name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit (e.g. site_b)")
    return name


def parse_flags_text(text: str) -> dict[str, str]:
    """``{flag name: value}`` of a flagfile as ``pneumo_tf.train`` writes it (``flags.txt``).

    ``--name=value`` lines give ``value`` as written; booleans (``--name`` / ``--noname``, how
    absl serialises them) become ``"true"`` / ``"false"``; comments, blank lines and anything
    else not starting with ``--`` are skipped; a flag given twice keeps its last value. A
    boolean flag whose own name starts with ``no`` would be ambiguous; no app defines one.
    """
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, sep, value = line[2:].partition("=")
        if not sep:
            name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
        values[name] = value
    return values


def read_run_flags(run_dir: str | Path) -> dict[str, str]:
    """The flags the run was trained with (``R/flags.txt``, see :func:`parse_flags_text`).

    Returns:
        ``{flag name: value as text}``; empty when the run has no ``flags.txt`` (a run made
        by other means than the training app).
    """
    return Run.open(run_dir).flags


def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise RunDirError(f"{path} is missing ({what}); {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); {fix}") from e


def read_run_manifest(run_dir: str | Path) -> dict:
    """The data manifest the run was trained on."""
    return Run.open(run_dir).manifest


def read_summary(run_dir: str | Path) -> dict:
    """``summary.json`` of a finished run (its ``config`` holds backbone, input_norm, ...)."""
    return Run.open(run_dir).summary


def read_calibration(run_dir: str | Path) -> dict | None:
    """``calibration.json`` of the run, or None when it has none yet."""
    path = RunPaths(run_dir).calibration
    if not path.is_file():
        return None
    return _read_json(path, "calibration", "re-run `python -m pneumo_tf.evaluate --split=val`")


def list_calibrations(run_dir: str | Path) -> list[str]:
    """Names of the run's calibrations: ``val`` when ``calibration.json`` exists, then the
    ``calibrations/*.json`` stems, sorted."""
    paths = RunPaths(run_dir)
    names = [VAL_CALIBRATION] if paths.calibration.is_file() else []
    if paths.calibrations.is_dir():
        names += sorted(p.stem for p in paths.calibrations.glob("*.json"))
    return names


def read_named_calibration(run_dir: str | Path, name: str = VAL_CALIBRATION) -> dict | None:
    """The run's calibration ``name``: ``val`` = ``calibration.json`` (None when missing, as
    :func:`read_calibration`), any other name ``calibrations/<name>.json``, which must exist.

    Raises:
        RunDirError: a named calibration is missing (the existing names and the command that
            fits one are given).
        ValueError: ``name`` is not a valid calibration name.
    """
    if name == VAL_CALIBRATION:
        return read_calibration(run_dir)
    path = RunPaths(run_dir).calibration_file(name)
    fix = (f"fit it with `python -m pneumo_tf.calibrate --run_dir={run_dir} --data_dir=<the "
           f"site's data dir> --split=test --name={name}`")
    if not path.is_file():
        known = ", ".join(list_calibrations(run_dir)) or "none"
        raise RunDirError(f"--calibration={name}: {path} is missing (this run has: {known}); "
                          f"{fix}")
    return _read_json(path, f"calibration {name}", fix)


def run_data_dir(run_dir: str | Path) -> str | None:
    """The data dir the run was trained on: ``summary.json``'s ``config.data_dir``, else the
    ``--data_dir`` of ``flags.txt``; None when neither names one."""
    return Run.open(run_dir).data_dir


def is_same_data(data_dir_a: str | Path, data_dir_b: str | Path) -> bool:
    """Whether two data dirs are one conversion: the same resolved path or equal manifests
    (a manifest records its source checksum, flags and timing, so two conversions differ)."""
    if Path(data_dir_a).resolve() == Path(data_dir_b).resolve():
        return True
    try:
        return records.read_manifest(data_dir_a) == records.read_manifest(data_dir_b)
    except records.DataDirError:
        return False


def is_run_data(run_dir: str | Path, data_dir: str | Path) -> bool:
    """Whether ``data_dir`` is the data the run was trained on: its manifest equals the run's
    ``data_manifest.json`` (a moved copy counts), or it is :func:`run_data_dir`."""
    if records.read_manifest(data_dir) == read_run_manifest(run_dir):
        return True
    own = run_data_dir(run_dir)
    return own is not None and Path(own).resolve() == Path(data_dir).resolve()


def evaluation_name(run_dir: str | Path, data_dir: str | Path | None, split: str,
                    calibration: str = VAL_CALIBRATION, threshold_method: str | None = None
                    ) -> str:
    """The name of one evaluation of the run, so that no evaluation overwrites another: its
    folder under ``R/eval/`` (and ``R/gradcam/``) and the prefix of its TensorBoard tags
    (``test-site_b/accuracy``).

    ``<split>`` for the run's own data (or ``data_dir`` None), ``<split>-<data dir name>`` for
    another data dir (another site's films), a ``-cal_<name>`` suffix for a site calibration
    and an ``@<method>`` suffix for a what-if threshold (``evaluate --threshold=METHOD`` other
    than the stored method; ``threshold_method`` None otherwise): ``test@val_youden``,
    ``test-site_b@val_sensitivity:0.95``.
    """
    name = split
    if data_dir is not None and not is_run_data(run_dir, data_dir):
        name += f"-{Path(data_dir).resolve().name}"
    if calibration != VAL_CALIBRATION:
        name += f"-cal_{calibration}"
    if threshold_method is not None:
        name += f"@{threshold_method}"
    return name


def evaluation_dir(run_dir: str | Path, data_dir: str | Path | None, split: str,
                   calibration: str = VAL_CALIBRATION, threshold_method: str | None = None
                   ) -> Path:
    """Where ``evaluate`` writes (and ``compare`` reads) one evaluation:
    ``R/eval/<evaluation name>`` (:func:`evaluation_name`)."""
    return RunPaths(run_dir).eval_dir(
        evaluation_name(run_dir, data_dir, split, calibration, threshold_method))


def gradcam_dir(run_dir: str | Path, data_dir: str | Path | None, split: str,
                calibration: str = VAL_CALIBRATION) -> Path:
    """Where ``gradcam`` writes: ``R/gradcam`` for the run's own data at the ``val``
    calibration (any split), else ``R/gradcam/<evaluation name>`` (:func:`evaluation_name`:
    ``R/gradcam/test-site_b``), so another data dir's maps leave the run's own alone."""
    paths = RunPaths(run_dir)
    name = evaluation_name(run_dir, data_dir, split, calibration)
    own = calibration == VAL_CALIBRATION and (data_dir is None or is_run_data(run_dir, data_dir))
    return paths.gradcam if own else paths.gradcam / name


def own_data_dir(run_dir: str | Path, data_dir: str | Path) -> str:
    """The data dir whose val split calibrates the run when it is used on ``data_dir``:
    ``data_dir`` itself when it is the run's own data (:func:`is_run_data`), else the run's
    recorded data dir (:func:`run_data_dir`), else ``data_dir`` after all."""
    if is_run_data(run_dir, data_dir):
        return str(data_dir)
    return run_data_dir(run_dir) or str(data_dir)


def check_data_compatible(run_dir: str | Path, data_dir: str | Path) -> dict:
    """Refuse a data dir whose manifest differs from the run's in image size, crop or encoding.

    Returns:
        The data dir's manifest.

    Raises:
        RunDirError: the manifests differ (every difference is named).
        records.DataDirError: the data dir itself is unusable.
    """
    data_manifest = records.read_manifest(data_dir)
    run_manifest = read_run_manifest(run_dir)
    diffs = records.manifest_mismatches(run_manifest, data_manifest)
    if diffs:
        raise RunDirError(
            f"data dir {data_dir} does not match run {run_dir}: " + "; ".join(diffs)
            + ". Convert the data with the run's settings (see its data_manifest.json flags) "
              "or pick the matching data dir.")
    return data_manifest


def write_history_csv(path: str | os.PathLike, rows: list[dict], columns: tuple[str, ...]) -> None:
    """Write ``history.csv`` atomically: one row per epoch, ``columns`` (``epoch`` first)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(row[k])) if k != "epoch" else int(row[k]))
                         for k in columns})
    atomic_files.write_text_atomic(path, buf.getvalue())


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``history.csv`` (``epoch`` int, the rest float)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)]


def load_model(run_dir_or_file: "str | Path | Run"):
    """Load ``model.keras`` (a run dir or the file) with Keras safe mode on; a :class:`Run`
    gives its model, loaded once."""
    if isinstance(run_dir_or_file, Run):
        return run_dir_or_file.model
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = RunPaths(path).model
    return _load_keras_model(path)


def _load_keras_model(path: Path):
    """Importing :mod:`pneumo_tf.modeling.model` registers the project's serializable layers,
    so nothing needs ``safe_mode=False`` (which would unpickle arbitrary Python)."""
    import keras

    import pneumo_tf.modeling.model  # noqa: F401  (registers custom layers)

    if not path.is_file():
        raise RunDirError(f"{path} is missing; train the run first (`python -m pneumo_tf.train`)")
    return keras.saving.load_model(path, safe_mode=True, compile=False)
