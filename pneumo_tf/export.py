"""Export a run for serving: SavedModel and TFLite, with a parity report.

Usage::

    python -m pneumo_tf.export --run_dir=R [--formats=saved_model,tflite] [--calibration=NAME] \
        [--lung_model=LUNGS_RUN] [--min_lung_fraction=0.1] [--min_lung_confidence=C] \
        [--refer_band=0.1]

Prints one line per exported model (size, agreement with the Keras model on the parity batch);
the full report is ``parity.json`` in the export folder. What is exported and checked:
:mod:`pneumo_tf.serving.export` for a classifier (with a lung model: the lung crop and
``lung_fraction`` in the graph), :mod:`pneumo_tf.serving.lung_export` for a lungs run
(``--task=lungs``, whose report is printed as JSON).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pneumo_tf.core import cli, rundir
from pneumo_tf.core.cli import option
from pneumo_tf.serving import export, lung_export
from pneumo_tf.serving import lungs as lung_serving
from pneumo_tf.serving import refer

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
    refer_band: float = option(
        refer.DEFAULT_REFER_BAND, "The SavedModel's serving_default refers an image "
        "(refer_reasons: uncertain) when its calibrated probability is within this distance of "
        "the operating threshold; written to pneumo_tf_serving.json, predict's default for the "
        "exported model.", lower=0.0, upper=1.0)


FLAG_HOLDERS = cli.define_config_flags(ExportFlags, module_name=__name__)


def _variant_line(name: str, variant: dict) -> str:
    where = variant.get("path", "the run's own precision")
    size = f"{variant['bytes'] / 1e6:.1f} MB" if "bytes" in variant else ""
    diff = variant.get("max_abs_prob_diff")
    agree = variant.get("label_agreement")
    line = (f"  {name:<20} {where:<24} {size:>8}  max |p - Keras| "
            + (f"{diff:.1e}" if diff is not None else
               f"n/a ({variant.get('non_finite')} non-finite)")
            + (f", labels agree {agree:.3f}" if agree is not None else ""))
    for key, what in (("in_distribution_agreement", "in_distribution"),
                      ("subtype_agreement", "subtype")):
        if variant.get(key) is not None:
            line += f", {what} agrees {variant[key]:.3f}"
    return line


def summary_lines(report: dict, out: str | Path) -> list[str]:
    """The printed result: where the export went, one line per model compared with the Keras
    reference, the parity batch and the verdict; ``parity.json`` holds the rest."""
    lines = [f"exported with calibration {report['calibration']} -> {out}"]
    lines += [_variant_line(name, v) for name, v in report["variants"].items()]
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(f"parity batch: {report['batch']['source']}; {verdict}; full report: "
                 f"{Path(out) / rundir.PARITY_NAME}")
    return lines


def lung_summary_lines(report: dict, out: str | Path) -> list[str]:
    """A lungs run's printed result: where it went, one line per model (mean and lowest Dice of
    its masks against the Keras model's), the parity batch and the verdict."""
    lines = [f"exported the lung model -> {out}"]
    for name, v in report["variants"].items():
        lines.append(f"  {name:<20} " + (f"{v['bytes'] / 1e6:.1f} MB, " if "bytes" in v else "")
                     + f"Dice vs Keras {v['dice']:.4f} (lowest {v['min_dice']:.4f})")
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(f"parity batch: {report['batch']['source']}; {verdict}; full report: "
                 f"{Path(out) / rundir.PARITY_NAME}")
    return lines


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["run_dir"])
    f = cli.config_from_flags(ExportFlags, FLAG_HOLDERS)
    lungs = lung_serving.LungOptions(f.lung_model, f.min_lung_fraction, f.min_lung_confidence)
    run = rundir.Run(f.run_dir)  # opened once: the libraries read this Run
    if run.task == "lungs":  # a lung segmentation run: its own export
        if f.calibration != rundir.VAL_CALIBRATION:
            raise export.ExportError(f"--calibration={f.calibration}: a lungs run has no "
                                     f"calibrations; drop the flag")
        report = lung_export.export_lung_run(run, list(f.formats), f.parity_count, f.seed,
                                             lungs)
        print("\n".join(lung_summary_lines(report, run.paths.export_dir())))
        return
    report = export.export_run(run, list(f.formats), f.data_dir, f.parity_count, f.seed,
                               f.calibration, lungs, f.refer_band)
    lines = summary_lines(report, run.paths.export_dir(f.calibration))
    if report.get("lungs"):
        lines.insert(1, f"  lung model: {report['lungs']['model'].get('path', f.lung_model)}")
    print("\n".join(lines))


def run() -> None:
    cli.run_app(main, "pneumo_tf.export", errors=(export.ExportError,), flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
