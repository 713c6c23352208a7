"""Distribution, precision and compilation choices for training, decided in one place.

What :func:`setup_distribution` decides, and why (measured on this project's 2-core CPUs,
BUILD.md):

* strategy: ``default`` (one device), ``one_device``, ``mirrored`` (all local GPUs, or N logical
  CPUs made by :func:`configure_cpu_devices`), ``multi_worker`` (``TF_CONFIG``), ``tpu``;
  ``auto`` picks multi_worker when ``TF_CONFIG`` lists several tasks, mirrored when there are
  several local accelerators or logical CPUs, else default.
* precision policy: ``auto`` -> ``mixed_float16`` on GPUs, ``mixed_bfloat16`` on TPUs and on
  CPUs with AMX, ``float32`` on other CPUs (AVX512_BF16 alone trained ResNet50 at 0.6x float32
  on one of them).
* XLA: ``auto`` -> on for GPU/TPU, off on CPU (XLA gave nothing in float32 and halved bf16 here).

Checkpoints and final files are written by the chief only; other workers of a multi-worker run
write to a throw-away directory (:func:`worker_write_dir`), as the TensorFlow multi-worker guide
recommends, because saving may involve collective ops every worker must join.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "true", "false")
# /proc/cpuinfo flags of CPUs on which bfloat16 training beats float32: AMX tiles. AVX512_BF16
# alone is not enough: on this project's 2-core Xeon VM (avx512_bf16, no AMX exposed) a ResNet50
# fine-tune ran 10.1 img/s in mixed_bfloat16 vs 16.8 img/s in float32 (BUILD.md), so `auto`
# keeps float32 there.
BF16_CPU_FLAGS = ("amx_bf16",)


class DistributionError(ValueError):
    """A strategy/precision/device request that cannot be honoured; the message says why."""


@dataclasses.dataclass
class DistributionSetup:
    """The resolved choices of one training process.

    Attributes:
        strategy: the ``tf.distribute.Strategy`` to build the model and run steps under.
        strategy_name: resolved name (one of :data:`STRATEGIES` except ``auto``).
        num_replicas: replicas in sync across all workers (global batch = per replica x this).
        precision_policy: keras mixed-precision policy name, already set globally.
        jit_compile: whether the train step is XLA-compiled.
        device_kind: ``gpu`` | ``tpu`` | ``cpu``.
        is_chief: whether this process writes checkpoints, logs and the final model.
        task: ``(task_type, task_id)`` in a multi-worker cluster, else ``(None, None)``.
    """

    strategy: tf.distribute.Strategy
    strategy_name: str
    num_replicas: int
    precision_policy: str
    jit_compile: bool
    device_kind: str
    is_chief: bool = True
    task: tuple = (None, None)


def configure_cpu_devices(n: int) -> None:
    """Split the host CPU into ``n`` logical devices (so ``mirrored`` can run without GPUs).

    Must run before TensorFlow initialises its devices (before any op or device listing that
    creates a context): call it first thing in ``main``.

    Raises:
        DistributionError: TensorFlow was already initialised.
    """
    if n <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        current = len(tf.config.list_logical_devices("CPU"))
        if current == n:
            return  # already configured this way (a second run in the same process)
        raise DistributionError(
            f"--cpu_devices={n}: TensorFlow already initialised its devices ({current} logical "
            f"CPU(s)); configure_cpu_devices must be called before any TensorFlow op ({e})") from e


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo_path`` (empty if unreadable)."""
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU makes bfloat16 training faster than float32 (AMX; see BF16_CPU_FLAGS)."""
    return bool(cpu_flags(cpuinfo_path) & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, device_kind: str, cpu_bf16: bool | None = None) -> str:
    """The keras mixed-precision policy for ``--precision`` on ``device_kind``.

    Args:
        precision: one of :data:`PRECISIONS`.
        device_kind: ``gpu`` | ``tpu`` | ``cpu``.
        cpu_bf16: whether the CPU does bf16 natively; None reads /proc/cpuinfo.
    """
    if precision not in PRECISIONS:
        raise DistributionError(f"--precision={precision!r}; expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device_kind == "gpu":
        return "mixed_float16"
    if device_kind == "tpu":
        return "mixed_bfloat16"
    if cpu_bf16 is None:
        cpu_bf16 = cpu_supports_bf16()
    return "mixed_bfloat16" if cpu_bf16 else "float32"


def resolve_jit_compile(jit_compile: str | bool, device_kind: str) -> bool:
    """``--jit_compile`` -> bool: ``auto`` is on for GPU/TPU, off on CPU (no CPU gain measured)."""
    if isinstance(jit_compile, bool):
        return jit_compile
    value = str(jit_compile).lower()
    if value not in JIT_CHOICES:
        raise DistributionError(f"--jit_compile={jit_compile!r}; expected one of {JIT_CHOICES}")
    if value == "auto":
        return device_kind in ("gpu", "tpu")
    return value == "true"


def tf_config_task() -> tuple[str | None, int | None, int]:
    """``(task_type, task_id, number of tasks)`` from ``TF_CONFIG`` (``(None, None, 1)`` unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return None, None, 1
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DistributionError(f"TF_CONFIG is not valid JSON ({e})") from e
    cluster = cfg.get("cluster", {})
    num = sum(len(cluster.get(k, [])) for k in ("chief", "worker"))
    task = cfg.get("task", {})
    return task.get("type"), task.get("index"), max(1, num)


def is_chief_task(task_type: str | None, task_id: int | None, has_chief_job: bool) -> bool:
    """The chief is task ``chief``, or ``worker`` 0 in a cluster without a chief job."""
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    return task_type == "worker" and int(task_id or 0) == 0 and not has_chief_job


def _device_kind() -> str:
    if tf.config.list_logical_devices("TPU"):
        return "tpu"
    if tf.config.list_physical_devices("GPU"):
        return "gpu"
    return "cpu"


def resolve_strategy_name(strategy: str, num_gpus: int, num_cpu_devices: int,
                          num_tasks: int) -> str:
    """``--strategy=auto`` -> a concrete name (see the module docstring); others as given."""
    if strategy not in STRATEGIES:
        raise DistributionError(f"--strategy={strategy!r}; expected one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    if num_tasks > 1:
        return "multi_worker"
    if num_gpus > 1 or (num_gpus == 0 and num_cpu_devices > 1):
        return "mirrored"
    return "default"


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Build the ``tf.distribute`` strategy called ``name`` (already resolved)."""
    if name == "multi_worker":  # first: it must configure collectives before TF initialises
        if not os.environ.get("TF_CONFIG"):
            raise DistributionError("--strategy=multi_worker needs TF_CONFIG (cluster and task) "
                                    "in the environment of every worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(devices) < 2:
            log.warning("mirrored strategy over a single device (%s); use --cpu_devices=N to "
                        "split the CPU", devices)
        return tf.distribute.MirroredStrategy(devices)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.NotFoundError) as e:
            raise DistributionError(f"--strategy=tpu: no TPU found ({e})") from e
        return tf.distribute.TPUStrategy(resolver)
    raise DistributionError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def setup_distribution(strategy: str = "auto", precision: str = "auto",
                       jit_compile: str | bool = "auto", cpu_devices: int = 1) -> DistributionSetup:
    """Resolve and apply every distribution choice (also sets the global keras precision policy).

    Args:
        strategy: one of :data:`STRATEGIES`.
        precision: one of :data:`PRECISIONS`.
        jit_compile: one of :data:`JIT_CHOICES` or a bool.
        cpu_devices: logical CPU devices to create (> 1 must happen before TF initialises;
            see :func:`configure_cpu_devices`).
    """
    import keras

    configure_cpu_devices(cpu_devices)
    task_type, task_id, num_tasks = tf_config_task()
    # Only physical-device queries here: listing logical devices would initialise the runtime,
    # after which MultiWorkerMirroredStrategy can no longer configure its collective ops.
    cpu_config = tf.config.get_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0])
    name = resolve_strategy_name(strategy, len(tf.config.list_physical_devices("GPU")),
                                 len(cpu_config) if cpu_config else 1, num_tasks)
    dist = make_strategy(name)
    kind = _device_kind()
    policy = resolve_precision(precision, kind)
    keras.mixed_precision.set_global_policy(policy)
    has_chief_job = False
    if name == "multi_worker":
        resolver = dist.cluster_resolver
        task_type, task_id = resolver.task_type, resolver.task_id
        has_chief_job = "chief" in resolver.cluster_spec().as_dict()
    chief = is_chief_task(task_type, task_id, has_chief_job) if name == "multi_worker" else True
    return DistributionSetup(strategy=dist, strategy_name=name,
                             num_replicas=int(dist.num_replicas_in_sync), precision_policy=policy,
                             jit_compile=resolve_jit_compile(jit_compile, kind), device_kind=kind,
                             is_chief=chief, task=(task_type, task_id))


def worker_write_dir(path: str | os.PathLike, setup: DistributionSetup) -> Path:
    """Where this process writes ``path``: itself on the chief, a fresh temp dir elsewhere.

    Non-chief workers must still execute saves (collectives), but their files are discarded with
    :func:`discard_worker_dir`.
    """
    path = Path(path)
    if setup.is_chief:
        return path
    return Path(tempfile.mkdtemp(prefix=f"worker{setup.task[1]}_{path.name}_"))


def discard_worker_dir(path: str | os.PathLike, setup: DistributionSetup) -> None:
    """Remove a non-chief worker's temporary write dir (no-op on the chief)."""
    if not setup.is_chief:
        shutil.rmtree(path, ignore_errors=True)
