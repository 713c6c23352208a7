"""Serving facts: the serving config, calibration validation, the threshold decision."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pneumo_tf
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.serving import runtime as serving


@pytest.mark.parametrize("bad, match", [({"temperature": 0, "threshold": 0.5}, "temperature"),
                                        ({"threshold": 0.5}, "temperature"),
                                        ({"temperature": 1, "threshold": 1.5}, "threshold")])
def test_bad_calibration_is_named(bad, match):
    with pytest.raises(serving.ServingError, match=match):
        serving.calibration_from_json(bad, "R/calibration.json")


def test_calibrated_probability_and_thresholds_round_trip():
    p = np.array([0.01, 0.3, 0.5, 0.9, 0.999])
    cal = calibration.apply_temperature(p, 2.0)
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(cal, 1 / (1 + np.exp(-logit / 2.0)), rtol=1e-9)
    import tensorflow as tf

    np.testing.assert_allclose(
        calibration.apply_temperature(tf.constant(p, tf.float32), 2.0).numpy(), cal, atol=1e-6)
    cfg = serving.ServingConfig(32, "fixed", temperature=2.0, threshold=0.7,
                                threshold_applies_to="probability")
    on_cal = serving.ServingConfig(32, "fixed", temperature=2.0,
                                   threshold=cfg.calibrated_threshold(),
                                   threshold_applies_to="calibrated_probability")
    assert on_cal.raw_threshold() == pytest.approx(0.7)


def test_calibration_from_json_computes_a_missing_calibrated_threshold():
    old = {"temperature": 2.0, "threshold": 0.7, "threshold_method": "val_youden",
           "source": "val"}  # written before calibrated_threshold existed
    checked = serving.calibration_from_json(old, "R/calibration.json")
    assert checked["calibrated_threshold"] == calibration.calibrated_threshold(old)
    assert checked["threshold"] == 0.7 and checked["threshold_applies_to"] == "probability"
    assert checked["threshold_method"] == "val_youden" and checked["source"] == "val"
    stored = {**old, "calibrated_threshold": checked["calibrated_threshold"]}
    assert serving.calibration_from_json(stored, "R/calibration.json") == checked
    on_cal = {**old, "threshold_applies_to": "calibrated_probability"}
    checked = serving.calibration_from_json(on_cal, "R/calibration.json")
    assert checked["calibrated_threshold"] == 0.7


@pytest.mark.parametrize("stored", [0.7, "x", None])
def test_calibration_from_json_refuses_a_contradicting_calibrated_threshold(stored):
    obj = {"temperature": 2.0, "threshold": 0.7, "calibrated_threshold": stored}
    if stored is None:  # JSON null: as if absent
        assert serving.calibration_from_json(obj, "R/c.json")["calibrated_threshold"] < 0.7
        return
    with pytest.raises(serving.ServingError, match=r"R/c.json: calibrated_threshold=.*T=2.0"):
        serving.calibration_from_json(obj, "R/c.json")


def test_serving_config_json_round_trip_and_calibrated_threshold_key():
    from pneumo_tf.serving import refer

    cfg = serving.ServingConfig(32, "fixed", temperature=1.7, threshold=0.45, calibrated=True,
                                threshold_method="val_youden", backbone="small_cnn",
                                refer_band=0.2)
    obj = json.loads(json.dumps(cfg.to_json()))
    assert obj["calibrated_threshold"] == cfg.calibrated_threshold()
    assert obj["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert obj["refer_reason_names"] == list(refer.REFER_REASONS) and obj["refer_band"] == 0.2
    assert serving.ServingConfig.from_json(obj) == cfg
    del obj["refer_band"]  # a config exported before the band was baked in: predict's default
    assert serving.ServingConfig.from_json(obj).refer_band == refer.DEFAULT_REFER_BAND


def _around(t: float, n_ulps: int = 40) -> np.ndarray:
    """Float64 values around ``t``: ``n_ulps`` neighbours each side, then widening steps."""
    below, above = [t], [t]
    for _ in range(n_ulps):
        below.append(np.nextafter(below[-1], 0.0))
        above.append(np.nextafter(above[-1], 1.0))
    steps = t + np.concatenate([-np.logspace(-15, -1, 29), np.logspace(-15, -1, 29)])
    values = np.concatenate([below, above, steps, np.linspace(0, 1, 101)])
    return np.clip(values, 0.0, 1.0)


def test_decide_label_numpy_and_tensorflow_agree_with_the_comparison():
    import tensorflow as tf

    t = 0.4513
    cal = _around(t)
    host = pmetrics.decide_label(cal, t)
    assert host.dtype == np.int64
    np.testing.assert_array_equal(host, (cal >= t).astype(np.int64))
    assert pmetrics.decide_label(t, t) == 1 and pmetrics.decide_label(np.nextafter(t, 0), t) == 0
    cal32 = tf.constant(cal, tf.float32)
    graph = tf.function(lambda c: pmetrics.decide_label(c, t))(cal32)
    assert graph.dtype == tf.int64
    # In the graph the threshold is compared in the tensor's dtype.
    np.testing.assert_array_equal(graph.numpy(), (cal32.numpy() >= np.float32(t)).astype(np.int64))


class _FixedProbabilities:
    """Stands in for a Keras model: returns preset ``[N, 1]`` probabilities."""

    def __init__(self, probs):
        self.probs = probs

    def __call__(self, images, training=False):
        import tensorflow as tf

        return tf.reshape(tf.constant(self.probs, tf.float32), [-1, 1])


@pytest.mark.parametrize("temperature, threshold, applies_to", [
    (1.7, 0.45, "probability"), (0.6, 0.8, "probability"), (2.5, 0.3, "calibrated_probability"),
    (1.0, 0.5, "probability")])
def test_saved_model_outputs_label_is_calibrated_probability_at_threshold(
        temperature, threshold, applies_to):
    import tensorflow as tf

    cfg = serving.ServingConfig(8, "none", temperature=temperature, threshold=threshold,
                                threshold_applies_to=applies_to, calibrated=True)
    raw_t = cfg.raw_threshold()
    probs = np.unique(_around(raw_t).astype(np.float32))
    images = tf.zeros([len(probs), 8, 8, 1], tf.uint8)
    out = tf.function(lambda x: serving.saved_model_outputs(_FixedProbabilities(probs), x, cfg))(
        images)
    out = {k: v.numpy() for k, v in out.items()}
    assert {k: v.dtype for k, v in out.items()} == {
        "probability": np.float32, "calibrated_probability": np.float32, "threshold": np.float32,
        "label": np.int64}
    assert all(v.shape == (len(probs),) for v in out.values())
    np.testing.assert_array_equal(out["threshold"], np.float32(cfg.calibrated_threshold()))
    np.testing.assert_array_equal(
        out["label"], (out["calibrated_probability"] >= out["threshold"]).astype(np.int64))
    assert set(out["label"]) == {0, 1}
    # Values within one float32 step of the threshold were tested, not just far ones.
    gap = np.abs(out["calibrated_probability"] - out["threshold"])
    assert gap.min() <= np.spacing(np.float32(cfg.calibrated_threshold()))


def test_serving_config_names_its_calibration_and_old_configs_read_as_val(tmp_path):
    site = serving.ServingConfig(32, "fixed", temperature=0.8, threshold=0.3, calibrated=True,
                                 calibration="site_b")
    obj = json.loads(json.dumps(site.to_json()))
    assert obj["calibration"] == "site_b" and serving.ServingConfig.from_json(obj) == site
    # Written before the key existed: it held calibration.json, or nothing when uncalibrated.
    old = {k: v for k, v in obj.items() if k != "calibration"}
    assert serving.ServingConfig.from_json(old).calibration == "val"
    assert serving.ServingConfig.from_json({**old, "calibrated": False}).calibration == "none"
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_manifest.json").write_text(json.dumps({"image_size": 32, "crop": "fixed"}))
    cal = serving.calibration_from_json({"temperature": 0.8, "threshold": 0.3}, "c.json")
    assert serving.serving_config_for_run(run, cal).calibration == "val"
    assert serving.serving_config_for_run(run, cal, "site_b").calibration == "site_b"
    assert serving.serving_config_for_run(run, None).calibration == "none"


class _DictOutputs:
    """A stand-in for :func:`pneumo_tf.evaluation.scoring.outputs_model`: fixed logits and features."""

    def __init__(self, logits, features):
        self.logits, self.features = np.asarray(logits, np.float32), np.asarray(features,
                                                                                np.float32)

    def __call__(self, images, training=False):
        import tensorflow as tf

        z = tf.constant(self.logits)
        p = tf.nn.softmax(z)
        return {"probability": 1.0 - p[:, :1], "class_logits": z,
                "features": tf.constant(self.features)}


def test_saved_model_outputs_add_the_guard_and_the_subtype():
    import tensorflow as tf

    from pneumo_tf.serving import ood, refer

    logits = [[3.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.2, 1.5], [0.0, 1.0, 1.0]]
    features = [[0.0, 0.0], [0.5, 0.0], [10.0, 0.0], [0.0, 1.0]]
    stats = ood.OodStats(np.zeros((1, 2)), np.eye(2), threshold=2.0)
    cfg = serving.ServingConfig(8, "none", threshold=0.5, calibrated=True, task="subtype",
                                subtype_temperature=2.0, ood={"threshold": 2.0})
    model = _DictOutputs(logits, features)
    images = tf.zeros([4, 8, 8, 1], tf.uint8)
    checks = {refer.INVERTED: tf.constant([False, True, False, False])}
    out = {k: v.numpy() for k, v in serving.saved_model_outputs(model, images, cfg, stats,
                                                                  checks).items()}
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
        "probability": (np.float32, (4,)), "calibrated_probability": (np.float32, (4,)),
        "threshold": (np.float32, (4,)), "label": (np.int64, (4,)),
        "ood_score": (np.float32, (4,)), "in_distribution": (np.bool_, (4,)),
        "class_probabilities": (np.float32, (4, 3)), "subtype": (np.int64, (4,)),
        "subtype_probability": (np.float32, (4,)), "refer": (np.bool_, (4,)),
        "refer_reasons": (np.object_, (4,)),
        "refer_reason_flags": (np.bool_, (4, len(refer.REFER_REASONS)))}
    np.testing.assert_allclose(out["ood_score"], [0, 0.25, 100, 1], rtol=1e-6)
    # Image 1 is close in feature space but failed an image check; image 2 is far: neither gets
    # a diagnosis (label -1), both are referred, for what is true of them.
    assert out["in_distribution"].tolist() == [True, False, False, True]
    assert out["label"].tolist() == [0, -1, -1, 1]
    assert out["refer"].tolist() == [False, True, True, False]
    assert out["refer_reasons"].tolist() == [b"", b"inverted", b"not_a_chest_film", b""]
    assert out["subtype"].tolist() == [0, 0, 0, 1]  # NORMAL or no diagnosis: 0; a tie: BACTERIAL
    gap = np.abs(np.array(logits)[:, 1] - np.array(logits)[:, 2]) / 2.0
    np.testing.assert_allclose(out["subtype_probability"], 1 / (1 + np.exp(-gap)), rtol=1e-6)
    np.testing.assert_allclose(out["class_probabilities"].sum(axis=1), 1, rtol=1e-6)
    for k in range(4):  # predict's host-side fields agree with the graph's
        fields = serving.subtype_fields(out["class_probabilities"][k], out["label"][k] == 1, 2.0)
        if out["label"][k] != 1:
            assert fields == {"subtype": None, "subtype_probability": None}
        else:
            assert fields["subtype"] == pneumo_tf.SUBTYPE_NAMES[out["subtype"][k]]
            assert fields["subtype_probability"] == pytest.approx(out["subtype_probability"][k],
                                                                  rel=1e-5)
    plain = serving.saved_model_outputs(_FixedProbabilities([0.2, 0.7]), images[:2], cfg)
    assert set(plain) == {"probability", "calibrated_probability", "threshold", "label"}


def test_serving_config_carries_task_subtype_temperature_and_guard(tmp_path):
    cfg = serving.ServingConfig(32, "fixed", task="subtype", subtype_temperature=1.4,
                                ood={"threshold": 12.5, "layer": "dense"})
    obj = json.loads(json.dumps(cfg.to_json()))
    assert obj["subtype_names"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    back = serving.ServingConfig.from_json(obj)
    assert back == cfg and back.ood_threshold == 12.5
    # A config written before either existed: a binary model without a guard.
    old = {k: v for k, v in obj.items() if k not in ("task", "subtype_temperature", "ood",
                                                      "subtype_names")}
    back = serving.ServingConfig.from_json(old)
    assert (back.task, back.subtype_temperature, back.ood, back.ood_threshold) == (
        "binary", 1.0, None, None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_manifest.json").write_text(json.dumps({"image_size": 32, "crop": "fixed"}))
    (run / "calibration.json").write_text(json.dumps({
        "temperature": 1.0, "threshold": 0.5, "subtype": {"temperature": 1.7}}))
    cal = serving.calibration_from_json({"temperature": 0.8, "threshold": 0.3}, "c.json")
    from_run = serving.serving_config_for_run(run, cal)
    assert from_run.subtype_temperature == 1.7 and from_run.ood is None
    (run / "ood.json").write_text(json.dumps({"threshold": 9.0, "layer": "dense"}))
    np.savez(run / "ood_stats.npz", means=np.zeros((2, 3)), precision=np.eye(3))
    assert serving.serving_config_for_run(run, cal).ood_threshold == 9.0
