"""Training app: ``python -m pneumo_tf.train --flagfile=configs/paper.cfg``.

:func:`train` reads top to bottom like the run it performs: check the data, set up the run
directory and the distribution, build the :class:`Trainer` (model, optimizer, loss, distributed
step, checkpoint), restore the :class:`RunState` from the last backup, then per epoch
:func:`run_epoch` (the optimizer steps), :func:`validate` (the whole val split) and
:func:`end_epoch` (early stopping, learning-rate plateau, logs, history, backup), and
:func:`finish` (best weights, ``model.keras``, ``summary.json``, calibration on val).

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

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from pneumo_tf import atomic_files, cli, distribute, precision_probe, rundir
from pneumo_tf import augment as augment_lib
from pneumo_tf import model as model_lib
from pneumo_tf.data import pipeline, records
from pneumo_tf import metrics as metrics_lib
from pneumo_tf.metrics import binary_metrics
from pneumo_tf.progress import Progress
from pneumo_tf.train_config import (TrainConfig, TrainError, augment_kwargs,  # noqa: F401
                                    check_resume_flags, flags_file_text)

log = logging.getLogger("pneumo_tf.train")

METRIC_NAMES = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall")
HISTORY_COLUMNS = ("epoch",) + METRIC_NAMES + tuple(f"val_{m}" for m in METRIC_NAMES) + ("lr",)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept in ``backup/``."""


# ---------------------------------------------------------------------------------------------
# Epoch-end rules, as plain state machines (their state is saved in every backup)


@dataclasses.dataclass
class EarlyStopping:
    """Keras' EarlyStopping(min_delta=0, restore_best_weights=True) state machine.

    ``mode`` ``min`` for a loss, ``max`` for a score such as AUC; ``patience`` -1 never stops.
    """

    patience: int = 3
    best: float = math.inf
    best_epoch: int = -1
    wait: int = 0
    mode: str = "min"

    def update(self, epoch: int, value: float) -> tuple[bool, bool]:
        """Feed one epoch's monitored value. Returns ``(improved, stop)``."""
        self.wait += 1
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.best_epoch, self.wait = float(value), int(epoch), 0
            return True, False
        return False, 0 <= self.patience <= self.wait and epoch > 0


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


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 31-bit seed that depends only on ``(seed, epoch, stream)`` (data order, augmentation)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclasses.dataclass
class RunState:
    """Where a run stands; saved as JSON inside every backup, restored on resume.

    Attributes:
        next_epoch: the epoch to run next (0-based).
        step_in_epoch: steps of ``next_epoch`` already done (mid-epoch backups), else 0.
        history: one row per finished epoch (:data:`HISTORY_COLUMNS`).
        train_seconds, train_images: timed steps (the first, tracing step excluded).
        stopped_early: early stopping fired.
        resumes: the epochs this run was resumed at.
        early, plateau: the epoch-end rules' state.
    """

    early: EarlyStopping
    plateau: ReduceLROnPlateau
    next_epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    stopped_early: bool = False
    resumes: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, cfg: TrainConfig) -> "RunState":
        """The state of a run that has not trained yet."""
        mode = "max" if cfg.select_on == "val_auc" else "min"
        early = EarlyStopping(cfg.early_stop_patience, -math.inf if mode == "max" else math.inf,
                              mode=mode)
        return cls(early, ReduceLROnPlateau(cfg.lr_patience, cfg.lr_factor, cfg.min_lr))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        obj = json.loads(text)
        obj["early"] = EarlyStopping(**obj["early"])
        obj["plateau"] = ReduceLROnPlateau(**obj["plateau"])
        return cls(**obj)


# ---------------------------------------------------------------------------------------------
# The trainer: model, optimizer, loss, distributed step, checkpoint


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int, precision_policy: str):
    """The run's optimizer: Adam or AdamW, a constant (plateau-driven) or cosine learning rate,
    optional weight averaging (EMA), loss scaling under ``mixed_float16``."""
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        total = max(1, cfg.epochs * steps_per_epoch)
        warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else cfg.lr, max(1, total - warmup), alpha=cfg.min_lr / cfg.lr,
            warmup_target=cfg.lr if warmup else None, warmup_steps=warmup)
    ema = {"use_ema": cfg.ema_decay > 0, "ema_momentum": cfg.ema_decay or 0.99}
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay, **ema)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    else:
        optimizer = keras.optimizers.Adam(lr, **ema)
    if precision_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def make_loss(cfg: TrainConfig):
    """The per-example training loss: focal or cross-entropy, binary (sigmoid) or, for
    ``--task=subtype``, categorical over the softmax (focal loss generalised to softmax: each
    class's term weighted by ``(1 - p)^gamma``); optional label smoothing."""
    smooth = cfg.label_smoothing
    if cfg.task == "subtype":
        if cfg.loss == "focal":
            return keras.losses.CategoricalFocalCrossentropy(
                alpha=1.0, gamma=cfg.focal_gamma, label_smoothing=smooth, reduction=None)
        return keras.losses.CategoricalCrossentropy(label_smoothing=smooth, reduction=None)
    if cfg.loss == "focal":
        return keras.losses.BinaryFocalCrossentropy(
            gamma=cfg.focal_gamma, label_smoothing=smooth, reduction=None)
    return keras.losses.BinaryCrossentropy(label_smoothing=smooth, reduction=None)


def loss_targets(cfg: TrainConfig, labels, targets):
    """What the loss compares the output with: ``[B, 1]`` labels, or one-hot subtypes ``[B, 3]``
    (an unknown subtype, -1, is all zeros: it contributes no loss)."""
    if cfg.task == "subtype":
        return tf.one_hot(tf.cast(targets, tf.int32), len(model_lib.SUBTYPE_NAMES))
    return tf.cast(labels, tf.float32)[:, None]


def build_model(cfg: TrainConfig, image_size: int, augment: dict | None):
    """The run's model (:func:`pneumo_tf.model.build_model`)."""
    return model_lib.build_model(
        cfg.backbone, image_size, cfg.weights, cfg.trainable_layers, cfg.train_bn,
        cfg.input_norm, augment=augment, dense_units=cfg.dense_units,
        dropout=tuple(cfg.head_dropout), task=cfg.task)


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def check_weights(cfg: TrainConfig, image_size: int) -> None:
    """Make sure the backbone's starting weights can be had, before the run dir is touched.

    ``imagenet`` is fetched into the Keras cache now (a no-op when it is there); a local file is
    loaded once. A randomly initialised backbone that is mostly frozen gets a warning.

    Raises:
        TrainError: the weights cannot be downloaded or loaded (naming the ways out).
    """
    if cfg.weights in ("none", "None", ""):
        if cfg.trainable_layers >= 0:
            log.warning("--weights=none with --trainable_layers=%d: the backbone starts random "
                        "and all but its top %d layers stay random (frozen). From scratch, train "
                        "every layer: --trainable_layers=-1", cfg.trainable_layers,
                        cfg.trainable_layers)
        return
    ways_out = (f"Give a local file with --weights=PATH (the include_top=False weights of "
                f"{cfg.backbone}), put that file into the Keras cache folder {keras_cache_dir()}, "
                f"or train from scratch with --weights=none")
    try:
        model_lib.build_backbone(cfg.backbone, image_size, cfg.weights)
    except ValueError as e:  # a missing or unloadable local file, or no ImageNet weights
        raise TrainError(f"{e}. {ways_out}") from None
    except Exception as e:  # noqa: BLE001 -- the download fails in many ways (URL, SSL, proxy)
        reason = " ".join(str(e).split())[:200]
        raise TrainError(f"--weights={cfg.weights}: the ImageNet weights of {cfg.backbone} could "
                         f"not be downloaded ({type(e).__name__}: {reason}). Offline? "
                         f"{ways_out}") from None


class Trainer:
    """Model, optimizer, loss, distributed train step and checkpoint of one run.

    Build it under no particular scope (it enters the strategy's own); drive it with
    :meth:`train_step` on distributed batches of :meth:`train_dataset`, or with
    :meth:`step_on_global_batch` on a plain global batch.
    """

    def __init__(self, cfg: TrainConfig, setup: distribute.DistributionSetup, manifest: dict):
        self.cfg, self.setup, self.manifest = cfg, setup, manifest
        self.strategy = setup.strategy
        self.image_size = int(manifest["image_size"])
        self.global_batch = cfg.batch_size * setup.num_replicas
        train_count = int(manifest["splits"]["train"]["count"])
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, train_count // self.global_batch)
        self.augment = augment_kwargs(cfg, setup.jit_compile)
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.model = build_model(cfg, self.image_size, self.augment)
            self.optimizer = make_optimizer(cfg, self.steps_per_epoch, setup.precision_policy)
            self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = make_loss(cfg)
        # What the loss reads: the pneumonia probability [B, 1], or the class probabilities.
        self.net = (model_lib.class_probability_model(self.model) if cfg.task == "subtype"
                    else self.model)
        # Keras SeedGenerator states (dropout, augmentation): re-seeded per epoch, and saved.
        self.seed_states = [v for v in self.model.variables
                            if v.path.endswith("seed_generator_state")]
        # The RunState as JSON inside the same checkpoint (saved atomically with the weights).
        self.state_var = tf.Variable("{}", dtype=tf.string, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, run_state=self.state_var,
            **{f"seed_state_{i}": v.value for i, v in enumerate(self.seed_states)})
        self._step = self._make_step()
        self._predict = tf.function(lambda x: self.net(x, training=False))

    def pneumonia_probability(self, outputs):
        """``[B]`` P(PNEUMONIA) from :attr:`net`'s outputs (1 - p(NORMAL) for subtypes)."""
        return 1.0 - outputs[:, 0] if self.cfg.task == "subtype" else outputs[:, 0]

    def _replica_step(self, images, labels, weights, targets):
        with tf.GradientTape() as tape:
            outputs = self.net(images, training=True)
            per_example = self.loss_fn(loss_targets(self.cfg, labels, targets), outputs)
            if self.cfg.debug_nan_at_step >= 0:
                per_example = tf.where(
                    self.optimizer.iterations == self.cfg.debug_nan_at_step,
                    tf.fill(tf.shape(per_example), float("nan")), per_example)
            loss = tf.nn.compute_average_loss(per_example * weights,
                                              global_batch_size=self.global_batch)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss, self.pneumonia_probability(tf.cast(outputs, tf.float32))

    def _make_step(self):
        replica_fn = self._replica_step
        if self.setup.jit_compile:
            replica_fn = tf.function(replica_fn, jit_compile=True)
        strategy = self.strategy

        @tf.function
        def step(images, labels, weights, targets):
            loss, probs = strategy.run(replica_fn, args=(images, labels, weights, targets))
            return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                    strategy.gather(probs, axis=0), strategy.gather(labels, axis=0))

        return step

    def train_step(self, images, labels, weights, targets):
        """One optimizer step on a distributed batch (from :meth:`train_dataset`).

        Args:
            targets: ``[B]`` int32: the subtype for ``--task=subtype`` (ignored otherwise).

        Returns:
            ``(global mean loss, P(PNEUMONIA) [G], labels [G])`` gathered from every replica.
        """
        return self._step(images, labels, weights, targets)

    def step_on_global_batch(self, images, labels, weights, targets=None) -> float:
        """One optimizer step on a given global batch split evenly across replicas; its loss.

        Args:
            images: ``[G, S, S, 1] uint8``; labels, weights: ``[G] float32``; targets: ``[G]``
                subtypes (default: the labels); G = global batch.

        Raises:
            ValueError: G is not ``batch_size`` times the number of replicas.
        """
        per = self.cfg.batch_size
        if int(tf.shape(images)[0]) != per * self.setup.num_replicas:
            raise ValueError(f"a global batch of {int(tf.shape(images)[0])} images; expected "
                             f"--batch_size ({per}) x {self.setup.num_replicas} replicas")

        targets = tf.cast(labels if targets is None else targets, tf.int32)

        def part(ctx):
            lo = ctx.replica_id_in_sync_group * per
            return (images[lo:lo + per], labels[lo:lo + per], weights[lo:lo + per],
                    targets[lo:lo + per])

        dist = self.strategy.experimental_distribute_values_from_function(part)
        loss, _, _ = self.train_step(*dist)
        return float(loss)

    def pipeline_class_weights(self) -> str:
        """The pipeline's weight mode: per subtype for ``--task=subtype``, else per label."""
        if self.cfg.task == "subtype" and self.cfg.class_weights == "balanced":
            return "balanced_subtype"
        return self.cfg.class_weights

    def train_dataset(self, epoch: int, skip_steps: int = 0):
        """The distributed training stream of ``epoch``: order a function of (seed, epoch)."""
        cfg = self.cfg
        seed = epoch_seed(cfg.seed, epoch, 0)

        def dataset_fn(ctx):
            ds = pipeline.make_train_dataset(
                cfg.data_dir, cfg.batch_size, seed=seed, cache=cfg.cache_arg(),
                deterministic=cfg.deterministic, class_weights=self.pipeline_class_weights(),
                input_context=ctx, skip_corrupt=cfg.skip_corrupt)
            subtype = cfg.task == "subtype"
            ds = ds.map(lambda b: (b["image"], b["label"], b["weight"],
                                   b["subtype"] if subtype else tf.cast(b["label"], tf.int32)))
            if skip_steps:
                ds = ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            return ds

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def reseed(self, epoch: int) -> None:
        """Set every SeedGenerator state to a function of (seed, epoch, its index)."""
        for i, var in enumerate(self.seed_states):
            var.assign(np.array([epoch_seed(self.cfg.seed, epoch, 1 + i), 0], np.uint32))

    def predict_split(self, split: str) -> dict:
        """A whole split on this worker, in file order: ``{"label" [N], "probability" [N]}``,
        plus ``"subtype" [N]`` and ``"class_probabilities" [N, 3]`` for ``--task=subtype``."""
        ds = pipeline.make_eval_dataset(self.cfg.data_dir, split, self.cfg.val_batch_size,
                                        class_weights="none",
                                        cache=self.cfg.cache_arg(),
                                        skip_corrupt=self.cfg.skip_corrupt)
        count = int(self.manifest["splits"][split]["count"])
        bar = Progress(count, split, enabled=self.setup.is_chief)
        parts = {"label": [], "outputs": [], "subtype": []}
        for batch in pipeline.iterate_checked(ds, self.cfg.data_dir, split):
            parts["outputs"].append(np.asarray(self._predict(batch["image"]), np.float32))
            parts["label"].append(batch["label"].numpy())
            if self.cfg.task == "subtype":
                parts["subtype"].append(batch["subtype"].numpy())
            bar.update(sum(len(v) for v in parts["label"]))
        bar.close()
        outputs = np.concatenate(parts["outputs"])
        out = {"label": np.concatenate(parts["label"]),
               "probability": np.asarray(self.pneumonia_probability(outputs))}
        if self.cfg.task == "subtype":
            out.update(subtype=np.concatenate(parts["subtype"]), class_probabilities=outputs)
        return out

    def mean_loss(self, pred: dict) -> float:
        """Unweighted mean of the training loss over a :meth:`predict_split` result (Keras'
        val_loss); images of unknown subtype do not count for ``--task=subtype``."""
        if self.cfg.task == "subtype":
            known = pred["subtype"] >= 0
            targets = loss_targets(self.cfg, None, pred["subtype"][known])
            per = self.loss_fn(targets, pred["class_probabilities"][known])
        else:
            per = self.loss_fn(pred["label"][:, None].astype(np.float32),
                               pred["probability"][:, None].astype(np.float32))
        return float(np.mean(np.asarray(per)))

    def get_lr(self) -> float:
        """The learning rate of the next step (a schedule evaluated at the current step)."""
        return float(np.asarray(self.optimizer.learning_rate))

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside: the model holds the weight averages (EMA); outside, its training weights.

        A no-op without ``--ema_decay``. Validation, the best-epoch snapshot and the saved model
        use the averages; the optimizer keeps stepping the training weights.
        """
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        averages = getattr(inner, "_model_variables_moving_average", None) or []
        if not self.cfg.ema_decay or not averages:
            yield
            return
        variables = self.model.trainable_variables
        saved = [v.numpy() for v in variables]
        for var, avg in zip(variables, averages):
            var.assign(avg)
        try:
            yield
        finally:
            for var, value in zip(variables, saved):
                var.assign(value)

    def set_lr(self, lr: float) -> None:
        self.optimizer.learning_rate.assign(lr)

    def agree(self, value: float) -> float:
        """The mean of ``value`` over all workers (multi_worker only; else ``value`` itself).

        Every worker validates on the whole val split; agreeing on one number guarantees that all
        take the same early-stopping decision (a worker that stopped alone would hang the rest).
        """
        if self.setup.strategy_name != "multi_worker":
            return value
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(value, tf.float64))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None))


def _probe_candidates(setup: distribute.DistributionSetup) -> dict:
    """``{name: setup}`` of the precisions (and XLA settings) a probed run times."""
    policies = (precision_probe.CANDIDATES if setup.precision_policy == distribute.PROBE
                else (setup.precision_policy,))
    jits = (False, True) if setup.probe_jit else (setup.jit_compile,)
    return {p + ("+xla" if jit else ""): dataclasses.replace(setup, precision_policy=p,
                                                             jit_compile=jit, probe_jit=False)
            for jit in jits for p in policies}


def _time_trainer(trainer: Trainer) -> float:
    """Images/s of ``trainer``'s step on synthetic data; its variables are restored after."""
    variables = trainer.model.variables + list(trainer.optimizer.variables)
    saved = [v.numpy() for v in variables]
    try:
        return precision_probe.time_steps(trainer.step_on_global_batch, trainer.global_batch,
                                          trainer.image_size, trainer.cfg.seed)
    finally:
        for var, value in zip(variables, saved):
            var.assign(value)


def build_trainer(cfg: TrainConfig, setup: distribute.DistributionSetup,
                  manifest: dict) -> tuple[Trainer, dict | None]:
    """The run's :class:`Trainer`; for ``--precision=auto`` on a CPU, the faster candidate's.

    Every candidate is built (same seed, same initial weights) and timed on synthetic batches;
    the winner's trainer, its traced step included, trains the run with its variables restored.
    The answer is cached per machine and setup (not for multi-worker runs, whose workers must
    time together and agree).

    Returns:
        ``(trainer, probe)``: ``probe`` is ``{"candidates": {name: img/s}, "chosen", "cached"}``,
        or None when the precision was given.
    """
    candidates = _probe_candidates(setup)
    if len(candidates) == 1:
        (only,) = candidates.values()
        keras.mixed_precision.set_global_policy(only.precision_policy)
        return Trainer(cfg, only, manifest), None
    key = precision_probe.probe_key(cfg.backbone, int(manifest["image_size"]), cfg.batch_size,
                                    cfg.trainable_layers, "probe" if setup.probe_jit else
                                    str(setup.jit_compile), setup.strategy_name,
                                    setup.num_replicas)
    cached = precision_probe.read_cache(key) if setup.strategy_name != "multi_worker" else None
    if cached and cached["chosen"] in candidates:
        chosen = candidates[cached["chosen"]]
        keras.mixed_precision.set_global_policy(chosen.precision_policy)
        return Trainer(cfg, chosen, manifest), {**cached, "cached": True}
    trainers, rates = {}, {}
    for name, candidate in candidates.items():
        keras.mixed_precision.set_global_policy(candidate.precision_policy)
        trainers[name] = Trainer(cfg, candidate, manifest)
        rates[name] = round(trainers[name].agree(_time_trainer(trainers[name])), 1)
    name = precision_probe.choose(rates)
    probe = {"candidates": rates, "chosen": name, "cached": False}
    if setup.strategy_name != "multi_worker":
        precision_probe.write_cache(key, probe)
    keras.mixed_precision.set_global_policy(candidates[name].precision_policy)
    print("precision probe: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items())
          + f" -> {name}", flush=True)
    return trainers[name], probe


# ---------------------------------------------------------------------------------------------
# The loop's parts


@dataclasses.dataclass
class RunContext:
    """What the loop's parts share: settings, the trainer and the run's outputs.

    Attributes:
        best_weights: the best epoch's weights: arrays of this process, the path of
            ``best.weights.h5`` written by an earlier process (resume), or None.
        images_logged: the augmented inputs went to TensorBoard (once per process).
        first_step_done: the tracing step is behind us (it does not count as throughput).
    """

    cfg: TrainConfig
    setup: distribute.DistributionSetup
    paths: rundir.RunPaths
    trainer: Trainer
    manager: tf.train.CheckpointManager
    writers: dict | None
    steps_per_epoch: int
    profile_range: tuple[int, int] | None
    probe: dict | None = None
    best_weights: list | Path | None = None
    images_logged: bool = False
    first_step_done: bool = False
    profiling: bool = False

    @property
    def chief(self) -> bool:
        return self.setup.is_chief


def save_backup(ctx: RunContext, state: RunState) -> None:
    """Write the model, optimizer, seed states and ``state`` as the newest backup."""
    ctx.trainer.state_var.assign(state.to_json())
    ctx.manager.save(checkpoint_number=int(ctx.trainer.optimizer.iterations.numpy()))


def _profile_toggle(ctx: RunContext, global_step: int, starting: bool) -> None:
    """Start the TensorFlow profiler at ``--profile_steps``' START step, stop it after END."""
    if ctx.profile_range is None or not ctx.chief:
        return
    start, end = ctx.profile_range
    if starting and global_step == start and not ctx.profiling:
        tf.profiler.experimental.start(str(ctx.paths.tb / "train"))
        ctx.profiling = True
    elif not starting and ctx.profiling and global_step + 1 >= end:
        tf.profiler.experimental.stop()
        ctx.profiling = False


def _diverged(ctx: RunContext, loss: float, epoch: int, step: int, global_step: int,
              lr: float) -> TrainingDivergedError:
    last = tf.train.latest_checkpoint(str(ctx.paths.backup))
    return TrainingDivergedError(
        f"loss is {loss} at epoch {epoch} step {step} (global step {global_step}); training "
        f"stopped. " + (f"The last good checkpoint is kept: {last} (resumable). " if last else
                        "No checkpoint was written before the divergence. ")
        + f"Check the data, or train again in a new --run_dir with a lower --lr (now {lr:g}); "
          f"this run dir resumes only with the same flags.")


def _log_step(ctx: RunContext, images, global_step: int, loss: float, epoch: int) -> None:
    """TensorBoard: the augmented inputs once per process, the batch loss every N steps."""
    if ctx.writers is None:
        return
    if ctx.cfg.tb_images and not ctx.images_logged:
        local = ctx.trainer.strategy.experimental_local_results(images)[0]
        log_augmented_images(ctx.trainer, local, ctx.writers["train"], epoch, ctx.cfg.tb_images)
        ctx.images_logged = True
    if ctx.cfg.log_every_steps and global_step % ctx.cfg.log_every_steps == 0:
        with ctx.writers["train"].as_default():
            tf.summary.scalar("batch_loss", loss, step=global_step)


def run_epoch(ctx: RunContext, state: RunState, epoch: int, lr: float) -> dict:
    """The optimizer steps of ``epoch`` (resuming mid-epoch if the backup says so).

    Returns:
        The epoch's train metrics (``loss`` and :func:`binary_metrics` of the seen batches).

    Raises:
        TrainingDivergedError: a NaN or infinite loss.
        pipeline.CorruptShardError: a corrupt or truncated shard (named).
    """
    trainer, cfg = ctx.trainer, ctx.cfg
    skip = state.step_in_epoch if epoch == state.next_epoch else 0
    if not skip:
        trainer.reseed(epoch)
    iterator = iter(trainer.train_dataset(epoch, skip))
    losses, probs, labels = [], [], []
    bar = Progress(ctx.steps_per_epoch, f"epoch {epoch}", unit="step",
                   images_per_unit=trainer.global_batch, enabled=ctx.chief)
    for step in range(skip, ctx.steps_per_epoch):
        global_step = int(trainer.optimizer.iterations.numpy())
        _profile_toggle(ctx, global_step, starting=True)
        t0 = time.perf_counter()
        try:
            images, y, w, targets = next(iterator)
        except pipeline.DATA_LOSS_ERRORS as e:
            raise pipeline.explain_data_loss(cfg.data_dir, "train", e) from e
        loss, p, lab = trainer.train_step(images, y, w, targets)
        loss = float(loss)
        if ctx.first_step_done:  # the first step traces and compiles: not throughput
            state.train_seconds += time.perf_counter() - t0
            state.train_images += trainer.global_batch
        ctx.first_step_done = True
        _profile_toggle(ctx, global_step, starting=False)
        if not math.isfinite(loss):
            raise _diverged(ctx, loss, epoch, step, global_step, lr)
        _log_step(ctx, images, global_step, loss, epoch)
        losses.append(loss)
        probs.append(np.asarray(p))
        labels.append(np.asarray(lab))
        bar.update(step + 1, loss=float(np.mean(losses)))
        if cfg.backup_every_steps and (step + 1) % cfg.backup_every_steps == 0 \
                and step + 1 < ctx.steps_per_epoch:
            state.step_in_epoch = step + 1
            save_backup(ctx, state)
    bar.close()
    return {"loss": float(np.mean(losses)),
            **binary_metrics(np.concatenate(labels), np.concatenate(probs))}


def validate(ctx: RunContext) -> dict:
    """``val_loss`` and the ``val_*`` metrics of the whole val split (agreed across workers);
    for ``--task=subtype`` also per-class recall and one-vs-rest AUC (``val_subtype_*``)."""
    pred = ctx.trainer.predict_split("val")
    row = {f"val_{k}": v for k, v in binary_metrics(pred["label"], pred["probability"]).items()}
    row["val_loss"] = ctx.trainer.agree(ctx.trainer.mean_loss(pred))
    if "subtype" in pred:
        per_class = metrics_lib.subtype_epoch_metrics(pred["subtype"],
                                                      pred["class_probabilities"])
        row.update({f"val_subtype_{k}": v for k, v in per_class.items()})
    return row


def _write_epoch_summaries(ctx: RunContext, row: dict, epoch: int, seconds: float) -> None:
    if ctx.writers is None:
        return
    for split, prefix in (("train", ""), ("val", "val_")):
        with ctx.writers[split].as_default():
            for m in METRIC_NAMES:
                tf.summary.scalar(f"epoch_{m}", row[prefix + m], step=epoch)
            if split == "train":
                tf.summary.scalar("learning_rate", row["lr"], step=epoch)
                tf.summary.scalar("epoch_seconds", seconds, step=epoch)
            else:
                for key in (k for k in row if k.startswith("val_subtype_")):
                    tf.summary.scalar(key.removeprefix("val_"), row[key], step=epoch)
        ctx.writers[split].flush()


def end_epoch(ctx: RunContext, state: RunState, row: dict, seconds: float) -> None:
    """Apply the epoch-end rules to ``row``, log it and write the history (no backup)."""
    cfg, epoch = ctx.cfg, row["epoch"]
    state.history.append(row)
    improved, stop = state.early.update(epoch, row[cfg.select_on])
    if improved:
        ctx.best_weights = ctx.trainer.model.get_weights()
        if ctx.chief:
            with atomic_files.atomic_output(ctx.paths.best_weights, keep_suffix=True) as tmp:
                ctx.trainer.model.save_weights(str(tmp))
    new_lr = (state.plateau.update(row["val_loss"], row["lr"]) if cfg.lr_schedule == "plateau"
              else row["lr"])
    if new_lr != row["lr"]:
        log.info("epoch %d: val_loss did not improve for %d epochs; learning rate %g -> %g",
                 epoch, cfg.lr_patience, row["lr"], new_lr)
        ctx.trainer.set_lr(new_lr)
    log.debug("epoch %d (%d/%d) %.1fs: %s", epoch, epoch + 1, cfg.epochs, seconds,
              " ".join(f"{k}={row[k]:.4g}" for k in HISTORY_COLUMNS[1:]))
    print(f"epoch {epoch}: loss={row['loss']:.4f} val_loss={row['val_loss']:.4f} "
          f"val_auc={row['val_auc']:.4f} val_accuracy={row['val_accuracy']:.4f} "
          f"({seconds:.0f} s)", flush=True)
    _write_epoch_summaries(ctx, row, epoch, seconds)
    if stop:
        state.stopped_early = True
        log.info("early stopping after epoch %d: %s has not improved for %d epochs "
                 "(best %.4f at epoch %d)", epoch, cfg.select_on, cfg.early_stop_patience,
                 state.early.best, state.early.best_epoch)
    if ctx.chief:
        rundir.write_history_csv(ctx.paths.history, state.history, HISTORY_COLUMNS)
    state.next_epoch, state.step_in_epoch = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Before and after the loop


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


def completed_run(cfg: TrainConfig, paths: rundir.RunPaths,
                  setup: distribute.DistributionSetup | None, flags_text: str | None) -> dict | None:
    """The summary of a finished run (calibrating it if that did not finish), else None.

    A finished run given a larger ``--epochs`` (or ``--early_stop_patience``) than its
    ``flags.txt`` is continued instead: None is returned, and its summary says ``continuing``
    until the new epochs are done. Any other changed flag is refused (:func:`check_resume_flags`).
    """
    done = _completed_summary(paths)
    if done is None:
        return None
    if flags_text is not None and paths.flags.is_file() and check_resume_flags(
            paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags, finished=True):
        if "ensemble" not in done and tf.train.latest_checkpoint(str(paths.backup)) is None:
            raise TrainError(f"{paths.root} has finished and has no backup/ to continue from; "
                             f"train the longer run in a new --run_dir")
        log.info("continuing the finished run %s to --epochs=%d", paths.root, cfg.epochs)
        if setup is None or setup.is_chief:
            atomic_files.write_json_atomic(paths.summary, {**done, "status": "continuing"})
        return None
    log.info("run dir %s is complete (%s epochs, best epoch %s); nothing to do. Use a new "
             "--run_dir to train again, or a larger --epochs to continue it.", paths.root,
             done.get("epochs_run"), done.get("best_epoch"))
    if cfg.calibrate and not paths.calibration.is_file() and (setup is None or setup.is_chief):
        # summary.json is written before calibration: a failed or killed one is finished here.
        log.info("%s is missing; calibrating the finished run on val", paths.calibration)
        done["calibration"] = run_calibration(cfg, model=None)
        atomic_files.write_json_atomic(paths.summary, done)
    return done


def check_resume(cfg: TrainConfig, paths: rundir.RunPaths, flags_text: str | None) -> bool:
    """Refuse a resume with changed flags; whether ``flags.txt`` is to be (re)written."""
    if tf.train.latest_checkpoint(str(paths.backup)) is None:
        return True
    if flags_text is None or not paths.flags.is_file():
        return not paths.flags.is_file()
    grew = check_resume_flags(paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags)
    if grew:
        log.info("--epochs / --early_stop_patience raised to %d / %d for the resumed run",
                 cfg.epochs, cfg.early_stop_patience)
    return grew


def prepare_run_dir(paths: rundir.RunPaths, manifest: dict, setup: distribute.DistributionSetup,
                    flags_text: str | None, write_flags: bool) -> None:
    """Write ``data_manifest.json`` (once) and ``flags.txt`` (chief only)."""
    if not setup.is_chief:
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.data_manifest.is_file():
        atomic_files.write_json_atomic(paths.data_manifest, manifest)
    if flags_text is not None and write_flags:
        atomic_files.write_text_atomic(paths.flags, flags_text)


def resolve_setup(cfg: TrainConfig,
                  setup: distribute.DistributionSetup | None) -> distribute.DistributionSetup:
    """``setup`` (its precision policy applied) or the one ``cfg`` asks for; op determinism."""
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if setup is None:
        return distribute.setup_distribution(cfg.strategy, cfg.precision, cfg.jit_compile,
                                             cfg.cpu_devices)
    if setup.precision_policy != distribute.PROBE:
        keras.mixed_precision.set_global_policy(setup.precision_policy)
    return setup


def restore_state(ctx: RunContext) -> RunState:
    """The :class:`RunState` of the newest backup (every worker reads the chief's), or a new one."""
    state = RunState.start(ctx.cfg)
    latest = tf.train.latest_checkpoint(str(ctx.paths.backup))
    if latest:
        ctx.trainer.checkpoint.restore(latest).expect_partial()
        state = RunState.from_json(ctx.trainer.state_var.numpy().decode("utf-8"))
        state.resumes.append(state.next_epoch)
        # A raised --early_stop_patience applies from here on.
        state.early.patience = ctx.cfg.early_stop_patience
        state.stopped_early = state.stopped_early and 0 <= state.early.patience <= state.early.wait
        log.info("resumed from epoch %d (backup %s)", state.next_epoch, latest)
        print(f"resumed from epoch {state.next_epoch}", flush=True)
        if state.step_in_epoch:
            log.info("  ... at step %d of that epoch; its train metrics cover the remaining "
                     "steps only", state.step_in_epoch)
        if ctx.chief and state.history:
            # Drop rows of epochs the backup had not seen.
            rundir.write_history_csv(ctx.paths.history, state.history, HISTORY_COLUMNS)
    if state.early.best_epoch >= 0 and ctx.paths.best_weights.is_file():
        ctx.best_weights = ctx.paths.best_weights  # loaded at the end, unless a better epoch comes
    return state


def _tb_writers(paths: rundir.RunPaths, enabled: bool):
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

    The augmentation runs in a separate layer (:func:`pneumo_tf.augment.make_augment_layer`)
    built from the same settings, so the model's own layer (its seed-generator state, saved in
    every backup) is not advanced: logging cannot change training or break an exact resume.
    """
    shown = trainer.model.get_layer("to_float_rgb")(images[:max_images])
    if trainer.augment is not None:
        shown = augment_lib.make_augment_layer(**trainer.augment)(shown, training=True)
    with writer.as_default():
        tf.summary.image("augmented_inputs", tf.clip_by_value(shown / 255.0, 0.0, 1.0), step=step,
                         max_outputs=max_images)


def summary_config(cfg: TrainConfig, manifest: dict, trainer: Trainer) -> dict:
    """The ``config`` block of summary.json that evaluation, Grad-CAM and export read."""
    spec = model_lib.get_backbone_spec(cfg.backbone)
    return {
        "backbone": cfg.backbone, "task": cfg.task, "image_size": int(manifest["image_size"]),
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
        "lr_factor": cfg.lr_factor, "data_dir": str(cfg.data_dir), "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule,
        "warmup_epochs": cfg.warmup_epochs, "ema_decay": cfg.ema_decay,
        "label_smoothing": cfg.label_smoothing, "select_on": cfg.select_on,
    }


def start_run(cfg: TrainConfig, setup: distribute.DistributionSetup, manifest: dict,
              trainer: Trainer) -> RunContext:
    """The :class:`RunContext` of a run about to train (writers, backup manager, hparams)."""
    paths = rundir.RunPaths(cfg.run_dir)
    counts = model_lib.count_params(trainer.model)
    print(f"parameters: trainable {counts['trainable']:,}, non-trainable "
          f"{counts['non_trainable']:,}", flush=True)
    log.info("model %s at %d px; strategy %s (%d replicas), precision %s, jit_compile %s, "
             "global batch %d", cfg.backbone, trainer.image_size, setup.strategy_name,
             setup.num_replicas, setup.precision_policy, setup.jit_compile, trainer.global_batch)
    manager = tf.train.CheckpointManager(
        trainer.checkpoint, str(distribute.worker_write_dir(paths.backup, setup)), max_to_keep=2)
    return RunContext(cfg=cfg, setup=setup, paths=paths, trainer=trainer, manager=manager,
                      writers=_tb_writers(paths, setup.is_chief),
                      steps_per_epoch=trainer.steps_per_epoch,
                      profile_range=cfg.profile_range())


def _write_hparams(ctx: RunContext, s_config: dict) -> None:
    from tensorboard.plugins.hparams import api as hp_api

    with ctx.writers["hparams"].as_default():
        hp_api.hparams(_scalar_hparams(ctx.cfg, s_config), trial_id=ctx.paths.root.name)


def finish(ctx: RunContext, state: RunState, manifest: dict) -> dict:
    """Restore the best epoch's weights, save ``model.keras``, write ``summary.json``, calibrate.

    Returns:
        The summary (also ``summary.json``).
    """
    trainer, setup = ctx.trainer, ctx.setup
    if ctx.profiling:
        tf.profiler.experimental.stop()
    if isinstance(ctx.best_weights, Path):  # EarlyStopping(restore_best_weights=True)
        trainer.model.load_weights(str(ctx.best_weights))
    elif ctx.best_weights is not None:
        trainer.model.set_weights(ctx.best_weights)
    model_dir = distribute.worker_write_dir(ctx.paths.root, setup)
    with atomic_files.atomic_output(model_dir / ctx.paths.model.name, keep_suffix=True) as tmp:
        trainer.model.save(str(tmp))
    distribute.discard_worker_dir(ctx.manager.directory, setup)
    distribute.discard_worker_dir(model_dir, setup)
    summary = run_summary(ctx, state, manifest)
    if ctx.chief:
        # Complete before calibrating: a failed or killed calibration is redone by a re-run.
        summary["calibration"] = "pending" if ctx.cfg.calibrate else "skipped: --nocalibrate"
        atomic_files.write_json_atomic(ctx.paths.summary, summary)
        summary["calibration"] = run_calibration(ctx.cfg, trainer.model)
        summary["ood"] = run_ood_fit(ctx.cfg, trainer.model)
        atomic_files.write_json_atomic(ctx.paths.summary, summary)
        for w in (ctx.writers or {}).values():
            w.close()
    log.info("done: %d epochs, best epoch %d (%s %.4f); model in %s", len(state.history),
             state.early.best_epoch, ctx.cfg.select_on, state.early.best, ctx.paths.model)
    return summary


def run_summary(ctx: RunContext, state: RunState, manifest: dict) -> dict:
    """The content of ``summary.json`` (before calibration)."""
    setup, trainer = ctx.setup, ctx.trainer
    best = state.early.best_epoch
    best_row = state.history[best] if 0 <= best < len(state.history) else {}
    secs = state.train_seconds
    return {
        "status": "complete", "precision_policy": setup.precision_policy,
        "precision_probe": ctx.probe,
        "jit_compile": setup.jit_compile, "strategy": setup.strategy_name,
        "num_replicas": setup.num_replicas, "device_kind": setup.device_kind,
        "epochs_run": len(state.history), "best_epoch": best, "selected_on": ctx.cfg.select_on,
        "best_val_loss": best_row.get("val_loss", state.early.best),
        "best_val_metrics": {k: v for k, v in best_row.items() if k.startswith("val_")},
        "stopped_early": state.stopped_early, "steps_per_epoch": ctx.steps_per_epoch,
        "global_batch_size": trainer.global_batch,
        "train_images_per_sec": state.train_images / secs if secs > 0 else None,
        "params": model_lib.count_params(trainer.model), "resumed_from_epochs": state.resumes,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "config": summary_config(ctx.cfg, manifest, trainer),
    }


def run_calibration(cfg: TrainConfig, model) -> str:
    """Fit temperature and threshold on val (pneumo_tf.calibration) if asked.

    A failure is logged, never raised: training has finished and its files are complete.
    ``model`` None loads the run's ``model.keras``.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.calibrate:
        return "skipped: --nocalibrate"
    from pneumo_tf import calibration  # scikit-learn and the scoring path: only when needed

    try:
        calibration.calibrate_run(cfg.run_dir, cfg.data_dir, model=model,
                                  batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("calibration on val failed (%s: %s); training is complete. Re-run it with "
                  "`python -m pneumo_tf.evaluate --run_dir=%s --split=val`", type(e).__name__, e,
                  cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


def run_ood_fit(cfg: TrainConfig, model) -> str:
    """Fit the out-of-distribution guard (pneumo_tf.ood) if asked; a failure is logged.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.fit_ood:
        return "skipped: --nofit_ood"
    from pneumo_tf import ood

    try:
        ood.fit_run(cfg.run_dir, cfg.data_dir, cfg.ood_val_rate, model=model,
                    batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("fitting the out-of-distribution guard failed (%s: %s); training is "
                  "complete. Re-run it with `python -m pneumo_tf.ood --run_dir=%s`",
                  type(e).__name__, e, cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


# ---------------------------------------------------------------------------------------------
# The run


def train_ensemble(cfg: TrainConfig, setup: distribute.DistributionSetup | None,
                   flags_text: str | None) -> dict:
    """Train one member per ``--ensemble_seeds`` seed, then make ``cfg.run_dir`` their ensemble.

    Members live in ``RUN_DIR/members/seed_N`` and resume (or are skipped when complete) like
    any run; the ensemble (:func:`pneumo_tf.ensemble.create_ensemble`) is written last.
    """
    from pneumo_tf import ensemble

    paths = rundir.RunPaths(cfg.run_dir)
    if flags_text is not None and paths.flags.is_file():
        check_resume_flags(paths.flags.read_text(encoding="utf-8"), flags_text, paths.flags)
    paths.root.mkdir(parents=True, exist_ok=True)
    if flags_text is not None:
        atomic_files.write_text_atomic(paths.flags, flags_text)
    members = []
    for seed in cfg.member_seeds():
        member = dataclasses.replace(cfg, seed=seed, ensemble_seeds="",
                                     run_dir=str(paths.root / "members" / f"seed_{seed}"))
        print(f"ensemble member seed {seed} -> {member.run_dir}", flush=True)
        train(member, setup, flags_file_text(member) if flags_text is not None else None)
        members.append(member.run_dir)
    if setup is not None and not setup.is_chief:
        return {"status": "complete", "ensemble": {"members": members}}
    summary = ensemble.create_ensemble(members, cfg.run_dir, cfg.data_dir, cfg.calibrate)
    summary["ood"] = run_ood_fit(cfg, None)
    atomic_files.write_json_atomic(paths.summary, summary)
    print(f"ensemble of {len(members)} members -> {cfg.run_dir}", flush=True)
    return summary


def train(cfg: TrainConfig, setup: distribute.DistributionSetup | None = None,
          flags_text: str | None = None) -> dict:
    """Train (or resume, or report complete) the run ``cfg.run_dir``; see the module docstring.

    Args:
        cfg: the run's settings.
        setup: resolved distribution; None resolves it from ``cfg`` (strategy, precision, XLA).
        flags_text: contents for ``flags.txt`` (a flagfile repeating the run).

    Returns:
        The summary dict (also ``summary.json``).

    Raises:
        TrainError, records.DataDirError, rundir.RunDirError: before training, naming the fix.
        TrainingDivergedError: NaN/inf loss; the last good backup stays in ``backup/``.
    """
    cfg.validate()
    cfg.profile_range()
    paths = rundir.RunPaths(cfg.run_dir)
    done = completed_run(cfg, paths, setup, flags_text)
    if done is not None:
        return done
    if cfg.member_seeds():
        return train_ensemble(cfg, setup, flags_text)
    manifest = check_data(cfg)
    check_weights(cfg, int(manifest["image_size"]))
    write_flags = check_resume(cfg, paths, flags_text)
    setup = resolve_setup(cfg, setup)
    prepare_run_dir(paths, manifest, setup, flags_text, write_flags)
    trainer, probe = build_trainer(cfg, setup, manifest)
    ctx = start_run(cfg, trainer.setup, manifest, trainer)
    ctx.probe = probe
    state = restore_state(ctx)
    if ctx.writers is not None and not state.resumes:
        _write_hparams(ctx, summary_config(cfg, manifest, trainer))
    while state.next_epoch < cfg.epochs and not state.stopped_early:
        epoch = state.next_epoch
        lr = float(f"{trainer.get_lr():.7g}")  # float32 variable -> the decimal it was set to
        t0 = time.perf_counter()
        row = {"epoch": epoch, **run_epoch(ctx, state, epoch, lr)}
        seconds = time.perf_counter() - t0
        with trainer.averaged_weights():
            row.update(validate(ctx), lr=lr)
            end_epoch(ctx, state, row, seconds)
        save_backup(ctx, state)
    return finish(ctx, state, manifest)


# ---------------------------------------------------------------------------------------------
# Command line

FLAG_HOLDERS = cli.define_config_flags(TrainConfig, module_name=__name__)
if "profile" not in flags.FLAGS:  # the flag's earlier name, still accepted
    flags.DEFINE_alias("profile", "profile_steps", module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv)
    # Logical CPUs must exist before TensorFlow initialises its devices: first thing.
    distribute.configure_cpu_devices(FLAG_HOLDERS["cpu_devices"].value)
    cfg = cli.config_from_flags(TrainConfig, FLAG_HOLDERS)
    cfg.validate()
    check_data(cfg)  # fail fast, before a strategy or model is built
    setup = distribute.setup_distribution(cfg.strategy, cfg.precision, cfg.jit_compile,
                                          cfg.cpu_devices)
    train(cfg, setup, flags_text=flags_file_text(cfg))


def run() -> None:
    cli.run_app(main, "pneumo_tf.train", errors=(TrainingDivergedError,))


if __name__ == "__main__":
    run()
