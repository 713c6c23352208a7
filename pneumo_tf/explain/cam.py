"""Grad-CAM maths and attention statistics: a library (no flags) for the gradcam app and predict.

How the CAM is computed (batched): one Keras model with two outputs -- the feature map of the
chosen layer inside the nested backbone and the head's last hidden activation -- is rebuilt from
the trained model's own layers (:class:`CamModel`, weights shared, nothing copied). For a batch,
one ``GradientTape`` gives the gradient of each image's PNEUMONIA logit with respect to its
feature map; channel weights are the spatial means of the gradients, the weighted sum over
channels is a single einsum, then ReLU, per-image division by the maximum, and bilinear
upsampling to the input size (:func:`gradcam_batch`). The gradient is taken of the logit, not of
the sigmoid probability, because a saturated float32 sigmoid has a zero gradient and would give
an empty map; the two differ only by a positive factor per image, which the per-image
normalisation removes. All CAM arithmetic runs in float32, also when the forward pass runs in a
mixed-precision policy.

Ensembles (:mod:`pneumo_tf.ensemble`) have no backbone of their own: :func:`cam_model_for` gives
an :class:`EnsembleCamModel`, which builds a :class:`CamModel` per member and returns the mean of
the members' maps (each normalised per image first, so every member weighs the same; the mean is
not renormalised, so where members look at different places the map is fainter) and the
ensemble's probability, the mean of the members'. With ``cam_class="predicted"`` every member
explains the class the ensemble predicts.

A three-class model (``--task=subtype``) has ``class_logits`` ``z`` (NORMAL, BACTERIAL, VIRAL)
instead of one logit: its PNEUMONIA logit is the log-odds ``logsumexp(z_b, z_v) - z_n``, and
``cam_class="bacterial"`` / ``"viral"`` explain that class's log-odds against the other two
(:meth:`CamModel.logits`).

Pictures: :func:`overlay_cam` (JET heat map over the image the model saw), :func:`grid_figure`.
Attention statistics: the share of the positive CAM mass inside the lung region
(:func:`lung_mass_share`) and the pointing game (:func:`pointing_hit`: does the CAM peak fall
inside a lesion?), summarised per TP/FP/FN/TN group by :func:`summarise_attention`. An image
whose map is empty (all zero after the ReLU) has no peak: in the pointing game it counts as a
miss. Against true lung masks (records converted with ``--masks``, or a lung model's output),
:func:`lung_evidence` gives ``lung_share``, ``lung_fraction``, their ``lift`` (1.0 = a flat map)
and ``pointing_lungs`` per group; :func:`draw_lung_outline` outlines the lungs on a tile.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pneumo_tf.image import preprocess
from pneumo_tf.data import records
from pneumo_tf.evaluation import metrics as pmetrics

GROUPS = ("TP", "FP", "FN", "TN")
CAM_CLASSES = ("pneumonia", "predicted", "bacterial", "viral")
# The classes only a subtype model (--task=subtype) can explain: each one's log-odds.
SUBTYPE_CAM_CLASSES = ("bacterial", "viral")


# ---------------------------------------------------------------------------------------------
# The two-output model


def default_cam_layer(model, backbone_name: str | None = None) -> str:
    """The Grad-CAM layer inside ``model``'s backbone.

    The registry's ``cam_layer`` of ``backbone_name`` when the backbone has it (its
    ``gated_cam_layer`` when ``model`` has a lung gate and the spec names one), else the last
    layer of the backbone whose output is a 4-D feature map.
    """
    from pneumo_tf.modeling import model as pmodel

    backbone = pmodel.get_backbone(model)
    if backbone_name in pmodel.BACKBONES:
        spec = pmodel.BACKBONES[backbone_name]
        gated = any(layer.name == "lung_gate" for layer in model.layers)
        name = spec.gated_cam_layer if gated and spec.gated_cam_layer else spec.cam_layer
        if any(layer.name == name for layer in backbone.layers):
            return name
    for layer in reversed(backbone.layers):
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"backbone of {model.name} has no 4-D feature map layer for Grad-CAM")


class CamModel:
    """The trained model rebuilt with two outputs for Grad-CAM (weights shared with ``model``).

    Attributes:
        model: ``keras.Model``: ``[B, S, S, 1]`` images -> ``(features [B, h, w, C], hidden
            [B, D])``, where ``hidden`` is the input of the final ``Dense`` (the sigmoid
            ``score``, or a subtype model's ``class_logits``).
        kernel, bias: that Dense's weights (``logits = hidden @ kernel + bias``).
        subtype: whether the model has the three-way subtype head.
        layer: name of the feature-map layer.
        image_size: S.
    """

    def __init__(self, model, layer: str | None = None, backbone_name: str | None = None):
        import keras

        from pneumo_tf.modeling import model as pmodel

        try:
            backbone = pmodel.get_backbone(model)
        except ValueError as e:
            raise ValueError(f"model {model.name} has no nested layer named 'backbone'; Grad-CAM "
                             f"needs a model built by pneumo_tf.modeling.model.build_model") from e
        layer = layer or default_cam_layer(model, backbone_name)
        names = [lyr.name for lyr in backbone.layers]
        if layer not in names:
            four_d = [lyr.name for lyr in backbone.layers if len(lyr.output.shape) == 4][-5:]
            raise ValueError(f"--layer={layer}: no such layer in the backbone; the last "
                             f"feature-map layers are {', '.join(four_d)}")
        self.subtype = pmodel.is_subtype_model(model)
        head, skipped = _head_of(model, self.subtype)
        inner = keras.Model(backbone.inputs,
                            [backbone.get_layer(layer).output, backbone.output],
                            name="backbone_with_cam")
        inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
        x, features = inputs, None
        # build_model makes a chain: preprocessing -> backbone -> head -> score.
        for lyr in model.layers:
            if isinstance(lyr, keras.layers.InputLayer) or lyr in skipped:
                continue
            if lyr is backbone:
                features, x = inner(x)
            else:
                x = lyr(x)
        if features is None:
            raise ValueError(f"could not find the backbone in the layer chain of {model.name}")
        self.model = keras.Model(inputs, [features, x], name="cam_model")
        self.kernel = head.kernel
        self.bias = head.bias
        self.layer = layer
        self.image_size = int(model.input_shape[1])
        self._fns = {}

    @property
    def members(self) -> list["CamModel"]:
        return [self]

    def logits(self, hidden, target: str = "pneumonia"):
        """``[B]`` float32 log-odds of ``target`` from the head's hidden activation.

        ``pneumonia``: the PNEUMONIA logit of a binary model; for a subtype model (class
        logits ``z``) ``logsumexp(z_bacterial, z_viral) - z_normal``, whose sigmoid is
        ``1 - p(NORMAL)``. ``bacterial`` / ``viral`` (subtype models): that class's log-odds
        against the other two, ``z_c - logsumexp(others)``.
        """
        import tensorflow as tf

        h = tf.cast(hidden, tf.float32)
        z = tf.matmul(h, tf.cast(self.kernel, tf.float32)) + tf.cast(self.bias, tf.float32)
        return log_odds(z, self.subtype, target)

    def function(self, target: str = "pneumonia"):
        """The traced batched CAM function explaining ``target`` (built once per target)."""
        if target not in self._fns:
            self._fns[target] = _trace_cam(self.members, self.image_size,
                                           self.model.inputs[0].dtype, target)
        return self._fns[target]


def log_odds(z, subtype: bool, target: str = "pneumonia"):
    """``[B]`` float32 log-odds of ``target`` from the final Dense layer's outputs ``z``: a
    binary model's ``[B, 1]`` logit, or a subtype model's ``[B, 3]`` class logits (see
    :meth:`CamModel.logits`)."""
    import tensorflow as tf

    if not subtype:
        return tf.reshape(z, [-1])
    normal, bacterial, viral = z[:, 0], z[:, 1], z[:, 2]
    if target == "bacterial":
        return bacterial - tf.reduce_logsumexp(tf.stack([normal, viral], -1), -1)
    if target == "viral":
        return viral - tf.reduce_logsumexp(tf.stack([normal, bacterial], -1), -1)
    return tf.reduce_logsumexp(z[:, 1:], -1) - normal


def channel_weighted_map(features, grads):
    """``[B, h, w]`` float32 Grad-CAM before normalisation: ReLU of the feature maps weighted by
    the spatial means of their gradients."""
    import tensorflow as tf

    g, features = tf.cast(grads, tf.float32), tf.cast(features, tf.float32)
    weights = tf.reduce_mean(g, axis=(1, 2))                          # [B, C]
    return tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, weights))   # [B, h, w]


def _head_of(model, subtype: bool) -> tuple:
    """``(final Dense, layers the CAM model leaves out)``: the sigmoid ``score`` of a binary
    model; a subtype model's ``class_logits`` and what follows it (softmax, ``score``)."""
    import keras

    if subtype:
        head = model.get_layer("class_logits")
        return head, [head, model.get_layer("class_probabilities"), model.layers[-1]]
    score = model.layers[-1]
    if not (isinstance(score, keras.layers.Dense) and score.units == 1
            and score.activation is keras.activations.sigmoid):
        raise ValueError(f"the last layer of {model.name} must be Dense(1, sigmoid) "
                         f"(got {score.__class__.__name__} {score.name})")
    return score, [score]


class EnsembleCamModel:
    """Grad-CAM of an ensemble model: a :class:`CamModel` per member, maps averaged.

    Attributes:
        members: the members' :class:`CamModel`, in member order.
        layer: the feature-map layer (the members' names joined by ``,`` when they differ).
        image_size: S.
    """

    def __init__(self, model, members: list, layer: str | None = None,
                 backbone_name: str | None = None):
        self.members = [CamModel(member, layer, backbone_name) for member in members]
        self.layer = ",".join(dict.fromkeys(m.layer for m in self.members))
        self.subtype = all(m.subtype for m in self.members)
        self.image_size = int(model.input_shape[1])
        self.model = model
        self._fns = {}

    def function(self, target: str = "pneumonia"):
        """The traced batched CAM function (built once per target): mean maps, ensemble
        probabilities."""
        if target not in self._fns:
            self._fns[target] = _trace_cam(self.members, self.image_size,
                                           self.model.inputs[0].dtype, target)
        return self._fns[target]


def _trace_cam(members: list[CamModel], size: int, dtype, target: str = "pneumonia"):
    """``cam_fn(images [B, S, S, 1], sign_threshold) -> (cam, cam_lowres, probs)``, traced once
    for any batch size (see :func:`_members_cam`)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 1), dtype),
                                  tf.TensorSpec((), tf.float32)], autograph=False)
    def cam_fn(images, sign_threshold):
        return _members_cam(members, images, sign_threshold, size, target)

    return cam_fn


def _members_cam(members: list[CamModel], images, sign_threshold, size: int,
                 target: str = "pneumonia"):
    """``(cam [B, S, S], cam_lowres [B, h, w], probs [B])`` averaged over ``members`` (one
    member: its own), inside a ``tf.function``; one tape for every member and image.

    ``target`` is the log-odds explained (:meth:`CamModel.logits`); ``probs`` is always the
    PNEUMONIA probability. The sign of each image's target comes from the members' mean
    probability, so every member explains the same class; the low-resolution maps are resized
    to the first member's grid.
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        outputs = [m.model(images, training=False) for m in members]
        logits = [m.logits(hidden) for m, (_, hidden) in zip(members, outputs)]
        explained = logits if target == "pneumonia" else [
            m.logits(hidden, target) for m, (_, hidden) in zip(members, outputs)]
        probs = tf.add_n([tf.sigmoid(z) for z in logits]) / len(members)
        # +1: explain the target; -1: explain NORMAL (for images below sign_threshold).
        sign = tf.stop_gradient(tf.where(
            pmetrics.decide_label(probs, sign_threshold) == 1, 1.0, -1.0))
        target_sum = tf.add_n([tf.reduce_sum(sign * z) for z in explained])
    # Images are independent in inference mode, so d(sum)/d(features_b) is image b's own
    # gradient: one tape for the whole batch (and member i's features reach only its logits).
    grads = tape.gradient(target_sum, [features for features, _ in outputs])
    grid = outputs[0][0].shape[1:3]
    fulls, lows = [], []
    for (features, _), g in zip(outputs, grads):
        cam = channel_weighted_map(features, g)
        cam = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
        fulls.append(tf.image.resize(cam[..., tf.newaxis], (size, size), method="bilinear"))
        lows.append(cam[..., tf.newaxis] if cam.shape[1:3] == grid
                    else tf.image.resize(cam[..., tf.newaxis], grid, method="bilinear"))
    return (tf.add_n(fulls)[..., 0] / len(members), tf.add_n(lows)[..., 0] / len(members),
            probs)


def cam_model_for(model, layer: str | None = None, backbone_name: str | None = None):
    """A :class:`CamModel` of ``model``, or an :class:`EnsembleCamModel` for an ensemble."""
    from pneumo_tf.modeling.ensemble_model import ensemble_members

    members = ensemble_members(model)
    if members:
        return EnsembleCamModel(model, members, layer, backbone_name)
    return CamModel(model, layer, backbone_name)


def gradcam_batch(cam_model: "CamModel | EnsembleCamModel", images, cam_class: str = "pneumonia",
                  threshold: float = 0.5) -> dict:
    """Grad-CAM maps of a batch in one forward/backward pass.

    Args:
        cam_model: from :func:`cam_model_for` (``CamModel(model)`` for a single model).
        images: ``[B, S, S, 1]`` uint8, exactly what the model is fed.
        cam_class: ``pneumonia`` (gradient of the PNEUMONIA logit; a subtype model's
            pneumonia log-odds), ``predicted`` (of the predicted class's logit: images with
            probability below ``threshold`` get the NORMAL logit, i.e. minus the PNEUMONIA
            logit), or for a subtype model ``bacterial`` / ``viral`` (that class's log-odds
            against the other two, for every image).
        threshold: operating threshold for ``cam_class="predicted"``.

    Returns:
        ``{"cam": [B, S, S] float32 in [0, 1], "cam_lowres": [B, h, w] float32 in [0, 1],
        "probability": [B] float32}``; an image whose map is all-negative gets zeros.
    """
    if cam_class not in CAM_CLASSES:
        raise ValueError(f"--cam_class={cam_class!r}; expected one of {CAM_CLASSES}")
    if cam_class in SUBTYPE_CAM_CLASSES and not cam_model.subtype:
        raise ValueError(f"--cam_class={cam_class} needs a three-class model (trained with "
                         f"--task=subtype); this one is binary: use pneumonia or predicted")
    sign_threshold = float(threshold) if cam_class == "predicted" else -1.0
    target = cam_class if cam_class in SUBTYPE_CAM_CLASSES else "pneumonia"
    full, low, probs = cam_model.function(target)(np.asarray(images), np.float32(sign_threshold))
    return {"cam": full.numpy(), "cam_lowres": low.numpy(), "probability": probs.numpy()}


# ---------------------------------------------------------------------------------------------
# Pictures


def overlay_cam(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """JET colour map of ``cam`` blended over the image the model saw.

    Args:
        gray: ``[S, S]`` or ``[S, S, 1]`` uint8 (the stored, preprocessed image).
        cam: ``[S, S]`` float in [0, 1].
        alpha: weight of the heat map.

    Returns:
        ``[S, S, 3]`` uint8 RGB.
    """
    gray = np.asarray(gray).reshape(cam.shape).astype(np.uint8)
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0), cv2.COLOR_BGR2RGB)


GROUP_MEANING = {"TP": "true positives: PNEUMONIA called PNEUMONIA",
                 "FP": "false positives: NORMAL called PNEUMONIA",
                 "FN": "false negatives: PNEUMONIA called NORMAL",
                 "TN": "true negatives: NORMAL called NORMAL"}


def grid_columns(n: int, max_columns: int = 8) -> int:
    """Columns for ``n`` tiles: the most (up to ``max_columns``) that leave no empty cell, or
    ``max_columns`` when no such count gives at least 4 columns (the spare cells are removed)."""
    for cols in range(min(max_columns, n), 3, -1):
        if n % cols == 0:
            return cols
    return max(1, min(max_columns, n))


def grid_figure(tiles: list[np.ndarray], captions: list[str], title: str,
                max_columns: int = 8, colorbar: bool = True):
    """Overlay tiles ``[S, S, 3]`` RGB in a grid: a caption over each tile, space between
    tiles, no empty cells, the title on top and (``colorbar``) a colour bar of the Grad-CAM
    intensity.

    Returns:
        A matplotlib ``Figure`` (see :func:`pneumo_tf.evaluation.report.figure_png` for its PNG).
    """
    from matplotlib import cm as mpl_cm
    from matplotlib import colors

    from pneumo_tf.evaluation import report  # selects the Agg backend

    n = max(1, len(tiles))
    cols = grid_columns(n, max_columns)
    rows = -(-n // cols)
    # Room for the title: 0.35 inch plus 0.2 per line (a two-line title takes 0.75).
    title_inches = 0.35 + 0.2 * (title.count("\n") + 1)
    height = 2.15 * rows + 0.15 + title_inches
    fig, axes = report.plt.subplots(rows, cols, figsize=(1.9 * cols + 1.0, height),
                                    squeeze=False)
    for ax in axes.flat[len(tiles):]:
        fig.delaxes(ax)
    for ax, tile, caption in zip(axes.flat, tiles, captions):
        ax.imshow(tile)
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.9, top=1 - title_inches / height, bottom=0.02,
                        wspace=0.08, hspace=0.3)
    if not colorbar:
        return fig
    bar_ax = fig.add_axes([0.92, 0.15, 0.015, 0.7])
    fig.colorbar(mpl_cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="jet"), cax=bar_ax,
                 label="Grad-CAM intensity (per image, 0-1)")
    return fig


def tile_caption(path: str, probability: float, max_chars: int = 22) -> str:
    """``person12_bacteria_4\np = 0.973``: the file's name (shortened) and its probability."""
    stem = Path(path).stem
    if len(stem) > max_chars:
        stem = stem[: max_chars - 3] + "..."
    return f"{stem}\np = {probability:.3f}"


# ---------------------------------------------------------------------------------------------
# Regions and attention statistics


def read_crop_boxes(data_dir: str | os.PathLike, split: str) -> dict[str, tuple[int, ...]]:
    """``{record path: crop box (top, bottom, left, right) in source pixels}`` of a split."""
    import tensorflow as tf

    from pneumo_tf.data import pipeline

    manifest = records.read_manifest(data_dir)
    shards = records.split_shards(data_dir, manifest, split)
    spec = {k: v for k, v in records.feature_spec().items() if k in ("path", "crop_box")}
    ds = tf.data.TFRecordDataset([str(p) for p in shards],
                                 compression_type=records.tf_compression_type(
                                     manifest["compression"]))
    ds = ds.batch(256).map(pipeline.without_autograph(lambda s: tf.io.parse_example(s, spec)))
    out = {}
    for batch in ds:
        for path, box in zip(batch["path"].numpy(), batch["crop_box"].numpy()):
            out[path.decode("utf-8")] = tuple(int(v) for v in box)
    return out


def _mask_like_image(mask_path: Path, box, size: int) -> np.ndarray | None:
    """A source-resolution mask cropped and resized exactly like its image; bool ``[S, S]``."""
    if not mask_path.is_file():
        return None
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        return None
    resized = preprocess.resize_area(preprocess.apply_box(mask, preprocess.CropBox(*box)), size)
    return resized >= 128


def image_regions(gray: np.ndarray, record_path: str, box, source_root: str | None) -> dict:
    """Lung (and lesion) masks of one stored image, ``[S, S]`` bool.

    Phantom masks (``source_root/masks/...``, see :func:`pneumo_tf.data.phantoms.mask_paths`)
    when they exist, cropped and resized like the image; else the adaptive lung box of the stored
    image itself (:func:`pneumo_tf.image.preprocess.adaptive_crop_box`) and no lesion mask.

    Returns:
        ``{"lung": mask, "lesion": mask | None, "source": "phantom_masks" | "adaptive_box"}``.
    """
    size = gray.shape[0]
    if source_root:
        from pneumo_tf.data import phantoms

        lung_path, lesion_path = phantoms.mask_paths(source_root, record_path)
        lung = _mask_like_image(lung_path, box, size)
        if lung is not None:
            return {"lung": lung, "lesion": _mask_like_image(lesion_path, box, size),
                    "source": "phantom_masks"}
    lung_box, _ = preprocess.adaptive_crop_box(gray.reshape(size, size))
    lung = np.zeros((size, size), bool)
    lung[lung_box.top:lung_box.bottom, lung_box.left:lung_box.right] = True
    return {"lung": lung, "lesion": None, "source": "adaptive_box"}


def lung_mass_share(cam: np.ndarray, lung: np.ndarray) -> float:
    """Fraction of the (positive) CAM mass inside ``lung``; NaN for an all-zero map."""
    total = float(cam.sum())
    return float(cam[lung].sum() / total) if total > 0 else float("nan")


def pointing_hit(cam: np.ndarray, lesion: np.ndarray) -> bool:
    """Pointing game: is the CAM's maximum inside the lesion mask?

    An empty map (no positive value) points nowhere: a miss, never the argmax of zeros.
    """
    if not cam.max() > 0:
        return False
    return bool(lesion.reshape(-1)[int(np.argmax(cam))])


def pointing_entry(cam: np.ndarray, lesion: np.ndarray | None) -> dict:
    """Pointing-game fields of one image's entry in ``cam_stats.json``.

    Images with an empty CAM stay in the game as misses, so they count in the hit rate's
    denominator (dropping them would inflate it).

    Args:
        cam: ``[S, S]`` float CAM in [0, 1].
        lesion: ``[S, S]`` bool lesion mask, or None.

    Returns:
        ``{}`` without a (non-empty) lesion mask, else ``{"pointing_hit": bool,
        "lesion_fraction": float, "cam_empty": bool}``.
    """
    if lesion is None or not lesion.any():
        return {}
    return {"pointing_hit": pointing_hit(cam, lesion), "lesion_fraction": float(lesion.mean()),
            "cam_empty": not bool(cam.max() > 0)}


def group_of(label: int, prediction: int) -> str:
    return {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN", (0, 0): "TN"}[(int(label), int(prediction))]


def select_balanced(groups: list[str], num_images: int, seed: int) -> np.ndarray:
    """Indices of up to ``num_images`` images, round-robin over TP/FP/FN/TN (seeded), sorted."""
    rng = np.random.default_rng(seed)
    pools = {g: list(rng.permutation([i for i, x in enumerate(groups) if x == g])) for g in GROUPS}
    chosen = []
    while len(chosen) < num_images and any(pools.values()):
        for g in GROUPS:
            if pools[g] and len(chosen) < num_images:
                chosen.append(int(pools[g].pop()))
    return np.array(sorted(chosen), dtype=np.int64)


# The share of the CAM mass inside the lung region, named for the region it was measured in:
# the phantoms' lung masks, or on real films the adaptive lung *box* (which also holds the heart
# and mediastinum, so it overstates how much of the map is on lung tissue).
# ---------------------------------------------------------------------------------------------
# Evidence against true lung masks (a data dir's lung_mask, or a lung model's masks)

LUNG_EVIDENCE_DEFINITION = (
    "lung_share: the CAM's mass inside the lungs over its total mass; lung_fraction: the lungs' "
    "share of the input's pixels; lift = mean lung_share / mean lung_fraction (a ratio of means "
    "over the images with a non-empty CAM: 1.0 = no more lung-bound than a flat map, 1 / mean "
    "lung_fraction = every map wholly inside the lungs); pointing_lungs: share of images whose "
    "CAM peak lies inside the lungs (an empty CAM is a miss)")


def lung_evidence_entry(cam: np.ndarray, lung: np.ndarray) -> dict:
    """One image's CAM measured against its lung mask.

    Args:
        cam: ``[H, W]`` float CAM, >= 0.
        lung: ``[H, W]`` bool lung mask (non-empty).

    Returns:
        ``{"lung_share": float (NaN for an empty CAM), "lung_fraction": float,
        "pointing_lungs": bool, "cam_empty": bool}``.
    """
    cam = np.asarray(cam, np.float64)
    return {"lung_share": lung_mass_share(cam, lung), "lung_fraction": float(lung.mean()),
            "pointing_lungs": pointing_hit(cam, lung), "cam_empty": not bool(cam.max() > 0)}


def _lung_group_stats(entries: list[dict]) -> dict:
    """``n``, means, ``lift`` and pointing rate of some :func:`lung_evidence_entry` results."""
    live = [e for e in entries if not e["cam_empty"]]
    out = {"n": len(entries), "empty_cams": len(entries) - len(live)}
    if live:
        share = float(np.mean([e["lung_share"] for e in live]))
        fraction = float(np.mean([e["lung_fraction"] for e in live]))
        out.update(lung_share=share, lung_fraction=fraction, lift=share / fraction)
    if entries:
        out["pointing_lungs"] = float(np.mean([e["pointing_lungs"] for e in entries]))
    return out


def lung_evidence(cams, lungs, labels, predictions, has_mask=None) -> dict:
    """Grad-CAM evidence against lung masks, per image, per TP/FP/FN/TN group and overall.

    See :data:`LUNG_EVIDENCE_DEFINITION` for the measures; ``lift`` is a ratio of means (mean
    lung_share over mean lung_fraction of the same images), not a mean of per-image ratios, so
    small lungs do not dominate it.

    Args:
        cams: ``[N, H, W]`` float CAMs (>= 0).
        lungs: ``[N, H, W]`` bool lung masks, same size as the CAMs.
        labels: ``[N]`` true labels 0/1; predictions: ``[N]`` predicted labels 0/1.
        has_mask: ``[N]`` bool, whether image i has a lung mask (a data dir's
            ``has_lung_mask``); None = every non-empty mask counts. Images without a mask, or
            with an all-zero one, are skipped and counted.

    Returns:
        ``{"per_image": [entry with "group" | None when skipped], "groups": {"TP": stats, ...,
        "all": stats}, "skipped_no_mask": int, "definition": str}``; stats hold ``n``,
        ``empty_cams``, ``pointing_lungs`` and, when a CAM is non-empty, ``lung_share``,
        ``lung_fraction`` and ``lift``.
    """
    cams, lungs = np.asarray(cams), np.asarray(lungs).astype(bool)
    if cams.shape != lungs.shape or cams.ndim != 3:
        raise ValueError(f"cams {cams.shape} and lung masks {lungs.shape} must both be "
                         f"[N, H, W] of one shape")
    has = lungs.reshape(len(lungs), -1).any(axis=1)
    if has_mask is not None:
        has &= np.asarray(has_mask, bool)
    per_image: list[dict | None] = []
    for i in range(len(cams)):
        per_image.append({**lung_evidence_entry(cams[i], lungs[i]),
                          "group": group_of(labels[i], predictions[i])} if has[i] else None)
    kept = [e for e in per_image if e is not None]
    groups = {g: _lung_group_stats([e for e in kept if e["group"] == g]) for g in GROUPS}
    groups["all"] = _lung_group_stats(kept)
    return {"per_image": per_image, "groups": groups, "skipped_no_mask": int((~has).sum()),
            "definition": LUNG_EVIDENCE_DEFINITION}


def draw_lung_outline(tile: np.ndarray, lung: np.ndarray, color=(255, 255, 255),
                      thickness: int = 1) -> np.ndarray:
    """A copy of an overlay tile with the lungs' outer contour drawn on it.

    Args:
        tile: ``[S, S, 3]`` uint8 RGB (e.g. :func:`overlay_cam`).
        lung: ``[S, S]`` bool lung mask; an empty mask draws nothing.
        color: RGB of the line; thickness: pixels.

    Returns:
        ``[S, S, 3]`` uint8 RGB.
    """
    if lung.shape != tile.shape[:2]:
        raise ValueError(f"lung mask {lung.shape} does not match the tile {tile.shape[:2]}")
    out = np.ascontiguousarray(tile, np.uint8).copy()
    contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), int(thickness))
    return out


def contour_tile(image: np.ndarray, true: np.ndarray | None,
                 predicted: np.ndarray) -> np.ndarray:
    """``[S, S, 3]`` uint8 RGB of a grey ``[S, S]`` film with the true lungs outlined in green
    (when given) and the predicted lungs in red."""
    tile = np.repeat(np.asarray(image, np.uint8)[..., None], 3, axis=-1)
    if true is not None:
        tile = draw_lung_outline(tile, true, color=(0, 255, 0))
    return draw_lung_outline(tile, predicted, color=(255, 0, 0))


SHARE_KEYS = {"phantom_masks": "lung_mask_share", "adaptive_box": "lung_box_share"}


def summarise_attention(entries: list[dict]) -> dict:
    """Per-group and overall statistics of per-image ``cam_stats.json`` entries.

    Each entry holds its share under its region's name (:data:`SHARE_KEYS`); the summary gives
    ``<name>_mean`` for every name present and counts empty maps (NaN shares) in
    ``empty_cams``.
    """

    def stats(items):
        out = {"n": len(items), "empty_cams": 0}
        for key in SHARE_KEYS.values():
            values = [e[key] for e in items if key in e]
            finite = [v for v in values if np.isfinite(v)]
            if values:
                out[f"{key}_mean"] = float(np.mean(finite)) if finite else None
                out["empty_cams"] += len(values) - len(finite)
        pts = [e for e in items if e.get("pointing_hit") is not None]
        if pts:
            out["pointing_n"] = len(pts)  # empty maps included, as misses
            out["pointing_hit_rate"] = float(np.mean([e["pointing_hit"] for e in pts]))
            out["pointing_chance"] = float(np.mean([e["lesion_fraction"] for e in pts]))
            out["pointing_empty"] = sum(bool(e.get("cam_empty")) for e in pts)
        return out

    result = {g: stats([e for e in entries if e["group"] == g]) for g in GROUPS}
    result["all"] = stats(entries)
    return result
