"""Export a trained run for serving (SavedModel) and phones (TFLite), with parity checks.

``python -m pneumo_tf.export --run_dir=R --formats=saved_model,tflite [--data_dir=D]
[--calibration=val|NAME]`` writes::

    R/export/pneumo_tf_serving.json   image size, crop, temperature, thresholds (read by predict;
                                      pneumo_tf.serving.runtime.ServingConfig)
    R/export/saved_model/             TF Serving artefact; signatures below
    R/export/model_fp16.tflite        float16 weights
    R/export/model_int8.tflite        dynamic-range int8 weights (activations stay float)
    R/export/parity.json              max |p_variant - p_keras| per variant on a validation batch,
                                      file sizes in bytes

``--calibration=NAME`` bakes the site calibration ``R/calibrations/NAME.json`` (temperature and
threshold, from ``pneumo_tf.calibrate``) into the models instead of ``calibration.json``, and
writes them to ``R/export_NAME/`` (same layout), so the val export in ``R/export/`` stays as it
is. ``pneumo_tf_serving.json`` names the calibration (``calibration``) and ``predict`` shows it.
Ensembles (:mod:`pneumo_tf.ensemble`) export like any run: one SavedModel averaging the members.

SavedModel signatures (all outputs ``[N]``):

- ``serving_default``: ``images`` ``[N] tf.string``, each a JPEG or PNG file's bytes (any size,
  gray, RGB or RGBA, 8 or 16 bit) -> decode -> grayscale -> the run's crop -> area resize
  -> model. Normalisation is a layer of the model (:class:`pneumo_tf.modeling.model.PixelNorm`).
- ``preprocessed``: ``image`` ``[N, S, S, 1] uint8``, already cropped and resized exactly as the
  converter stores images (:func:`pneumo_tf.image.preprocess.preprocess_gray`).
- ``preprocessed_float``: the same as ``float32`` in 0..255 (rounded and clipped to uint8).

Outputs (:func:`pneumo_tf.serving.runtime.saved_model_outputs`): ``probability`` (the model's sigmoid,
float32), ``calibrated_probability`` (``sigmoid(logit(p) / T)`` with the validation temperature
T, float32), ``threshold`` (the run's operating threshold on the calibrated scale, float32, the
same for every image) and ``label`` (int64, 1 = PNEUMONIA): ``calibrated_probability >=
threshold`` on exactly the float32 values returned (:func:`pneumo_tf.evaluation.metrics.decide_label`), so
a client comparing them always finds the label. Temperature scaling is monotone: this is the
decision ``calibration.json``'s ``threshold`` makes on the raw probability, except for
probabilities within float32 rounding of the threshold.

A run with an OOD guard (``R/ood.json``, :mod:`pneumo_tf.ood`) adds ``ood_score`` (float32, the
Mahalanobis score of the guard's feature layer, computed in the graph from the fitted
constants) and ``in_distribution`` (bool): ``ood_score <= ood.json's threshold``, not upside
down by the guard's probe on the model input and, in ``serving_default`` only, not inverted or
on its side (checked in the graph on the decoded full film, before the crop; the
``preprocessed`` signatures never see the full film). Where ``in_distribution`` is false the
image gets no diagnosis: ``label`` is -1 (predict's ``label: null``; the probabilities stay). A
run without ``ood.json`` exports without these two outputs (a warning says how to fit the
guard), and its labels are 0 or 1.
A three-class run (``--task=subtype``) adds ``class_probabilities`` (``[N, 3]`` float32, the
model's softmax over NORMAL, BACTERIAL, VIRAL), ``subtype`` (int64: 0 where ``label`` is not 1,
else 1 BACTERIAL or 2 VIRAL, the larger of the two pneumonia probabilities) and
``subtype_probability`` (float32, that larger one given pneumonia, ``sigmoid(|z_b - z_v| / T_s)``
with ``calibration.json``'s subtype temperature ``T_s``; defined for every image).

``serving_default`` refers as ``predict`` does, for the same bytes (:mod:`pneumo_tf.serving.refer`;
tests/serving/test_refer.py): ``refer`` (bool), ``refer_reasons`` (string: the reasons' names
joined by commas in :data:`pneumo_tf.serving.refer.REFER_REASONS` order, predict's
``refer_reasons``; empty where none) and ``refer_reason_flags`` (``[N, K]`` bool, a column per
reason in that order; ``pneumo_tf_serving.json`` lists them as ``refer_reason_names``). The
reasons: ``uncertain`` (the calibrated probability within ``--refer_band`` of the threshold,
0.1 by default, baked in and written to ``pneumo_tf_serving.json`` as ``refer_band``; only for
images in distribution), the film checks ``aspect_ratio``, ``blank``, ``underexposed``,
``overexposed`` and ``low_resolution`` (on the decoded film, its full-resolution size and the
crop), ``inverted``, ``on_its_side``, ``upside_down`` (only where the feature score accepts the
image), ``not_a_chest_film`` and, with a lung model baked in, ``no_lungs_found``.

With a lung model (``--lung_model=LUNGS_RUN``; a run trained on ``--crop=lungs`` data takes the
one its data was cropped with, named in its data manifest) the SavedModel carries the U-Net too
(:mod:`pneumo_tf.serving.lungs`): every signature adds ``lung_fraction`` (float32, the lung share),
``lung_confidence`` (float32, the mean P(lung) over those pixels) and ``lungs_found`` (bool,
:func:`pneumo_tf.serving.lungs.lungs_found` with the thresholds in ``pneumo_tf_serving.json``'s
``lungs``). ``serving_default`` runs the U-Net on each decoded film squashed to its input, and a
``--crop=lungs`` run crops to the box of its lungs plus the data's margin (the fixed box where too
few were found), as the converter did: decode -> U-Net -> box -> crop -> resize -> classifier.
The ``preprocessed`` signatures see only the cropped image: their lung outputs are those of the
model input. A fourth signature, ``lungs`` (``image`` ``[N, G, G, 1]`` uint8, a whole film
squashed to the lung model's input G), gives ``lung_mask`` ``[N, G, G]`` and the three above:
predict calls it on the host-decoded film. TFLite classifiers carry no U-Net; with
``--formats=tflite`` the lung model's own float16 TFLite model is written beside them
(``lung_model_fp16.tflite``) and predict runs it. ``parity.json``'s ``lungs`` compares the
``lungs`` signature and that TFLite model with the Keras lung model (Dice of the masks, largest
probability and lung-share differences).

The TFLite models' signature ``serving_default`` (input ``image``, ``[N, S, S, 1] uint8``) gives
the ``preprocessed`` signature's outputs, all of them (:class:`pneumo_tf.serving.runtime.TFLiteRunner`);
the guard costs them its constants (a 128-wide ``dense`` layer: about 36 KB in the float16
model, 69 KB in the int8 one, where the whitening matrix stays float32; see BUILD.md).
``parity.json`` also compares ``ood_score`` (relative), ``in_distribution``, the class
probabilities and the subtype of every variant with the Keras model's.

In-graph decoding vs the converter (training/serving skew, measured by ``tests/test_export.py``):
the converter decodes with OpenCV/Pillow (:mod:`pneumo_tf.data.decode`), the graph with
TensorFlow's libjpeg/libpng. Large JPEGs are decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT
scaling in both, with the same rule (:func:`pneumo_tf.data.decode.jpeg_reduction_factor`). For
8-bit JPEG and PNG the decoded pixels are identical; after the area resize (TF float vs OpenCV
fixed point) they differ by at most 1 grey level (mean <= 0.02), 16-bit PNGs by 1 more.
A JPEG's EXIF orientation is applied in the graph too (:func:`pneumo_tf.data.decode.
tf_jpeg_exif_orientation`). Known differences: a PNG's EXIF orientation is not applied in the
graph; animated GIFs use their first frame; when one side is upsampled and the other
downsampled (a crop smaller than S on one side only), OpenCV's and TF's "area" resizes differ by
up to ~40 grey levels (``predict`` and ``serving_default`` refer crops under S/2 as
``low_resolution``). Where the pixels differ (those cases, or a grey level after the resize) an
image whose probability, OOD score or probe value lies that close to a limit can get another
label or reason in predict than in ``serving_default``.
``--crop=adaptive`` runs have no in-graph crop and cannot be exported as a bytes SavedModel (use
TFLite or ``pneumo_tf.predict``, which crop on the host). The lung crop in the graph finds the same
boxes as the converter on 8-bit JPEG and PNG films (the U-Net's input differs by at most a grey
level after TF's and OpenCV's area resizes; tests/serving/test_export.py). A lungs run itself
exports through :mod:`pneumo_tf.serving.lung_export`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration as calibration_lib
from pneumo_tf.modeling.precision import float32_model, is_mixed_precision  # noqa: F401
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.image import preprocess
from pneumo_tf.core import quiet_tf, rundir
from pneumo_tf.serving import refer
from pneumo_tf.serving import runtime as serving
from pneumo_tf.data import decode, records

log = logging.getLogger(__name__)

SAVED_MODEL_DIR = "saved_model"
PARITY_NAME = rundir.PARITY_NAME
EXPORT_FORMATS = ("saved_model", "tflite")
TFLITE_VARIANTS = {"fp16": "model_fp16.tflite", "int8": "model_int8.tflite"}
# Issue 6: the float16 TFLite model must agree with the Keras model to 0.01 in probability.
FP16_MAX_ABS_DIFF = 0.01


class ExportError(RuntimeError):
    """Export cannot proceed or a parity check failed; the message names the file and fix."""


def calibration_for_export(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                           calibration_name: str = rundir.VAL_CALIBRATION) -> dict:
    """The calibration to bake in: ``R/calibration.json`` (computed from the run's validation
    split when missing) or the site calibration ``R/calibrations/<calibration_name>.json``.

    Args:
        run_dir: the run directory.
        data_dir: converter output to calibrate on when the run has no calibration yet.
        calibration_name: ``val`` or a site calibration's name.

    Raises:
        ExportError: no calibration and no ``data_dir`` (the message says what to pass).
        rundir.RunDirError: a site calibration the run does not have.
    """
    path = rundir.RunPaths(run_dir).calibration_file(calibration_name)
    if calibration_name != rundir.VAL_CALIBRATION:
        return serving.calibration_from_json(
            rundir.read_named_calibration(run_dir, calibration_name), str(path))
    calibration = rundir.read_calibration(run_dir)
    if calibration is None:
        if data_dir is None:
            raise ExportError(
                f"{path} is missing: the run has no temperature and operating threshold yet. "
                f"Pass --data_dir=<the run's converter output> to fit them on its validation "
                f"split, or run `python -m pneumo_tf.evaluate --run_dir={run_dir} "
                f"--data_dir=... --split=val` first")
        log.info("%s missing: calibrating on the val split of %s", path, data_dir)
        calibration = calibration_lib.calibrate_run(run_dir, data_dir)
    return serving.calibration_from_json(calibration, str(path))


# ---------------------------------------------------------------------------------------------
# Model preparation


# is_mixed_precision and float32_model live in pneumo_tf.modeling.precision (the lung model
# runs in float32 everywhere through them too); imported above, and still named here.


def keras_probabilities(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``[N] float64`` probabilities of a Keras model for ``[N, S, S, 1] uint8`` images."""
    from pneumo_tf.evaluation import scoring

    predict = scoring.make_predict_fn(model)
    out = [predict(images[i:i + batch_size]).numpy().astype(np.float64)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float64)


# ---------------------------------------------------------------------------------------------
# SavedModel


def check_in_graph_crop(cfg: serving.ServingConfig) -> None:
    """Refuse a bytes-taking SavedModel for runs whose crop has no in-graph twin (``adaptive``,
    or ``lungs`` without its lung model)."""
    if cfg.crop == "lungs" and cfg.lungs is None:
        raise ExportError("the run was converted with --crop=lungs: its SavedModel needs the lung "
                          "model in the graph; pass --lung_model=<the lungs run its data was "
                          "cropped with>")
    if cfg.crop not in ("fixed", "none", "lungs"):
        raise ExportError(
            f"the run was converted with --crop={cfg.crop}, which has no in-graph twin: a "
            f"SavedModel taking image bytes would crop differently from training. Export "
            f"--formats=tflite instead, or predict with `python -m pneumo_tf.predict "
            f"--model=<run dir>` (it crops on the host like the converter)")


def save_signatures(endpoints: dict, path: str | os.PathLike) -> None:
    """``tf.saved_model.save`` of ``endpoints`` (``{signature name: tf.function with an input
    signature}``) as the SavedModel's signatures, with the variables they read, and nothing else.

    Each endpoint's concrete function is saved as it was traced, never traced again; readers call
    ``loaded.signatures[name]`` (BUILD.md, "Behaviours worth knowing": why not
    ``keras.export.ExportArchive``).
    """
    import tensorflow as tf

    signatures = {name: fn.get_concrete_function() for name, fn in endpoints.items()}
    root = tf.__internal__.tracking.AutoTrackable()
    # The captured tf.Variables themselves, not the Keras variables around them: the TFLite
    # converter freezes only variables the SavedModel lists (else its models output NaN).
    root.variables = list({id(v): v for fn in signatures.values() for v in fn.variables}.values())
    tf.saved_model.save(root, str(path), signatures=signatures)


def write_saved_model(endpoints: dict, cfg: serving.ServingConfig,
                      out_dir: str | os.PathLike) -> Path:
    """Write a SavedModel of ``endpoints`` (``{signature name: tf.function}``, see
    :func:`save_signatures`) atomically, with ``cfg`` in ``assets.extra/``."""
    out_dir = Path(out_dir)
    with atomic_files.atomic_output(out_dir) as tmp:
        save_signatures(endpoints, tmp)
        # assets.extra/ is TF Serving's place for files beside the graph that loaders ignore.
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        atomic_files.write_json_atomic(extra / serving.SERVING_CONFIG_NAME, cfg.to_json())
    return out_dir


def export_saved_model(model, cfg: serving.ServingConfig, out_dir: str | os.PathLike,
                       ood_stats=None, unet=None) -> Path:
    """Write the SavedModel (signatures in the module docstring) to ``out_dir`` atomically.

    Args:
        model: the float32 Keras model.
        cfg: the serving facts baked in.
        out_dir: the SavedModel directory.
        ood_stats: the run's :class:`pneumo_tf.ood.OodStats` (adds ``ood_score`` and
            ``in_distribution``), or None.
        unet: the float32 lung model of ``cfg.lungs`` (adds the lung outputs, the ``lungs``
            signature and, for a ``--crop=lungs`` run, the lung crop), or None.

    Raises:
        ExportError: the run's crop has no in-graph implementation (``adaptive``).
    """
    import tensorflow as tf

    from pneumo_tf.evaluation import scoring
    from pneumo_tf.serving import lungs as lung_serving

    check_in_graph_crop(cfg)
    s = cfg.image_size
    core = scoring.outputs_model(model, ood_stats.layer if ood_stats is not None else None)
    settings = lung_serving.LungSettings.from_json(cfg.lungs) if unet is not None else None
    decode_one, specs = _bytes_decoder(cfg, unet, settings)
    # The classifier's signatures call this one function: the classifier is traced once, not
    # once per signature.
    forward = tf.function(lambda image: core(image, training=False),
                          input_signature=[tf.TensorSpec([None, s, s, 1], tf.uint8)],
                          autograph=False)

    def traced_core(image, training=False):  # called as a Keras model; inference only
        return forward(image)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")],
                 autograph=False)
    def serve_bytes(images):
        decoded = tf.map_fn(decode_one, images, fn_output_signature=specs)
        checks, lungs = dict(decoded[1]), {}
        if settings is not None:
            lungs = lung_serving.tf_lung_summary(decoded[2], settings)
            checks[refer.NO_LUNGS_FOUND] = tf.logical_not(lungs["lungs_found"])
        return {**serving.saved_model_outputs(traced_core, decoded[0], cfg, ood_stats, checks),
                **lungs}

    def preprocessed_outputs(image):
        out = serving.saved_model_outputs(traced_core, image, cfg, ood_stats)
        if settings is not None:
            out.update(lung_serving.tf_input_lungs(unet, image, settings))
        return out

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 1], tf.uint8, name="image")],
                 autograph=False)
    def serve_preprocessed(image):
        return preprocessed_outputs(image)

    @tf.function(input_signature=[tf.TensorSpec([None, s, s, 1], tf.float32, name="image")],
                 autograph=False)
    def serve_preprocessed_float(image):
        return preprocessed_outputs(tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0),
                                            tf.uint8))

    endpoints = {"serving_default": serve_bytes, "preprocessed": serve_preprocessed,
                 "preprocessed_float": serve_preprocessed_float}
    if settings is not None:
        endpoints["lungs"] = lung_serving.lungs_signature(unet, settings)
    return write_saved_model(endpoints, cfg, out_dir)


def _bytes_decoder(cfg: serving.ServingConfig, unet, settings):
    """The bytes signature's per-file function and its output specs: image bytes -> ``([S, S, 1]
    uint8 model input, {name: bool} film checks[, [G, G] lung map])``; with a lung model the
    film's map comes from it, and a ``--crop=lungs`` run crops to its box (the converter's crop).
    The checks are predict's (:func:`pneumo_tf.serving.predictor.read_inputs`): the film checks
    of :mod:`pneumo_tf.serving.refer` and the orientation checks of the decoded full film."""
    import tensorflow as tf

    from pneumo_tf.serving import lungs as lung_serving
    from pneumo_tf.serving import ood

    s = cfg.image_size
    names = refer.FILM_REASONS + (refer.INVERTED, refer.ON_ITS_SIDE)
    specs = (tf.TensorSpec([s, s, 1], tf.uint8),
             {name: tf.TensorSpec([], tf.bool) for name in names})

    def decode_one(image_bytes):
        film = decode.tf_decode_film(image_bytes, s, cfg.crop)
        gray = film["gray"]
        lung = lung_serving.tf_film_lungs(unet, gray, settings) if settings is not None else {}
        crop = (cfg.crop, lung.get("box"), lung.get("found"))
        image = preprocess.tf_preprocess_gray(gray, s, *crop)
        top, bottom, left, right = preprocess.tf_crop_box(gray, *crop)
        checks = refer.film_flags(refer.tf_film_statistics(
            gray, (film["height"], film["width"]),
            ((bottom - top) * film["scale"], (right - left) * film["scale"])), s)
        checks[refer.INVERTED], checks[refer.ON_ITS_SIDE] = ood.tf_film_orientation_flags(gray)
        if settings is None:
            return image, checks
        return image, checks, lung["lung_mask"]

    if settings is not None:
        g = settings.image_size
        specs = specs + (tf.TensorSpec([g, g], tf.float32),)
    return decode_one, specs


def saved_model_batch_outputs(saved_model_dir: str | os.PathLike, images: np.ndarray,
                              batch_size: int = 64) -> dict[str, np.ndarray]:
    """Every output of the ``preprocessed`` signature of a SavedModel, as numpy arrays."""
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved_model_dir)).signatures["preprocessed"]
    parts: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        for key, value in fn(image=tf.constant(images[i:i + batch_size])).items():
            parts.setdefault(key, []).append(value.numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def saved_model_probabilities(saved_model_dir: str | os.PathLike, images: np.ndarray,
                              batch_size: int = 64) -> np.ndarray:
    """``[N] float64`` probabilities from the ``preprocessed`` signature of a SavedModel."""
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    out = saved_model_batch_outputs(saved_model_dir, images, batch_size)
    return out["probability"].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# TFLite


def convert_tflite(model, variant: str, cfg: serving.ServingConfig | None = None,
                   ood_stats=None) -> bytes:
    """A float32 Keras model -> TFLite flatbuffer bytes.

    Args:
        model: the float32 Keras model.
        variant: ``fp16`` (float16 weights, float compute) or ``int8`` (dynamic-range
            quantisation: int8 weights, activations quantised on the fly, no calibration data).
        cfg: with it, the flatbuffer's signature ``serving_default`` (input ``image``) gives
            every output of the SavedModel's ``preprocessed`` signature
            (:func:`pneumo_tf.serving.runtime.saved_model_outputs`, with ``ood_stats`` baked in);
            without, the model's probability alone.
        ood_stats: the run's :class:`pneumo_tf.ood.OodStats`, or None.
    """
    return convert_tflite_variants(model, [variant], cfg, ood_stats)[variant]


def convert_tflite_variants(model, variants, cfg: serving.ServingConfig | None = None,
                            ood_stats=None) -> dict[str, bytes]:
    """:func:`convert_tflite` for each of ``variants`` (``{variant: flatbuffer bytes}``); with
    ``cfg``, the serving function is traced and written once for all of them."""
    import tensorflow as tf

    from pneumo_tf.evaluation import scoring

    _check_tflite_variants(variants)
    if is_mixed_precision(model):
        raise ExportError("TFLite cannot convert a mixed-precision graph; pass float32_model(model)")
    if cfg is not None:
        core = scoring.outputs_model(model, ood_stats.layer if ood_stats is not None else None)
        s = cfg.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, s, s, 1], tf.uint8, name="image")],
                     autograph=False)
        def serve(image):
            return serving.saved_model_outputs(core, image, cfg, ood_stats)

        return tflite_variants_from_function(serve, variants)
    flatbuffers = {}
    for variant in variants:
        # The converter prints every captured variable.
        with contextlib.redirect_stdout(io.StringIO()), quiet_tf.stderr_filtered():
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            _set_tflite_variant(converter, variant)
            flatbuffers[variant] = converter.convert()
    return flatbuffers


def _check_tflite_variants(variants) -> None:
    for variant in variants:
        if variant not in TFLITE_VARIANTS:
            raise ValueError(f"unknown TFLite variant {variant!r}; expected one of "
                             f"{list(TFLITE_VARIANTS)}")


def _set_tflite_variant(converter, variant: str) -> None:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]


def tflite_from_function(serve, variant: str) -> bytes:
    """A TFLite flatbuffer whose one signature ``serving_default`` is the tf.function ``serve``,
    in ``variant`` (see :func:`convert_tflite`). The models ``serve`` calls must be float32:
    TFLite cannot convert a mixed-precision graph."""
    return tflite_variants_from_function(serve, [variant])[variant]


def tflite_variants_from_function(serve, variants) -> dict[str, bytes]:
    """:func:`tflite_from_function` for each of ``variants``: ``{variant: flatbuffer bytes}``.

    The converter freezes the variables of a SavedModel (a bare concrete function would leave
    them uninitialised), so ``serve`` is traced and written as one first, once for all the
    variants, in a temporary folder.
    """
    import tensorflow as tf

    _check_tflite_variants(variants)
    flatbuffers = {}
    # The export and the converter print every captured variable.
    with contextlib.redirect_stdout(io.StringIO()), quiet_tf.stderr_filtered(), \
            tempfile.TemporaryDirectory() as tmp:
        save_signatures({"serving_default": serve}, Path(tmp) / "serving")
        for variant in variants:
            converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "serving"))
            _set_tflite_variant(converter, variant)
            flatbuffers[variant] = converter.convert()
    return flatbuffers


# ---------------------------------------------------------------------------------------------
# Parity batch and the export driver


def parity_images(run_dir, cfg: serving.ServingConfig, data_dir=None, count: int = 32, seed: int = 0
                  ) -> tuple[np.ndarray, str]:
    """A batch to compare variants on: the run's val split, else rendered phantoms.

    Uses ``data_dir`` or the ``--data_dir`` in ``R/flags.txt``; when neither is usable, phantom
    radiographs from :mod:`pneumo_tf.data.phantoms`, preprocessed like the converter would.

    Returns:
        ``(images [n, S, S, 1] uint8, source description)``.
    """
    from pneumo_tf.evaluation import scoring

    candidates = [d for d in (data_dir, rundir.read_run_flags(run_dir).get("data_dir")) if d]
    for candidate in candidates:
        try:
            rundir.check_data_compatible(run_dir, candidate)
            images = next(scoring.iterate_split(candidate, "val", count), {}).get("image")
            if images is None:
                raise records.DataDirError(f"the val split of {candidate} has no images")
            return images, f"val split of {candidate} ({len(images)} images)"
        except (records.DataDirError, rundir.RunDirError) as e:
            log.warning("parity batch: cannot use %s (%s)", candidate, e)
    from pneumo_tf.data import phantoms

    rng = np.random.default_rng(seed)
    images = [preprocess.preprocess_gray(
        phantoms.generate_phantom(rng, i % 2, draw_phantom_size(rng))[0],
        cfg.image_size, cfg.crop)[0] for i in range(count)]
    return np.stack(images)[..., None], f"{count} phantom radiographs (no usable --data_dir)"


def draw_phantom_size(rng: np.random.Generator) -> tuple[int, int]:
    """A small phantom size (fast to render) with a film-like aspect, ``(height, width)``."""
    h = int(rng.integers(256, 384))
    return h, int(h * rng.uniform(1.0, 1.4))


def _labels(p: np.ndarray, cfg: serving.ServingConfig) -> np.ndarray:
    """The served labels of raw probabilities ``p`` (the decision predict and SavedModels take)."""
    return pmetrics.decide_label(calibration_lib.apply_temperature(p, cfg.temperature),
                                cfg.calibrated_threshold())


def _diff_stats(p: np.ndarray, reference: np.ndarray, cfg: serving.ServingConfig) -> dict:
    d = np.abs(p - reference)
    if not np.all(np.isfinite(d)):  # NaN would compare False against any tolerance: report it
        return {"max_abs_prob_diff": None, "mean_abs_prob_diff": None,
                "non_finite": int(np.sum(~np.isfinite(d))), "label_agreement": None}
    return {"max_abs_prob_diff": float(d.max()) if d.size else 0.0,
            "mean_abs_prob_diff": float(d.mean()) if d.size else 0.0,
            "label_agreement": float(np.mean(_labels(p, cfg) == _labels(reference, cfg)))
            if d.size else 1.0}


def keras_outputs(model, images: np.ndarray, ood_stats=None, batch_size: int = 64) -> dict:
    """The Keras model's reference outputs for ``[N, S, S, 1] uint8`` images: ``probability``
    ``[N] float64``, plus ``ood_score`` (float64, :meth:`pneumo_tf.ood.OodStats.scores`) and
    ``in_distribution`` (the score and the upside-down probe) and ``upright_margin`` (the
    probe's value minus its threshold) with ``ood_stats``, and ``class_probabilities``
    ``[N, 3]`` for a subtype model."""
    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import ood
    from pneumo_tf.evaluation import scoring

    outputs = scoring.make_outputs_fn(model, ood_stats.layer if ood_stats is not None else None)
    parts: dict[str, list] = {}
    for i in range(0, len(images), batch_size):
        out = outputs(images[i:i + batch_size])
        batch = {"probability": out["probability"].numpy().astype(np.float64)}
        if ood_stats is not None:
            batch["ood_score"] = ood_stats.scores(out["features"].numpy())
            batch["in_distribution"] = batch["ood_score"] <= ood_stats.threshold
            if ood_stats.upright is not None:
                batch["in_distribution"] &= ~ood.upside_down(ood_stats.upright,
                                                             images[i:i + batch_size])
                batch["upright_margin"] = _upright_margin(ood_stats.upright,
                                                          images[i:i + batch_size])
        if "class_logits" in out:
            batch["class_probabilities"] = calibration.softmax(out["class_logits"].numpy())
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def _upright_margin(upright: dict, images: np.ndarray) -> np.ndarray:
    """``[N]`` the upside-down probe's value minus its threshold (negative: upside down)."""
    from pneumo_tf.serving import ood

    values = ood.thumbnails(images).reshape(len(images), -1) @ np.asarray(upright["weights"])
    return values + upright["bias"] - upright["threshold"]


OOD_TIE_TOLERANCE = 1e-4   # relative; the SavedModel's float32 scores agree to about 1e-5
# absolute, on the probe's value (order 1): its threshold is a val image's value, and the parity
# batch comes from val, so one image can sit on it exactly
UPRIGHT_TIE_TOLERANCE = 1e-4


def _output_diffs(got: dict, reference: dict, cfg: serving.ServingConfig) -> dict:
    """:func:`_diff_stats` of the probability, plus the OOD and subtype outputs' agreement:
    ``max_rel_ood_score_diff`` and ``in_distribution_agreement`` (at the served threshold, over
    the images whose score is not within :data:`OOD_TIE_TOLERANCE` of it, nor their
    upside-down probe within :data:`UPRIGHT_TIE_TOLERANCE` of its threshold:
    ``ood_scores_at_threshold`` and ``upright_at_threshold`` count those), and
    ``max_abs_class_prob_diff`` and ``subtype_agreement`` (among images labelled PNEUMONIA)."""
    stats = _diff_stats(np.asarray(got["probability"], np.float64).reshape(-1),
                        reference["probability"], cfg)
    if "ood_score" in reference:
        score, ref = np.asarray(got["ood_score"], np.float64), reference["ood_score"]
        stats["max_rel_ood_score_diff"] = float(np.max(np.abs(score - ref) / np.maximum(ref, 1e-6)))
        # Scores within float32 rounding of the threshold (ties among a barely trained model's
        # val scores put one exactly on it) may fall either side: judged apart.
        near = np.abs(ref - cfg.ood_threshold) <= OOD_TIE_TOLERANCE * max(cfg.ood_threshold, 1.0)
        stats["ood_scores_at_threshold"] = int(near.sum())
        if "upright_margin" in reference:
            tied = np.abs(reference["upright_margin"]) <= UPRIGHT_TIE_TOLERANCE
            stats["upright_at_threshold"] = int(tied.sum())
            near = near | tied
        agree = np.asarray(got["in_distribution"], bool) == reference["in_distribution"]
        stats["in_distribution_agreement"] = float(np.mean(agree[~near])) if (~near).any() \
            else 1.0
    if "class_probabilities" in reference:
        probs, ref = np.asarray(got["class_probabilities"], np.float64), reference[
            "class_probabilities"]
        stats["max_abs_class_prob_diff"] = float(np.max(np.abs(probs - ref)))
        labelled = np.asarray(got["label"]) == 1
        ref_subtype = np.where(ref[:, 1] >= ref[:, 2], 1, 2)
        stats["subtype_agreement"] = float(np.mean(
            np.asarray(got["subtype"])[labelled] == ref_subtype[labelled])) if labelled.any() \
            else 1.0
    return stats


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (a SavedModel's size)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_run(run_dir: str | os.PathLike, formats=EXPORT_FORMATS, data_dir=None,
               parity_count: int = 32, seed: int = 0,
               calibration_name: str = rundir.VAL_CALIBRATION, lungs=None,
               refer_band: float = refer.DEFAULT_REFER_BAND) -> dict:
    """Export a run: serving config, SavedModel and/or TFLite variants, then ``parity.json``.

    Args:
        run_dir: a finished run or ensemble (``model.keras``, ``data_manifest.json``).
        formats: subset of :data:`EXPORT_FORMATS`.
        data_dir: converter output, used to calibrate (when ``calibration.json`` is missing) and
            for the parity batch (its val split).
        parity_count: images in the parity batch.
        seed: seed of the phantom parity batch (when no data is usable).
        calibration_name: the calibration baked in: ``val`` (``calibration.json``, written to
            ``R/export/``) or a site calibration (written to ``R/export_<name>/``).
        lungs: :class:`pneumo_tf.serving.lungs.LungOptions` (``--lung_model`` and the no-lungs
            thresholds); a ``--crop=lungs`` run serves with its own lung model by default.
        refer_band: the ``uncertain`` band the bytes signature refers by (calibrated
            probability; in ``pneumo_tf_serving.json``, and predict's default for the export).

    Returns:
        The parity report written to ``parity.json`` of the export folder.

    Raises:
        ExportError: missing calibration without ``data_dir``, adaptive crop with a SavedModel,
            unknown format, or the float16 TFLite model misses its 0.01 tolerance.
        rundir.RunDirError: a lungs run (export it with
            :func:`pneumo_tf.serving.lung_export.export_lung_run`) or an unusable lung model.
    """
    from pneumo_tf.modeling import model as model_lib
    from pneumo_tf.serving import lungs as lung_serving
    from pneumo_tf.serving import ood

    formats = checked_formats(formats)
    run = rundir.Run.open(run_dir)
    _check_finished(run)
    lung_model, settings = lung_serving.for_run(run, lungs)
    out = run.paths.export_dir(calibration_name)
    calibration = calibration_for_export(run, data_dir, calibration_name)
    cfg = serving.serving_config_for_run(run, calibration, calibration_name)
    cfg.lungs = settings.to_json() if settings is not None else None
    cfg.refer_band = float(refer_band)
    if "saved_model" in formats:
        check_in_graph_crop(cfg)
    run_model = rundir.load_model(run)
    model = float32_model(run_model)
    cfg.task = "subtype" if model_lib.is_subtype_model(model) else "binary"
    stats = ood.load_stats(run)
    if stats is None:
        log.warning("%s has no %s: the exported models carry no ood_score/in_distribution. Fit "
                    "the guard with `python -m pneumo_tf.ood --run_dir=%s` and export again",
                    run, ood.OOD_JSON, run)
    images, source = parity_images(run, cfg, data_dir, parity_count, seed)
    reference = keras_outputs(model, images, stats)
    out.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json_atomic(out / serving.SERVING_CONFIG_NAME, cfg.to_json())
    report = _report_head(run, cfg, source, len(images), model is not run_model, stats)
    if model is not run_model:
        report["variants"]["keras_run_precision"] = _diff_stats(
            keras_probabilities(run_model, images), reference["probability"], cfg)
    unet = float32_model(lung_model.model) if lung_model is not None else None
    report["variants"].update(_export_variants(model, cfg, stats, formats, out,
                                               (images, reference), unet))
    if lung_model is not None:
        report["lungs"] = _export_lung_variants(lung_model, unet, settings, formats, out,
                                                (parity_count, seed))
    return _finish_report(report, out)


def checked_formats(formats) -> list[str]:
    """``formats`` as a list; unknown or no format is an :class:`ExportError` naming the choices."""
    formats = list(formats)
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown or not formats:
        raise ExportError(f"--formats={','.join(formats)}: unknown or empty; choose from "
                          f"{','.join(EXPORT_FORMATS)}")
    return formats


def _check_finished(run: rundir.Run) -> None:
    if not run.paths.model.is_file():
        raise ExportError(
            f"{run.paths.model} is missing: {run} has not finished training (or is not a run "
            f"directory). Finish it first: `python -m pneumo_tf.train --run_dir={run} "
            f"--flagfile={run.paths.flags}` resumes it from its backup")


def _report_head(run: rundir.Run, cfg: serving.ServingConfig, source: str, count: int,
                 rebuilt: bool, stats) -> dict:
    """``parity.json`` before its variants: the batch, the calibration, the reference."""
    return {"batch": {"source": source, "count": int(count)},
            "calibration": cfg.calibration,
            "reference": "Keras model in float32" + (
                " (rebuilt from the run's mixed-precision model)" if rebuilt else ""),
            "keras_model_bytes": run.paths.model.stat().st_size,
            "tolerances": {"fp16": FP16_MAX_ABS_DIFF}, "variants": {},
            "outputs": {"ood": stats is not None, "subtype": cfg.task == "subtype",
                        "lungs": cfg.lungs is not None}}


def _finish_report(report: dict, out: Path) -> dict:
    """Judge the float16 TFLite model against its tolerance; write ``parity.json``.

    Raises:
        ExportError: the float16 model misses its tolerance (recorded in ``parity.json``).
    """
    fp16 = report["variants"].get("fp16")
    report["passed"] = fp16 is None or (fp16["max_abs_prob_diff"] is not None
                                        and fp16["max_abs_prob_diff"] <= FP16_MAX_ABS_DIFF)
    atomic_files.write_json_atomic(out / PARITY_NAME, report)
    if not report["passed"]:
        raise ExportError(f"float16 TFLite model differs from the Keras model by "
                          f"{fp16['max_abs_prob_diff']} in probability (> {FP16_MAX_ABS_DIFF}); "
                          f"see {out / PARITY_NAME}. Do not ship {TFLITE_VARIANTS['fp16']}")
    return report


def _export_variants(model, cfg: serving.ServingConfig, stats, formats: list[str], out: Path,
                     parity: tuple[np.ndarray, dict], unet=None) -> dict:
    """Write the SavedModel and the TFLite variants; their parity entries by variant name
    (``unet``: the float32 lung model of ``cfg.lungs``, or None)."""
    images, reference = parity
    variants = {}
    if "saved_model" in formats:
        sm_dir = export_saved_model(model, cfg, out / SAVED_MODEL_DIR, stats, unet)
        variants["saved_model"] = {"path": SAVED_MODEL_DIR, "bytes": dir_bytes(sm_dir),
                                   **_output_diffs(saved_model_batch_outputs(sm_dir, images),
                                                   reference, cfg)}
        log.info("wrote %s", sm_dir)
    if "tflite" in formats:
        flatbuffers = convert_tflite_variants(model, list(TFLITE_VARIANTS), cfg, stats)
        for variant, name in TFLITE_VARIANTS.items():
            flatbuffer = flatbuffers[variant]
            target = atomic_files.write_bytes_atomic(out / name, flatbuffer)
            got = serving.TFLiteRunner(target).outputs(images)
            variants[variant] = {"path": name, "bytes": len(flatbuffer),
                                 **_output_diffs(got, reference, cfg)}
            log.info("wrote %s (%d bytes)", target, len(flatbuffer))
    return variants


def _export_lung_variants(lung_model, unet, settings, formats: list[str], out: Path,
                          batch: tuple[int, int]) -> dict:
    """The lung model beside a classifier: its parity in the SavedModel's ``lungs`` signature and,
    with TFLite, its own float16 TFLite model (:data:`pneumo_tf.serving.lungs.LUNG_TFLITE_NAME`,
    what predict runs beside a TFLite classifier); the lung model's facts and the batch."""
    import tensorflow as tf

    from pneumo_tf.serving import lungs as lung_serving

    thumbs, source = lung_serving.parity_thumbnails(lung_model, *batch)
    reference = lung_model.grid_probabilities(thumbs)
    report = {"model": settings.to_json(), "batch": {"source": source, "count": len(thumbs)},
              "variants": {}}
    if "saved_model" in formats:
        signature = tf.saved_model.load(str(out / SAVED_MODEL_DIR)).signatures["lungs"]
        got = {k: v.numpy() for k, v in signature(image=tf.constant(thumbs)).items()}
        report["variants"]["saved_model"] = lung_serving.lung_diffs(got, reference, settings)
    if "tflite" in formats:
        flatbuffer = tflite_from_function(lung_serving.lungs_signature(unet, settings), "fp16")
        target = atomic_files.write_bytes_atomic(out / lung_serving.LUNG_TFLITE_NAME, flatbuffer)
        got = lung_serving.TFLiteLungRunner(target).outputs(thumbs)
        report["variants"]["fp16"] = {"path": target.name, "bytes": len(flatbuffer),
                                      **lung_serving.lung_diffs(got, reference, settings)}
    return report
