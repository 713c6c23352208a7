"""The evidence penalty (``train --cam_penalty``): a classifier pays, per training image, for the
share of its Grad-CAM that falls outside the lungs ("right for the right reasons", Ross et al.
2017, with the explanation Grad-CAM instead of the input gradient).

For each training image, in the same forward pass as the loss:

1. the frozen lung model of ``--cam_penalty_lungs`` (a ``--task=lungs`` U-Net) finds the lungs
   of the image the classifier sees (after augmentation, before any lung gate), as
   :class:`pneumo_tf.modeling.model.LungGate` does (:func:`~pneumo_tf.modeling.model.lung_probability`);
2. the image's Grad-CAM at the backbone's last feature map is computed as
   :mod:`pneumo_tf.explain.cam` computes it (gradient of the explained log-odds, channel weights
   the spatial means of the gradients, ReLU), explaining the image's true class (a PNEUMONIA film
   explains pneumonia, a NORMAL film normal) with the head in inference mode;
3. ``outside`` = the map's mass times ``1 - P(lung)`` (averaged over each cell of the map) over
   the map's mass, in [0, 1] (0 for an empty map); the image's loss gains
   ``--cam_penalty * outside``.

The map's gradient crosses only the head (pooling, the hidden Dense layer, the final Dense
layer), so the second-order part is small; the lung model's forward pass is the main extra cost
(like a lung gate's). The gradient of ``outside`` reaches the backbone through the feature map
and the channel weights. A run trained with it is explained at that same layer by default
(``summary.json`` ``config.cam_penalty.layer``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pneumo_tf.explain import cam
from pneumo_tf.modeling import model as model_lib


class EvidencePenalty:
    """The per-image share of Grad-CAM mass outside the lungs, for a model of
    :func:`pneumo_tf.modeling.model.build_model` (weights shared, nothing copied).

    Args:
        model: the classifier (binary or subtype).
        lung_model: ``[B, L, L, 1] uint8 -> [B, L, L, 1]`` P(lung), frozen.
        loss_output: the model output the loss reads (``model.output``, or a subtype model's
            ``class_probabilities``).

    Attributes:
        layer: the explained layer (the backbone's last feature map).
    """

    def __init__(self, model: keras.Model, lung_model: keras.Model, loss_output):
        names = {layer.name for layer in model.layers}
        missing = {"to_float_rgb", "gap", "dense"} - names
        if missing:
            raise ValueError(f"--cam_penalty needs a model of build_model; {model.name} has no "
                             f"{', '.join(sorted(missing))} layer")
        pixels = model.get_layer("augment" if "augment" in names else "to_float_rgb").output
        self.subtype = model_lib.is_subtype_model(model)
        self.net = keras.Model(model.inputs, [loss_output, model.get_layer("gap").input, pixels],
                               name="evidence_net")
        self.gap, self.dense = model.get_layer("gap"), model.get_layer("dense")
        self.head = model.get_layer("class_logits") if self.subtype else model.layers[-1]
        self.lung_model = lung_model
        self.lung_model.trainable = False
        self.layer = model_lib.get_backbone(model).layers[-1].name

    def __call__(self, images, labels, training: bool = True):
        """``(loss outputs, outside [B] float32)`` for ``images`` ``[B, S, S, 1]`` uint8 and
        their labels ``[B]`` (0 NORMAL, 1 PNEUMONIA)."""
        outputs, features, pixels = self.net(images, training=training)
        features = tf.cast(features, tf.float32)
        sign = tf.where(tf.cast(labels, tf.float32) > 0.5, 1.0, -1.0)
        with tf.GradientTape() as tape:
            tape.watch(features)
            hidden = tf.cast(self.dense(self.gap(features)), tf.float32)
            z = tf.matmul(hidden, tf.cast(self.head.kernel, tf.float32)) + tf.cast(
                self.head.bias, tf.float32)
            explained = tf.reduce_sum(sign * cam.log_odds(z, self.subtype))
        # Images are independent in inference mode: d(sum)/d(features_b) is image b's own.
        grads = tape.gradient(explained, features)
        heat = cam.channel_weighted_map(features, grads)                      # [B, h, w]
        # The lungs are given, not learnt (the frozen lung model's variables stay off the tape).
        lungs = tf.stop_gradient(model_lib.lung_probability(self.lung_model, pixels))
        lungs = tf.image.resize(lungs, tf.shape(heat)[1:3], method="area")[..., 0]
        mass = tf.reduce_sum(heat, axis=(1, 2))
        outside = tf.math.divide_no_nan(tf.reduce_sum(heat * (1.0 - lungs), axis=(1, 2)), mass)
        return outputs, outside
