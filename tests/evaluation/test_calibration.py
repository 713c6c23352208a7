"""Temperature scaling, threshold choice and calibrate_run (validation only)."""

import json

import numpy as np
import pytest

from pneumo_tf.evaluation import calibration as cal


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, 40000)
    labels = (rng.random(40000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    for t_true in (0.5, 2.5):
        # An over/under-confident model whose logits are the true ones times T.
        t_fit = cal.fit_temperature(labels, true_logits * t_true)
        assert t_fit == pytest.approx(t_true, rel=0.05)


def test_temperature_clamps_on_separable_data():
    assert cal.fit_temperature([0, 0, 1, 1], [-3.0, -1.0, 1.0, 2.0]) == pytest.approx(1e-2)


def test_apply_temperature_is_monotone_and_identity_at_one():
    p = np.array([0.01, 0.2, 0.5, 0.7, 0.999])
    assert cal.apply_temperature(p, 1.0) == pytest.approx(p, rel=1e-6)
    q = cal.apply_temperature(p, 3.0)
    assert np.all(np.diff(q) > 0)
    assert q[2] == pytest.approx(0.5)
    assert q[0] > p[0] and q[-1] < p[-1]  # softer


def test_apply_temperature_takes_numpy_or_tensorflow():
    import tensorflow as tf

    p = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
    host = cal.apply_temperature(p, 1.7)
    assert host.dtype == np.float64
    assert isinstance(cal.apply_temperature(0.3, 1.7), np.floating)
    assert cal.apply_temperature([0.3], 1.7) == pytest.approx([host[3]])
    eager = cal.apply_temperature(tf.constant(p, tf.float32), 1.7)
    assert eager.dtype == tf.float32
    np.testing.assert_allclose(eager.numpy()[:-1], host[:-1], atol=1e-6)
    # p = 1 is clipped to the float32 nearest 1 - 1e-7 (1 - 1.2e-7): its logit differs a little.
    assert eager.numpy()[-1] == pytest.approx(host[-1], abs=1e-5)
    graph = tf.function(lambda x: cal.apply_temperature(x, 1.7))(tf.constant(p, tf.float64))
    assert graph.dtype == tf.float64
    np.testing.assert_allclose(graph.numpy(), host, rtol=1e-12)


def test_calibrated_threshold_is_the_same_cut_on_the_calibrated_scale():
    raw = {"temperature": 2.0, "threshold": 0.7, "threshold_applies_to": "probability"}
    t = cal.calibrated_threshold(raw)
    assert t == float(cal.apply_temperature(np.float64(0.7), 2.0))  # bit for bit
    assert t == pytest.approx(1 / (1 + (0.3 / 0.7) ** 0.5))
    assert cal.calibrated_threshold({"temperature": 2.0, "threshold": 0.7}) == t  # old files
    on_cal = dict(raw, threshold_applies_to="calibrated_probability")
    assert cal.calibrated_threshold(on_cal) == 0.7
    assert cal.calibrated_threshold(dict(raw, temperature=1.0)) == pytest.approx(0.7, abs=1e-15)
    with pytest.raises(ValueError, match="threshold_applies_to='logit'"):
        cal.calibrated_threshold(dict(raw, threshold_applies_to="logit"))


def test_calibration_json_holds_both_thresholds():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(0.3 * labels + rng.random(400) * 0.7, 0, 1)
    out = cal.calibrate_predictions(labels, probs)
    assert out["threshold_applies_to"] == "probability"
    assert out["calibrated_threshold"] == cal.calibrated_threshold(out)
    assert out["calibrated_threshold"] == pytest.approx(
        1 / (1 + np.exp(-np.log(out["threshold"] / (1 - out["threshold"])) / out["temperature"])))


def test_youden_threshold_hand_case():
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8])
    # Best J: predict PNEUMONIA for >= 0.6 (tpr 0.75, fpr 0) vs >= 0.35 (tpr 1, fpr 0.25): tie
    # at 0.75; argmax keeps the first (higher threshold): midway between 0.6 and 0.4.
    assert cal.choose_threshold(labels, probs, "val_youden") == pytest.approx(0.5)
    # sensitivity >= 0.95 needs all 4 positives: cut between 0.35 and 0.3.
    assert cal.choose_threshold(labels, probs, "val_sensitivity:0.95") == pytest.approx(0.325)
    assert cal.choose_threshold(labels, probs, "0.5") == 0.5


@pytest.mark.parametrize("bad", ["youden", "val_sensitivity:1.5", "2", "val_sensitivity:x",
                                 "calibrated:1.0", "val_prevalence:0", "calibrated"])
def test_bad_threshold_method_names_the_flag(bad):
    with pytest.raises(ValueError, match="--threshold"):
        cal.parse_threshold_method(bad)


def test_calibrate_predictions_improves_nll():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2.0, 5000)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3.0 * logits))
    out = cal.calibrate_predictions(labels, overconfident)
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["val"]["nll_after"] < out["val"]["nll_before"]
    assert out["val"]["ece_after"] < out["val"]["ece_before"]
    assert out["source"] == "val"


def test_raw_threshold_honours_threshold_applies_to():
    raw = {"temperature": 2.0, "threshold": 0.7, "threshold_applies_to": "probability"}
    assert cal.raw_threshold(raw) == 0.7
    assert cal.raw_threshold({"temperature": 2.0, "threshold": 0.7}) == 0.7  # absent: raw
    on_cal = dict(raw, threshold_applies_to="calibrated_probability")
    # calibrated = sigmoid(logit(p) / 2) = 0.7  <=>  p = sigmoid(2 * logit(0.7)) = 0.49 / 0.58
    t = cal.raw_threshold(on_cal)
    assert t == pytest.approx(0.49 / (0.49 + 0.09))
    assert cal.apply_temperature(t, 2.0) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="threshold_applies_to='logit'"):
        cal.raw_threshold(dict(raw, threshold_applies_to="logit"))


def _write_calibration(run_dir, **overrides):
    content = {"temperature": 2.0, "threshold": 0.7, "threshold_method": "val_youden",
               "threshold_applies_to": "calibrated_probability", "source": "val"}
    content.update(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "calibration.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_operating_point_uses_stored_point_and_never_rewrites_it(tmp_path):
    path = _write_calibration(tmp_path / "run")
    before = path.read_bytes()
    # The stored method (None = stored): its threshold, as a cut on the raw probability.
    for method in (None, "val_youden"):
        point = cal.operating_point(tmp_path / "run", tmp_path / "no_data_needed", method)
        assert point["threshold"] == pytest.approx(0.49 / 0.58)
        assert point["method"] == "val_youden" and point["from_calibration_json"]
        assert point["temperature"] == 2.0 and point["source"] == "val"
    # Another method is computed in memory (a fixed one needs no data); the file stays as is.
    point = cal.operating_point(tmp_path / "run", tmp_path / "no_data_needed", "0.3")
    assert point["threshold"] == 0.3 and point["method"] == "0.3"
    assert not point["from_calibration_json"] and point["temperature"] == 2.0
    assert path.read_bytes() == before
    # "0.50" is the stored fixed method "0.5".
    _write_calibration(tmp_path / "fixed", threshold=0.5, threshold_method="0.5",
                       threshold_applies_to="probability")
    assert cal.operating_point(tmp_path / "fixed", None, "0.50")["from_calibration_json"]
    with pytest.raises(ValueError, match="--threshold"):
        cal.operating_point(tmp_path / "run", None, "youden")


@pytest.mark.slow
def test_calibrate_run_reads_val_only(tmp_path):
    """calibrate_run works with the test split's shards deleted: it cannot read them."""
    from conftest import write_tiny_dataset
    from support_runs import make_run

    from pneumo_tf.core import rundir
    from pneumo_tf.data import records

    data = write_tiny_dataset(tmp_path / "data", image_size=32)
    run = make_run(tmp_path / "run", data, epochs=2)
    first = cal.calibrate_run(run, data)
    for shard in data.glob("test-*.tfrecord"):
        shard.unlink()
    second = cal.calibrate_run(run, data)
    assert second["threshold"] == first["threshold"]
    assert second["temperature"] == first["temperature"]
    stored = json.loads((run / "calibration.json").read_text())
    assert stored["source"] == "val"
    assert stored["threshold_method"] == cal.DEFAULT_THRESHOLD_METHOD
    assert stored["n_val"] == 12
    assert rundir.read_calibration(run)["threshold"] == first["threshold"]

    # A data dir without a val split is refused with the fix.
    manifest = records.read_manifest(data)
    del manifest["splits"]["val"]
    records.write_manifest(data, manifest)
    with pytest.raises(records.DataDirError, match="no 'val' split"):
        cal.calibrate_run(run, data)


def test_operating_point_of_a_named_calibration_is_used_as_stored(tmp_path):
    from pneumo_tf.core import rundir

    _write_calibration(tmp_path / "run")  # val: T = 2, threshold on the calibrated scale
    site = {"temperature": 0.5, "threshold": 0.3, "threshold_method": "val_youden",
            "threshold_applies_to": "probability", "source": "site:b"}
    path = rundir.RunPaths(tmp_path / "run").calibration_file("b")
    path.parent.mkdir()
    path.write_text(json.dumps(site), encoding="utf-8")
    point = cal.operating_point(tmp_path / "run", None, None, calibration_name="b")
    assert point == {"temperature": 0.5, "threshold": 0.3, "method": "val_youden",
                     "source": "site:b", "calibration": "b", "from_calibration_json": True}
    assert cal.operating_point(tmp_path / "run", None, "val_youden",
                               calibration_name="b")["threshold"] == 0.3
    assert cal.operating_point(tmp_path / "run", None)["calibration"] == "val"
    with pytest.raises(ValueError, match=r"--threshold=0.5 with --calibration=b: .*calibrate"):
        cal.operating_point(tmp_path / "run", None, "0.5", calibration_name="b")
    with pytest.raises(rundir.RunDirError, match="--calibration=c"):
        cal.operating_point(tmp_path / "run", None, calibration_name="c")


def test_calibrated_cut_maps_back_through_the_temperature():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.9])
    assert cal.parse_threshold_method("calibrated:0.5") == ("calibrated", 0.5)
    for t in (0.5, 1.0, 3.0):
        assert cal.choose_threshold(labels, probs, "calibrated:0.5", t) == pytest.approx(0.5)
        raw = cal.choose_threshold(labels, probs, "calibrated:0.7", t)
        assert cal.apply_temperature(np.float64(raw), t) == pytest.approx(0.7)
    # calibrate_predictions stores the raw cut and the calibrated one it came from.
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.7).astype(int)
    p = np.clip(1 / (1 + np.exp(-(3 * (y - 0.5) + rng.normal(0, 1.5, 400)))), 1e-4, 1 - 1e-4)
    out = cal.calibrate_predictions(y, p, "calibrated:0.6")
    assert out["calibrated_threshold"] == pytest.approx(0.6)
    assert out["threshold_method"] == "calibrated:0.6"


def test_prevalence_cut_is_bayes_rule_for_the_sites_prevalence():
    # Scores that temperature T0 calibrates at the val prevalence: P(y=1 | z) = sigmoid(z / T0).
    rng = np.random.default_rng(1)
    t0 = 2.0
    z = rng.normal(1.5, 3, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / t0))).astype(int)
    probs = 1 / (1 + np.exp(-z))
    prev = y.mean()
    for q in (0.5, 0.2):
        # Posterior odds at a site of prevalence q: exp(z / T0) * odds(q) / odds(prev) >= 1.
        want_z = t0 * (np.log(prev / (1 - prev)) - np.log(q / (1 - q)))
        got = cal.choose_threshold(y, probs, f"val_prevalence:{q}")
        assert np.log(got / (1 - got)) == pytest.approx(want_z, abs=0.15)
    # q = 0.5: the cut on the calibrated probability is the val prevalence itself.
    t = cal.fit_temperature(y, cal.prob_to_logit(probs))
    raw = cal.choose_threshold(y, probs, "val_prevalence:0.5", t)
    assert cal.apply_temperature(np.float64(raw), t) == pytest.approx(prev)
    # A lower site prevalence asks for more evidence: a higher cut.
    assert cal.choose_threshold(y, probs, "val_prevalence:0.2") > \
        cal.choose_threshold(y, probs, "val_prevalence:0.5")


def test_softmax_temperature_recovers_the_sharpening_of_calibrated_logits():
    from pneumo_tf.evaluation import calibration as cal

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in cal.softmax(true_logits)])
    # A model three times too confident: its logits are 3x the honest ones.
    t = cal.fit_softmax_temperature(y, 3 * true_logits)
    assert t == pytest.approx(3.0, rel=0.1)
    assert cal.softmax_nll(y, 3 * true_logits, t) < cal.softmax_nll(y, 3 * true_logits)
    np.testing.assert_allclose(cal.softmax(np.array([[1000.0, 0, 0]])), [[1, 0, 0]])
    entry = cal.subtype_calibration(np.r_[y, [-1, -1]], np.vstack([3 * true_logits,
                                                                   np.zeros((2, 3))]))
    assert entry["n_val"] == 4000 and entry["temperature"] == pytest.approx(t)
    assert entry["nll_after"] < entry["nll_before"]
    assert cal.subtype_calibration([-1, -1], np.zeros((2, 3))) is None


def test_method_label_spells_a_threshold_method_one_way():
    assert [cal.method_label(m) for m in ("val_youden", " 0.50", "val_sensitivity:0.950",
                                          "calibrated:0.5", "val_prevalence:.5")] == [
        "val_youden", "0.5", "val_sensitivity:0.95", "calibrated:0.5", "val_prevalence:0.5"]
    with pytest.raises(ValueError, match="--threshold"):
        cal.method_label("youden")
