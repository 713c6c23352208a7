"""The trainer's optimizers: Adam and AdamW with TensorFlow's fused update."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
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
    ("Adam", {"epsilon": 0.5}),  # epsilon is added to sqrt(v), not under the root
])
def test_the_fused_update_is_keras_adams_update(kind, kwargs):
    config = {"learning_rate": 0.1, **kwargs}
    start, fused, fused_ops = _apply_three_times(getattr(trainer_lib, kind)(**config))
    _, plain, plain_ops = _apply_three_times(getattr(keras.optimizers, kind)(**config))
    # Equal up to float32 rounding (the kernel groups the products differently): the weights
    # moved by 0.01 (epsilon 0.5) to 0.3, the two updates differ by ~2e-6.
    for ours, theirs in zip(fused, plain):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert "ResourceApplyAdam" not in plain_ops
    # One fused op per variable, except where Keras' own update is kept (amsgrad).
    assert ("ResourceApplyAdam" in fused_ops) is not kwargs.get("amsgrad", False)
    assert min(np.abs(after - before).max() for after, before in zip(fused, start)) > 0.005


def test_a_checkpoint_of_keras_adam_restores_into_the_fused_one(tmp_path):
    """Runs backed up before the fused update resume: the slots are Keras' own."""
    variables = [keras.Variable(np.ones((2, 3), "float32"), name="kernel")]
    keras_adam = keras.optimizers.Adam(0.1)
    keras_adam.build(variables)
    keras_adam.apply([tf.fill((2, 3), 0.5)], variables)
    path = tf.train.Checkpoint(optimizer=keras_adam).save(str(tmp_path / "ckpt"))
    fused = trainer_lib.Adam(0.1)
    fused.build([keras.Variable(np.ones((2, 3), "float32"), name="kernel")])
    tf.train.Checkpoint(optimizer=fused).restore(path).assert_consumed()
    assert int(fused.iterations.numpy()) == 1
    for ours, theirs in zip(fused.variables, keras_adam.variables):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    assert float(np.abs(fused.variables[-1].numpy()).max()) > 0  # a moment that moved


def test_bench_optimizer_times_both_updates_from_the_same_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_optimizer"), "--image_size=16",
         "--batch_size=4", "--steps=2", "--repeats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for name in ("keras", "fused"):
        assert all(result[name][k] > 0 for k in ("trace_s", "first_call_s", "step_ms"))
    assert result["fused_over_keras"]["trace_s"] == pytest.approx(
        result["fused"]["trace_s"] / result["keras"]["trace_s"], abs=1e-3)
    # Five steps from the same weights: the updates differ by float32 rounding only.
    assert result["max_weight_difference"] < 1e-4
    assert (tmp_path / "out" / "bench").is_dir()  # the result is kept, as every benchmark's
