"""Tests of pneumo_tf.image.augment: geometry, resampler agreement, XLA, statistics, the Keras layer."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.image import augment

H, W = 24, 32


def _params(batch=1, **kw):
    """Parameters of the identity transform, with ``kw`` overriding some (``[B]`` each)."""
    base = dict(angle=0.0, zoom_x=1.0, zoom_y=1.0, shift_x=0.0, shift_y=0.0, shear=0.0, flip=0.0)
    base.update(kw)
    return {k: tf.fill([batch], float(v)) for k, v in base.items()}


def _matrices(height=H, width=W, batch=1, **kw):
    return augment.compose_affine(height, width, **_params(batch, **kw))


def _random_images(batch=3, height=H, width=W, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (batch, height, width, channels)).astype(np.float32)


def _dot_image(y, x, size=9):
    img = np.zeros((1, size, size, 1), np.float32)
    img[0, y, x, 0] = 200.0
    return img


@pytest.mark.parametrize("resample", [augment.transform_native, augment.transform_gather])
def test_identity_returns_input(resample):
    images = _random_images()
    m = _matrices(batch=3)
    np.testing.assert_allclose(m.numpy(), [[1, 0, 0, 0, 1, 0, 0, 0]] * 3, atol=1e-6)
    np.testing.assert_allclose(resample(images, m, "nearest").numpy(), images, atol=1e-3)


@pytest.mark.parametrize("resample", [augment.transform_native, augment.transform_gather])
def test_rotation_90_moves_pixel_counter_clockwise(resample):
    # 9x9, centre (4, 4). A dot right of the centre at (row 4, col 7) rotated +90° (counter-
    # clockwise on screen) ends above the centre, at (row 1, col 4).
    out = resample(_dot_image(4, 7), _matrices(9, 9, angle=math.pi / 2), "constant").numpy()
    assert out[0, 1, 4, 0] == pytest.approx(200.0, abs=1e-2)
    assert np.count_nonzero(out > 1.0) == 1


@pytest.mark.parametrize("resample", [augment.transform_native, augment.transform_gather])
def test_flip_mirrors_columns(resample):
    out = resample(_dot_image(2, 1), _matrices(9, 9, flip=1.0), "constant").numpy()
    assert out[0, 2, 7, 0] == pytest.approx(200.0, abs=1e-3)
    assert np.count_nonzero(out > 1.0) == 1


def test_shift_zoom_and_shear_move_pixels_where_defined():
    # shift +0.25 of width 8 -> 2 px right; the content zoom of 2 doubles the distance to the
    # centre; shear s moves x by s * (y - cy).
    dot = np.zeros((1, 9, 9, 1), np.float32)
    dot[0, 4, 3, 0] = 100.0
    shifted = augment.transform_native(dot, _matrices(9, 9, shift_x=2 / 9), "constant").numpy()
    assert shifted[0, 4, 5, 0] == pytest.approx(100.0, abs=1e-3)
    zoomed = augment.transform_native(dot, _matrices(9, 9, zoom_x=2.0), "constant").numpy()
    assert zoomed[0, 4, 2, 0] == pytest.approx(100.0, abs=1e-3)  # 4 + 2 * (3 - 4)
    dot2 = np.zeros((1, 9, 9, 1), np.float32)
    dot2[0, 6, 4, 0] = 100.0
    sheared = augment.transform_native(dot2, _matrices(9, 9, shear=0.5), "constant").numpy()
    assert sheared[0, 6, 5, 0] == pytest.approx(100.0, abs=1e-3)  # x = 4 + 0.5 * (6 - 4)


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_resamplers_agree(fill_mode):
    images = _random_images(batch=8)
    # Paper ranges and much wilder ones (big rotations, shifts: lots of border handling).
    for seed, kw in [((1, 2), {}), ((5, 6), dict(rotation_deg=180, zoom=0.6, shift=0.8,
                                                  shear=0.5))]:
        m = augment.random_affine_matrices(8, H, W, seed=seed, **kw)
        native = augment.transform_native(images, m, fill_mode, 17.0).numpy()
        gather = augment.transform_gather(images, m, fill_mode, 17.0).numpy()
        np.testing.assert_allclose(gather, native, atol=0.05)
        assert np.abs(native - images).mean() > 5.0  # the transform did something


def test_gather_resampler_compiles_with_xla():
    images = _random_images(batch=4)
    m = augment.random_affine_matrices(4, H, W, seed=(3, 4))
    jitted = tf.function(augment.transform_gather, jit_compile=True)
    for fill_mode in ("nearest", "constant"):
        got = jitted(tf.constant(images), m, fill_mode).numpy()
        want = augment.transform_native(images, m, fill_mode).numpy()
        np.testing.assert_allclose(got, want, atol=0.05)
    # The layer too, inside one jit-compiled function (training step on a GPU farm).
    layer = augment.RandomAffine(resampler="gather", seed=1)
    step = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    out = step(tf.constant(images)).numpy()
    assert out.shape == images.shape and np.abs(out - images).mean() > 5.0


def test_gather_xla_resampler_matches_native_inside_a_plain_graph():
    images = _random_images(batch=4)
    m = augment.random_affine_matrices(4, H, W, seed=(9, 9))
    plain_graph = tf.function(lambda x: augment.transform_gather_xla(x, m, "constant", 3.0))
    np.testing.assert_allclose(plain_graph(tf.constant(images)).numpy(),
                               augment.transform_native(images, m, "constant", 3.0).numpy(),
                               atol=0.05)
    # Same layer seed -> same draw, whichever resampler: the layers agree too.
    native = augment.RandomAffine(seed=2, resampler="native")(images, training=True).numpy()
    xla = augment.RandomAffine(seed=2, resampler="gather_xla")(images, training=True).numpy()
    np.testing.assert_allclose(xla, native, atol=0.05)


def test_native_resampler_has_no_xla_kernel():
    # Why the gather resampler exists; if TF ever adds the kernel this test says so.
    m = augment.random_affine_matrices(1, H, W, seed=(0, 1))
    jitted = tf.function(augment.transform_native, jit_compile=True)
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.UnimplementedError)):
        jitted(tf.constant(_random_images(batch=1)), m, "nearest")


def test_sampled_parameters_respect_ranges():
    n = 4000
    p = {k: v.numpy() for k, v in augment.sample_affine_params(
        n, rotation_deg=20, zoom=0.2, shift=0.2, shear=0.1, flip=True, seed=(7, 8)).items()}
    limits = {"angle": (math.radians(-20), math.radians(20)), "zoom_x": (0.8, 1.2),
              "zoom_y": (0.8, 1.2), "shift_x": (-0.2, 0.2), "shift_y": (-0.2, 0.2),
              "shear": (-0.1, 0.1)}
    for name, (lo, hi) in limits.items():
        v = p[name]
        assert lo <= v.min() and v.max() <= hi, name
        # Uniform: fills the range, centred, variance (hi - lo)^2 / 12 within 10 %.
        span = hi - lo
        assert v.min() < lo + 0.01 * span and v.max() > hi - 0.01 * span, name
        assert abs(v.mean() - (lo + hi) / 2) < 0.03 * span, name
        assert v.var() == pytest.approx(span**2 / 12, rel=0.1), name
    assert set(np.unique(p["flip"])) == {0.0, 1.0}
    assert 0.45 < p["flip"].mean() < 0.55
    assert np.corrcoef(p["zoom_x"], p["zoom_y"])[0, 1] < 0.1  # independent axes
    no_flip = augment.sample_affine_params(500, 20, 0.2, 0.2, 0.1, False, (7, 8))
    assert float(tf.reduce_max(no_flip["flip"])) == 0.0


def test_matrix_statistics_match_rotation_only_range():
    # Rotation only: the matrix is a pure rotation whose angle stays within ±20°.
    m = augment.random_affine_matrices(2000, H, W, rotation_deg=20, zoom=0, shift=0, shear=0,
                                       flip=False, seed=(1, 1)).numpy()
    angles = np.degrees(np.arctan2(m[:, 1], m[:, 0]))
    assert np.abs(angles).max() <= 20.0 + 1e-4 and np.abs(angles).max() > 19.0
    np.testing.assert_allclose(m[:, 0] ** 2 + m[:, 1] ** 2, 1.0, atol=1e-5)


def test_same_seed_same_batch_and_different_seed_differs():
    a = augment.random_affine_matrices(6, H, W, seed=(11, 12)).numpy()
    b = augment.random_affine_matrices(6, H, W, seed=(11, 12)).numpy()
    c = augment.random_affine_matrices(6, H, W, seed=(11, 13)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    images = _random_images(batch=6)
    out1 = augment.RandomAffine(seed=5)(images, training=True).numpy()
    out2 = augment.RandomAffine(seed=5)(images, training=True).numpy()
    np.testing.assert_array_equal(out1, out2)
    layer = augment.RandomAffine(seed=5)
    first, second = layer(images, training=True).numpy(), layer(images, training=True).numpy()
    assert np.abs(first - second).mean() > 1.0  # a fresh draw per call


def test_layer_is_identity_at_inference():
    images = _random_images()
    layer = augment.RandomAffine(seed=0)
    np.testing.assert_array_equal(layer(images).numpy(), images)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images)
    assert np.abs(layer(images, training=True).numpy() - images).mean() > 5.0


def test_layer_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="resampler='xla'.*gather"):
        augment.RandomAffine(resampler="xla")
    with pytest.raises(ValueError, match="fill_mode='wrap'"):
        augment.RandomAffine(fill_mode="wrap")
    with pytest.raises(ValueError, match="zoom=1.5"):
        augment.RandomAffine(zoom=1.5)
    with pytest.raises(ValueError, match="rotation_deg=-1"):
        augment.RandomAffine(rotation_deg=-1)


def test_get_config_round_trip_and_model_keras_safe_mode(tmp_path):
    layer = augment.RandomAffine(rotation_deg=10, zoom=0.1, shift=0.05, shear=0.02, flip=False,
                                 fill_mode="constant", resampler="gather", seed=3, fill_value=9,
                                 name="aug")
    clone = augment.RandomAffine.from_config(layer.get_config())
    for key in ("rotation_deg", "zoom", "shift", "shear", "flip", "fill_mode", "resampler",
                "seed", "fill_value"):
        assert getattr(clone, key) == getattr(layer, key), key

    inputs = keras.Input((H, W, 3))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    got = loaded.get_layer("aug")
    assert isinstance(got, augment.RandomAffine)
    assert got.get_config() == layer.get_config()
    images = _random_images()
    np.testing.assert_array_equal(loaded(images, training=False).numpy(), images)
    # Saved seed state: the loaded layer draws the same next batch as the original.
    np.testing.assert_allclose(loaded(images, training=True).numpy(),
                               model(images, training=True).numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Intensity changes (RandomAugment)


def _film(batch=8, size=32, seed=0):
    """Smooth gray images with an edge, so blur and sharpening have something to act on."""
    rng = np.random.default_rng(seed)
    x = np.tile(np.linspace(40, 200, size, dtype=np.float32), (batch, size, 1))
    x[:, :, size // 2:] += 30
    return (x + rng.normal(0, 2, x.shape)).clip(0, 255)[..., None].repeat(3, -1).astype(np.float32)


def test_intensity_off_is_the_identity_and_each_change_stays_in_range():
    images = _film()
    np.testing.assert_array_equal(augment.random_intensity(images, (1, 2)).numpy(), images)
    for key, value in (("brightness", 0.2), ("contrast", 0.3), ("gamma", 0.4),
                       ("sharpness", 1.0), ("noise", 0.05)):
        out = augment.random_intensity(images, (1, 2), **{key: value}).numpy()
        assert out.min() >= 0.0 and out.max() <= 255.0, key
        assert np.abs(out - images).mean() > 0.5, key
        # Channels stay identical (a replicated grayscale film stays gray) except for noise.
        if key != "noise":
            np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)


def test_brightness_and_contrast_follow_their_definitions():
    images = _film(batch=400)
    shift = augment.random_intensity(images, (3, 4), brightness=0.1).numpy() - images
    per_image = shift.reshape(400, -1)
    inner = (images > 30) & (images < 220)
    delta = np.array([s[m].mean() for s, m in zip(per_image, inner.reshape(400, -1))])
    assert np.abs(delta).max() <= 25.5 + 1e-3 and np.abs(delta).max() > 20  # ±0.1 * 255
    out = augment.random_intensity(images, (3, 5), contrast=0.3).numpy()
    ratio = out.reshape(400, -1).std(1) / images.reshape(400, -1).std(1)
    assert 0.69 < ratio.min() < 0.75 and 1.22 < ratio.max() < 1.31


def test_negative_sharpness_blurs_and_positive_sharpens():
    images = _film(batch=64)

    def edge_energy(x):
        return np.abs(np.diff(x[..., 0], axis=2)).mean(axis=(1, 2))

    out = augment.random_intensity(images, (5, 6), sharpness=1.0).numpy()
    u = tf.random.stateless_uniform([6, 64, 1, 1, 1], seed=(5, 6), minval=-1.0, maxval=1.0)
    s = u[3].numpy().reshape(-1)
    change = edge_energy(out) - edge_energy(images)
    assert np.all(change[s < -0.2] < 0) and np.all(change[s > 0.2] > 0)


def test_random_augment_keeps_the_geometry_of_random_affine():
    images = _random_images(batch=4)
    geometry = dict(rotation_deg=15, zoom=0.1, shift=0.1, shear=0.05, seed=4)
    plain = augment.RandomAffine(**geometry)(images, training=True).numpy()
    noisy = augment.RandomAugment(noise=0.0, contrast=0.0, **geometry)(images, training=True)
    np.testing.assert_allclose(noisy.numpy(), plain, atol=1e-4)
    bright = augment.RandomAugment(brightness=0.2, **geometry)(images, training=True).numpy()
    assert np.abs(bright - plain).mean() > 1.0
    layer = augment.RandomAugment(gamma=0.3, **geometry)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images)


def test_make_augment_layer_picks_the_class_and_round_trips(tmp_path):
    assert type(augment.make_augment_layer(rotation_deg=5)) is augment.RandomAffine
    layer = augment.make_augment_layer(rotation_deg=5, contrast=0.2, sharpness=0.5, seed=1,
                                       name="aug")
    assert isinstance(layer, augment.RandomAugment)
    with pytest.raises(ValueError, match="noise=-0.1"):
        augment.RandomAugment(noise=-0.1)
    inputs = keras.Input((H, W, 3))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True).get_layer("aug")
    assert isinstance(loaded, augment.RandomAugment)
    assert loaded.get_config() == layer.get_config()


# ---------------------------------------------------------------------------------------------
# Image and mask together (nearest neighbour for the mask)


def _blob_pair(batch=4, size=32, seed=0):
    """Images whose bright rectangle is exactly their 0/255 mask (one per image)."""
    rng = np.random.default_rng(seed)
    images = np.full((batch, size, size, 1), 20.0, np.float32)
    masks = np.zeros((batch, size, size, 1), np.uint8)
    for i in range(batch):
        t, l = rng.integers(4, size // 2, 2)
        images[i, t:t + 10, l:l + 8] = 220.0
        masks[i, t:t + 10, l:l + 8] = 255
    return images, masks


@pytest.mark.parametrize("resampler", ["native", "gather", "gather_xla"])
def test_mask_moves_with_its_image_and_stays_binary(resampler):
    images, masks = _blob_pair()
    layer = augment.RandomAffine(resampler=resampler, fill_mode="constant", seed=3)
    moved_images, moved_masks = layer.augment_with_mask(tf.constant(images), tf.constant(masks),
                                                        training=True)
    assert moved_masks.dtype == tf.uint8 and moved_images.dtype == tf.float32
    got = moved_masks.numpy()
    assert set(np.unique(got)) <= {0, 255}
    assert not np.array_equal(got, masks)  # it moved
    # Where the mask is, the image is bright; far from it, dark (bilinear edges aside).
    inside = moved_images.numpy()[got > 0]
    assert inside.size > 0 and np.median(inside) > 200
    outside = moved_images.numpy()[(got == 0) & (moved_images.numpy() > 120)]
    assert outside.size < 0.05 * got.size


def test_nearest_resamplers_agree_and_differ_from_bilinear():
    _, masks = _blob_pair(batch=3)
    m = augment.random_affine_matrices(3, 32, 32, seed=(5, 6))
    x = tf.cast(masks, tf.float32)
    native = augment.transform_native(x, m, "nearest", interpolation="nearest").numpy()
    gather = augment.transform_gather(x, m, "nearest", interpolation="nearest").numpy()
    assert np.mean(native != gather) < 0.002  # a few exact .5 ties may round apart
    assert set(np.unique(native)) <= {0.0, 255.0}
    bilinear = augment.transform_native(x, m, "nearest").numpy()
    assert len(np.unique(bilinear)) > 2
    with pytest.raises(ValueError, match="interpolation='cubic'; expected one of"):
        augment.transform_gather(x, m, interpolation="cubic")


def test_augment_with_mask_uses_the_images_geometry_and_no_intensity_on_the_mask():
    images, masks = _blob_pair(batch=2)
    kw = dict(seed=11, fill_mode="constant")
    plain = augment.RandomAffine(**kw)
    with_intensity = augment.RandomAugment(brightness=0.3, contrast=0.3, **kw)
    a_img, a_mask = plain.augment_with_mask(images, masks, training=True)
    b_img, b_mask = with_intensity.augment_with_mask(images, masks, training=True)
    np.testing.assert_array_equal(a_mask.numpy(), b_mask.numpy())  # one geometry per seed
    assert not np.allclose(a_img.numpy(), b_img.numpy())           # intensity on the image only
    # The same draw as call(): the image of augment_with_mask is the layer's own output.
    np.testing.assert_allclose(augment.RandomAffine(**kw)(images, training=True).numpy(),
                               a_img.numpy(), atol=1e-4)
    same_img, same_mask = plain.augment_with_mask(images, masks, training=False)
    assert same_img is images and same_mask is masks
