"""The lungs at serving: the no-lungs guard, the lung settings an export bakes in, and the lung
model in the graph and on the host.

A lung model (a ``--task=lungs`` run, :class:`pneumo_tf.modeling.lungs.LungModel`) answers for
every film its lung share (``lung_fraction``: pixels of its map above 0.5 / all pixels) and how
sure it is of those pixels (``lung_confidence``: their mean lung probability). Films with lungs
get a crisp map; anything else (a photo, a page of text, noise) a blurred one, whose lung share
can still be large: a U-Net trained on films finds "lungs" in a page of text (BUILD.md, "Evidence
in the lungs"). So :func:`lungs_found`, the one decision, asks both: the share at least
``min_lung_fraction`` and the confidence at least ``min_lung_confidence``; predict and the
SavedModel's bytes signature refer a film where it fails (``no_lungs_found``, :mod:`pneumo_tf.serving.refer`), beside the OOD guard.

- The guard (:func:`fit_guard`): ``min_lung_confidence`` of a lungs run, the confidence below
  which a fraction ``val_rate`` of its val films lie, in ``R/lung_guard.json`` (fitted at the end
  of training, or by ``python -m pneumo_tf.ood --run_dir=LUNGS_RUN``).
- :class:`LungSettings`: the lung model and the thresholds an export or a predictor uses (in
  ``pneumo_tf_serving.json``'s ``lungs``).
- In the graph: :func:`tf_lung_outputs` (a batch of thumbnails), :func:`tf_film_lungs` (one
  decoded film: its map and its lung crop box), :func:`tf_lung_summary`.
- On the host: :class:`HostLungs` (a Keras model, a SavedModel's ``lungs`` signature or a TFLite
  model behind one interface).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import numpy as np

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.image import preprocess
from pneumo_tf.modeling import lungs as lungs_lib

log = logging.getLogger(__name__)

# Fraction of a lungs run's val films whose lung confidence the guard may call too low.
DEFAULT_VAL_RATE = 0.01
# The outputs every lung signature gives (and TFLite lung models).
LUNG_OUTPUTS = ("lung_mask", "lung_fraction", "lung_confidence", "lungs_found")
# The lung model's TFLite (float16) beside a classifier's TFLite models.
LUNG_TFLITE_NAME = "lung_model_fp16.tflite"


# ---------------------------------------------------------------------------------------------
# The guard


def _quantiles(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "p01": float(np.quantile(v, 0.01)),
            "p05": float(np.quantile(v, 0.05)), "median": float(np.median(v)),
            "max": float(v.max())}


def film_statistics(lungs: "lungs_lib.LungModel", thumbnails: np.ndarray) -> tuple:
    """``(lung fractions [N], lung confidences [N])`` of ``[N, G, G, 1]`` uint8 thumbnails."""
    findings = [preprocess.find_lungs(p, 0.0, 0.0) for p in lungs.grid_probabilities(thumbnails)]
    return (np.array([f.fraction for f in findings], np.float64),
            np.array([f.confidence for f in findings], np.float64))


def fit_guard(run_dir: "str | os.PathLike | rundir.Run", data_dir: str | os.PathLike | None = None,
              val_rate: float = DEFAULT_VAL_RATE, batch_size: int = 64) -> dict:
    """Fit a lungs run's no-lungs guard on its val films; write ``R/lung_guard.json``.

    ``min_lung_confidence`` is the lung confidence below which a fraction ``val_rate`` of the val
    films (all of them, with a drawn mask or not; whole films at the model's input) lie.

    Args:
        run_dir: a finished ``--task=lungs`` run, or its :class:`~pneumo_tf.core.rundir.Run`
            (whose model is used: the training loop hands over the one it trained).
        data_dir: its data dir (default: the one it was trained on).
        val_rate: fraction of val films the guard may refer, in [0, 0.5].

    Returns:
        The ``lung_guard.json`` content.

    Raises:
        rundir.RunDirError: not a lungs run, no data dir, or a data dir of other settings.
        ValueError: ``val_rate`` out of range.
    """
    from pneumo_tf.evaluation import scoring

    if not 0.0 <= val_rate <= 0.5:
        raise ValueError(f"--ood_val_rate={val_rate} must be in [0, 0.5]")
    lungs = lungs_lib.LungModel(run_dir, batch_size)
    data_dir = data_dir or lungs.run.data_dir
    if not data_dir:
        raise rundir.RunDirError(f"{lungs.run} does not name its data dir; pass --data_dir")
    rundir.check_data_compatible(lungs.run, data_dir)
    parts = [film_statistics(lungs, batch["image"])
             for batch in scoring.iterate_split(data_dir, "val", batch_size)]
    if not parts:
        raise rundir.RunDirError(f"the val split of {data_dir} is empty; nothing to fit the "
                                 f"lung guard on")
    fractions = np.concatenate([f for f, _ in parts])
    confidences = np.concatenate([c for _, c in parts])
    threshold = float(np.quantile(confidences, val_rate))
    info = {"method": "min_lung_confidence: the val_rate quantile of the val films' lung "
                      "confidence (mean P(lung) over the pixels above 0.5)",
            "min_lung_confidence": threshold, "val_rate": val_rate,
            "val_flagged": float(np.mean(confidences < threshold)),
            "fitted_on": {"data_dir": str(os.path.abspath(data_dir)), "val": int(len(fractions))},
            "val_lung_confidence": _quantiles(confidences),
            "val_lung_fraction": _quantiles(fractions), "model_sha256": lungs.sha256}
    atomic_files.write_json_atomic(lungs.run.paths.lung_guard, info)
    return info


def load_guard(run: "rundir.Run") -> dict | None:
    """A lungs run's ``lung_guard.json``, or None (a run trained before the guard existed)."""
    path = run.paths.lung_guard
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Settings and the decision


@dataclasses.dataclass
class LungSettings:
    """The lung model a classifier (or a lungs export) serves with, and its thresholds.

    Attributes:
        path: the lungs run directory.
        sha256: of its ``model.keras``.
        image_size: its input side G, pixels.
        margin: the lung crop's margin (the data manifest's ``--lung_margin`` for a
            ``--crop=lungs`` run).
        crop_min_fraction: the lung share below which the lung crop takes the fixed box (the
            data manifest's ``--min_lung_fraction``).
        min_lung_fraction: the lung share below which a film is referred ``no_lungs_found``.
        min_lung_confidence: the lung confidence below which it is (None: not checked).
        confidence_source: where ``min_lung_confidence`` came from: ``lung_guard.json``,
            ``--min_lung_confidence`` or ``none``.
    """

    path: str
    sha256: str
    image_size: int
    margin: float = preprocess.DEFAULT_LUNG_MARGIN
    crop_min_fraction: float = preprocess.DEFAULT_MIN_LUNG_FRACTION
    min_lung_fraction: float = preprocess.DEFAULT_MIN_LUNG_FRACTION
    min_lung_confidence: float | None = None
    confidence_source: str = "none"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "LungSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


def settings_for(lungs: "lungs_lib.LungModel", crop_entry: dict | None = None,
                 min_lung_fraction: float | None = None,
                 min_lung_confidence: float | None = None) -> LungSettings:
    """The :class:`LungSettings` of ``lungs``.

    Args:
        lungs: the lung model.
        crop_entry: the data manifest's ``lung_model`` entry of a ``--crop=lungs`` run (its
            margin and fallback fraction), or None.
        min_lung_fraction: the refer threshold on the lung share (None: the default, 0.1).
        min_lung_confidence: the refer threshold on the lung confidence; None = the lungs
            run's guard (``lung_guard.json``; without one the confidence is not checked, and a
            warning says how to fit it).
    """
    crop_entry = crop_entry or {}
    source = "--min_lung_confidence"
    if min_lung_confidence is None:
        guard = load_guard(lungs.run)
        if guard is None:
            log.warning("%s has no %s: films are referred no_lungs_found on their lung share "
                        "alone, which a page of text or noise passes. Fit it with `python -m "
                        "pneumo_tf.ood --run_dir=%s`", lungs.path, rundir.LUNG_GUARD_NAME,
                        lungs.path)
            source = "none"
        else:
            min_lung_confidence, source = float(guard["min_lung_confidence"]), \
                rundir.LUNG_GUARD_NAME
    return LungSettings(
        path=lungs.describe()["path"], sha256=lungs.sha256, image_size=lungs.image_size,
        margin=float(crop_entry.get("margin", preprocess.DEFAULT_LUNG_MARGIN)),
        crop_min_fraction=float(crop_entry.get("min_lung_fraction",
                                               preprocess.DEFAULT_MIN_LUNG_FRACTION)),
        min_lung_fraction=float(preprocess.DEFAULT_MIN_LUNG_FRACTION if min_lung_fraction is None
                                else min_lung_fraction),
        min_lung_confidence=min_lung_confidence,
        confidence_source=source)


def lungs_found(fraction: float, confidence: float, settings: LungSettings) -> bool:
    """THE no-lungs decision: lung share and lung confidence at least their thresholds."""
    ok = fraction >= settings.min_lung_fraction
    if settings.min_lung_confidence is not None:
        ok = ok and confidence >= settings.min_lung_confidence
    return bool(ok)


# ---------------------------------------------------------------------------------------------
# In the graph


def tf_lung_summary(probabilities, settings: LungSettings) -> dict:
    """``lung_fraction``, ``lung_confidence`` (float32 ``[N]``) and ``lungs_found`` (bool
    ``[N]``, :func:`lungs_found`) of ``[N, G, G]`` lung maps; float32 only (TFLite)."""
    import tensorflow as tf

    p = tf.cast(probabilities, tf.float32)
    lung = tf.cast(p > preprocess.LUNG_PROBABILITY_THRESHOLD, tf.float32)
    count = tf.reduce_sum(lung, axis=[1, 2])
    fraction = tf.reduce_mean(lung, axis=[1, 2])
    confidence = tf.reduce_sum(p * lung, axis=[1, 2]) / tf.maximum(count, 1.0)
    found = fraction >= settings.min_lung_fraction
    if settings.min_lung_confidence is not None:
        found = tf.logical_and(found, confidence >= settings.min_lung_confidence)
    return {"lung_fraction": fraction, "lung_confidence": confidence, "lungs_found": found}


def tf_lung_outputs(unet, thumbnails, settings: LungSettings) -> dict:
    """Every lung output (:data:`LUNG_OUTPUTS`) of ``[N, G, G, 1]`` uint8 thumbnails:
    ``lung_mask`` ``[N, G, G]`` float32 P(lung), plus :func:`tf_lung_summary`."""
    import tensorflow as tf

    prob = tf.cast(unet(thumbnails, training=False), tf.float32)[..., 0]
    return {"lung_mask": prob, **tf_lung_summary(prob, settings)}


def lungs_signature(unet, settings: LungSettings):
    """The ``lungs`` signature of a SavedModel (and a lung TFLite model's ``serving_default``):
    ``image`` ``[N, G, G, 1]`` uint8 (a whole film squashed to G,
    :func:`pneumo_tf.image.preprocess.lung_thumbnail`) -> :func:`tf_lung_outputs`."""
    import tensorflow as tf

    g = settings.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, g, g, 1], tf.uint8, name="image")],
                 autograph=False)
    def serve(image):
        return tf_lung_outputs(unet, image, settings)

    return serve


def tf_input_lungs(unet, images, settings: LungSettings) -> dict:
    """:func:`tf_lung_summary` of model inputs ``[N, S, S, 1]`` uint8 resized (area) to the lung
    model's input: the lung share of what the classifier sees (the ``preprocessed``
    signatures never see the whole film)."""
    import tensorflow as tf

    g = settings.image_size
    resized = tf.image.resize(tf.cast(images, tf.float32), (g, g), method="area")
    thumbs = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    out = tf_lung_outputs(unet, thumbs, settings)
    out.pop("lung_mask")
    return out


def tf_film_lungs(unet, gray, settings: LungSettings) -> dict:
    """One decoded film ``[H, W, 1]`` uint8 through the lung model, in the graph: ``lung_mask``
    ``[G, G]`` float32 (on the film squashed to G,
    :func:`pneumo_tf.image.preprocess.tf_resize_area`), ``box`` ``[4]`` float64 and ``found``
    (the lung crop's, :func:`pneumo_tf.image.preprocess.tf_find_lungs` with the settings' margin
    and ``crop_min_fraction``)."""
    import tensorflow as tf

    thumb = preprocess.tf_resize_area(gray, settings.image_size)
    prob = tf.cast(unet(thumb[None], training=False), tf.float32)[..., 0]
    finding = preprocess.tf_find_lungs(prob, settings.margin, settings.crop_min_fraction)
    return {"lung_mask": prob[0], "box": finding["box"][0], "found": finding["found"][0]}


# ---------------------------------------------------------------------------------------------
# On the host


@dataclasses.dataclass
class HostLungs:
    """A lung model on the host, whatever runs it.

    Attributes:
        settings: its :class:`LungSettings`.
        probabilities: ``[N, G, G, 1]`` uint8 thumbnails -> ``[N, G, G]`` float32 P(lung).
        kind: ``keras``, ``saved_model`` or ``tflite``.
    """

    settings: LungSettings
    probabilities: Callable[[np.ndarray], np.ndarray]
    kind: str = "keras"

    def find(self, grays: list[np.ndarray]) -> list[preprocess.LungFinding]:
        """Each decoded film's :class:`pneumo_tf.image.preprocess.LungFinding` (the lung crop's
        margin and fallback fraction)."""
        if not grays:
            return []
        g = self.settings.image_size
        thumbs = np.stack([preprocess.lung_thumbnail(gray, g) for gray in grays])[..., None]
        return [preprocess.find_lungs(p, self.settings.margin, self.settings.crop_min_fraction)
                for p in self.probabilities(thumbs)]

    def found(self, finding: preprocess.LungFinding) -> bool:
        return lungs_found(finding.fraction, finding.confidence, self.settings)


def lung_rates(host: HostLungs, grays: list[np.ndarray], batch_size: int = 32) -> dict:
    """How often the lung guard refers decoded films (the path predict takes), and why.

    Returns:
        ``{"n", "no_lungs_found", "by_fraction", "by_confidence"}`` (fractions of ``grays``
        referred: by the rule, by the lung share alone, by the confidence alone; the last two
        overlap) and ``"lung_fraction"``, ``"lung_confidence"`` (min, p01, p05, median, max).
    """
    findings = [f for start in range(0, len(grays), batch_size)
                for f in host.find(grays[start:start + batch_size])]
    if not findings:
        return {"n": 0}
    s = host.settings
    fractions = np.array([f.fraction for f in findings])
    confidences = np.array([f.confidence for f in findings])
    low_confidence = (confidences < s.min_lung_confidence if s.min_lung_confidence is not None
                      else np.zeros(len(findings), bool))
    return {"n": len(findings),
            "no_lungs_found": float(np.mean([not host.found(f) for f in findings])),
            "by_fraction": float(np.mean(fractions < s.min_lung_fraction)),
            "by_confidence": float(np.mean(low_confidence)),
            "lung_fraction": _quantiles(fractions), "lung_confidence": _quantiles(confidences)}


def keras_lungs(lungs: "lungs_lib.LungModel", settings: LungSettings) -> HostLungs:
    return HostLungs(settings, lungs.grid_probabilities, "keras")


def saved_model_lungs(signature, settings: LungSettings) -> HostLungs:
    """A SavedModel's ``lungs`` signature (input ``image`` ``[N, G, G, 1]`` uint8)."""
    import tensorflow as tf

    def probabilities(thumbnails: np.ndarray) -> np.ndarray:
        return signature(image=tf.constant(thumbnails))["lung_mask"].numpy()

    return HostLungs(settings, probabilities, "saved_model")


def tflite_lungs(path: str | os.PathLike, settings: LungSettings) -> HostLungs:
    """A lung TFLite model (signature ``serving_default``, input ``image``)."""
    runner = TFLiteLungRunner(path)
    return HostLungs(settings, lambda thumbs: runner.outputs(thumbs)["lung_mask"], "tflite")


class TFLiteLungRunner:
    """A lung TFLite model on ``[N, G, G, 1]`` uint8 batches of any N: every output of
    :data:`LUNG_OUTPUTS` as numpy arrays."""

    def __init__(self, model_path_or_bytes):
        from pneumo_tf.serving import runtime

        self.interpreter = runtime.tflite_interpreter(model_path_or_bytes)
        self.runner = self.interpreter.get_signature_runner("serving_default")

    def outputs(self, thumbnails: np.ndarray) -> dict[str, np.ndarray]:
        from pneumo_tf.core import quiet_tf

        with quiet_tf.stderr_filtered():
            return {k: np.array(v) for k, v in
                    self.runner(image=np.asarray(thumbnails, np.uint8)).items()}


# ---------------------------------------------------------------------------------------------
# A run's lung model, and parity


@dataclasses.dataclass
class LungOptions:
    """What ``--lung_model``, ``--min_lung_fraction`` and ``--min_lung_confidence`` ask of export
    and predict (see :func:`for_run`); None: not given (the defaults, or what an exported model
    has baked in)."""

    lung_model: str | None = None
    min_lung_fraction: float | None = None
    min_lung_confidence: float | None = None

    def apply(self, settings: LungSettings) -> LungSettings:
        """``settings`` with the thresholds given here (an exported model's, overridden)."""
        changes = {}
        if self.min_lung_fraction is not None:
            changes["min_lung_fraction"] = float(self.min_lung_fraction)
        if self.min_lung_confidence is not None:
            changes.update(min_lung_confidence=float(self.min_lung_confidence),
                           confidence_source="--min_lung_confidence")
        return dataclasses.replace(settings, **changes)


def for_run(run: "rundir.Run", options: LungOptions | None = None
            ) -> tuple["lungs_lib.LungModel | None", LungSettings | None]:
    """The lung model a classifier run serves with and its settings, or ``(None, None)``.

    ``options.lung_model`` when given, else the one its ``--crop=lungs`` data was cropped with
    (:func:`pneumo_tf.modeling.lungs.lung_model_for_run`); the crop's margin and fallback
    fraction come from the data manifest.

    Raises:
        rundir.RunDirError: a lungs run given as the classifier, or an unusable lung model.
    """
    options = options or LungOptions()
    if run.task == lungs_lib.LUNGS_TASK:
        raise rundir.RunDirError(f"{run} is a lung model (--task=lungs), not a classifier; pass "
                                 f"a classifier run, with --lung_model={run}")
    lungs = lungs_lib.lung_model_for_run(run, options.lung_model)
    if lungs is None:
        return None, None
    entry = run.manifest.get("lung_model") if run.manifest.get("crop") == "lungs" else None
    return lungs, settings_for(lungs, entry, options.min_lung_fraction,
                               options.min_lung_confidence)


def parity_thumbnails(lungs: "lungs_lib.LungModel", count: int = 32, seed: int = 0
                      ) -> tuple[np.ndarray, str]:
    """``([n, G, G, 1] uint8, source)``: films to compare a lung model's variants on: the val
    split of the lungs run's data dir, else phantom radiographs squashed to G."""
    from pneumo_tf.data import phantoms, records
    from pneumo_tf.evaluation import scoring

    data_dir = lungs.run.data_dir
    if data_dir:
        try:
            rundir.check_data_compatible(lungs.run, data_dir)
            images = next(scoring.iterate_split(data_dir, "val", count), {}).get("image")
            if images is not None:
                return images, f"val split of {data_dir} ({len(images)} films)"
        except (records.DataDirError, rundir.RunDirError) as e:
            log.warning("lung parity batch: cannot use %s (%s)", data_dir, e)
    rng = np.random.default_rng(seed)
    films = []
    for i in range(count):
        h = int(rng.integers(256, 384))
        film = phantoms.generate_phantom(rng, i % 2, (h, int(h * rng.uniform(1.0, 1.4))))[0]
        films.append(preprocess.lung_thumbnail(film, lungs.image_size))
    return np.stack(films)[..., None], f"{count} phantom radiographs (no usable data dir)"


def lung_diffs(got: dict, reference: np.ndarray, settings: LungSettings) -> dict:
    """How a variant's lung outputs (``lung_mask`` ``[N, G, G]``, ...) agree with the Keras
    model's maps ``reference``: ``dice`` (mean over films of the Dice of the two masks above 0.5;
    1 where both are empty) and its ``min``, ``max_abs_prob_diff``, ``max_abs_fraction_diff``
    and ``lungs_found_agreement``."""
    from pneumo_tf.evaluation import metrics as pmetrics

    maps = np.asarray(got["lung_mask"], np.float64)
    ref = np.asarray(reference, np.float64)
    scores = pmetrics.mask_scores(ref > preprocess.LUNG_PROBABILITY_THRESHOLD, maps)
    findings = [preprocess.find_lungs(m, 0.0, 0.0) for m in ref]
    ref_fraction = np.array([f.fraction for f in findings])
    ref_found = np.array([lungs_found(f.fraction, f.confidence, settings) for f in findings])
    out = {"dice": float(np.mean(scores["dice"])), "min_dice": float(np.min(scores["dice"])),
           "max_abs_prob_diff": float(np.max(np.abs(maps - ref)))}
    if "lung_fraction" in got:
        out["max_abs_fraction_diff"] = float(np.max(np.abs(
            np.asarray(got["lung_fraction"], np.float64) - ref_fraction)))
    if "lungs_found" in got:
        out["lungs_found_agreement"] = float(np.mean(np.asarray(got["lungs_found"], bool)
                                                     == ref_found))
    return out
