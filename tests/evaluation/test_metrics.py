"""Metrics against hand-computed cases; the vectorised bootstrap against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from pneumo_tf import SUBTYPE_NAMES
from pneumo_tf.evaluation import metrics as pm


def test_perfect_classifier():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    r = pm.binary_report(labels, probs, 0.5, num_resamples=1000)
    assert r["n"] == 5
    for key in ("accuracy", "precision", "recall", "specificity", "f1_macro", "roc_auc",
                "average_precision"):
        assert r[key] == pytest.approx(1.0), key
    assert r["confusion_matrix"] == {"tn": 3, "fp": 0, "fn": 0, "tp": 2}
    # Brier by hand: (0.01 + 0.04 + 0.09 + 0.04 + 0.01) / 5
    assert r["brier"] == pytest.approx(0.19 / 5)
    assert r["ci95"]["roc_auc"] == [1.0, 1.0]
    assert r["ci95"]["accuracy"] == [1.0, 1.0]


def test_random_classifier_auc_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20000)
    probs = rng.random(20000)
    r = pm.ranking_metrics(labels, probs)
    assert r["roc_auc"] == pytest.approx(0.5, abs=0.015)
    assert r["average_precision"] == pytest.approx(labels.mean(), abs=0.015)
    t = pm.threshold_metrics(labels, probs, 0.5)
    assert t["accuracy"] == pytest.approx(0.5, abs=0.015)
    assert t["recall"] == pytest.approx(0.5, abs=0.015)


def test_hand_worked_confusion_matrix():
    # threshold 0.5: preds  1 1 0 0 | 1 0 0 0 0 0  -> labels 1 1 1 1 | 0 0 0 0 0 0
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.3, 0.1, 0.1, 0.2, 0.05])
    t = pm.threshold_metrics(labels, probs, 0.5)
    assert t["confusion_matrix"] == {"tn": 5, "fp": 1, "fn": 2, "tp": 2}
    assert t["accuracy"] == pytest.approx(0.7)
    assert t["precision"] == pytest.approx(2 / 3)
    assert t["recall"] == pytest.approx(0.5)
    assert t["specificity"] == pytest.approx(5 / 6)
    f1_pos = 2 * 2 / (2 * 2 + 1 + 2)       # 4/7
    f1_neg = 2 * 5 / (2 * 5 + 2 + 1)       # 10/13
    assert t["f1_per_class"]["PNEUMONIA"] == pytest.approx(f1_pos)
    assert t["f1_per_class"]["NORMAL"] == pytest.approx(f1_neg)
    assert t["f1_macro"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert t["recall_per_class"] == {"NORMAL": pytest.approx(5 / 6), "PNEUMONIA": 0.5}
    # threshold is inclusive: prob == threshold is PNEUMONIA
    assert pm.threshold_metrics(labels, probs, 0.6)["confusion_matrix"]["tp"] == 2
    # AUC by hand over 4 x 6 pairs: positive 0.9 beats 6 negatives, 0.6 beats 5, 0.4 beats 5,
    # 0.2 beats 3 and ties one (counts 1/2).
    assert pm.ranking_metrics(labels, probs)["roc_auc"] == pytest.approx((6 + 5 + 5 + 3.5) / 24)


def test_ece_known_case():
    # Bin [0.2, 0.2667): 4 images at 0.25, one positive -> gap 0; bin of 0.8: 4 images, 4
    # positives -> gap 0.2. ECE = (4 * 0 + 4 * 0.2) / 8 = 0.1.
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.25] * 4 + [0.8] * 4)
    assert pm.expected_calibration_error(labels, probs) == pytest.approx(0.1)
    # Perfectly calibrated in every bin
    assert pm.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    # Probability exactly 1.0 falls in the last bin (no index error)
    assert pm.expected_calibration_error([0], [1.0]) == pytest.approx(1.0)


def test_bootstrap_statistics_match_sklearn_with_counts():
    """The vectorised AUC/AP per resample equal scikit-learn with the resample's multiplicities."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30, int), np.ones(50, int)]
    probs = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)  # many ties
    pos, neg = np.nonzero(labels == 1)[0], np.nonzero(labels == 0)[0]
    w_pos = rng.multinomial(50, np.full(50, 1 / 50), size=5).astype(float)
    w_neg = rng.multinomial(30, np.full(30, 1 / 30), size=5).astype(float)
    weights = np.zeros((5, 80))
    weights[:, pos], weights[:, neg] = w_pos, w_neg
    auc = pm._auc_weighted(probs[pos], probs[neg], w_pos, w_neg)
    ap = pm._ap_weighted(labels, probs, weights)
    for r in range(5):
        assert auc[r] == pytest.approx(skm.roc_auc_score(labels, probs, sample_weight=weights[r]))
        assert ap[r] == pytest.approx(
            skm.average_precision_score(labels, probs, sample_weight=weights[r]))


def test_bootstrap_ci_contains_estimate_seeded_and_fast():
    import time

    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(234, int), np.ones(390, int)]  # the official test split's shape
    probs = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    t0 = time.perf_counter()
    ci = pm.bootstrap_ci(labels, probs, 0.5, num_resamples=2000, seed=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0
    point = {**pm.ranking_metrics(labels, probs), **pm.threshold_metrics(labels, probs, 0.5)}
    point["sensitivity"], point["f1_macro"] = point["recall"], point["f1_macro"]
    for key in pm.CI_METRICS:
        lo, hi = ci[key]
        assert lo < point[key] < hi, key
        assert hi - lo < 0.15, key
    assert ci == pm.bootstrap_ci(labels, probs, 0.5, num_resamples=2000, seed=3)
    assert ci != pm.bootstrap_ci(labels, probs, 0.5, num_resamples=2000, seed=4)
    assert ci["num_resamples"] == 2000


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="both classes"):
        pm.bootstrap_ci([1, 1, 1], [0.2, 0.5, 0.9], 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        pm.threshold_metrics([0, 1], [0.5], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        pm.ranking_metrics([0, 1], [0.5, np.nan])
    with pytest.raises(ValueError, match="0/1"):
        pm.ranking_metrics([0, 2], [0.5, 0.5])


def test_reliability_legend_uses_the_metrics_json_bins():
    """The diagram's ECE equals metrics.json's ECE (one bin count, :data:`ECE_BINS`)."""
    from pneumo_tf.evaluation import report

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(0.6 * labels + rng.normal(0.2, 0.2, 400), 0.0, 1.0)
    ece = pm.binary_report(labels, probs, 0.5, num_resamples=1000)["ece"]
    # The bin count matters for this data, so a diagram with other bins would show another ECE.
    assert f"{pm.expected_calibration_error(labels, probs, 10):.3f}" != f"{ece:.3f}"
    fig = report.reliability_figure(labels, probs, probs)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    report.plt.close(fig)
    assert f"before (ECE = {ece:.3f})" in legend, legend
    table = report.metrics_table_markdown(pm.binary_report(labels, probs, 0.5,
                                                           num_resamples=1000))
    assert f"| ECE ({pm.ECE_BINS} bins) |" in table


def test_delong_matches_the_direct_structural_components():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.5).astype(int)
    a = np.round(y * rng.normal(1, 1, 200) + rng.normal(0, 1, 200), 1)  # ties on purpose
    b = np.round(y * rng.normal(2, 1, 200) + rng.normal(0, 1, 200), 1)
    got = pm.delong_test(y, a, b)

    def psi(x, z):
        return (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])

    comps = [psi(s[y == 1], s[y == 0]) for s in (a, b)]
    v10 = np.stack([c.mean(axis=1) for c in comps])
    v01 = np.stack([c.mean(axis=0) for c in comps])
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    want_se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert got["auc_a"] == pytest.approx(comps[0].mean())
    assert got["auc_b"] == pytest.approx(comps[1].mean())
    assert got["se"] == pytest.approx(want_se)
    assert got["p_value"] == pytest.approx(math.erfc(abs(got["z"]) / math.sqrt(2)))


def _shifted_sample(rng, n0, n1, separation):
    labels = np.r_[np.zeros(n0, int), np.ones(n1, int)]
    return labels, np.clip(rng.normal(0.5 + separation * (labels - 0.5), 0.15), 0, 1)


def test_bootstrap_auc_draws_the_resamples_of_bootstrap_ci():
    labels, probs = _shifted_sample(np.random.default_rng(6), 40, 60, 0.3)
    aucs = pm.bootstrap_auc(labels, probs, num_resamples=1000, seed=2)
    assert aucs.shape == (1000,)
    ci = pm.bootstrap_ci(labels, probs, 0.5, num_resamples=1000, seed=2)
    assert [np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)] == pytest.approx(ci["roc_auc"])


def test_auc_difference_ci_sees_a_real_drop_and_not_a_null_one():
    rng = np.random.default_rng(7)
    val = _shifted_sample(rng, 100, 100, 0.5)
    drop = _shifted_sample(rng, 100, 100, 0.15)
    same = _shifted_sample(rng, 100, 100, 0.5)
    d = pm.auc_difference_ci(val, drop, num_resamples=1000, seed=0)
    expected = skm.roc_auc_score(*drop) - skm.roc_auc_score(*val)
    assert d["difference"] == pytest.approx(expected) and expected < -0.1
    assert d["ci95"][0] < d["difference"] < d["ci95"][1] < 0  # the drop is certain
    null = pm.auc_difference_ci(val, same, num_resamples=1000, seed=0)
    assert null["ci95"][0] < 0 < null["ci95"][1]
    assert d == pm.auc_difference_ci(val, drop, num_resamples=1000, seed=0)  # seeded


def test_bootstrap_ece_ci_is_the_ece_of_each_resample():
    labels, probs = _shifted_sample(np.random.default_rng(8), 30, 50, 0.4)
    lo, hi = pm.bootstrap_ece_ci(labels, probs, num_resamples=1000, seed=4)
    # By hand: the same draws, each resample's images repeated by their multiplicity.
    pos, neg, w_pos, w_neg = pm._stratified_draws(labels, 1000, 4)
    eces = []
    for r in range(1000):
        idx = np.r_[np.repeat(pos, w_pos[r].astype(int)), np.repeat(neg, w_neg[r].astype(int))]
        eces.append(pm.expected_calibration_error(labels[idx], probs[idx]))
    assert [lo, hi] == pytest.approx([np.percentile(eces, 2.5), np.percentile(eces, 97.5)])
    assert lo < pm.expected_calibration_error(labels, probs) < hi


def _subtype_sample(seed=0, n=300):
    """Subtypes with logits that mostly point at the true class; a few unknown (-1)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.3, 0.45, 0.25])
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 2.0
    y[:7] = -1
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = 1 - e[:, 0] / e.sum(axis=1)
    return y, probs, logits


def test_subtype_report_counts_the_operating_point_decisions():
    y, probs, logits = _subtype_sample()
    out = pm.subtype_report(y, probs, logits, 0.5, num_resamples=500)
    known = y >= 0
    pred = np.where(probs >= 0.5, np.where(logits[:, 1] >= logits[:, 2], 1, 2), 0)[known]
    cm = skm.confusion_matrix(y[known], pred, labels=[0, 1, 2])
    assert out["confusion_matrix"] == cm.tolist() and out["labels"] == list(SUBTYPE_NAMES)
    assert out["n"] == known.sum() and out["unknown"] == 7
    p, r, f1, _ = skm.precision_recall_fscore_support(y[known], pred, labels=[0, 1, 2])
    for c, name in enumerate(SUBTYPE_NAMES):
        entry = out[name]
        assert (entry["precision"], entry["recall"], entry["f1"]) == pytest.approx(
            (p[c], r[c], f1[c]))
        assert entry["n"] == (y == c).sum()
        e = np.exp(logits[known] - logits[known].max(axis=1, keepdims=True))
        auc = skm.roc_auc_score(y[known] == c, (e / e.sum(axis=1, keepdims=True))[:, c])
        assert entry["auc"] == pytest.approx(auc)
        for key in ("precision", "recall", "f1", "auc"):
            lo, hi = out["ci95"][name][key]
            assert lo <= entry[key] <= hi, (name, key)
    assert out["macro_f1"] == pytest.approx(np.mean(f1))
    lo, hi = out["ci95"]["macro_f1"]
    assert lo <= out["macro_f1"] <= hi


def test_bacterial_vs_viral_is_among_pneumonia_cases_only():
    y, probs, logits = _subtype_sample(seed=1)
    # A threshold of 1: every image is called NORMAL, yet bacterial vs viral is unchanged.
    out = pm.subtype_report(y, probs, logits, 1.01, num_resamples=500)
    assert out["BACTERIAL"]["recall"] == 0 and out["VIRAL"]["recall"] == 0
    bv = out["bacterial_vs_viral"]
    pn = (y == 1) | (y == 2)
    assert bv["n"] == pn.sum() and bv["positive"] == "VIRAL"
    assert bv["class_counts"] == {"BACTERIAL": (y == 1).sum(), "VIRAL": (y == 2).sum()}
    score = logits[pn, 2] - logits[pn, 1]
    assert bv["auc"] == pytest.approx(skm.roc_auc_score(y[pn] == 2, score))
    assert bv["accuracy"] == pytest.approx(np.mean(np.where(score > 0, 2, 1) == y[pn]))
    for key in ("auc", "accuracy"):
        assert bv["ci95"][key][0] <= bv[key] <= bv["ci95"][key][1]


def test_subtype_report_without_known_subtypes_is_skipped():
    out = pm.subtype_report([-1, -1], [0.2, 0.9], np.zeros((2, 3)), 0.5)
    assert set(out) == {"skipped"}


# ---------------------------------------------------------------------------------------------
# Segmentation: Dice and IoU


def test_mask_scores_by_hand():
    t = np.zeros((4, 4, 4), bool)
    p = np.zeros((4, 4, 4), bool)
    t[0, :2] = True                  # 8 pixels
    p[0, :1] = True                  # 4 of them: dice 2*4/12, iou 4/8
    t[1, 0, 0] = True                # true lung, nothing predicted: 0, 0
    p[2, 3, 3] = True                # nothing there, something predicted: 0, 0
    # image 3: both empty: 1, 1
    s = pm.mask_scores(t, p)
    np.testing.assert_allclose(s["dice"], [2 / 3, 0, 0, 1])
    np.testing.assert_allclose(s["iou"], [0.5, 0, 0, 1])
    probs = p[..., None].astype(np.float32) * 0.9 + 0.05     # [N, H, W, 1] probabilities
    np.testing.assert_allclose(pm.mask_scores(t.astype(np.uint8) * 255, probs)["dice"],
                               s["dice"])
    with pytest.raises(ValueError, match="differ in shape"):
        pm.mask_scores(t, p[:, :2])
    with pytest.raises(ValueError, match=r"must be \[N, H, W\]"):
        pm.mask_scores(t[0], p[0])


def test_segmentation_report_means_and_intervals():
    rng = np.random.default_rng(0)
    t = rng.random((60, 16, 16)) < 0.4
    p = t.copy()
    p[:30, :4] = ~p[:30, :4]          # half the images get a quarter of their rows wrong
    r = pm.segmentation_report(t, p, num_resamples=500, seed=1)
    s = pm.mask_scores(t, p)
    assert r["n"] == 60
    assert r["dice"] == pytest.approx(s["dice"].mean()) and r["iou"] == pytest.approx(
        s["iou"].mean())
    for k in ("dice", "iou"):
        lo, hi = r["ci95"][k]
        assert lo < r[k] < hi and hi - lo < 0.2
    assert r["ci95"]["num_resamples"] == 500 and r["ci95"]["level"] == 0.95
    assert pm.segmentation_report(t, p, num_resamples=500, seed=1) == r
    perfect = pm.segmentation_report(t, t, num_resamples=100)
    assert perfect["dice"] == perfect["iou"] == 1.0 and perfect["ci95"]["dice"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least one image"):
        pm.segmentation_report(t[:0], p[:0])
