"""Grad-CAM maths: the batched CAM equals a per-image reference, nested backbones, mixed
precision, attention statistics."""

import numpy as np
import pytest

from pneumo_tf.explain import cam as pcam
from pneumo_tf.modeling import model as pmodel


def _loop_cam(model, image, layer, target_of):
    """The paper's recipe, one image at a time, loop over channels, numpy maths.

    ``target_of(h)``: the head's hidden features of the image -> ``(explained scalar,
    probability of PNEUMONIA)``.
    """
    import keras
    import tensorflow as tf

    backbone = pmodel.get_backbone(model)
    inner = keras.Model(backbone.inputs, [backbone.get_layer(layer).output, backbone.output])
    head = [model.get_layer(n) for n in ("gap", "dropout_1", "dense", "dropout_2")]
    x = tf.convert_to_tensor(image[np.newaxis])
    with tf.GradientTape() as tape:
        h = model.get_layer("pixel_norm")(model.get_layer("to_float_rgb")(x))
        feats, h = inner(h, training=False)
        for lyr in head:
            h = lyr(h, training=False)
        target, probability = target_of(h)
    grads = tape.gradient(target, feats)[0].numpy()
    feats = feats[0].numpy()
    weights = grads.mean(axis=(0, 1))
    cam = np.zeros(feats.shape[:2], np.float32)
    for c, w in enumerate(weights):
        cam += w * feats[:, :, c]
    cam = np.maximum(cam, 0)
    return cam / cam.max() if cam.max() > 0 else cam, probability


def _reference_cam(model, image, layer, sign=1.0):
    """A binary model's CAM of ``sign`` times its logit."""
    import tensorflow as tf

    score = model.get_layer("score")

    def target_of(h):
        logit = tf.matmul(h, score.kernel) + score.bias
        return sign * logit[0, 0], float(tf.sigmoid(logit)[0, 0])

    return _loop_cam(model, image, layer, target_of)


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(0)
    return pmodel.build_model("small_cnn", 48, None)


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8)


def test_batched_equals_per_image_reference(small_model):
    images = _images(6, 48)
    cam_model = pcam.CamModel(small_model, backbone_name="small_cnn")
    # The registry's layer (the most lung-bound one measured), 1/8 of the input; without a
    # backbone name, the backbone's last feature map.
    assert cam_model.layer == pmodel.BACKBONES["small_cnn"].cam_layer == "b1_out"
    assert pcam.CamModel(small_model).layer == "features"
    out = pcam.gradcam_batch(cam_model, images)
    assert out["cam"].shape == (6, 48, 48) and out["cam"].dtype == np.float32
    assert out["cam_lowres"].shape == (6, 6, 6)
    assert 0.0 <= out["cam"].min() and out["cam"].max() <= 1.0
    np.testing.assert_allclose(out["probability"], small_model(images).numpy()[:, 0], rtol=1e-5)
    for i in range(6):
        ref, prob = _reference_cam(small_model, images[i], "b1_out")
        np.testing.assert_allclose(out["cam_lowres"][i], ref, atol=2e-4)
        assert out["probability"][i] == pytest.approx(prob, rel=1e-5)


def test_predicted_class_explains_normal_with_minus_logit(small_model):
    images = _images(4, 48, seed=1)
    cam_model = pcam.CamModel(small_model, layer="b1_out")
    probs = small_model(images).numpy()[:, 0]
    threshold = float(np.median(probs))  # two images on each side
    out = pcam.gradcam_batch(cam_model, images, cam_class="predicted", threshold=threshold)
    for i in range(4):
        sign = 1.0 if probs[i] >= threshold else -1.0
        ref, _ = _reference_cam(small_model, images[i], "b1_out", sign)
        np.testing.assert_allclose(out["cam_lowres"][i], ref, atol=2e-4)


def test_bad_layer_is_named(small_model):
    with pytest.raises(ValueError, match="--layer=conv5_block3_out: no such layer.*features"):
        pcam.CamModel(small_model, layer="conv5_block3_out")


@pytest.mark.slow
def test_nested_resnet50_default_layer():
    model = pmodel.build_model("resnet50", 32, None)
    cam_model = pcam.CamModel(model, backbone_name="resnet50")
    assert cam_model.layer == "conv5_block3_out"
    out = pcam.gradcam_batch(cam_model, _images(2, 32))
    assert out["cam"].shape == (2, 32, 32) and out["cam_lowres"].shape == (2, 1, 1)
    # Auto-detection without the registry name: the backbone's last 4-D output.
    assert pcam.default_cam_layer(model) == "conv5_block3_out"


def test_mixed_precision_forward_float32_cam(small_model):
    import keras

    images = _images(4, 48, seed=2)
    ref = pcam.gradcam_batch(pcam.CamModel(small_model), images)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = pmodel.build_model("small_cnn", 48, None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(small_model.get_weights())
    assert pmodel.get_backbone(mixed).get_layer("features").compute_dtype == "bfloat16"
    out = pcam.gradcam_batch(pcam.CamModel(mixed), images)
    assert out["cam"].dtype == np.float32 and np.isfinite(out["cam"]).all()
    for i in range(4):
        corr = np.corrcoef(out["cam"][i].ravel(), ref["cam"][i].ravel())[0, 1]
        assert corr > 0.9, (i, corr)


def test_select_balanced_and_stats_helpers():
    groups = ["TP"] * 10 + ["FP"] * 1 + ["FN"] * 2 + ["TN"] * 10
    idx = pcam.select_balanced(groups, 8, seed=0)
    picked = [groups[i] for i in idx]
    assert picked.count("FP") == 1 and picked.count("FN") == 2
    assert picked.count("TP") + picked.count("TN") == 5
    assert list(idx) == sorted(idx)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0], cam[3, 3] = 1.0, 3.0
    lung = np.zeros((4, 4), bool)
    lung[2:, 2:] = True
    assert pcam.lung_mass_share(cam, lung) == pytest.approx(0.75)
    assert pcam.pointing_hit(cam, lung) and not pcam.pointing_hit(cam, ~lung)
    assert np.isnan(pcam.lung_mass_share(np.zeros((4, 4)), lung))
    overlay = pcam.overlay_cam(np.full((4, 4), 100, np.uint8), cam / 3.0)
    assert overlay.shape == (4, 4, 3) and overlay.dtype == np.uint8
    # no masks -> the adaptive lung box of the stored image itself
    reg = pcam.image_regions(np.full((32, 32), 90, np.uint8), "x/y.png", (0, 32, 0, 32), None)
    assert reg["source"] == "adaptive_box" and reg["lesion"] is None and reg["lung"].any()


def test_pointing_game_counts_empty_maps_as_misses():
    lesion = np.zeros((4, 4), bool)
    lesion[0, 0] = True  # where np.argmax of an all-zero map would point
    hit = np.zeros((4, 4), np.float32)
    hit[0, 0] = 1.0
    empty = np.zeros((4, 4), np.float32)
    assert not pcam.pointing_hit(empty, lesion)
    assert pcam.pointing_entry(empty, lesion) == {"pointing_hit": False, "lesion_fraction": 1 / 16,
                                                "cam_empty": True}
    assert pcam.pointing_entry(hit, lesion)["pointing_hit"]
    assert pcam.pointing_entry(hit, None) == {}
    assert pcam.pointing_entry(hit, np.zeros_like(lesion)) == {}
    # Two hits and two empty maps: 2/4, not 2/2.
    entries = [{"group": "TP", "lung_mask_share": 0.5, **pcam.pointing_entry(hit, lesion)}] * 2
    miss = {"group": "FN", "lung_mask_share": float("nan"), **pcam.pointing_entry(empty, lesion)}
    entries += [miss] * 2
    stats = pcam.summarise_attention(entries)
    assert stats["all"]["pointing_n"] == 4 and stats["all"]["pointing_hit_rate"] == 0.5
    assert stats["all"]["pointing_empty"] == 2 and stats["all"]["empty_cams"] == 2
    assert stats["FN"]["pointing_hit_rate"] == 0.0 and stats["FN"]["pointing_empty"] == 2
    assert stats["TP"]["pointing_empty"] == 0


# ---------------------------------------------------------------------------------------------
# Ensembles: the mean of the members' maps


@pytest.fixture(scope="module")
def ensemble_model():
    import keras

    from pneumo_tf.modeling import ensemble_model

    members = []
    for seed in (3, 4):
        keras.utils.set_random_seed(seed)
        members.append(pmodel.build_model("small_cnn", 48, None))
    return ensemble_model.build_ensemble_model(members), members


def test_ensemble_cam_is_the_mean_of_the_members_maps(ensemble_model, small_model):
    model, members = ensemble_model
    assert isinstance(pcam.cam_model_for(small_model), pcam.CamModel)
    cam_model = pcam.cam_model_for(model, backbone_name="small_cnn")
    assert isinstance(cam_model, pcam.EnsembleCamModel) and len(cam_model.members) == 2
    assert cam_model.layer == "b1_out"
    images = _images(5, 48, seed=5)
    out = pcam.gradcam_batch(cam_model, images)
    # Probabilities: the ensemble model's (the mean of the members').
    np.testing.assert_allclose(out["probability"], model(images).numpy()[:, 0], rtol=1e-5)
    per_member = [pcam.gradcam_batch(pcam.CamModel(m), images) for m in members]
    np.testing.assert_allclose(out["cam"], np.mean([o["cam"] for o in per_member], axis=0),
                               atol=1e-5)
    for i in range(5):
        refs = [_reference_cam(m, images[i], "b1_out")[0] for m in members]
        np.testing.assert_allclose(out["cam_lowres"][i], np.mean(refs, axis=0), atol=2e-4)
    assert 0.0 <= out["cam"].min() and out["cam"].max() <= 1.0


def test_ensemble_members_explain_the_class_the_ensemble_predicts(ensemble_model):
    model, members = ensemble_model
    images = _images(6, 48, seed=6)
    probs = model(images).numpy()[:, 0]
    threshold = float(np.median(probs))  # three images on each side
    out = pcam.gradcam_batch(pcam.cam_model_for(model), images, cam_class="predicted",
                             threshold=threshold)
    for i in range(6):
        sign = 1.0 if probs[i] >= threshold else -1.0  # the ensemble's decision, not a member's
        refs = [_reference_cam(m, images[i], "features", sign)[0] for m in members]
        np.testing.assert_allclose(out["cam_lowres"][i], np.mean(refs, axis=0), atol=2e-4)


def _subtype_reference(model, image, layer, target):
    """A subtype model's CAM of one image, the log-odds written out per class."""
    import tensorflow as tf

    dense = model.get_layer("class_logits")
    others = {"pneumonia": [0], "bacterial": [0, 2], "viral": [0, 1]}[target]
    mine = {"pneumonia": [1, 2], "bacterial": [1], "viral": [2]}[target]

    def target_of(h):
        z = (tf.matmul(h, dense.kernel) + dense.bias)[0]
        odds = (tf.reduce_logsumexp(tf.gather(z, mine))
                - tf.reduce_logsumexp(tf.gather(z, others)))
        return odds, 1.0 - float(tf.nn.softmax(z)[0])

    return _loop_cam(model, image, layer, target_of)


def test_subtype_model_explains_pneumonia_bacterial_and_viral_log_odds():
    import keras

    keras.utils.set_random_seed(1)
    model = pmodel.build_model("small_cnn", 48, None, task="subtype")
    # Spread the class logits so the three targets differ visibly.
    kernel, bias = model.get_layer("class_logits").get_weights()
    model.get_layer("class_logits").set_weights([kernel * 20, bias])
    images = _images(4, 48, seed=3)
    cam_model = pcam.CamModel(model, backbone_name="small_cnn")
    assert cam_model.subtype
    maps = {}
    for target in ("pneumonia", "bacterial", "viral"):
        out = pcam.gradcam_batch(cam_model, images, target)
        np.testing.assert_allclose(out["probability"], model(images).numpy()[:, 0], rtol=1e-5)
        for i in range(4):
            ref, p = _subtype_reference(model, images[i], cam_model.layer, target)
            np.testing.assert_allclose(out["cam_lowres"][i], ref, atol=1e-4)
            assert out["probability"][i] == pytest.approx(p, rel=1e-5)
        maps[target] = out["cam_lowres"]
    assert not np.allclose(maps["bacterial"], maps["viral"])


def test_bacterial_and_viral_need_a_subtype_model(small_model):
    with pytest.raises(ValueError, match="--cam_class=viral needs a three-class model"):
        pcam.gradcam_batch(pcam.CamModel(small_model), _images(1, 48), "viral")


# ---------------------------------------------------------------------------------------------
# Evidence against lung masks


def _lungs(n=4, size=10):
    """``[n, size, size]`` bool: two 6-row lung blocks per image, the left one 2 or 3 columns
    wide (so the lung fraction varies between images)."""
    lungs = np.zeros((n, size, size), bool)
    for i in range(n):
        lungs[i, 2:8, 1:3 + i % 2] = True
        lungs[i, 2:8, 6:8] = True
    return lungs


def test_flat_cam_gives_lift_exactly_one():
    lungs = _lungs()
    cams = np.ones(lungs.shape, np.float32)
    r = pcam.lung_evidence(cams, lungs, [1, 1, 0, 0], [1, 0, 1, 0])
    for g in ("TP", "FN", "FP", "TN", "all"):
        assert r["groups"][g]["lift"] == 1.0
        assert r["groups"][g]["lung_share"] == r["groups"][g]["lung_fraction"]
    assert r["groups"]["all"]["n"] == 4 and r["skipped_no_mask"] == 0
    # A flat map peaks at the first pixel (argmax of ties), which is outside these lungs.
    assert r["groups"]["all"]["pointing_lungs"] == 0.0


def test_cam_inside_the_lungs_gives_lift_one_over_the_lung_fraction():
    lungs = _lungs()
    cams = lungs.astype(np.float32) * np.linspace(0.2, 1.0, 100).reshape(10, 10)
    r = pcam.lung_evidence(cams, lungs, [1, 1, 1, 1], [1, 1, 1, 1])
    fractions = lungs.reshape(4, -1).mean(axis=1)
    assert r["groups"]["TP"]["lung_share"] == 1.0
    assert r["groups"]["TP"]["lift"] == pytest.approx(1.0 / fractions.mean())
    assert r["groups"]["TP"]["pointing_lungs"] == 1.0
    assert r["groups"]["FP"] == {"n": 0, "empty_cams": 0}
    entry = r["per_image"][0]
    assert entry == {"lung_share": 1.0, "lung_fraction": pytest.approx(fractions[0]),
                     "pointing_lungs": True, "cam_empty": False, "group": "TP"}


def test_peak_outside_the_lungs_and_skipped_images():
    lungs = _lungs(3)
    cams = np.full(lungs.shape, 0.1, np.float32)
    cams[:, 0, 9] = 1.0                     # the peak: a corner outside the lungs
    lungs[2] = False                        # no mask drawn on image 2
    r = pcam.lung_evidence(cams, lungs, [0, 0, 1], [0, 0, 1], has_mask=[True, False, True])
    assert r["skipped_no_mask"] == 2 and r["per_image"][1] is None and r["per_image"][2] is None
    stats = r["groups"]["all"]
    assert stats["n"] == 1 and stats["pointing_lungs"] == 0.0
    share = 0.1 * lungs[0].sum() / (0.1 * 99 + 1.0)
    assert stats["lung_share"] == pytest.approx(share)
    assert stats["lift"] == pytest.approx(share / lungs[0].mean())
    empty = pcam.lung_evidence(np.zeros((1, 10, 10)), _lungs(1), [1], [0])
    assert empty["groups"]["FN"] == {"n": 1, "empty_cams": 1, "pointing_lungs": 0.0}
    with pytest.raises(ValueError, match="must both be"):
        pcam.lung_evidence(cams, lungs[:, :5], [0] * 3, [0] * 3)


def test_lung_outline_is_drawn_on_the_mask_border_only():
    tile = np.full((20, 20, 3), 50, np.uint8)
    lung = np.zeros((20, 20), bool)
    lung[5:15, 4:12] = True
    out = pcam.draw_lung_outline(tile, lung, color=(0, 255, 0))
    drawn = np.all(out == (0, 255, 0), axis=-1)
    border = lung & ~np.pad(lung[1:-1, 1:-1] & lung[:-2, 1:-1] & lung[2:, 1:-1]
                            & lung[1:-1, :-2] & lung[1:-1, 2:], 1)
    np.testing.assert_array_equal(drawn, border)
    assert (tile == 50).all()  # a copy: the input is untouched
    np.testing.assert_array_equal(pcam.draw_lung_outline(tile, np.zeros((20, 20), bool)), tile)
    with pytest.raises(ValueError, match="does not match the tile"):
        pcam.draw_lung_outline(tile, lung[:10])
