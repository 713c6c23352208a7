"""Grad-CAM: explain a split's images and quantify where the model looks.

Usage::

    python -m pneumo_tf.gradcam --run_dir=R --data_dir=D --split=test --num_images=64 \
        [--calibration=val|NAME] [--lung_model=LUNGS_RUN]

It leads with the evidence measured on anatomy (lift of the CAM mass inside the lungs over a flat
map, pointing_lungs; :mod:`pneumo_tf.explain.anatomy` says where the lungs come from).

Writes ``R/gradcam/`` for the run's own data, ``R/gradcam/<split>-<data dir name>/`` for another
data dir (as ``evaluate`` names ``R/eval/``). Outputs and groups: :mod:`pneumo_tf.explain.grids`;
the maths: :mod:`pneumo_tf.explain.cam`.
"""

from __future__ import annotations

import dataclasses

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.explain import anatomy, cam, grids


@dataclasses.dataclass
class GradcamFlags(cli.RunSplitFlags):
    """The flags of ``python -m pneumo_tf.gradcam``."""

    calibration: str = cli.calibration_option()
    num_images: int = option(64, "Images to explain, drawn (seeded) evenly across TP/FP/FN/TN.",
                             lower=1)
    layer: str | None = option(
        None, "Feature-map layer inside the backbone; default: the backbone's registered "
        "Grad-CAM layer (resnet50: conv5_block3_out; small_cnn: b1_out, or features with a "
        "--lung_gate: the most lung-bound ones measured), else its last 4-D output.")
    cam_class: str = option(
        "pneumonia", "Explain the PNEUMONIA score for every image (a three-class model's "
        "pneumonia log-odds), the predicted class (the NORMAL logit, i.e. minus the PNEUMONIA "
        "logit, for images predicted NORMAL), or for a three-class model (--task=subtype) "
        "bacterial | viral: that class's log-odds against the other two, for every image.",
        choices=cam.CAM_CLASSES)
    lung_model: str | None = cli.lung_model_option(cli.EVIDENCE_LUNG_MODEL_HELP)


FLAG_HOLDERS = cli.define_config_flags(GradcamFlags, module_name=__name__)


def summary_line(stats: dict) -> str:
    """The printed result: the lung evidence first, then the region share and, on phantoms, the
    lesion pointing game."""
    overall = stats["groups"]["all"]
    shares = ", ".join(f"{key.replace('_', ' ')} {overall[key + '_mean']:.2f}"
                       for key in cam.SHARE_KEYS.values()
                       if overall.get(key + "_mean") is not None)
    line = (f"{stats['num_images']} images, layer {stats['layer']}: "
            f"{anatomy.summary_text(stats['lung_evidence'])}; {shares or 'no region share'}")
    if "pointing_hit_rate" in overall:
        line += (f", lesion pointing game {overall['pointing_hit_rate']:.3f} "
                 f"(chance {overall['pointing_chance']:.3f}; {overall['pointing_empty']} of "
                 f"{overall['pointing_n']} maps empty, counted as misses)")
    return line


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"], FLAG_HOLDERS["data_dir"])
    f = cli.config_from_flags(GradcamFlags, FLAG_HOLDERS)
    run = rundir.Run(f.run_dir)  # opened once: the library reads this Run
    stats = grids.run_gradcam(run, f.data_dir, f.split, f.num_images, f.layer,
                              f.batch_size, f.seed, f.cam_class, calibration_name=f.calibration,
                              lungs=anatomy.LungOptions(lung_model=f.lung_model))
    out = rundir.gradcam_dir(run, f.data_dir, f.split, f.calibration)
    print(summary_line(stats) + f" -> {out}")


def run() -> None:
    cli.run_app(main, "pneumo_tf.gradcam", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
