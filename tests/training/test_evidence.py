"""The evidence penalty: Grad-CAM mass outside the lungs, as the explain library measures it."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.explain import cam
from pneumo_tf.modeling import model as model_lib
from pneumo_tf.training import evidence
from support_runs import box_lung_model

SIZE = 64  # small_cnn's last feature map is 4x4 at 64 px


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1), dtype=np.uint8)


@pytest.mark.parametrize("task", ["binary", "subtype"])
def test_outside_share_is_the_grad_cam_mass_outside_the_lungs(task):
    keras_seed = 3 if task == "binary" else 4
    tf.keras.utils.set_random_seed(keras_seed)
    model = model_lib.build_model("small_cnn", SIZE, None, -1, True, "unit", task=task)
    loss_output = (model.get_layer("class_probabilities").output if task == "subtype"
                   else model.output)
    penalty = evidence.EvidencePenalty(model, box_lung_model(16), loss_output)
    assert penalty.layer == "features"
    images = _images(6)
    probs = model(images, training=False).numpy()[:, 0]
    labels = (probs >= 0.5).astype(np.float32)
    outputs, outside = penalty(images, labels, training=False)
    assert outputs.shape == ((6, 3) if task == "subtype" else (6, 1))

    # The explain library's map of the same layer, explaining the same class per image.
    _, low, _ = cam.CamModel(model, "features").function()(images, np.float32(0.5))
    low = low.numpy()
    lungs = np.zeros((4, 4))
    lungs[:, :2] = 0.9  # the box model's P(lung) = 0.9 on the left half, averaged per cell
    expected = (low * (1 - lungs)).sum(axis=(1, 2)) / low.sum(axis=(1, 2))
    assert np.all(low.sum(axis=(1, 2)) > 0)
    np.testing.assert_allclose(outside.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.all((0 <= outside.numpy()) & (outside.numpy() <= 1))


def test_minimising_the_penalty_moves_the_map_into_the_lungs():
    """Its gradient reaches the backbone: a few steps on the penalty alone shrink it to its
    floor (the map wholly in the box's lungs leaves 1 - 0.9 outside). One class only: on noise
    images the signed map has the same layout in every image, so a NORMAL image's map (the
    negative part) is where a PNEUMONIA image's is not."""
    tf.keras.utils.set_random_seed(2)
    model = model_lib.build_model("small_cnn", SIZE, None, -1, True, "unit")
    penalty = evidence.EvidencePenalty(model, box_lung_model(16), model.output)
    images, labels = _images(8, seed=1), np.ones(8, np.float32)
    optimizer = tf.keras.optimizers.SGD(0.05)

    def mean_outside():
        return float(tf.reduce_mean(penalty(images, labels, training=False)[1]))

    before = mean_outside()
    for _ in range(10):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(penalty(images, labels, training=False)[1])
        grads = tape.gradient(loss, model.trainable_variables)
        assert any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0
                   for g, v in zip(grads, model.trainable_variables) if "stem_conv" in v.path)
        optimizer.apply(grads, model.trainable_variables)
    after = mean_outside()
    assert before > 0.5 and after == pytest.approx(0.1, abs=1e-3), (before, after)


def test_a_model_not_of_build_model_is_refused():
    import keras

    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8")
    outputs = keras.layers.Dense(1, name="logit")(keras.layers.Flatten()(keras.ops.cast(inputs, "float32")))
    model = keras.Model(inputs, outputs, name="plain")
    with pytest.raises(ValueError, match=r"--cam_penalty needs a model of build_model; plain has "
                                         r"no dense, gap, to_float_rgb layer"):
        evidence.EvidencePenalty(model, box_lung_model(16), model.output)
