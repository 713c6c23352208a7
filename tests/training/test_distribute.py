"""Tests of pneumo_tf.training.distribute: the strategy / precision / XLA / chief decisions."""

from __future__ import annotations

import json

import pytest

from pneumo_tf.training import distribute


@pytest.mark.parametrize("precision,kind,want", [
    ("auto", "gpu", "mixed_float16"),
    ("auto", "tpu", "mixed_bfloat16"),
    ("auto", "cpu", distribute.PROBE),  # CPU flags do not say which is faster: measured
    ("float32", "gpu", "float32"),
    ("float32", "cpu", "float32"),
    ("mixed_bfloat16", "cpu", "mixed_bfloat16"),
    ("mixed_float16", "cpu", "mixed_float16"),
])
def test_resolve_precision(precision, kind, want):
    assert distribute.resolve_precision(precision, kind) == want


def test_resolve_precision_rejects_unknown_names_the_flag():
    with pytest.raises(distribute.DistributionError, match="--precision='fp8'"):
        distribute.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("value,kind,want", [
    ("auto", "cpu", False), ("auto", "gpu", True), ("auto", "tpu", True),
    ("true", "cpu", True), ("false", "gpu", False), (True, "cpu", True),
    ("probe", "cpu", False), ("probe", "gpu", True),
])
def test_resolve_jit_compile(value, kind, want):
    assert distribute.resolve_jit_compile(value, kind) is want


def test_resolve_jit_compile_rejects_garbage():
    with pytest.raises(distribute.DistributionError, match="--jit_compile"):
        distribute.resolve_jit_compile("maybe", "cpu")


@pytest.mark.parametrize("name,gpus,cpus,tasks,want", [
    ("auto", 0, 1, 1, "default"),
    ("auto", 1, 1, 1, "default"),
    ("auto", 4, 1, 1, "mirrored"),
    ("auto", 0, 2, 1, "mirrored"),
    ("auto", 0, 1, 2, "multi_worker"),
    ("one_device", 4, 1, 1, "one_device"),
])
def test_resolve_strategy_name(name, gpus, cpus, tasks, want):
    assert distribute.resolve_strategy_name(name, gpus, cpus, tasks) == want


def test_resolve_strategy_name_rejects_unknown():
    with pytest.raises(distribute.DistributionError, match="--strategy='horovod'"):
        distribute.resolve_strategy_name("horovod", 0, 1, 1)


def test_tf_config_task_and_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.tf_config_task() == (None, None, 1)
    cluster = {"worker": ["localhost:1", "localhost:2"], "chief": ["localhost:3"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": 1}}))
    assert distribute.tf_config_task() == ("worker", 1, 3)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(distribute.DistributionError, match="TF_CONFIG is not valid JSON"):
        distribute.tf_config_task()
    assert distribute.is_chief_task(None, None, False)
    assert distribute.is_chief_task("chief", 0, True)
    assert distribute.is_chief_task("worker", 0, False)
    assert not distribute.is_chief_task("worker", 0, True)
    assert not distribute.is_chief_task("worker", 1, False)


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.DistributionError, match="needs TF_CONFIG"):
        distribute.make_strategy("multi_worker")


def test_setup_default_sets_policy_and_is_chief():
    import keras

    try:
        setup = distribute.setup_distribution("default", "float32", "auto", cpu_devices=1)
        assert setup.strategy_name == "default"
        assert setup.num_replicas == 1
        assert setup.is_chief
        assert setup.jit_compile is False  # CPU: XLA off (no gain measured)
        assert keras.mixed_precision.global_policy().name == "float32"
        setup = distribute.setup_distribution("default", "mixed_bfloat16", "true")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert setup.jit_compile is True
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_cpu_devices_after_initialisation_is_a_clear_error():
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # initialise the runtime
    n = len(tf.config.list_logical_devices("CPU")) + 2
    with pytest.raises(distribute.DistributionError, match=f"--cpu_devices={n}"):
        distribute.configure_cpu_devices(n)


def test_worker_write_dir_chief_vs_worker(tmp_path):
    import tensorflow as tf

    base = dict(strategy=tf.distribute.get_strategy(), strategy_name="multi_worker",
                num_replicas=2, precision_policy="float32", jit_compile=False, device_kind="cpu")
    chief = distribute.DistributionSetup(**base, is_chief=True, task=("worker", 0))
    other = distribute.DistributionSetup(**base, is_chief=False, task=("worker", 1))
    assert distribute.worker_write_dir(tmp_path / "backup", chief) == tmp_path / "backup"
    tmp = distribute.worker_write_dir(tmp_path / "backup", other)
    assert tmp != tmp_path / "backup" and tmp.is_dir() and "worker1" in tmp.name
    distribute.discard_worker_dir(tmp, other)
    assert not tmp.exists()
    distribute.discard_worker_dir(tmp_path, chief)  # never removes the chief's dir
    assert tmp_path.is_dir()
