"""The training loop: ``python -m pneumo_tf.train --flagfile=configs/paper.cfg`` runs it.

:func:`train` reads top to bottom like the run it performs: check the data, set up the run
directory (:mod:`pneumo_tf.training.resume`) and the distribution, build the
:class:`~pneumo_tf.training.trainer.Trainer` (the task's model and loss, the optimizer, the
distributed step, the checkpoint), restore the :class:`RunState` from the last backup, then per
epoch :func:`run_epoch` (the optimizer steps), :func:`validate` (the whole val split, the task's
metrics) and :func:`end_epoch` (early stopping, learning-rate plateau, logs, history, backup),
and :func:`finish` (best weights, ``model.keras``, ``summary.json``, then the
:class:`AfterTraining` steps the caller declared: :mod:`pneumo_tf.training.session` declares
calibration on val and the OOD fit).

One training path for every ``tf.distribute`` strategy: a compact custom loop (``strategy.run``
on a ``tf.function`` train step, ``tf.train.CheckpointManager`` for backup/resume). Keras 3's
``model.fit`` is not used because it fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585); the callback behaviours the paper relies on are small named pieces
here instead: :class:`EarlyStopping`, :class:`ReduceLROnPlateau`, TensorBoard logging, best
weights, backup/restore, terminate on NaN and the CSV history.

Run directory (:class:`pneumo_tf.core.rundir.RunPaths`): the same ``--run_dir`` again resumes
from the last backup (``resumed from epoch N``) if the flags match its ``flags.txt``
(``--epochs`` may grow); a finished run says it is complete (and runs a missing after-training
step, such as a missing ``calibration.json``).

Exact resume: each epoch's data order and augmentation randomness are functions of
``(seed, epoch)`` only (the training dataset is re-created per epoch with a seed derived from
both, and every keras ``SeedGenerator`` in the model is re-seeded at the start of each epoch),
so with ``--deterministic`` a run killed and resumed reproduces the uninterrupted history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.core.progress import Progress
from pneumo_tf.data import pipeline, records
from pneumo_tf.image import augment as augment_lib
from pneumo_tf.modeling import model as model_lib
from pneumo_tf.training import distribute, resume
from pneumo_tf.training import task as task_lib
from pneumo_tf.training.config import TrainConfig, TrainError
from pneumo_tf.training.trainer import Trainer, build_trainer, check_weights

log = logging.getLogger("pneumo_tf.train")

METRIC_NAMES = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall")


def history_columns(metric_names: tuple = METRIC_NAMES) -> tuple:
    """The columns of ``history.csv`` for a task's epoch metrics."""
    return ("epoch",) + metric_names + tuple(f"val_{m}" for m in metric_names) + ("lr",)


# The classifier's history columns.
HISTORY_COLUMNS = history_columns()


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept in ``backup/``."""


@dataclasses.dataclass(frozen=True)
class AfterTraining:
    """A step on the finished model, declared by the loop's owner (the loop knows no step).

    Its result string (``ok``, ``skipped: ...``, ``failed: ...``) becomes ``summary.json[name]``;
    :mod:`pneumo_tf.training.session` declares calibration on val and the OOD fit.

    Attributes:
        name: its key in ``summary.json``.
        run: ``(cfg, run) -> str`` on the finished run's :class:`~pneumo_tf.core.rundir.Run`
            (opened once by the loop, holding the model it has just saved). Logs, never raises.
        pending: ``cfg -> str`` written to ``summary.json`` before the step runs (None: nothing).
        redo: ``(cfg, paths) -> bool``: a finished run lacks the step's output; a re-run of the
            run directory runs it again (None: never).
    """

    name: str
    run: Callable[[TrainConfig, rundir.Run], str]
    pending: Callable[[TrainConfig], str] | None = None
    redo: Callable[[TrainConfig, rundir.RunPaths], bool] | None = None


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
        mode = "min" if cfg.select_on == "val_loss" else "max"
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
    after_training: tuple = ()

    @property
    def chief(self) -> bool:
        return self.setup.is_chief

    @property
    def metric_names(self) -> tuple:
        """The task's epoch metrics."""
        return self.trainer.task.metric_names

    @property
    def history_columns(self) -> tuple:
        return history_columns(self.metric_names)


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
    if ctx.cfg.tb_images and not ctx.images_logged and ctx.trainer.task.classifier:
        local = ctx.trainer.strategy.experimental_local_results(images)[0]
        log_augmented_images(ctx.trainer, local, ctx.writers["train"], epoch, ctx.cfg.tb_images)
        ctx.images_logged = True
    if ctx.cfg.log_every_steps and global_step % ctx.cfg.log_every_steps == 0:
        with ctx.writers["train"].as_default():
            tf.summary.scalar("batch_loss", loss, step=global_step)


def run_epoch(ctx: RunContext, state: RunState, epoch: int, lr: float) -> dict:
    """The optimizer steps of ``epoch`` (resuming mid-epoch if the backup says so).

    Returns:
        The epoch's train metrics (``loss`` and the task's
        :meth:`~pneumo_tf.training.task.Task.train_metrics` of the seen batches).

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
            **trainer.task.train_metrics(np.concatenate(labels), np.concatenate(probs))}


def validate(ctx: RunContext) -> dict:
    """The task's ``val_*`` row of the whole val split (``val_loss`` agreed across workers;
    :meth:`pneumo_tf.training.task.Task.val_metrics`)."""
    return ctx.trainer.val_metrics()


def _write_epoch_summaries(ctx: RunContext, row: dict, epoch: int, seconds: float) -> None:
    if ctx.writers is None:
        return
    for split, prefix in (("train", ""), ("val", "val_")):
        with ctx.writers[split].as_default():
            for m in ctx.metric_names:
                tf.summary.scalar(f"epoch_{m}", row[prefix + m], step=epoch)
            if split == "train":
                tf.summary.scalar("learning_rate", row["lr"], step=epoch)
                tf.summary.scalar("epoch_seconds", seconds, step=epoch)
            else:
                for key in (k for k in row if k.startswith("val_subtype_")):
                    tf.summary.scalar(key.removeprefix("val_"), row[key], step=epoch)
                if ctx.cfg.tb_images:
                    ctx.trainer.task.epoch_images(ctx.trainer, ctx.writers[split], epoch,
                                                  ctx.cfg.tb_images)
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
              " ".join(f"{k}={row[k]:.4g}" for k in ctx.history_columns[1:]))
    shown = ("loss", "val_loss") + (("val_auc", "val_accuracy") if ctx.trainer.task.classifier
                                    else tuple(f"val_{m}" for m in ctx.metric_names[1:]))
    print(f"epoch {epoch}: " + " ".join(f"{k}={row[k]:.4f}" for k in shown)
          + f" ({seconds:.0f} s)", flush=True)
    _write_epoch_summaries(ctx, row, epoch, seconds)
    if stop:
        state.stopped_early = True
        log.info("early stopping after epoch %d: %s has not improved for %d epochs "
                 "(best %.4f at epoch %d)", epoch, cfg.select_on, cfg.early_stop_patience,
                 state.early.best, state.early.best_epoch)
    if ctx.chief:
        rundir.write_history_csv(ctx.paths.history, state.history, ctx.history_columns)
    state.next_epoch, state.step_in_epoch = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Before and after the loop


def check_data(cfg: TrainConfig) -> dict:
    """Check the data dir (and the run dir's manifest on resume) before anything is built.

    Returns:
        The data dir's manifest.

    Raises:
        records.DataDirError: no manifest, an empty/missing train or val split, missing shards,
            data the task cannot train on (``--task=lungs`` without lung masks).
        rundir.RunDirError: resuming with data whose image size, crop or encoding differ.
    """
    manifest = records.read_manifest(cfg.data_dir)
    for split in ("train", "val"):
        records.split_shards(cfg.data_dir, manifest, split)
    task_lib.get_task(cfg.task).check_data(cfg, manifest)
    if rundir.RunPaths(cfg.run_dir).data_manifest.is_file():
        rundir.check_data_compatible(cfg.run_dir, cfg.data_dir)
    return manifest


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
            rundir.write_history_csv(ctx.paths.history, state.history, ctx.history_columns)
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

    The augmentation runs in a separate layer (:func:`pneumo_tf.image.augment.make_augment_layer`)
    built from the same settings, so the model's own layer (its seed-generator state, saved in
    every backup) is not advanced: logging cannot change training or break an exact resume.
    """
    shown = trainer.model.get_layer("to_float_rgb")(images[:max_images])
    if trainer.augment is not None:
        shown = augment_lib.make_augment_layer(**trainer.augment)(shown, training=True)
    with writer.as_default():
        tf.summary.image("augmented_inputs", tf.clip_by_value(shown / 255.0, 0.0, 1.0), step=step,
                         max_outputs=max_images)


def _cam_layer(cfg: TrainConfig, spec: model_lib.BackboneSpec, trainer: Trainer) -> str:
    """The run's default Grad-CAM layer: the layer ``--cam_penalty`` explained, else the
    backbone's (its ``gated_cam_layer`` with a lung gate)."""
    if cfg.cam_penalty:
        return model_lib.get_backbone(trainer.model).layers[-1].name
    return (spec.gated_cam_layer or spec.cam_layer) if cfg.lung_gate else spec.cam_layer


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
        "cam_layer": _cam_layer(cfg, spec, trainer),
        "augment": trainer.augment, "loss": cfg.loss,
        "focal_gamma": cfg.focal_gamma, "class_weights": cfg.class_weights, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "global_batch_size": trainer.global_batch,
        "epochs": cfg.epochs, "seed": cfg.seed, "deterministic": cfg.deterministic,
        "early_stop_patience": cfg.early_stop_patience, "lr_patience": cfg.lr_patience,
        "lr_factor": cfg.lr_factor, "data_dir": str(cfg.data_dir), "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule,
        "warmup_epochs": cfg.warmup_epochs, "ema_decay": cfg.ema_decay,
        "label_smoothing": cfg.label_smoothing, "select_on": cfg.select_on,
        **trainer.task.summary_config(cfg),
    }


def start_run(cfg: TrainConfig, setup: distribute.DistributionSetup, manifest: dict,
              trainer: Trainer) -> RunContext:
    """The :class:`RunContext` of a run about to train (writers, backup manager, hparams)."""
    paths = rundir.RunPaths(cfg.run_dir)
    counts = model_lib.count_params(trainer.model)
    print(f"parameters: trainable {counts['trainable']:,}, non-trainable "
          f"{counts['non_trainable']:,}", flush=True)
    log.info("model %s at %d px; strategy %s (%d replicas), precision %s, jit_compile %s, "
             "global batch %d", trainer.task.model_key(cfg), trainer.image_size, setup.strategy_name,
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
    """Restore the best epoch's weights, save ``model.keras``, write ``summary.json``, run the
    after-training steps.

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
        # Complete before the after-training steps: a failed or killed one is redone by a re-run.
        for step in ctx.after_training:
            if step.pending is not None:
                summary[step.name] = step.pending(ctx.cfg)
        atomic_files.write_json_atomic(ctx.paths.summary, summary)
        run = rundir.Run(ctx.paths.root, model=trainer.model)
        for step in ctx.after_training:
            summary[step.name] = step.run(ctx.cfg, run)
        atomic_files.write_json_atomic(ctx.paths.summary, summary)
        for w in (ctx.writers or {}).values():
            w.close()
    log.info("done: %d epochs, best epoch %d (%s %.4f); model in %s", len(state.history),
             state.early.best_epoch, ctx.cfg.select_on, state.early.best, ctx.paths.model)
    return summary


def run_summary(ctx: RunContext, state: RunState, manifest: dict) -> dict:
    """The content of ``summary.json`` (before the after-training steps)."""
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


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, setup: distribute.DistributionSetup | None = None,
          flags_text: str | None = None, after_training: tuple = ()) -> dict:
    """Train (or resume, or report complete) the run ``cfg.run_dir``; see the module docstring.

    Args:
        cfg: the run's settings (one run: ``--ensemble_seeds`` is
            :func:`pneumo_tf.training.session.train`'s).
        setup: resolved distribution; None resolves it from ``cfg`` (strategy, precision, XLA).
        flags_text: contents for ``flags.txt`` (a flagfile repeating the run).
        after_training: :class:`AfterTraining` steps run on the finished model, in order.

    Returns:
        The summary dict (also ``summary.json``).

    Raises:
        TrainError, records.DataDirError, rundir.RunDirError: before training, naming the fix.
        TrainingDivergedError: NaN/inf loss; the last good backup stays in ``backup/``.
    """
    cfg.validate()
    cfg.profile_range()
    paths = rundir.RunPaths(cfg.run_dir)
    done = resume.completed_run(cfg, paths, setup, flags_text, after_training)
    if done is not None:
        return done
    if cfg.member_seeds():
        raise TrainError("--ensemble_seeds: train ensembles with "
                         "pneumo_tf.training.session.train (python -m pneumo_tf.train)")
    manifest = check_data(cfg)
    if task_lib.get_task(cfg.task).classifier:  # a backbone's starting weights
        check_weights(cfg, int(manifest["image_size"]))
    write_flags = resume.check_resume(cfg, paths, flags_text)
    setup = resolve_setup(cfg, setup)
    resume.prepare_run_dir(paths, manifest, setup, flags_text, write_flags)
    trainer, probe = build_trainer(cfg, setup, manifest)
    ctx = start_run(cfg, trainer.setup, manifest, trainer)
    ctx.probe, ctx.after_training = probe, tuple(after_training)
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
