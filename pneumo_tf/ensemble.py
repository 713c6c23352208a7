"""Ensembles as run directories: ``python -m pneumo_tf.ensemble --runs=A,B,C --out=E``.

An ensemble averages its members' probabilities of PNEUMONIA. It is written as an ordinary run
directory, so every later command takes it like any run: ``E/model.keras`` is one Keras model
(the members nested as ``member_0``, ``member_1``, ... and a mean), ``E/data_manifest.json`` is the
members' common data contract, ``E/summary.json`` lists the members, and ``E/calibration.json``
is fitted on the validation split when the ensemble is created (the members' own thresholds do
not carry over to their mean). Grad-CAM of an ensemble is the mean of the members' maps.

Members must share the data contract (image size, crop, encoding, channels): an ensemble of
models that were fed different pixels has no single input. ``pneumo_tf.train
--ensemble_seeds=0,1,2`` trains the members inside one run directory and calls
:func:`create_ensemble` itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pneumo_tf import atomic_files, cli, rundir
from pneumo_tf.data import records

log = logging.getLogger(__name__)

COMBINE = "mean_probability"
MEMBER_PREFIX = "member_"


class EnsembleError(ValueError):
    """Members that cannot form an ensemble; the message names the run and the difference."""


def member_summaries(run_dirs: list[str | os.PathLike]) -> list[dict]:
    """The finished members' summaries, checked to share one data contract.

    Raises:
        EnsembleError: fewer than two members, an unfinished member, or a data contract that
            differs from the first member's (every difference named).
        rundir.RunDirError: a member is not a run directory.
    """
    if len(run_dirs) < 2:
        raise EnsembleError(f"--runs needs at least two run directories, got {len(run_dirs)}")
    summaries, first = [], rundir.read_run_manifest(run_dirs[0])
    for run in run_dirs:
        summary = rundir.read_summary(run)
        if summary.get("status") != "complete" or not rundir.RunPaths(run).model.is_file():
            raise EnsembleError(f"{run} has not finished training (no complete summary.json and "
                                f"model.keras); finish it with `python -m pneumo_tf.train "
                                f"--run_dir={run} ...` first")
        diffs = records.manifest_mismatches(first, rundir.read_run_manifest(run))
        if diffs:
            raise EnsembleError(f"{run} does not share the data contract of {run_dirs[0]}: "
                                + "; ".join(d.replace("run has", "first has") for d in diffs)
                                + ". Ensemble members must be trained on data converted alike")
        summaries.append(summary)
    return summaries


def build_ensemble_model(members: list):
    """One Keras model averaging ``members``' probabilities (each ``[B, S, S, 1] -> [B, 1]``)."""
    import keras

    inputs = keras.Input(members[0].input_shape[1:], dtype=members[0].inputs[0].dtype,
                         name="image")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"{MEMBER_PREFIX}{i}"
        outputs.append(member(inputs))
    mean = keras.layers.Average(name=COMBINE, dtype="float32")(outputs)
    return keras.Model(inputs, mean, name="pneumo_ensemble")


def ensemble_members(model) -> list:
    """The member models of an ensemble model, or ``[]`` for a single model."""
    return [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]


def create_ensemble(run_dirs: list[str | os.PathLike], out: str | os.PathLike,
                    data_dir: str | os.PathLike | None = None, calibrate: bool = True) -> dict:
    """Write the ensemble run directory ``out`` of ``run_dirs`` (see the module docstring).

    Args:
        run_dirs: finished runs sharing a data contract.
        out: the ensemble's run directory (created; an earlier ensemble there is replaced).
        data_dir: data dir whose val split calibrates the ensemble; default: the first
            member's (its summary's ``config.data_dir``).
        calibrate: fit ``calibration.json`` on val now.

    Returns:
        The ensemble's ``summary.json``.
    """
    summaries = member_summaries(run_dirs)
    members = [rundir.load_model(r) for r in run_dirs]
    model = build_ensemble_model(members)
    paths = rundir.RunPaths(out)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json_atomic(paths.data_manifest, rundir.read_run_manifest(run_dirs[0]))
    with atomic_files.atomic_output(paths.model, keep_suffix=True) as tmp:
        model.save(str(tmp))
    config = dict(summaries[0].get("config") or {})
    data_dir = str(data_dir or config.get("data_dir") or "")
    summary = {
        "status": "complete", "config": {**config, "data_dir": data_dir},
        "ensemble": {"members": [str(Path(r).resolve()) for r in run_dirs], "combine": COMBINE,
                     "member_seeds": [(s.get("config") or {}).get("seed") for s in summaries]},
        "epochs_run": sum(int(s.get("epochs_run", 0)) for s in summaries),
        "precision_policy": summaries[0].get("precision_policy"),
    }
    summary["calibration"] = _calibrate(out, data_dir, model) if calibrate else "skipped"
    atomic_files.write_json_atomic(paths.summary, summary)
    return summary


def _calibrate(out, data_dir: str, model) -> str:
    if not data_dir:
        return "skipped: no --data_dir (and the members do not name theirs)"
    from pneumo_tf import calibration

    calibration.calibrate_run(out, data_dir, model=model)
    return "ok"


# ---------------------------------------------------------------------------------------------
# Command line (flags are defined by run(): the trainer imports this module as a library)

FLAGS: dict = {}


def main(argv: list[str]) -> None:
    runs, out, data_dir = FLAGS["runs"], FLAGS["out"], FLAGS["data_dir"]
    cli.check_args(argv, runs, out)
    summary = create_ensemble(runs.value, out.value, data_dir.value)
    print(f"ensemble of {len(summary['ensemble']['members'])} runs -> {out.value} "
          f"(calibration: {summary['calibration']})")


def run() -> None:
    FLAGS.update(runs=cli.runs_flag(), out=cli.out_flag(), data_dir=cli.data_dir_flag())
    cli.run_app(main, "pneumo_tf.ensemble")


if __name__ == "__main__":
    run()
