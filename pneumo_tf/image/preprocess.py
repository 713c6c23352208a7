"""Image maths shared by the converter, serving, prediction and Grad-CAM overlays.

One place per fact: the lung crop, the resize and the pixel normalisation are defined here once,
in numpy/cv2 (host, converter) and in TensorFlow (in-graph serving), so training/serving skew
cannot creep in. Everything here is a pure function.

Conventions: a "gray image" is a 2-D ``uint8`` array ``[H, W]``; a crop box is
``(top, bottom, left, right)`` in pixels of the image it was computed on, half-open like a slice.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

# The paper's fixed lung crop: rows 15 %-90 % of height, columns 20 %-80 % of width (fractions of the full image).
FIXED_CROP_FRACTIONS = (0.15, 0.90, 0.20, 0.80)  # top, bottom, left, right
CROP_METHODS = ("fixed", "none", "adaptive")


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


def crop_box_for(gray: np.ndarray, crop: str) -> tuple[CropBox, str]:
    """The crop box for ``crop`` in {fixed, none, adaptive} and the method actually used.

    The method is ``crop`` itself, or ``"adaptive_fallback"`` when the adaptive search fell back
    to the fixed box.
    """
    h, w = gray.shape[:2]
    if crop == "fixed":
        return fixed_crop_box(h, w), "fixed"
    if crop == "none":
        return full_box(h, w), "none"
    if crop == "adaptive":
        box, found = adaptive_crop_box(gray)
        return box, "adaptive" if found else "adaptive_fallback"
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


def preprocess_gray(gray: np.ndarray, image_size: int, crop: str) -> tuple[np.ndarray, CropBox, str]:
    """Crop and resize one radiograph exactly as the converter stores it.

    Args:
        gray: ``[H, W] uint8`` full radiograph.
        image_size: output side in pixels.
        crop: ``fixed`` | ``none`` | ``adaptive``.

    Returns:
        ``(image [image_size, image_size] uint8, box in gray's pixels, crop method used)``.
    """
    box, method = crop_box_for(gray, crop)
    return resize_area(apply_box(gray, box), image_size), box, method


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


def tf_preprocess_gray(gray, image_size: int, crop: str):
    """In-graph twin of :func:`preprocess_gray` for ``[H, W, 1]`` uint8 (serving).

    ``adaptive`` has no in-graph twin: callers must preprocess on the host for such runs.

    Returns:
        ``[image_size, image_size, 1]`` uint8.
    """
    import tensorflow as tf

    if crop == "fixed":
        shape = tf.shape(gray)
        top, bottom, left, right = tf_fixed_crop_box(shape[0], shape[1])
        gray = gray[top:bottom, left:right, :]
    elif crop != "none":
        raise ValueError(f"crop {crop!r} has no in-graph implementation; use 'fixed' or 'none'")
    resized = tf.image.resize(tf.cast(gray, tf.float32), (image_size, image_size),
                              method="area", antialias=False)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


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
