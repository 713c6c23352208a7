"""Tasks: what a kind of model brings to the one training loop (``--task`` chooses one).

The loop (:mod:`pneumo_tf.training.loop`) and the trainer (:mod:`pneumo_tf.training.trainer`)
know nothing of classes or masks; a :class:`Task` does:

- :meth:`Task.build_model`: the model (from the backbone registry of
  :mod:`pneumo_tf.modeling.model`, or the task's own builder);
- :meth:`Task.make_loss`, :meth:`Task.loss_net`, :meth:`Task.loss_targets`: the per-example loss,
  which model output it reads and what it compares that output with;
- :meth:`Task.step_inputs`, :meth:`Task.pipeline_class_weights`: a pipeline batch as the train
  step's ``(images, labels, weights, targets)``;
- :meth:`Task.train_scores`: the ``[B]`` score the epoch's train metrics read;
- :meth:`Task.collect`, :meth:`Task.finish_prediction`: a scored split as arrays;
- :meth:`Task.val_metrics`: the epoch's ``val_*`` row (``val_loss`` included).

A new task (a lung segmentation with its own U-Net, Dice + cross-entropy loss and Dice/IoU
metrics) is a subclass registered in :data:`TASKS` under its ``--task`` name; its ``val_*`` keys
must include the ``--select_on`` metric and ``val_loss``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import keras

from pneumo_tf.evaluation import metrics as metrics_lib
from pneumo_tf.modeling import model as model_lib


class Task:
    """The interface: every method gets the run's ``TrainConfig`` (``cfg``) where it needs it."""

    name = ""
    # The epoch metrics of the history (train ``m`` and ``val_m`` for each).
    metric_names = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall")

    def build_model(self, cfg, image_size: int, augment: dict | None) -> keras.Model:
        raise NotImplementedError

    def make_loss(self, cfg):
        """The per-example loss ``(targets, outputs) -> [B]``."""
        raise NotImplementedError

    def loss_net(self, model: keras.Model) -> keras.Model:
        """The model whose outputs the loss reads (default: the model)."""
        return model

    def loss_targets(self, cfg, labels, targets):
        raise NotImplementedError

    def step_inputs(self, batch: dict) -> tuple:
        """A pipeline batch -> ``(images, labels, weights, targets)`` of the train step."""
        raise NotImplementedError

    def pipeline_class_weights(self, cfg) -> str:
        return cfg.class_weights

    def train_scores(self, outputs):
        """``[B]`` float32 scores of :meth:`loss_net`'s outputs for the train metrics."""
        raise NotImplementedError

    def collect(self, batch: dict, outputs: np.ndarray, parts: dict) -> None:
        """Add one scored eval batch to ``parts`` (lists of arrays)."""
        raise NotImplementedError

    def finish_prediction(self, parts: dict) -> dict:
        """The collected ``parts`` as one dict of arrays (a scored split)."""
        raise NotImplementedError

    def val_metrics(self, cfg, pred: dict, loss_fn) -> dict:
        """The epoch's ``val_*`` row of a scored val split (``val_loss`` unagreed)."""
        raise NotImplementedError


class ClassifierTask(Task):
    """PNEUMONIA vs NORMAL (``binary``: a sigmoid), or NORMAL / BACTERIAL / VIRAL (``subtype``:
    a three-way softmax whose pneumonia probability is ``1 - p(NORMAL)``)."""

    def __init__(self, name: str):
        self.name = name
        self.subtype = name == "subtype"

    def build_model(self, cfg, image_size: int, augment: dict | None) -> keras.Model:
        """The run's model (:func:`pneumo_tf.modeling.model.build_model`)."""
        return model_lib.build_model(
            cfg.backbone, image_size, cfg.weights, cfg.trainable_layers, cfg.train_bn,
            cfg.input_norm, augment=augment, dense_units=cfg.dense_units,
            dropout=tuple(cfg.head_dropout), task=self.name)

    def make_loss(self, cfg):
        """Focal or cross-entropy, binary (sigmoid) or, for ``subtype``, categorical over the
        softmax (focal loss generalised to softmax: each class's term weighted by
        ``(1 - p)^gamma``); optional label smoothing."""
        smooth = cfg.label_smoothing
        if self.subtype:
            if cfg.loss == "focal":
                return keras.losses.CategoricalFocalCrossentropy(
                    alpha=1.0, gamma=cfg.focal_gamma, label_smoothing=smooth, reduction=None)
            return keras.losses.CategoricalCrossentropy(label_smoothing=smooth, reduction=None)
        if cfg.loss == "focal":
            return keras.losses.BinaryFocalCrossentropy(
                gamma=cfg.focal_gamma, label_smoothing=smooth, reduction=None)
        return keras.losses.BinaryCrossentropy(label_smoothing=smooth, reduction=None)

    def loss_net(self, model: keras.Model) -> keras.Model:
        """The pneumonia probability ``[B, 1]``, or the class probabilities for ``subtype``."""
        return model_lib.class_probability_model(model) if self.subtype else model

    def loss_targets(self, cfg, labels, targets):
        """``[B, 1]`` labels, or one-hot subtypes ``[B, 3]`` (an unknown subtype, -1, is all
        zeros: it contributes no loss)."""
        if self.subtype:
            return tf.one_hot(tf.cast(targets, tf.int32), len(model_lib.SUBTYPE_NAMES))
        return tf.cast(labels, tf.float32)[:, None]

    def step_inputs(self, batch: dict) -> tuple:
        target = batch["subtype"] if self.subtype else tf.cast(batch["label"], tf.int32)
        return batch["image"], batch["label"], batch["weight"], target

    def pipeline_class_weights(self, cfg) -> str:
        """Per subtype for ``subtype`` with balanced weights, else per label."""
        if self.subtype and cfg.class_weights == "balanced":
            return "balanced_subtype"
        return cfg.class_weights

    def train_scores(self, outputs):
        """``[B]`` P(PNEUMONIA) (1 - p(NORMAL) for subtypes)."""
        return 1.0 - outputs[:, 0] if self.subtype else outputs[:, 0]

    def collect(self, batch: dict, outputs: np.ndarray, parts: dict) -> None:
        parts.setdefault("outputs", []).append(outputs)
        parts.setdefault("label", []).append(batch["label"].numpy())
        if self.subtype:
            parts.setdefault("subtype", []).append(batch["subtype"].numpy())

    def finish_prediction(self, parts: dict) -> dict:
        """``{"label" [N], "probability" [N]}``, plus ``"subtype" [N]`` and
        ``"class_probabilities" [N, 3]`` for ``subtype``."""
        outputs = np.concatenate(parts["outputs"])
        out = {"label": np.concatenate(parts["label"]),
               "probability": np.asarray(self.train_scores(outputs))}
        if self.subtype:
            out.update(subtype=np.concatenate(parts["subtype"]), class_probabilities=outputs)
        return out

    def mean_loss(self, cfg, pred: dict, loss_fn) -> float:
        """Unweighted mean of the training loss over a scored split (Keras' val_loss); images
        of unknown subtype do not count for ``subtype``."""
        if self.subtype:
            known = pred["subtype"] >= 0
            targets = self.loss_targets(cfg, None, pred["subtype"][known])
            per = loss_fn(targets, pred["class_probabilities"][known])
        else:
            per = loss_fn(pred["label"][:, None].astype(np.float32),
                          pred["probability"][:, None].astype(np.float32))
        return float(np.mean(np.asarray(per)))

    def val_metrics(self, cfg, pred: dict, loss_fn) -> dict:
        """``val_loss`` and the binary ``val_*`` metrics; for ``subtype`` also per-class recall
        and one-vs-rest AUC (``val_subtype_*``)."""
        row = {f"val_{k}": v
               for k, v in metrics_lib.binary_metrics(pred["label"], pred["probability"]).items()}
        row["val_loss"] = self.mean_loss(cfg, pred, loss_fn)
        if self.subtype:
            per_class = metrics_lib.subtype_epoch_metrics(pred["subtype"],
                                                          pred["class_probabilities"])
            row.update({f"val_subtype_{k}": v for k, v in per_class.items()})
        return row


# ``--task`` name -> task. A new task registers here (and its name becomes a --task choice).
TASKS: dict[str, Task] = {"binary": ClassifierTask("binary"),
                          "subtype": ClassifierTask("subtype")}


def get_task(name: str) -> Task:
    """The registered task ``name`` (``--task``)."""
    return TASKS[name]
