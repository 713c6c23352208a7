"""Fit a run's out-of-distribution guard: ``R/ood.json`` and ``R/ood_stats.npz``.

Usage::

    python -m pneumo_tf.ood --run_dir=R [--data_dir=D] [--ood_val_rate=0.01]

Training fits the guard too; the score, the threshold and the image checks:
:mod:`pneumo_tf.serving.ood`. For a lungs run (``--task=lungs``) it fits the no-lungs guard
instead, ``R/lung_guard.json`` (:func:`pneumo_tf.serving.lungs.fit_guard`).
"""

from __future__ import annotations

import dataclasses

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.serving import lungs, ood


@dataclasses.dataclass
class OodFlags:
    """The flags of ``python -m pneumo_tf.ood``."""

    run_dir: str | None = cli.run_dir_option()
    data_dir: str | None = cli.data_dir_option()
    batch_size: int = cli.batch_size_option()
    ood_val_rate: float = option(
        ood.DEFAULT_VAL_RATE, "Fraction of the (in-distribution) val images the "
        "out-of-distribution threshold flags.", lower=0.0, upper=0.5)
    ood_layer: str = option(
        ood.DEFAULT_LAYER, "Feature layer of the model the score reads (dense: the head's hidden "
        "layer; gap: the pooled backbone features; auto: gap when at most "
        f"{ood.AUTO_MAX_GAP_WIDTH} wide, else dense).")


FLAG_HOLDERS = cli.define_config_flags(OodFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"])
    f = cli.config_from_flags(OodFlags, FLAG_HOLDERS)
    run = rundir.Run(f.run_dir)  # opened once: the libraries read this Run
    if run.task == "lungs":
        guard = lungs.fit_guard(run, f.data_dir, f.ood_val_rate, f.batch_size)
        print(f"lung guard: min_lung_confidence {guard['min_lung_confidence']:.4f} flags "
              f"{guard['val_flagged']:.3f} of {guard['fitted_on']['val']} val films -> "
              f"{run.paths.lung_guard}")
        return
    info = ood.fit_run(run, f.data_dir, f.ood_val_rate, f.ood_layer,
                       batch_size=f.batch_size)
    print(f"ood: threshold {info['threshold']:.1f} ({info['layer']}, {info['feature_dim']} "
          f"features) flags {info['val_flagged']:.3f} of val; upside-down probe flags "
          f"{info['upright']['val_flagged']:.3f} of val and "
          f"{info['upright']['val_upside_down_caught']:.3f} of val flipped -> "
          f"{run.paths.ood_json}")


def run() -> None:
    cli.run_app(main, "pneumo_tf.ood", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
