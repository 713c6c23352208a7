"""Binary classification metrics for the evaluation report (docs/protocol.md), and the
segmentation metrics of the lung model (:func:`mask_scores`, :func:`segmentation_report`).

scikit-learn computes the standard metrics; this module adds only what it lacks: the expected
calibration error and stratified bootstrap confidence intervals (vectorised over resamples, so
thousands of resamples of a 624-image test split take well under a second).

Conventions: ``labels`` are ``[N]`` ints (1 = PNEUMONIA, 0 = NORMAL); ``probs`` are ``[N]`` float
probabilities of PNEUMONIA; an image is predicted PNEUMONIA when ``prob >= threshold``.
"""

from __future__ import annotations

import math

import sys

import numpy as np

# sklearn (half a second to import) is imported inside the functions that use it, so
# the commands that import this module for their flags start without it.

from pneumo_tf import CLASS_NAMES, SUBTYPE_NAMES

# Keys of the bootstrap intervals in metrics.json (``ci95``). Per-class recall: NORMAL recall is
# the specificity, PNEUMONIA recall the sensitivity.
CI_METRICS = ("accuracy", "sensitivity", "specificity", "f1_macro", "roc_auc", "average_precision")
# Equal-width bins of the ECE and of the reliability diagram: one value, so the diagram's legend
# and metrics.json report the same number.
ECE_BINS = 15


def decide_label(probability, threshold):
    """THE threshold decision: 1 (PNEUMONIA) where ``probability >= threshold``, else 0.

    Every stage decides with it (metrics, evaluation, Grad-CAM groups, reports, the SavedModel,
    TFLite and ``predict``), so a probability and a threshold shown together always give the
    label shown. Serving decides on the calibrated probability with the threshold on that
    scale (:meth:`pneumo_tf.serving.runtime.ServingConfig.calibrated_threshold`).

    Args:
        probability: numpy values (any shape) or a TensorFlow tensor.
        threshold: on the same scale as ``probability``; a number or values broadcastable
            against it.

    Returns:
        int64 numpy values, or an int64 tensor for a tensor input (compared in its dtype).
    """
    tf = sys.modules.get("tensorflow")  # a tensor implies TensorFlow is imported already
    if tf is not None and tf.is_tensor(probability):
        threshold = tf.cast(threshold, probability.dtype)
        return tf.cast(probability >= threshold, tf.int64)
    return (np.asarray(probability) >= threshold).astype(np.int64)


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if labels.shape != probs.shape:
        raise ValueError(f"labels and probs differ in length: "
                         f"{labels.shape[0]} vs {probs.shape[0]}")
    if labels.size == 0:
        raise ValueError("no predictions to score (empty split?)")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {sorted(set(labels.tolist()))[:5]}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf (did the model diverge?)")
    return labels, probs


def threshold_metrics(labels, probs, threshold: float) -> dict:
    """Metrics that depend on the operating threshold.

    Returns:
        ``accuracy``, ``precision``, ``recall`` (= sensitivity), ``specificity``,
        ``recall_per_class`` and ``f1_per_class`` (``{"NORMAL": .., "PNEUMONIA": ..}``),
        ``f1_macro`` and ``confusion_matrix`` ``{tn, fp, fn, tp}``. Undefined ratios (no
        predicted positives, ...) are 0.0, as in scikit-learn with ``zero_division=0``.
    """
    from sklearn import metrics as skm

    labels, probs = _check(labels, probs)
    pred = decide_label(probs, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel().tolist()
    recall = skm.recall_score(labels, pred, labels=[0, 1], average=None, zero_division=0)
    f1 = skm.f1_score(labels, pred, labels=[0, 1], average=None, zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "precision": float(skm.precision_score(labels, pred, zero_division=0)),
        "recall": float(recall[1]),
        "specificity": float(recall[0]),
        "recall_per_class": {CLASS_NAMES[i]: float(recall[i]) for i in (0, 1)},
        "f1_per_class": {CLASS_NAMES[i]: float(f1[i]) for i in (0, 1)},
        "f1_macro": float(np.mean(f1)),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """The training history's metrics: accuracy, auc (ROC), pr_auc (average precision),
    precision and recall of ``probs`` at ``threshold``.

    The history's names for :func:`threshold_metrics` and :func:`ranking_metrics` (the
    evaluation report's definitions).

    Args:
        labels: ``[N]`` 0/1; probs: ``[N]`` probability of PNEUMONIA.

    Returns:
        Floats; a ranking metric is NaN when the labels hold only one class, every metric is NaN
        when a probability is NaN or infinite (the history records it instead of failing).
    """
    probs = np.asarray(probs, np.float64).reshape(-1)
    if not np.isfinite(probs).all():
        return dict.fromkeys(("accuracy", "precision", "recall", "auc", "pr_auc"), float("nan"))
    at = threshold_metrics(labels, probs, threshold)
    ranking = ranking_metrics(labels, probs)
    return {"accuracy": at["accuracy"], "precision": at["precision"], "recall": at["recall"],
            "auc": ranking["roc_auc"], "pr_auc": ranking["average_precision"]}


def subtype_epoch_metrics(subtypes, class_probs) -> dict[str, float]:
    """Per-class recall and one-vs-rest ROC AUC of the three-way head, over the known subtypes.

    Args:
        subtypes: ``[N]`` 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (skipped).
        class_probs: ``[N, 3]`` softmax probabilities.

    Returns:
        ``{"recall_NORMAL": .., "auc_NORMAL": .., ...}``; NaN where a class is absent.
    """
    from sklearn import metrics as skm
    from pneumo_tf.modeling.model import SUBTYPE_NAMES

    y = np.asarray(subtypes).astype(int).reshape(-1)
    p = np.asarray(class_probs, np.float64)
    known = y >= 0
    y, p = y[known], p[known]
    pred = np.argmax(p, axis=1)
    out = {}
    for c, name in enumerate(SUBTYPE_NAMES):
        is_c = y == c
        out[f"recall_{name}"] = float(np.mean(pred[is_c] == c)) if is_c.any() else float("nan")
        both = is_c.any() and (~is_c).any()
        out[f"auc_{name}"] = float(skm.roc_auc_score(is_c, p[:, c])) if both else float("nan")
    return out


def expected_calibration_error(labels, probs, num_bins: int = ECE_BINS) -> float:
    """ECE of the PNEUMONIA probability with ``num_bins`` equal-width bins on [0, 1].

    ``sum_b (n_b / N) * |mean(prob in b) - fraction of PNEUMONIA in b|``: the reliability
    diagram's average gap, weighted by bin population. Bins are half-open ``[lo, hi)`` except the
    last, which includes 1.0.
    """
    labels, probs = _check(labels, probs)
    bins = np.clip((probs * num_bins).astype(np.int64), 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    sum_prob = np.bincount(bins, weights=probs, minlength=num_bins)
    sum_pos = np.bincount(bins, weights=labels.astype(np.float64), minlength=num_bins)
    used = count > 0
    gap = np.abs(sum_prob[used] - sum_pos[used]) / count[used]
    return float(np.sum(gap * count[used]) / labels.size)


def reliability_curve(labels, probs, num_bins: int = ECE_BINS) -> dict:
    """Per-bin ``confidence``, ``frequency``, ``count`` ``[num_bins]`` (NaN in empty bins)."""
    labels, probs = _check(labels, probs)
    bins = np.clip((probs * num_bins).astype(np.int64), 0, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=probs, minlength=num_bins) / count
        freq = np.bincount(bins, weights=labels.astype(np.float64), minlength=num_bins) / count
    return {"confidence": conf, "frequency": freq, "count": count,
            "edges": np.linspace(0.0, 1.0, num_bins + 1)}


def ranking_metrics(labels, probs) -> dict:
    """Threshold-free metrics: ``roc_auc``, ``average_precision``, ``brier``, ``ece``.

    ROC AUC and AP are NaN when the labels hold a single class (they are undefined then).
    """
    from sklearn import metrics as skm

    labels, probs = _check(labels, probs)
    both = labels.min() != labels.max()
    return {
        "roc_auc": float(skm.roc_auc_score(labels, probs)) if both else float("nan"),
        "average_precision": float(skm.average_precision_score(labels, probs)) if both
        else float("nan"),
        "brier": float(skm.brier_score_loss(labels, probs)),
        "ece": expected_calibration_error(labels, probs),
    }


# ---------------------------------------------------------------------------------------------
# Stratified bootstrap, vectorised: a resample is a vector of multiplicities (how often each image
# was drawn), drawn per class so every resample keeps the split's class counts. Every statistic is
# then a weighted statistic of the original images, computed for all resamples at once.


def _auc_weighted(pos_scores, neg_scores, w_pos, w_neg) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties count 1/2) per resample; ``w_*`` are ``[R, n_*]`` counts."""
    order = np.argsort(neg_scores, kind="stable")
    neg_sorted = neg_scores[order]
    # cum[r, k] = drawn negatives among the k lowest-scored negatives.
    cum = np.concatenate([np.zeros((w_neg.shape[0], 1)), np.cumsum(w_neg[:, order], axis=1)],
                         axis=1)
    lo = np.searchsorted(neg_sorted, pos_scores, side="left")
    hi = np.searchsorted(neg_sorted, pos_scores, side="right")
    below = cum[:, lo]
    ties = cum[:, hi] - below
    wins = np.sum(w_pos * (below + 0.5 * ties), axis=1)
    return wins / (w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _ap_weighted(labels, probs, weights) -> np.ndarray:
    """Average precision (scikit-learn's step-wise definition) per resample; ``weights [R, N]``."""
    order = np.argsort(-probs, kind="stable")
    y = labels[order].astype(np.float64)
    s = probs[order]
    w = weights[:, order]
    tp = np.cumsum(w * y, axis=1)
    fp = np.cumsum(w * (1.0 - y), axis=1)
    # One operating point per distinct score: the last index of each run of tied scores.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, fp = tp[:, last], fp[:, last]
    total_pos = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    d_recall = np.diff(np.concatenate([np.zeros_like(total_pos), tp], axis=1), axis=1) / total_pos
    return np.sum(d_recall * precision, axis=1)


def _stratified_draws(labels: np.ndarray, num_resamples: int, seed: int):
    """``(pos, neg, w_pos [R, n_pos], w_neg [R, n_neg])``: per-class multiplicities of
    ``num_resamples`` stratified resamples (the same draws for the same labels and seed)."""
    pos = np.nonzero(labels == 1)[0]
    neg = np.nonzero(labels == 0)[0]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("a stratified bootstrap needs both classes in the split; "
                         f"got {pos.size} PNEUMONIA and {neg.size} NORMAL images")
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=num_resamples)
    w_neg = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=num_resamples)
    return pos, neg, w_pos.astype(np.float64), w_neg.astype(np.float64)


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2.0 * 100.0
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


def bootstrap_ci(labels, probs, threshold: float, num_resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Stratified percentile bootstrap confidence intervals of :data:`CI_METRICS`.

    Each resample draws ``n_pos`` PNEUMONIA and ``n_neg`` NORMAL images with replacement from the
    respective class (so AUC is always defined and the prevalence is fixed, as in the study design).

    Args:
        labels: ``[N]`` 0/1; both classes must be present.
        probs: ``[N]`` PNEUMONIA probabilities.
        threshold: operating threshold for the threshold-dependent metrics.
        num_resamples: bootstrap resamples (>= 1000 for a 95 % interval worth reporting).
        seed: seed of the resampling; same inputs and seed -> same intervals.
        level: coverage of the interval.

    Returns:
        ``{metric: [lo, hi]}`` for every :data:`CI_METRICS` entry, plus ``"num_resamples"``,
        ``"seed"`` and ``"level"``.
    """
    labels, probs = _check(labels, probs)
    pos, neg, w_pos, w_neg = _stratified_draws(labels, num_resamples, seed)
    pred_pos = decide_label(probs[pos], threshold)
    pred_neg = decide_label(probs[neg], threshold)
    tp = w_pos @ pred_pos
    fn = pos.size - tp
    fp = w_neg @ pred_neg
    tn = neg.size - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f1_neg = np.where(2 * tn + fn + fp > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    weights = np.zeros((num_resamples, labels.size))
    weights[:, pos] = w_pos
    weights[:, neg] = w_neg
    values = {
        "accuracy": (tp + tn) / labels.size,
        "sensitivity": tp / pos.size,
        "specificity": tn / neg.size,
        "f1_macro": (f1_pos + f1_neg) / 2.0,
        "roc_auc": _auc_weighted(probs[pos], probs[neg], w_pos, w_neg),
        "average_precision": _ap_weighted(labels, probs, weights),
    }
    out = {k: _percentiles(v, level) for k, v in values.items()}
    out.update(num_resamples=int(num_resamples), seed=int(seed), level=float(level))
    return out


def bootstrap_auc(labels, probs, num_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``[num_resamples]`` ROC AUCs of the stratified resamples :func:`bootstrap_ci` draws."""
    labels, probs = _check(labels, probs)
    pos, neg, w_pos, w_neg = _stratified_draws(labels, num_resamples, seed)
    return _auc_weighted(probs[pos], probs[neg], w_pos, w_neg)


def auc_difference_ci(reference: tuple, other: tuple, num_resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """ROC AUC of ``other`` minus that of ``reference``, two independent samples.

    Each sample is resampled on its own (stratified, :func:`bootstrap_auc`; the second with
    ``seed + 1``) and the percentile interval is taken of the resampled differences.

    Args:
        reference, other: ``(labels [N], probs [N])`` each, both classes present.

    Returns:
        ``{"difference": float, "ci95": [lo, hi], "num_resamples", "seed", "level"}``.
    """
    auc_ref = ranking_metrics(*reference)["roc_auc"]
    auc_other = ranking_metrics(*other)["roc_auc"]
    diffs = (bootstrap_auc(*other, num_resamples, seed + 1)
             - bootstrap_auc(*reference, num_resamples, seed))
    return {"difference": float(auc_other - auc_ref), "ci95": _percentiles(diffs, level),
            "num_resamples": int(num_resamples), "seed": int(seed), "level": float(level)}


def bootstrap_ece_ci(labels, probs, num_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, num_bins: int = ECE_BINS) -> list[float]:
    """Percentile interval ``[lo, hi]`` of the ECE over the resamples :func:`bootstrap_ci` draws.

    A resample's ECE is ``sum_b |sum of probs in b - PNEUMONIA count in b| / N`` with every
    image weighted by how often it was drawn (the ECE of :func:`expected_calibration_error`).
    """
    labels, probs = _check(labels, probs)
    pos, neg, w_pos, w_neg = _stratified_draws(labels, num_resamples, seed)
    weights = np.zeros((num_resamples, labels.size))
    weights[:, pos] = w_pos
    weights[:, neg] = w_neg
    bins = np.clip((probs * num_bins).astype(np.int64), 0, num_bins - 1)
    gap = np.zeros((labels.size, num_bins))
    gap[np.arange(labels.size), bins] = probs - labels  # one bin per image
    return _percentiles(np.abs(weights @ gap).sum(axis=1) / labels.size, level)


def binary_report(labels, probs, threshold: float, threshold_info: dict | None = None,
                  num_resamples: int = 2000, seed: int = 0) -> dict:
    """Everything ``metrics.json`` holds (the issue's key list), at ``threshold``.

    Args:
        labels: ``[N]`` 0/1.
        probs: ``[N]`` probabilities the threshold applies to (the model's raw probability).
        threshold: the operating threshold, chosen on validation.
        threshold_info: ``{"value", "method", "source"}`` stored as ``threshold``.
        num_resamples, seed: of :func:`bootstrap_ci`.
    """
    labels, probs = _check(labels, probs)
    out = {"n": int(labels.size),
           "class_counts": {CLASS_NAMES[0]: int((labels == 0).sum()),
                            CLASS_NAMES[1]: int((labels == 1).sum())}}
    out.update(threshold_metrics(labels, probs, threshold))
    out.update(ranking_metrics(labels, probs))
    out["ece_bins"] = ECE_BINS
    out["threshold"] = dict(threshold_info or {"value": float(threshold), "method": "given",
                                               "source": "argument"})
    out["at_0.5"] = threshold_metrics(labels, probs, 0.5)
    if labels.min() != labels.max():
        out["ci95"] = bootstrap_ci(labels, probs, threshold, num_resamples, seed, level=0.95)
    else:
        out["ci95"] = None
    return out


# ---------------------------------------------------------------------------------------------
# Two runs on the same images: paired differences and DeLong's test

DIFF_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")


def _stratified_weights(labels: np.ndarray, num_resamples: int, rng) -> tuple:
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("comparing runs needs both classes among the images")
    w_pos = rng.multinomial(pos.size, np.full(pos.size, 1.0 / pos.size), size=num_resamples)
    w_neg = rng.multinomial(neg.size, np.full(neg.size, 1.0 / neg.size), size=num_resamples)
    return pos, neg, w_pos.astype(np.float64), w_neg.astype(np.float64)


def _resampled_stats(probs, preds, pos, neg, w_pos, w_neg) -> dict[str, np.ndarray]:
    """:data:`DIFF_METRICS` per resample, from per-class resampling weights."""
    tp = w_pos @ preds[pos].astype(np.float64)
    tn = w_neg @ (1.0 - preds[neg].astype(np.float64))
    return {"roc_auc": _auc_weighted(probs[pos], probs[neg], w_pos, w_neg),
            "accuracy": (tp + tn) / (pos.size + neg.size),
            "sensitivity": tp / pos.size, "specificity": tn / neg.size}


def _point_stats(labels, probs, preds) -> dict[str, float]:
    from sklearn import metrics as skm

    labels, probs = _check(labels, probs)
    preds = np.asarray(preds).astype(bool)
    return {"roc_auc": float(skm.roc_auc_score(labels, probs)),
            "accuracy": float(np.mean(preds == labels)),
            "sensitivity": float(np.mean(preds[labels == 1])),
            "specificity": float(np.mean(~preds[labels == 0]))}


def delong_test(labels, probs_a, probs_b) -> dict:
    """DeLong's test of two correlated ROC AUCs (the same images scored by two models).

    The AUCs' covariance comes from the structural components of the Mann-Whitney statistic
    (DeLong, DeLong & Clarke-Pearson 1988), computed with mid-ranks (Sun & Xu 2014).

    Returns:
        ``{"auc_a", "auc_b", "difference" (b - a), "se", "z", "p_value" (two-sided),
        "ci95": [lo, hi]}`` (normal approximation).
    """
    from scipy.stats import rankdata  # scikit-learn's own dependency

    y = np.asarray(labels).astype(int).reshape(-1)
    scores = np.stack([np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both classes among the images")
    ranks_all = np.stack([rankdata(np.r_[p, q]) for p, q in zip(pos, neg)])
    ranks_pos = np.stack([rankdata(p) for p in pos])
    ranks_neg = np.stack([rankdata(q) for q in neg])
    auc = (ranks_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v_pos = (ranks_all[:, :m] - ranks_pos) / n          # [2, m]
    v_neg = 1.0 - (ranks_all[:, m:] - ranks_neg) / m    # [2, n]
    cov = np.cov(v_pos) / m + np.cov(v_neg) / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[1] - auc[0])
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else float("inf"))
    p_value = float(math.erfc(abs(z) / math.sqrt(2.0))) if np.isfinite(z) else 0.0
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "se": se,
            "z": float(z), "p_value": p_value, "ci95": [diff - 1.96 * se, diff + 1.96 * se]}


def paired_differences(labels, probs_a, preds_a, probs_b, preds_b, num_resamples: int = 2000,
                       seed: int = 0) -> dict:
    """Run b minus run a on the same images: :data:`DIFF_METRICS` with paired bootstrap CIs.

    Each resample draws the images once (stratified by class) and scores both runs on that
    draw, so what the two runs share (the images' difficulty) cancels out of the difference.
    ``preds_*`` are each run's decisions at its own operating threshold. DeLong's test is added
    for the AUC.

    Returns:
        ``{metric: {"a", "b", "difference", "ci95"}}``, plus ``"delong"`` and ``"paired": True``.
    """
    labels = np.asarray(labels).astype(int).reshape(-1)
    rng = np.random.default_rng(seed)
    pos, neg, w_pos, w_neg = _stratified_weights(labels, num_resamples, rng)
    res_a = _resampled_stats(np.asarray(probs_a, float), np.asarray(preds_a), pos, neg, w_pos,
                             w_neg)
    res_b = _resampled_stats(np.asarray(probs_b, float), np.asarray(preds_b), pos, neg, w_pos,
                             w_neg)
    out = _difference_table(_point_stats(labels, probs_a, preds_a),
                            _point_stats(labels, probs_b, preds_b), res_a, res_b)
    out["delong"] = delong_test(labels, probs_a, probs_b)
    return {**out, "paired": True, "num_resamples": int(num_resamples), "seed": int(seed)}


def unpaired_differences(run_a: tuple, run_b: tuple, num_resamples: int = 2000,
                         seed: int = 0) -> dict:
    """Run b minus run a on different images: independent bootstraps of each run.

    Args:
        run_a, run_b: ``(labels, probs, preds)`` of each run's own images.
    """
    rng = np.random.default_rng(seed)
    points, resampled = [], []
    for labels, probs, preds in (run_a, run_b):
        labels = np.asarray(labels).astype(int).reshape(-1)
        pos, neg, w_pos, w_neg = _stratified_weights(labels, num_resamples, rng)
        points.append(_point_stats(labels, probs, preds))
        resampled.append(_resampled_stats(np.asarray(probs, float), np.asarray(preds), pos, neg,
                                          w_pos, w_neg))
    out = _difference_table(points[0], points[1], resampled[0], resampled[1])
    return {**out, "paired": False, "num_resamples": int(num_resamples), "seed": int(seed)}


def _difference_table(point_a: dict, point_b: dict, res_a: dict, res_b: dict) -> dict:
    out = {}
    for key in DIFF_METRICS:
        diff = res_b[key] - res_a[key]
        out[key] = {"a": point_a[key], "b": point_b[key],
                    "difference": point_b[key] - point_a[key],
                    "ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]}
    return out


# ---------------------------------------------------------------------------------------------
# The three-class task (NORMAL / BACTERIAL / VIRAL): the operating point, the report section


def subtype_decisions(probs, class_probs, threshold: float) -> np.ndarray:
    """``[N]`` predicted class at the operating point: 0 (NORMAL) where the pneumonia
    probability is below ``threshold`` (the binary decision, unchanged), else 1 (BACTERIAL) or
    2 (VIRAL), whichever of the two pneumonia probabilities is larger (a tie: BACTERIAL).

    Args:
        probs: ``[N]`` P(PNEUMONIA) (``1 - p(NORMAL)``), the scale ``threshold`` applies to.
        class_probs: ``[N, 3]`` probabilities or logits (only the order of columns 1 and 2
            matters, which a temperature does not change).
    """
    p = np.asarray(probs, np.float64).reshape(-1)
    c = np.asarray(class_probs, np.float64)
    return np.where(decide_label(p, threshold) == 1, np.where(c[:, 1] >= c[:, 2], 1, 2),
                    0).astype(np.int64)


def _per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 ``[..., 3]`` of confusion matrices ``[..., 3, 3]`` (rows: true
    class, columns: predicted); undefined ratios are 0.0 (scikit-learn's zero_division=0)."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    predicted, true = cm.sum(axis=-2), cm.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(predicted + true > 0, 2 * tp / (predicted + true), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def _class_draws(y: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """``[R, N]`` multiplicities of resamples stratified by class (each class keeps its count)."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((num_resamples, y.size))
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        weights[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size),
                                          size=num_resamples)
    return weights


def _subtype_auc(is_pos: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None):
    """ROC AUC of ``scores`` for ``is_pos`` (NaN / None without both), or ``[R]`` resampled."""
    from sklearn import metrics as skm

    if is_pos.all() or not is_pos.any():
        return float("nan") if weights is None else None
    if weights is None:
        return float(skm.roc_auc_score(is_pos, scores))
    return _auc_weighted(scores[is_pos], scores[~is_pos], weights[:, is_pos], weights[:, ~is_pos])


def _bacterial_vs_viral(y, class_logits, weights, level: float) -> dict:
    """Among images of known pneumonia subtype: AUC of ``z_viral - z_bacterial`` for VIRAL
    and the accuracy of the larger of the two, with bootstrap CIs (the resamples' columns)."""
    pneumonia = (y == 1) | (y == 2)
    yp, z, w = y[pneumonia], np.asarray(class_logits, np.float64)[pneumonia], weights[:, pneumonia]
    out = {"n": int(yp.size), "class_counts": {SUBTYPE_NAMES[c]: int((yp == c).sum())
                                                for c in (1, 2)}, "positive": "VIRAL"}
    if yp.size == 0:
        return {**out, "auc": float("nan"), "accuracy": float("nan"), "ci95": None}
    score = z[:, 2] - z[:, 1]
    correct = (np.where(z[:, 1] >= z[:, 2], 1, 2) == yp).astype(np.float64)
    auc = _subtype_auc(yp == 2, score, w)
    return {**out, "auc": _subtype_auc(yp == 2, score), "accuracy": float(correct.mean()),
            "ci95": {"auc": _percentiles(auc, level) if auc is not None else None,
                     "accuracy": _percentiles(w @ correct / w.sum(axis=1), level)}}


def subtype_report(subtypes, probs, class_logits, threshold: float, num_resamples: int = 2000,
                   seed: int = 0, level: float = 0.95) -> dict:
    """``metrics.json``'s ``subtype`` section over the images of known subtype.

    Args:
        subtypes: ``[N]`` 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (left out).
        probs: ``[N]`` raw P(PNEUMONIA) of the model, the scale ``threshold`` applies to.
        class_logits: ``[N, 3]`` the ``class_logits`` layer's outputs.
        threshold: the binary operating threshold (:func:`subtype_decisions`).
        num_resamples, seed, level: of the bootstrap, stratified by true subtype.

    Returns:
        ``{"n", "unknown", "class_counts", "labels", "confusion_matrix" (3 rows of true class,
        3 counts of predicted class), "NORMAL" / "BACTERIAL" / "VIRAL": {"precision", "recall",
        "f1", "auc" (one-vs-rest, of the model's softmax), "n"}, "macro_f1",
        "bacterial_vs_viral": {"n", "class_counts", "positive", "auc", "accuracy", "ci95"},
        "ci95": {class: {metric: [lo, hi]}, "macro_f1": [lo, hi], ...}}``, or ``{"skipped":
        reason}`` when no image has a known subtype.
    """
    from sklearn import metrics as skm

    y_all = np.asarray(subtypes).astype(np.int64).reshape(-1)
    known = y_all >= 0
    if not known.any():
        return {"skipped": "no image of the split has a known subtype (a version-1 data dir, "
                           "or a source whose file names do not say bacteria / virus)"}
    y, z = y_all[known], np.asarray(class_logits, np.float64)[known]
    class_probs = np.exp(z - z.max(axis=1, keepdims=True))
    class_probs /= class_probs.sum(axis=1, keepdims=True)
    pred = subtype_decisions(np.asarray(probs, np.float64).reshape(-1)[known], z, threshold)
    cm = skm.confusion_matrix(y, pred, labels=[0, 1, 2])
    weights = _class_draws(y, num_resamples, seed)
    pairs = np.zeros((y.size, 9))
    pairs[np.arange(y.size), y * 3 + pred] = 1.0
    point, resampled = _per_class(cm.astype(np.float64)), _per_class(
        (weights @ pairs).reshape(-1, 3, 3))
    out = {"n": int(y.size), "unknown": int((~known).sum()),
           "class_counts": {name: int((y == c).sum()) for c, name in enumerate(SUBTYPE_NAMES)},
           "labels": list(SUBTYPE_NAMES), "confusion_matrix": cm.tolist()}
    ci = {"num_resamples": int(num_resamples), "seed": int(seed), "level": float(level)}
    for c, name in enumerate(SUBTYPE_NAMES):
        out[name] = {key: float(point[key][c]) for key in ("precision", "recall", "f1")}
        out[name].update(auc=_subtype_auc(y == c, class_probs[:, c]), n=int((y == c).sum()))
        ci[name] = {key: _percentiles(resampled[key][:, c], level)
                    for key in ("precision", "recall", "f1")}
        auc = _subtype_auc(y == c, class_probs[:, c], weights)
        ci[name]["auc"] = _percentiles(auc, level) if auc is not None else None
    out["macro_f1"] = float(point["f1"].mean())
    ci["macro_f1"] = _percentiles(resampled["f1"].mean(axis=1), level)
    out["bacterial_vs_viral"] = _bacterial_vs_viral(y, z, weights, level)
    out["ci95"] = ci
    return out


# ---------------------------------------------------------------------------------------------
# Segmentation (lung masks): per-image Dice and IoU, bootstrap over images.

SEGMENTATION_METRICS = ("dice", "iou")


def _as_masks(masks, threshold: float) -> np.ndarray:
    """``[N, H, W(, 1)]`` bool/0-1/0-255/probabilities -> ``[N, H*W]`` bool (``> threshold``
    for floats in [0, 1], ``> 0`` for bools and integers)."""
    a = np.asarray(masks)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"masks must be [N, H, W] or [N, H, W, 1], got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("no masks: Dice and IoU need at least one image")
    a = a > threshold if np.issubdtype(a.dtype, np.floating) else a > 0
    return a.reshape(a.shape[0], -1)


def mask_scores(true_masks, pred_masks, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Dice and IoU of each image's predicted mask against its true mask.

    ``dice = 2 |T & P| / (|T| + |P|)``, ``iou = |T & P| / |T | P|``; both are 1 when both masks
    are empty (nothing to find, nothing found) and 0 when exactly one is.

    Args:
        true_masks: ``[N, H, W]`` or ``[N, H, W, 1]`` true masks (bool, 0/1 or 0/255).
        pred_masks: the same shape: masks, or float probabilities cut at ``threshold``.
        threshold: a float mask is inside where it is ``> threshold``.

    Returns:
        ``{"dice": [N] float64, "iou": [N] float64}``.
    """
    t, p = _as_masks(true_masks, threshold), _as_masks(pred_masks, threshold)
    if t.shape != p.shape:
        raise ValueError(f"true masks {t.shape} and predicted masks {p.shape} differ in shape")
    inter = np.sum(t & p, axis=1).astype(np.float64)
    sizes = np.sum(t, axis=1) + np.sum(p, axis=1).astype(np.float64)
    union = np.sum(t | p, axis=1).astype(np.float64)
    both_empty = union == 0
    dice = np.where(both_empty, 1.0, 2.0 * inter / np.maximum(sizes, 1.0))
    iou = np.where(both_empty, 1.0, inter / np.maximum(union, 1.0))
    return {"dice": dice, "iou": iou}


def segmentation_report(true_masks, pred_masks, threshold: float = 0.5,
                        num_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean Dice and IoU over images with percentile bootstrap intervals (images resampled).

    Args:
        true_masks, pred_masks, threshold: as :func:`mask_scores`.
        num_resamples, seed, level: of the bootstrap (same inputs and seed -> same intervals).

    Returns:
        ``{"dice": mean, "iou": mean, "ci95": {"dice": [lo, hi], "iou": [lo, hi],
        "num_resamples", "seed", "level"}, "n": images}``; the key is ``ci95`` whatever
        ``level`` is, as in :func:`binary_report`.

    Raises:
        ValueError: no images, or shapes that differ.
    """
    scores = mask_scores(true_masks, pred_masks, threshold)
    n = scores["dice"].size
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples)  # [R, N] multiplicities
    ci = {k: _percentiles(draws @ scores[k] / n, level) for k in SEGMENTATION_METRICS}
    ci.update(num_resamples=int(num_resamples), seed=int(seed), level=float(level))
    return {**{k: float(np.mean(scores[k])) for k in SEGMENTATION_METRICS}, "ci95": ci, "n": n}
