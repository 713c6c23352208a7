"""modeling/precision.py: a mixed-precision model rebuilt in float32 with the same weights (the
classifier's TFLite export; the lung model everywhere)."""

from __future__ import annotations

import json

import numpy as np

from pneumo_tf.modeling import precision


def _mixed_lung_model(size: int = 32):
    import keras

    from pneumo_tf.modeling import model as pmodel

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return pmodel.build_lung_model(size, base_filters=4, depth=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_a_mixed_unet_is_rebuilt_in_float32_with_its_weights():
    mixed = _mixed_lung_model()
    assert precision.is_mixed_precision(mixed)
    f32 = precision.float32_model(mixed)
    assert not precision.is_mixed_precision(f32) and precision.float32_model(f32) is f32
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    maps_mixed = np.asarray(mixed(images, training=False), np.float32)
    maps_f32 = np.asarray(f32(images, training=False))
    assert maps_f32.dtype == np.float32 and np.abs(maps_mixed - maps_f32).max() < 0.05


def test_the_rebuild_is_float32_under_a_mixed_global_policy_which_it_leaves_alone():
    import keras

    mixed = _mixed_lung_model()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # as a bf16 trainer loading a gate
    try:
        f32 = precision.float32_model(mixed)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert not precision.is_mixed_precision(f32)


def test_a_lungs_run_trained_in_mixed_precision_answers_in_float32(tmp_path):
    from pneumo_tf.modeling import lungs as lungs_lib

    run = tmp_path / "run"
    run.mkdir()
    _mixed_lung_model().save(run / "model.keras")
    (run / "summary.json").write_text(json.dumps({"config": {"task": "lungs", "image_size": 32}}))
    lungs = lungs_lib.LungModel(run)
    assert precision.is_mixed_precision(lungs.run.model)
    assert not precision.is_mixed_precision(lungs.model)
    maps = lungs.grid_probabilities(np.zeros((2, 32, 32, 1), np.uint8))
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
