"""The trainer: a task's model, the optimizer, the distributed train step and the checkpoint.

:class:`Trainer` is task-free: what the model, the loss and the metrics are comes from the run's
:class:`pneumo_tf.training.task.Task` (``--task``). :func:`build_trainer` also runs the
precision probe (``--precision=auto`` on a CPU: every candidate timed, the fastest kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumo_tf.data import pipeline
from pneumo_tf.evaluation import scoring
from pneumo_tf.modeling import model as model_lib
from pneumo_tf.training import distribute, precision_probe
from pneumo_tf.training import task as task_lib
from pneumo_tf.training.config import TrainConfig, TrainError, augment_kwargs

log = logging.getLogger("pneumo_tf.train")


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 31-bit seed that depends only on ``(seed, epoch, stream)`` (data order, augmentation)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0] & 0x7FFFFFFF)


class _FusedAdamUpdate:
    """Adam's update of one variable as TensorFlow's fused ``ResourceApplyAdam`` kernel.

    The same arithmetic as Keras' ``Adam.update_step`` (both moments, the bias-corrected step
    ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``, epsilon added to ``sqrt(v)``), on the same
    slot variables (checkpoints and resumes see no difference), in one graph op per variable in
    place of Keras' ~40: a train step traces in about half the time and makes its first call in
    0.6 times it, and steps as fast or faster (``tools/bench_optimizer``, BUILD.md).
    ``amsgrad`` and sparse gradients keep Keras' own update.
    """

    def update_step(self, gradient, variable, learning_rate):
        if (self.amsgrad or isinstance(gradient, tf.IndexedSlices)
                or not hasattr(variable, "handle")):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle, beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


class Adam(_FusedAdamUpdate, keras.optimizers.Adam):
    """Keras' Adam with the fused update (:class:`_FusedAdamUpdate`)."""


class AdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """Keras' AdamW (its decoupled weight decay unchanged) with the fused update."""


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
        optimizer = AdamW(lr, weight_decay=cfg.weight_decay, **ema)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    else:
        optimizer = Adam(lr, **ema)
    if precision_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
        self.task = task_lib.get_task(cfg.task)
        train_count = self.task.split_count(manifest, "train")
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, train_count // self.global_batch)
        self.augment = augment_kwargs(cfg, setup.jit_compile)
        keras.utils.set_random_seed(cfg.seed)
        with self.strategy.scope():
            self.model = self.task.build_model(cfg, self.image_size, self.augment)
            # Layers of the train step beside the model (the lungs task's joint augmentation).
            self.train_layers = self.task.train_layers(cfg, self.augment)
            self.optimizer = make_optimizer(cfg, self.steps_per_epoch, setup.precision_policy)
            self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = self.task.make_loss(cfg)
        # What the loss reads (the task's): the pneumonia probability, or class probabilities.
        self.net = self.task.loss_net(self.model)
        # What the task builds on this trainer's model at its first step (the evidence penalty
        # of --cam_penalty): tasks are shared by every trainer of the process, these are not.
        self.task_parts: dict = {}
        # Keras SeedGenerator states (dropout, augmentation): re-seeded per epoch, and saved.
        variables = self.model.variables + [v for layer in self.train_layers.values()
                                            for v in layer.variables]
        self.seed_states = [v for v in variables if v.path.endswith("seed_generator_state")]
        # The RunState as JSON inside the same checkpoint (saved atomically with the weights).
        self.state_var = tf.Variable("{}", dtype=tf.string, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, run_state=self.state_var,
            **{f"seed_state_{i}": v.value for i, v in enumerate(self.seed_states)})
        self._step = self._make_step()
        self._predict = tf.function(lambda x: self.net(x, training=False), autograph=False)
        self._eval_datasets: dict[str, tf.data.Dataset] = {}

    def _replica_step(self, images, labels, weights, targets):
        with tf.GradientTape() as tape:
            per_example, outputs, loss_targets = self.task.per_example_loss(self, images, labels,
                                                                            targets)
            loss = tf.nn.compute_average_loss(per_example * weights,
                                              global_batch_size=self.global_batch)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss, self.task.train_scores(tf.cast(outputs, tf.float32), loss_targets)

    def _make_step(self):
        replica_fn = self._replica_step
        if self.setup.jit_compile:
            replica_fn = tf.function(replica_fn, jit_compile=True, autograph=False)
        strategy = self.strategy

        @tf.function(autograph=False)
        def step(images, labels, weights, targets):
            loss, probs = strategy.run(replica_fn, args=(images, labels, weights, targets))
            return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                    strategy.gather(probs, axis=0), strategy.gather(labels, axis=0))

        return step

    def train_step(self, images, labels, weights, targets):
        """One optimizer step on a distributed batch (from :meth:`train_dataset`).

        Args:
            targets: the task's targets: ``[B]`` int32 (the label, or the subtype for
                ``--task=subtype``), ``[B, S, S, 1]`` uint8 masks for ``--task=lungs``.

        Returns:
            ``(global mean loss, scores [G], labels [G])`` gathered from every replica (the
            task's :meth:`~pneumo_tf.training.task.Task.train_scores`: P(PNEUMONIA)).
        """
        return self._step(images, labels, weights, targets)

    def step_on_global_batch(self, images, labels, weights, targets=None) -> float:
        """One optimizer step on a given global batch split evenly across replicas; its loss.

        Args:
            images: ``[G, S, S, 1] uint8``; labels, weights: ``[G] float32``; targets: the
                task's (default: its :meth:`~pneumo_tf.training.task.Task.synthetic_targets`);
                G = global batch.

        Raises:
            ValueError: G is not ``batch_size`` times the number of replicas.
        """
        per = self.cfg.batch_size
        if int(tf.shape(images)[0]) != per * self.setup.num_replicas:
            raise ValueError(f"a global batch of {int(tf.shape(images)[0])} images; expected "
                             f"--batch_size ({per}) x {self.setup.num_replicas} replicas")

        if targets is None:
            targets = self.task.synthetic_targets(images, labels)

        def part(ctx):
            lo = ctx.replica_id_in_sync_group * per
            return (images[lo:lo + per], labels[lo:lo + per], weights[lo:lo + per],
                    targets[lo:lo + per])

        dist = self.strategy.experimental_distribute_values_from_function(part)
        loss, _, _ = self.train_step(*dist)
        return float(loss)

    def pipeline_class_weights(self) -> str:
        """The pipeline's weight mode (the task's: per subtype for ``--task=subtype``)."""
        return self.task.pipeline_class_weights(self.cfg)

    def train_dataset(self, epoch: int, skip_steps: int = 0):
        """The distributed training stream of ``epoch``: order a function of (seed, epoch)."""
        cfg = self.cfg
        seed = epoch_seed(cfg.seed, epoch, 0)

        def dataset_fn(ctx):
            ds = self.task.train_dataset(cfg, seed, self.pipeline_class_weights(), ctx)
            ds = ds.map(pipeline.without_autograph(self.task.step_inputs))
            if skip_steps:
                ds = ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            return ds

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def reseed(self, epoch: int) -> None:
        """Set every SeedGenerator state to a function of (seed, epoch, its index)."""
        for i, var in enumerate(self.seed_states):
            var.assign(np.array([epoch_seed(self.cfg.seed, epoch, 1 + i), 0], np.uint32))

    def predict_split(self, split: str) -> dict:
        """A whole split on this worker, in file order, as the task's arrays
        (:meth:`~pneumo_tf.training.task.Task.finish_prediction`)."""
        # One dataset per split for the whole run: its pipeline is built (and its functions
        # traced) once, and a split cached in RAM is decoded in the first pass only.
        if split not in self._eval_datasets:
            self._eval_datasets[split] = self.task.eval_dataset(self.cfg, split)
        batches = pipeline.iterate_checked(self._eval_datasets[split], self.cfg.data_dir, split)
        parts = scoring.collect_batches(
            batches, lambda images: np.asarray(self._predict(images), np.float32),
            self.task.collect, self.task.split_count(self.manifest, split),
            split if self.setup.is_chief else None)
        return self.task.finish_prediction(parts)

    def predict_images(self, images):
        """What the loss reads for a batch of images, in inference mode."""
        return self._predict(images)

    def val_metrics(self) -> dict:
        """The task's ``val_*`` row of the whole val split, ``val_loss`` agreed across workers."""
        row = self.task.val_metrics(self.cfg, self.predict_split("val"), self.loss_fn)
        row["val_loss"] = self.agree(row["val_loss"])
        return row

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
    key = precision_probe.probe_key(task_lib.get_task(cfg.task).model_key(cfg), int(manifest["image_size"]), cfg.batch_size,
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
