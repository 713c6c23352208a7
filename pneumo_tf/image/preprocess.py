"""Image maths shared by the converter, serving, prediction and Grad-CAM overlays.

One place per fact: the lung crop, the resize and the pixel normalisation are defined here once,
in numpy/cv2 (host, converter) and in TensorFlow (in-graph serving), so training/serving skew
cannot creep in. Everything here is a pure function.

Conventions: a "gray image" is a 2-D ``uint8`` array ``[H, W]``; a crop box is
``(top, bottom, left, right)`` in pixels of the image it was computed on, half-open like a slice.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

# The paper's fixed lung crop: rows 15 %-90 % of height, columns 20 %-80 % of width (fractions of the full image).
FIXED_CROP_FRACTIONS = (0.15, 0.90, 0.20, 0.80)  # top, bottom, left, right
CROP_METHODS = ("fixed", "none", "adaptive", "lungs")
# The lung crop (--crop=lungs): a pixel of the lung model's map is lung above this probability.
LUNG_PROBABILITY_THRESHOLD = 0.5
# Margin around the predicted lungs' bounding box, a fraction of the film's height (rows) and
# width (columns), and the lung share of the whole film below which no lungs count as found.
DEFAULT_LUNG_MARGIN = 0.05
DEFAULT_MIN_LUNG_FRACTION = 0.1


class CropBox(NamedTuple):
    """A crop box in pixels: rows ``top:bottom``, columns ``left:right``."""

    top: int
    bottom: int
    left: int
    right: int


def fixed_crop_box(height: int, width: int) -> CropBox:
    """The paper's fixed lung crop for an image of ``height`` x ``width`` pixels."""
    t, b, l, r = FIXED_CROP_FRACTIONS
    return CropBox(int(height * t), int(height * b), int(width * l), int(width * r))


def full_box(height: int, width: int) -> CropBox:
    """The box covering the whole image (``--crop=none``)."""
    return CropBox(0, int(height), 0, int(width))


def adaptive_crop_box(gray: np.ndarray) -> tuple[CropBox, bool]:
    """Lung-field bounding box found by classical image processing.

    Lungs are the darkest large regions inside the body, one on each side of the bright spine.
    The image is downsampled to 256 px (speed, noise) and contrast-equalised (CLAHE); the body is
    the filled Otsu foreground, eroded so the dark gaps between arms and chest wall drop out; lung
    candidates are the body pixels darker than its 30th intensity percentile. The largest
    candidate left of the midline and the largest right of it are the lungs; their union's
    bounding box, padded by 5 % of the image size, is the crop.

    Args:
        gray: ``[H, W] uint8`` radiograph, lungs dark (MONOCHROME2).

    Returns:
        ``(box, found)``: the lung box in ``gray``'s pixels and True, or the fixed crop box and
        False when no plausible pair of lung fields was found (the caller records the fallback).
    """
    h, w = gray.shape[:2]
    scale = 256.0 / max(h, w)
    small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    small = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(4, 4)).apply(small)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    sh, sw = small.shape
    _, bright = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # The lungs are holes in the bright body: fill the outer contours to get the whole body.
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    body = np.zeros_like(bright)
    cv2.drawContours(body, contours, -1, 255, thickness=cv2.FILLED)
    k = max(3, int(0.06 * sw)) | 1
    body = cv2.erode(body, np.ones((k, k), np.uint8))
    inside = small[body > 0]
    if inside.size < 0.2 * small.size:
        return fixed_crop_box(h, w), False
    dark = ((small <= np.percentile(inside, 30)) & (body > 0)).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, _, stats, centroids = cv2.connectedComponentsWithStats(dark, connectivity=8)
    best = {"left": None, "right": None}
    for i in range(1, n):
        area = stats[i, cv2.CC_STAT_AREA]
        cx, cy = centroids[i]
        if area < 0.01 * sh * sw or cy > 0.85 * sh:
            continue
        side = "left" if cx < sw / 2 else "right"
        if best[side] is None or area > stats[best[side], cv2.CC_STAT_AREA]:
            best[side] = i
    if best["left"] is None or best["right"] is None:
        return fixed_crop_box(h, w), False
    sel = [best["left"], best["right"]]
    x0 = min(stats[i, cv2.CC_STAT_LEFT] for i in sel)
    y0 = min(stats[i, cv2.CC_STAT_TOP] for i in sel)
    x1 = max(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] for i in sel)
    y1 = max(stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT] for i in sel)
    # Plausibility: two lungs together span a good part of the image.
    if (x1 - x0) < 0.35 * sw or (y1 - y0) < 0.25 * sh:
        return fixed_crop_box(h, w), False
    pad_y, pad_x = 0.05 * sh, 0.05 * sw
    box = CropBox(
        max(0, int((y0 - pad_y) / scale)), min(h, int(np.ceil((y1 + pad_y) / scale))),
        max(0, int((x0 - pad_x) / scale)), min(w, int(np.ceil((x1 + pad_x) / scale))),
    )
    return box, True


class LungBox(NamedTuple):
    """The predicted lungs' bounding box plus its margin, as fractions of the film: ``top`` and
    ``bottom`` of its height, ``left`` and ``right`` of its width (float64, clipped to [0, 1])."""

    top: float
    bottom: float
    left: float
    right: float


class LungFinding(NamedTuple):
    """What a lung model's map says about one film.

    Attributes:
        fraction: lung share of the whole film (map pixels above
            :data:`LUNG_PROBABILITY_THRESHOLD` / all pixels; the map is the film squashed to a
            square, which keeps area shares).
        confidence: mean lung probability over those pixels (0 without any).
        box: the lung crop's :class:`LungBox`, or None when ``fraction`` is below the minimum
            (the crop falls back to the fixed one).
    """

    fraction: float
    confidence: float
    box: LungBox | None


def find_lungs(probabilities: np.ndarray, margin: float = DEFAULT_LUNG_MARGIN,
               min_fraction: float = DEFAULT_MIN_LUNG_FRACTION) -> LungFinding:
    """The lungs in one lung-probability map (the lung model's output for a whole film).

    The box is the bounding box of the map's lung pixels, in map cells, as fractions of the map's
    side, widened by ``margin`` on every side and clipped to the film. Computed in float64 from
    integer cell indices, so :func:`tf_find_lungs` gives the very same numbers.

    Args:
        probabilities: ``[G, G]`` P(lung) of each cell of the film squashed to the model's input.
        margin: fraction of the film's height (top, bottom) and width (left, right).
        min_fraction: the lung share below which ``box`` is None.
    """
    lung = np.asarray(probabilities) > LUNG_PROBABILITY_THRESHOLD
    g_h, g_w = lung.shape
    count = int(lung.sum())
    confidence = float(np.asarray(probabilities, np.float64)[lung].mean()) if count else 0.0
    fraction = count / lung.size
    if count == 0 or count < min_fraction * lung.size:
        return LungFinding(fraction, confidence, None)
    rows = np.flatnonzero(lung.any(axis=1))
    cols = np.flatnonzero(lung.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = LungBox(max(0.0, r0 / g_h - margin), min(1.0, r1 / g_h + margin),
                  max(0.0, c0 / g_w - margin), min(1.0, c1 / g_w + margin))
    return LungFinding(fraction, confidence, box)


# Float rounding of the box's fractions (0.8 + 0.05 = 0.8500000000000001) must not add a pixel.
_PIXEL_EPS = 1e-9


def lung_crop_box(height: int, width: int, box: LungBox) -> CropBox:
    """A :class:`LungBox` on a film of ``height`` x ``width`` pixels: outward to whole pixels."""
    return CropBox(int(math.floor(box.top * height + _PIXEL_EPS)),
                   int(math.ceil(box.bottom * height - _PIXEL_EPS)),
                   int(math.floor(box.left * width + _PIXEL_EPS)),
                   int(math.ceil(box.right * width - _PIXEL_EPS)))


_NO_FINDING = object()


def crop_box_for(gray: np.ndarray, crop: str, lungs=_NO_FINDING) -> tuple[CropBox, str]:
    """The crop box for ``crop`` (one of :data:`CROP_METHODS`) and the method actually used.

    Args:
        gray: ``[H, W]`` the film.
        crop: ``fixed``, ``none``, ``adaptive`` or ``lungs``.
        lungs: with ``crop="lungs"``, the film's :class:`LungBox` (from :func:`find_lungs` on the
            lung model's map of this film), or None where no lungs were found.

    Returns:
        ``(box, method)``: the method is ``crop`` itself, or ``"adaptive_fallback"`` /
        ``"lungs_fallback"`` when the adaptive search / the lung model found no lungs and the
        fixed box was used.
    """
    h, w = gray.shape[:2]
    if crop == "fixed":
        return fixed_crop_box(h, w), "fixed"
    if crop == "none":
        return full_box(h, w), "none"
    if crop == "adaptive":
        box, found = adaptive_crop_box(gray)
        return box, "adaptive" if found else "adaptive_fallback"
    if crop == "lungs":
        if lungs is _NO_FINDING:
            raise ValueError("crop 'lungs' needs the lung model's box of the film (find_lungs)")
        if lungs is None:
            return fixed_crop_box(h, w), "lungs_fallback"
        return lung_crop_box(h, w, lungs), "lungs"
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_METHODS}")


def apply_box(gray: np.ndarray, box: CropBox) -> np.ndarray:
    """``gray`` cropped to ``box``."""
    return gray[box.top:box.bottom, box.left:box.right]


def crop_lung_fixed(gray: np.ndarray) -> np.ndarray:
    """The paper's fixed lung crop of a ``[H, W]`` image."""
    return apply_box(gray, fixed_crop_box(*gray.shape[:2]))


def resize_area(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize ``[H, W] uint8`` to ``[size, size] uint8`` with area interpolation (cv2)."""
    return resize_to(gray, (size, size), cv2.INTER_AREA)


def resize_to(image: np.ndarray, size_hw: tuple[int, int],
              interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Resize ``[H, W] uint8`` to ``size_hw = (height, width)`` pixels with a cv2 interpolation
    (``cv2.INTER_AREA`` for images, ``cv2.INTER_NEAREST`` for masks); a no-op at that size."""
    if image.shape[0] == size_hw[0] and image.shape[1] == size_hw[1]:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (int(size_hw[1]), int(size_hw[0])), interpolation=interpolation)


def preprocess_gray(gray: np.ndarray, image_size: int, crop: str,
                    lungs=_NO_FINDING) -> tuple[np.ndarray, CropBox, str]:
    """Crop and resize one radiograph exactly as the converter stores it.

    Args:
        gray: ``[H, W] uint8`` full radiograph.
        image_size: output side in pixels.
        crop: ``fixed`` | ``none`` | ``adaptive`` | ``lungs``.
        lungs: ``crop="lungs"`` only: the film's :class:`LungBox` or None (see
            :func:`crop_box_for`).

    Returns:
        ``(image [image_size, image_size] uint8, box in gray's pixels, crop method used)``.
    """
    box, method = crop_box_for(gray, crop, lungs)
    return resize_area(apply_box(gray, box), image_size), box, method


def lung_thumbnail(gray: np.ndarray, size: int) -> np.ndarray:
    """``[size, size] uint8``: the whole film squashed (area) to a lung model's input."""
    return resize_area(gray, size)


def preprocess_mask(mask: np.ndarray, image_hw: tuple[int, int], box: CropBox,
                    image_size: int) -> np.ndarray:
    """Bring a mask onto its stored image: the image's crop and resize, nearest neighbour.

    The mask is first resized to the decoded image it belongs to (a mask drawn on the
    full-resolution film also fits a smaller or squashed copy of it, and a JPEG decoded at reduced
    size), then cropped with the image's ``box`` (:func:`apply_box`) and resized to
    ``image_size`` (:func:`resize_to`), all nearest neighbour so no new values appear, then
    binarised (``> 127``).

    Args:
        mask: ``[h, w] uint8`` mask, 255 (or > 127) = inside, of any size.
        image_hw: ``(height, width)`` of the decoded image the crop box was computed on, pixels.
        box: that image's crop box (:func:`crop_box_for`).
        image_size: side of the stored square image, pixels.

    Returns:
        ``[image_size, image_size] uint8``, 0 or 255.
    """
    on_image = resize_to(mask, image_hw, cv2.INTER_NEAREST)
    stored = resize_to(apply_box(on_image, box), (image_size, image_size), cv2.INTER_NEAREST)
    return np.where(stored > 127, 255, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# TensorFlow twins (imported lazily so the converter's worker processes need no TensorFlow).


def tf_fixed_crop_box(height, width):
    """In-graph twin of :func:`fixed_crop_box`: int32 scalars ``(top, bottom, left, right)``.

    Uses float64 products then truncation, which is exactly Python's ``int(h * 0.15)``.
    """
    import tensorflow as tf

    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    t, b, l, r = FIXED_CROP_FRACTIONS
    return (tf.cast(h * t, tf.int32), tf.cast(h * b, tf.int32),
            tf.cast(w * l, tf.int32), tf.cast(w * r, tf.int32))


def tf_find_lungs(probabilities, margin: float = DEFAULT_LUNG_MARGIN,
                  min_fraction: float = DEFAULT_MIN_LUNG_FRACTION) -> dict:
    """In-graph twin of :func:`find_lungs` for a batch of maps ``[N, G, G]`` float32.

    Returns:
        ``{"fraction": [N] float32, "confidence": [N] float32, "found": [N] bool (a box, i.e.
        :func:`find_lungs`'s ``box`` is not None), "box": [N, 4] float64 (top, bottom, left,
        right fractions; meaningless where not found)}``.
    """
    import tensorflow as tf

    probabilities = tf.convert_to_tensor(probabilities, tf.float32)
    lung = probabilities > LUNG_PROBABILITY_THRESHOLD
    shape = tf.shape(lung)
    g_h, g_w = shape[1], shape[2]
    cells = tf.cast(g_h * g_w, tf.float64)
    count = tf.reduce_sum(tf.cast(lung, tf.int32), axis=[1, 2])
    p64 = tf.cast(probabilities, tf.float64)
    total = tf.reduce_sum(tf.where(lung, p64, tf.zeros_like(p64)), axis=[1, 2])
    count64 = tf.cast(count, tf.float64)
    zero, one = tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64)
    confidence = tf.where(count > 0, total / tf.maximum(count64, one), zero)
    found = (count > 0) & (count64 >= min_fraction * cells)

    def first_last(any_along):  # [N, L] bool -> first index, last index + 1 (int32)
        length = tf.shape(any_along)[1]
        first = tf.argmax(tf.cast(any_along, tf.int32), axis=1, output_type=tf.int32)
        last = length - tf.argmax(tf.cast(any_along[:, ::-1], tf.int32), axis=1,
                                  output_type=tf.int32)
        return tf.cast(first, tf.float64), tf.cast(last, tf.float64)

    r0, r1 = first_last(tf.reduce_any(lung, axis=2))
    c0, c1 = first_last(tf.reduce_any(lung, axis=1))
    gh, gw = tf.cast(g_h, tf.float64), tf.cast(g_w, tf.float64)
    box = tf.stack([tf.maximum(zero, r0 / gh - margin), tf.minimum(one, r1 / gh + margin),
                    tf.maximum(zero, c0 / gw - margin), tf.minimum(one, c1 / gw + margin)], axis=1)
    return {"fraction": tf.cast(count64 / cells, tf.float32),
            "confidence": tf.cast(confidence, tf.float32), "found": found, "box": box}


def tf_lung_crop_box(height, width, box):
    """In-graph twin of :func:`lung_crop_box`: int32 scalars ``(top, bottom, left, right)`` from
    one ``[4]`` float64 box."""
    import tensorflow as tf

    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    eps = _PIXEL_EPS
    return (tf.cast(tf.floor(box[0] * h + eps), tf.int32),
            tf.cast(tf.math.ceil(box[1] * h - eps), tf.int32),
            tf.cast(tf.floor(box[2] * w + eps), tf.int32),
            tf.cast(tf.math.ceil(box[3] * w - eps), tf.int32))


def tf_resize_area(gray, image_size: int):
    """In-graph twin of :func:`resize_area` for ``[H, W, 1]`` uint8 (TF's float area resize,
    rounded: within 1 grey level of OpenCV's)."""
    import tensorflow as tf

    resized = tf.image.resize(tf.cast(gray, tf.float32), (image_size, image_size),
                              method="area", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def tf_crop_box(gray, crop: str, lung_box=None, lungs_found=None):
    """In-graph twin of :func:`crop_box_for` for ``[H, W, 1]`` uint8: int32 scalars ``(top,
    bottom, left, right)``.

    ``adaptive`` has no in-graph twin: callers must preprocess on the host for such runs.
    ``lungs`` needs the film's ``lung_box`` (``[4]`` float64) and ``lungs_found`` (bool scalar)
    from :func:`tf_find_lungs`; where no lungs were found it takes the fixed crop, as the
    converter does.
    """
    import tensorflow as tf

    shape = tf.shape(gray)
    if crop == "none":
        return tf.constant(0, tf.int32), shape[0], tf.constant(0, tf.int32), shape[1]
    if crop not in ("fixed", "lungs"):
        raise ValueError(f"crop {crop!r} has no in-graph implementation; use 'fixed', 'none' "
                         f"or 'lungs'")
    box = tf_fixed_crop_box(shape[0], shape[1])
    if crop == "lungs":
        if lung_box is None or lungs_found is None:
            raise ValueError("crop 'lungs' needs the film's lung box (tf_find_lungs)")
        lung = tf_lung_crop_box(shape[0], shape[1], lung_box)
        box = tuple(tf.where(lungs_found, a, b) for a, b in zip(lung, box))
    return box


def tf_preprocess_gray(gray, image_size: int, crop: str, lung_box=None, lungs_found=None):
    """In-graph twin of :func:`preprocess_gray` for ``[H, W, 1]`` uint8 (serving): the crop of
    :func:`tf_crop_box`, then :func:`tf_resize_area`.

    Returns:
        ``[image_size, image_size, 1]`` uint8.
    """
    top, bottom, left, right = tf_crop_box(gray, crop, lung_box, lungs_found)
    return tf_resize_area(gray[top:bottom, left:right, :], image_size)


# Pixel normalisation modes (docs/method.md: the paper's [0, 1] vs the backbone's own). Inputs are float ``[..., 3]`` in 0..255, RGB order.
INPUT_NORMS = ("unit", "caffe", "torch", "tf", "raw")
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # 0..255 scale (keras imagenet_utils "caffe")
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)        # [0, 1] scale (keras imagenet_utils "torch")
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


def normalize_pixels(x, mode: str):
    """Normalise float pixels in 0..255 (RGB) for a backbone; works on numpy and tf tensors.

    Modes: ``unit`` -> [0, 1] (the paper); ``caffe`` -> BGR, ImageNet mean subtracted (ResNet50's
    ``preprocess_input``); ``torch`` -> [0, 1], ImageNet mean/std (DenseNet); ``tf`` -> [-1, 1];
    ``raw`` -> unchanged (backbones that normalise inside, e.g. EfficientNetV2, ConvNeXt).
    """
    if mode == "unit":
        return x / 255.0
    if mode == "raw":
        return x
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        mean = np.array(_TORCH_MEAN_RGB, np.float32)
        std = np.array(_TORCH_STD_RGB, np.float32)
        return (x / 255.0 - mean) / std
    if mode == "caffe":
        bgr = x[..., ::-1]
        return bgr - np.array(_CAFFE_MEAN_RGB[::-1], np.float32)
    raise ValueError(f"unknown input normalisation {mode!r}; expected one of {INPUT_NORMS}")
