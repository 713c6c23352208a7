"""serving/lungs.py (named apart from tests/modeling/test_lungs.py: pytest needs one basename per
test module): the no-lungs guard, the lung settings, the decision in the graph and on the
host, and which lung model a classifier serves with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_command
from pneumo_tf.core import rundir
from pneumo_tf.image import preprocess
from pneumo_tf.modeling import lungs as lungs_lib
from pneumo_tf.serving import lungs as lung_serving


def _val_confidences(run) -> np.ndarray:
    from pneumo_tf.evaluation import scoring

    lungs = lungs_lib.LungModel(run)
    maps = np.concatenate([lungs.grid_probabilities(b["image"]) for b in
                           scoring.iterate_split(lungs.run.data_dir, "val", 64)])
    return np.array([preprocess.find_lungs(m).confidence for m in maps])


def test_training_fits_the_guard_on_the_val_films(lung_run):
    run, _ = lung_run
    assert json.loads((run / "summary.json").read_text())["lung_guard"] == "ok"
    guard = lung_serving.load_guard(rundir.Run(run))
    confidences = _val_confidences(run)
    assert guard["min_lung_confidence"] == pytest.approx(np.quantile(confidences, 0.01))
    assert guard["val_rate"] == 0.01 and guard["fitted_on"]["val"] == len(confidences)
    assert guard["val_flagged"] <= 0.05
    assert guard["model_sha256"] == lungs_lib.LungModel(run).sha256
    assert 0 < guard["val_lung_fraction"]["median"] < 1


@pytest.mark.slow
def test_the_ood_command_fits_a_lungs_runs_guard(lung_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lung_run[0], run)
    (run / rundir.LUNG_GUARD_NAME).unlink()
    proc = run_command("pneumo_tf.ood", f"--run_dir={run}", "--ood_val_rate=0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("lung guard: min_lung_confidence ")
    guard = lung_serving.load_guard(rundir.Run(run))
    assert guard["val_rate"] == 0.2
    assert guard["min_lung_confidence"] == pytest.approx(np.quantile(_val_confidences(run), 0.2))


def test_settings_take_the_guard_or_the_flags(lung_run, tmp_path, caplog):
    run, _ = lung_run
    lungs = lungs_lib.LungModel(run)
    guard = lung_serving.load_guard(lungs.run)
    settings = lung_serving.settings_for(lungs)
    assert settings.min_lung_confidence == guard["min_lung_confidence"]
    assert settings.confidence_source == rundir.LUNG_GUARD_NAME
    assert settings.min_lung_fraction == 0.1 and settings.image_size == 32
    crop = lung_serving.settings_for(lungs, {"margin": 0.1, "min_lung_fraction": 0.2}, 0.05, 0.5)
    assert (crop.margin, crop.crop_min_fraction, crop.min_lung_fraction,
            crop.min_lung_confidence, crop.confidence_source) == (0.1, 0.2, 0.05, 0.5,
                                                                   "--min_lung_confidence")
    assert lung_serving.LungSettings.from_json(json.loads(json.dumps(crop.to_json()))) == crop
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns(rundir.LUNG_GUARD_NAME))
    unguarded = lung_serving.settings_for(lungs_lib.LungModel(bare))
    assert unguarded.min_lung_confidence is None and unguarded.confidence_source == "none"
    assert "python -m pneumo_tf.ood --run_dir=" in caplog.text
    assert lung_serving.lungs_found(0.3, 0.0, unguarded)  # the share alone
    assert not lung_serving.lungs_found(0.05, 1.0, unguarded)
    assert not lung_serving.lungs_found(0.3, 0.4, crop) and lung_serving.lungs_found(0.3, 0.5, crop)
    given = lung_serving.LungOptions(min_lung_confidence=0.7).apply(unguarded)
    assert given.min_lung_confidence == 0.7 and given.min_lung_fraction == 0.1


def test_the_graph_decides_as_the_host(lung_run):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    maps = np.clip(rng.normal(0.5, 0.4, (6, 32, 32)), 0, 1).astype(np.float32)
    maps[0] = 0.0
    maps[1, :, :] = 0.99
    settings = lung_serving.LungSettings("x", "y", 32, min_lung_fraction=0.45,
                                         min_lung_confidence=0.8)
    graph = lung_serving.tf_lung_summary(tf.constant(maps), settings)
    for i, m in enumerate(maps):
        host = preprocess.find_lungs(m)
        assert float(graph["lung_fraction"][i]) == pytest.approx(host.fraction)
        assert float(graph["lung_confidence"][i]) == pytest.approx(host.confidence, abs=1e-6)
        assert bool(graph["lungs_found"][i]) == lung_serving.lungs_found(
            host.fraction, host.confidence, settings)
    assert not bool(graph["lungs_found"][0]) and bool(graph["lungs_found"][1])


def test_a_classifier_serves_with_its_crops_lung_model_or_the_flags(lung_run, lung_crop_run,
                                                                    tiny_run, tmp_path):
    run, _ = lung_crop_run
    lungs, settings = lung_serving.for_run(rundir.Run(run))
    assert lungs.path == str(lung_run[0])
    manifest = json.loads((run / "data_manifest.json").read_text())["lung_model"]
    assert (settings.margin, settings.crop_min_fraction) == (manifest["margin"],
                                                             manifest["min_lung_fraction"])
    plain = tiny_run[0]
    assert lung_serving.for_run(rundir.Run(plain)) == (None, None)
    lungs, settings = lung_serving.for_run(rundir.Run(plain), lung_serving.LungOptions(
        str(lung_run[0]), min_lung_fraction=0.2))
    assert lungs is not None and settings.min_lung_fraction == 0.2
    assert settings.crop_min_fraction == preprocess.DEFAULT_MIN_LUNG_FRACTION
    with pytest.raises(rundir.RunDirError, match=r"is a lung model .*--lung_model="):
        lung_serving.for_run(rundir.Run(lung_run[0]))


def test_host_lungs_find_what_the_lung_model_finds(lung_run):
    from pneumo_tf.data import phantoms

    lungs = lungs_lib.LungModel(lung_run[0])
    host = lung_serving.keras_lungs(lungs, lung_serving.settings_for(lungs, {"margin": 0.02}))
    films = [phantoms.generate_phantom(np.random.default_rng(i), 1, (120 + 9 * i, 150))[0]
             for i in range(3)]
    assert host.find(films) == lungs.find(films, margin=0.02)
    assert host.find([]) == []


def test_lung_rates_count_what_predict_refers(lung_run):
    from pneumo_tf.data import phantoms

    lungs = lungs_lib.LungModel(lung_run[0])
    settings = lung_serving.settings_for(lungs, min_lung_confidence=0.0)
    host = lung_serving.keras_lungs(lungs, settings)
    films = [phantoms.generate_phantom(np.random.default_rng(i), i % 2, (130, 150))[0]
             for i in range(4)]
    blank = [np.zeros((100, 100), np.uint8)] * 2
    rates = lung_serving.lung_rates(host, films + blank, batch_size=3)
    assert rates["n"] == 6 and rates["by_confidence"] == 0.0
    findings = host.find(films + blank)
    assert rates["no_lungs_found"] == pytest.approx(np.mean([not host.found(f) for f in findings]))
    assert rates["by_fraction"] == pytest.approx(np.mean([f.fraction < 0.1 for f in findings]))
    assert rates["lung_fraction"]["max"] == pytest.approx(max(f.fraction for f in findings))
    assert lung_serving.lung_rates(host, []) == {"n": 0}


@pytest.mark.slow
def test_bench_ood_measures_the_lung_guard_too(phantom_ood_run, lung_run, tmp_path):
    run, _, src = phantom_ood_run
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_ood"), f"--run_dir={run}",
                           f"--films={src / 'train'}", f"--external={src / 'test'}",
                           "--per_kind=2", f"--lung_model={lung_run[0]}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["lungs"]["path"] == str(lung_run[0].absolute())
    for kind, entry in result["kinds"].items():
        assert {"n", "no_lungs_found", "by_fraction", "by_confidence", "lung_fraction",
                "lung_confidence"} <= set(entry["lungs"]), kind
    assert {"far_min_no_lungs", "far_min_no_lungs_by_fraction", "unchanged_films_no_lungs",
            "external_no_lungs"} <= set(result["summary"])
