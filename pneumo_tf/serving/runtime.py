"""Serving facts of a trained run: its config, its calibration, the decision, the runners.

A library (it defines no flags), shared by the export app (:mod:`pneumo_tf.export`), which writes
models for serving, and :mod:`pneumo_tf.predict`, which serves them on the host:

- :class:`ServingConfig`: image size, crop, temperature and threshold of a run, written as
  ``pneumo_tf_serving.json`` beside every exported model (:data:`SERVING_CONFIG_NAME`).
- :func:`calibration_from_json`: a validated ``calibration.json``; :func:`serving_config_for_run`.
- :func:`pneumo_tf.evaluation.metrics.decide_label`: THE threshold decision, for numpy values and TensorFlow tensors alike. It
  is taken on the calibrated probability with the threshold on that same scale
  (:meth:`ServingConfig.calibrated_threshold`), so every place that shows a calibrated
  probability, a threshold and a label shows ``label == (calibrated_probability >= threshold)``
  for the very numbers it shows; float rounding cannot make them disagree.
- :func:`saved_model_outputs`: what every SavedModel signature returns.
- :func:`tflite_interpreter`, :class:`TFLiteRunner`: TFLite models on ``[N, S, S, 1] uint8``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

import pneumo_tf
from pneumo_tf.evaluation import calibration as calibration_lib
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.core import quiet_tf, rundir
from pneumo_tf.serving import refer

SERVING_CONFIG_NAME = "pneumo_tf_serving.json"
# A stored calibrated_threshold may differ from the one computed from threshold and temperature
# by this much (a file written by another tool, rounded); beyond, the file contradicts itself.
CALIBRATED_THRESHOLD_TOLERANCE = 1e-6


class ServingError(ValueError):
    """A run's serving facts are unusable (bad calibration.json); the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Configuration and calibration


@dataclasses.dataclass
class ServingConfig:
    """What serving and prediction need to know about a run.

    Attributes:
        image_size: model input side S, pixels (the data manifest's ``image_size``).
        crop: ``fixed`` | ``none`` | ``adaptive`` | ``lungs`` (the data manifest's ``crop``).
        temperature: validation temperature T (1.0 = uncalibrated).
        threshold: operating threshold, a probability on the scale ``threshold_applies_to``
            names.
        threshold_applies_to: ``probability`` or ``calibrated_probability``: which one
            ``threshold`` was chosen on.
        threshold_method: how the threshold was chosen (from calibration.json).
        calibrated: False when no calibration was available (T = 1, threshold 0.5).
        backbone: backbone name, when known.
        cam_layer: the run's Grad-CAM layer where it is not the backbone's registered one (a
            ``--cam_penalty`` run: the layer it was trained to explain), else None.
        calibration: the run's calibration this config holds: ``val`` (``calibration.json``),
            a site calibration's name (``calibrations/NAME.json``), or ``none``.
        task: ``binary`` or ``subtype`` (a three-way head: NORMAL, BACTERIAL, VIRAL), or
            ``lungs`` (an exported lung model: no calibration, no classes).
        subtype_temperature: the temperature of a subtype model's softmax logits (from
            ``calibration.json``'s ``subtype`` entry, fitted on val; 1.0 without one).
        ood: the out-of-distribution guard the model carries (``ood.json``: ``threshold``,
            ``layer``, ``method``, ``val_rate``, ...), or None for a run without ``ood.json``.
        lungs: the lung model served beside the classifier and its thresholds
            (:meth:`pneumo_tf.serving.lungs.LungSettings.to_json`; a ``--crop=lungs`` run's crop
            and every ``lung_fraction``), or None.
        refer_band: half-width of the ``uncertain`` band around the threshold, in calibrated
            probability (baked into the bytes signature; predict's default).
    """

    image_size: int
    crop: str
    temperature: float = 1.0
    threshold: float = 0.5
    threshold_applies_to: str = "probability"
    threshold_method: str = "default_0.5"
    calibrated: bool = False
    backbone: str | None = None
    cam_layer: str | None = None
    calibration: str = "val"
    task: str = "binary"
    subtype_temperature: float = 1.0
    ood: dict | None = None
    lungs: dict | None = None
    refer_band: float = refer.DEFAULT_REFER_BAND

    def to_json(self) -> dict:
        """The fields plus ``calibrated_threshold``, ``label_names``, ``refer_reason_names``
        (the columns of ``refer_reason_flags``) and ``normalisation`` (and ``subtype_names`` for
        a subtype model)."""
        out = {**dataclasses.asdict(self), "calibrated_threshold": self.calibrated_threshold(),
               "label_names": list(pneumo_tf.CLASS_NAMES),
               "refer_reason_names": list(refer.REFER_REASONS),
               "normalisation": "inside the model (PixelNorm layer)"}
        if self.task == "subtype":
            out["subtype_names"] = list(pneumo_tf.SUBTYPE_NAMES)
        return out

    @property
    def ood_threshold(self) -> float | None:
        """The OOD score above which an image is not in distribution (None: no guard)."""
        return None if self.ood is None else float(self.ood["threshold"])

    @classmethod
    def from_json(cls, obj: dict) -> "ServingConfig":
        """From :meth:`to_json`'s dict; derived keys (``calibrated_threshold``) are recomputed.

        A config written before ``calibration`` existed held ``calibration.json``: ``val``
        (``none`` when it was uncalibrated). One written before the subtype task and the OOD
        guard existed is a binary model without a guard; one without ``refer_band`` has the
        default band.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in obj.items() if k in names}
        fields.setdefault("calibration", "val" if obj.get("calibrated") else "none")
        return cls(**fields)

    def _calibration(self) -> dict:
        return {"threshold": self.threshold, "temperature": self.temperature,
                "threshold_applies_to": self.threshold_applies_to}

    def calibrated_threshold(self) -> float:
        """The operating threshold on the calibrated probability (:func:`pneumo_tf.evaluation.metrics.decide_label`'s)."""
        return calibration_lib.calibrated_threshold(self._calibration())

    def raw_threshold(self) -> float:
        """The operating threshold expressed on the model's raw probability."""
        return calibration_lib.raw_threshold(self._calibration())


def calibration_from_json(obj: dict, where: str) -> dict:
    """Validate a ``calibration.json`` dict and complete it with ``calibrated_threshold``.

    Args:
        obj: the file's content.
        where: the file's path, for messages.

    Returns:
        ``obj`` with float ``temperature`` (> 0), ``threshold`` (in [0, 1]),
        ``threshold_applies_to`` and ``calibrated_threshold`` (always computed by
        :func:`pneumo_tf.evaluation.calibration.calibrated_threshold`; files written before the key
        existed work unchanged).

    Raises:
        ServingError: a missing or out-of-range entry, or a stored ``calibrated_threshold`` that
            is not ``threshold`` on the calibrated scale.
    """
    fix = "refit it with `python -m pneumo_tf.evaluate --split=val --run_dir=... --data_dir=...`"
    try:
        temperature = float(obj["temperature"])
        threshold = float(obj["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise ServingError(f"{where} needs numeric 'temperature' and 'threshold' entries ({e}); "
                           f"{fix}") from e
    if not (temperature > 0 and math.isfinite(temperature)) or not 0.0 <= threshold <= 1.0:
        raise ServingError(f"{where}: temperature must be > 0 and threshold in [0, 1], got "
                           f"T={temperature}, threshold={threshold}; re-calibrate the run")
    applies_to = obj.get("threshold_applies_to", "probability")
    if applies_to not in calibration_lib.THRESHOLD_APPLIES_TO:
        raise ServingError(f"{where}: threshold_applies_to={applies_to!r}, expected one of "
                           f"{calibration_lib.THRESHOLD_APPLIES_TO}")
    checked = {**obj, "temperature": temperature, "threshold": threshold,
               "threshold_applies_to": applies_to}
    computed = calibration_lib.calibrated_threshold(checked)
    stored = obj.get("calibrated_threshold")
    if stored is not None and not _agrees(stored, computed):
        raise ServingError(f"{where}: calibrated_threshold={stored!r} is not the threshold "
                           f"{threshold} ({applies_to}) on the calibrated scale with T="
                           f"{temperature}, which is {computed}; {fix}")
    return {**checked, "calibrated_threshold": computed}


def _agrees(stored, computed: float) -> bool:
    try:
        return abs(float(stored) - computed) <= CALIBRATED_THRESHOLD_TOLERANCE
    except (TypeError, ValueError):
        return False


def serving_config_for_run(run_dir: str | os.PathLike, calibration: dict | None,
                           calibration_name: str = rundir.VAL_CALIBRATION) -> ServingConfig:
    """The :class:`ServingConfig` of a run: manifest facts + calibration (+ backbone if known).

    Args:
        run_dir: the run (a :class:`pneumo_tf.core.rundir.Run` or its directory): its data
            manifest, summary, ``calibration.json`` and OOD guard are read.
        calibration: a dict from :func:`calibration_from_json`, or None (uncalibrated: T = 1,
            threshold 0.5).
        calibration_name: the name of ``calibration`` in the run (``val`` or a site's).
    """
    from pneumo_tf.serving import ood

    run = rundir.Run.open(run_dir)
    manifest = run.manifest
    config = (run.summary.get("config") or {}) if run.paths.summary.is_file() else {}
    cfg = ServingConfig(image_size=int(manifest["image_size"]), crop=str(manifest["crop"]),
                        backbone=config.get("backbone"), calibration="none",
                        cam_layer=config.get("cam_layer") if config.get("cam_penalty") else None,
                        ood=ood.read_guard(run))
    subtype = (run.calibration() or {}).get("subtype") or {}
    cfg.subtype_temperature = float(subtype.get("temperature", 1.0))
    if calibration is not None:
        cfg.calibration = calibration_name
        cfg.temperature = float(calibration["temperature"])
        cfg.threshold = float(calibration["threshold"])
        cfg.threshold_applies_to = calibration.get("threshold_applies_to", "probability")
        cfg.threshold_method = str(calibration.get("threshold_method", "unknown"))
        cfg.calibrated = True
    return cfg


# ---------------------------------------------------------------------------------------------
# The decision and the SavedModel outputs


def saved_model_outputs(model, images, cfg: ServingConfig, ood_stats=None,
                        film_checks: dict | None = None) -> dict:
    """The outputs of every SavedModel signature (and TFLite model), for ``[N, S, S, 1] uint8``.

    Args:
        model: ``[N, S, S, 1] -> [N, 1]`` probability model, or the dict-output model of
            :func:`pneumo_tf.evaluation.scoring.outputs_model` (``class_logits`` and ``features`` add
            outputs).
        images: the batch.
        cfg: the serving facts (temperature, thresholds, refer band).
        ood_stats: :class:`pneumo_tf.ood.OodStats` whose constants go into the graph (the model
            must then give ``features``), or None (no OOD outputs).
        film_checks: ``{name: [N] bool}``, what the bytes signature checked of each decoded
            film (names of :data:`pneumo_tf.serving.refer.CHECKS`: the film checks, the
            orientation checks, ``no_lungs_found``; a name left out is false), or None (the
            preprocessed signatures cannot see the full film: no refer outputs).

    Returns:
        ``{"probability": float32 (the model's), "calibrated_probability": float32,
        "threshold": float32 (the operating threshold on the calibrated scale, repeated per
        image), "label": int64 (:func:`pneumo_tf.evaluation.metrics.decide_label` of the two
        before; -1 where ``in_distribution`` is false: no diagnosis)}``, all ``[N]``; with
        ``ood_stats`` also ``"ood_score": [N] float32`` and ``"in_distribution": [N] bool``
        (score <= threshold, not upside down by the guard's probe, no orientation check
        failed); with ``film_checks`` also :func:`pneumo_tf.serving.refer.tf_refer_outputs`
        (``refer``, ``refer_reason_flags``, ``refer_reasons``) by
        :func:`pneumo_tf.serving.refer.decide`, predict's rule; for a subtype model also
        ``"class_probabilities": [N, 3] float32`` (the model's softmax, NORMAL, BACTERIAL,
        VIRAL), ``"subtype": [N] int64`` (0 where ``label`` is not 1, else 1 or 2: the larger
        pneumonia probability) and ``"subtype_probability": [N] float32`` (the larger of the
        two, given pneumonia: ``sigmoid(|z_b - z_v| / T_subtype)``).
    """
    import tensorflow as tf

    out = model(images, training=False)
    out = out if isinstance(out, dict) else {"probability": out}
    p = tf.reshape(tf.cast(out["probability"], tf.float32), [-1])
    cal = calibration_lib.apply_temperature(p, cfg.temperature)
    threshold = tf.fill(tf.shape(cal), tf.constant(cfg.calibrated_threshold(), tf.float32))
    result = {"probability": p, "calibrated_probability": cal, "threshold": threshold,
              "label": pmetrics.decide_label(cal, threshold)}
    no = tf.zeros_like(p, tf.bool)
    checks = {**{name: no for name in refer.CHECKS}, **(film_checks or {})}
    rejected = no
    if ood_stats is not None:
        result["ood_score"], rejected, checks[refer.UPSIDE_DOWN] = _guard_outputs(
            images, out["features"], ood_stats, no)
    decided = refer.decide(checks, rejected, tf.abs(cal - threshold) <= cfg.refer_band,
                           guarded=ood_stats is not None)
    if ood_stats is not None:
        result["in_distribution"] = decided["in_distribution"]
        result["label"] = tf.where(decided["in_distribution"], result["label"],
                                   tf.constant(-1, tf.int64))
    if film_checks is not None:
        result.update(refer.tf_refer_outputs(decided))
    if "class_logits" in out:
        result.update(_subtype_outputs(tf.cast(out["class_logits"], tf.float32), result["label"],
                                       cfg.subtype_temperature))
    return result


def _guard_outputs(images, features, ood_stats, no) -> tuple:
    """The guard in the graph: ``(ood_score [N] float32, rejected [N] bool: the score above its
    threshold, upside_down [N] bool: the probe's verdict, ``no`` for a guard without one)``."""
    import tensorflow as tf

    from pneumo_tf.serving import ood

    score = ood.tf_mahalanobis_scores(features, ood_stats.means, ood_stats.precision)
    upside_down = no if ood_stats.upright is None else ood.tf_upside_down(images,
                                                                          ood_stats.upright)
    return score, score > tf.constant(ood_stats.threshold, tf.float32), upside_down


def _subtype_outputs(logits, label, subtype_temperature: float) -> dict:
    """The subtype outputs of :func:`saved_model_outputs` from ``[N, 3]`` logits."""
    import tensorflow as tf

    bacterial = logits[:, 1] >= logits[:, 2]
    subtype = tf.where(bacterial, tf.constant(1, tf.int64), tf.constant(2, tf.int64))
    gap = tf.abs(logits[:, 1] - logits[:, 2]) / subtype_temperature
    return {"class_probabilities": tf.nn.softmax(logits, axis=-1),
            "subtype": tf.where(label > 0, subtype, tf.zeros_like(subtype)),
            "subtype_probability": tf.sigmoid(gap)}


def subtype_fields(class_probabilities, label: int, subtype_temperature: float) -> dict:
    """A predict row's ``subtype`` (``BACTERIAL``/``VIRAL``, None where ``label`` is 0) and
    ``subtype_probability`` (the larger pneumonia probability given pneumonia, temperature
    scaled as :func:`saved_model_outputs`'s; None where ``label`` is 0) from ``[3]``
    class probabilities (the logits' differences are recovered as log ratios)."""
    if not label:
        return {"subtype": None, "subtype_probability": None}
    tiny = np.finfo(np.float64).tiny
    p = np.maximum(np.asarray(class_probabilities, np.float64), tiny)
    subtype = 1 if p[1] >= p[2] else 2
    gap = abs(math.log(p[1]) - math.log(p[2])) / subtype_temperature
    return {"subtype": pneumo_tf.SUBTYPE_NAMES[subtype],
            "subtype_probability": float(0.5 * (1.0 + math.tanh(0.5 * gap)))}


# ---------------------------------------------------------------------------------------------
# TFLite


def tflite_interpreter(model_path_or_bytes: str | os.PathLike | bytes):
    """A LiteRT interpreter (``ai-edge-litert``), or ``tf.lite.Interpreter`` without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the optional [tflite] extra is not installed
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    if isinstance(model_path_or_bytes, (bytes, bytearray)):
        return Interpreter(model_content=bytes(model_path_or_bytes))
    return Interpreter(model_path=str(model_path_or_bytes))


class TFLiteRunner:
    """Runs a TFLite classifier on ``[N, S, S, 1] uint8`` batches of any N.

    A model exported with named outputs (a signature whose outputs are
    :func:`saved_model_outputs`'s) gives them all; an older single-output model gives
    ``probability`` only.
    """

    def __init__(self, model_path_or_bytes: str | os.PathLike | bytes):
        self.interpreter = tflite_interpreter(model_path_or_bytes)
        self._input = self.interpreter.get_input_details()[0]
        self._signature = next((name for name, sig in self.interpreter.get_signature_list().items()
                                if "probability" in sig.get("outputs", ())), None)
        self._batch = None

    @property
    def image_size(self) -> int:
        return int(self._input["shape_signature"][1])

    @property
    def output_names(self) -> list[str]:
        """The model's outputs (``["probability"]`` for a single-output model)."""
        if self._signature is None:
            return ["probability"]
        return list(self.interpreter.get_signature_list()[self._signature]["outputs"])

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for ``[N, S, S, 1] uint8`` images (``[N]`` or ``[N, 3]`` arrays)."""
        if len(images) == 0:
            return {name: np.zeros((0,), np.float64) for name in self.output_names}
        images = images.astype(self._input["dtype"])
        if self._signature is not None:
            runner = self.interpreter.get_signature_runner(self._signature)
            (name,) = runner.get_input_details()
            if self._batch == len(images):
                return {k: np.array(v) for k, v in runner(**{name: images}).items()}
            with quiet_tf.stderr_filtered():  # the XNNPACK delegate's line when (re)allocated
                out = {k: np.array(v) for k, v in runner(**{name: images}).items()}
            self._batch = len(images)
            return out
        if self._batch != len(images):
            self.interpreter.resize_tensor_input(self._input["index"], list(images.shape))
            with quiet_tf.stderr_filtered():  # "Created TensorFlow Lite XNNPACK delegate ..."
                self.interpreter.allocate_tensors()
            self._batch = len(images)
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        out = self.interpreter.get_output_details()[0]
        return {"probability": np.asarray(self.interpreter.get_tensor(out["index"]),
                                          np.float64).reshape(-1)}

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``[N] float64`` probabilities for ``[N, S, S, 1] uint8`` images."""
        return np.asarray(self.outputs(images)["probability"], np.float64).reshape(-1)
