"""Resume: a run directory tells whether its run is new, resumable, to be continued or finished.

The same ``--run_dir`` again resumes from the last backup if the flags match its ``flags.txt``
(:func:`pneumo_tf.training.config.check_resume_flags`; ``--epochs`` may grow); a finished run
says it is complete (:func:`completed_run`); a ``--run_dir`` that is a file, or a folder holding
files but nothing of a run, is refused (:func:`check_run_dir`). The backup itself (a
``tf.train.Checkpoint`` of the model, the optimizer and the
:class:`pneumo_tf.training.loop.RunState`) is saved and restored by the loop.
"""

from __future__ import annotations

import json
import logging

import tensorflow as tf

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.training import distribute
from pneumo_tf.training.config import TrainConfig, TrainError, check_resume_flags

log = logging.getLogger("pneumo_tf.train")


def _completed_summary(paths: rundir.RunPaths) -> dict | None:
    if not paths.summary.is_file():
        return None
    try:
        summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return summary if summary.get("status") == "complete" else None


def check_run_dir(paths: rundir.RunPaths) -> None:
    """Refuse a ``--run_dir`` that cannot become a run directory: a file (or a path under one),
    or a folder that holds files but none a run writes (:func:`pneumo_tf.core.rundir.is_run_entry`;
    hidden files aside): training would mix its files with someone else's. A missing or empty
    folder is a new run; a folder with a run's files is resumed or reported complete.

    Raises:
        TrainError: naming the file in the way and the fix.
    """
    root = paths.root
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == root else f"is under {path}, which is a file"
                raise TrainError(f"--run_dir={root} {where}, not a folder; pass a new folder "
                                 f"(training creates it) or the folder of a run to resume")
            break
    if not root.is_dir():
        return
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    if entries and not any(rundir.is_run_entry(name) for name in entries):
        more = f" and {len(entries) - 1} other file(s)" if len(entries) > 1 else ""
        raise TrainError(f"--run_dir={root} is not a run directory: it holds "
                         f"{root / entries[0]}{more} and no run's files (flags.txt, "
                         f"data_manifest.json, backup/, ...); pass a new or empty folder")


def completed_run(cfg: TrainConfig, paths: rundir.RunPaths,
                  setup: distribute.DistributionSetup | None, flags_text: str | None,
                  after_training: tuple = ()) -> dict | None:
    """The summary of a finished run (running an ``after_training`` step whose output is
    missing, :class:`pneumo_tf.training.loop.AfterTraining`), else None.

    A finished run given a larger ``--epochs`` (or ``--early_stop_patience``) than its
    ``flags.txt`` is continued instead: None is returned, and its summary says ``continuing``
    until the new epochs are done. Any other changed flag is refused (:func:`check_resume_flags`),
    and so is a ``--run_dir`` that is no run directory (:func:`check_run_dir`), before anything
    else.
    """
    check_run_dir(paths)
    done = _completed_summary(paths)
    if done is None:
        return None
    if flags_text is not None and paths.flags.is_file() and check_resume_flags(
            paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags, finished=True):
        if "ensemble" not in done and tf.train.latest_checkpoint(str(paths.backup)) is None:
            raise TrainError(f"{paths.root} has finished and has no backup/ to continue from; "
                             f"train the longer run in a new --run_dir")
        log.info("continuing the finished run %s to --epochs=%d", paths.root, cfg.epochs)
        if setup is None or setup.is_chief:
            atomic_files.write_json_atomic(paths.summary, {**done, "status": "continuing"})
        return None
    log.info("run dir %s is complete (%s epochs, best epoch %s); nothing to do. Use a new "
             "--run_dir to train again, or a larger --epochs to continue it.", paths.root,
             done.get("epochs_run"), done.get("best_epoch"))
    run = rundir.Run(paths.root)
    for step in after_training:
        # summary.json is written before these steps: a failed or killed one is finished here.
        if step.redo is not None and step.redo(cfg, paths) and (setup is None or setup.is_chief):
            log.info("%s: the finished run's %s is missing; running it now", paths.root,
                     step.name)
            done[step.name] = step.run(cfg, run)
            atomic_files.write_json_atomic(paths.summary, done)
    return done


def check_resume(cfg: TrainConfig, paths: rundir.RunPaths, flags_text: str | None) -> bool:
    """Refuse a resume with changed flags; whether ``flags.txt`` is to be (re)written."""
    if tf.train.latest_checkpoint(str(paths.backup)) is None:
        return True
    if flags_text is None or not paths.flags.is_file():
        return not paths.flags.is_file()
    grew = check_resume_flags(paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags)
    if grew:
        log.info("--epochs / --early_stop_patience raised to %d / %d for the resumed run",
                 cfg.epochs, cfg.early_stop_patience)
    return grew


def prepare_run_dir(paths: rundir.RunPaths, manifest: dict, setup: distribute.DistributionSetup,
                    flags_text: str | None, write_flags: bool) -> None:
    """Write ``data_manifest.json`` (once) and ``flags.txt`` (chief only)."""
    if not setup.is_chief:
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.data_manifest.is_file():
        atomic_files.write_json_atomic(paths.data_manifest, manifest)
    if flags_text is not None and write_flags:
        atomic_files.write_text_atomic(paths.flags, flags_text)
