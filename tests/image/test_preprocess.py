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


# ---------------------------------------------------------------------------------------------
# The lung crop (--crop=lungs)


def _lung_map(g=20):
    """A ``[g, g]`` map: two lung fields (rows 4-15, columns 3-8 and 11-16) at 0.9, 0.2 around."""
    prob = np.full((g, g), 0.2, np.float32)
    prob[4:16, 3:9] = 0.9
    prob[4:16, 11:17] = 0.9
    return prob


def test_find_lungs_boxes_the_lung_pixels_plus_the_margin():
    finding = preprocess.find_lungs(_lung_map(), margin=0.05, min_fraction=0.1)
    assert finding.fraction == pytest.approx(2 * 12 * 6 / 400)
    assert finding.confidence == pytest.approx(0.9)
    # rows 4..15 -> 0.20..0.80 of the film, columns 3..16 -> 0.15..0.85; 5 % more on each side
    assert finding.box == pytest.approx((0.15, 0.85, 0.10, 0.90))
    # on a 300 x 500 film: outward to whole pixels
    assert preprocess.lung_crop_box(300, 500, finding.box) == (45, 255, 50, 450)
    wide = preprocess.find_lungs(_lung_map(), margin=0.3)
    assert wide.box == (0.0, 1.0, 0.0, 1.0)  # clipped to the film


def test_no_lungs_or_too_few_give_no_box_and_the_fixed_crop():
    empty = preprocess.find_lungs(np.zeros((16, 16), np.float32))
    assert empty == (0.0, 0.0, None)
    few = preprocess.find_lungs(_lung_map(), min_fraction=0.5)
    assert few.box is None and few.fraction == pytest.approx(0.36)
    film = np.zeros((300, 500), np.uint8)
    box, method = preprocess.crop_box_for(film, "lungs", few.box)
    assert method == "lungs_fallback" and box == preprocess.fixed_crop_box(300, 500)
    box, method = preprocess.crop_box_for(film, "lungs", preprocess.find_lungs(_lung_map()).box)
    assert method == "lungs" and box == (45, 255, 50, 450)
    with pytest.raises(ValueError, match="needs the lung model's box"):
        preprocess.preprocess_gray(film, 32, "lungs")


def test_tf_find_lungs_and_the_in_graph_lung_crop_are_the_host_ones():
    import tensorflow as tf

    rng = np.random.default_rng(4)
    maps = [_lung_map(), np.zeros((20, 20), np.float32), _lung_map() * 0.5]
    for _ in range(5):  # random blobs, some touching the edges
        blob = cv2.GaussianBlur(rng.uniform(0, 1, (20, 20)).astype(np.float32), (5, 5), 0)
        maps.append(np.clip((blob - blob.mean()) * 8 + 0.4, 0, 1).astype(np.float32))
    graph = preprocess.tf_find_lungs(tf.constant(np.stack(maps)), 0.07, 0.1)
    film = rng.integers(0, 256, (233, 311)).astype(np.uint8)
    for i, prob in enumerate(maps):
        host = preprocess.find_lungs(prob, 0.07, 0.1)
        assert float(graph["fraction"][i]) == pytest.approx(host.fraction)
        assert float(graph["confidence"][i]) == pytest.approx(host.confidence, abs=1e-6)
        assert bool(graph["found"][i]) == (host.box is not None)
        want, _, _ = preprocess.preprocess_gray(film, 24, "lungs", host.box)
        got = preprocess.tf_preprocess_gray(tf.constant(film[..., None]), 24, "lungs",
                                            graph["box"][i], graph["found"][i])
        if host.box is not None:  # the very same box, to the pixel
            assert tuple(graph["box"][i].numpy()) == host.box
            box = preprocess.tf_lung_crop_box(233, 311, graph["box"][i])
            assert tuple(int(v) for v in box) == preprocess.lung_crop_box(233, 311, host.box)
        diff = np.abs(got.numpy()[..., 0].astype(int) - want.astype(int))
        assert diff.max() <= 6 and diff.mean() < 1.0, (i, diff.max(), diff.mean())
