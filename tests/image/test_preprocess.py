"""Tests for pneumo_tf/preprocess.py: the one definition of crop, resize and normalisation."""

import cv2
import numpy as np
import pytest

from pneumo_tf.image import preprocess


def test_fixed_crop_box_matches_paper_integer_maths():
    # The paper's fixed crop: top=int(h*0.15), bottom=int(h*0.90), left=int(w*0.20), right=int(w*0.80)
    assert preprocess.fixed_crop_box(1000, 800) == (150, 900, 160, 640)
    assert preprocess.fixed_crop_box(227, 333) == (int(227 * 0.15), int(227 * 0.90),
                                                   int(333 * 0.20), int(333 * 0.80))


def test_crop_lung_fixed_cuts_exactly_the_box():
    img = np.arange(100 * 50, dtype=np.uint32).reshape(100, 50).astype(np.uint8)
    out = preprocess.crop_lung_fixed(img)
    assert out.shape == (90 - 15, 40 - 10)
    np.testing.assert_array_equal(out, img[15:90, 10:40])


def test_preprocess_gray_shapes_and_methods():
    img = np.full((300, 200), 128, np.uint8)
    out, box, method = preprocess.preprocess_gray(img, 64, "none")
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert box == (0, 300, 0, 200) and method == "none"
    out, box, method = preprocess.preprocess_gray(img, 32, "fixed")
    assert box == (45, 270, 40, 160) and method == "fixed" and out.shape == (32, 32)
    with pytest.raises(ValueError, match="unknown crop 'middle'"):
        preprocess.preprocess_gray(img, 32, "middle")


def test_resize_area_averages_blocks():
    img = np.kron(np.array([[0, 200], [100, 50]], np.uint8), np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(preprocess.resize_area(img, 2), [[0, 200], [100, 50]])
    checker = np.indices((8, 8)).sum(0) % 2 * 200
    assert np.all(preprocess.resize_area(checker.astype(np.uint8), 4) == 100)


def _synthetic_chest(h=400, w=360):
    """Bright body, two dark lung ellipses, black background."""
    import cv2

    img = np.zeros((h, w), np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (int(w * 0.45), int(h * 0.47)), 0, 0, 360, 200, -1)
    cv2.ellipse(img, (int(w * 0.33), int(h * 0.45)), (int(w * 0.12), int(h * 0.25)), 0, 0, 360, 60, -1)
    cv2.ellipse(img, (int(w * 0.67), int(h * 0.45)), (int(w * 0.12), int(h * 0.25)), 0, 0, 360, 60, -1)
    return img


def test_adaptive_crop_finds_the_lung_fields():
    img = _synthetic_chest()
    box, found = preprocess.adaptive_crop_box(img)
    assert found
    # lungs span rows 0.20h..0.70h and columns 0.21w..0.79w; the box pads by 5 %.
    assert 0.10 * 400 <= box.top <= 0.20 * 400 and 0.70 * 400 <= box.bottom <= 0.80 * 400
    assert 0.11 * 360 <= box.left <= 0.21 * 360 and 0.79 * 360 <= box.right <= 0.89 * 360


def test_adaptive_crop_falls_back_to_fixed_on_a_blank_image():
    img = np.full((200, 100), 90, np.uint8)
    box, method = preprocess.crop_box_for(img, "adaptive")
    assert method == "adaptive_fallback"
    assert box == preprocess.fixed_crop_box(200, 100)


def test_tf_twin_matches_host_preprocessing():
    import cv2
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for h, w in [(517, 403), (224, 224), (97, 131)]:
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w)).astype(np.uint8), (7, 7), 0)
        host, _, _ = preprocess.preprocess_gray(img, 64, "fixed")
        graph = preprocess.tf_preprocess_gray(tf.constant(img[..., None]), 64, "fixed")
        diff = np.abs(graph.numpy()[..., 0].astype(int) - host.astype(int))
        # Documented tolerance: area resampling differs by rounding at most by a few levels.
        assert diff.mean() < 1.0 and diff.max() <= 6, (h, w, diff.mean(), diff.max())
    top, bottom, left, right = preprocess.tf_fixed_crop_box(tf.constant(227), tf.constant(333))
    assert (int(top), int(bottom), int(left), int(right)) == preprocess.fixed_crop_box(227, 333)


@pytest.mark.parametrize("mode", preprocess.INPUT_NORMS)
def test_normalize_pixels_modes(mode):
    rgb = np.array([[[255.0, 128.0, 0.0]]], np.float32)
    out = preprocess.normalize_pixels(rgb, mode)
    expected = {
        "unit": [1.0, 128 / 255, 0.0],
        "raw": [255.0, 128.0, 0.0],
        "tf": [1.0, 128 / 127.5 - 1, -1.0],
        # caffe: BGR order, ImageNet mean subtracted (keras resnet50.preprocess_input)
        "caffe": [0.0 - 103.939, 128.0 - 116.779, 255.0 - 123.68],
        "torch": [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225],
    }[mode]
    np.testing.assert_allclose(np.asarray(out)[0, 0], expected, rtol=1e-3, atol=1e-3)


def test_caffe_mode_equals_keras_resnet50_preprocess_input():
    import keras

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    ours = preprocess.normalize_pixels(x, "caffe")
    theirs = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_preprocess_mask_fits_the_decoded_image_then_crops_like_it():
    # A mask drawn at 3x the image's size: rows 40-70 %, columns 10-30 % of the film.
    h, w = 60, 80
    big = np.zeros((3 * h, 3 * w), np.uint8)
    big[int(3 * h * 0.4):int(3 * h * 0.7), int(3 * w * 0.1):int(3 * w * 0.3)] = 255
    box = preprocess.fixed_crop_box(h, w)            # rows 9:54, columns 16:64 of the film
    out = preprocess.preprocess_mask(big, (h, w), box, 24)
    assert out.shape == (24, 24) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 255}
    on_film = np.zeros((h, w), np.uint8)
    on_film[24:42, 8:24] = 255
    want = cv2.resize(on_film[9:54, 16:64], (24, 24), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out, want)
    # A mask of values near the threshold binarises at > 127.
    soft = np.full((h, w), 128, np.uint8)
    soft[:, : w // 2] = 127
    half = preprocess.preprocess_mask(soft, (h, w), preprocess.full_box(h, w), 20)
    assert half[:, :10].max() == 0 and half[:, 10:].min() == 255


def test_resize_to_keeps_size_and_takes_an_interpolation():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(preprocess.resize_to(gray, (3, 4)), gray)
    up = preprocess.resize_to(gray, (6, 8), cv2.INTER_NEAREST)
    assert up.shape == (6, 8) and set(np.unique(up)) == set(np.unique(gray))
    np.testing.assert_array_equal(preprocess.resize_area(gray, 2),
                                  cv2.resize(gray, (2, 2), interpolation=cv2.INTER_AREA))
