"""Export a run for serving: SavedModel and TFLite, with a parity report.

Usage::

    python -m pneumo_tf.export --run_dir=R [--formats=saved_model,tflite] [--calibration=NAME]

What is exported and checked: :mod:`pneumo_tf.serving.export`.
"""

from __future__ import annotations

import dataclasses
import json

from pneumo_tf.core import cli
from pneumo_tf.core.cli import option
from pneumo_tf.serving import export

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


FLAG_HOLDERS = cli.define_config_flags(ExportFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"])
    f = cli.config_from_flags(ExportFlags, FLAG_HOLDERS)
    report = export.export_run(f.run_dir, list(f.formats), f.data_dir, f.parity_count, f.seed,
                               f.calibration)
    print(json.dumps(report, indent=2, sort_keys=True))


def run() -> None:
    cli.run_app(main, "pneumo_tf.export", errors=(export.ExportError,), flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
