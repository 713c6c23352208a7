"""The trainer's optimizers: Adam and AdamW with TensorFlow's fused update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.training import trainer as trainer_lib


def _apply_three_times(optimizer):
    """``(weights before, weights after, graph op types)`` of three traced ``apply`` calls of
    fixed gradients."""
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=(3, 4)).astype("float32"), name="kernel"),
                 keras.Variable(rng.normal(size=(4,)).astype("float32"), name="bias")]
    grads = [[tf.constant(rng.normal(size=v.shape), tf.float32) for v in variables]
             for _ in range(3)]
    start = [v.numpy() for v in variables]
    optimizer.build(variables)

    @tf.function(autograph=False)
    def apply(gradients):
        optimizer.apply(gradients, variables)

    ops = {op.type for op in apply.get_concrete_function(grads[0]).graph.get_operations()}
    for gradients in grads:
        apply(gradients)
    if optimizer.use_ema:
        optimizer.finalize_variable_values(variables)
    return start, [v.numpy() for v in variables], ops


@pytest.mark.parametrize("kind, kwargs", [
    ("Adam", {}),
    ("Adam", {"use_ema": True, "ema_momentum": 0.5}),
    ("AdamW", {"weight_decay": 0.1}),
    ("Adam", {"amsgrad": True}),
])
def test_the_fused_update_is_keras_adams_update(kind, kwargs):
    config = {"learning_rate": 0.1, **kwargs}
    start, fused, fused_ops = _apply_three_times(getattr(trainer_lib, kind)(**config))
    _, plain, plain_ops = _apply_three_times(getattr(keras.optimizers, kind)(**config))
    # Equal up to float32 rounding (the kernel groups the products differently): the weights
    # moved by about 0.3, the two updates differ by ~2e-6.
    for ours, theirs in zip(fused, plain):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert "ResourceApplyAdam" not in plain_ops
    # One fused op per variable, except where Keras' own update is kept (amsgrad).
    assert ("ResourceApplyAdam" in fused_ops) is not kwargs.get("amsgrad", False)
    assert min(np.abs(after - before).max() for after, before in zip(fused, start)) > 0.1

