"""Tests of pneumo_tf.modeling.model: head layout, parameter counts, frozen BN, precision, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo_tf.modeling import model as model_lib
from support_runs import box_lung_model


@pytest.fixture(autouse=True)
def _float32_policy():
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_head_is_the_papers_text_not_its_listing():
    from keras import layers

    m = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1, augment=None)
    names = [layer.name for layer in m.layers]
    assert names == ["image", "to_float_rgb", "pixel_norm", "backbone", "gap", "dropout_1",
                     "dense", "dropout_2", "score"]
    assert m.get_layer("dropout_1").rate == 0.5
    assert m.get_layer("dropout_2").rate == 0.3
    dense, score = m.get_layer("dense"), m.get_layer("score")
    assert isinstance(dense, layers.Dense) and dense.units == 128
    assert dense.activation.__name__ == "relu"
    assert score.units == 1 and score.activation.__name__ == "sigmoid"
    assert m.input.dtype == "uint8" and tuple(m.input.shape) == (None, 32, 32, 1)
    assert tuple(m.output.shape) == (None, 1)


@pytest.mark.slow
def test_resnet50_param_counts_match_the_paper():
    m = model_lib.build_model("resnet50", 224, None, trainable_layers=50)
    counts = model_lib.count_params(m)
    assert counts == {"trainable": 17_184_769, "non_trainable": 6_665_344}
    backbone = model_lib.get_backbone(m)
    # BatchNorm stays frozen (inference mode) even inside the trainable top 50 layers.
    top = backbone.layers[-50:]
    bns = [layer for layer in top if "bn" in layer.name]
    assert bns and not any(layer.trainable for layer in bns)
    assert any(layer.trainable for layer in top)
    assert not any(layer.trainable for layer in backbone.layers[:-50])


def test_train_bn_unfreezes_batchnorm():
    from keras import layers

    frozen = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1, train_bn=False)
    trained = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1, train_bn=True)

    def bn_trainable(m):
        return [lyr.trainable for lyr in model_lib.get_backbone(m).layers
                if isinstance(lyr, layers.BatchNormalization)]

    assert bn_trainable(frozen) and not any(bn_trainable(frozen))
    assert all(bn_trainable(trained))
    # A frozen BN runs in inference mode: training=True gives the same output as inference
    # once dropout is off.
    m = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1, train_bn=False,
                              head=(128, 0.0, 0.0))
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(m(x, training=True)), np.asarray(m(x, training=False)),
                               rtol=1e-5, atol=1e-6)


def test_final_layer_is_float32_under_mixed_bfloat16():
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    m = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1)
    assert m.get_layer("dense").compute_dtype == "bfloat16"
    assert m.get_layer("score").compute_dtype == "float32"
    out = m(np.zeros((2, 32, 32, 1), np.uint8))
    assert str(out.dtype) in ("float32", "<dtype: 'float32'>")


def test_safe_mode_round_trip_with_augmentation(tmp_path):
    from pneumo_tf.core import rundir

    aug = dict(rotation_deg=20.0, zoom=0.2, shift=0.2, shear=0.1, flip=True)
    m = model_lib.build_model("small_cnn", 32, None, trainable_layers=-1, augment=aug)
    path = tmp_path / "model.keras"
    m.save(path)
    loaded = rundir.load_model(path)  # safe_mode=True
    x = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 1)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(m(x)), rtol=1e-6)
    assert loaded.get_layer("augment").get_config()["rotation_deg"] == 20.0


def test_weights_path_loads_a_local_file_and_bad_paths_are_named(tmp_path):
    source = model_lib.build_backbone("small_cnn", 32, None)
    path = tmp_path / "small.weights.h5"
    source.save_weights(path)
    loaded = model_lib.build_backbone("small_cnn", 32, str(path))
    for a, b in zip(source.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="no such file"):
        model_lib.build_backbone("small_cnn", 32, str(tmp_path / "nope.h5"))
    other = tmp_path / "other.weights.h5"
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(other)
    with pytest.raises(ValueError, match="cannot load into backbone 'small_cnn'"):
        model_lib.build_backbone("small_cnn", 32, str(other))


def test_unknown_backbone_and_imagenet_for_small_cnn_are_clear():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; known: .*resnet50"):
        model_lib.build_model("vgg", 32)
    with pytest.raises(ValueError, match="has no ImageNet weights"):
        model_lib.build_backbone("small_cnn", 32, "imagenet")


# ---------------------------------------------------------------------------------------------
# The lung segmentation model


def test_lung_model_shapes_names_and_size():
    m = model_lib.build_lung_model(64, base_filters=16, depth=4)
    out = m(np.zeros((2, 64, 64, 1), np.uint8))
    assert tuple(out.shape) == (2, 64, 64, 1)
    assert m.output.name.startswith("lung_mask") or m.layers[-1].name == "lung_mask"
    assert m.inputs[0].dtype == "uint8" and m.inputs[0].name.startswith("image")
    counts = model_lib.count_params(m)
    assert 300_000 < counts["trainable"] + counts["non_trainable"] < 600_000
    values = np.asarray(out)
    assert ((values > 0) & (values < 1)).all()
    small = model_lib.build_lung_model(32, base_filters=4, depth=2)
    assert model_lib.count_params(small)["trainable"] < 2_000
    with pytest.raises(ValueError, match="image_size=36 must be a multiple of 8 for depth=4"):
        model_lib.build_lung_model(36)


def test_lung_model_output_is_float32_under_mixed_precision():
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    m = model_lib.build_lung_model(32, base_filters=4, depth=3)
    assert m.get_layer("down0_conv1").compute_dtype == "bfloat16"
    assert m.get_layer("lung_mask").compute_dtype == "float32"
    assert str(m(np.zeros((1, 32, 32, 1), np.uint8)).dtype) in ("float32", "<dtype: 'float32'>")


def test_dice_bce_loss_values():
    t = np.zeros((3, 8, 8, 1), np.float32)
    t[0, 2:6, 2:6] = 1.0
    t[1, :4] = 1.0                              # image 2 stays empty
    perfect = model_lib.dice_bce_loss(t, t)
    np.testing.assert_allclose(np.asarray(perfect), 0.0, atol=1e-5)  # empty vs empty too
    flat = model_lib.dice_bce_loss(t, np.full_like(t, 0.5))
    # Dice of p = 0.5 on image 0: (2 * 8 + 1) / (16 + 32 + 1); BCE = ln 2 everywhere.
    np.testing.assert_allclose(float(flat[0]), 1 - 17 / 49 + np.log(2), rtol=1e-5)
    wrong = model_lib.dice_bce_loss(t, 1.0 - t)
    assert (np.asarray(wrong)[:2] > np.asarray(flat)[:2]).all()


def test_lung_model_learns_a_mask_in_a_few_steps():
    import keras

    rng = np.random.default_rng(0)
    images = np.full((16, 32, 32, 1), 200, np.uint8)
    masks = np.zeros((16, 32, 32, 1), np.float32)
    for i in range(16):  # a dark "lung" rectangle to find
        t, l = rng.integers(2, 14, 2)
        images[i, t:t + 14, l:l + 12] = 40
        masks[i, t:t + 14, l:l + 12] = 1.0
    keras.utils.set_random_seed(0)
    m = model_lib.build_lung_model(32, base_filters=8, depth=3)
    m.compile(keras.optimizers.Adam(1e-2), loss=model_lib.dice_bce_loss)
    first = m.evaluate(images, masks, verbose=0)
    m.fit(images, masks, batch_size=8, epochs=15, verbose=0)
    assert m.evaluate(images, masks, verbose=0) < 0.5 * first


def test_lung_gate_dims_the_input_outside_the_dilated_lungs():
    import tensorflow as tf

    x = tf.fill((2, 32, 32, 3), 200.0)
    gate = model_lib.LungGate(box_lung_model(16), floor=0.25, dilate=0.0)
    out = gate(x).numpy()
    np.testing.assert_allclose(out[:, :, :16], 200.0)  # the lungs stay as they were
    np.testing.assert_allclose(out[:, :, 16:], 50.0)  # the rest keeps a quarter
    # A dilation of 2/16 of the side widens the kept band by 2 lung-model pixels (4 here).
    wide = model_lib.LungGate(box_lung_model(16), floor=0.0, dilate=2 / 16)(x).numpy()
    assert np.all(wide[:, :, :20] == 200.0) and np.all(wide[:, :, 20:] == 0.0)


def test_lung_gate_arguments_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"floor=1.5 must be in \[0, 1\]"):
        model_lib.LungGate(box_lung_model(), floor=1.5)


def test_a_classifier_with_a_lung_gate_round_trips_in_safe_mode(tmp_path):
    import keras

    lung = model_lib.build_lung_model(32, base_filters=4, depth=2)
    model = model_lib.build_model("small_cnn", 32, None, -1, True, "unit",
                                  lung_gate={"lung_model": lung, "floor": 0.2, "dilate": 0.05})
    assert not model.get_layer("lung_gate").lung_model.trainable
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-6)
    gate = loaded.get_layer("lung_gate")
    assert (gate.floor, gate.dilate) == (0.2, 0.05)
    # Grad-CAM reads a gated small_cnn at its last feature map (measured most lung-bound there).
    from pneumo_tf.explain import cam

    assert cam.default_cam_layer(loaded, "small_cnn") == "features"
    plain = model_lib.build_model("small_cnn", 32, None, -1, True, "unit")
    assert cam.default_cam_layer(plain, "small_cnn") == "b1_out"
    # The lung model's weights came back too, not fresh ones.
    for a, b in zip(gate.lung_model.get_weights(), lung.get_weights()):
        np.testing.assert_array_equal(a, b)
