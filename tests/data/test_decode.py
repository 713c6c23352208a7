"""Tests for pneumo_tf.data.decode: every input is a small file written by the test itself."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pneumo_tf.data import decode
from pneumo_tf.data.decode import RejectError, decode_bytes, decode_item, jpeg_reduction_factor
from pneumo_tf.data.sources import SourceItem

from conftest import REPO

LUMA = np.array([0.299, 0.587, 0.114])


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """``[height, width] uint8`` smooth random field (JPEG-friendly, position-revealing)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16))).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def jpeg_bytes(gray: np.ndarray, quality: int = 95) -> bytes:
    ok, enc = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return enc.tobytes()


def pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_dicom(arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                preamble: bool = True, pixels: bool = True, **elements) -> bytes:
    """A tiny uncompressed 16-bit DICOM file written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for name, value in elements.items():
        setattr(ds, name, value)
    if pixels:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Reduced-size JPEG decoding


@pytest.mark.parametrize("height,width,target,crop,expected", [
    (1024, 1024, 224, "fixed", 2),   # /2: crop 384x308 >= 224; /4: crop rows 192 < 224
    (2900, 2900, 224, "fixed", 4),   # /4: crop 544x435; /8: crop cols 218 < 224
    (1024, 1024, 224, "none", 4),    # /4: 256x256 >= 224; /8: 128
    (1024, 1024, 224, "adaptive", 2),  # needs 448: /2 gives 512
    (900, 1024, 224, "adaptive", 2),   # /2: 450 x 512 >= 448
    (880, 1024, 224, "adaptive", 1),   # /2: 440 < 448
    (900, 1024, 224, "lungs", 2),      # the lung box is not known yet either: as adaptive
    (880, 1024, 224, "lungs", 1),
    (224, 224, 224, "fixed", 1),     # the Kaggle 224 px copies: never reduced
    (3000, 2000, 64, "fixed", 8),
])
def test_jpeg_reduction_factor(height, width, target, crop, expected):
    assert jpeg_reduction_factor(height, width, target, crop) == expected


def test_reduction_factor_leaves_at_least_target_pixels_in_the_crop():
    from pneumo_tf.image.preprocess import fixed_crop_box

    for h in range(200, 3000, 97):
        for w in range(200, 3000, 131):
            s = jpeg_reduction_factor(h, w, 224, "fixed")
            box = fixed_crop_box(-(-h // s), -(-w // s))
            assert box.bottom - box.top >= 224 and box.right - box.left >= 224 or s == 1
            if s < 8:  # and the next larger factor would not have been enough
                box = fixed_crop_box(-(-h // (2 * s)), -(-w // (2 * s)))
                assert box.bottom - box.top < 224 or box.right - box.left < 224


def test_large_jpeg_is_decoded_at_reduced_size_and_matches_full_decode():
    gray = smooth_image(1200, 900)
    data = jpeg_bytes(gray)
    full = decode_bytes(data, name="a.jpeg")
    reduced = decode_bytes(data, name="a.jpeg", target_size=224, crop="fixed")
    assert (full.scale, full.gray.shape) == (1, (1200, 900))
    assert reduced.scale == 2 and reduced.gray.shape == (600, 450)
    assert (reduced.orig_height, reduced.orig_width) == (1200, 900)
    # Same picture: full decode area-shrunk by 2 is within a few grey levels of the DCT /2.
    halved = cv2.resize(full.gray, (450, 600), interpolation=cv2.INTER_AREA)
    assert np.abs(halved.astype(int) - reduced.gray.astype(int)).mean() < 2.0


def test_small_jpeg_is_decoded_at_full_size():
    d = decode_bytes(jpeg_bytes(smooth_image(300, 280)), name="a.jpg", target_size=224,
                     crop="fixed")
    assert d.scale == 1 and d.gray.shape == (300, 280) and d.gray.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Converted correctly


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("target_size", [None, 8])
def test_exif_orientation_comes_out_upright(orientation, target_size):
    stored = smooth_image(64, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L"))
    d = decode_bytes(data, name="r.jpeg", target_size=target_size, crop="none")
    assert (d.orig_height, d.orig_width) == upright.shape
    if target_size is None:
        assert d.scale == 1
        assert np.abs(d.gray.astype(int) - upright.astype(int)).max() <= 1
    else:  # 64x40 reduced by 4 still has >= 8 px on both sides; by 8 it would not
        assert d.scale == 4
        small = cv2.resize(upright, (upright.shape[1] // 4, upright.shape[0] // 4),
                           interpolation=cv2.INTER_AREA)
        assert d.gray.shape == small.shape
        assert np.abs(d.gray.astype(int) - small.astype(int)).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("target_size", [64, 8])
def test_the_graph_turns_an_exif_jpeg_upright_as_the_host_does(orientation, target_size):
    """The SavedModel's bytes signature and predict see the same pixels of an EXIF-rotated JPEG
    (the same DCT reduction, the same turn)."""
    import tensorflow as tf

    stored = smooth_image(64, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    assert int(decode.tf_jpeg_exif_orientation(tf.constant(data))) == orientation
    host = decode_bytes(data, name="r.jpeg", target_size=target_size, crop="none").gray
    graph = decode.tf_decode_gray(tf.constant(data), target_size, "none").numpy()[..., 0]
    assert graph.shape == host.shape
    assert np.abs(graph.astype(int) - host.astype(int)).max() <= 1


def test_the_graph_reads_no_orientation_where_there_is_none_or_a_broken_one():
    import tensorflow as tf

    plain = pil_bytes(Image.fromarray(smooth_image(30, 20)), "JPEG", quality=90)
    assert int(decode.tf_jpeg_exif_orientation(tf.constant(plain))) == 1
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = pil_bytes(Image.fromarray(smooth_image(30, 20)), "JPEG", exif=exif, quality=90)
    at = rotated.index(b"Exif\0\0") + 6
    broken = rotated[:at] + b"\xff" * 8 + rotated[at + 8:]  # a TIFF header that is not one
    assert int(decode.tf_jpeg_exif_orientation(tf.constant(broken))) == 1
    assert int(decode.tf_jpeg_exif_orientation(tf.constant(b"not an image"))) == 1


def test_exif_rotate_90_moves_the_top_left_corner_to_the_top_right():
    stored = np.zeros((60, 100), np.uint8)
    stored[:12, :20] = 255  # bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    d = decode_bytes(pil_bytes(Image.fromarray(stored), "JPEG", exif=exif, quality=98),
                     name="r.jpeg")
    assert d.gray.shape == (100, 60)
    assert d.gray[:20, -12:].mean() > 200 and d.gray[:20, :12].mean() < 50


def test_exif_orientation_in_png_is_applied():
    stored = np.zeros((30, 50), np.uint8)
    stored[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    d = decode_bytes(pil_bytes(Image.fromarray(stored), "PNG", exif=exif), name="r.png")
    assert d.gray.shape == (30, 50)
    assert d.gray[-5:, -5:].min() == 255 and d.gray[:5, :5].max() == 0


def test_16bit_png_is_scaled_not_clipped():
    ramp12 = np.tile(np.linspace(0, 4095, 256).round().astype(np.uint16), (4, 1))  # 12-bit data
    d = decode_bytes(cv2.imencode(".png", ramp12)[1].tobytes(), name="x.png")
    assert d.gray.dtype == np.uint8 and d.gray.shape == (4, 256)
    row = d.gray[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)
    assert (row == 255).sum() == 1  # clipping would saturate everything above 255 / 4095
    np.testing.assert_allclose(row, np.linspace(0, 255, 256), atol=1)

    ramp16 = np.tile(np.array([0, 257 * 100, 65535], np.uint16), (2, 1))
    d = decode_bytes(cv2.imencode(".png", ramp16)[1].tobytes(), name="x.png")
    assert d.gray[0].tolist() == [0, 100, 255]


def test_16bit_rgb_png_is_scaled_to_8bit_gray():
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[0, 0] = (0, 0, 0)
    rgb[0, 1] = (60000, 60000, 60000)
    rgb[0, 2] = (30000, 30000, 30000)
    d = decode_bytes(cv2.imencode(".png", rgb)[1].tobytes(), name="x.png")  # cv2 writes BGR
    assert d.gray.dtype == np.uint8 and d.gray[0].tolist() == [0, 255, 128]


def test_rgba_png_drops_alpha():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :5, 3] = 0      # fully transparent half keeps its grey value (alpha dropped)
    rgba[:, 5:, 3] = 255
    d = decode_bytes(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), name="a.png")
    expected = round(float(LUMA @ [200, 100, 50]))
    assert np.abs(d.gray.astype(int) - expected).max() <= 1


def test_palette_png_maps_palette_colours_to_luminance():
    img = Image.new("P", (8, 4))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 250] + [0] * (256 * 3 - 12))
    img.putdata([0, 1, 2, 3] * 8)
    d = decode_bytes(pil_bytes(img, "PNG"), name="p.png")
    expected = [round(float(LUMA @ c)) for c in ([0, 0, 0], [255, 0, 0], [0, 255, 0],
                                                  [10, 20, 250])]
    assert np.abs(d.gray[0, :4].astype(int) - expected).max() <= 1


def test_cmyk_jpeg_is_converted_to_luminance():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (200, 50, 10)
    rgb[:, 16:] = (10, 180, 250)
    data = pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    d = decode_bytes(data, name="c.jpg")
    assert abs(int(d.gray[16, 4]) - LUMA @ [200, 50, 10]) <= 3
    assert abs(int(d.gray[16, 28]) - LUMA @ [10, 180, 250]) <= 3


def test_rgb_jpeg_is_converted_to_luminance():
    rgb = np.full((16, 16, 3), (30, 200, 90), np.uint8)
    d = decode_bytes(pil_bytes(Image.fromarray(rgb), "JPEG", quality=100), name="c.jpg")
    assert abs(float(d.gray.mean()) - LUMA @ [30, 200, 90]) <= 2


def test_jpeg_with_bytes_after_eoi_is_accepted():
    gray = smooth_image(40, 40)
    data = jpeg_bytes(gray)
    for tail in (b"\x00" * 100, b"\xff\xff", b"\r\n", b"some trailer an app appended"):
        d = decode_bytes(data + tail, name="t.jpeg")
        assert d.gray.shape == (40, 40)


# ---------------------------------------------------------------------------------------------
# Rejected, each with its reason


def reason(data: bytes, name: str, **kwargs) -> str:
    with pytest.raises(RejectError) as info:
        decode_bytes(data, name=name, **kwargs)
    return str(info.value)


def test_zero_byte_file_is_rejected():
    assert reason(b"", "x.jpeg") == "empty file (0 bytes)"


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.99])
def test_truncated_jpeg_is_rejected(keep):
    data = jpeg_bytes(smooth_image(200, 200))
    assert reason(data[:int(len(data) * keep)], "t.jpeg") == "truncated JPEG (no EOI marker)"


def test_jpeg_missing_only_its_eoi_is_rejected():
    data = jpeg_bytes(smooth_image(64, 64))
    assert data.endswith(b"\xff\xd9")
    assert "truncated JPEG" in reason(data[:-2], "t.jpeg")


def test_truncated_jpeg_padded_with_zeros_is_rejected():
    data = jpeg_bytes(smooth_image(200, 200))
    assert "truncated JPEG" in reason(data[: len(data) // 2] + b"\x00" * 4096, "t.jpeg")


def test_truncated_png_is_rejected():
    data = cv2.imencode(".png", smooth_image(200, 200))[1].tobytes()
    assert reason(data[: len(data) // 2], "t.png").startswith("truncated PNG")


@pytest.mark.parametrize("data", [b"<html><body>404 Not Found</body></html>", b"\x00" * 64,
                                  b"GIF? no, just text"])
def test_non_image_with_image_extension_is_rejected(data):
    assert reason(data, "fake.jpeg") == "not an image (unrecognised file format)"


def test_image_over_the_pixel_limit_is_rejected_before_decoding():
    data = jpeg_bytes(smooth_image(100, 200))
    assert reason(data, "big.jpeg", max_pixels=19_999) == (
        "image of 200 x 100 pixels exceeds the limit of 19999")
    assert decode_bytes(data, name="big.jpeg", max_pixels=20_000).gray.shape == (100, 200)


def test_decompression_bomb_header_is_rejected_with_its_size():
    # A PNG header claiming 20000 x 10000 (200 Mpx, beyond Pillow's own 179 Mpx limit) with a
    # tiny compressed body: the reject must come from the header, before any decoding.
    ihdr = struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))
    assert reason(data, "bomb.png") == (
        "image of 20000 x 10000 pixels exceeds the limit of 100000000")
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global guard is left as it was


def test_unreadable_file_is_rejected(tmp_path):
    item = SourceItem(key="train/NORMAL/gone.jpeg", label=0, patient_id="gone", split="train",
                      path=str(tmp_path / "gone.jpeg"))
    with pytest.raises(RejectError, match=r"^unreadable file \(No such file or directory\)$"):
        decode_item(item, target_size=224, crop="fixed")


def test_unknown_crop_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown crop 'middle'"):
        decode_bytes(b"x", name="x.jpeg", crop="middle")


# ---------------------------------------------------------------------------------------------
# DICOM


def test_dicom_rescale_and_window():
    stored = np.array([[0, 100, 200, 300], [400, 500, 600, 1000]], np.uint16)
    # modality value = 2 * stored - 100; window 300 +- 200 over [100, 500)
    data = write_dicom(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300,
                       WindowWidth=400)
    gray = decode_bytes(data, name="a.dcm").gray
    values = stored.astype(float) * 2 - 100
    expected = np.round(np.clip((values - 299.5) / 399 + 0.5, 0, 1) * 255)
    assert gray.dtype == np.uint8 and gray.tolist() == expected.astype(int).tolist()
    assert gray[0, 0] == 0 and gray[1, 3] == 255 and gray[0, 2] == 128  # 300 is the centre


def test_dicom_without_window_uses_min_max_and_12_bit_data_fills_8_bits():
    stored = np.array([[0, 1024, 2048, 4095]], np.uint16)
    gray = decode_bytes(write_dicom(stored, bits_stored=12), name="a.dcm").gray
    assert gray.tolist() == [[0, 64, 128, 255]]


def test_dicom_multi_valued_window_uses_the_first():
    stored = np.array([[0, 50, 100]], np.uint16)
    gray = decode_bytes(write_dicom(stored, WindowCenter=[50.5, 1000], WindowWidth=[101, 10]),
                        name="a.dcm").gray
    assert gray.tolist() == [[0, 128, 255]]


def test_dicom_monochrome1_is_inverted():
    stored = np.array([[0, 1024, 2048, 4095]], np.uint16)
    m1 = decode_bytes(write_dicom(stored, photometric="MONOCHROME1"), name="a.dcm").gray
    assert m1.tolist() == [[255, 191, 127, 0]]


def test_dicom_detected_by_preamble_whatever_the_name_and_by_name_without_preamble():
    stored = np.array([[0, 4095]], np.uint16)
    with_preamble = write_dicom(stored)
    assert with_preamble[128:132] == b"DICM"
    assert decode_bytes(with_preamble, name="image.jpeg").gray.tolist() == [[0, 255]]
    bare = write_dicom(stored, preamble=False)
    assert b"DICM" not in bare[:200]
    assert decode_bytes(bare, name="image.dcm").gray.tolist() == [[0, 255]]
    assert decode.read_dicom_gray(bare).tolist() == [[0, 255]]


def test_dicom_without_pixel_data_is_rejected(tmp_path):
    data = write_dicom(np.zeros((4, 4), np.uint16), pixels=False)
    assert reason(data, "nopix.dcm") == "DICOM without pixel data"
    path = tmp_path / "nopix.dcm"
    path.write_bytes(data)
    with pytest.raises(RejectError, match="DICOM without pixel data"):
        decode.read_dicom_gray(path)


def test_dicom_over_the_pixel_limit_is_rejected():
    data = write_dicom(np.zeros((20, 30), np.uint16))
    assert reason(data, "a.dcm", max_pixels=500) == (
        "image of 30 x 20 pixels exceeds the limit of 500")


def test_garbage_with_dcm_extension_is_rejected():
    assert "not a DICOM file" in reason(b"this is not dicom at all" * 10, "x.dcm")


# ---------------------------------------------------------------------------------------------
# decode_item and the worker-process constraint


def test_decode_item_reads_the_file(tmp_path):
    gray = smooth_image(50, 60)
    path = tmp_path / "person1_bacteria_1.png"
    cv2.imwrite(str(path), gray)
    item = SourceItem(key="train/PNEUMONIA/person1_bacteria_1.png", label=1,
                      patient_id="person1", split="train", path=str(path))
    d = decode_item(item, target_size=224, crop="fixed")
    assert d.scale == 1 and np.array_equal(d.gray, gray)


def test_decode_item_reads_medmnist_images(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = tmp_path / "pneumoniamnist.npz"
    np.savez_compressed(path, train_images=images, train_labels=np.array([[0], [1], [1]]))
    item = SourceItem(key="pneumoniamnist.npz/train/2", label=1, patient_id="p", split="train",
                      path=None, npz=(str(path), "train", 2))
    d = decode_item(item, target_size=28, crop="none")
    assert np.array_equal(d.gray, images[2]) and (d.orig_height, d.orig_width, d.scale) == (
        28, 28, 1)


def test_decode_module_does_not_import_tensorflow():
    code = ("import sys, pneumo_tf.data.decode, pneumo_tf.data.sources; "
            "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
