"""Site calibration: sample-size rules, patient-grouped folds, the cross-validated figures, the file."""

import json

import numpy as np
import pytest

from conftest import run_command, write_tiny_dataset

from pneumo_tf.evaluation import site_calibration as calibrate
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import metrics as pm
from pneumo_tf.core import rundir


def _sample(rng, n_patients=40, max_images=4, separation=0.35):
    """Synthetic site predictions: patients with 1-4 images of one class each."""
    labels, patients, probs = [], [], []
    for p in range(n_patients):
        label = p % 2
        for _ in range(rng.integers(1, max_images + 1)):
            labels.append(label)
            patients.append(f"patient{p:03d}")
            probs.append(np.clip(rng.normal(0.5 + separation * (label - 0.5), 0.18), 0.01, 0.99))
    return {"label": np.array(labels), "patient_id": np.array(patients, dtype=object),
            "probability": np.array(probs)}


# ---------------------------------------------------------------------------------------------
# Sample size


def test_fewer_than_20_images_of_a_class_are_refused_naming_the_class():
    with pytest.raises(calibrate.SampleTooSmallError,
                       match=r"only 12 NORMAL images; .*at least 20 images of each class"):
        calibrate.check_sample_size({"NORMAL": 12, "PNEUMONIA": 80}, "the sample")
    with pytest.raises(calibrate.SampleTooSmallError, match=r"only 3 NORMAL and 19 PNEUMONIA"):
        calibrate.check_sample_size({"NORMAL": 3, "PNEUMONIA": 19}, "the sample")
    warnings = calibrate.check_sample_size({"NORMAL": 20, "PNEUMONIA": 49}, "the sample")
    assert len(warnings) == 2 and "20 NORMAL" in warnings[0] and "49 PNEUMONIA" in warnings[1]
    assert calibrate.check_sample_size({"NORMAL": 50, "PNEUMONIA": 50}, "the sample") == []


def test_folds_shrink_with_few_patients_and_need_two_per_class():
    labels = np.array([0] * 6 + [1] * 6)
    assert calibrate.num_folds_for(labels, np.arange(12)) == 5
    patients = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "d", "e", "e", "e"])
    assert calibrate.num_folds_for(labels, patients) == 2  # 3 NORMAL, 2 PNEUMONIA patients
    with pytest.raises(calibrate.SampleTooSmallError, match="at least 2 patients of each class"):
        calibrate.num_folds_for(labels, np.array(["a"] * 6 + list("bcdefg")))


# ---------------------------------------------------------------------------------------------
# Folds and cross-validation


def test_patient_folds_keep_every_patient_in_one_fold_and_are_stratified():
    pred = _sample(np.random.default_rng(0), n_patients=60)
    folds = calibrate.patient_folds(pred["label"], pred["patient_id"], 5, seed=3)
    assert set(folds.tolist()) == set(range(5))
    for patient in np.unique(pred["patient_id"]):
        assert np.unique(folds[pred["patient_id"] == patient]).size == 1, patient
    prevalence = pred["label"].mean()
    for fold in range(5):
        assert abs(pred["label"][folds == fold].mean() - prevalence) < 0.2
    np.testing.assert_array_equal(
        folds, calibrate.patient_folds(pred["label"], pred["patient_id"], 5, seed=3))


def test_cross_validation_holds_out_patients_and_pools_held_out_decisions():
    pred = _sample(np.random.default_rng(1), n_patients=80)
    cv = calibrate.cross_validate(pred, "val_youden", 5, seed=0, num_resamples=1000)
    labels, probs, patients = pred["label"], pred["probability"], pred["patient_id"]
    assert cv["folds"] == 5 and len(cv["per_fold"]) == 5 and cv["grouping"] == "patient_id"
    held_pred, held_cal = np.zeros(labels.size), np.zeros(labels.size)
    seen = set()
    for fold in cv["per_fold"]:
        held = np.isin(patients, fold["patients"])
        assert held.sum() == fold["n"] and not seen & set(fold["patients"])
        seen |= set(fold["patients"])
        # The fold's temperature and threshold come from the other folds' patients only.
        train = ~held
        assert not set(patients[train]) & set(fold["patients"])
        fit = calibration.calibrate_predictions(labels[train], probs[train], "val_youden")
        assert fold["threshold"] == pytest.approx(fit["threshold"])
        assert fold["temperature"] == pytest.approx(fit["temperature"])
        held_pred[held] = probs[held] >= fold["threshold"]
        held_cal[held] = calibration.apply_temperature(probs[held], fold["temperature"])
    assert seen == set(patients)
    pooled = cv["pooled"]
    assert pooled["n"] == labels.size
    assert pooled["accuracy"] == pytest.approx(np.mean(held_pred == labels))
    assert pooled["sensitivity"] == pytest.approx(np.mean(held_pred[labels == 1] == 1))
    assert pooled["specificity"] == pytest.approx(np.mean(held_pred[labels == 0] == 0))
    assert pooled["roc_auc"] == pytest.approx(pm.ranking_metrics(labels, probs)["roc_auc"])
    assert pooled["ece"] == pytest.approx(pm.expected_calibration_error(labels, held_cal))
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece"):
        lo, hi = cv["ci95"][key]
        assert lo <= pooled[key] <= hi, key
    # Cross-validated accuracy is not the in-sample one (that one is fitted on the same images).
    full = calibration.calibrate_predictions(labels, probs, "val_youden")
    in_sample = np.mean((probs >= full["threshold"]) == labels)
    assert in_sample >= pooled["accuracy"]


# ---------------------------------------------------------------------------------------------
# On a tiny trained run


@pytest.fixture(scope="module")
def run_and_site(tmp_path_factory):
    from support_runs import make_run

    root = tmp_path_factory.mktemp("calibrate")
    data = write_tiny_dataset(root / "data", image_size=32,
                              counts={"train": (16, 16), "val": (10, 10), "test": (6, 6)})
    run = make_run(root / "run", data, epochs=3)
    site = write_tiny_dataset(root / "site", image_size=32, counts={"test": (24, 30)}, seed=5,
                              brightness_offset=25)
    tiny = write_tiny_dataset(root / "tiny", image_size=32, counts={"test": (12, 30)}, seed=6)
    return root, data, run, site, tiny


@pytest.mark.slow
def test_calibrate_site_writes_the_named_calibration(run_and_site):
    root, data, run, site, _ = run_and_site
    before = (run / "calibration.json").read_bytes() if (run / "calibration.json").exists() else None
    result = calibrate.calibrate_site(run, site, "site_b", "test", num_resamples=1000)
    path = run / "calibrations" / "site_b.json"
    stored = json.loads(path.read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["name"] == "site_b" and stored["source"] == "site" and stored["split"] == "test"
    assert stored["n"] == 54 and stored["class_counts"] == {"NORMAL": 24, "PNEUMONIA": 30}
    assert stored["threshold_method"] == "val_youden"
    assert stored["threshold_applies_to"] == "probability"
    assert stored["calibrated_threshold"] == pytest.approx(calibration.calibrated_threshold(stored))
    assert stored["manifest_sha256"] == calibration.manifest_sha256(site)
    assert stored["data_dir"] == str(site.resolve())
    assert len(stored["warnings"]) == 2  # both classes under 50 images
    cv = stored["cross_validation"]
    assert cv["requested_folds"] == 5 and cv["folds"] == 5
    assert sum(f["n"] for f in cv["per_fold"]) == 54
    assert set(cv["ci95"]) >= {"accuracy", "sensitivity", "specificity", "roc_auc", "ece"}
    # The val calibration is never touched; a site calibration is found by name.
    after = (run / "calibration.json").read_bytes() if (run / "calibration.json").exists() else None
    assert after == before
    assert rundir.read_named_calibration(run, "site_b")["threshold"] == stored["threshold"]
    assert calibration.fitted_on(stored, site, "test")
    assert not calibration.fitted_on(stored, data, "test")


@pytest.mark.slow
def test_cli_refuses_a_tiny_sample_and_the_name_val(run_and_site):
    root, data, run, _, tiny = run_and_site
    cmd = ["pneumo_tf.calibrate", f"--run_dir={run}", f"--data_dir={tiny}", "--split=test",
           "--name=tiny"]
    done = run_command(*cmd)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("pneumo_tf.calibrate: error: ")
    assert "12 NORMAL" in lines[-1] and "at least 20" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (run / "calibrations" / "tiny.json").exists()
    named_val = run_command(*cmd[:-1], "--name=val")
    assert named_val.returncode == 1 and "--name=val" in named_val.stderr
