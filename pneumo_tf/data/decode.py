"""Decode one radiograph (JPEG, PNG, TIFF, BMP, ..., DICOM, MedMNIST array) to grayscale uint8.

The converter calls :func:`decode_item` in worker processes, so this module imports no
TensorFlow: numpy, OpenCV, Pillow and pydicom only. The in-graph twins at the end
(:func:`tf_decode_film`, :func:`tf_decode_gray`, :func:`tf_preprocess_bytes`), which exported SavedModels run, import
TensorFlow inside their functions. A file that cannot be turned into a correct
image raises :class:`RejectError` whose message is a short reason for ``rejects.jsonl``; nothing
here ever returns a silently wrong image.

Decisions worth knowing:

- Speed: large JPEGs are decoded at 1/2, 1/4 or 1/8 size by libjpeg's DCT scaling
  (``cv2.IMREAD_REDUCED_GRAYSCALE_*``) when the region that will be cropped is still at least
  ``target_size`` pixels on both sides at that size (see :func:`jpeg_reduction_factor`).
- Safety: image dimensions are read from the header (Pillow opens lazily) and checked against a
  pixel limit BEFORE any pixel is decoded, so decompression bombs cost nothing.
- Truncated JPEGs are detected by their missing end-of-image marker (with Pillow's strict decoder
  as the judge when the marker is missing, so files with trailing bytes after it still pass).
- Orientation: EXIF orientation is applied (the image comes out upright); OpenCV does this itself
  for JPEGs with every ``IMREAD_*GRAYSCALE`` flag, Pillow's ``exif_transpose`` for other formats.
- Colour -> gray is ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B; OpenCV and Pillow agree).
  Alpha is DROPPED, not composited: pixels keep their stored grey values even where transparent
  (an X-ray exported with a transparent border must not turn black there).
- More than 8 bits (16-bit PNG/TIFF, 12/16-bit DICOM without a window): scaled linearly from the
  image's own min..max to 0..255 (never clipped), so 12-bit data stored in 16-bit containers
  does not come out nearly black.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import threading
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumo_tf.data.sources import SourceItem
from pneumo_tf.image.preprocess import CROP_METHODS, fixed_crop_box

DEFAULT_MAX_PIXELS = 100_000_000  # 100 Mpx: 10x the largest radiographs we know of
JPEG_REDUCTION_FACTORS = (8, 4, 2)  # largest first: the smallest decode that is still enough
_REDUCED_GRAYSCALE_FLAGS = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
# The adaptive and the lung model's boxes can be much smaller than the fixed one; demand twice the
# target size on the whole reduced image so even a box of half the image side still has
# target_size pixels.
ADAPTIVE_REDUCTION_MARGIN = 2
_EXIF_ORIENTATION_TAG = 0x0112
_JPEG_EOI = b"\xff\xd9"
_JPEG_TRAILING_PADDING = b"\x00\xff\r\n\t "
_DICOM_MAGIC_OFFSET = 128
_PIL_LIMIT_LOCK = threading.Lock()
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: multi-picture JPEG (some cameras); its first image is used


class RejectError(Exception):
    """The file cannot be converted; ``str(e)`` is a short human reason for ``rejects.jsonl``."""


@dataclasses.dataclass
class Decoded:
    """One decoded radiograph.

    Attributes:
        gray: ``[h, w] uint8``, upright, possibly decoded at reduced size (see ``scale``).
        orig_height: full-resolution height of the (upright) source, pixels.
        orig_width: full-resolution width of the (upright) source, pixels.
        scale: 1, 2, 4 or 8; ``gray`` is the source downscaled by this factor, so a box in
            ``gray``'s pixels times ``scale`` is (within ``scale`` pixels) the box in source pixels.
    """

    gray: np.ndarray
    orig_height: int
    orig_width: int
    scale: int = 1


# ---------------------------------------------------------------------------------------------
# Entry points


def decode_item(item: SourceItem, *, target_size: int | None, crop: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode one listed source item (a file, or an image inside a MedMNIST npz).

    Args:
        item: from :func:`pneumo_tf.data.sources.discover`.
        target_size: output side the converter will resize to, pixels; None decodes at full size.
        crop: ``fixed`` | ``none`` | ``adaptive`` | ``lungs``: decides how far a JPEG may be
            reduced.
        max_pixels: images with more pixels than this are rejected before decoding.

    Returns:
        The decoded image.

    Raises:
        RejectError: the item cannot be decoded correctly; the message says why.
    """
    if item.npz is not None:
        npz_path, split, index = item.npz
        return Decoded(_medmnist_image(npz_path, split, index), *_medmnist_shape(npz_path, split))
    if item.path is None:
        raise ValueError(f"source item {item.key!r} has neither a file path nor an npz reference")
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RejectError(f"unreadable file ({e.strerror or e})") from e
    return decode_bytes(data, name=item.key, target_size=target_size, crop=crop,
                        max_pixels=max_pixels)


def decode_bytes(data: bytes, *, name: str, target_size: int | None = None, crop: str = "none",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode the bytes of one image file to an upright ``[h, w] uint8`` gray image.

    Args:
        data: the whole file.
        name: file name or key; only its extension is used (``.dcm`` marks DICOM without a
            ``DICM`` preamble).
        target_size: see :func:`decode_item`; None (default) always decodes at full size.
        crop: see :func:`decode_item`.
        max_pixels: pixel limit checked on the header before decoding.

    Returns:
        The decoded image; ``scale`` > 1 only for JPEGs when ``target_size`` allows it.

    Raises:
        RejectError: empty, truncated, corrupt, not an image, over the pixel limit, DICOM
            without pixel data, or an unsupported pixel format.
    """
    if crop not in CROP_METHODS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_METHODS}")
    if not data:
        raise RejectError("empty file (0 bytes)")
    if is_dicom(data, name):
        return _decode_dicom(data, max_pixels)

    image_format, width, height, orientation = _read_header(data)
    _check_pixel_limit(width, height, max_pixels)
    if image_format in _JPEG_FORMATS:
        if not _ends_with_jpeg_eoi(data) and not _pil_decodes_strictly(data):
            raise RejectError("truncated JPEG (no EOI marker)")
        scale = jpeg_reduction_factor(height, width, target_size, crop) if target_size else 1
        flags = _REDUCED_GRAYSCALE_FLAGS[scale] if scale > 1 else cv2.IMREAD_GRAYSCALE
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        expected = (math.ceil(height / scale), math.ceil(width / scale))
        if gray is not None and gray.shape == expected:
            return Decoded(gray, height, width, scale)
        # OpenCV could not decode it (or did not orient it as the header says): let Pillow try.
        gray = _decode_with_pil(data, image_format)
        return Decoded(_as_uint8(gray), height, width, 1)

    gray = None
    if orientation == 1:  # OpenCV's EXIF handling outside JPEG varies by codec; Pillow's does not
        gray = cv2.imdecode(np.frombuffer(data, np.uint8),
                            cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if gray is None or gray.shape != (height, width):
        gray = _decode_with_pil(data, image_format)
    return Decoded(_as_uint8(gray), height, width, 1)


def read_dicom_gray(data_or_path: bytes | str | os.PathLike) -> np.ndarray:
    """Read a DICOM file to a display-ready ``[h, w] uint8`` gray image (first frame).

    Applies RescaleSlope/RescaleIntercept, then the first WindowCenter/WindowWidth when present
    (DICOM PS3.3 C.11.2.1.2 linear window) or the image's min..max otherwise, then inverts
    MONOCHROME1 so that bone is always bright.

    Args:
        data_or_path: the file's bytes, or its path.

    Raises:
        RejectError: not readable as DICOM, no pixel data, or undecodable pixel data.
    """
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        data = bytes(data_or_path)
    else:
        try:
            with open(data_or_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise RejectError(f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise RejectError("empty file (0 bytes)")
    return dicom_dataset_to_gray(_parse_dicom(data))


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested on their own)


def jpeg_reduction_factor(height: int, width: int, target_size: int, crop: str) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) that still leaves enough pixels for the crop.

    libjpeg decodes at 1/s size as ``ceil(height / s) x ceil(width / s)``. Reduction is allowed
    when the region to be cropped at that size is at least ``target_size`` on both sides, so the
    final area resize still only shrinks. ``fixed`` uses the paper's crop fractions, ``none`` the
    whole image, ``adaptive`` and ``lungs`` the whole image with a 2x margin (their box is not
    known yet).

    Args:
        height: upright source height, pixels.
        width: upright source width, pixels.
        target_size: output side, pixels.
        crop: ``fixed`` | ``none`` | ``adaptive`` | ``lungs``.
    """
    if crop not in CROP_METHODS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {CROP_METHODS}")
    for factor in JPEG_REDUCTION_FACTORS:
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        need = target_size
        if crop == "fixed":
            box = fixed_crop_box(h, w)
            h, w = box.bottom - box.top, box.right - box.left
        elif crop in ("adaptive", "lungs"):
            need = ADAPTIVE_REDUCTION_MARGIN * target_size
        if h >= need and w >= need:
            return factor
    return 1


def to_uint8_min_max(values: np.ndarray) -> np.ndarray:
    """Scale any numeric ``[h, w]`` array linearly from its min..max to ``uint8`` 0..255.

    A constant image maps to 0 (there is no contrast to keep). NaNs map to 0.
    """
    x = np.nan_to_num(np.asarray(values, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def apply_dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) of modality values to ``uint8`` 0..255."""
    width = max(float(width), 1.0)
    x = np.asarray(values, np.float64)
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) if width > 1 else (x > center - 0.5) * 1.0
    return np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def is_dicom(data: bytes, name: str = "") -> bool:
    """True for the ``DICM`` preamble at byte 128, or a ``.dcm``/``.dicom`` file name."""
    if data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    return name.lower().endswith((".dcm", ".dicom"))


def dicom_dataset_to_gray(ds) -> np.ndarray:
    """A parsed pydicom dataset to ``[h, w] uint8`` (see :func:`read_dicom_gray`)."""
    if "PixelData" not in ds:
        raise RejectError("DICOM without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        raise RejectError("unsupported DICOM PhotometricInterpretation 'PALETTE COLOR'")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types; any of them means "cannot decode"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", None) or str(syntax or "unknown transfer syntax")
        raise RejectError(f"DICOM pixel data could not be decoded ({syntax_name}: {e})") from e
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]  # multi-frame: the first frame is the radiograph we can use
    if samples == 3:
        pixels = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if pixels.ndim != 2:
        raise RejectError(f"DICOM pixel array has unexpected shape {tuple(pixels.shape)}")
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0)
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if samples == 1 and center is not None and width is not None and width > 0:
        gray = apply_dicom_window(values, center, width)
    else:
        gray = to_uint8_min_max(values)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; make bone bright
        gray = 255 - gray
    return np.ascontiguousarray(gray)


# ---------------------------------------------------------------------------------------------
# Internals


def _first_value(value) -> float | None:
    """First number of a (possibly multi-valued) DICOM element, or None."""
    if value is None:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise RejectError(f"image of {width} x {height} pixels exceeds the limit of {max_pixels}")


def _as_uint8(gray: np.ndarray) -> np.ndarray:
    return gray if gray.dtype == np.uint8 else to_uint8_min_max(gray)


def _open_with_pil(data: bytes) -> Image.Image:
    """``Image.open`` (lazy: header only) without Pillow's own decompression-bomb limit.

    Callers check :func:`_check_pixel_limit` themselves, with the user's ``max_pixels``; Pillow's
    fixed limit (2 x 89 Mpx) would otherwise hide the real size and override a larger limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            with _PIL_LIMIT_LOCK:
                old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    return Image.open(io.BytesIO(data))
                finally:
                    Image.MAX_IMAGE_PIXELS = old_limit


def _read_header(data: bytes) -> tuple[str, int, int, int]:
    """``(format, upright width, upright height, EXIF orientation)`` from the header only."""
    try:
        img = _open_with_pil(data)
        width, height = img.size
        try:
            orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
        except Exception:  # a broken EXIF block is not a broken image: ignore it
            orientation = 1
    except UnidentifiedImageError as e:
        raise RejectError("not an image (unrecognised file format)") from e
    except Exception as e:  # Pillow's header parsers raise SyntaxError, OSError, ValueError, ...
        raise RejectError(f"corrupt image header ({e})") from e
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in (5, 6, 7, 8):  # transposed or rotated by 90 degrees: sides swap
        width, height = height, width
    return img.format or "unknown", width, height, orientation


def _ends_with_jpeg_eoi(data: bytes) -> bool:
    """True when the JPEG ends with its EOI marker (FFD9), ignoring padding bytes after it."""
    # EOI is FF D9 and D9 is not a padding byte, so stripping padding never eats into it.
    return data[-4096:].rstrip(_JPEG_TRAILING_PADDING).endswith(_JPEG_EOI)


def _pil_decodes_strictly(data: bytes) -> bool:
    """True when Pillow decodes every pixel without running out of data (full decode: slow)."""
    try:
        with _open_with_pil(data) as img:
            img.load()
        return True
    except Exception:
        return False


def _decode_with_pil(data: bytes, image_format: str) -> np.ndarray:
    """Full decode with Pillow: upright, gray; more than 8 bits come back as they are."""
    try:
        with _open_with_pil(data) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return np.asarray(img)
            return np.asarray(img.convert("L"))
    except Exception as e:
        message = str(e)
        if "truncated" in message:
            raise RejectError(f"truncated {image_format} ({message})") from e
        raise RejectError(f"corrupt {image_format} image ({message})") from e


def _parse_dicom(data: bytes):
    import pydicom  # only DICOM sources pay for the import

    has_preamble = data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises InvalidDicomError, OSError, ValueError, ...
        raise RejectError(f"unreadable DICOM ({e})") from e
    if "PixelData" not in ds and not has_preamble:
        raise RejectError("DICOM without pixel data (or not a DICOM file: no 'DICM' preamble)")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # Bare data sets (no preamble/meta) are legal DICOM files; pydicom needs the transfer
        # syntax spelled out before it decodes pixels, and it knows how it parsed the file.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _decode_dicom(data: bytes, max_pixels: int) -> Decoded:
    ds = _parse_dicom(data)
    if "PixelData" not in ds:
        raise RejectError("DICOM without pixel data")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * columns * frames > max_pixels:
        what = f"image of {columns} x {rows} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise RejectError(f"{what} exceeds the limit of {max_pixels}")
    gray = dicom_dataset_to_gray(ds)
    return Decoded(gray, int(gray.shape[0]), int(gray.shape[1]), 1)


@functools.lru_cache(maxsize=4)
def _medmnist_split_images(npz_path: str, split: str) -> np.ndarray:
    """``[N, H, W] uint8`` images of one split, loaded once per process (npz is not mmap-able)."""
    with np.load(npz_path, allow_pickle=False) as npz:
        images = npz[f"{split}_images"]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return images


def _medmnist_shape(npz_path: str, split: str) -> tuple[int, int]:
    images = _medmnist_split_images(npz_path, split)
    return int(images.shape[1]), int(images.shape[2])


def _medmnist_image(npz_path: str, split: str, index: int) -> np.ndarray:
    images = _medmnist_split_images(npz_path, split)
    if not 0 <= index < len(images):
        raise RejectError(f"index {index} out of range for {split}_images ({len(images)} images)")
    image = images[index]
    if image.ndim == 3 and image.shape[-1] == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if image.dtype != np.uint8:
        image = to_uint8_min_max(image)
    return np.ascontiguousarray(image)


# ---------------------------------------------------------------------------------------------
# In-graph decoding: the TensorFlow twin of decode_bytes for JPEG and PNG, used by exported
# SavedModels. TensorFlow is imported inside these functions only (see the module docstring).


def tf_jpeg_reduction_factor(height, width, target_size: int, crop: str):
    """In-graph twin of :func:`jpeg_reduction_factor` (int32 scalar)."""
    import tensorflow as tf

    from pneumo_tf.image.preprocess import tf_fixed_crop_box

    factor = tf.constant(1, tf.int32)
    for f in reversed(JPEG_REDUCTION_FACTORS):  # 2, 4, 8: the last that fits wins
        h = (height + f - 1) // f
        w = (width + f - 1) // f
        need = target_size
        if crop == "fixed":
            top, bottom, left, right = tf_fixed_crop_box(h, w)
            h, w = bottom - top, right - left
        elif crop in ("adaptive", "lungs"):
            need = ADAPTIVE_REDUCTION_MARGIN * target_size
        factor = tf.where((h >= need) & (w >= need), tf.constant(f, tf.int32), factor)
    return factor


def _tf_luma(rgb):
    """``[H, W, 3]`` uint8 RGB -> ``[H, W, 1]`` uint8, ITU-R BT.601 luma, rounded."""
    import tensorflow as tf

    y = tf.tensordot(tf.cast(rgb, tf.float32), tf.constant([0.299, 0.587, 0.114]), 1)
    return tf.cast(tf.clip_by_value(tf.round(y), 0.0, 255.0), tf.uint8)[..., None]


def _tf_min_max_uint8(values):
    """In-graph twin of :func:`to_uint8_min_max` for ``[H, W, 1]``."""
    import tensorflow as tf

    x = tf.cast(values, tf.float64)
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    scaled = tf.where(hi > lo, (x - lo) * (255.0 / tf.maximum(hi - lo, 1e-12)), tf.zeros_like(x))
    return tf.cast(tf.round(scaled), tf.uint8)


# How far into a JPEG the in-graph EXIF reader looks for the APP1 block (it sits right after the
# SOI marker; JFIF writers put a short APP0 first) and how many IFD0 entries it reads.
_TF_EXIF_SEARCH_BYTES = 4096
_TF_EXIF_MAX_ENTRIES = 64


def tf_jpeg_exif_orientation(image_bytes):
    """In-graph twin of the EXIF orientation :func:`decode_bytes` applies to a JPEG: int32 scalar
    1..8 (1 when there is no EXIF block, no orientation tag or a value out of range).

    Reads the first ``Exif\\0\\0`` block of the file's first bytes: the TIFF header's byte
    order, IFD0's entries, the value of tag 0x0112.
    """
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(image_bytes, 0, _TF_EXIF_SEARCH_BYTES), tf.uint8)
    b = tf.cast(head, tf.int32)
    n = tf.shape(b)[0]
    span = tf.maximum(n - 5, 0)
    match = tf.ones([span], tf.bool)
    for k, c in enumerate(b"Exif\0\0"):
        match &= tf.equal(b[k:k + span], c)
    found = tf.reduce_any(match)
    tiff = tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.int32) + 6

    def byte(offset):
        return tf.gather(b, tf.clip_by_value(offset, 0, tf.maximum(n - 1, 0)))

    little = tf.equal(byte(tiff), 0x49)  # "II": Intel byte order; "MM": Motorola

    def u16(offset):
        lo, hi = byte(offset), byte(offset + 1)
        return tf.where(little, lo + 256 * hi, hi + 256 * lo)

    def u32(offset):
        return tf.where(little, u16(offset) + 65536 * u16(offset + 2),
                        65536 * u16(offset) + u16(offset + 2))

    ifd = tiff + u32(tiff + 4)
    count = u16(ifd)
    entries = ifd + 2 + 12 * tf.range(_TF_EXIF_MAX_ENTRIES)
    is_tag = (tf.equal(u16(entries), _EXIF_ORIENTATION_TAG)
              & (tf.range(_TF_EXIF_MAX_ENTRIES) < count) & (entries + 10 <= n))
    value = tf.reduce_max(tf.where(is_tag, u16(entries + 8), 0))
    valid = found & (ifd + 2 <= n) & (value >= 1) & (value <= 8)
    return tf.where(valid, value, 1)


def tf_apply_exif_orientation(image, orientation):
    """``[h, w, C]`` stored pixels -> upright pixels for EXIF ``orientation`` 1..8 (as Pillow's
    ``exif_transpose``: 6 = turn 90 degrees clockwise, 8 = counter-clockwise, ...)."""
    import tensorflow as tf

    branches = [lambda: image,
                lambda: tf.image.flip_left_right(image),
                lambda: tf.image.rot90(image, 2),
                lambda: tf.image.flip_up_down(image),
                lambda: tf.image.transpose(image),
                lambda: tf.image.rot90(image, 3),
                lambda: tf.image.rot90(tf.image.transpose(image), 2),
                lambda: tf.image.rot90(image, 1)]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


def tf_decode_film(image_bytes, target_size: int, crop: str) -> dict:
    """In-graph twin of :func:`decode_bytes` for one JPEG/PNG/BMP/GIF file's bytes (scalar
    string): ``{"gray": [h, w, 1] uint8 upright, "height", "width": int32 full-resolution size
    of the upright image, "scale": int32 1, 2, 4 or 8}`` (:class:`Decoded`'s fields).

    JPEGs come out of libjpeg's own grayscale output (accurate integer DCT), reduced by the
    converter's DCT-scaling rule, and turned upright by their EXIF orientation
    (:func:`tf_jpeg_exif_orientation`) as the converter and predict turn them; 8-bit PNGs use
    libpng's RGB -> gray; 16-bit PNGs are scaled from their own min..max like the converter does;
    alpha is dropped. For 8-bit JPEG and PNG this gives the converter's pixels exactly (measured
    in tests/serving/test_export.py). EXIF orientation in other formats is not applied.
    """
    import tensorflow as tf

    def jpeg():
        shape = tf.io.extract_jpeg_shape(image_bytes)
        orientation = tf_jpeg_exif_orientation(image_bytes)
        sideways = orientation >= 5  # upright sides swap, as decode_bytes' header reading
        height = tf.where(sideways, shape[1], shape[0])
        width = tf.where(sideways, shape[0], shape[1])
        factor = tf_jpeg_reduction_factor(height, width, target_size, crop)
        # INTEGER_ACCURATE is libjpeg's JDCT_ISLOW, what OpenCV uses: identical pixels.
        branches = [lambda r=r: tf.io.decode_jpeg(image_bytes, channels=1, ratio=r,
                                                  dct_method="INTEGER_ACCURATE")
                    for r in (1, 2, 4, 8)]
        index = tf.cast(tf.math.log(tf.cast(factor, tf.float32)) / math.log(2.0) + 0.5, tf.int32)
        gray = tf_apply_exif_orientation(tf.switch_case(index, branches), orientation)
        return gray, height, width, factor

    def full_size(gray):
        return gray, tf.shape(gray)[0], tf.shape(gray)[1], tf.constant(1, tf.int32)

    def png16():
        img = tf.io.decode_png(image_bytes, channels=0, dtype=tf.uint16)
        gray = tf.cond(tf.shape(img)[-1] >= 3,
                       lambda: tf.tensordot(tf.cast(img[..., :3], tf.float64),
                                            tf.constant([0.299, 0.587, 0.114], tf.float64), 1)[
                                                ..., None],
                       lambda: tf.cast(img[..., :1], tf.float64))
        return full_size(_tf_min_max_uint8(gray))

    def png8():
        # libpng's own RGB -> gray (drops alpha), as OpenCV's IMREAD_GRAYSCALE does: identical.
        return full_size(tf.io.decode_png(image_bytes, channels=1))

    def other():  # BMP, GIF: BT.601 luma, within 1 grey level of OpenCV/Pillow
        img = tf.io.decode_image(image_bytes, channels=0, dtype=tf.uint8, expand_animations=False)
        return full_size(tf.cond(tf.shape(img)[-1] >= 3, lambda: _tf_luma(img[..., :3]),
                                 lambda: img[..., :1]))

    is_png = tf.strings.substr(image_bytes, 0, 4) == b"\x89PNG"
    # IHDR bit depth is byte 24 of a PNG file.
    png_depth = tf.strings.substr(image_bytes, 24, 1)
    is_png16 = is_png & tf.equal(png_depth, b"\x10")
    gray, height, width, scale = tf.case(
        [(tf.io.is_jpeg(image_bytes), jpeg), (is_png16, png16), (is_png, png8)], default=other,
        exclusive=False)
    gray.set_shape([None, None, 1])
    return {"gray": gray, "height": height, "width": width, "scale": scale}


def tf_decode_gray(image_bytes, target_size: int, crop: str):
    """One JPEG/PNG/BMP/GIF file's bytes (scalar string) -> ``[h, w, 1] uint8`` gray, upright
    (:func:`tf_decode_film`'s ``gray``)."""
    return tf_decode_film(image_bytes, target_size, crop)["gray"]


def tf_preprocess_bytes(image_bytes, image_size: int, crop: str):
    """Scalar string -> ``[S, S, 1] uint8`` model input (decode, gray, crop, area resize)."""
    from pneumo_tf.image.preprocess import tf_preprocess_gray

    return tf_preprocess_gray(tf_decode_gray(image_bytes, image_size, crop), image_size, crop)
