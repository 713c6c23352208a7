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

    np.testing.assert_allclose(calibration.apply_temperature(tf.constant(p, tf.float32), 2.0).numpy(),
                               cal, atol=1e-6)
    cfg = serving.ServingConfig(32, "fixed", temperature=2.0, threshold=0.7,
                               threshold_applies_to="probability")
    on_cal = serving.ServingConfig(32, "fixed", temperature=2.0, threshold=cfg.calibrated_threshold(),
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
    assert serving.calibration_from_json(on_cal, "R/calibration.json")["calibrated_threshold"] == 0.7


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
