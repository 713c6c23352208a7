"""An ensemble run directory is accepted by every command: evaluate, gradcam, calibrate, export,
predict (the ensemble's probability is the mean of its members')."""

import json
import re

import cv2
import numpy as np
import pytest

from conftest import run_command, write_tiny_dataset

from pneumo_tf.core import rundir
from pneumo_tf.evaluation import scoring

pytestmark = pytest.mark.slow
SIZE = 32


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """Two tiny finished runs, their ensemble E (calibrated on val) and a second site."""
    from support_runs import make_run

    from pneumo_tf.evaluation import ensemble

    root = tmp_path_factory.mktemp("ensemble")
    data = write_tiny_dataset(root / "data", image_size=SIZE,
                              counts={"train": (16, 16), "val": (10, 10), "test": (12, 14)})
    members = []
    for seed in (0, 1):
        members.append(make_run(root / f"member{seed}", data, epochs=2, seed=seed))
    ens = root / "ensemble"
    ensemble.create_ensemble(members, ens)  # the members name their data dir
    site = write_tiny_dataset(root / "site", image_size=SIZE, counts={"test": (22, 24)}, seed=4,
                              brightness_offset=30)
    return root, data, members, ens, site


def _member_mean(members, data_dir, split):
    return np.mean([scoring.predict_split(rundir.load_model(m), data_dir, split)["probability"]
                    for m in members], axis=0)


def test_ensemble_is_a_calibrated_run_dir(ensemble_run):
    root, data, members, ens, _ = ensemble_run
    assert rundir.read_calibration(ens)["source"] == "val"
    assert rundir.run_data_dir(ens) == str(data) and rundir.is_run_data(ens, data)


def test_evaluate_an_ensemble_with_a_shift_report(ensemble_run):
    from pneumo_tf.evaluation import evaluator as evaluate

    root, data, members, ens, site = ensemble_run
    m = evaluate.evaluate_run(ens, data, "test", num_resamples=1000)
    assert m["n"] == 26 and "shift" not in m and m["calibration"] == "val"
    with open(ens / "eval" / "test" / "predictions.csv") as f:
        probs = np.array([float(line.split(",")[3]) for line in f.readlines()[1:]])
    np.testing.assert_allclose(probs, _member_mean(members, data, "test"), atol=1e-5)
    shifted = evaluate.evaluate_run(ens, site, "test", num_resamples=1000)
    assert shifted["shift"]["reference"]["data_dir"] == str(data)
    for name in ("NORMAL", "PNEUMONIA"):
        assert shifted["shift"]["image_statistics"][name]["mean_intensity"]["difference"] > 20


def test_gradcam_cli_on_an_ensemble_averages_the_members_maps(ensemble_run):
    root, data, members, ens, _ = ensemble_run
    done = run_command("pneumo_tf.gradcam", f"--run_dir={ens}", f"--data_dir={data}", "--split=test",
                      "--num_images=8", "--batch_size=4")
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((ens / "gradcam" / "cam_stats.json").read_text())
    assert stats["ensemble_members"] == 2 and stats["num_images"] == 8
    assert stats["calibration"] == "val" and stats["layer"] == "b1_out"
    by_path = dict(zip(scoring.predict_split(rundir.load_model(ens), data, "test")["path"],
                       _member_mean(members, data, "test")))
    for entry in stats["images"]:
        assert entry["probability"] == pytest.approx(by_path[entry["path"]], abs=1e-5)


def test_calibrate_cli_then_evaluate_and_gradcam_with_the_site_calibration(ensemble_run):
    from pneumo_tf.evaluation import evaluator as evaluate
    from pneumo_tf.explain import grids as gradcam

    root, data, members, ens, site = ensemble_run
    done = run_command("pneumo_tf.calibrate", f"--run_dir={ens}", f"--data_dir={site}",
                      "--split=test", "--name=site_c", "--num_resamples=1000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("site_c: n=46 ") and "5-fold by patient" in done.stdout
    cal = json.loads((ens / "calibrations" / "site_c.json").read_text())
    assert cal["class_counts"] == {"NORMAL": 22, "PNEUMONIA": 24}
    # A warning line of absl's ("W<month><day> <time> ...") names the small sample.
    assert re.search(r"^W\d{4} .*has 24 PNEUMONIA images \(fewer than 50\)", done.stderr,
                     re.M), done.stderr[-2000:]
    m = evaluate.evaluate_run(ens, site, "test", num_resamples=1000, calibration_name="site_c")
    assert m["calibration_in_sample"] and m["threshold"]["value"] == cal["threshold"]
    stats = gradcam.run_gradcam(ens, site, "test", num_images=6, batch_size=4,
                                calibration_name="site_c")
    assert stats["calibration"] == "site_c" and stats["threshold"] == cal["threshold"]


def test_export_and_predict_an_ensemble(ensemble_run, tmp_path):
    from pneumo_tf.serving import export
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.data import phantoms

    root, data, members, ens, _ = ensemble_run
    report = export.export_run(ens, ["saved_model", "tflite"], data_dir=data, parity_count=8)
    assert report["passed"] and report["variants"]["saved_model"]["max_abs_prob_diff"] < 1e-5
    files = []
    for i in range(3):
        path = tmp_path / f"film{i}.png"
        cv2.imwrite(str(path), phantoms.generate_phantom(np.random.default_rng(i), i % 2,
                                                         (300, 360))[0])
        files.append(path)
    images = np.stack([predict.read_input(str(f), SIZE, "fixed").image for f in files])[..., None]
    expected = np.mean([rundir.load_model(m)(images).numpy()[:, 0] for m in members], axis=0)
    for path, tol in ((ens, 1e-5), (ens / "export" / "saved_model", 1e-5),
                      (ens / "export" / "model_fp16.tflite", 0.01)):
        recs = list(predict.predict_paths(predict.load_predictor(path), files,
                                          gradcam_dir=tmp_path / "cam" if path == ens else None))
        np.testing.assert_allclose([r["probability"] for r in recs], expected, atol=tol)
        assert all(r["calibration"] == "val" for r in recs)
    assert len(list((tmp_path / "cam").glob("*.png"))) == 3
    done = run_command("pneumo_tf.predict", f"--model={ens}", str(files[0]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["probability"] == pytest.approx(expected[0], abs=1e-5)
