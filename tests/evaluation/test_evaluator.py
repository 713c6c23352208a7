"""pneumo_tf.evaluate on a tiny trained run: files, metric consistency, val-only threshold."""

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import run_command, write_tiny_dataset
from support_runs import make_run

from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import evaluator as evaluate
from pneumo_tf.core import rundir
from pneumo_tf.data import records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_dataset(root / "data", image_size=32,
                              counts={"train": (16, 16), "val": (10, 10), "test": (12, 14)})
    run = make_run(root / "run", data, epochs=3)
    return root, data, run


def _fresh_run(trained, name, source=None):
    """A copy of ``source`` (default: the module's trained run) named ``name``."""
    root, data, run = trained
    copy = root / name
    shutil.copytree(source or run, copy)
    return copy


@pytest.fixture(scope="module")
def evaluated(trained):
    """``(run, {"test": metrics, "val": metrics})``: a copy of the run evaluated on its test and
    val splits with the defaults (the stored operating point, 1,000 resamples). Read-only: a test
    that evaluates it again takes a copy. Its tests share one xdist worker (``tests/conftest.py``),
    so the two evaluations are made once."""
    root, data, _ = trained
    run = _fresh_run(trained, "run_evaluated")
    return run, {split: evaluate.evaluate_run(run, data, split, num_resamples=1000)
                 for split in ("test", "val")}


def _flip_test_labels(src, dst):
    """A copy of data dir ``src`` whose test labels are inverted (images unchanged)."""
    import tensorflow as tf

    shutil.copytree(src, dst)
    manifest = records.read_manifest(dst)
    for name in manifest["splits"]["test"]["shards"]:
        path = dst / name
        examples = [tf.train.Example.FromString(r.numpy())
                    for r in tf.data.TFRecordDataset(str(path))]
        with records.ShardWriter(path) as w:
            for ex in examples:
                lab = ex.features.feature["label"].int64_list
                lab.value[0] = 1 - lab.value[0]
                w.write(ex.SerializeToString())
    return dst


def test_evaluate_writes_consistent_report(evaluated):
    run, m = evaluated[0], evaluated[1]["test"]
    out = run / "eval" / "test"
    for name in ("predictions.csv", "metrics.json", "report.md", "report.html", "roc.png", "pr.png",
                 "confusion_matrix.png", "reliability.png", "probability_histogram.png",
                 "training_curves.png"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "metrics.json").read_text())
    for key in ("n", "accuracy", "precision", "recall", "specificity", "recall_per_class",
                "f1_per_class", "f1_macro", "roc_auc", "average_precision", "brier", "ece",
                "confusion_matrix", "threshold", "at_0.5", "ci95"):
        assert key in stored, key
    assert stored["n"] == 26
    assert set(stored["ci95"]) >= {"accuracy", "sensitivity", "specificity", "roc_auc",
                                   "average_precision"}
    assert stored["ci95"]["num_resamples"] == 1000
    cal = json.loads((run / "calibration.json").read_text())
    assert stored["threshold"] == {"value": cal["threshold"],
                                   "method": calibration.DEFAULT_THRESHOLD_METHOD,
                                   "source": "val", "applies_to": "probability",
                                   "calibrated_value": pytest.approx(cal["calibrated_threshold"])}
    assert stored["ece_bins"] == 15

    # Recompute from predictions.csv by hand.
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 26
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    preds = np.array([int(r["prediction"]) for r in rows])
    assert (labels == 1).sum() == 14
    np.testing.assert_array_equal(preds, (probs >= cal["threshold"]).astype(int))
    cm = stored["confusion_matrix"]
    assert cm["tp"] == int(((preds == 1) & (labels == 1)).sum())
    assert cm["tn"] == int(((preds == 0) & (labels == 0)).sum())
    assert stored["accuracy"] == pytest.approx((preds == labels).mean())
    assert stored["at_0.5"]["accuracy"] == pytest.approx(((probs >= 0.5) == labels).mean(),
                                                         abs=1e-6)
    cal_probs = np.array([float(r["calibrated_probability"]) for r in rows])
    # The calibrated column is the run's temperature applied to the probability column, so in
    # the probabilities' order it never goes down. (Not an equal argsort: the CSV's six decimals
    # can round two close calibrated values to a tie, as 0.437632 and 0.437633 both to
    # 0.496442 once.)
    np.testing.assert_allclose(cal_probs, calibration.apply_temperature(probs, cal["temperature"]),
                               atol=1e-4)
    by_probability = cal_probs[np.lexsort((cal_probs, probs))]
    assert np.all(np.diff(by_probability) >= 0), by_probability
    assert m["accuracy"] == stored["accuracy"]

    md = (out / "report.md").read_text()
    assert "split evaluated: `test`" in md and "![roc](roc.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "test split" in html


def test_tensorboard_has_figures_and_table(evaluated):
    import tensorflow as tf

    run = evaluated[0]
    events = list((run / "tb" / "eval").glob("events.out.tfevents.*"))
    assert events
    plugins = {}
    for path in events:
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            for v in ev.summary.value:
                plugins[v.tag] = v.metadata.plugin_data.plugin_name
    assert plugins["test/roc"] == "images"
    assert plugins["test/reliability"] == "images"
    assert plugins["test/training_curves"] == "images"
    assert plugins["test/metrics"] == "text"


def test_threshold_never_comes_from_the_test_split(trained, evaluated, tmp_path):
    root, data, _ = trained
    flipped = _flip_test_labels(data, tmp_path / "flipped")
    run_b = _fresh_run(trained, "run_b")
    a = evaluated[1]["test"]
    b = evaluate.evaluate_run(run_b, flipped, "test", num_resamples=1000)
    assert a["threshold"] == b["threshold"]
    assert a["temperature"] == b["temperature"]
    # ... while the test metrics did see the flipped labels.
    assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
    assert a["roc_auc"] + b["roc_auc"] == pytest.approx(1.0)


def test_other_threshold_method_is_chosen_on_val_without_rewriting_calibration(trained):
    from pneumo_tf.evaluation import scoring

    root, data, _ = trained
    run = _fresh_run(trained, "run_method")
    stored = evaluate.evaluate_run(run, data, "test", num_resamples=1000)
    cal_path = run / "calibration.json"
    before = cal_path.read_bytes()
    m = evaluate.evaluate_run(run, data, "test", threshold_method="val_sensitivity:0.95",
                              num_resamples=1000)
    # The run's operating point (used by export/predict/gradcam) is untouched ...
    assert cal_path.read_bytes() == before
    assert (rundir.read_calibration(run)["threshold_method"]
            == calibration.DEFAULT_THRESHOLD_METHOD == "val_prevalence:0.5")
    # ... while the evaluation used the asked-for threshold, chosen on val.
    val = scoring.predict_split(rundir.load_model(run), data, "val")
    expected = calibration.choose_threshold(val["label"], val["probability"],
                                            "val_sensitivity:0.95")
    assert m["threshold"] == {"value": pytest.approx(expected), "method": "val_sensitivity:0.95",
                              "source": "val", "applies_to": "probability",
                              "calibrated_value": pytest.approx(calibration.apply_temperature(
                                  expected, stored["temperature"]))}
    assert np.mean(val["probability"][val["label"] == 1] >= m["threshold"]["value"]) >= 0.95
    assert m["temperature"] == stored["temperature"]
    # A what-if threshold has a folder of its own: the split's own evaluation stays as it was.
    assert m["evaluation"] == "test@val_sensitivity:0.95"
    saved = json.loads((run / "eval" / "test@val_sensitivity:0.95" / "metrics.json").read_text())
    assert saved["threshold"]["method"] == "val_sensitivity:0.95"
    own = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert own["threshold"] == stored["threshold"] and own["evaluation"] == "test"
    fixed = evaluate.evaluate_run(run, data, "test", threshold_method="0.50", num_resamples=1000)
    assert fixed["threshold"]["value"] == 0.5 and fixed["evaluation"] == "test@0.5"
    assert fixed["accuracy"] == fixed["at_0.5"]["accuracy"]
    assert (run / "eval" / "test@0.5" / "report.html").is_file()
    assert cal_path.read_bytes() == before
    # The stored method, asked for by name, is the split's own evaluation.
    again = evaluate.evaluate_run(run, data, "test", threshold_method="val_prevalence:0.50",
                                  num_resamples=1000)
    assert again["evaluation"] == "test"
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "test", "test@0.5", "test@val_sensitivity:0.95"]


def test_threshold_on_calibrated_probability_is_honoured(trained):
    """A calibration.json threshold chosen on the calibrated probability is applied to it."""

    root, data, _ = trained
    run = _fresh_run(trained, "run_applies_to")
    cal = calibration.ensure_calibration(run, data)
    evaluate.evaluate_run(run, data, "test", num_resamples=1000)
    with open(run / "eval" / "test" / "predictions.csv", newline="") as f:
        probs = np.array([float(r["probability"]) for r in csv.DictReader(f)])
    # T = 2 so the two scales differ; a cut on the calibrated probability between two test
    # images, so the decision depends on which scale it is applied to.
    cals = np.sort(calibration.apply_temperature(probs, 2.0))
    cut = float(cals[len(cals) // 2 - 1: len(cals) // 2 + 1].mean())
    cal.update(temperature=2.0, threshold=cut, threshold_applies_to="calibrated_probability",
               calibrated_threshold=cut)
    atomic_files.write_json_atomic(run / "calibration.json", cal)
    m = evaluate.evaluate_run(run, data, "test", num_resamples=1000)
    with open(run / "eval" / "test" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    preds = np.array([int(r["prediction"]) for r in rows])
    cals = np.array([float(r["calibrated_probability"]) for r in rows])
    np.testing.assert_array_equal(preds, (cals >= cut).astype(int))
    assert preds.sum() == len(rows) - len(rows) // 2
    assert m["threshold"]["value"] == pytest.approx(calibration.raw_threshold(cal))
    assert m["threshold"]["value"] != pytest.approx(cut)  # T != 1: the two scales differ
    assert m["confusion_matrix"]["tp"] + m["confusion_matrix"]["fp"] == preds.sum()
    # One scale for people: the report shows the calibrated-scale threshold (predict's), the raw
    # one stays in metrics.json only.
    assert m["threshold"]["calibrated_value"] == pytest.approx(cut)
    text = (run / "eval" / "test" / "report.md").read_text()
    assert f"threshold {cut:.4f} on the calibrated probability" in text
    assert f"{m['threshold']['value']:.4f}" not in text
    from pneumo_tf.serving import predictor as predict

    assert predict.load_predictor(run).config.calibrated_threshold() == pytest.approx(cut)


def test_cli_requires_at_least_1000_resamples(trained):
    root, data, run = trained
    done = run_command("pneumo_tf.evaluate", f"--run_dir={run}", f"--data_dir={data}",
                      "--num_resamples=999")
    assert done.returncode != 0
    assert "num_resamples" in done.stderr and "1000" in done.stderr


def test_val_split_is_allowed_and_labelled(evaluated):
    run, m = evaluated[0], evaluated[1]["val"]
    assert m["split"] == "val" and m["n"] == 20
    md = (run / "eval" / "val" / "report.md").read_text()
    assert "split evaluated: `val`" in md and "optimistic" in md


def test_incompatible_data_dir_is_refused(trained, tmp_path):
    root, data, run = trained
    other = write_tiny_dataset(tmp_path / "d48", image_size=48)
    with pytest.raises(rundir.RunDirError, match="image_size: run has 32, data dir has 48"):
        evaluate.evaluate_run(run, other, "test")
    with pytest.raises(ValueError, match="--threshold"):
        evaluate.evaluate_run(run, data, "test", threshold_method="youden")


def test_cli_end_to_end(trained):
    root, data, _ = trained
    run = _fresh_run(trained, "run_cli")
    cmd = ["pneumo_tf.evaluate", f"--run_dir={run}", f"--data_dir={data}", "--split=test",
           "--num_resamples=1000"]
    done = run_command(*cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test: n=26" in done.stdout
    assert (run / "eval" / "test" / "metrics.json").is_file()
    bad = run_command(*cmd[:2], f"--data_dir={root / 'nope'}")
    assert bad.returncode == 1
    assert "pneumo_tf.evaluate: error: data dir" in bad.stderr and "does not exist" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Another site: the shift report and site calibrations


@pytest.fixture(scope="module")
def second_site(trained):
    """A brighter second site (+40 grey levels), one labelled split `test`, as converted alone."""
    root, data, _ = trained
    return write_tiny_dataset(root / "site", image_size=32, counts={"test": (24, 26)}, seed=3,
                              brightness_offset=40)


def _run_naming_its_data(trained, name, source=None):
    """A copy of the run (or of ``source``, a copy of it), whose summary.json names its data
    dir (as training writes it)."""
    root, data, _ = trained
    run = _fresh_run(trained, name, source)
    assert rundir.run_data_dir(run) == str(data)
    return run


def test_shift_section_on_a_second_site(trained, evaluated, second_site):
    import tensorflow as tf

    root, data, _ = trained
    # A copy of the run already evaluated on its own test and val splits.
    run = _run_naming_its_data(trained, "run_shift", source=evaluated[0])
    own, val = evaluated[1]["test"], evaluated[1]["val"]
    m = evaluate.evaluate_run(run, second_site, "test", num_resamples=1000)
    # The site's evaluation goes beside the run's own test evaluation, not over it.
    out = run / "eval" / f"test-{second_site.name}"
    assert rundir.evaluation_dir(run, second_site, "test") == out
    assert json.loads((run / "eval" / "test" / "metrics.json").read_text())["n"] == own["n"] \
        != m["n"]
    stored = json.loads((out / "metrics.json").read_text())
    shift = stored["shift"]
    assert shift["reference"]["data_dir"] == str(data) and shift["reference"]["split"] == "val"
    assert shift["reference"]["n"] == 20 and shift["evaluated"]["n"] == 50
    assert shift["evaluated"]["data_dir"] == str(second_site)
    # The evaluated side is this report's own figures at the val threshold.
    cal = json.loads((run / "calibration.json").read_text())
    assert shift["threshold"] == cal["threshold"] == stored["threshold"]["value"]
    assert shift["evaluated"]["roc_auc"] == pytest.approx(stored["roc_auc"])
    assert shift["evaluated"]["sensitivity"] == pytest.approx(stored["recall"])
    assert shift["evaluated"]["specificity"] == pytest.approx(stored["specificity"])
    assert shift["evaluated"]["ece"] == pytest.approx(stored["ece"])
    # ... the reference side the val report's.
    assert "shift" not in val  # the run's own data: no shift report
    assert shift["reference"]["roc_auc"] == pytest.approx(val["roc_auc"])
    assert shift["reference"]["specificity"] == pytest.approx(val["specificity"])
    assert shift["difference"]["roc_auc"] == pytest.approx(stored["roc_auc"] - val["roc_auc"])
    lo, hi = shift["roc_auc_difference_ci95"]
    assert lo <= shift["difference"]["roc_auc"] <= hi
    # The +40 grey levels show in both classes' mean intensity; the contrast barely moves.
    for name in ("NORMAL", "PNEUMONIA"):
        stats = shift["image_statistics"][name]
        assert 34 < stats["mean_intensity"]["difference"] < 42, stats["mean_intensity"]
        assert abs(stats["contrast"]["difference"]) < 4, stats["contrast"]
    assert m["shift"]["difference"] == shift["difference"]
    # The report: a section, two more figures, TensorBoard text and scalars.
    md = (out / "report.md").read_text()
    assert "## Shift from the run's val split" in md and "| NORMAL | mean intensity |" in md
    assert "![shift_scores](shift_scores.png)" in md
    assert (out / "shift_scores.png").is_file() and (out / "shift_image_statistics.png").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 8 and "Shift from the run" in html
    tags, scalars = {}, {}
    for path in (run / "tb" / "eval").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            for v in ev.summary.value:
                tags[v.tag] = v.metadata.plugin_data.plugin_name
                if v.metadata.plugin_data.plugin_name == "scalars":
                    scalars[v.tag] = float(tf.make_ndarray(v.tensor))
    # Tags carry the evaluation's name: the site's test split sits beside the run's own.
    site = f"test-{second_site.name}"
    assert stored["evaluation"] == site
    assert tags[f"{site}/shift_scores"] == "images" and tags[f"{site}/shift"] == "text"
    assert tags[f"{site}/shift_roc_auc_difference"] == "scalars"
    assert scalars["test/accuracy"] == pytest.approx(own["accuracy"])
    assert scalars[f"{site}/accuracy"] == pytest.approx(m["accuracy"])
    assert "test/shift_scores" not in tags


def test_val_data_dir_names_the_reference_of_a_run_that_does_not(trained, second_site):
    root, data, _ = trained
    run = _fresh_run(trained, "run_val_data_dir")
    # A run that does not name its data dir (no flags.txt; a summary without config.data_dir,
    # as an older version wrote it).
    summary = json.loads((run / "summary.json").read_text())
    del summary["config"]["data_dir"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert not (run / "flags.txt").exists() and rundir.run_data_dir(run) is None
    assert not (run / "calibration.json").exists()
    # --val_data_dir: the reference, and the val split a missing calibration.json is fitted on.
    m = evaluate.evaluate_run(run, second_site, "test", num_resamples=1000, val_data_dir=data)
    assert m["shift"]["reference"]["data_dir"] == str(data)
    assert json.loads((run / "calibration.json").read_text())["data_dir"] == str(data.resolve())
    m = evaluate.evaluate_run(run, second_site, "test", num_resamples=1000)
    assert "shift" not in m  # nothing to compare with (a warning says to pass --val_data_dir)
    # A reference the run names but that is gone: the evaluation still runs and says why ...
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["data_dir"] = str(root / "gone")
    (run / "summary.json").write_text(json.dumps(summary))
    m = evaluate.evaluate_run(run, second_site, "test", num_resamples=1000)
    assert "does not exist" in m["shift"]["skipped"] and "--val_data_dir" in m["shift"]["skipped"]
    assert "Not computed: " in (rundir.evaluation_dir(run, second_site, "test")
                                / "report.md").read_text()
    # ... while a --val_data_dir the user names must be usable.
    with pytest.raises(records.DataDirError, match="does not exist"):
        evaluate.evaluate_run(run, second_site, "test", num_resamples=1000,
                              val_data_dir=root / "gone")


def test_site_calibration_on_the_evaluated_split_reports_cross_validated_figures(
        trained, second_site):
    from pneumo_tf.evaluation import site_calibration as calibrate

    root, data, _ = trained
    run = _run_naming_its_data(trained, "run_site_cal")
    cal = calibrate.calibrate_site(run, second_site, "site_b", "test", num_resamples=1000)
    m = evaluate.evaluate_run(run, second_site, "test", num_resamples=1000,
                              calibration_name="site_b")
    assert m["calibration"] == "site_b" and m["calibration_in_sample"] is True
    assert m["threshold"] == {"value": pytest.approx(cal["threshold"]), "method": "val_youden",
                              "source": "site", "applies_to": "probability",
                              "calibrated_value": pytest.approx(cal["calibrated_threshold"])}
    assert m["temperature"] == pytest.approx(cal["temperature"])
    assert m["cross_validated"] == json.loads(json.dumps(cal["cross_validation"]))
    # The shift section still judges the site at the val operating point.
    val_cal = json.loads((run / "calibration.json").read_text())
    assert m["shift"]["threshold"] == val_cal["threshold"] != m["threshold"]["value"]
    out = run / "eval" / f"test-{second_site.name}-cal_site_b"
    assert rundir.evaluation_dir(run, second_site, "test", "site_b") == out
    md = (out / "report.md").read_text()
    assert "fitted on this very split" in md and "Cross-validated figures of calibration" in md
    line = evaluate.summary_line(m)
    pooled = cal["cross_validation"]["pooled"]
    assert "cross-validated" in line and f"accuracy={pooled['accuracy']:.4f}" in line
    # On another split the site calibration is not in-sample.
    other = evaluate.evaluate_run(run, data, "test", num_resamples=1000,
                                  calibration_name="site_b")
    assert other["calibration_in_sample"] is False and "cross_validated" not in other
    assert other["calibration"] == "site_b" and "shift" not in other
    default = evaluate.evaluate_run(run, data, "test", num_resamples=1000)
    assert default["calibration"] == "val" and default["calibration_in_sample"] is False


def test_cli_names_a_missing_calibration_of_an_old_run(trained):
    root, data, run = trained
    assert not (run / "calibrations").exists()
    done = run_command("pneumo_tf.evaluate", f"--run_dir={run}", f"--data_dir={data}",
                      "--calibration=site_x")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "pneumo_tf.evaluate: error: --calibration=site_x" in done.stderr
    assert "pneumo_tf.calibrate" in done.stderr


# ---------------------------------------------------------------------------------------------
# The subtype section, the OOD section, old data and run dirs


BINARY_KEYS = ("n", "class_counts", "accuracy", "precision", "recall", "specificity",
               "recall_per_class", "f1_per_class", "f1_macro", "confusion_matrix", "roc_auc",
               "average_precision", "brier", "ece", "ece_bins", "threshold", "at_0.5", "ci95",
               "split", "temperature", "calibrated", "calibration")


def test_subtype_run_adds_a_subtype_section_and_keeps_the_binary_keys(subtype_run, tmp_path):
    run, data = subtype_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = evaluate.evaluate_run(copy, data, "val", num_resamples=1000)
    out = copy / "eval" / "val"
    stored = json.loads((out / "metrics.json").read_text())
    assert set(BINARY_KEYS) <= set(stored)
    assert set(stored["confusion_matrix"]) == {"tn", "fp", "fn", "tp"}
    sub = stored["subtype"]
    assert sub["labels"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    cm = np.array(sub["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == sub["n"] == stored["n"] - sub["unknown"]
    assert cm.sum(axis=1).tolist() == [sub["class_counts"][k] for k in sub["labels"]]
    # Predicted NORMAL (column 0) is exactly the binary decision's NORMAL among known subtypes.
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    known = [r for r in rows if int(r["subtype"]) >= 0]
    assert cm[:, 0].sum() == sum(r["prediction"] == "0" for r in known)
    assert all((r["predicted_subtype"] == "0") == (r["prediction"] == "0") for r in rows)
    assert all(float(r["ood_score"]) >= 0 for r in rows)
    for name in sub["labels"]:
        assert set(sub[name]) == {"precision", "recall", "f1", "auc", "n"}
        assert set(sub["ci95"][name]) == {"precision", "recall", "f1", "auc"}
    assert set(sub["bacterial_vs_viral"]) >= {"auc", "accuracy", "ci95", "n"}
    assert sub["bacterial_vs_viral"]["n"] == cm[1:, :].sum()
    assert 0 <= sub["macro_f1"] <= 1 and len(sub["ci95"]["macro_f1"]) == 2
    stored_t = json.loads((copy / "calibration.json").read_text())["subtype"]["temperature"]
    assert sub["temperature"]["value"] == stored_t
    assert sub["temperature"]["source"] == "calibration.json"
    assert stored["ood"]["n"] == stored["n"] and 0 <= stored["ood"]["flagged_fraction"] <= 1
    assert (out / "subtype_confusion_matrix.png").is_file()
    md = (out / "report.md").read_text()
    assert "## Subtypes: NORMAL, BACTERIAL, VIRAL" in md and "bacterial vs viral" in md
    assert "## Out of distribution" in md
    assert "macro F1" in evaluate.summary_line(m) and "OOD flagged" in evaluate.summary_line(m)


def test_a_subtype_run_on_old_data_has_no_subtype_figures(subtype_run, tmp_path):
    run, _ = subtype_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    old = write_tiny_dataset(tmp_path / "v1", version=1, seed=3)
    stored = evaluate.evaluate_run(copy, old, "test", num_resamples=1000)
    assert set(stored["subtype"]) == {"skipped"} and "roc_auc" in stored


def test_old_data_and_old_run_dirs_evaluate_as_before(tmp_path):
    """A version-1 data dir and a run without ood.json or subtypes: no new section breaks."""
    old = write_tiny_dataset(tmp_path / "v1", image_size=32, version=1)
    run = make_run(tmp_path / "run", old, epochs=1)
    # An old run's summary: a few config keys and its precision, none of today's fields.
    config = json.loads((run / "summary.json").read_text())["config"]
    (run / "summary.json").write_text(json.dumps({
        "config": {key: config[key] for key in ("backbone", "image_size", "epochs", "seed")},
        "precision": "float32"}))
    stored = evaluate.evaluate_run(run, old, "test", num_resamples=1000)
    assert set(BINARY_KEYS) <= set(stored) and "subtype" not in stored
    assert set(stored["ood"]) == {"skipped"} and "ood.json" in stored["ood"]["skipped"]
    with open(run / "eval" / "test" / "predictions.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "patient_id", "label", "probability", "calibrated_probability",
                      "prediction"]


def test_the_guard_flags_few_images_of_the_phantom_test_split(phantom_ood_run, tmp_path):
    run, data, _ = phantom_ood_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    guard = evaluate.evaluate_run(copy, data, "test", num_resamples=1000)["ood"]
    assert guard["n"] == 20 and guard["flagged_fraction"] <= 0.2
    assert set(guard["flagged_fraction_by_class"]) == {"NORMAL", "PNEUMONIA"}
    assert guard["layer"] == "gap" and "feature score only" in guard["checks"]


# ---------------------------------------------------------------------------------------------
# Evidence measured on anatomy: metrics.json's lung_evidence


def test_every_evaluation_measures_the_lungs_of_a_sample(trained):
    """Without masks or a lung model: the adaptive box, said so; --lung_images=0 skips it."""
    from pneumo_tf.explain import anatomy

    root, data, _ = trained
    run = _fresh_run(trained, "run_lungs_box")
    m = evaluate.evaluate_run(run, data, "test", num_resamples=1000,
                              lungs=anatomy.LungOptions(num_images=10))
    lungs = m["lung_evidence"]
    assert lungs["lung_source"] == "box" and lungs["num_images"] == 10
    assert lungs["drawn_from"] == 26 and lungs["layer"] == "b1_out"
    assert lungs["groups"]["all"]["n"] == 10 and set(lungs["secondary"]) == {"lung_box_share"}
    stored = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert stored["lung_evidence"]["groups"] == json.loads(json.dumps(lungs["groups"]))
    off = evaluate.evaluate_run(run, data, "test", num_resamples=1000,
                                lungs=anatomy.LungOptions(num_images=0))
    assert off["lung_evidence"] == {"skipped": "--lung_images=0"}
    report_md = (run / "eval" / "test" / "report.md").read_text()
    assert "## Evidence in the lungs (Grad-CAM against the lungs)\n\nNot computed: " \
           "--lung_images=0" in report_md


def test_lung_evidence_leads_the_report_and_matches_gradcam(phantom_lungs, tmp_path):
    """On phantoms with true masks: the same sample and figures as gradcam, first in the report,
    and TensorBoard scalars."""
    import tensorflow as tf

    from pneumo_tf.explain import anatomy
    from pneumo_tf.explain import grids

    run = tmp_path / "run"
    shutil.copytree(phantom_lungs["run"], run)
    m = evaluate.evaluate_run(run, phantom_lungs["data"], "test", num_resamples=1000,
                              lungs=anatomy.LungOptions(num_images=24))
    lungs = m["lung_evidence"]
    assert lungs["lung_source"] == "records" and lungs["num_images"] == 24
    cams = grids.run_gradcam(run, phantom_lungs["data"], "test", num_images=24, batch_size=32)
    for group, stats in lungs["groups"].items():
        assert cams["lung_evidence"]["groups"][group] == pytest.approx(stats), group
    assert lungs["groups"]["TP"]["lift"] > 1.0  # lesions inside the lungs (test_grids)
    out = run / "eval" / "test"
    report_md = (out / "report.md").read_text()
    overall = lungs["groups"]["all"]
    head = report_md.split("\n\n| metric |")[0]  # the header, before the metrics table
    assert (f"- **Grad-CAM evidence in the lungs: lift {overall['lift']:.2f} (1.0 = a flat map), "
            f"pointing_lungs {overall['pointing_lungs']:.2f}** on 24 images, lungs from "
            f"`records`") in head
    sections = [line for line in report_md.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Evidence in the lungs (Grad-CAM against the lungs)"
    assert f"| TP | {lungs['groups']['TP']['n']} | {lungs['groups']['TP']['lift']:.4f} |" \
        in report_md
    assert "Secondary (the older, coarser measure): lung mask share" in report_md
    html = (out / "report.html").read_text()
    assert "<h2>Evidence in the lungs (Grad-CAM against the lungs)</h2>" in html
    assert "**" not in html
    tags = set()
    for path in (run / "tb" / "eval").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            tags |= {v.tag for v in ev.summary.value}
    assert {"test/lung_evidence/all/lift", "test/lung_evidence/TP/pointing_lungs",
            "test/lung_evidence"} <= tags
    assert "Grad-CAM lung lift=" in evaluate.summary_line(m)


def test_cli_measures_on_a_lung_model_and_refuses_a_wrong_one(phantom_lungs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(phantom_lungs["run"], run)
    args = [f"--run_dir={run}", f"--data_dir={phantom_lungs['plain']}", "--split=test",
            "--num_resamples=1000", "--lung_images=16"]
    done = run_command("pneumo_tf.evaluate", *args, f"--lung_model={phantom_lungs['lungs']}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Grad-CAM lung lift=" in done.stdout and "(lung_model)" in done.stdout
    stored = json.loads((run / "eval" / "test-plain" / "metrics.json").read_text())
    lungs = stored["lung_evidence"]
    assert lungs["lung_source"] == "lung_model" and lungs["num_images"] == 16
    assert lungs["lung_model"] == str(phantom_lungs["lungs"]) and lungs["warnings"] == []
    missing = tmp_path / "no_such_run"
    bad = run_command("pneumo_tf.evaluate", *args, f"--lung_model={missing}")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        f"pneumo_tf.evaluate: error: --lung_model={missing}: no such directory; pass a lungs run "
        f"directory (train one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`)")
