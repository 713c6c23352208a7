"""modeling/lungs.py: a lungs run as a tool (maps, findings, checksum) and which lung model a
classifier run serves with."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from pneumo_tf.core import rundir
from pneumo_tf.data import phantoms
from pneumo_tf.image import preprocess
from pneumo_tf.modeling import lungs as lungs_lib


def test_a_lung_model_maps_films_of_any_size(lung_run):
    run, _ = lung_run
    lungs = lungs_lib.LungModel(run)
    assert lungs.image_size == 32
    films = [phantoms.generate_phantom(np.random.default_rng(i), i % 2, size)[0]
             for i, size in enumerate([(150, 200), (97, 131)])]
    maps = lungs.probabilities(films)
    assert [m.shape for m in maps] == [(150, 200), (97, 131)]
    assert all(m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1 for m in maps)
    grid = lungs.grid_probabilities(lungs.model_inputs(films))
    findings = lungs.find(films, margin=0.05, min_fraction=0.0)
    for g, finding in zip(grid, findings):
        assert finding == preprocess.find_lungs(g, 0.05, 0.0)
    assert lungs.sha256 == hashlib.sha256((run / "model.keras").read_bytes()).hexdigest()
    assert lungs.describe() == {"path": str(run.absolute()), "sha256": lungs.sha256,
                                "image_size": 32}


def test_bad_lung_models_are_named_with_the_fix(lung_run, tiny_run, tmp_path):
    with pytest.raises(rundir.RunDirError, match=r"^--lung_model=.*no such directory"):
        lungs_lib.LungModel(tmp_path / "nowhere")
    classifier = tiny_run[0]
    with pytest.raises(rundir.RunDirError, match=r"--task=binary, not a lung model; train one "
                                                 r"with"):
        lungs_lib.LungModel(classifier)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(rundir.RunDirError, match="no summary.json"):
        lungs_lib.LungModel(unfinished)


def _run_with_lung_entry(tmp_path, lung_run, **entry) -> rundir.Run:
    """A classifier run dir whose data manifest says its films were cropped by ``lung_run``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    lungs = lungs_lib.LungModel(lung_run[0])
    manifest = {"image_size": 32, "crop": "lungs",
                "lung_model": {**lungs.describe(), "margin": 0.05, **entry}}
    (run_dir / "data_manifest.json").write_text(json.dumps(manifest))
    return rundir.Run(run_dir)


def test_a_lung_crop_run_serves_with_its_own_lung_model(lung_run, tmp_path):
    run = _run_with_lung_entry(tmp_path, lung_run)
    assert lungs_lib.lung_model_for_run(run).path == str(lung_run[0])
    assert lungs_lib.lung_model_for_run(rundir.Run(lung_run[0])) is None  # no entry, no flag
    with pytest.raises(rundir.RunDirError, match=r"a 32 px lung model, but .* by a 64 px one"):
        lungs_lib.lung_model_for_run(_run_with_lung_entry(tmp_path / "b", lung_run,
                                                          image_size=64), lung_run[0])
    moved = _run_with_lung_entry(tmp_path / "c", lung_run, path=str(tmp_path / "gone"))
    with pytest.raises(rundir.RunDirError, match=r"which is missing; pass --lung_model="):
        lungs_lib.lung_model_for_run(moved)
    copy = tmp_path / "copy"
    shutil.copytree(lung_run[0], copy)
    assert lungs_lib.lung_model_for_run(moved, copy).path == str(copy)
