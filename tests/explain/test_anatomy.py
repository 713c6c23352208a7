"""Where the lungs of the measured images come from, and the evidence measured on them."""

import shutil

import numpy as np
import pytest

from pneumo_tf.explain import anatomy
from pneumo_tf.explain import cam as pcam


def test_crop_mismatch_names_both_crops():
    assert anatomy.crop_mismatch({"crop": "none"}, {"crop": "none"}) is None
    assert anatomy.crop_mismatch({}, {"crop": "fixed"}) is None  # an old run: nothing to compare
    why = anatomy.crop_mismatch({"crop": "none"}, {"crop": "fixed"})
    assert "trained on crop=none films" in why and "images are crop=fixed" in why
    assert "tools/bench_cam_lungs --lung_model" in why


def _section(groups, **extra):
    return {"lung_source": "records", "lung_source_meaning": anatomy.SOURCE_MEANING["records"],
            "lung_model": None, "warnings": [], "layer": "b1_out", "num_images": 4,
            "drawn_from": 10, "groups": groups, "skipped_no_mask": 0, "definition": "d",
            "secondary": {"lung_box_share": 0.6}, **extra}


def test_summary_text_and_scalars_lead_with_lift_and_pointing():
    groups = {g: {"n": 0, "empty_cams": 0} for g in pcam.GROUPS}
    groups["all"] = {"n": 4, "empty_cams": 0, "lung_share": 0.7, "lung_fraction": 0.5,
                     "lift": 1.4, "pointing_lungs": 0.75}
    text = anatomy.summary_text(_section(groups))
    assert text.startswith("lift 1.40 (lung share 0.700 / lung fraction 0.500; 1.0 = a flat "
                           "map), pointing_lungs 0.75 (lungs: records, 4 images measured)")
    assert anatomy.scalars(_section(groups)) == {"all/lift": 1.4, "all/lung_share": 0.7,
                                                 "all/lung_fraction": 0.5,
                                                 "all/pointing_lungs": 0.75}
    assert "not computed: why" in anatomy.summary_text({"skipped": "why"})
    groups["all"] = {"n": 2, "empty_cams": 2, "pointing_lungs": 0.0}
    assert "no image with both a lung mask and a non-empty CAM" in anatomy.summary_text(
        _section(groups))


@pytest.mark.slow
def test_records_films_without_a_mask_are_never_drawn(tmp_path):
    """A records source draws its images among the films that have a mask only."""
    import keras

    from conftest import write_tiny_dataset
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.modeling import model as pmodel

    data = write_tiny_dataset(tmp_path / "data", image_size=32)
    keras.utils.set_random_seed(0)
    model = pmodel.build_model("small_cnn", 32, None)
    pred = scoring.predict_split(model, data, "test", return_images=True)
    n = len(pred["path"])
    has = np.arange(n) % 3 != 0
    lungs = np.zeros((n, 32, 32), bool)
    lungs[:, 8:24, 4:14] = True
    source = anatomy.LungSource("records", str(data), "test", record_masks={
        "lung_mask": lungs, "has_lung_mask": has, "path": pred["path"].copy()})
    threshold = float(np.median(pred["probability"]))
    sample = anatomy.measure_sample(pcam.cam_model_for(model, backbone_name="small_cnn"), pred,
                                    threshold, source, num_images=100, seed=1, batch_size=4)
    assert len(sample.chosen) == has.sum() and has[sample.chosen].all()
    assert sample.evidence["skipped_no_mask"] == 0
    assert sample.evidence["groups"]["all"]["n"] == has.sum()
    np.testing.assert_allclose(sample.evidence["groups"]["all"]["lung_fraction"], 160 / 1024)
    section = anatomy.evidence_section(sample, source, "b1_out", int(has.sum()))
    assert section["lung_source"] == "records" and section["drawn_from"] == has.sum()
    assert set(section["secondary"]) == {"lung_box_share"}  # tiny data: the adaptive box
    # Out of order masks are refused, naming the fix.
    source.record_masks["path"] = source.record_masks["path"][::-1]
    with pytest.raises(ValueError, match="not in the order of its images; re-convert"):
        source.eligible(pred["path"])


@pytest.mark.slow
def test_the_best_lung_source_wins(phantom_lungs, tmp_path):
    from conftest import write_tiny_dataset

    p = phantom_lungs
    records = anatomy.open_lung_source(p["data"], "test")
    assert records.source == "records" and records.record_masks["has_lung_mask"].all()
    # True masks win over a model; the output says the model was not used.
    both = anatomy.open_lung_source(p["data"], "test", lung_model=p["lungs"])
    assert both.source == "records" and both.lung_model is None
    assert both.warnings == [f"--lung_model={p['lungs']} not used: the records of split 'test' "
                             f"carry true lung masks, which win over a model"]
    model = anatomy.open_lung_source(p["plain"], "test", lung_model=str(p["lungs"]))
    assert model.source == "lung_model" and model.warnings == []  # both crop=none
    assert model.describe()["lung_model"] == str(p["lungs"])
    assert anatomy.open_lung_source(p["plain"], "test").source == "phantom_masks"
    tiny = write_tiny_dataset(tmp_path / "tiny", image_size=32, crop="fixed")
    assert anatomy.open_lung_source(tiny, "test").source == "box"
    # A lung model trained on whole films, used on fixed crops: measured, with a warning.
    other_crop = anatomy.open_lung_source(tiny, "test", lung_model=str(p["lungs"]))
    assert other_crop.source == "lung_model"
    assert other_crop.warnings[0].startswith(f"--lung_model={p['lungs']}: the lung model was "
                                             f"trained on crop=none films but the classifier's "
                                             f"images are crop=fixed")


@pytest.mark.slow
def test_a_lung_model_masks_the_images_the_classifier_sees(phantom_lungs):
    """Its masks of the stored images agree with the records' true masks (phantom Dice ~0.95)."""
    from pneumo_tf.evaluation import metrics as pmetrics
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.core import rundir

    p = phantom_lungs
    pred = scoring.predict_split(rundir.load_model(p["run"]), p["data"], "test",
                                 return_images=True)
    true = anatomy.open_lung_source(p["data"], "test")
    model = anatomy.open_lung_source(p["plain"], "test", lung_model=p["lungs"])
    idx = np.arange(len(pred["path"]))
    lungs, has = model.masks(idx, pred["image"], pred["path"])
    assert lungs.shape == pred["image"].shape[:3] and lungs.dtype == bool and has.all()
    dice = pmetrics.mask_scores(true.masks(idx, pred["image"], pred["path"])[0], lungs)["dice"]
    assert dice.mean() > 0.85, dice.mean()


@pytest.mark.slow
def test_a_wrong_lung_model_is_refused_naming_the_fix(phantom_lungs, tmp_path):
    p = phantom_lungs
    fix = "train one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`"
    with pytest.raises(anatomy.LungModelError) as e:
        anatomy.open_lung_source(p["plain"], "test", lung_model=tmp_path / "nowhere")
    assert str(e.value) == (f"--lung_model={tmp_path / 'nowhere'}: no such directory; pass a "
                            f"lungs run directory ({fix})")
    with pytest.raises(anatomy.LungModelError) as e:  # a classifier run
        anatomy.open_lung_source(p["plain"], "test", lung_model=str(p["run"]))
    assert str(e.value) == (f"--lung_model={p['run']}: a run of --task=binary, not a lung "
                            f"model; {fix}")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(p["lungs"], unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(anatomy.LungModelError, match=r"^--lung_model=.*unfinished: no "
                                                     r"summary\.json, so not a finished run; "
                                                     r"finish training it"):
        anatomy.open_lung_source(p["data"], "test", lung_model=unfinished)
