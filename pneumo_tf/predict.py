"""Predict PNEUMONIA for image files with a run, a SavedModel, a .keras or a .tflite model.

Usage::

    python -m pneumo_tf.predict --model=PATH [--calibration=NAME] [--format=jsonl|table] \
        [--gradcam_dir=DIR] [--lung_model=LUNGS_RUN] FILE_OR_DIR...

The rows, the refer reasons and the model kinds: :mod:`pneumo_tf.serving.predictor`.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from absl import app

from pneumo_tf.core import cli
from pneumo_tf.core.cli import option
from pneumo_tf.serving import lungs as lung_serving
from pneumo_tf.serving import predictor, refer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PredictFlags:
    """The flags of ``python -m pneumo_tf.predict``."""

    model: str | None = option(
        None, "Model to predict with: a run directory, a SavedModel directory "
        "(R/export/saved_model), a .keras file in a run directory or a .tflite file in R/export/.")
    calibration: str = cli.calibration_option()
    batch_size: int = cli.batch_size_option()
    format: str = option(
        "jsonl", "Output: jsonl = one JSON object per input line (path, probability, "
        "calibrated_probability, threshold, calibration, label, class_name, refer, "
        "refer_reasons, ood_score, in_distribution, lung_fraction, lung_confidence, and "
        "subtype, subtype_probability for a three-class run; or path and error); table = "
        "aligned text.",
        choices=predictor.OUTPUT_FORMATS)
    gradcam_dir: str | None = option(None, "Write one Grad-CAM overlay PNG per input here (run "
                                     "dir or .keras models only).")
    refer_band: float = option(
        refer.DEFAULT_REFER_BAND, "Refer an image to a human when its calibrated probability "
        "is within this distance of the operating threshold. Default: the model's (an exported "
        "model keeps the band it was exported with).", lower=0.0, upper=1.0)
    lung_model: str | None = cli.lung_model_option(
        "Rows add lung_fraction and lung_confidence, and films where it finds no lungs are "
        "referred (no_lungs_found). Default: a --crop=lungs run's own lung model (it crops the "
        "films as the converter did), or the one an exported model carries; none otherwise.")
    min_lung_fraction: float = cli.min_lung_fraction_option()
    min_lung_confidence: float | None = cli.min_lung_confidence_option()


FLAG_HOLDERS = cli.define_config_flags(PredictFlags, module_name=__name__)


def main(argv: list[str]) -> int:
    cli.check_args(argv[:1], FLAG_HOLDERS["model"])  # the positional arguments are the inputs
    inputs = argv[1:]
    if not inputs:
        raise app.UsageError("give at least one image file or folder after the flags")
    f = cli.config_from_flags(PredictFlags, FLAG_HOLDERS)
    # Unless given, an exported model keeps the calibration baked into it (a run dir: val).
    calibration = f.calibration if FLAG_HOLDERS["calibration"].present else None
    # Thresholds not given: the defaults, or the ones an exported model carries.
    lungs = lung_serving.LungOptions(
        f.lung_model, f.min_lung_fraction if FLAG_HOLDERS["min_lung_fraction"].present else None,
        f.min_lung_confidence)
    model = predictor.load_predictor(f.model, calibration, lungs)
    band = f.refer_band if FLAG_HOLDERS["refer_band"].present else None
    results = predictor.predict_paths(model, inputs, f.batch_size, band, f.gradcam_dir)
    failed = 0
    if f.format == "table":
        print(predictor.format_table_header())
    for rec in results:
        failed += "error" in rec
        print(json.dumps(rec) if f.format == "jsonl" else predictor.format_table_row(rec),
              flush=True)
    if failed:
        log.error("%d input(s) could not be predicted (see their 'error')", failed)
        return 1
    return 0


def run() -> None:
    cli.run_app(main, "pneumo_tf.predict", errors=(predictor.PredictError,),
                flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
