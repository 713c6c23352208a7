"""serving/lung_export.py: a lungs run exported (SavedModel taking bytes or squashed films,
TFLite float16/int8 with a lung_mask output) and its parity with the Keras lung model."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from conftest import run_command

LUNG_OUTPUTS = {"lung_mask": (np.float32, (3, 32, 32)), "lung_fraction": (np.float32, (3,)),
                "lung_confidence": (np.float32, (3,)), "lungs_found": (np.bool_, (3,))}


@pytest.fixture(scope="module")
def lung_export(lung_run, tmp_path_factory):
    from pneumo_tf.serving import lung_export as lung_export_lib

    copy = tmp_path_factory.mktemp("lung_export") / "run"
    shutil.copytree(lung_run[0], copy)
    return copy, lung_export_lib.export_lung_run(copy, parity_count=8)


def _films(n=3):
    from pneumo_tf.data import phantoms

    return [phantoms.generate_phantom(np.random.default_rng(10 + i), i % 2, (140 + 7 * i, 170))[0]
            for i in range(n)]


def test_the_export_writes_every_variant_and_its_parity(lung_export):
    run, report = lung_export
    out = run / "export"
    for name in ("saved_model/saved_model.pb", "model_fp16.tflite", "model_int8.tflite",
                 "parity.json", "pneumo_tf_serving.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "pneumo_tf_serving.json").read_text())
    assert config["task"] == "lungs" and config["image_size"] == 32 and config["crop"] == "none"
    assert config["lungs"]["confidence_source"] == "lung_guard.json"
    assert report == json.loads((out / "parity.json").read_text()) and report["passed"]
    sm, fp16, int8 = (report["variants"][k] for k in ("saved_model", "fp16", "int8"))
    assert sm["dice"] == 1.0 and sm["max_abs_prob_diff"] < 1e-5
    assert sm["max_abs_fraction_diff"] == 0.0 and sm["lungs_found_agreement"] == 1.0
    assert fp16["dice"] >= 0.99 and fp16["max_abs_prob_diff"] < 0.02
    assert int8["dice"] > 0.9 and int8["bytes"] < fp16["bytes"]


def test_the_saved_model_takes_bytes_or_squashed_films(lung_export, lung_run):
    import tensorflow as tf

    from pneumo_tf.image import preprocess
    from pneumo_tf.modeling import lungs as lungs_lib

    run, _ = lung_export
    loaded = tf.saved_model.load(str(run / "export" / "saved_model"))
    assert set(loaded.signatures) == {"serving_default", "preprocessed", "preprocessed_float"}
    films = _films()
    lungs = lungs_lib.LungModel(lung_run[0])
    thumbs = lungs.model_inputs(films)
    png = [cv2.imencode(".png", f)[1].tobytes() for f in films]
    for name, kwargs in (("serving_default", {"images": tf.constant(png)}),
                         ("preprocessed", {"image": tf.constant(thumbs)}),
                         ("preprocessed_float", {"image": tf.constant(thumbs.astype(np.float32))})):
        out = {k: v.numpy() for k, v in loaded.signatures[name](**kwargs).items()}
        assert {k: (v.dtype, v.shape) for k, v in out.items()} == LUNG_OUTPUTS, name
        reference = lungs.grid_probabilities(thumbs)
        # bytes: TF's area resize is within a grey level of OpenCV's, so the maps nearly agree
        tolerance = 1e-5 if name != "serving_default" else 0.05
        assert np.abs(out["lung_mask"] - reference).max() < tolerance, name
        fractions = [preprocess.find_lungs(m).fraction for m in reference]
        np.testing.assert_allclose(out["lung_fraction"], fractions, atol=0.01)


def test_the_tflite_models_give_the_lung_mask(lung_export, lung_run):
    from pneumo_tf.modeling import lungs as lungs_lib
    from pneumo_tf.serving import lungs as lung_serving

    run, _ = lung_export
    lungs = lungs_lib.LungModel(lung_run[0])
    thumbs = lungs.model_inputs(_films())
    for name in ("model_fp16.tflite", "model_int8.tflite"):
        out = lung_serving.TFLiteLungRunner(run / "export" / name).outputs(thumbs)
        assert {k: (v.dtype, v.shape) for k, v in out.items()} == LUNG_OUTPUTS, name
    one = lung_serving.TFLiteLungRunner(run / "export" / "model_fp16.tflite").outputs(thumbs[:1])
    assert one["lung_mask"].shape == (1, 32, 32)


@pytest.mark.slow
def test_the_export_command_exports_a_lungs_run(lung_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lung_run[0], run)
    done = run_command("pneumo_tf.export", f"--run_dir={run}", "--formats=tflite",
                      "--parity_count=4", "--min_lung_fraction=0.2")
    assert done.returncode == 0, done.stderr[-2000:]
    # A short summary (one line per model); the full report is parity.json.
    printed = done.stdout.strip().splitlines()
    assert printed[0] == f"exported the lung model -> {run / 'export'}"
    assert len(printed) == 4 and all("Dice vs Keras" in line for line in printed[1:3])
    assert printed[-1].endswith(str(run / "export" / "parity.json"))
    report = json.loads((run / "export" / "parity.json").read_text())
    assert report["task"] == "lungs" and set(report["variants"]) == {"fp16", "int8"}
    assert report["lungs"]["min_lung_fraction"] == 0.2
    for args, message in (([f"--lung_model={run}"], "is a lung model itself"),
                          (["--calibration=site_b"], "a lungs run has no calibrations")):
        bad = run_command("pneumo_tf.export", f"--run_dir={run}", "--formats=tflite", *args)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
        last = bad.stderr.strip().splitlines()[-1]
        assert last.startswith("pneumo_tf.export: error: ") and message in last, last
