"""Benchmark results as data: each ``tools/bench_*`` run is saved with the machine it ran on.

``save("bench_train", result)`` writes ``out/bench/bench_train-<UTC date and time>.json`` holding
the result plus ``machine`` (CPU model, the instruction-set flags that matter for deep learning,
cores) and ``date``, so BUILD.md can quote a figure together with where it was measured, and two
machines' results can be told apart.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from pneumo_tf.core import atomic_files
from pneumo_tf.training import precision_probe

DEFAULT_DIR = Path("out") / "bench"
# The CPU features that change what is fast for TensorFlow on a CPU.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8")


def machine(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """``{"cpu", "cpu_flags", "cores", "platform", "tensorflow"}`` of this machine."""
    info = precision_probe.read_cpuinfo(cpuinfo_path)
    flags = set(info.get("flags", "").split())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    out = {"cpu": info.get("model name") or platform.processor() or platform.machine(),
           "cpu_flags": [f for f in RELEVANT_FLAGS if f in flags], "cores": cores,
           "platform": platform.platform()}
    try:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return out


def save(name: str, result: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``result`` with the machine and the date to ``out_dir/<name>-<date>.json``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    folder = Path(out_dir) if out_dir else DEFAULT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{now:%Y%m%dT%H%M%SZ}.json"
    record = {"benchmark": name, "date": now.isoformat(timespec="seconds"), "machine": machine()}
    atomic_files.write_json_atomic(path, {**record, **result})
    return path


def latest(name: str, out_dir: str | os.PathLike | None = None) -> dict | None:
    """The newest saved result of benchmark ``name``, or None."""
    files = sorted((Path(out_dir) if out_dir else DEFAULT_DIR).glob(f"{name}-*.json"))
    return json.loads(files[-1].read_text(encoding="utf-8")) if files else None
