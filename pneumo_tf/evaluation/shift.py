"""What moved between a run's validation split and another site's split: scores and films.

A library (no flags) for :mod:`pneumo_tf.evaluate`, which adds the result as ``shift`` to
``metrics.json`` when the evaluated data dir is not the run's own. Both splits are scored by the
same model and judged at the run's val operating point (``calibration.json``: its threshold on
the raw probability, its temperature), so every difference is the site's, not the operating
point's:

- ROC AUC on each with stratified bootstrap 95 % CIs, and their difference (evaluated minus
  reference) with a CI from independent resamples of the two splits
  (:func:`pneumo_tf.evaluation.metrics.auc_difference_ci`);
- sensitivity and specificity at the val threshold on each (with CIs);
- ECE on each, of the raw and of the val-temperature-scaled probability;
- per-class image statistics of the pixels the model was fed (:func:`image_statistics`): mean
  intensity and RMS contrast in grey levels, sharpness as the variance of the Laplacian.
"""

from __future__ import annotations

import cv2
import numpy as np

from pneumo_tf import CLASS_NAMES
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import metrics as pmetrics

# Per-image statistics, in the order reports show them: name -> (unit, what it is).
STATISTICS = {
    "mean_intensity": ("grey levels", "mean pixel value"),
    "contrast": ("grey levels", "RMS contrast: standard deviation of the pixel values"),
    "sharpness": ("grey levels^2", "variance of the 3x3 Laplacian"),
}


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image :data:`STATISTICS` of ``[N, S, S]`` or ``[N, S, S, 1]`` uint8 images.

    Returns:
        ``{name: [N] float64}``.
    """
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float64)
    sharpness = np.array([cv2.Laplacian(img.reshape(images.shape[1:3]), cv2.CV_64F, ksize=1).var()
                          for img in images], dtype=np.float64)
    return {"mean_intensity": flat.mean(axis=1), "contrast": flat.std(axis=1),
            "sharpness": sharpness}


def summarise_statistics(stats: dict[str, np.ndarray], labels) -> dict:
    """``{class name: {statistic: {"n", "mean", "std", "median"}}}`` of :func:`image_statistics`.

    A class without images gets ``None`` figures.
    """
    labels = np.asarray(labels)
    out = {}
    for label, name in enumerate(CLASS_NAMES):
        chosen = labels == label
        out[name] = {}
        for key in STATISTICS:
            values = np.asarray(stats[key])[chosen]
            out[name][key] = ({"n": int(values.size), "mean": float(values.mean()),
                               "std": float(values.std()), "median": float(np.median(values))}
                              if values.size else {"n": 0, "mean": None, "std": None,
                                                   "median": None})
    return out


def _statistics_shift(reference: dict, evaluated: dict) -> dict:
    """Per class and statistic: both summaries and the difference of means (evaluated - ref)."""
    ref = summarise_statistics(reference["statistics"], reference["label"])
    ev = summarise_statistics(evaluated["statistics"], evaluated["label"])
    out = {}
    for name in CLASS_NAMES:
        out[name] = {}
        for key in STATISTICS:
            a, b = ref[name][key], ev[name][key]
            diff = None if a["mean"] is None or b["mean"] is None else b["mean"] - a["mean"]
            out[name][key] = {"reference": a, "evaluated": b, "difference": diff}
    return out


def _side(sample: dict, threshold: float, temperature: float, num_resamples: int,
          seed: int) -> dict:
    """AUC, recalls at ``threshold`` and ECEs of one split, with CIs."""
    labels, probs = pmetrics._check(sample["label"], sample["probability"])  # noqa: SLF001
    calibrated = calibration.apply_temperature(probs, temperature)
    at = pmetrics.threshold_metrics(labels, probs, threshold)
    out = {"n": int(labels.size),
           "class_counts": {name: int(np.sum(labels == i)) for i, name in enumerate(CLASS_NAMES)},
           "roc_auc": pmetrics.ranking_metrics(labels, probs)["roc_auc"],
           "sensitivity": at["recall"], "specificity": at["specificity"],
           "ece": pmetrics.expected_calibration_error(labels, probs),
           "ece_calibrated": pmetrics.expected_calibration_error(labels, calibrated)}
    if labels.min() != labels.max():
        ci = pmetrics.bootstrap_ci(labels, probs, threshold, num_resamples, seed)
        out["ci95"] = {key: ci[key] for key in ("roc_auc", "sensitivity", "specificity")}
        out["ci95"]["ece"] = pmetrics.bootstrap_ece_ci(labels, probs, num_resamples, seed)
        out["ci95"]["ece_calibrated"] = pmetrics.bootstrap_ece_ci(labels, calibrated,
                                                                  num_resamples, seed)
    return out


def shift_report(reference: dict, evaluated: dict, threshold: float, temperature: float,
                 num_resamples: int = 2000, seed: int = 0) -> dict:
    """The ``shift`` entry of ``metrics.json`` (see the module docstring).

    Args:
        reference: the run's val split: ``{"label": [N], "probability": [N] raw,
            "statistics": image_statistics(...)}``.
        evaluated: the evaluated split, the same keys.
        threshold: the val operating threshold on the raw probability.
        temperature: the val temperature.
        num_resamples, seed: of the bootstrap CIs.

    Returns:
        ``{"reference": {n, class_counts, roc_auc, sensitivity, specificity, ece,
        ece_calibrated, ci95}, "evaluated": {...}, "difference": {the same metrics, evaluated
        minus reference}, "roc_auc_difference_ci95": [lo, hi] | None, "image_statistics":
        {class: {statistic: {"reference", "evaluated", "difference"}}}, "threshold",
        "temperature", "num_resamples", "seed"}``.
    """
    ref = _side(reference, threshold, temperature, num_resamples, seed)
    ev = _side(evaluated, threshold, temperature, num_resamples, seed)
    keys = ("roc_auc", "sensitivity", "specificity", "ece", "ece_calibrated")
    both = "ci95" in ref and "ci95" in ev
    auc_ci = pmetrics.auc_difference_ci(
        (reference["label"], reference["probability"]),
        (evaluated["label"], evaluated["probability"]), num_resamples, seed)["ci95"] if both \
        else None
    return {"reference": ref, "evaluated": ev,
            "difference": {key: float(ev[key] - ref[key]) for key in keys},
            "roc_auc_difference_ci95": auc_ci,
            "image_statistics": _statistics_shift(reference, evaluated),
            "threshold": float(threshold), "temperature": float(temperature),
            "num_resamples": int(num_resamples), "seed": int(seed)}
