"""Shift between a run's val split and another split: image statistics and the report entry."""

import cv2
import numpy as np
import pytest

from pneumo_tf.evaluation import metrics as pm
from pneumo_tf.evaluation import shift


def _films(rng, n, offset=0.0, blur=False):
    images = rng.normal(100, 20, (n, 24, 24)).clip(0, 255)
    if blur:
        images = np.stack([cv2.GaussianBlur(img, (5, 5), 1.5) for img in images])
    return (images + offset).clip(0, 255).astype(np.uint8)[..., None]


def test_image_statistics_by_hand():
    img = np.zeros((1, 4, 4, 1), np.uint8)
    img[0, :, 2:] = 100  # left half 0, right half 100
    stats = shift.image_statistics(img)
    assert stats["mean_intensity"][0] == pytest.approx(50.0)
    assert stats["contrast"][0] == pytest.approx(50.0)  # RMS contrast: std of {0, 100}
    lap = cv2.Laplacian(img[0, ..., 0], cv2.CV_64F, ksize=1)
    assert stats["sharpness"][0] == pytest.approx(lap.var()) and lap.var() > 0
    flat = shift.image_statistics(np.full((2, 4, 4), 7, np.uint8))
    assert flat["contrast"].tolist() == [0.0, 0.0] and flat["sharpness"].tolist() == [0.0, 0.0]


def test_known_shifts_show_with_the_right_sign():
    rng = np.random.default_rng(0)
    base = shift.image_statistics(_films(rng, 50))
    brighter = shift.image_statistics(_films(rng, 50, offset=30))
    blurred = shift.image_statistics(_films(rng, 50, blur=True))
    assert brighter["mean_intensity"].mean() - base["mean_intensity"].mean() == pytest.approx(
        30, abs=2)
    assert abs(brighter["contrast"].mean() - base["contrast"].mean()) < 2
    assert blurred["sharpness"].mean() < 0.2 * base["sharpness"].mean()
    assert blurred["contrast"].mean() < base["contrast"].mean()


def _sample(rng, n, separation, offset=0.0):
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    probs = np.clip(rng.normal(0.5 + separation * (labels - 0.5), 0.15), 0.001, 0.999)
    films = _films(rng, n, offset)
    return {"label": labels, "probability": probs, "statistics": shift.image_statistics(films)}


def test_shift_report_compares_both_splits_at_the_val_threshold():
    rng = np.random.default_rng(1)
    val, site = _sample(rng, 120, 0.5), _sample(rng, 80, 0.2, offset=25)
    report = shift.shift_report(val, site, threshold=0.5, temperature=1.5, num_resamples=1000)
    for side, sample in (("reference", val), ("evaluated", site)):
        entry = report[side]
        at = pm.threshold_metrics(sample["label"], sample["probability"], 0.5)
        assert entry["roc_auc"] == pytest.approx(
            pm.ranking_metrics(sample["label"], sample["probability"])["roc_auc"])
        assert entry["sensitivity"] == at["recall"] and entry["specificity"] == at["specificity"]
        assert entry["ece"] == pytest.approx(
            pm.expected_calibration_error(sample["label"], sample["probability"]))
        assert entry["ci95"]["roc_auc"][0] < entry["roc_auc"] < entry["ci95"]["roc_auc"][1]
    diff = report["difference"]["roc_auc"]
    assert diff == pytest.approx(report["evaluated"]["roc_auc"] - report["reference"]["roc_auc"])
    lo, hi = report["roc_auc_difference_ci95"]
    assert lo < diff < hi < 0  # a real drop
    stats = report["image_statistics"]
    for name in ("NORMAL", "PNEUMONIA"):
        entry = stats[name]["mean_intensity"]
        assert entry["difference"] == pytest.approx(25, abs=3)
        assert entry["difference"] == pytest.approx(
            entry["evaluated"]["mean"] - entry["reference"]["mean"])
    assert stats["NORMAL"]["mean_intensity"]["reference"]["n"] == 60
    assert report["threshold"] == 0.5 and report["temperature"] == 1.5


def test_a_single_class_split_has_no_auc_difference_interval():
    rng = np.random.default_rng(2)
    val = _sample(rng, 60, 0.5)
    normals = {k: (v[:30] if k != "statistics" else {s: a[:30] for s, a in v.items()})
               for k, v in _sample(rng, 60, 0.5).items()}
    report = shift.shift_report(val, normals, 0.5, 1.0, num_resamples=1000)
    assert report["roc_auc_difference_ci95"] is None and "ci95" not in report["evaluated"]
    assert report["image_statistics"]["PNEUMONIA"]["contrast"]["difference"] is None
