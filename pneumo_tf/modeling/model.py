"""The classifier: uint8 grayscale batches in, pneumonia probability out (docs/method.md).

Graph of :func:`build_model`::

    image [B, S, S, 1] uint8
      -> ToFloatRGB          float32 [B, S, S, 3], 0..255 (channels replicated here, on device)
      -> RandomAffine        training only (pneumo_tf.image.augment; RandomAugment adds intensity)
      -> PixelNorm           the backbone's own normalisation, or [0, 1] for the paper's recipe
      -> backbone            a nested keras.Model named "backbone" (registry below)
      -> GAP -> Dropout(0.5) -> Dense(128, relu) -> Dropout(0.3) -> Dense(1, sigmoid, float32)

The head is the paper's text, not its buggy code listing (docs/method.md, errata). Under a
mixed-precision policy the input layers and the final Dense stay float32.

The lung segmentation model (:func:`build_lung_model`), a small U-Net::

    image [B, S, S, 1] uint8
      -> ToFloat -> PixelNorm("unit")                float32 [B, S, S, 1] in [0, 1]
      -> encoder: depth levels of (conv3x3-BN-ReLU) x2, max-pool between levels
      -> decoder: upsample x2, concatenate the encoder level's output, (conv3x3-BN-ReLU) x2
      -> Conv1x1 sigmoid, float32, named "lung_mask"   [B, S, S, 1] P(lung) per pixel

Trained with :func:`dice_bce_loss`. It has no augmentation layer: image and mask must move
together, which the training step does (:meth:`pneumo_tf.augment.RandomAffine.augment_with_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf
from keras import layers

from pneumo_tf import SUBTYPE_NAMES  # noqa: F401 -- subtype 0, 1, 2 (-1: unknown)
from pneumo_tf.image import augment as _augment  # also registers its layers for load_model
from pneumo_tf.image import preprocess


@keras.saving.register_keras_serializable(package="pneumo_tf")
class ToFloatRGB(layers.Layer):
    """``[B, H, W, 1]`` any numeric dtype -> ``[B, H, W, 3]`` float32 in the input's value range."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        x = keras.ops.cast(images, "float32")
        if x.shape[-1] == 1:
            x = keras.ops.repeat(x, 3, axis=-1)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)


@keras.saving.register_keras_serializable(package="pneumo_tf")
class ToFloat(layers.Layer):
    """``[B, H, W, C]`` any numeric dtype -> the same float32 values (no channel change)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        return keras.ops.cast(images, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="pneumo_tf")
class PixelNorm(layers.Layer):
    """Normalise float pixels in 0..255 (RGB) with :func:`pneumo_tf.image.preprocess.normalize_pixels`."""

    def __init__(self, mode: str = "unit", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in preprocess.INPUT_NORMS:
            raise ValueError(f"unknown input normalisation {mode!r}; "
                             f"expected one of {preprocess.INPUT_NORMS}")
        self.mode = mode

    def call(self, x):
        return preprocess.normalize_pixels(x, self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="pneumo_tf")
class PneumoniaProbability(layers.Layer):
    """``[B, 3]`` class probabilities (NORMAL, BACTERIAL, VIRAL) -> ``[B, 1]`` P(PNEUMONIA).

    The pneumonia probability of a subtype model is ``1 - p(NORMAL)``, so every binary stage
    (threshold, calibration, reports, Grad-CAM, export, predict) reads it like a binary model's.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, probs):
        return 1.0 - probs[:, :1]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1)


def lung_probability(lung_model: keras.Model, x):
    """``[B, L, L, 1]`` float32 P(lung) of float pixels ``x`` (``[B, S, S, C]``, 0..255): the
    first channel squashed (area) to the lung model's input side L and rounded to uint8, as the
    lung model was trained (whole films resized without keeping the aspect ratio)."""
    side = lung_model.input_shape[1]
    gray = tf.cast(x[..., :1], tf.float32)
    small = tf.image.resize(gray, (side, side), method="area")
    small = tf.cast(tf.round(tf.clip_by_value(small, 0.0, 255.0)), tf.uint8)
    return tf.cast(lung_model(small, training=False), tf.float32)


@keras.saving.register_keras_serializable(package="pneumo_tf")
class LungGate(layers.Layer):
    """Dim the input outside the lungs a lung model finds in it (an evidence constraint).

    ``[B, S, S, C]`` float pixels (0..255) -> the same pixels times ``floor + (1 - floor) * m``,
    where ``m`` is the lung model's mask of the image (P(lung) above
    :data:`pneumo_tf.image.preprocess.LUNG_PROBABILITY_THRESHOLD` on the first channel,
    resized to the lung model's input and back), dilated by ``dilate`` of the side (a max-pool),
    so the lung borders and the costophrenic angles stay in view. The lung model (a ``--task=
    lungs`` run's U-Net) is frozen and travels inside the classifier: ``model.keras``, the
    SavedModel and TFLite all gate their input the same way.

    Args:
        lung_model: ``[B, L, L, 1] uint8 -> [B, L, L, 1]`` P(lung) (:func:`build_lung_model`).
        floor: what is left of the pixels outside the dilated lungs (0 = black, 1 = no gate).
        dilate: dilation radius, fraction of the image side.
    """

    def __init__(self, lung_model: keras.Model, floor: float = 0.25, dilate: float = 0.04,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not 0.0 <= floor <= 1.0 or not 0.0 <= dilate < 0.5:
            raise ValueError(f"LungGate floor={floor} must be in [0, 1] and dilate={dilate} in "
                             f"[0, 0.5)")
        if isinstance(lung_model, dict):
            lung_model = keras.saving.deserialize_keras_object(lung_model)
        self.lung_model = lung_model
        self.lung_model.trainable = False
        self.floor = float(floor)
        self.dilate = float(dilate)

    def lung_mask(self, x):
        """``[B, S, S, 1]`` float32 {0, 1}: the dilated lungs of float pixels ``x``."""
        size = tf.shape(x)[1:3]
        side = self.lung_model.input_shape[1]
        lungs = lung_probability(self.lung_model, x) > preprocess.LUNG_PROBABILITY_THRESHOLD
        mask = tf.cast(lungs, tf.float32)
        radius = int(round(self.dilate * side))
        if radius:
            mask = tf.nn.max_pool2d(mask, 2 * radius + 1, 1, "SAME")
        return tf.image.resize(mask, size, method="nearest")

    def call(self, x):
        gate = self.floor + (1.0 - self.floor) * self.lung_mask(x)
        return x * tf.cast(gate, x.dtype)

    def get_config(self):
        return {**super().get_config(), "floor": self.floor, "dilate": self.dilate,
                "lung_model": keras.saving.serialize_keras_object(self.lung_model)}


# ---------------------------------------------------------------------------------------------
# Backbone registry


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it expects.

    Attributes:
        build: ``(input_shape (S, S, 3), weights: None | "imagenet") -> keras.Model`` without top.
        input_norm: the normalisation its ImageNet weights were trained with
            (a :data:`pneumo_tf.image.preprocess.INPUT_NORMS` mode).
        cam_layer: default Grad-CAM layer inside the backbone: the last spatial feature map,
            or the layer measured most lung-bound (``tools/bench_cam_lungs``).
        imagenet: whether ``weights="imagenet"`` exists for it.
        gated_cam_layer: the default Grad-CAM layer of a classifier with a :class:`LungGate`
            (measured as ``cam_layer``), or None for ``cam_layer``.
    """

    build: Callable[[tuple, str | None], keras.Model]
    input_norm: str
    cam_layer: str
    imagenet: bool = True
    gated_cam_layer: str | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, input_norm: str, cam_layer: str, imagenet: bool = True,
                      gated_cam_layer: str | None = None):
    """Decorator adding a builder to :data:`BACKBONES` under ``name`` (the arguments are
    :class:`BackboneSpec`'s).

    Raises:
        ValueError: ``name`` is already registered (a second builder would silently win).
    """
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")

    def deco(fn):
        BACKBONES[name] = BackboneSpec(fn, input_norm, cam_layer, imagenet, gated_cam_layer)
        return fn

    return deco


@register_backbone("resnet50", input_norm="caffe", cam_layer="conv5_block3_out")
def _resnet50(input_shape, weights):
    return keras.applications.ResNet50(include_top=False, weights=weights,
                                       input_shape=input_shape, name="backbone")


@register_backbone("densenet121", input_norm="torch", cam_layer="relu")
def _densenet121(input_shape, weights):
    return keras.applications.DenseNet121(include_top=False, weights=weights,
                                          input_shape=input_shape, name="backbone")


@register_backbone("efficientnetv2b0", input_norm="raw", cam_layer="top_activation")
def _efficientnetv2b0(input_shape, weights):
    # include_preprocessing=True: the model rescales 0..255 itself, hence input_norm "raw".
    # Its ``name`` argument selects the architecture, so the model is renamed afterwards.
    return _renamed(keras.applications.EfficientNetV2B0(
        include_top=False, weights=weights, input_shape=input_shape, include_preprocessing=True))


@register_backbone("convnext_tiny", input_norm="raw",
                   cam_layer="convnext_tiny_stage_3_block_2_identity")
def _convnext_tiny(input_shape, weights):
    # Layer names derive from ``name``; keep the default so cam_layer matches published code.
    return _renamed(keras.applications.ConvNeXtTiny(
        include_top=False, weights=weights, input_shape=input_shape, include_preprocessing=True))


def _renamed(model: keras.Model, name: str = "backbone") -> keras.Model:
    model.name = name
    return model


# small_cnn's Grad-CAM layer is the output of its second block (b1_out, 1/8 of the input), not
# its last feature map: measured against true lung masks, it was the most lung-bound of nine
# candidates (BUILD.md, "Evidence in the lungs": lift 1.18 vs 1.01 for `features` on val, 1.12 vs
# 0.95 on another collection). With a lung gate the order turns: on that collection `features`
# gave lift 1.23 / 1.32 and pointing 0.90 / 0.93 for two gated models, b1_out 1.13 / 1.19 and
# 0.59 / 0.81 (BUILD.md, "Recipe v2").
@register_backbone("small_cnn", input_norm="unit", cam_layer="b1_out", imagenet=False,
                   gated_cam_layer="features")
def _small_cnn(input_shape, weights):
    """A compact residual CNN (~1.2 M parameters) for tests, smoke runs and CPU training."""
    del weights  # no pretrained weights exist for it
    # Momentum 0.9 (Keras' default is 0.99): trained from scratch for a few hundred steps, the
    # moving statistics must settle or validation sees a different network than training.
    bn = functools.partial(layers.BatchNormalization, momentum=0.9)
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = bn(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for i, width in enumerate((48, 96, 192)):
        shortcut = layers.Conv2D(width, 1, strides=2, use_bias=False, name=f"b{i}_proj")(x)
        shortcut = bn(name=f"b{i}_proj_bn")(shortcut)
        y = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"b{i}_conv1")(x)
        y = bn(name=f"b{i}_bn1")(y)
        y = layers.Activation("relu", name=f"b{i}_relu1")(y)
        y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"b{i}_conv2")(y)
        y = bn(name=f"b{i}_bn2")(y)
        x = layers.Activation("relu", name=f"b{i}_out")(layers.Add(name=f"b{i}_add")([y, shortcut]))
    x = layers.Conv2D(256, 3, padding="same", use_bias=False, name="top_conv")(x)
    x = bn(name="top_bn")(x)
    x = layers.Activation("relu", name="features")(x)
    return keras.Model(inputs, x, name="backbone")


def resolve_input_norm(backbone: str, input_norm: str) -> str:
    """``backbone`` -> the backbone's own mode (the default); ``unit`` -> [0, 1]; else as is."""
    if input_norm == "backbone":
        return get_backbone_spec(backbone).input_norm
    if input_norm not in preprocess.INPUT_NORMS:
        raise ValueError(f"--input_norm={input_norm!r} is not one of "
                         f"{('backbone',) + preprocess.INPUT_NORMS}")
    return input_norm


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or a ValueError listing the known names."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def build_backbone(name: str, image_size: int, weights: str | None) -> keras.Model:
    """Build backbone ``name`` for ``[image_size, image_size, 3]`` inputs.

    Args:
        weights: ``None``/``"none"`` (random init), ``"imagenet"`` (Keras' download into its
            cache, checked against the published hash), or the path of a local weights file
            (``.weights.h5`` or the Keras applications ``*_notop.h5``).
    """
    spec = get_backbone_spec(name)
    if weights in (None, "none", "None", ""):
        return spec.build((image_size, image_size, 3), None)
    if weights == "imagenet":
        if not spec.imagenet:
            raise ValueError(f"backbone {name!r} has no ImageNet weights; use --weights=none")
        return spec.build((image_size, image_size, 3), "imagenet")
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"--weights={weights}: no such file. Give 'imagenet', 'none' or the path "
                         f"of a local weights file for {name}")
    model = spec.build((image_size, image_size, 3), None)
    try:
        model.load_weights(str(path))
    except Exception as e:  # noqa: BLE001 -- re-raised with the file and the fix
        raise ValueError(f"--weights={weights}: cannot load into backbone {name!r} at "
                         f"{image_size}px ({e}); is it the include_top=False file of {name}?") from e
    return model


def set_trainable(backbone: keras.Model, trainable_layers: int, train_bn: bool) -> None:
    """Freeze all but the top ``trainable_layers`` layers of ``backbone`` (-1: all trainable).

    BatchNorm layers stay frozen (inference mode: Keras 3 runs a non-trainable BatchNorm with its
    moving statistics) unless ``train_bn``.
    """
    backbone.trainable = True
    all_layers = backbone.layers
    n = len(all_layers) if trainable_layers < 0 else min(trainable_layers, len(all_layers))
    for i, layer in enumerate(all_layers):
        layer.trainable = i >= len(all_layers) - n
        if isinstance(layer, layers.BatchNormalization) and not train_bn:
            layer.trainable = False


def build_model(backbone: str = "resnet50", image_size: int = 224, weights: str | None = None,
                trainable_layers: int = 50, train_bn: bool = False, input_norm: str = "backbone",
                augment: dict | None = None, head: tuple[int, float, float] = (128, 0.5, 0.3),
                task: str = "binary", lung_gate: dict | None = None) -> keras.Model:
    """The full classifier (see the module docstring).

    Args:
        backbone: a :data:`BACKBONES` name.
        image_size: input side S in pixels (the data manifest's ``image_size``).
        weights: see :func:`build_backbone`.
        trainable_layers: backbone layers trained, counted from the top; -1 = all.
        train_bn: also train BatchNorm layers (default: frozen, inference mode).
        input_norm: ``backbone`` (its own preprocessing) or a :data:`preprocess.INPUT_NORMS` mode.
        augment: keyword arguments of :func:`pneumo_tf.image.augment.make_augment_layer`, or None for
            no augmentation layer. The layer is active only when the model is called with training=True.
        head: ``(units of the hidden Dense layer, dropout before it, dropout after it)``
            (paper: 128, 0.5, 0.3).
        task: ``binary`` (a sigmoid ``score``) or ``subtype``: a three-way softmax
            ``class_probabilities`` (NORMAL, BACTERIAL, VIRAL; its logits are the
            ``class_logits`` layer) and ``score`` = 1 - p(NORMAL).
        lung_gate: keyword arguments of :class:`LungGate` (``lung_model``, ``floor``,
            ``dilate``): dim the (augmented) input outside the lungs; None = no gate.

    Returns:
        ``keras.Model``: ``[B, S, S, 1]`` uint8 -> ``[B, 1]`` float32 probability of PNEUMONIA.
    """
    norm = resolve_input_norm(backbone, input_norm)
    inputs = keras.Input((image_size, image_size, 1), dtype="uint8", name="image")
    x = ToFloatRGB(name="to_float_rgb")(inputs)
    if augment is not None:
        x = _augment.make_augment_layer(**augment, dtype="float32", name="augment")(x)
    if lung_gate is not None:
        x = LungGate(**lung_gate, name="lung_gate")(x)
    x = PixelNorm(norm, name="pixel_norm")(x)
    base = build_backbone(backbone, image_size, weights)
    set_trainable(base, trainable_layers, train_bn)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    dense_units, dropout_before, dropout_after = head
    x = layers.Dropout(dropout_before, name="dropout_1")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout_after, name="dropout_2")(x)
    if task == "subtype":
        logits = layers.Dense(len(SUBTYPE_NAMES), dtype="float32", name="class_logits")(x)
        probs = layers.Softmax(dtype="float32", name="class_probabilities")(logits)
        outputs = PneumoniaProbability(name="score")(probs)
    elif task == "binary":
        outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="score")(x)
    else:
        raise ValueError(f"--task={task!r}; expected binary or subtype")
    return keras.Model(inputs, outputs, name=f"pneumo_{backbone}")


def _conv_block(x, filters: int, name: str):
    """(conv3x3 -> BatchNorm -> ReLU) twice."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_lung_model(image_size: int = 128, base_filters: int = 16,
                     depth: int = 4) -> keras.Model:
    """A small U-Net for lung masks (see the module docstring).

    Args:
        image_size: input side S, pixels (the data manifest's ``image_size``); a multiple of
            ``2 ** (depth - 1)``.
        base_filters: filters of the first level, doubled at each level down.
        depth: levels, the bottom one included (4: S, S/2, S/4, S/8).

    Returns:
        ``keras.Model`` named ``lung_unet``: ``[B, S, S, 1]`` uint8 -> ``[B, S, S, 1]`` float32
        probability of lung per pixel, output layer ``lung_mask`` (float32 under any
        mixed-precision policy). 16 filters and depth 4 give 0.49 M parameters.

    Raises:
        ValueError: a size the pooling cannot halve evenly, or depth / filters below 1.
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth={depth} and base_filters={base_filters} must be >= 1")
    step = 2 ** (depth - 1)
    if image_size % step:
        raise ValueError(f"image_size={image_size} must be a multiple of {step} for depth="
                         f"{depth} (convert the data at e.g. {image_size // step * step + step} px "
                         f"or lower the depth)")
    inputs = keras.Input((image_size, image_size, 1), dtype="uint8", name="image")
    x = PixelNorm("unit", name="pixel_norm")(ToFloat(name="to_float")(inputs))
    skips = []
    for level in range(depth):
        if level:
            x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
        x = _conv_block(x, base_filters * 2 ** level, f"down{level}")
        skips.append(x)
    for level in reversed(range(depth - 1)):
        x = layers.UpSampling2D(2, name=f"up{level}_upsample")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, base_filters * 2 ** level, f"up{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lung_mask")(x)
    return keras.Model(inputs, outputs, name="lung_unet")


def dice_bce_loss(y_true, y_pred, smooth: float = 1.0, bce_weight: float = 1.0):
    """Per-image soft Dice loss plus binary cross-entropy, for :func:`build_lung_model`.

    ``1 - (2 |t p| + smooth) / (|t| + |p| + smooth) + bce_weight * mean BCE(t, p)``, sums and
    means over each image's pixels; ``smooth`` makes an empty mask predicted empty a loss of 0
    (and keeps the gradient finite).

    Args:
        y_true: ``[B, H, W, 1]`` target in {0, 1} (any dtype; divide a stored 0/255 mask by 255).
        y_pred: ``[B, H, W, 1]`` probabilities in [0, 1].
        smooth: Dice smoothing, pixels.
        bce_weight: weight of the cross-entropy term.

    Returns:
        ``[B]`` float32 loss per image (Keras reduces it, with any sample weights).
    """
    ops = keras.ops
    t = ops.cast(y_true, "float32")
    p = ops.cast(y_pred, "float32")
    axes = tuple(range(1, len(p.shape)))
    dice = (2.0 * ops.sum(t * p, axis=axes) + smooth) / (ops.sum(t + p, axis=axes) + smooth)
    q = ops.clip(p, 1e-7, 1.0 - 1e-7)
    bce = -ops.mean(t * ops.log(q) + (1.0 - t) * ops.log(1.0 - q), axis=axes)
    return (1.0 - dice) + bce_weight * bce


def is_subtype_model(model: keras.Model) -> bool:
    """Whether ``model`` has the three-way subtype head (see :func:`build_model`)."""
    return any(layer.name == "class_probabilities" for layer in model.layers)


def class_probability_model(model: keras.Model) -> keras.Model:
    """``[B, S, S, 1] -> [B, 3]`` class probabilities of a subtype model (weights shared)."""
    return keras.Model(model.inputs, model.get_layer("class_probabilities").output)


def get_backbone(model: keras.Model) -> keras.Model:
    """The nested backbone of a model built by :func:`build_model`."""
    return model.get_layer("backbone")


def count_params(model: keras.Model) -> dict[str, int]:
    """``{"trainable": n, "non_trainable": n}`` parameter counts."""
    import numpy as np

    def total(ws):
        return int(sum(np.prod(w.shape) for w in ws))

    return {"trainable": total(model.trainable_weights),
            "non_trainable": total(model.non_trainable_weights)}
