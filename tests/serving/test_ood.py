"""Tests of pneumo_tf.ood: the Mahalanobis score, its fit on a run, the film checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_command, write_tiny_dataset
from pneumo_tf.serving import ood


def test_mahalanobis_scores_are_distances_to_the_nearer_class():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (400, 3))
    b = rng.normal(0, 1, (400, 3)) + [6, 0, 0]
    means, precision = ood.fit_gaussians(np.vstack([a, b]), np.r_[np.zeros(400), np.ones(400)])
    np.testing.assert_allclose(means, [[0, 0, 0], [6, 0, 0]], atol=0.2)
    # Unit covariance: the squared distance of a point 3 sd away is about 9.
    scores = ood.mahalanobis_scores(np.array([[0, 3, 0], [6, 0, -3], [3, 0, 0], [0, 0, 0]]),
                                     means, precision)
    np.testing.assert_allclose(scores[:2], 9.0, rtol=0.15)
    assert scores[2] == pytest.approx(9.0, rel=0.15) and scores[3] < 0.2
    far = ood.mahalanobis_scores(np.array([[30.0, 30, 30]]), means, precision)
    assert far[0] > 1000


def test_threshold_flags_the_asked_fraction():
    scores = np.arange(1000, dtype=float)
    t = ood.threshold_at_rate(scores, 0.01)
    assert np.mean(scores > t) == pytest.approx(0.01, abs=0.002)
    with pytest.raises(ValueError, match="--ood_val_rate=1.5"):
        ood.threshold_at_rate(scores, 1.5)


def _film(h=600, w=700, seed=0):
    """A schematic frontal film: dark lungs either side of a bright spine, bright body edges."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 170.0)
    ys, xs = np.mgrid[0:h, 0:w]
    for cx in (0.3 * w, 0.7 * w):
        img[((xs - cx) / (0.16 * w)) ** 2 + ((ys - 0.45 * h) / (0.3 * h)) ** 2 < 1] = 60
    img[:, int(0.46 * w):int(0.54 * w)] = 200
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def test_film_checks_catch_inverted_and_sideways_films_only():
    film = _film()
    assert ood.film_orientation_reasons(film) == []
    assert ood.film_orientation_reasons(255 - film) == ["inverted"]
    assert ood.film_orientation_reasons(np.rot90(film).copy()) == ["on_its_side"]
    assert ood.film_orientation_reasons(film[::-1].copy()) == []  # the features' job


@pytest.mark.slow
def test_fit_run_writes_statistics_and_the_app_refits(tmp_path):
    from support_runs import make_run

    data = write_tiny_dataset(tmp_path / "data", counts={"train": (30, 30), "val": (20, 20),
                                                         "test": (6, 6)})
    run = make_run(tmp_path / "run", data, epochs=2)
    info = ood.fit_run(run, data, val_rate=0.05)
    assert (run / ood.OOD_JSON).is_file() and (run / ood.OOD_STATS).is_file()
    # auto: small_cnn's pooled features (256 wide) are narrow enough to read.
    assert info["layer"] == "gap" and info["feature_dim"] == 256
    assert info["fitted_on"]["train"] == 60 and info["fitted_on"]["val"] == 40
    assert info["val_flagged"] <= 0.05 + 1e-9
    assert len(info["upright"]["weights"]) == ood.THUMB ** 2
    assert info["upright"]["val_flagged"] <= 0.05 + 1e-9
    stats = ood.load_stats(run)
    assert stats.threshold == pytest.approx(info["threshold"])
    assert ood.load_stats(tmp_path) is None  # a run without ood.json
    proc = run_command("pneumo_tf.ood", f"--run_dir={run}", f"--data_dir={data}",
                      "--ood_val_rate=0.1", "--ood_layer=dense")
    assert proc.returncode == 0, proc.stderr[-2000:]
    refit = json.loads((run / ood.OOD_JSON).read_text())
    assert refit["val_rate"] == 0.1 and refit["layer"] == "dense" and refit["feature_dim"] == 128
    assert ood.load_stats(run).precision.shape == (128, 128)
    bad = run_command("pneumo_tf.ood", f"--run_dir={tmp_path}/nope")
    assert bad.returncode == 1 and "pneumo_tf.ood: error:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_in_graph_score_matches_the_host_score():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    feats = rng.normal(0, 1, (300, 16))
    labels = np.r_[np.zeros(150), np.ones(150)]
    feats[labels == 1] += 2.0
    means, precision = ood.fit_gaussians(feats, labels)
    probe = np.vstack([feats[:20], rng.normal(0, 5, (10, 16))]).astype(np.float32)
    host = ood.mahalanobis_scores(probe, means, precision)
    graph = tf.function(lambda x: ood.tf_mahalanobis_scores(x, means, precision))(probe).numpy()
    assert graph.dtype == np.float32
    np.testing.assert_allclose(graph, host, rtol=1e-4)


def test_in_graph_film_checks_match_the_host_checks():
    import tensorflow as tf

    from pneumo_tf.data import phantoms

    check = tf.function(ood.tf_film_orientation_flags,
                        input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
    rng = np.random.default_rng(2)
    films = [_film(), phantoms.generate_phantom(rng, 1, (420, 520))[0]]
    for film in films:
        for image in (film, 255 - film, np.rot90(film), film[::-1]):
            image = np.ascontiguousarray(image)
            inverted, on_its_side = (bool(v) for v in check(image[..., None]))
            got = ["inverted"] * inverted + ["on_its_side"] * on_its_side
            assert got == ood.film_orientation_reasons(image)


def _phantom_inputs(n: int, seed: int, size: int = 64) -> np.ndarray:
    """``[n, size, size]`` uint8 phantom films resized like model inputs, both classes."""
    import cv2

    from pneumo_tf.data import phantoms

    rng = np.random.default_rng(seed)
    return np.stack([cv2.resize(phantoms.generate_phantom(rng, i % 2, (96, 96))[0], (size, size),
                                interpolation=cv2.INTER_AREA) for i in range(n)])


def test_upright_probe_flags_upside_down_films_and_passes_upright_ones():
    train, val, test = (_phantom_inputs(n, seed) for n, seed in ((120, 3), (60, 4), (40, 5)))
    upright = ood.fit_upright_probe(ood.thumbnails(train), ood.thumbnails(val), val_rate=0.05)
    assert len(upright["weights"]) == ood.THUMB ** 2
    assert upright["threshold"] <= 0.0 and upright["val_flagged"] <= 0.05 + 1e-9
    assert upright["val_upside_down_caught"] >= 0.9
    assert np.mean(ood.upside_down(upright, test)) <= 0.1
    assert np.mean(ood.upside_down(upright, test[:, ::-1])) >= 0.9      # flipped vertically
    assert np.mean(ood.upside_down(upright, test[:, ::-1, ::-1])) >= 0.9  # rotated 180 degrees
    assert np.mean(ood.upside_down(upright, test[:, :, ::-1])) <= 0.1    # mirrored: still upright
    flipped = np.ascontiguousarray(test[0, ::-1])
    assert ood.upright_reasons({"upright": upright}, flipped) == [ood.UPSIDE_DOWN]
    assert ood.upright_reasons({"threshold": 1.0}, flipped) == []  # a guard fitted before it
    assert ood.upright_reasons(None, flipped) == []


def test_in_graph_upright_probe_matches_the_host_probe():
    import tensorflow as tf

    images = _phantom_inputs(40, 6)
    upright = ood.fit_upright_probe(ood.thumbnails(images[:30]), ood.thumbnails(images[30:]),
                                    val_rate=0.05)
    batch = np.concatenate([images, images[:, ::-1]])[..., None]
    graph = tf.function(lambda x: ood.tf_upside_down(x, upright))(batch).numpy()
    np.testing.assert_array_equal(graph, ood.upside_down(upright, batch))
    assert graph[40:].mean() >= 0.9 and graph[:40].mean() <= 0.1


def test_auto_layer_reads_narrow_pooled_features_and_the_head_otherwise():
    import keras

    from pneumo_tf.modeling import model as model_lib

    small = model_lib.build_model("small_cnn", 32, weights=None)
    assert ood.resolve_layer(small) == "gap" and ood.resolve_layer(small, "dense") == "dense"
    assert ood.feature_model(small).output.shape[-1] == 256
    inputs = keras.Input((8,))
    wide = keras.layers.Dense(2048, name="gap")(inputs)
    wide = keras.layers.Dense(128, name="dense")(wide)
    wide = keras.Model(inputs, keras.layers.Dense(1, name="out")(wide))
    assert ood.resolve_layer(wide) == "dense"
    headless = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))
    assert ood.resolve_layer(headless) == ood.LEGACY_LAYER


@pytest.mark.slow
def test_bench_ood_runs_end_to_end_on_phantoms(phantom_ood_run, tmp_path):
    run, _, src = phantom_ood_run
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_ood"), f"--run_dir={run}",
                           f"--films={src / 'train'}", f"--external={src / 'test'}",
                           "--per_kind=3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["ood"]["layer"] == "gap" and result["per_kind"] == 3
    for kind in ("photo", "noise", "text", "blank", "inverted", "rotated_90", "film_unchanged"):
        entry = result["kinds"][kind]
        assert entry["n"] == 3 and set(entry) == {"n", "flagged", "flagged_by_features",
                                                  "flagged_by_image_checks"}, kind
    assert result["kinds"]["inverted"]["flagged"] == 1.0
    assert (tmp_path / "out" / "bench").is_dir()
    bare = subprocess.run([sys.executable, str(REPO / "tools" / "bench_ood"),
                           f"--run_dir={tmp_path}", "--per_kind=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "Traceback" not in bare.stderr
