"""Choose the training precision (and, if asked, XLA) by timing the run's own model on this CPU.

Which precision trains faster on a CPU is not written in its feature flags: on one Xeon with
AVX512_BF16 (no AMX) ``mixed_bfloat16`` trained ResNet50 at 0.6x float32, on an AMD EPYC with
AVX512_BF16 at 1.38x, on Xeons with AMX faster still. So ``--precision=auto`` on a CPU builds the
run's model under each candidate, times a few optimizer steps on synthetic data of the run's
shape (:func:`time_steps`), and keeps the faster one (bfloat16 must win by
:data:`BF16_MARGIN`: it costs a little accuracy headroom, so a tie goes to float32). The answer is
cached per machine and setup (:func:`probe_key`) under :func:`cache_dir`, so the next run of the
same setup starts at once. GPUs and TPUs need no probe (mixed_float16 + XLA, bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pneumo_tf.core import atomic_files

log = logging.getLogger(__name__)

CANDIDATES = ("float32", "mixed_bfloat16")
BF16_MARGIN = 1.05          # bfloat16 must be at least 5 % faster to be chosen
WARMUP_STEPS = 2            # the first steps trace and compile
TIMED_STEPS = 5
TIME_BUDGET_S = 20.0        # per candidate, after warm-up: fewer timed steps when steps are slow
CACHE_NAME = "precision_probe.json"


def cache_dir() -> Path:
    """``$PNEUMO_TF_CACHE`` or ``~/.cache/pneumo_tf`` (created when written)."""
    return Path(os.environ.get("PNEUMO_TF_CACHE") or Path.home() / ".cache" / "pneumo_tf")


def read_cpuinfo(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first CPU's ``key: value`` lines of ``/proc/cpuinfo`` (empty if unreadable)."""
    info: dict[str, str] = {}
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_identity(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """``{"model": CPU model name, "flags": short hash of its feature flags}``."""
    info = read_cpuinfo(cpuinfo_path)
    flags = " ".join(sorted(info.get("flags", "").split()))
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def probe_key(backbone: str, image_size: int, batch_size: int, trainable_layers: int,
              jit: str, strategy: str, replicas: int, cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The cache key of a setup: the machine, TensorFlow's version and what shapes a step."""
    import tensorflow as tf

    return json.dumps({"cpu": cpu_identity(cpuinfo_path), "tensorflow": tf.__version__,
                       "backbone": backbone, "image_size": int(image_size),
                       "batch_size": int(batch_size), "trainable_layers": int(trainable_layers),
                       "jit": str(jit), "strategy": strategy, "replicas": int(replicas)},
                      sort_keys=True)


def read_cache(key: str, folder: Path | None = None) -> dict | None:
    """The cached result for ``key`` (``{"candidates", "chosen"}``), or None."""
    path = (folder or cache_dir()) / CACHE_NAME
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and "chosen" in entry else None


def write_cache(key: str, result: dict, folder: Path | None = None) -> None:
    """Store ``result`` under ``key`` (other keys kept); a cache that cannot be written is skipped."""
    path = (folder or cache_dir()) / CACHE_NAME
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, json.JSONDecodeError):
        entries = {}
    entries[key] = {"candidates": result["candidates"], "chosen": result["chosen"]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_files.write_json_atomic(path, entries)
    except OSError as e:
        log.warning("could not write the precision-probe cache %s (%s)", path, e)


def choose(candidates: dict[str, float]) -> str:
    """The winner among ``{name: images/s}``: the fastest, but a bfloat16 candidate only when
    it beats the fastest float32 one by :data:`BF16_MARGIN`."""
    fastest = max(candidates, key=candidates.get)
    f32 = {k: v for k, v in candidates.items() if "bfloat16" not in k}
    if "bfloat16" in fastest and f32:
        best_f32 = max(f32, key=f32.get)
        if candidates[fastest] < BF16_MARGIN * candidates[best_f32]:
            return best_f32
    return fastest


def time_steps(step: Callable[[np.ndarray, np.ndarray, np.ndarray], float], global_batch: int,
               image_size: int, seed: int = 0) -> float:
    """Images/s of ``step`` on a synthetic batch, after :data:`WARMUP_STEPS` untimed steps.

    Args:
        step: one optimizer step on ``(images [G, S, S, 1] uint8, labels [G], weights [G])``.
        global_batch: G; image_size: S.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (global_batch, image_size, image_size, 1), dtype=np.uint8)
    labels = (np.arange(global_batch) % 2).astype(np.float32)
    weights = np.ones(global_batch, np.float32)
    for _ in range(WARMUP_STEPS):
        step(images, labels, weights)
    done, start = 0, time.perf_counter()
    while done < TIMED_STEPS and (done < 2 or time.perf_counter() - start < TIME_BUDGET_S):
        step(images, labels, weights)
        done += 1
    return done * global_batch / (time.perf_counter() - start)
