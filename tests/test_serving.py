"""Serving facts: the serving config, calibration validation, the threshold decision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_tf import calibration, serving


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
    cfg = serving.ServingConfig(32, "fixed", temperature=1.7, threshold=0.45, calibrated=True,
                                threshold_method="val_youden", backbone="small_cnn")
    obj = json.loads(json.dumps(cfg.to_json()))
    assert obj["calibrated_threshold"] == cfg.calibrated_threshold()
    assert obj["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert serving.ServingConfig.from_json(obj) == cfg


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
    host = serving.decide_label(cal, t)
    assert host.dtype == np.int64
    np.testing.assert_array_equal(host, (cal >= t).astype(np.int64))
    assert serving.decide_label(t, t) == 1 and serving.decide_label(np.nextafter(t, 0), t) == 0
    cal32 = tf.constant(cal, tf.float32)
    graph = tf.function(lambda c: serving.decide_label(c, t))(cal32)
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
