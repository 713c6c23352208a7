"""pneumo_tf.compare: table, bar chart, evaluate-on-demand, refusal of mismatched data."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_tiny_dataset

from pneumo_tf import compare, rundir


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
    assert [r["run"] for r in res["rows"]] == ["before/r", "after/r"]  # names disambiguated
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert ("| before/r | 100 | 0.420 (val_youden) | 0.660 [0.610, 0.700] "
            "| 0.880 [0.850, 0.900]") in md
    assert "| after/r | 100 | 0.420 (val_youden) | 0.860 | 0.960 |" in md
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
def test_evaluates_missing_runs_and_refuses_mismatched_data(tmp_path):
    from support_runs import make_run

    data = write_tiny_dataset(tmp_path / "data", image_size=32)
    run_a = make_run(tmp_path / "run_a", data, epochs=1, seed=0)
    run_b = make_run(tmp_path / "run_b", data, epochs=2, seed=1)
    other = write_tiny_dataset(tmp_path / "d40", image_size=40)
    with pytest.raises(rundir.RunDirError, match="image_size: run has 32, data dir has 40"):
        compare.compare_runs([run_a, run_b], "test", tmp_path / "cmp", data_dir=other)

    cmd = [sys.executable, "-m", "pneumo_tf.compare", f"--runs={run_a},{run_b}", "--split=test",
           f"--out={tmp_path / 'cmp'}", f"--data_dir={data}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| run_a | 12 |" in done.stdout and "| run_b | 12 |" in done.stdout
    for run in (run_a, run_b):
        assert (run / "eval" / "test" / "metrics.json").is_file()
        assert (run / "calibration.json").is_file()
    assert (tmp_path / "cmp" / "comparison.png").is_file()
