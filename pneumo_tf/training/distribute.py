"""Distribution, precision and compilation choices for training, decided in one place.

What :func:`setup_distribution` decides, and why (measured on this project's 2-core CPUs,
BUILD.md):

* strategy: ``default`` (one device), ``one_device``, ``mirrored`` (all local GPUs, or N logical
  CPUs made by :func:`configure_cpu_devices`), ``multi_worker`` (``TF_CONFIG``), ``tpu``;
  ``auto`` picks multi_worker when ``TF_CONFIG`` lists several tasks, mirrored when there are
  several local accelerators or logical CPUs, else default.
* precision policy: ``auto`` -> ``mixed_float16`` on GPUs, ``mixed_bfloat16`` on TPUs, and on a
  CPU :data:`PROBE`: the trainer times the run's own model in float32 and in mixed_bfloat16 and
  keeps the faster (:mod:`pneumo_tf.training.precision_probe`), because CPU flags do not predict it
  (AVX512_BF16 trained ResNet50 at 0.6x float32 on one Xeon and at 1.38x on an AMD EPYC).
* XLA: ``auto`` -> on for GPU/TPU, off on CPU (no CPU gain measured so far); ``probe`` on a CPU
  times the step with and without XLA too (an XLA compile of ResNet50 takes minutes).

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

# The choices of --strategy, --precision and --jit_compile, spelled with the flags.
from pneumo_tf.training.config import JIT_CHOICES, PRECISIONS, STRATEGIES  # noqa: F401

log = logging.getLogger(__name__)

# The precision policy of a CPU run whose precision the trainer decides by timing (auto on CPU).
PROBE = "probe"


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
        probe_jit: time the step with and without XLA too (``--jit_compile=probe`` on a CPU).
    """

    strategy: tf.distribute.Strategy
    strategy_name: str
    num_replicas: int
    precision_policy: str
    jit_compile: bool
    device_kind: str
    is_chief: bool = True
    task: tuple = (None, None)
    probe_jit: bool = False


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


def resolve_precision(precision: str, device_kind: str) -> str:
    """The keras mixed-precision policy for ``--precision`` on ``device_kind``, or :data:`PROBE`.

    Args:
        precision: one of :data:`PRECISIONS`.
        device_kind: ``gpu`` | ``tpu`` | ``cpu``.
    """
    if precision not in PRECISIONS:
        raise DistributionError(f"--precision={precision!r}; expected one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device_kind == "gpu":
        return "mixed_float16"
    if device_kind == "tpu":
        return "mixed_bfloat16"
    return PROBE


def resolve_jit_compile(jit_compile: str | bool, device_kind: str) -> bool:
    """``--jit_compile`` -> bool: ``auto`` is on for GPU/TPU, off on CPU (no CPU gain measured);
    ``probe`` is on for GPU/TPU and starts off on a CPU, where the trainer times both."""
    if isinstance(jit_compile, bool):
        return jit_compile
    value = str(jit_compile).lower()
    if value not in JIT_CHOICES:
        raise DistributionError(f"--jit_compile={jit_compile!r}; expected one of {JIT_CHOICES}")
    if value in ("auto", "probe"):
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
    # A probed precision is decided when the model is built; float32 until then.
    keras.mixed_precision.set_global_policy("float32" if policy == PROBE else policy)
    has_chief_job = False
    if name == "multi_worker":
        resolver = dist.cluster_resolver
        task_type, task_id = resolver.task_type, resolver.task_id
        has_chief_job = "chief" in resolver.cluster_spec().as_dict()
    chief = is_chief_task(task_type, task_id, has_chief_job) if name == "multi_worker" else True
    return DistributionSetup(strategy=dist, strategy_name=name,
                             num_replicas=int(dist.num_replicas_in_sync), precision_policy=policy,
                             jit_compile=resolve_jit_compile(jit_compile, kind), device_kind=kind,
                             is_chief=chief, task=(task_type, task_id),
                             probe_jit=str(jit_compile).lower() == "probe" and kind == "cpu")


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
