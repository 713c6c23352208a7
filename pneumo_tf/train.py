"""Training app: ``python -m pneumo_tf.train --flagfile=configs/paper.cfg``.

One training path for every ``tf.distribute`` strategy: a compact custom loop (``strategy.run``
on a ``tf.function`` train step, ``tf.train.CheckpointManager`` for backup/resume). Keras 3's
``model.fit`` is not used because it fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585); the callback behaviours the paper relies on are small named pieces
here instead: :class:`EarlyStopping`, :class:`ReduceLROnPlateau`, TensorBoard logging, best
weights, backup/restore, terminate on NaN and the CSV history.

Run directory (:class:`pneumo_tf.rundir.RunPaths`): the same ``--run_dir`` again resumes from the
last backup (``resumed from epoch N``) if the flags match its ``flags.txt`` (``--epochs`` may
grow); a finished run says it is complete (and fits a missing ``calibration.json``).

Exact resume: each epoch's data order and augmentation randomness are functions of
``(seed, epoch)`` only (the training dataset is re-created per epoch with a seed derived from
both, and every keras ``SeedGenerator`` in the model is re-seeded at the start of each epoch),
so with ``--deterministic`` a run killed and resumed reproduces the uninterrupted history.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from pneumo_tf import atomic_files, augment, cli, distribute
from pneumo_tf import model as model_lib
from pneumo_tf import rundir
from pneumo_tf.data import pipeline, records

BATCH_SIZE = cli.batch_size_flag()
DATA_DIR = cli.data_dir_flag()
RUN_DIR = cli.run_dir_flag()
SEED = cli.seed_flag()

log = logging.getLogger("pneumo_tf.train")

LOSSES = ("focal", "bce")
METRIC_NAMES = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall")
HISTORY_COLUMNS = ("epoch",) + METRIC_NAMES + tuple(f"val_{m}" for m in METRIC_NAMES) + ("lr",)
RESAMPLERS = ("auto",) + augment.RESAMPLERS
CACHE_CHOICES = ("auto", "true", "false")


class TrainError(ValueError):
    """A training request that cannot run; the message names the flag/file and the fix."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept in ``backup/``."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on (the app's flags, 1:1).

    Attributes not obvious from their names:
        weights: ``imagenet`` | ``none`` | path of a local weights file.
        trainable_layers: backbone layers trained, from the top; -1 = all.
        input_norm: ``backbone`` (its own preprocessing) or a ``preprocess.INPUT_NORMS`` mode.
        rotation: degrees; zoom, shift: fractions; shear: shear factor (SPEC §3).
        resampler: ``auto`` = ``gather`` under a jit-compiled step, else ``gather_xla``.
        batch_size: per replica; the global batch is ``batch_size * num_replicas``.
        steps_per_epoch: 0 = train images // global batch.
        cache: ``auto`` | ``true`` | ``false``: decoded images in RAM (pipeline.make_dataset).
        backup_every_steps: also back up every N steps inside an epoch (0 = epoch ends only).
        profile: ``START,END`` global steps to trace with the TensorFlow profiler ("" = off).
        head_dropout: rates of the head's two Dropout layers (paper: 0.5, 0.3).
        debug_nan_at_step: test hook: the loss of this global step (0-based) becomes NaN.
    """

    data_dir: str
    run_dir: str
    backbone: str = "resnet50"
    weights: str = "imagenet"
    trainable_layers: int = 50
    train_bn: bool = False
    input_norm: str = "backbone"
    dense_units: int = 128
    head_dropout: tuple = (0.5, 0.3)
    augment: bool = True
    rotation: float = 20.0
    zoom: float = 0.2
    shift: float = 0.2
    shear: float = 0.1
    flip: bool = True
    fill_mode: str = "nearest"
    resampler: str = "auto"
    loss: str = "focal"
    focal_gamma: float = 2.0
    class_weights: str = "balanced"
    lr: float = 1e-5
    batch_size: int = 32
    epochs: int = 15
    steps_per_epoch: int = 0
    val_batch_size: int = 64
    early_stop_patience: int = 3
    lr_patience: int = 2
    lr_factor: float = 0.2
    min_lr: float = 0.0
    seed: int = 0
    deterministic: bool = False
    precision: str = "auto"
    jit_compile: str = "auto"
    strategy: str = "auto"
    cpu_devices: int = 1
    cache: str = "auto"
    skip_corrupt: bool = False
    backup_every_steps: int = 0
    log_every_steps: int = 10
    tb_images: int = 8
    profile: str = ""
    calibrate: bool = True
    debug_nan_at_step: int = -1

    def validate(self) -> None:
        """Raise :class:`TrainError` naming the flag for any value out of range."""
        checks = [
            (self.loss in LOSSES, f"--loss={self.loss!r}; expected one of {LOSSES}"),
            (self.resampler in RESAMPLERS, f"--resampler={self.resampler!r}; expected {RESAMPLERS}"),
            (self.cache in CACHE_CHOICES, f"--cache={self.cache!r}; expected {CACHE_CHOICES}"),
            (self.class_weights in ("balanced", "none"),
             f"--class_weights={self.class_weights!r}; expected balanced or none"),
            (self.epochs >= 1, f"--epochs={self.epochs}; must be >= 1"),
            (self.batch_size >= 1, f"--batch_size={self.batch_size}; must be >= 1"),
            (self.lr > 0, f"--lr={self.lr}; must be > 0"),
            (self.steps_per_epoch >= 0, f"--steps_per_epoch={self.steps_per_epoch}; must be >= 0"),
            (len(self.head_dropout) == 2, f"--head_dropout needs two rates, got {self.head_dropout}"),
            (0 < self.lr_factor < 1, f"--lr_factor={self.lr_factor}; must be in (0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)
        if not self.data_dir:
            raise TrainError("--data_dir is required (a converter output: tools/make_tfrecords)")
        if not self.run_dir:
            raise TrainError("--run_dir is required (created if missing; an existing one resumes)")
        model_lib.get_backbone_spec(self.backbone)  # ValueError naming the known backbones
        model_lib.resolve_input_norm(self.backbone, self.input_norm)

    def cache_arg(self) -> bool | None:
        return {"auto": None, "true": True, "false": False}[self.cache]

    def profile_range(self) -> tuple[int, int] | None:
        """``(start, end)`` global steps of ``--profile``, or None."""
        if not self.profile:
            return None
        try:
            start, end = (int(v) for v in self.profile.split(","))
        except ValueError as e:
            raise TrainError(f"--profile={self.profile!r}; expected START,END steps, e.g. 5,10") from e
        if not 0 <= start < end:
            raise TrainError(f"--profile={self.profile!r}; need 0 <= START < END")
        return start, end


def augment_kwargs(cfg: TrainConfig, jit_compile: bool) -> dict | None:
    """Keyword arguments of :class:`pneumo_tf.augment.RandomAffine`, or None (no augmentation).

    ``resampler=auto`` picks ``gather`` when the whole step is XLA-compiled (the native
    projective-transform op has no XLA kernel, SPEC §6), else ``gather_xla``: the same sampler
    compiled on its own, measured 2x the native op's throughput on this CPU (BUILD.md).
    """
    if not cfg.augment:
        return None
    resampler = cfg.resampler
    if resampler == "auto":
        resampler = "gather" if jit_compile else "gather_xla"
    elif resampler == "native" and jit_compile:
        raise TrainError("--resampler=native cannot be XLA-compiled (no XLA kernel for "
                         "ImageProjectiveTransformV3); use --resampler=gather or --jit_compile=false")
    return dict(rotation_deg=cfg.rotation, zoom=cfg.zoom, shift=cfg.shift, shear=cfg.shear,
                flip=cfg.flip, fill_mode=cfg.fill_mode, resampler=resampler, seed=cfg.seed)


# ---------------------------------------------------------------------------------------------
# Callback behaviours, as plain state machines (their state is saved in every backup)


@dataclasses.dataclass
class EarlyStopping:
    """Keras' EarlyStopping(monitor=val_loss, min_delta=0, restore_best_weights) state machine."""

    patience: int = 3
    best: float = math.inf
    best_epoch: int = -1
    wait: int = 0

    def update(self, epoch: int, val_loss: float) -> tuple[bool, bool]:
        """Feed one epoch's val_loss. Returns ``(improved, stop)``."""
        self.wait += 1
        if val_loss < self.best:
            self.best, self.best_epoch, self.wait = float(val_loss), int(epoch), 0
            return True, False
        return False, self.wait >= self.patience and epoch > 0


@dataclasses.dataclass
class ReduceLROnPlateau:
    """Keras' ReduceLROnPlateau(monitor=val_loss, min_delta=1e-4, cooldown=0) state machine."""

    patience: int = 2
    factor: float = 0.2
    min_lr: float = 0.0
    min_delta: float = 1e-4
    best: float = math.inf
    wait: int = 0

    def update(self, val_loss: float, lr: float) -> float:
        """Feed one epoch's val_loss and the current learning rate; returns the next one."""
        if val_loss < self.best - self.min_delta:
            self.best, self.wait = float(val_loss), 0
            return lr
        self.wait += 1
        if self.wait >= self.patience and lr > self.min_lr:
            self.wait = 0
            return max(lr * self.factor, self.min_lr)
        return lr


# ---------------------------------------------------------------------------------------------
# Metrics and history


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """accuracy, auc (ROC), pr_auc (average precision), precision, recall of ``probs``.

    The history's names for :func:`pneumo_tf.metrics.threshold_metrics` and
    :func:`pneumo_tf.metrics.ranking_metrics` (the evaluation report's definitions).

    Args:
        labels: ``[N]`` 0/1; probs: ``[N]`` probability of PNEUMONIA.

    Returns:
        Floats; a ranking metric is NaN when the labels hold only one class, every metric is NaN
        when a probability is NaN or infinite (the history records it instead of failing).
    """
    from pneumo_tf import metrics as metrics_lib  # scikit-learn: imported when first needed

    probs = np.asarray(probs, np.float64).reshape(-1)
    if not np.isfinite(probs).all():
        return dict.fromkeys(("accuracy", "precision", "recall", "auc", "pr_auc"), math.nan)
    at = metrics_lib.threshold_metrics(labels, probs, threshold)
    ranking = metrics_lib.ranking_metrics(labels, probs)
    return {"accuracy": at["accuracy"], "precision": at["precision"], "recall": at["recall"],
            "auc": ranking["roc_auc"], "pr_auc": ranking["average_precision"]}


def write_history_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``history.csv`` atomically: one row per epoch, :data:`HISTORY_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(row[k])) if k != "epoch" else int(row[k]))
                         for k in HISTORY_COLUMNS})
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def read_history_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``history.csv`` (``epoch`` int, the rest float)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 31-bit seed that depends only on ``(seed, epoch, stream)`` (data order, augmentation)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Model, optimizer, loss, distributed step and checkpoint of one run.

    Build with :meth:`__init__` (under the strategy's scope), then :meth:`fit`. Tests can also
    drive :meth:`step_on_global_batch` directly.
    """

    def __init__(self, cfg: TrainConfig, setup: distribute.DistributionSetup, manifest: dict):
        import keras
        import tensorflow as tf

        self.cfg, self.setup, self.manifest = cfg, setup, manifest
        self.strategy = setup.strategy
        self.image_size = int(manifest["image_size"])
        self.global_batch = cfg.batch_size * setup.num_replicas
        self.augment = augment_kwargs(cfg, setup.jit_compile)
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            try:
                self.model = model_lib.build_model(
                    cfg.backbone, self.image_size, cfg.weights, cfg.trainable_layers, cfg.train_bn,
                    cfg.input_norm, augment=self.augment, dense_units=cfg.dense_units,
                    dropout=tuple(cfg.head_dropout))
            except Exception as e:  # noqa: BLE001 -- the download has many failure types
                if cfg.weights == "imagenet" and "download" in f"{type(e).__name__} {e}".lower():
                    raise TrainError(f"--weights=imagenet: could not fetch the ImageNet weights "
                                     f"({e}); give a local file with --weights=PATH or train "
                                     f"from scratch with --weights=none") from e
                raise
            optimizer = keras.optimizers.Adam(learning_rate=cfg.lr)
            if setup.precision_policy == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.optimizer.build(self.model.trainable_variables)
        if cfg.loss == "focal":
            self.loss_fn = keras.losses.BinaryFocalCrossentropy(gamma=cfg.focal_gamma,
                                                                reduction=None)
        else:
            self.loss_fn = keras.losses.BinaryCrossentropy(reduction=None)
        # Keras SeedGenerator states (dropout, augmentation): re-seeded per epoch, and saved.
        self.seed_states = [v for v in self.model.variables
                            if v.path.endswith("seed_generator_state")]
        # Run state that is not a model/optimizer variable, as JSON inside the same checkpoint
        # (saved atomically with the weights).
        self.state_var = tf.Variable("{}", dtype=tf.string, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, run_state=self.state_var,
            **{f"seed_state_{i}": v.value for i, v in enumerate(self.seed_states)})
        self._train_step = self._make_train_step()
        self._predict = tf.function(lambda x: self.model(x, training=False))

    # -- steps ------------------------------------------------------------------------------

    def _replica_step(self, images, labels, weights):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            probs = self.model(images, training=True)
            per_example = self.loss_fn(labels[:, None], probs)
            if self.cfg.debug_nan_at_step >= 0:
                per_example = tf.where(
                    self.optimizer.iterations == self.cfg.debug_nan_at_step,
                    tf.fill(tf.shape(per_example), float("nan")), per_example)
            loss = tf.nn.compute_average_loss(per_example * weights,
                                              global_batch_size=self.global_batch)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss, probs[:, 0]

    def _make_train_step(self):
        import tensorflow as tf

        replica_fn = self._replica_step
        if self.setup.jit_compile:
            replica_fn = tf.function(replica_fn, jit_compile=True)
        strategy = self.strategy

        @tf.function
        def train_step(images, labels, weights):
            loss, probs = strategy.run(replica_fn, args=(images, labels, weights))
            return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                    strategy.gather(probs, axis=0), strategy.gather(labels, axis=0))

        return train_step

    def step_on_global_batch(self, images, labels, weights) -> float:
        """One optimizer step on a given global batch split evenly across replicas; its loss.

        Args:
            images: ``[G, S, S, 1] uint8``; labels, weights: ``[G] float32``; G = global batch.
        """
        import tensorflow as tf

        n = self.setup.num_replicas
        per = self.cfg.batch_size

        def part(ctx):
            lo = ctx.replica_id_in_sync_group * per
            return (images[lo:lo + per], labels[lo:lo + per], weights[lo:lo + per])

        dist = self.strategy.experimental_distribute_values_from_function(part)
        assert int(tf.shape(images)[0]) == per * n, "global batch must be batch_size * replicas"
        loss, _, _ = self._train_step(*dist)
        return float(loss)

    def train_dataset(self, epoch: int, skip_steps: int = 0):
        """The distributed training dataset of ``epoch``: order a function of (seed, epoch)."""
        cfg = self.cfg
        seed = epoch_seed(cfg.seed, epoch, 0)

        def dataset_fn(ctx):
            ds = pipeline.make_dataset(
                cfg.data_dir, "train", cfg.batch_size, training=True, cache=cfg.cache_arg(),
                seed=seed, deterministic=True if cfg.deterministic else None,
                class_weights=cfg.class_weights, repeat=True, drop_remainder=True,
                input_context=ctx, skip_corrupt=cfg.skip_corrupt)
            if skip_steps:
                ds = ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            return ds

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def reseed(self, epoch: int) -> None:
        """Set every SeedGenerator state to a function of (seed, epoch, its index)."""
        for i, var in enumerate(self.seed_states):
            var.assign(np.array([epoch_seed(self.cfg.seed, epoch, 1 + i), 0], np.uint32))

    def predict_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [N], probs [N])`` of a whole split, on this worker, in file order."""
        ds = pipeline.make_dataset(self.cfg.data_dir, split, self.cfg.val_batch_size,
                                   training=False, cache=self.cfg.cache_arg(), with_weights=False,
                                   skip_corrupt=self.cfg.skip_corrupt)
        labels, probs = [], []
        for images, y in pipeline.iterate_checked(ds, self.cfg.data_dir, split):
            probs.append(np.asarray(self._predict(images))[:, 0])
            labels.append(y.numpy())
        return np.concatenate(labels), np.concatenate(probs)

    def mean_loss(self, labels: np.ndarray, probs: np.ndarray) -> float:
        """Unweighted mean of the training loss over ``probs`` (Keras' val_loss)."""
        per = self.loss_fn(labels[:, None].astype(np.float32), probs[:, None].astype(np.float32))
        return float(np.mean(np.asarray(per)))

    # -- state ------------------------------------------------------------------------------

    def get_lr(self) -> float:
        return float(np.asarray(self.optimizer.learning_rate))

    def set_lr(self, lr: float) -> None:
        self.optimizer.learning_rate.assign(lr)

    def agree(self, value: float) -> float:
        """The mean of ``value`` over all workers (multi_worker only; else ``value`` itself).

        Every worker validates on the whole val split; agreeing on one number guarantees that all
        take the same early-stopping decision (a worker that stopped alone would hang the rest).
        """
        if self.setup.strategy_name != "multi_worker":
            return value
        import tensorflow as tf

        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(value, tf.float64))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None))


def _tb_writers(paths: rundir.RunPaths, enabled: bool):
    import tensorflow as tf

    if not enabled:
        return None
    return {name: tf.summary.create_file_writer(str(paths.tb / name))
            for name in ("train", "val", "hparams")}


def _scalar_hparams(cfg: TrainConfig, summary_config: dict) -> dict:
    hp = {k: v for k, v in summary_config.items()
          if isinstance(v, (bool, int, float, str)) and v is not None}
    hp["run_dir"] = str(cfg.run_dir)
    return hp


def log_augmented_images(trainer: Trainer, images, writer, step: int, max_images: int) -> None:
    """TensorBoard image summary of a few training inputs as the backbone sees them (augmented).

    The augmentation runs in a separate :class:`pneumo_tf.augment.RandomAffine` built from the
    same settings, so the model's own layer (its seed-generator state, saved in every backup)
    is not advanced: logging cannot change training or break an exact resume.
    """
    import tensorflow as tf

    shown = trainer.model.get_layer("to_float_rgb")(images[:max_images])
    if trainer.augment is not None:
        shown = augment.RandomAffine(**trainer.augment)(shown, training=True)
    with writer.as_default():
        tf.summary.image("augmented_inputs", tf.clip_by_value(shown / 255.0, 0.0, 1.0), step=step,
                         max_outputs=max_images)


def summary_config(cfg: TrainConfig, manifest: dict, trainer: Trainer) -> dict:
    """The ``config`` block of summary.json that evaluation, Grad-CAM and export read."""
    spec = model_lib.get_backbone_spec(cfg.backbone)
    return {
        "backbone": cfg.backbone, "image_size": int(manifest["image_size"]),
        "input_norm": model_lib.resolve_input_norm(cfg.backbone, cfg.input_norm),
        "input_norm_flag": cfg.input_norm, "crop": manifest.get("crop"),
        "encoding": manifest.get("encoding"), "channels": int(manifest.get("channels", 1)),
        "weights": cfg.weights, "trainable_layers": cfg.trainable_layers, "train_bn": cfg.train_bn,
        "dense_units": cfg.dense_units, "head_dropout": list(cfg.head_dropout),
        "cam_layer": spec.cam_layer, "augment": trainer.augment, "loss": cfg.loss,
        "focal_gamma": cfg.focal_gamma, "class_weights": cfg.class_weights, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "global_batch_size": trainer.global_batch,
        "epochs": cfg.epochs, "seed": cfg.seed, "deterministic": cfg.deterministic,
        "early_stop_patience": cfg.early_stop_patience, "lr_patience": cfg.lr_patience,
        "lr_factor": cfg.lr_factor, "data_dir": str(cfg.data_dir),
    }


def check_data(cfg: TrainConfig) -> dict:
    """Check the data dir (and the run dir's manifest on resume) before anything is built.

    Returns:
        The data dir's manifest.

    Raises:
        records.DataDirError: no manifest, an empty/missing train or val split, missing shards.
        rundir.RunDirError: resuming with data whose image size, crop or encoding differ.
    """
    manifest = records.read_manifest(cfg.data_dir)
    for split in ("train", "val"):
        records.split_shards(cfg.data_dir, manifest, split)
    if rundir.RunPaths(cfg.run_dir).data_manifest.is_file():
        rundir.check_data_compatible(cfg.run_dir, cfg.data_dir)
    return manifest


def _completed_summary(paths: rundir.RunPaths) -> dict | None:
    if not paths.summary.is_file():
        return None
    try:
        summary = json.loads(paths.summary.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return summary if summary.get("status") == "complete" else None


# Flags that may change when a run resumes: locations (the data manifest is compared instead),
# logging, and housekeeping that does not change what is trained. --epochs may also grow.
RESUME_FREE_FLAGS = frozenset({"data_dir", "run_dir", "log_every_steps", "tb_images", "profile",
                               "calibrate", "cache", "backup_every_steps"})


def parse_flags_text(text: str) -> dict[str, str]:
    """``{flag name: value}`` of a flagfile as :func:`flags_file_text` writes it.

    Booleans (``--name`` / ``--noname``) become ``"true"`` / ``"false"``; comments are skipped.
    """
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, sep, value = line[2:].partition("=")
        if not sep:
            name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
        values[name] = value
    return values


def check_resume_flags(run_flags_text: str, flags_text: str, run_flags_path: Path) -> bool:
    """Refuse to resume a run with other settings than its ``flags.txt``.

    The backup restores the model, the optimizer (learning rate included) and the callbacks'
    state, so a changed flag would be silently overruled or half applied.

    Args:
        run_flags_text: the run's ``flags.txt``; flags_text: this invocation's flags.
        run_flags_path: the path of ``flags.txt`` (for the message).

    Returns:
        True when ``--epochs`` grew (honoured; ``flags.txt`` should then be rewritten).

    Raises:
        TrainError: listing every differing flag outside :data:`RESUME_FREE_FLAGS`.
    """
    old, new = parse_flags_text(run_flags_text), parse_flags_text(flags_text)
    differ = sorted(name for name in old.keys() & new.keys()
                    if old[name] != new[name] and name not in RESUME_FREE_FLAGS)
    epochs_grew = "epochs" in differ and int(new["epochs"]) > int(old["epochs"])
    if epochs_grew:
        differ.remove("epochs")
        log.info("--epochs raised from %s to %s for the resumed run", old["epochs"], new["epochs"])
    if differ:
        changes = "; ".join(f"--{name}: run has {old[name]!r}, now {new[name]!r}"
                            for name in differ)
        raise TrainError(f"{run_flags_path.parent} is resumed from its backup, but these flags "
                         f"differ from {run_flags_path}: {changes}. Resume with the run's flags "
                         f"(--flagfile={run_flags_path}; --epochs may only grow) or train with "
                         f"the new flags in a new --run_dir")
    return epochs_grew


def _save_weights_atomic(model, path: Path) -> None:
    tmp = path.with_name(path.name.replace(".weights.h5", ".partial.weights.h5"))
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def _save_model_atomic(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".partial.keras")
    model.save(str(tmp))
    os.replace(tmp, path)


def train(cfg: TrainConfig, setup: distribute.DistributionSetup | None = None,
          flags_text: str | None = None) -> dict:
    """Train (or resume, or report complete) the run ``cfg.run_dir``; see the module docstring.

    Args:
        cfg: the run's settings.
        setup: resolved distribution; None resolves it from ``cfg`` (strategy, precision, XLA).
        flags_text: contents for ``flags.txt`` (a flagfile repeating the run); written once.

    Returns:
        The summary dict (also ``summary.json``).

    Raises:
        TrainError, records.DataDirError, rundir.RunDirError: before training, naming the fix.
        TrainingDivergedError: NaN/inf loss; the last good backup stays in ``backup/``.
    """
    import tensorflow as tf

    cfg.validate()
    profile_range = cfg.profile_range()
    paths = rundir.RunPaths(cfg.run_dir)
    done = _completed_summary(paths)
    if done is not None:
        log.info("run dir %s is complete (%s epochs, best epoch %s, val_loss %.4f); nothing to "
                 "do. Use a new --run_dir to train again.", paths.root, done.get("epochs_run"),
                 done.get("best_epoch"), done.get("best_val_loss", math.nan))
        if cfg.calibrate and not paths.calibration.is_file() and (setup is None or setup.is_chief):
            # summary.json is written before calibration: a failed or killed calibration is
            # finished here, from model.keras.
            log.info("%s is missing; calibrating the finished run on val", paths.calibration)
            done["calibration"] = run_calibration(cfg, model=None)
            atomic_files.write_json_atomic(paths.summary, done)
        return done
    manifest = check_data(cfg)
    resuming = tf.train.latest_checkpoint(str(paths.backup)) is not None
    rewrite_flags = not resuming
    if resuming and flags_text is not None and paths.flags.is_file():
        rewrite_flags = check_resume_flags(paths.flags.read_text(encoding="utf-8"), flags_text,
                                           paths.flags)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if setup is None:
        setup = distribute.setup_distribution(cfg.strategy, cfg.precision, cfg.jit_compile,
                                              cfg.cpu_devices)
    else:
        import keras

        keras.mixed_precision.set_global_policy(setup.precision_policy)
    chief = setup.is_chief
    if chief:
        paths.root.mkdir(parents=True, exist_ok=True)
        if not paths.data_manifest.is_file():
            atomic_files.write_json_atomic(paths.data_manifest, manifest)
        if flags_text is not None and (rewrite_flags or not paths.flags.is_file()):
            tmp = paths.flags.with_name("flags.txt.partial")
            tmp.write_text(flags_text, encoding="utf-8")
            os.replace(tmp, paths.flags)

    trainer = Trainer(cfg, setup, manifest)
    counts = model_lib.count_params(trainer.model)
    log.info("model %s at %d px: %s trainable / %s non-trainable parameters", cfg.backbone,
             trainer.image_size, f"{counts['trainable']:,}", f"{counts['non_trainable']:,}")
    print(f"parameters: trainable {counts['trainable']:,}, non-trainable "
          f"{counts['non_trainable']:,}", flush=True)
    log.info("strategy %s (%d replicas), precision %s, jit_compile %s, global batch %d",
             setup.strategy_name, setup.num_replicas, setup.precision_policy, setup.jit_compile,
             trainer.global_batch)

    train_count = int(manifest["splits"]["train"]["count"])
    steps_per_epoch = cfg.steps_per_epoch or max(1, train_count // trainer.global_batch)

    backup_dir = distribute.worker_write_dir(paths.backup, setup)
    manager = tf.train.CheckpointManager(trainer.checkpoint, str(backup_dir), max_to_keep=2)
    early = EarlyStopping(cfg.early_stop_patience)
    plateau = ReduceLROnPlateau(cfg.lr_patience, cfg.lr_factor, cfg.min_lr)
    state = {"next_epoch": 0, "step_in_epoch": 0, "history": [], "train_seconds": 0.0,
             "train_images": 0, "stopped_early": False, "resumes": []}
    # Every worker restores from the chief's backups (shared file system, as TF documents).
    latest = tf.train.latest_checkpoint(str(paths.backup))
    if latest:
        trainer.checkpoint.restore(latest).expect_partial()
        state.update(json.loads(trainer.state_var.numpy().decode("utf-8")))
        early = EarlyStopping(**state["early"])
        plateau = ReduceLROnPlateau(**state["plateau"])
        state["resumes"].append(state["next_epoch"])
        log.info("resumed from epoch %d (backup %s)", state["next_epoch"], latest)
        print(f"resumed from epoch {state['next_epoch']}", flush=True)
        if state["step_in_epoch"]:
            log.info("  ... at step %d of that epoch; its train metrics cover the remaining "
                     "steps only", state["step_in_epoch"])
    history: list[dict] = state["history"]
    if chief and history:
        write_history_csv(paths.history, history)  # drop rows of epochs the backup had not seen

    writers = _tb_writers(paths, chief)
    s_config = summary_config(cfg, manifest, trainer)
    if writers is not None and not latest:
        from tensorboard.plugins.hparams import api as hp_api

        with writers["hparams"].as_default():
            hp_api.hparams(_scalar_hparams(cfg, s_config), trial_id=paths.root.name)

    best_weights = None
    if early.best_epoch >= 0 and paths.best_weights.is_file():
        best_weights = paths.best_weights  # loaded at the end, unless a better epoch comes

    def save_backup(next_epoch: int, step_in_epoch: int) -> None:
        state.update(next_epoch=next_epoch, step_in_epoch=step_in_epoch, history=history,
                     early=dataclasses.asdict(early), plateau=dataclasses.asdict(plateau))
        trainer.state_var.assign(json.dumps(state))
        manager.save(checkpoint_number=int(trainer.optimizer.iterations.numpy()))

    profiling = False
    first_step_done = False
    images_logged = False
    epoch = state["next_epoch"]
    while epoch < cfg.epochs and not state["stopped_early"]:
        skip = state["step_in_epoch"] if epoch == state["next_epoch"] else 0
        if not skip:
            trainer.reseed(epoch)
        lr = float(f"{trainer.get_lr():.7g}")  # float32 variable -> the decimal it was set to
        iterator = iter(trainer.train_dataset(epoch, skip))
        losses, probs, labels = [], [], []
        epoch_t0 = time.perf_counter()
        for step in range(skip, steps_per_epoch):
            global_step = int(trainer.optimizer.iterations.numpy())
            if profile_range and chief and global_step == profile_range[0]:
                tf.profiler.experimental.start(str(paths.tb / "train"))
                profiling = True
            t0 = time.perf_counter()
            try:
                images, y, w = next(iterator)
            except pipeline.DATA_LOSS_ERRORS as e:
                raise pipeline.explain_data_loss(cfg.data_dir, "train", e) from e
            if writers is not None and cfg.tb_images and not images_logged:  # once per process
                local = trainer.strategy.experimental_local_results(images)[0]
                log_augmented_images(trainer, local, writers["train"], epoch, cfg.tb_images)
                images_logged = True
            loss, p, lab = trainer._train_step(images, y, w)
            loss = float(loss)
            dt = time.perf_counter() - t0
            if first_step_done:  # the first step traces and compiles: not throughput
                state["train_seconds"] += dt
                state["train_images"] += trainer.global_batch
            first_step_done = True
            if profiling and global_step + 1 >= profile_range[1]:
                tf.profiler.experimental.stop()
                profiling = False
            if not math.isfinite(loss):
                last = tf.train.latest_checkpoint(str(paths.backup))
                msg = (f"loss is {loss} at epoch {epoch} step {step} (global step {global_step}); "
                       f"training stopped. "
                       + (f"The last good checkpoint is kept: {last} (resumable). "
                          if last else "No checkpoint was written before the divergence. ")
                       + f"Check the data, or train again in a new --run_dir with a lower "
                         f"--lr (now {lr:g}); this run dir resumes only with the same flags.")
                log.error(msg)
                raise TrainingDivergedError(msg)
            losses.append(loss)
            probs.append(np.asarray(p))
            labels.append(np.asarray(lab))
            if writers is not None and cfg.log_every_steps and global_step % cfg.log_every_steps == 0:
                with writers["train"].as_default():
                    tf.summary.scalar("batch_loss", loss, step=global_step)
            if cfg.backup_every_steps and (step + 1) % cfg.backup_every_steps == 0 \
                    and step + 1 < steps_per_epoch:
                save_backup(epoch, step + 1)
        epoch_seconds = time.perf_counter() - epoch_t0

        val_labels, val_probs = trainer.predict_split("val")
        row = {"epoch": epoch, "loss": float(np.mean(losses)),
               **binary_metrics(np.concatenate(labels), np.concatenate(probs))}
        val_loss = trainer.agree(trainer.mean_loss(val_labels, val_probs))
        row.update({f"val_{k}": v for k, v in binary_metrics(val_labels, val_probs).items()})
        row["val_loss"] = val_loss
        row["lr"] = lr
        history.append(row)
        improved, stop = early.update(epoch, val_loss)
        if improved:
            best_weights = trainer.model.get_weights()
            if chief:
                _save_weights_atomic(trainer.model, paths.best_weights)
        new_lr = plateau.update(val_loss, lr)
        if new_lr != lr:
            log.info("epoch %d: val_loss did not improve for %d epochs; learning rate %g -> %g",
                     epoch, cfg.lr_patience, lr, new_lr)
            trainer.set_lr(new_lr)
        log.info("epoch %d (%d/%d) %.1fs: %s", epoch, epoch + 1, cfg.epochs, epoch_seconds,
                 " ".join(f"{k}={row[k]:.4g}" for k in HISTORY_COLUMNS[1:]))
        print(f"epoch {epoch}: loss={row['loss']:.4f} val_loss={val_loss:.4f} "
              f"val_auc={row['val_auc']:.4f} val_accuracy={row['val_accuracy']:.4f}", flush=True)
        if writers is not None:
            for split, prefix in (("train", ""), ("val", "val_")):
                with writers[split].as_default():
                    for m in METRIC_NAMES:
                        tf.summary.scalar(f"epoch_{m}", row[prefix + m], step=epoch)
                    if split == "train":
                        tf.summary.scalar("learning_rate", lr, step=epoch)
                        tf.summary.scalar("epoch_seconds", epoch_seconds, step=epoch)
                writers[split].flush()
        if stop:
            state["stopped_early"] = True
            log.info("early stopping after epoch %d: val_loss has not improved for %d epochs "
                     "(best %.4f at epoch %d)", epoch, cfg.early_stop_patience, early.best,
                     early.best_epoch)
        if chief:
            write_history_csv(paths.history, history)
        save_backup(epoch + 1, 0)
        epoch += 1
    if profiling:
        tf.profiler.experimental.stop()

    # Restore the best epoch's weights (EarlyStopping(restore_best_weights=True)).
    if isinstance(best_weights, Path):
        trainer.model.load_weights(str(best_weights))
    elif best_weights is not None:
        trainer.model.set_weights(best_weights)
    model_dir = distribute.worker_write_dir(paths.root, setup)
    _save_model_atomic(trainer.model, model_dir / paths.model.name)
    distribute.discard_worker_dir(backup_dir, setup)
    distribute.discard_worker_dir(model_dir, setup)

    best_row = history[early.best_epoch] if 0 <= early.best_epoch < len(history) else {}
    secs = state["train_seconds"]
    summary = {
        "status": "complete", "precision_policy": setup.precision_policy,
        "jit_compile": setup.jit_compile, "strategy": setup.strategy_name,
        "num_replicas": setup.num_replicas, "device_kind": setup.device_kind,
        "epochs_run": len(history), "best_epoch": early.best_epoch,
        "best_val_loss": early.best,
        "best_val_metrics": {k: v for k, v in best_row.items() if k.startswith("val_")},
        "stopped_early": state["stopped_early"], "steps_per_epoch": steps_per_epoch,
        "global_batch_size": trainer.global_batch,
        "train_images_per_sec": state["train_images"] / secs if secs > 0 else None,
        "params": counts, "resumed_from_epochs": state["resumes"],
        "versions": {"tensorflow": tf.__version__, "keras": __import__("keras").__version__},
        "config": s_config,
    }
    if chief:
        # Complete before calibrating: a failed or killed calibration is redone by a re-run.
        summary["calibration"] = "pending" if cfg.calibrate else "skipped: --nocalibrate"
        atomic_files.write_json_atomic(paths.summary, summary)
        summary["calibration"] = run_calibration(cfg, trainer.model)
        atomic_files.write_json_atomic(paths.summary, summary)
        if writers is not None:
            for w in writers.values():
                w.close()
    log.info("done: %d epochs, best epoch %d (val_loss %.4f); model in %s", len(history),
             early.best_epoch, early.best, paths.model)
    return summary


def run_calibration(cfg: TrainConfig, model) -> str:
    """Fit temperature and threshold on val (pneumo_tf.calibration) if available.

    A failure is logged, never raised: training has finished and its files are complete.
    ``model`` None loads the run's ``model.keras``.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.calibrate:
        return "skipped: --nocalibrate"
    try:
        from pneumo_tf import calibration
    except ImportError as e:
        log.warning("calibration skipped: pneumo_tf.calibration is not importable (%s)", e)
        return f"skipped: {e}"
    try:
        calibration.calibrate_run(cfg.run_dir, cfg.data_dir, model=model,
                                  batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("calibration on val failed (%s: %s); training is complete. Re-run it with "
                  "`python -m pneumo_tf.evaluate --run_dir=%s --split=val`", type(e).__name__, e,
                  cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


# ---------------------------------------------------------------------------------------------
# Command line

_BACKBONE = flags.DEFINE_enum("backbone", "resnet50", sorted(model_lib.BACKBONES),
                              "Backbone from the registry in pneumo_tf.model.")
_WEIGHTS = flags.DEFINE_string("weights", "imagenet",
                               "imagenet (Keras download, cached) | none | PATH of a local "
                               "include_top=False weights file.")
_TRAINABLE_LAYERS = flags.DEFINE_integer("trainable_layers", 50, "Backbone layers trained, "
                                         "counted from the top; -1 = all.")
_TRAIN_BN = flags.DEFINE_bool("train_bn", False, "Also train BatchNorm layers (default: frozen, "
                              "inference mode).")
_INPUT_NORM = flags.DEFINE_enum("input_norm", "backbone", ["backbone", "unit", "caffe", "torch",
                                                           "tf", "raw"],
                                "Pixel normalisation: the backbone's own (backbone) or unit = "
                                "[0, 1] as in the paper (SPEC §3).")
_DENSE_UNITS = flags.DEFINE_integer("dense_units", 128, "Units of the head's hidden Dense layer.")
_HEAD_DROPOUT = flags.DEFINE_list("head_dropout", ["0.5", "0.3"],
                                  "The head's two dropout rates (before/after the Dense layer).")
_AUGMENT = flags.DEFINE_bool("augment", True, "Random affine augmentation during training.")
_ROTATION = flags.DEFINE_float("rotation", 20.0, "Max rotation, degrees (+-).")
_ZOOM = flags.DEFINE_float("zoom", 0.2, "Max zoom, fraction (+-).")
_SHIFT = flags.DEFINE_float("shift", 0.2, "Max width/height shift, fraction of the side (+-).")
_SHEAR = flags.DEFINE_float("shear", 0.1, "Max shear factor (not degrees; SPEC §3).")
_FLIP = flags.DEFINE_bool("flip", True, "Random horizontal flips.")
_FILL_MODE = flags.DEFINE_enum("fill_mode", "nearest", list(augment.FILL_MODES),
                               "How augmentation fills pixels outside the image.")
_RESAMPLER = flags.DEFINE_enum("resampler", "auto", list(RESAMPLERS),
                               "Augmentation resampler: native (fast, no XLA), gather "
                               "(XLA-compilable), auto = gather under XLA else native.")
_LOSS = flags.DEFINE_enum("loss", "focal", list(LOSSES), "focal (gamma --focal_gamma) or bce.")
_FOCAL_GAMMA = flags.DEFINE_float("focal_gamma", 2.0, "Focal loss gamma.")
_CLASS_WEIGHTS = flags.DEFINE_enum("class_weights", "balanced", ["balanced", "none"],
                                   "Per-class sample weights from the data manifest.")
_LR = flags.DEFINE_float("lr", 1e-5, "Adam learning rate.")
_EPOCHS = flags.DEFINE_integer("epochs", 15, "Maximum epochs.", lower_bound=1)
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch; 0 = train "
                                        "images // global batch.", lower_bound=0)
_VAL_BATCH_SIZE = flags.DEFINE_integer("val_batch_size", 64, "Batch size of validation.",
                                       lower_bound=1)
_EARLY_STOP = flags.DEFINE_integer("early_stop_patience", 3, "Epochs without val_loss "
                                   "improvement before stopping (best weights restored).")
_LR_PATIENCE = flags.DEFINE_integer("lr_patience", 2, "Epochs without val_loss improvement "
                                    "before the learning rate is multiplied by --lr_factor.")
_LR_FACTOR = flags.DEFINE_float("lr_factor", 0.2, "ReduceLROnPlateau factor.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Op determinism and seeded data "
                                   "order: same flags -> same history (slower).")
_PRECISION = flags.DEFINE_enum("precision", "auto", list(distribute.PRECISIONS),
                               "auto = mixed_float16 on GPU, mixed_bfloat16 on TPU and on "
                               "CPUs with AMX (bf16 measured slower than float32 on "
                               "AVX512_BF16-only CPUs), else float32.")
_JIT_COMPILE = flags.DEFINE_enum("jit_compile", "auto", list(distribute.JIT_CHOICES),
                                 "XLA-compile the train step; auto = on for GPU/TPU, off on CPU.")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES),
                              "tf.distribute strategy; multi_worker reads TF_CONFIG.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Split the CPU into N logical devices "
                                    "(so --strategy=mirrored runs without GPUs).", lower_bound=1)
_CACHE = flags.DEFINE_enum("cache", "auto", list(CACHE_CHOICES),
                           "Cache decoded images in RAM: auto (if they fit), true, false.")
_SKIP_CORRUPT = flags.DEFINE_bool("skip_corrupt", False, "Do not fail on a corrupt shard: read "
                                  "it up to its first bad record and DROP THE REST OF THAT SHARD "
                                  "(a warning on stderr names it and counts the records lost). "
                                  "Default: fail naming the corrupt shard.")
_BACKUP_EVERY = flags.DEFINE_integer("backup_every_steps", 0, "Also back up every N steps "
                                     "within an epoch (0 = at epoch ends only).", lower_bound=0)
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", 10, "TensorBoard batch_loss every N steps.",
                                  lower_bound=0)
_TB_IMAGES = flags.DEFINE_integer("tb_images", 8, "Augmented inputs shown in TensorBoard.",
                                  lower_bound=0)
_PROFILE = flags.DEFINE_string("profile", "", "START,END global steps to trace with the "
                               "TensorFlow profiler into tb/train (empty = off).")
_CALIBRATE = flags.DEFINE_bool("calibrate", True, "Fit temperature and threshold on val at the "
                               "end (pneumo_tf.calibration).")

# This app's flags (shared ones included), in the order flags.txt lists them.
APP_FLAGS = (DATA_DIR, RUN_DIR, SEED, BATCH_SIZE,
             _BACKBONE, _WEIGHTS, _TRAINABLE_LAYERS, _TRAIN_BN, _INPUT_NORM, _DENSE_UNITS,
             _HEAD_DROPOUT, _AUGMENT, _ROTATION, _ZOOM, _SHIFT, _SHEAR, _FLIP, _FILL_MODE,
             _RESAMPLER, _LOSS, _FOCAL_GAMMA, _CLASS_WEIGHTS, _LR, _EPOCHS, _STEPS_PER_EPOCH,
             _VAL_BATCH_SIZE, _EARLY_STOP, _LR_PATIENCE, _LR_FACTOR, _DETERMINISTIC, _PRECISION,
             _JIT_COMPILE, _STRATEGY, _CPU_DEVICES, _CACHE, _SKIP_CORRUPT, _BACKUP_EVERY,
             _LOG_EVERY, _TB_IMAGES, _PROFILE, _CALIBRATE)


def config_from_flags() -> TrainConfig:
    """A :class:`TrainConfig` from the parsed flags."""
    try:
        dropout = tuple(float(v) for v in _HEAD_DROPOUT.value)
    except ValueError as e:
        raise TrainError(f"--head_dropout={','.join(_HEAD_DROPOUT.value)}: not numbers") from e
    return TrainConfig(
        data_dir=DATA_DIR.value, run_dir=RUN_DIR.value,
        backbone=_BACKBONE.value, weights=_WEIGHTS.value,
        trainable_layers=_TRAINABLE_LAYERS.value, train_bn=_TRAIN_BN.value,
        input_norm=_INPUT_NORM.value, dense_units=_DENSE_UNITS.value, head_dropout=dropout,
        augment=_AUGMENT.value, rotation=_ROTATION.value, zoom=_ZOOM.value, shift=_SHIFT.value,
        shear=_SHEAR.value, flip=_FLIP.value, fill_mode=_FILL_MODE.value,
        resampler=_RESAMPLER.value, loss=_LOSS.value, focal_gamma=_FOCAL_GAMMA.value,
        class_weights=_CLASS_WEIGHTS.value, lr=_LR.value, batch_size=BATCH_SIZE.value,
        epochs=_EPOCHS.value, steps_per_epoch=_STEPS_PER_EPOCH.value,
        val_batch_size=_VAL_BATCH_SIZE.value, early_stop_patience=_EARLY_STOP.value,
        lr_patience=_LR_PATIENCE.value, lr_factor=_LR_FACTOR.value, seed=SEED.value,
        deterministic=_DETERMINISTIC.value, precision=_PRECISION.value,
        jit_compile=_JIT_COMPILE.value, strategy=_STRATEGY.value, cpu_devices=_CPU_DEVICES.value,
        cache=_CACHE.value, skip_corrupt=_SKIP_CORRUPT.value,
        backup_every_steps=_BACKUP_EVERY.value, log_every_steps=_LOG_EVERY.value,
        tb_images=_TB_IMAGES.value, profile=_PROFILE.value, calibrate=_CALIBRATE.value)


def flags_file_text(argv0: str = "python -m pneumo_tf.train") -> str:
    """A flagfile holding every flag of this app with its current value (``flags.txt``)."""
    lines = [f"# {argv0} --flagfile=THIS_FILE  (written by pneumo_tf.train)"]
    lines += [flags.FLAGS[h.name].serialize() for h in APP_FLAGS]
    return "\n".join(line for line in lines if line) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Logical CPUs must exist before TensorFlow initialises its devices: first thing.
    try:
        distribute.configure_cpu_devices(_CPU_DEVICES.value)
        cfg = config_from_flags()
        cfg.validate()
        check_data(cfg)  # fail fast, before a strategy or model is built
        setup = distribute.setup_distribution(cfg.strategy, cfg.precision, cfg.jit_compile,
                                              cfg.cpu_devices)
        train(cfg, setup, flags_text=flags_file_text())
    except (TrainError, records.DataDirError, rundir.RunDirError,
            distribute.DistributionError) as e:
        logging.getLogger("pneumo_tf.train").error("%s", e)
        sys.exit(f"pneumo_tf.train: error: {e}")
    except TrainingDivergedError as e:
        sys.exit(f"pneumo_tf.train: {e}")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
