"""Export a run for serving: SavedModel and TFLite, with a parity report.

Usage::

    python -m pneumo_tf.export --run_dir=R [--formats=saved_model,tflite] [--calibration=NAME] \
        [--lung_model=LUNGS_RUN] [--min_lung_fraction=0.1] [--min_lung_confidence=C]

What is exported and checked: :mod:`pneumo_tf.serving.export` for a classifier (with a lung
model: the lung crop and ``lung_fraction`` in the graph), :mod:`pneumo_tf.serving.lung_export`
for a lungs run (``--task=lungs``).
"""

from __future__ import annotations

import dataclasses
import json

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.serving import export, lung_export
from pneumo_tf.serving import lungs as lung_serving

_FORMATS = ", ".join(export.EXPORT_FORMATS)


@dataclasses.dataclass
class ExportFlags:
    """The flags of ``python -m pneumo_tf.export``."""

    run_dir: str | None = cli.run_dir_option()
    data_dir: str | None = cli.data_dir_option()
    seed: int = cli.seed_option()
    calibration: str = cli.calibration_option()
    formats: tuple[str, ...] = option(
        export.EXPORT_FORMATS, f"Comma-separated export formats: {_FORMATS}. saved_model -> "
        "R/export/saved_model (TF Serving, takes JPEG/PNG bytes); tflite -> "
        "R/export/model_fp16.tflite and model_int8.tflite, parity in R/export/parity.json.")
    parity_count: int = option(32, "Validation images in the parity batch (first images of the "
                               "val split).", lower=1)
    lung_model: str | None = cli.lung_model_option(
        "Serve a classifier with it: every signature adds lung_fraction, lung_confidence and "
        "lungs_found, and a --crop=lungs run's SavedModel crops to the lungs in the graph. "
        "Default: the lung model a --crop=lungs run's data was cropped with; none otherwise.")
    min_lung_fraction: float = cli.min_lung_fraction_option()
    min_lung_confidence: float | None = cli.min_lung_confidence_option()


FLAG_HOLDERS = cli.define_config_flags(ExportFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"])
    f = cli.config_from_flags(ExportFlags, FLAG_HOLDERS)
    lungs = lung_serving.LungOptions(f.lung_model, f.min_lung_fraction, f.min_lung_confidence)
    if rundir.Run(f.run_dir).task == "lungs":  # a lung segmentation run: its own export
        if f.calibration != rundir.VAL_CALIBRATION:
            raise export.ExportError(f"--calibration={f.calibration}: a lungs run has no "
                                     f"calibrations; drop the flag")
        report = lung_export.export_lung_run(f.run_dir, list(f.formats), f.parity_count, f.seed,
                                             lungs)
    else:
        report = export.export_run(f.run_dir, list(f.formats), f.data_dir, f.parity_count,
                                   f.seed, f.calibration, lungs)
    print(json.dumps(report, indent=2, sort_keys=True))


def run() -> None:
    cli.run_app(main, "pneumo_tf.export", errors=(export.ExportError,), flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
