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
- :meth:`Task.val_metrics`: the epoch's ``val_*`` row (``val_loss`` included);
- :meth:`Task.train_dataset`, :meth:`Task.eval_dataset`, :meth:`Task.split_count`: which
  records (and features) it trains and validates on;
- :meth:`Task.forward`: one training forward pass (a task may augment images and targets
  together there) and :meth:`Task.train_metrics`: the epoch's train row.

A new task is a subclass registered in :data:`TASKS` under its ``--task`` name; its
``metric_names`` name its history columns (``val_loss`` and the ``--select_on`` metric among
them). :class:`LungsTask` (``--task=lungs``) is the lung segmentation: a U-Net, Dice plus
cross-entropy, Dice/IoU metrics, trained on the films that have a lung mask.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import keras

from pneumo_tf.core import rundir
from pneumo_tf.data import pipeline, records
from pneumo_tf.evaluation import metrics as metrics_lib
from pneumo_tf.explain import cam
from pneumo_tf.image import augment as augment_lib
from pneumo_tf.modeling import lungs as lungs_lib
from pneumo_tf.modeling import model as model_lib
from pneumo_tf.training import evidence


class Task:
    """The interface: every method gets the run's ``TrainConfig`` (``cfg``) where it needs it."""

    name = ""
    # The epoch metrics of the history (train ``m`` and ``val_m`` for each).
    metric_names = ("loss", "accuracy", "auc", "pr_auc", "precision", "recall")
    # --select_on choices; the first that is not val_loss is the default higher-is-better one.
    select_on = ("val_loss", "val_auc")
    # A classifier: calibration, the OOD fit, Grad-CAM and ensembles apply to its runs.
    classifier = True

    def build_model(self, cfg, image_size: int, augment: dict | None) -> keras.Model:
        raise NotImplementedError

    def model_key(self, cfg) -> str:
        """What the precision probe's cache tells models apart by (the backbone)."""
        return cfg.backbone

    def summary_config(self, cfg) -> dict:
        """Entries of summary.json's ``config`` the task sets itself (default: none)."""
        return {}

    def split_count(self, manifest: dict, split: str) -> int:
        """Images of ``split`` the task reads (all of them for a classifier)."""
        return int(manifest["splits"][split]["count"])

    def check_data(self, cfg, manifest: dict) -> None:
        """Raise ``records.DataDirError`` (or ``RunDirError`` for a named run) when the run
        cannot train the task, before the run directory is touched. Default: any data will do;
        a ``--lung_gate`` must be a finished lungs run."""
        if cfg.lung_gate:
            lungs_lib.check_lung_run(rundir.Run(cfg.lung_gate), "--lung_gate")
        if cfg.cam_penalty_lungs:
            lungs_lib.check_lung_run(rundir.Run(cfg.cam_penalty_lungs), "--cam_penalty_lungs")

    def train_dataset(self, cfg, seed: int, class_weights: str, input_context=None):
        """The pipeline's training stream of ``train`` (before :meth:`step_inputs`)."""
        return pipeline.make_train_dataset(
            cfg.data_dir, cfg.batch_size, seed=seed, cache=cfg.cache_arg(),
            deterministic=cfg.deterministic, class_weights=class_weights,
            input_context=input_context, skip_corrupt=cfg.skip_corrupt)

    def eval_dataset(self, cfg, split: str):
        """One pass over ``split`` in file order (validation and scoring)."""
        return pipeline.make_eval_dataset(cfg.data_dir, split, cfg.val_batch_size,
                                          class_weights="none", cache=cfg.cache_arg(),
                                          skip_corrupt=cfg.skip_corrupt)

    def train_layers(self, cfg, augment: dict | None) -> dict:
        """Layers the train step uses beside the model (built in the strategy's scope; their
        seed states are saved in every backup). Default: none."""
        return {}

    def forward(self, trainer, images, labels, targets):
        """One training forward pass: ``(outputs, loss targets)``."""
        return (trainer.net(images, training=True),
                self.loss_targets(trainer.cfg, labels, targets))

    def per_example_loss(self, trainer, images, labels, targets):
        """``(loss [B], outputs, loss targets)`` of one training forward pass (default: the
        loss of :meth:`forward`)."""
        outputs, loss_targets = self.forward(trainer, images, labels, targets)
        return trainer.loss_fn(loss_targets, outputs), outputs, loss_targets

    def synthetic_targets(self, images, labels):
        """Targets of a synthetic batch (the precision probe): the labels."""
        return labels

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

    def train_scores(self, outputs, loss_targets):
        """``[B]`` float32 scores of :meth:`loss_net`'s outputs for the train metrics."""
        raise NotImplementedError

    def train_metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict:
        """The epoch's train metrics (but ``loss``) from the steps' gathered scores."""
        return metrics_lib.binary_metrics(labels, scores)

    def epoch_images(self, trainer, writer, epoch: int, max_images: int) -> None:
        """TensorBoard images written after each epoch's validation (default: none)."""

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
        gate = None
        if cfg.lung_gate:
            gate = {"lung_model": lungs_lib.LungModel(cfg.lung_gate).model,
                    "floor": cfg.lung_gate_floor, "dilate": cfg.lung_gate_dilate}
        return model_lib.build_model(
            cfg.backbone, image_size, cfg.weights, cfg.trainable_layers, cfg.train_bn,
            cfg.input_norm, augment=augment, head=(cfg.dense_units, *cfg.head_dropout),
            task=self.name, lung_gate=gate)

    def summary_config(self, cfg) -> dict:
        """The lung gate and the evidence penalty, when there are (with the lungs runs they
        came from)."""
        out = {}
        if cfg.lung_gate:
            out["lung_gate"] = {"run_dir": str(cfg.lung_gate), "floor": cfg.lung_gate_floor,
                                "dilate": cfg.lung_gate_dilate}
        if cfg.cam_penalty:
            out["cam_penalty"] = {"weight": cfg.cam_penalty, "lungs_run": str(cfg.penalty_lungs())}
        return out

    def train_layers(self, cfg, augment: dict | None) -> dict:
        """The frozen lung model of ``--cam_penalty`` (none without it)."""
        if not cfg.cam_penalty:
            return {}
        return {"penalty_lungs": lungs_lib.LungModel(cfg.penalty_lungs()).model}

    def per_example_loss(self, trainer, images, labels, targets):
        """The loss, plus ``--cam_penalty`` times each image's Grad-CAM share outside the lungs
        (:class:`pneumo_tf.training.evidence.EvidencePenalty`)."""
        if not trainer.cfg.cam_penalty:
            return super().per_example_loss(trainer, images, labels, targets)
        penalty = trainer.task_parts.get("evidence")
        if penalty is None:
            penalty = trainer.task_parts["evidence"] = evidence.EvidencePenalty(
                trainer.model, trainer.train_layers["penalty_lungs"], trainer.net.output)
        outputs, outside = penalty(images, labels)
        loss_targets = self.loss_targets(trainer.cfg, labels, targets)
        loss = trainer.loss_fn(loss_targets, outputs)
        return loss + trainer.cfg.cam_penalty * outside, outputs, loss_targets

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

    def train_scores(self, outputs, loss_targets=None):
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


class LungsTask(Task):
    """Lung segmentation (``--task=lungs``): which pixels of a film are lung.

    The model is :func:`pneumo_tf.modeling.model.build_lung_model` (a U-Net, ``--unet_filters``,
    ``--unet_depth``) at the data's size, trained with per-image soft Dice plus cross-entropy
    (:func:`pneumo_tf.modeling.model.dice_bce_loss`) on the films whose records carry a
    ``lung_mask`` (converter ``--masks``); validation reads only those too. The augmentation
    moves image and mask with one matrix (nearest neighbour for the mask,
    :meth:`pneumo_tf.image.augment.RandomAffine.augment_with_mask`). Metrics: Dice and IoU of
    the mask cut at 0.5, per image, averaged over images (``dice``, ``iou``).
    """

    name = "lungs"
    metric_names = ("loss", "dice", "iou")
    select_on = ("val_loss", "val_dice")
    classifier = False
    threshold = lungs_lib.MASK_THRESHOLD  # a pixel is lung above it: the project's one lung cut

    def build_model(self, cfg, image_size: int, augment: dict | None) -> keras.Model:
        return model_lib.build_lung_model(image_size, cfg.unet_filters, cfg.unet_depth)

    def model_key(self, cfg) -> str:
        return f"lung_unet_{cfg.unet_filters}x{cfg.unet_depth}"

    def summary_config(self, cfg) -> dict:
        """The U-Net in place of a backbone: no CAM layer, pixels scaled to [0, 1]."""
        return {"backbone": "lung_unet", "unet_filters": cfg.unet_filters,
                "unet_depth": cfg.unet_depth, "cam_layer": None, "input_norm": "unit",
                "dense_units": None, "head_dropout": None, "class_weights": "none"}

    def split_count(self, manifest: dict, split: str) -> int:
        """The films of ``split`` that have a lung mask (the manifest's ``lung_masks``)."""
        return int(manifest["splits"][split].get("lung_masks", 0))

    def check_data(self, cfg, manifest: dict) -> None:
        """Train and val need films with a lung mask."""
        data_dir = cfg.data_dir
        for split in ("train", "val"):
            if not self.split_count(manifest, split):
                raise records.DataDirError(
                    f"--task=lungs: the {split} split of {data_dir} has no film with a lung "
                    f"mask; convert the data with --masks=DIR (tools/make_tfrecords; "
                    f"configs/lungs.cfg shows the command)")

    def train_dataset(self, cfg, seed: int, class_weights: str, input_context=None):
        return pipeline.make_lung_train_dataset(
            cfg.data_dir, cfg.batch_size, seed=seed, cache=cfg.cache_arg(),
            deterministic=cfg.deterministic, input_context=input_context,
            skip_corrupt=cfg.skip_corrupt)

    def eval_dataset(self, cfg, split: str):
        return pipeline.make_eval_dataset(cfg.data_dir, split, cfg.val_batch_size,
                                          class_weights="none", cache=cfg.cache_arg(),
                                          skip_corrupt=cfg.skip_corrupt, masks="only")

    def train_layers(self, cfg, augment: dict | None) -> dict:
        """The augmentation layer that moves images and masks together (none without
        ``--augment``)."""
        return {} if augment is None else {"augment": augment_lib.make_augment_layer(**augment)}

    def forward(self, trainer, images, labels, targets):
        masks = targets
        layer = trainer.train_layers.get("augment")
        if layer is not None:
            images, masks = layer.augment_with_mask(images, masks, training=True)
        return trainer.net(images, training=True), self.loss_targets(trainer.cfg, labels, masks)

    def synthetic_targets(self, images, labels):
        """A mask of the bright half of the synthetic images (0/255 uint8)."""
        return tf.cast(images > 127, tf.uint8) * 255

    def make_loss(self, cfg):
        return model_lib.dice_bce_loss

    def loss_targets(self, cfg, labels, targets):
        """The stored 0/255 mask as 0/1 float32 ``[B, S, S, 1]``."""
        return tf.cast(targets, tf.float32) / 255.0

    def step_inputs(self, batch: dict) -> tuple:
        return batch["image"], batch["label"], batch["weight"], batch["lung_mask"]

    def pipeline_class_weights(self, cfg) -> str:
        return "none"

    def train_scores(self, outputs, loss_targets):
        """``[B]`` Dice of each image's mask cut at 0.5 (1 where both masks are empty)."""
        t = tf.cast(loss_targets > self.threshold, tf.float32)
        p = tf.cast(outputs > self.threshold, tf.float32)
        axes = [1, 2, 3]
        inter = tf.reduce_sum(t * p, axes)
        sizes = tf.reduce_sum(t, axes) + tf.reduce_sum(p, axes)
        return tf.where(sizes > 0, 2.0 * inter / tf.maximum(sizes, 1.0), 1.0)

    def train_metrics(self, labels: np.ndarray, scores: np.ndarray) -> dict:
        """Mean Dice and IoU of the train batches (IoU = Dice / (2 - Dice) per image)."""
        dice = np.asarray(scores, np.float64)
        return {"dice": float(np.mean(dice)), "iou": float(np.mean(dice / (2.0 - dice)))}

    def collect(self, batch: dict, outputs: np.ndarray, parts: dict) -> None:
        parts.setdefault("label", []).append(batch["label"].numpy())
        parts.setdefault("lung_mask", []).append(batch["lung_mask"].numpy()[..., 0] > 127)
        parts.setdefault("lung_probability", []).append(outputs[..., 0])

    def finish_prediction(self, parts: dict) -> dict:
        """``{"label" [N], "lung_mask" [N, S, S] bool (true), "lung_probability" [N, S, S]}``."""
        if not parts:
            raise ValueError("no film of the split has a lung mask: convert it with --masks")
        return {k: np.concatenate(v) for k, v in parts.items()}

    def val_metrics(self, cfg, pred: dict, loss_fn) -> dict:
        """``val_loss`` (mean Dice + cross-entropy), ``val_dice`` and ``val_iou``."""
        scores = metrics_lib.mask_scores(pred["lung_mask"], pred["lung_probability"],
                                         self.threshold)
        losses = [np.asarray(loss_fn(pred["lung_mask"][i:i + 64, ..., None].astype(np.float32),
                                     pred["lung_probability"][i:i + 64, ..., None]))
                  for i in range(0, len(pred["lung_mask"]), 64)]
        return {"val_loss": float(np.mean(np.concatenate(losses))),
                "val_dice": float(np.mean(scores["dice"])),
                "val_iou": float(np.mean(scores["iou"]))}

    def epoch_images(self, trainer, writer, epoch: int, max_images: int) -> None:
        """The first val films with the true lungs outlined in green and the predicted ones in
        red (``val_lung_contours``)."""
        cfg = trainer.cfg
        batch = next(iter(pipeline.make_eval_dataset(
            cfg.data_dir, "val", max_images, class_weights="none", cache=False,
            skip_corrupt=cfg.skip_corrupt, masks="only").take(1)))
        images = batch["image"][:max_images]
        predicted = np.asarray(trainer.predict_images(images))[..., 0] > self.threshold
        true = batch["lung_mask"].numpy()[:max_images, ..., 0] > 127
        tiles = [cam.contour_tile(img[..., 0], t, p)
                 for img, t, p in zip(images.numpy(), true, predicted)]
        with writer.as_default():
            tf.summary.image("val_lung_contours", np.stack(tiles), step=epoch,
                             max_outputs=max_images)


# ``--task`` name -> task. A new task registers here (and its name becomes a --task choice).
TASKS: dict[str, Task] = {"binary": ClassifierTask("binary"),
                          "subtype": ClassifierTask("subtype"),
                          "lungs": LungsTask()}


def get_task(name: str) -> Task:
    """The registered task ``name`` (``--task``)."""
    return TASKS[name]
