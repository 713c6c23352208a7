"""Re-fit a run's temperature and threshold on a labelled sample of a new site.

Usage::

    python -m pneumo_tf.calibrate --run_dir=R --data_dir=SITE --split=test --name=NAME \
        [--threshold=val_youden] [--folds=5]

Writes ``R/calibrations/NAME.json`` (used with ``--calibration=NAME``); how the sample is
scored, cross-validated by patient and checked for size: :mod:`pneumo_tf.evaluation.site_calibration`.
"""

from __future__ import annotations

import dataclasses

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import site_calibration


@dataclasses.dataclass
class CalibrateFlags(cli.RunSplitFlags):
    """The flags of ``python -m pneumo_tf.calibrate``."""

    name: str | None = option(
        None, "Name of the site calibration: writes R/calibrations/NAME.json, used with "
        "--calibration=NAME by evaluate, gradcam, export and predict.")
    threshold: str | None = calibration.threshold_option()
    folds: int = option(site_calibration.DEFAULT_FOLDS, "Patient-grouped cross-validation folds "
                        "(fewer when a class has fewer patients).", lower=2)
    num_resamples: int = cli.num_resamples_option()


FLAG_HOLDERS = cli.define_config_flags(CalibrateFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    holders = FLAG_HOLDERS
    cli.check_args(argv, holders["run_dir"], holders["data_dir"], holders["name"])
    f = cli.config_from_flags(CalibrateFlags, holders)
    run = rundir.Run(f.run_dir)  # opened once: the library reads this Run
    result = site_calibration.calibrate_site(run, f.data_dir, f.name, f.split, f.threshold,
                                             f.folds, f.batch_size, f.num_resamples, f.seed)
    cv = result["cross_validation"]
    pooled, ci = cv["pooled"], cv["ci95"]
    figures = "  ".join(f"{key} {pooled[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]"
                        for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece"))
    print(f"{result['name']}: n={result['n']} T={result['temperature']:.3f} threshold="
          f"{result['threshold']:.4f} ({result['threshold_method']}); {cv['folds']}-fold by "
          f"patient: {figures} -> {run.paths.calibration_file(f.name)}")


def run() -> None:
    cli.run_app(main, "pneumo_tf.calibrate", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
