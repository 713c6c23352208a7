"""Ensembles as run directories (``python -m pneumo_tf.ensemble --runs=A,B,C --out=E``).

An ensemble averages its members' probabilities of PNEUMONIA. It is written as an ordinary run
directory, so every later command takes it like any run: ``E/model.keras`` is one Keras model
(the members nested as ``member_0``, ``member_1``, ... and a mean), ``E/data_manifest.json`` is the
members' common data contract, ``E/summary.json`` lists the members, and ``E/calibration.json``
is fitted on the validation split when the ensemble is created (the members' own thresholds do
not carry over to their mean). Grad-CAM of an ensemble is the mean of the members' maps.

Members must share the data contract (image size, crop, encoding, channels): an ensemble of
models that were fed different pixels has no single input. ``pneumo_tf.train
--ensemble_seeds=0,1,2`` trains the members inside one run directory and makes their ensemble
(:func:`train_ensemble`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.data import records
from pneumo_tf.modeling.ensemble_model import COMBINE, build_ensemble_model
from pneumo_tf.training.config import check_resume_flags, flags_file_text

log = logging.getLogger(__name__)

class EnsembleError(ValueError):
    """Members that cannot form an ensemble; the message names the run and the difference."""


def member_summaries(run_dirs: list[str | os.PathLike]) -> list[dict]:
    """The finished members' summaries, checked to share one data contract.

    Args:
        run_dirs: the members' run directories (paths or :class:`pneumo_tf.core.rundir.Run`).

    Raises:
        EnsembleError: fewer than two members, an unfinished member, or a data contract that
            differs from the first member's (every difference named).
        rundir.RunDirError: a member is not a run directory.
    """
    if len(run_dirs) < 2:
        raise EnsembleError(f"--runs needs at least two run directories, got {len(run_dirs)}")
    runs = [rundir.Run.open(r) for r in run_dirs]
    summaries, first = [], runs[0].manifest
    for run in runs:
        summary = run.summary
        if summary.get("status") != "complete" or not run.paths.model.is_file():
            raise EnsembleError(f"{run} has not finished training (no complete summary.json and "
                                f"model.keras); finish it with `python -m pneumo_tf.train "
                                f"--run_dir={run} ...` first")
        diffs = records.manifest_mismatches(first, run.manifest)
        if diffs:
            raise EnsembleError(f"{run} does not share the data contract of {runs[0]}: "
                                + "; ".join(d.replace("run has", "first has") for d in diffs)
                                + ". Ensemble members must be trained on data converted alike")
        summaries.append(summary)
    return summaries


def create_ensemble(run_dirs: list[str | os.PathLike], out: str | os.PathLike,
                    data_dir: str | os.PathLike | None = None, calibrate: bool = True) -> dict:
    """Write the ensemble run directory ``out`` of ``run_dirs`` (see the module docstring).

    Args:
        run_dirs: finished runs sharing a data contract (paths or
            :class:`pneumo_tf.core.rundir.Run`, each opened once).
        out: the ensemble's run directory (created; an earlier ensemble there is replaced).
        data_dir: data dir whose val split calibrates the ensemble; default: the first
            member's (its summary's ``config.data_dir``).
        calibrate: fit ``calibration.json`` on val now.

    Returns:
        The ensemble's ``summary.json``.
    """
    return _write_ensemble(run_dirs, out, data_dir, calibrate)[0]


def _write_ensemble(run_dirs, out, data_dir, calibrate: bool) -> tuple[dict, rundir.Run]:
    """:func:`create_ensemble`'s work: ``(summary, the ensemble's Run holding the model it has
    just built)``, so the steps after it do not load ``model.keras`` again."""
    runs = [rundir.Run.open(r) for r in run_dirs]
    summaries = member_summaries(runs)
    model = build_ensemble_model([run.model for run in runs])
    paths = rundir.RunPaths(out)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json_atomic(paths.data_manifest, runs[0].manifest)
    with atomic_files.atomic_output(paths.model, keep_suffix=True) as tmp:
        model.save(str(tmp))
    config = dict(summaries[0].get("config") or {})
    data_dir = str(data_dir or config.get("data_dir") or "")
    summary = {
        "status": "complete", "config": {**config, "data_dir": data_dir},
        "ensemble": {"members": [str(run.root.resolve()) for run in runs], "combine": COMBINE,
                     "member_seeds": [(s.get("config") or {}).get("seed") for s in summaries]},
        "epochs_run": sum(int(s.get("epochs_run", 0)) for s in summaries),
        "precision_policy": summaries[0].get("precision_policy"),
    }
    run = rundir.Run(paths.root, model=model)
    summary["calibration"] = _calibrate(run, data_dir) if calibrate else "skipped"
    atomic_files.write_json_atomic(paths.summary, summary)
    return summary, run


def _calibrate(run: rundir.Run, data_dir: str) -> str:
    if not data_dir:
        return "skipped: no --data_dir (and the members do not name theirs)"
    from pneumo_tf.evaluation import calibration

    calibration.calibrate_run(run, data_dir)
    return "ok"


def train_ensemble(cfg, setup, flags_text: str | None, train_member: Callable[..., dict],
                   after_training: tuple = ()) -> dict:
    """Train one member per ``--ensemble_seeds`` seed, then make ``cfg.run_dir`` their ensemble.

    Members live in ``RUN_DIR/members/seed_N`` and resume (or are skipped when complete) like
    any run; the ensemble (:func:`create_ensemble`, calibrated on val with ``cfg.calibrate``)
    is written last.

    Args:
        cfg: the ensemble's ``TrainConfig`` (:mod:`pneumo_tf.training.config`).
        setup: the resolved distribution (``is_chief``), or None.
        flags_text: contents for ``flags.txt``, or None.
        train_member: ``(member cfg, setup, flags_text) -> summary`` trains one member
            (:func:`pneumo_tf.training.session.train` passes the loop with its steps).
        after_training: :class:`pneumo_tf.training.loop.AfterTraining` steps run on the
            ensemble's :class:`~pneumo_tf.core.rundir.Run` after it is written (holding the
            model just built: no step loads ``model.keras``).
    """
    paths = rundir.RunPaths(cfg.run_dir)
    if flags_text is not None and paths.flags.is_file():
        check_resume_flags(paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags)
    paths.root.mkdir(parents=True, exist_ok=True)
    if flags_text is not None:
        atomic_files.write_text_atomic(paths.flags, flags_text)
    members = []
    for seed in cfg.member_seeds():
        member = dataclasses.replace(cfg, seed=seed, ensemble_seeds="",
                                     run_dir=str(paths.members / f"seed_{seed}"))
        print(f"ensemble member seed {seed} -> {member.run_dir}", flush=True)
        train_member(member, setup,
                     flags_file_text(member) if flags_text is not None else None)
        members.append(member.run_dir)
    if setup is not None and not setup.is_chief:
        return {"status": "complete", "ensemble": {"members": members}}
    summary, run = _write_ensemble(members, cfg.run_dir, cfg.data_dir, cfg.calibrate)
    for step in after_training:
        summary[step.name] = step.run(cfg, run)
    atomic_files.write_json_atomic(paths.summary, summary)
    print(f"ensemble of {len(members)} members -> {cfg.run_dir}", flush=True)
    return summary
