"""Export a lungs run (``--task=lungs``) for serving: SavedModel and TFLite, with parity.

``python -m pneumo_tf.export --run_dir=LUNGS_RUN`` writes, like a classifier's export::

    R/export/pneumo_tf_serving.json   task "lungs", image size G, the lung settings
    R/export/saved_model/             signatures below
    R/export/model_fp16.tflite        float16 weights
    R/export/model_int8.tflite        dynamic-range int8 weights
    R/export/parity.json              each variant's lung maps against the Keras model's

SavedModel signatures (N films; G the lung model's input side):

- ``serving_default``: ``images`` ``[N] tf.string`` (JPEG or PNG bytes, any size) -> decoded
  (:func:`pneumo_tf.data.decode.tf_decode_gray`) -> the whole film squashed (area) to G -> U-Net.
- ``preprocessed``: ``image`` ``[N, G, G, 1]`` uint8, films already squashed to G
  (:func:`pneumo_tf.image.preprocess.lung_thumbnail`); ``preprocessed_float`` the same as float32.

Outputs (:func:`pneumo_tf.serving.lungs.tf_lung_outputs`): ``lung_mask`` ``[N, G, G]`` float32
(P(lung) per pixel of the squashed film; above 0.5 is lung), ``lung_fraction`` ``[N]`` float32
(the lung share of the film), ``lung_confidence`` ``[N]`` float32 (mean P(lung) over the lung
pixels) and ``lungs_found`` ``[N]`` bool (:func:`pneumo_tf.serving.lungs.lungs_found` with the
thresholds in ``pneumo_tf_serving.json``). The TFLite models' ``serving_default`` (input
``image``) is the ``preprocessed`` signature.

``parity.json``: per variant the mean and the lowest per-film Dice of its masks against the Keras
model's, the largest difference in probability and in lung share, and the ``lungs_found``
agreement; the float16 model must reach a mean Dice of :data:`FP16_MIN_DICE`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files
from pneumo_tf.data import decode
from pneumo_tf.image import preprocess
from pneumo_tf.modeling import lungs as lungs_lib
from pneumo_tf.serving import export
from pneumo_tf.serving import lungs as lung_serving
from pneumo_tf.serving import runtime as serving

log = logging.getLogger(__name__)

# The float16 TFLite lung model must agree with the Keras model to this mean Dice.
FP16_MIN_DICE = 0.99


def export_lung_saved_model(unet, cfg: serving.ServingConfig, out_dir: str | os.PathLike) -> Path:
    """Write a lung model's SavedModel (the module docstring's signatures) atomically."""
    import tensorflow as tf

    settings = lung_serving.LungSettings.from_json(cfg.lungs)
    g = settings.image_size

    def decode_one(image_bytes):
        return preprocess.tf_resize_area(decode.tf_decode_gray(image_bytes, g, "none"), g)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")],
                 autograph=False)
    def serve_bytes(images):
        thumbs = tf.map_fn(decode_one, images, fn_output_signature=tf.TensorSpec([g, g, 1],
                                                                                 tf.uint8))
        return lung_serving.tf_lung_outputs(unet, thumbs, settings)

    @tf.function(input_signature=[tf.TensorSpec([None, g, g, 1], tf.float32, name="image")],
                 autograph=False)
    def serve_float(image):
        thumbs = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        return lung_serving.tf_lung_outputs(unet, thumbs, settings)

    return export.write_saved_model(
        {"serving_default": serve_bytes,
         "preprocessed": lung_serving.lungs_signature(unet, settings),
         "preprocessed_float": serve_float}, cfg, out_dir)


def export_lung_run(run_dir: str | os.PathLike, formats=export.EXPORT_FORMATS,
                    parity_count: int = 32, seed: int = 0, options=None) -> dict:
    """Export a lungs run: serving config, SavedModel and/or TFLite, then ``parity.json``.

    Args:
        run_dir: a finished ``--task=lungs`` run.
        formats: subset of :data:`pneumo_tf.serving.export.EXPORT_FORMATS`.
        parity_count: films in the parity batch (the val split of the run's data dir, else
            phantoms).
        seed: seed of the phantom parity batch.
        options: :class:`pneumo_tf.serving.lungs.LungOptions` (its thresholds; ``lung_model``
            must be None: the run is the lung model).

    Returns:
        The parity report written to ``R/export/parity.json``.

    Raises:
        rundir.RunDirError: not a finished lungs run.
        export.ExportError: unknown format, ``--lung_model`` given, or the float16 model's Dice
            under :data:`FP16_MIN_DICE`.
    """
    options = options or lung_serving.LungOptions()
    if options.lung_model:
        raise export.ExportError(f"--lung_model: {run_dir} is a lung model itself; export it "
                                 f"without --lung_model")
    formats = export.checked_formats(formats)
    lungs = lungs_lib.LungModel(run_dir)
    settings = lung_serving.settings_for(lungs, None, options.min_lung_fraction,
                                         options.min_lung_confidence)
    cfg = serving.ServingConfig(image_size=lungs.image_size, crop="none", backbone="lung_unet",
                                calibration="none", task=lungs_lib.LUNGS_TASK,
                                lungs=settings.to_json())
    unet = lungs.model  # float32 (rebuilt when the run trained in mixed precision)
    thumbs, source = lung_serving.parity_thumbnails(lungs, parity_count, seed)
    reference = lungs.grid_probabilities(thumbs)
    out = lungs.run.paths.export_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json_atomic(out / serving.SERVING_CONFIG_NAME, cfg.to_json())
    rebuilt = unet is not lungs.run.model
    report = {"batch": {"source": source, "count": int(len(thumbs))}, "task": lungs_lib.LUNGS_TASK,
              "reference": "Keras lung model in float32" + (
                  " (rebuilt from the run's mixed-precision model)" if rebuilt else ""),
              "keras_model_bytes": lungs.run.paths.model.stat().st_size,
              "tolerances": {"fp16_min_dice": FP16_MIN_DICE}, "lungs": settings.to_json(),
              "variants": {}}
    if rebuilt:  # what the run's own precision would have answered
        run_maps = np.asarray(lungs.run.model(thumbs, training=False), np.float32)[..., 0]
        report["variants"]["keras_run_precision"] = lung_serving.lung_diffs(
            {"lung_mask": run_maps}, reference, settings)
    if "saved_model" in formats:
        sm_dir = export_lung_saved_model(unet, cfg, out / export.SAVED_MODEL_DIR)
        got = _saved_model_outputs(sm_dir, thumbs)
        report["variants"]["saved_model"] = {"path": export.SAVED_MODEL_DIR,
                                             "bytes": export.dir_bytes(sm_dir),
                                             **lung_serving.lung_diffs(got, reference, settings)}
    if "tflite" in formats:
        flatbuffers = export.tflite_variants_from_function(
            lung_serving.lungs_signature(unet, settings), list(export.TFLITE_VARIANTS))
        for variant, name in export.TFLITE_VARIANTS.items():
            flatbuffer = flatbuffers[variant]
            target = atomic_files.write_bytes_atomic(out / name, flatbuffer)
            got = lung_serving.TFLiteLungRunner(target).outputs(thumbs)
            report["variants"][variant] = {"path": name, "bytes": len(flatbuffer),
                                           **lung_serving.lung_diffs(got, reference, settings)}
    return _finish(report, out)


def _saved_model_outputs(sm_dir: Path, thumbs: np.ndarray) -> dict:
    import tensorflow as tf

    fn = tf.saved_model.load(str(sm_dir)).signatures["preprocessed"]
    return {k: v.numpy() for k, v in fn(image=tf.constant(thumbs)).items()}


def _finish(report: dict, out: Path) -> dict:
    """Judge the float16 model's Dice; write ``parity.json``.

    Raises:
        export.ExportError: the float16 model misses :data:`FP16_MIN_DICE` (recorded).
    """
    fp16 = report["variants"].get("fp16")
    report["passed"] = fp16 is None or fp16["dice"] >= FP16_MIN_DICE
    atomic_files.write_json_atomic(out / export.PARITY_NAME, report)
    if not report["passed"]:
        raise export.ExportError(
            f"the float16 TFLite lung model's masks agree with the Keras model's to a mean Dice "
            f"of {fp16['dice']:.4f} (< {FP16_MIN_DICE}); see {out / export.PARITY_NAME}. Do not "
            f"ship {export.TFLITE_VARIANTS['fp16']}")
    return report
