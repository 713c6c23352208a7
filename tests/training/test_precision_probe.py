"""Tests of pneumo_tf.training.precision_probe: the cache key, the cache file, the choice, the timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumo_tf.training import precision_probe as probe


def _cpuinfo(tmp_path, model: str, flags: str, name: str = "cpuinfo") -> str:
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nmodel name\t: {model}\nflags\t\t: {flags}\n")
    return str(path)


def _key(cpuinfo, **over):
    args = dict(backbone="small_cnn", image_size=128, batch_size=32, trainable_layers=-1,
                jit="False", strategy="default", replicas=1)
    args.update(over)
    return probe.probe_key(**args, cpuinfo_path=cpuinfo)


def test_cache_key_depends_on_machine_and_setup_only(tmp_path):
    amd = _cpuinfo(tmp_path, "AMD EPYC 9R14", "fpu avx512f avx512_bf16", "amd")
    xeon = _cpuinfo(tmp_path, "Intel(R) Xeon(R)", "fpu avx512f avx512_bf16 amx_bf16", "xeon")
    same_model_other_flags = _cpuinfo(tmp_path, "AMD EPYC 9R14", "fpu avx512f", "amd2")
    base = _key(amd)
    assert base == _key(amd)  # deterministic
    assert json.loads(base)["cpu"]["model"] == "AMD EPYC 9R14"
    others = [_key(xeon), _key(same_model_other_flags), _key(amd, backbone="resnet50"),
              _key(amd, image_size=224), _key(amd, batch_size=16), _key(amd, trainable_layers=50),
              _key(amd, jit="True"), _key(amd, strategy="mirrored", replicas=2)]
    assert len(set(others + [base])) == len(others) + 1
    # Flag order in /proc/cpuinfo does not matter.
    shuffled = _cpuinfo(tmp_path, "AMD EPYC 9R14", "avx512_bf16 fpu avx512f", "amd3")
    assert _key(shuffled) == base


def test_cache_round_trip_keeps_other_setups_and_survives_garbage(tmp_path):
    assert probe.read_cache("k1", tmp_path) is None
    probe.write_cache("k1", {"candidates": {"float32": 10.0, "mixed_bfloat16": 14.0},
                             "chosen": "mixed_bfloat16", "cached": False}, tmp_path)
    probe.write_cache("k2", {"candidates": {"float32": 9.0}, "chosen": "float32"}, tmp_path)
    assert probe.read_cache("k1", tmp_path) == {
        "candidates": {"float32": 10.0, "mixed_bfloat16": 14.0}, "chosen": "mixed_bfloat16"}
    assert probe.read_cache("k2", tmp_path)["chosen"] == "float32"
    (tmp_path / probe.CACHE_NAME).write_text("{not json")
    assert probe.read_cache("k1", tmp_path) is None
    probe.write_cache("k3", {"candidates": {}, "chosen": "float32"}, tmp_path)
    assert probe.read_cache("k3", tmp_path)["chosen"] == "float32"


@pytest.mark.parametrize("rates,want", [
    ({"float32": 10.0, "mixed_bfloat16": 14.0}, "mixed_bfloat16"),
    ({"float32": 10.0, "mixed_bfloat16": 10.3}, "float32"),   # inside the 5 % margin
    ({"float32": 16.8, "mixed_bfloat16": 10.1}, "float32"),   # bf16 slower (Xeon, no AMX)
    ({"float32": 10.0, "mixed_bfloat16": 12.0, "float32+xla": 13.0,
      "mixed_bfloat16+xla": 13.2}, "float32+xla"),
])
def test_choose_prefers_float32_unless_bfloat16_clearly_wins(rates, want):
    assert probe.choose(rates) == want


def test_time_steps_runs_warmup_then_timed_steps():
    calls = []

    def step(images, labels, weights):
        calls.append((images.shape, images.dtype, labels.shape, weights.dtype))
        return 0.0

    rate = probe.time_steps(step, global_batch=4, image_size=8)
    assert len(calls) == probe.WARMUP_STEPS + probe.TIMED_STEPS
    assert calls[0] == ((4, 8, 8, 1), np.uint8, (4,), np.float32)
    assert rate > 0
