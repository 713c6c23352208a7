"""Evaluate a trained run on one split: predictions, metrics with CIs, report, TensorBoard.

Usage::

    python -m pneumo_tf.evaluate --run_dir=R --data_dir=D --split=test [--threshold=val_youden] \
        [--calibration=val|NAME] [--val_data_dir=V] [--lung_model=LUNGS_RUN] [--lung_images=64]

Writes ``R/eval/<split>``; another data dir's split goes to ``R/eval/<split>-<data dir name>``,
a what-if ``--threshold`` (another method than the run's stored one) to
``R/eval/<split>@<method>``. What it writes and how thresholds, calibrations and other sites are
handled: :mod:`pneumo_tf.evaluation.evaluator`.
"""

from __future__ import annotations

import dataclasses

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.evaluation import calibration


@dataclasses.dataclass
class EvaluateFlags(cli.RunSplitFlags):
    """The flags of ``python -m pneumo_tf.evaluate``."""

    threshold: str | None = calibration.threshold_option()
    num_resamples: int = cli.num_resamples_option()
    calibration: str = cli.calibration_option()
    val_data_dir: str | None = option(
        None, "Data dir whose val split is the reference of the shift report when --data_dir is "
        "another site's (and fits a missing calibration.json); default: the run's own data dir "
        "(summary.json config.data_dir, else flags.txt).")
    lung_images: int = option(
        64, "Images of the split whose Grad-CAM is measured against the lungs (metrics.json "
        "lung_evidence: lift, pointing_lungs per TP/FP/FN/TN), drawn (seeded by --seed) evenly "
        "across the groups as gradcam draws them; 0 = skip.", lower=0)
    lung_model: str | None = cli.lung_model_option(cli.EVIDENCE_LUNG_MODEL_HELP)


FLAG_HOLDERS = cli.define_config_flags(EvaluateFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"], FLAG_HOLDERS["data_dir"])
    f = cli.config_from_flags(EvaluateFlags, FLAG_HOLDERS)
    run = rundir.Run(f.run_dir)  # opened once: the libraries read this Run
    if run.task == "lungs":  # a lung segmentation run: Dice and IoU
        from pneumo_tf.evaluation import segmentation

        metrics = segmentation.evaluate_lung_run(run, f.data_dir, f.split, f.batch_size,
                                                 f.num_resamples, f.seed)
        out = run.evaluation_dir(f.data_dir, metrics["split"])
        print(f"{segmentation.summary_line(metrics)} -> {out}")
        return
    from pneumo_tf.evaluation import evaluator  # TensorFlow, matplotlib: once flags are parsed
    from pneumo_tf.explain import anatomy

    metrics = evaluator.evaluate_run(run, f.data_dir, f.split, f.threshold, f.batch_size,
                                     f.num_resamples, f.seed, calibration_name=f.calibration,
                                     val_data_dir=f.val_data_dir,
                                     lungs=anatomy.LungOptions(f.lung_model, f.lung_images))
    print(f"{evaluator.summary_line(metrics)} -> "
          f"{run.paths.eval_dir(metrics['evaluation'])}")


def run() -> None:
    cli.run_app(main, "pneumo_tf.evaluate", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
