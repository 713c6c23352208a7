"""When a case goes to a human: the refer reasons, their one order, the film checks, the rule.

``predict`` (:func:`pneumo_tf.serving.predictor.result_record`) and the SavedModel's bytes
signature (:func:`pneumo_tf.serving.runtime.saved_model_outputs`) refer by the same rule
(:func:`decide`), written once for numpy and TensorFlow alike, on the same checks of the film:

- :data:`REFER_REASONS`: every reason, in the order a row lists them (a row lists a subset, in
  this order; the bytes signature's ``refer_reason_flags`` has one column each, in this order).
- The film checks (:func:`film_refer_reasons`: ``aspect_ratio``, ``blank``, ``underexposed``,
  ``overexposed``, ``low_resolution``): one rule (:func:`film_flags`) on a film's statistics,
  measured on the host (:func:`film_statistics`) or in the graph
  (:func:`tf_film_statistics`).
- The other checks come from their own stages: ``inverted`` and ``on_its_side``
  (:func:`pneumo_tf.serving.ood.film_orientation_reasons`), ``upside_down`` (the guard's probe),
  ``not_a_chest_film`` (the guard's feature score), ``no_lungs_found``
  (:func:`pneumo_tf.serving.lungs.lungs_found`); ``uncertain`` is the calibrated probability
  within the refer band of the threshold.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

UNCERTAIN = "uncertain"
ASPECT_RATIO = "aspect_ratio"
BLANK = "blank"
UNDEREXPOSED = "underexposed"
OVEREXPOSED = "overexposed"
LOW_RESOLUTION = "low_resolution"
INVERTED = "inverted"
ON_ITS_SIDE = "on_its_side"
UPSIDE_DOWN = "upside_down"            # the guard's probe reads the model input as upside down
NOT_A_CHEST_FILM = "not_a_chest_film"  # the guard's feature score is above its threshold
NO_LUNGS_FOUND = "no_lungs_found"      # the lung model finds no lungs it is sure of
FILM_REASONS = (ASPECT_RATIO, BLANK, UNDEREXPOSED, OVEREXPOSED, LOW_RESOLUTION)
# What is checked of an input before (or beside) the classifier: the inputs of decide().
CHECKS = FILM_REASONS + (INVERTED, ON_ITS_SIDE, UPSIDE_DOWN, NO_LUNGS_FOUND)
REFER_REASONS = (UNCERTAIN, *FILM_REASONS, INVERTED, ON_ITS_SIDE, UPSIDE_DOWN, NOT_A_CHEST_FILM,
                 NO_LUNGS_FOUND)
# refer_reasons of the bytes signature: the names of a row joined by this.
REASON_SEPARATOR = ","
# Half-width of the uncertainty band around the threshold, in calibrated probability.
DEFAULT_REFER_BAND = 0.1

# "Looks unlike a chest film" limits. Chosen to pass every one of the 1000 near-full-resolution
# Kermany train images (width/height 0.84-3.2, mean grey 67-183, grey std >= 27.6, at most 36 %
# of pixels <= 10 and 12.5 % >= 245) with a margin, and to catch blank, black, white, strip-shaped
# and tiny images. Measured at S = 224, fixed crop: 2 of those 1000 images are referred
# (low_resolution), 0 of 1044 from the third-party 224 px copy of the train split.
MIN_ASPECT, MAX_ASPECT = 0.6, 3.5  # width / height
MIN_GREY_STD = 10.0                # below: blank or near-constant
MIN_MEAN_GREY, MAX_MEAN_GREY = 40.0, 215.0
DARK_LEVEL, MAX_DARK_FRACTION = 10, 0.6
BRIGHT_LEVEL, MAX_BRIGHT_FRACTION = 245, 0.4
LOW_RESOLUTION_FACTOR = 2  # crop side * this < image_size -> upsampled > 2x


# ---------------------------------------------------------------------------------------------
# The film checks


def film_flags(stats: dict, image_size: int) -> dict:
    """THE film-likeness rule: ``{reason: flag}`` for :data:`FILM_REASONS` from a film's
    statistics (:func:`film_statistics` or :func:`tf_film_statistics`; numbers or tensors)."""
    return {ASPECT_RATIO: (stats["aspect"] < MIN_ASPECT) | (stats["aspect"] > MAX_ASPECT),
            BLANK: stats["std"] < MIN_GREY_STD,
            UNDEREXPOSED: (stats["mean"] < MIN_MEAN_GREY)
            | (stats["dark"] > MAX_DARK_FRACTION),
            OVEREXPOSED: (stats["mean"] > MAX_MEAN_GREY)
            | (stats["bright"] > MAX_BRIGHT_FRACTION),
            LOW_RESOLUTION: stats["crop_side"] * LOW_RESOLUTION_FACTOR < image_size}


def film_statistics(gray: np.ndarray, orig_hw: tuple[int, int], crop_hw: tuple[int, int]) -> dict:
    """What :func:`film_flags` reads of a decoded ``[h, w] uint8`` film (float64): ``aspect``
    (width / height of the full-resolution ``orig_hw``), grey ``mean`` and ``std``, the
    fractions ``dark`` (<= :data:`DARK_LEVEL`) and ``bright`` (>= :data:`BRIGHT_LEVEL`), and
    ``crop_side``, the crop's shorter side in full-resolution pixels (``crop_hw``)."""
    g = np.asarray(gray, np.float64)
    return {"aspect": orig_hw[1] / max(orig_hw[0], 1), "mean": float(g.mean()),
            "std": float(g.std()), "dark": float(np.mean(gray <= DARK_LEVEL)),
            "bright": float(np.mean(gray >= BRIGHT_LEVEL)), "crop_side": min(crop_hw)}


def tf_film_statistics(gray, orig_hw, crop_hw) -> dict:
    """In-graph twin of :func:`film_statistics` for one ``[h, w, 1] uint8`` film (``orig_hw``,
    ``crop_hw``: int32 scalar pairs); float64 scalars, as the host's."""
    import tensorflow as tf

    g = tf.cast(gray, tf.float64)
    height, width = (tf.cast(v, tf.float64) for v in orig_hw)
    return {"aspect": width / tf.maximum(height, 1.0), "mean": tf.reduce_mean(g),
            "std": tf.math.reduce_std(g),
            "dark": tf.reduce_mean(tf.cast(gray <= DARK_LEVEL, tf.float64)),
            "bright": tf.reduce_mean(tf.cast(gray >= BRIGHT_LEVEL, tf.float64)),
            "crop_side": tf.minimum(crop_hw[0], crop_hw[1])}


def film_refer_reasons(gray: np.ndarray, orig_height: int, orig_width: int,
                       crop_hw: tuple[int, int], image_size: int) -> list[str]:
    """Reasons an image looks unlike a usable chest film (empty list: none).

    Args:
        gray: ``[h, w] uint8`` decoded image (possibly DCT-reduced; statistics are scale-free).
        orig_height, orig_width: full-resolution size, pixels.
        crop_hw: the crop region's size in full-resolution pixels.
        image_size: model input side S.

    Returns:
        Subset of :data:`FILM_REASONS`, in that order: ``low_resolution`` is a crop less than
        S/2 on a side (upsampled more than 2x; the third-party 224 px Kermany copy, upsampled
        1.3x-1.7x by the fixed crop, passes).
    """
    flags = film_flags(film_statistics(gray, (orig_height, orig_width), crop_hw), image_size)
    return [reason for reason in FILM_REASONS if flags[reason]]


# ---------------------------------------------------------------------------------------------
# The rule


def decide(checks: dict, rejected, near_threshold, guarded: bool) -> dict:
    """THE refer rule, for numpy bools and TensorFlow bool tensors alike (scalars or ``[N]``;
    numpy values must be ``np.bool_`` or arrays, since ``~True`` is -2 in Python).

    Each reason is true of the input: ``upside_down`` only where the feature score accepts the
    input (the probe reads the features as a film's; a photo is not an upside-down film), and
    ``uncertain`` only for an input that gets a diagnosis (with a guard: in distribution).

    Args:
        checks: ``{name: flag}`` for every name of :data:`CHECKS` (false where not checked:
            no lung model, no probe).
        rejected: the guard's feature score is above its threshold (false without a guard).
        near_threshold: the calibrated probability is within the refer band of the threshold.
        guarded: the model has an OOD guard, so ``in_distribution`` is defined.

    Returns:
        ``{"in_distribution": flag (None without a guard): not rejected, not inverted, on its
        side or upside down; "reasons": {name: flag} for every name of :data:`REFER_REASONS`;
        "refer": any reason}``. An input out of distribution always has a reason, so it is
        always referred.
    """
    in_distribution = ~rejected & ~checks[INVERTED] & ~checks[ON_ITS_SIDE] & ~checks[UPSIDE_DOWN]
    reasons = {UNCERTAIN: near_threshold & in_distribution if guarded else near_threshold}
    reasons.update({name: checks[name] for name in FILM_REASONS + (INVERTED, ON_ITS_SIDE)})
    reasons.update({UPSIDE_DOWN: checks[UPSIDE_DOWN] & ~rejected, NOT_A_CHEST_FILM: rejected,
                    NO_LUNGS_FOUND: checks[NO_LUNGS_FOUND]})
    return {"in_distribution": in_distribution if guarded else None, "reasons": reasons,
            "refer": functools.reduce(operator.or_, reasons.values())}


def reason_names(reasons: dict) -> list[str]:
    """The names :func:`decide` flags for one input, in :data:`REFER_REASONS` order."""
    return [name for name in REFER_REASONS if reasons[name]]


def tf_refer_outputs(decided: dict) -> dict:
    """The bytes signature's refer outputs from :func:`decide` of ``[N]`` tensors: ``refer``
    ``[N]`` bool, ``refer_reason_flags`` ``[N, K]`` bool (a column per name of
    :data:`REFER_REASONS`, in that order) and ``refer_reasons`` ``[N]`` string (the flagged
    names joined by :data:`REASON_SEPARATOR` in that order, as :func:`reason_names`; empty
    where none)."""
    import tensorflow as tf

    flags = tf.stack([decided["reasons"][name] for name in REFER_REASONS], axis=1)
    names = tf.broadcast_to(tf.constant(REFER_REASONS), tf.shape(flags))
    joined = tf.strings.reduce_join(tf.ragged.boolean_mask(names, flags), axis=1,
                                    separator=REASON_SEPARATOR)
    return {"refer": decided["refer"], "refer_reason_flags": flags, "refer_reasons": joined}
