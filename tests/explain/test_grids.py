"""The Grad-CAM app on phantoms with a trained smoke model: pointing game, masks, groups."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumo_tf.core import atomic_files
from pneumo_tf.explain import anatomy, cam
from pneumo_tf.explain import grids as gc


# ---------------------------------------------------------------------------------------------
# On phantoms with a trained smoke model


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    from support_runs import make_run

    from pneumo_tf.data import convert, phantoms

    root = tmp_path_factory.mktemp("gradcam")
    # Focal (bacterial) lesions only: the pointing game asks whether the map's peak falls on a
    # compact lesion; a diffuse viral pattern covers most of both lungs.
    phantoms.write_phantom_dataset(root / "src", num_train=200, num_test=40, seed=0,
                                   min_size=96, max_size=128, bacteria_fraction=1.0)
    convert.convert_dataset(root / "src", root / "data", image_size=96, crop="fixed", workers=1,
                            progress=False)
    # Hit rates measured with this recipe over training seeds 0-4: 0.53, 0.40, 0.40, 0.70, 0.70
    # (chance 0.05); 10 epochs gave 0.20-0.63, too close to the asserted 0.2. The shared 64-px
    # classifier of `phantom_lungs` cannot stand in for this run: its hit rates over the same
    # seeds were 0.33, 0.17, 0.10, 0.30, 0.40 (chance 0.03).
    run = make_run(root / "run", root / "data", epochs=14, learning_rate=2e-3)
    return root, root / "data", run


@pytest.mark.slow
def test_pointing_game_on_phantoms_beats_chance(phantom_run):
    import tensorflow as tf

    root, data, run = phantom_run
    stats = gc.run_gradcam(run, data, "test", num_images=40, batch_size=16)
    saved = json.loads((run / "gradcam" / "cam_stats.json").read_text())
    assert saved["groups"] == json.loads(json.dumps(stats["groups"]))
    assert stats["region_source"] == ["phantom_masks"]
    assert stats["layer"] == "b1_out" and stats["num_images"] == 40
    # Converted without --masks: the evidence is measured on the phantom set's own masks.
    assert stats["lung_source"] == "phantom_masks"
    overall = stats["groups"]["all"]
    # Pointing game over PNEUMONIA images with a lesion: the CAM peak lands in the lesion far more
    # often than a uniformly random peak would (chance = mean lesion area fraction, ~5 %).
    assert overall["pointing_n"] >= 20
    # Empty maps stay in the game as misses: every lesion image is counted.
    lesion_images = [e for e in stats["images"] if "pointing_hit" in e]
    assert overall["pointing_n"] == len(lesion_images)
    assert overall["pointing_empty"] == sum(e["cam_empty"] for e in lesion_images)
    assert overall["pointing_hit_rate"] >= max(0.2, 3 * overall["pointing_chance"]), overall
    for g in cam.GROUPS:
        if stats["groups"][g]["n"]:
            assert (run / "gradcam" / f"{g}.png").is_file(), g
    tags = []
    for path in (run / "tb" / "gradcam").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            tags += [(v.tag, v.metadata.plugin_data.plugin_name) for v in ev.summary.value]
    # One grid image per group (a handful of tags), not one per tile.
    groups_present = [g for g in cam.GROUPS if stats["groups"][g]["n"]]
    images = [t for t in tags if t[1] == "images"]
    assert sorted(images) == sorted((f"test/{g}", "images") for g in groups_present)
    assert ("test/lung_evidence/all/lift", "scalars") in tags


@pytest.mark.slow
def test_phantom_masks_align_with_stored_images(phantom_run):
    """Lung masks cropped/resized like their image cover its dark lung fields."""
    from pneumo_tf.evaluation import scoring

    root, data, run = phantom_run
    boxes = cam.read_crop_boxes(data, "test")
    batch = next(scoring.iterate_split(data, "test", batch_size=8))
    for img, path in zip(batch["image"], batch["path"]):
        reg = cam.image_regions(img[..., 0], path, boxes[path], str((root / "src").resolve()))
        assert reg["source"] == "phantom_masks"
        gray = img[..., 0].astype(float)
        assert gray[reg["lung"]].mean() + 15 < gray[~reg["lung"]].mean(), path


@pytest.mark.slow
def test_groups_use_threshold_on_the_quantity_it_was_chosen_on(tiny_run, tmp_path):
    """calibration.json's threshold on the calibrated probability becomes a raw-probability cut."""
    from pneumo_tf.evaluation import calibration
    from pneumo_tf.core import rundir
    from pneumo_tf.evaluation import scoring

    run, data = Path(shutil.copytree(tiny_run[0], tmp_path / "run")), tiny_run[1]
    probs = np.sort(scoring.predict_split(rundir.load_model(run), data, "test")["probability"])
    cals = calibration.apply_temperature(probs, 2.0)
    cut = float(cals[len(cals) // 2 - 1: len(cals) // 2 + 1].mean())  # between two test images
    cal = {"temperature": 2.0, "threshold": cut, "threshold_method": "val_youden",
           "threshold_applies_to": "calibrated_probability", "source": "val"}
    atomic_files.write_json_atomic(run / "calibration.json", cal)
    stats = gc.run_gradcam(run, data, "test", num_images=12, batch_size=8)
    raw = calibration.raw_threshold(cal)
    assert stats["threshold"] == pytest.approx(raw) and raw != pytest.approx(cut)
    assert stats["num_images"] == 12
    for e in stats["images"]:
        predicted = e["group"] in ("TP", "FP")
        assert predicted == (e["probability"] >= raw), e
        assert e["label"] == int(e["group"] in ("TP", "FN"))


@pytest.mark.slow
def test_another_data_dir_goes_beside_the_runs_own_maps(tiny_run, tmp_path):
    """gradcam on another data dir writes R/gradcam/<split>-<data dir name>/ and tags its
    TensorBoard images with that name; the run's own R/gradcam/ is left alone."""
    import tensorflow as tf
    from conftest import write_tiny_dataset

    from pneumo_tf.core import rundir

    site = write_tiny_dataset(tmp_path / "site_b", image_size=32, counts={"test": (8, 8)},
                              seed=3, brightness_offset=40)
    run, data = Path(shutil.copytree(tiny_run[0], tmp_path / "run")), tiny_run[1]
    own = gc.run_gradcam(run, data, "test", num_images=8, batch_size=8)
    own_bytes = (run / "gradcam" / "cam_stats.json").read_bytes()
    other = gc.run_gradcam(run, site, "test", num_images=12, batch_size=8)
    assert own["evaluation"] == "test" and other["evaluation"] == "test-site_b"
    out = run / "gradcam" / "test-site_b"
    assert rundir.gradcam_dir(run, site, "test") == out
    assert rundir.gradcam_dir(run, data, "test") == run / "gradcam"
    assert json.loads((out / "cam_stats.json").read_text())["num_images"] == 12
    assert (run / "gradcam" / "cam_stats.json").read_bytes() == own_bytes
    assert any((out / f"{g}.png").is_file() for g in cam.GROUPS)
    tags = set()
    for path in (run / "tb" / "gradcam").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            tags |= {v.tag for v in ev.summary.value}
    assert {t.split("/")[0] for t in tags} == {"test", "test-site_b"}
    assert {t for t in tags if t.startswith("test-site_b/") and "/lung_evidence/" not in t} == {
        f"test-site_b/{g}" for g in cam.GROUPS if other["groups"][g]["n"]}
    # The lung evidence scalars carry the evaluation's name too.
    assert {f"test/lung_evidence/{key}" for key in anatomy.scalars(own["lung_evidence"])} \
        | {f"test-site_b/lung_evidence/{key}" for key in anatomy.scalars(other["lung_evidence"])} \
        == {t for t in tags if "/lung_evidence/" in t}


@pytest.mark.slow
def test_subtype_runs_explain_bacterial_and_viral(subtype_run, tmp_path):
    import shutil

    run, data = subtype_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for cam_class in ("pneumonia", "bacterial", "viral"):
        stats = gc.run_gradcam(copy, data, "val", num_images=8, batch_size=4,
                               cam_class=cam_class)
        assert stats["cam_class"] == cam_class and stats["num_images"] == 8
        # The probability shown is P(pneumonia) = 1 - p(NORMAL) whatever is explained.
        assert all(0 <= e["probability"] <= 1 for e in stats["images"])
    saved = json.loads((copy / "gradcam" / "cam_stats.json").read_text())
    assert saved["cam_class"] == "viral"


@pytest.mark.slow
def test_bacterial_on_a_binary_run_is_refused(tiny_run, tmp_path):
    run, data = Path(shutil.copytree(tiny_run[0], tmp_path / "run")), tiny_run[1]
    with pytest.raises(ValueError, match="--cam_class=bacterial needs a three-class run"):
        gc.run_gradcam(run, data, "test", num_images=4, cam_class="bacterial")


# ---------------------------------------------------------------------------------------------
# Evidence measured on anatomy (phantoms converted with their lung masks, a tiny lung model)


def _copy(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.slow
def test_evidence_of_lesions_inside_the_lungs_is_lung_bound(phantom_lungs, tmp_path):
    """Phantom lesions lie inside the lungs: the CAM of the pneumonia the classifier finds is
    more lung-bound than a flat map, measured on the records' true lung masks."""
    import tensorflow as tf

    run = _copy(phantom_lungs["run"], tmp_path)
    stats = gc.run_gradcam(run, phantom_lungs["data"], "test", num_images=40, batch_size=16)
    assert stats["lung_source"] == "records" and stats["layer"] == "b1_out"
    lungs = stats["lung_evidence"]
    assert lungs["lung_source"] == "records" and lungs["warnings"] == []
    assert lungs["num_images"] == 40 and lungs["drawn_from"] == 40
    assert lungs["skipped_no_mask"] == 0 and lungs["groups"]["all"]["n"] == 40
    tp = lungs["groups"]["TP"]
    # Measured 1.29-1.58 over five seeds (support_runs.make_phantom_lungs); a flat map gives 1.
    assert tp["n"] >= 10 and tp["lift"] > 1.0, tp
    assert tp["lift"] == pytest.approx(tp["lung_share"] / tp["lung_fraction"])
    assert tp["pointing_lungs"] > tp["lung_fraction"]  # the peak: more often in than by chance
    # Per image: the records' masks; the older region share stays (phantom masks here).
    for e in stats["images"]:
        assert e["has_lung_mask"] and 0 <= e["lung_share"] <= 1 and 0 < e["lung_fraction"] < 1
        assert e["region_source"] == "phantom_masks" and "lung_mask_share" in e
    assert set(lungs["secondary"]) == {"lung_mask_share"}
    tags = set()
    for path in (run / "tb" / "gradcam").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(path)):
            tags |= {v.tag for v in ev.summary.value}
    assert {"test/lung_evidence/TP/lift", "test/lung_evidence/all/pointing_lungs"} <= tags


def test_tiles_outline_the_lungs_measured_against():
    """A tile gets the contour of its lung mask (cam.draw_lung_outline), none without a mask."""
    lungs = np.zeros((1, 16, 16), bool)
    lungs[0, 4:12, 3:8] = True
    sample = anatomy.Sample(np.array([0]), np.zeros((1, 16, 16), np.float32), np.array([0.9]),
                            np.array([1]), lungs, np.array([True]),
                            {"per_image": [{"lung_share": float("nan"), "lung_fraction": 0.16,
                                            "pointing_lungs": False, "cam_empty": True}]},
                            [("lung_box_share", float("nan"))])

    class Regions:
        def regions(self, gray, path):
            return {"lung": np.ones((16, 16), bool), "lesion": None, "source": "adaptive_box"}

    pred = {"path": np.array(["a.png"], object), "label": np.array([1])}
    images = np.full((1, 16, 16, 1), 100, np.uint8)
    entries, tiles = gc._entries(sample, Regions(), pred, images)
    tile = tiles["TP"][0][0]
    drawn = (tile == 255).all(axis=-1)
    assert drawn.any() and drawn[lungs[0]].sum() == drawn.sum()  # only on the mask's border
    assert entries[0]["has_lung_mask"] and entries[0]["pointing_lungs"] is False
    sample.evidence["per_image"] = [None]
    entries, tiles = gc._entries(sample, Regions(), pred, images)
    assert not (tiles["TP"][0][0] == 255).all(axis=-1).any()
    assert entries[0]["lung_share"] is None and not entries[0]["has_lung_mask"]


@pytest.mark.slow
def test_gradcam_cli_measures_on_a_lung_model_and_leads_with_the_lift(phantom_lungs, tmp_path):
    from conftest import run_command

    run = _copy(phantom_lungs["run"], tmp_path)
    done = run_command("pneumo_tf.gradcam", f"--run_dir={run}",
                      f"--data_dir={phantom_lungs['plain']}", "--split=test", "--num_images=40",
                      "--batch_size=16", f"--lung_model={phantom_lungs['lungs']}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("40 images, layer b1_out: lift "), done.stdout
    assert "(lungs: lung_model, 40 images measured); lung mask share " in done.stdout
    # "plain" is another conversion than the run's data: its maps go beside the run's own.
    assert done.stdout.rstrip().endswith(f" -> {run / 'gradcam' / 'test-plain'}"), done.stdout
    stats = json.loads((run / "gradcam" / "test-plain" / "cam_stats.json").read_text())
    assert stats["lung_source"] == "lung_model" and stats["evaluation"] == "test-plain"
    assert stats["lung_evidence"]["lung_model"] == str(phantom_lungs["lungs"])
    # The tiny lung model's masks (Dice ~0.95) give nearly the true masks' figures.
    true = gc.run_gradcam(_copy(phantom_lungs["run"], tmp_path / "b"), phantom_lungs["data"],
                          "test", num_images=40, batch_size=16)
    for g in ("TP", "all"):
        assert stats["lung_evidence"]["groups"][g]["lift"] == pytest.approx(
            true["lung_evidence"]["groups"][g]["lift"], abs=0.15)


@pytest.mark.slow
def test_gradcam_cli_refuses_a_classifier_as_lung_model(phantom_lungs, tmp_path):
    from conftest import run_command

    run = _copy(phantom_lungs["run"], tmp_path)
    done = run_command("pneumo_tf.gradcam", f"--run_dir={run}",
                      f"--data_dir={phantom_lungs['plain']}", "--split=test", "--num_images=4",
                      f"--lung_model={phantom_lungs['run']}")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"pneumo_tf.gradcam: error: --lung_model={phantom_lungs['run']}: a run of "
                    f"--task=binary, not a lung model; train one with `python -m pneumo_tf.train "
                    f"--flagfile=configs/lungs.cfg`"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (run / "gradcam").exists()
