"""Evaluate a trained run on one split: predictions, metrics with CIs, report, TensorBoard.

Usage::

    python -m pneumo_tf.evaluate --run_dir=R --data_dir=D --split=test [--threshold=val_youden]

Writes ``R/eval/<split>/``: ``predictions.csv``, ``metrics.json``, ``report.md``, ``report.html``
(figures inline) and the PNG figures; the same figures and the metrics table go to TensorBoard
under ``R/tb/eval``. The threshold and the temperature come from ``R/calibration.json`` (fitted
on validation, first if it is missing). Another ``--threshold`` method than the stored one is
chosen on the ``val`` split in memory: ``calibration.json`` keeps the run's operating point (the
one export, predict and Grad-CAM use). The evaluated split never influences either.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from absl import flags

from pneumo_tf import atomic_files, calibration, cli, report, rundir, scoring
from pneumo_tf import metrics as pmetrics

RUN = cli.run_split_flags()

THRESHOLD = flags.DEFINE_string(
    "threshold", None,
    "Operating threshold, always chosen on the val split: " + calibration.THRESHOLD_METHODS_HELP
    + ". A number is used as is. Default: the run's stored operating point (calibration.json, "
    "val_youden unless training chose otherwise); another method never rewrites that file.")
NUM_RESAMPLES = flags.DEFINE_integer(
    "num_resamples", 2000, "Stratified bootstrap resamples for the 95 % CIs (>= 1000).",
    lower_bound=1000)


def write_predictions_csv(path: str | os.PathLike, pred: dict, calibrated: np.ndarray,
                          threshold: float) -> None:
    """One row per image: path, patient, label, probability, calibrated probability, prediction."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "probability", "calibrated_probability",
                    "prediction"])
        for i in range(pred["label"].size):
            p = float(pred["probability"][i])
            w.writerow([pred["path"][i], pred["patient_id"][i], int(pred["label"][i]),
                        f"{p:.6f}", f"{float(calibrated[i]):.6f}", int(p >= threshold)])


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                 threshold_method: str | None = None, batch_size: int = 64,
                 num_resamples: int = 2000, seed: int = 0, model=None) -> dict:
    """Evaluate ``run_dir``'s model on ``split`` of ``data_dir`` and write ``R/eval/<split>/``.

    Args:
        run_dir: finished run directory.
        data_dir: data dir converted with the run's settings (checked against its manifest).
        split: split to evaluate (``val`` is allowed; the report says so).
        threshold_method: see :func:`pneumo_tf.calibration.choose_threshold`; None = the
            run's stored operating point. Another method is computed on ``val`` in memory;
            ``R/calibration.json`` is never rewritten (see
            :func:`pneumo_tf.calibration.operating_point`).
        batch_size: images per forward pass.
        num_resamples, seed: of the bootstrap CIs.
        model: an already loaded model, or None to load ``R/model.keras``.

    Returns:
        The ``metrics.json`` dict.

    Raises:
        rundir.RunDirError: incompatible data or an unfinished run.
        records.DataDirError: unusable data dir or split.
    """
    if threshold_method is not None:
        calibration.parse_threshold_method(threshold_method)
    paths = rundir.RunPaths(run_dir)
    rundir.check_data_compatible(run_dir, data_dir)
    if model is None:
        model = rundir.load_model(run_dir)
    point = calibration.operating_point(run_dir, data_dir, threshold_method, model, batch_size)
    threshold = point["threshold"]  # on the raw probability, whatever calibration.json holds
    temperature = point["temperature"]

    pred = scoring.predict_split(model, data_dir, split, batch_size)
    labels, probs = pred["label"], pred["probability"].astype(np.float64)
    calibrated = calibration.apply_temperature(probs, temperature)
    threshold_info = {"value": threshold, "method": point["method"], "source": "val",
                      "applies_to": "probability"}
    metrics = pmetrics.binary_report(labels, probs, threshold, threshold_info, num_resamples, seed)
    metrics["split"] = split
    metrics["temperature"] = temperature
    metrics["calibrated"] = {"brier": pmetrics.ranking_metrics(labels, calibrated)["brier"],
                             "ece": pmetrics.expected_calibration_error(labels, calibrated)}

    out = paths.eval_dir(split)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", pred, calibrated, threshold)
    atomic_files.write_json_atomic(out / "metrics.json", metrics)
    figures = report.make_figures(labels, probs, calibrated, threshold,
                                  metrics["confusion_matrix"], report.read_history(paths.history))
    figure_files = report.save_figures(figures, out)
    context = {"split": split, "run_dir": str(Path(run_dir)), "data_dir": str(Path(data_dir)),
               "temperature": temperature}
    report.write_markdown(out / "report.md", metrics, figure_files, context)
    report.write_html(out / "report.html", metrics, figures, context)
    report.write_tensorboard(paths.tb / "eval", figures, metrics, split)
    return metrics


def main(argv):
    cli.check_args(argv, RUN.run_dir, RUN.data_dir)
    metrics = evaluate_run(RUN.run_dir.value, RUN.data_dir.value, RUN.split.value,
                           THRESHOLD.value, RUN.batch_size.value, NUM_RESAMPLES.value,
                           RUN.seed.value)
    ci = (metrics["ci95"] or {}).get("roc_auc")
    auc_ci = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    print(f"{metrics['split']}: n={metrics['n']} accuracy={metrics['accuracy']:.4f} "
          f"sensitivity={metrics['recall']:.4f} specificity={metrics['specificity']:.4f} "
          f"AUC={metrics['roc_auc']:.4f} {auc_ci} -> "
          f"{rundir.RunPaths(RUN.run_dir.value).eval_dir(metrics['split'])}")


def run():
    cli.run_app(main, "pneumo_tf.evaluate")


if __name__ == "__main__":
    run()
