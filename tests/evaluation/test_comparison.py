"""pneumo_tf.compare: table, bar chart, evaluate-on-demand, refusal of mismatched data."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_command, write_tiny_dataset

from pneumo_tf.evaluation import comparison as compare
from pneumo_tf.core import rundir


def _fake_metrics(run_dir, split, acc, auc, ci=True):
    out = rundir.RunPaths(run_dir).eval_dir(split)
    out.mkdir(parents=True)
    m = {"n": 100, "accuracy": acc, "roc_auc": auc, "average_precision": 0.9,
         "recall_per_class": {"NORMAL": 0.7, "PNEUMONIA": 0.9}, "f1_macro": 0.8,
         "threshold": {"value": 0.42, "method": "val_youden", "source": "val"},
         "ci95": {"accuracy": [acc - 0.05, acc + 0.04], "roc_auc": [auc - 0.03, auc + 0.02],
                  "sensitivity": [0.85, 0.95], "specificity": [0.6, 0.8],
                  "f1_macro": [0.75, 0.85], "average_precision": [0.85, 0.94]} if ci else None}
    (out / "metrics.json").write_text(json.dumps(m))


def test_table_and_chart_from_existing_metrics(tmp_path):
    _fake_metrics(tmp_path / "before" / "r", "test", 0.66, 0.88)
    _fake_metrics(tmp_path / "after" / "r", "test", 0.86, 0.96, ci=False)
    res = compare.compare_runs([tmp_path / "before" / "r", tmp_path / "after" / "r"], "test",
                               tmp_path / "cmp")
    # Named by run: the folder "r" every run sits in says nothing.
    assert [r["run"] for r in res["rows"]] == ["before", "after"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert ("| before | 100 | 0.420 (val_youden) | 0.660 [0.610, 0.700] "
            "| 0.880 [0.850, 0.900]") in md
    assert "| after | 100 | 0.420 (val_youden) | 0.860 | 0.960 |" in md
    assert res["rows"][0]["NORMAL recall"] == {"value": 0.7, "ci": [0.6, 0.8]}
    png = (tmp_path / "cmp" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    stored = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert stored["rows"][1]["accuracy"]["value"] == 0.86


def test_missing_metrics_without_data_dir_names_the_fix(tmp_path):
    _fake_metrics(tmp_path / "a", "test", 0.8, 0.9)
    (tmp_path / "b").mkdir()
    with pytest.raises(rundir.RunDirError, match="python -m pneumo_tf.evaluate --run_dir=.*b"):
        compare.compare_runs([tmp_path / "a", tmp_path / "b"], "test", tmp_path / "cmp")


@pytest.mark.slow
def test_evaluates_missing_runs_and_refuses_mismatched_data(tiny_run, tmp_path):
    from support_runs import make_run

    run_a, data = Path(shutil.copytree(tiny_run[0], tmp_path / "run_a")), tiny_run[1]
    run_b = make_run(tmp_path / "run_b", data, epochs=2, seed=1)
    other = write_tiny_dataset(tmp_path / "d40", image_size=40)
    with pytest.raises(rundir.RunDirError, match="image_size: run has 32, data dir has 40"):
        compare.compare_runs([run_a, run_b], "test", tmp_path / "cmp", data_dir=other)

    done = run_command("pneumo_tf.compare", f"--runs={run_a},{run_b}", "--split=test",
                       f"--out={tmp_path / 'cmp'}", f"--data_dir={data}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| run_a | 12 |" in done.stdout and "| run_b | 12 |" in done.stdout
    for run in (run_a, run_b):
        assert (run / "eval" / "test" / "metrics.json").is_file()
        assert (run / "calibration.json").is_file()
    assert (tmp_path / "cmp" / "comparison.png").is_file()


# ---------------------------------------------------------------------------------------------
# Differences between runs: paired on the same images, unpaired otherwise


def _fake_predictions(run_dir, split, labels, probs, threshold=0.5, paths=None):
    out = rundir.RunPaths(run_dir).eval_dir(split)
    paths = paths or [f"img{i:04d}.png" for i in range(len(labels))]
    lines = ["path,patient_id,label,probability,calibrated_probability,prediction"]
    lines += [f"{p},pt{i},{y},{q:.6f},{q:.6f},{int(q >= threshold)}"
              for i, (p, y, q) in enumerate(zip(paths, labels, probs))]
    (out / "predictions.csv").write_text("\n".join(lines) + "\n")


def _two_runs(tmp_path, shift_b=1.0, other_paths=False):
    import numpy as np

    rng = np.random.default_rng(0)
    y = (rng.random(240) < 0.6).astype(int)
    noise = rng.normal(0, 1, 240)
    a = 1 / (1 + np.exp(-(y * 1.0 + noise)))
    b = 1 / (1 + np.exp(-(y * (1.0 + shift_b) + noise)))
    for name, p in (("a", a), ("b", b)):
        _fake_metrics(tmp_path / name, "test", 0.8, 0.85)
        paths = [f"{name}{i}.png" for i in range(240)] if other_paths and name == "b" else None
        _fake_predictions(tmp_path / name, "test", y, p, paths=paths)
    return y, a, b


def test_runs_on_the_same_images_are_compared_paired_with_delong(tmp_path):
    from sklearn.metrics import roc_auc_score

    y, a, b = _two_runs(tmp_path)
    res = compare.compare_runs([tmp_path / "a", tmp_path / "b"], "test", tmp_path / "cmp",
                               diff_resamples=1000)
    (d,) = res["differences"]
    assert d["paired"] is True and d["run"] == "b"
    want = roc_auc_score(y, b) - roc_auc_score(y, a)
    assert d["roc_auc"]["difference"] == pytest.approx(want)
    assert d["delong"]["difference"] == pytest.approx(want)
    lo, hi = d["roc_auc"]["ci95"]
    assert 0 < lo < want < hi  # b is clearly better: the CI excludes 0
    assert d["delong"]["p_value"] < 0.01
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Differences against a" in md and "| b | paired |" in md
    stored = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert stored["differences"][0]["delong"]["p_value"] == d["delong"]["p_value"]


def test_a_run_against_itself_differs_by_nothing(tmp_path):
    _two_runs(tmp_path, shift_b=0.0)
    res = compare.compare_runs([tmp_path / "a", tmp_path / "b"], "test", tmp_path / "cmp",
                               diff_resamples=1000)
    d = res["differences"][0]
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert d[key]["difference"] == 0.0 and d[key]["ci95"] == [0.0, 0.0]
    assert d["delong"]["p_value"] == 1.0


def test_run_names_leave_out_the_folders_every_run_shares(tmp_path):
    assert compare.run_labels([tmp_path / "x" / "a" / "run", tmp_path / "y" / "a" / "run"]) == [
        "x", "y"]
    assert compare.run_labels([tmp_path / "runs" / "paper_nocrop", tmp_path / "runs" / "paper"]) \
        == ["paper_nocrop", "paper"]
    assert compare.run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run",
                               tmp_path / "a" / "other"]) == ["a/run", "b/run", "a/other"]
    assert compare.run_labels([tmp_path / "out" / "demo" / "run"]) == ["run"]


def test_runs_on_different_images_are_refused_unless_allowed(tmp_path):
    _two_runs(tmp_path, other_paths=True)
    with pytest.raises(compare.UnpairedRunsError) as e:
        compare.compare_runs([tmp_path / "a", tmp_path / "b"], "test", tmp_path / "cmp",
                             diff_resamples=1000)
    assert str(e.value).startswith("b evaluated on other images than a (split test)")
    assert "--data_dir=D" in str(e.value) and "--allow_unpaired" in str(e.value)
    assert not (tmp_path / "cmp").exists()
    # Without predictions.csv, another image count says the same.
    _fake_metrics(tmp_path / "c", "test", 0.8, 0.85)
    metrics = tmp_path / "c" / "eval" / "test" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"n": 100', '"n": 99'))
    with pytest.raises(compare.UnpairedRunsError, match="^c evaluated on other images than a"):
        compare.compare_runs([tmp_path / "a", tmp_path / "c"], "test", tmp_path / "cmp")


def test_runs_on_different_images_are_compared_unpaired_when_allowed(tmp_path):
    _two_runs(tmp_path, other_paths=True)
    res = compare.compare_runs([tmp_path / "a", tmp_path / "b"], "test", tmp_path / "cmp",
                               diff_resamples=1000, allow_unpaired=True)
    d = res["differences"][0]
    assert d["paired"] is False and "delong" not in d
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| b | unpaired (different images) |" in md and "n/a (unpaired)" in md


def test_comparison_figure_reads_on_its_own(tmp_path):
    _two_runs(tmp_path)
    names = ["a", "b"]
    rows = compare.comparison_rows(names, [compare.load_metrics(tmp_path / n, "test", None)
                                           for n in names])
    preds = [compare.read_predictions(tmp_path / n, "test") for n in names]
    diffs = [compare.differences(preds[0], preds[1], 1000, 0)]
    fig = compare.comparison_figure(rows, names, diffs, "test")
    bars, panel = fig.axes[:2]
    assert bars.get_title() == "Runs on the test split (n = 100)"
    labels = [t for t in bars.texts if t.get_text() == "0.80"]
    assert labels and all(t.get_fontsize() >= 9 and t.get_rotation() == 0 for t in labels)
    assert panel.get_title() == "Against a"
    assert panel.get_xlabel() == "difference from a (95 % CI)"
    assert [t.get_text() for t in panel.get_yticklabels()] == [
        "ROC AUC", "accuracy", "PNEUMONIA recall", "NORMAL recall"]
    assert panel.get_legend().get_texts()[0].get_text() == "b (paired)"
