"""Tests for pneumo_tf/data/phantoms.py: anatomy, masks, confounder, layout, determinism, errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo_tf.data import phantoms
from pneumo_tf.image.preprocess import fixed_crop_box

REPO = Path(__file__).resolve().parents[2]
NORMAL_NAME = re.compile(r"^IM-(\d{4})-(\d{4})\.jpeg$")
PNEUMONIA_NAME = re.compile(r"^person(\d+)_(bacteria|virus)_(\d+)\.jpeg$")

# Small images keep the whole file fast; the anatomy is drawn in fractions of the image.
SMALL = {"min_size": 64, "max_size": 112}


def _box_mask(shape, box) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[box.top:box.bottom, box.left:box.right] = True
    return mask


def _all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> tuple[Path, dict]:
    """A 40 + 12 image set with every PNEUMONIA image tagged and no NORMAL one."""
    out = tmp_path_factory.mktemp("phantoms") / "set"
    summary = phantoms.write_phantom_dataset(out, num_train=40, num_test=12, seed=3,
                                             confounder_rate=1.0, images_per_patient=(1, 4),
                                             **SMALL)
    return out, summary


# ----------------------------------------------------------------------------- single phantoms


@pytest.mark.parametrize("label", [0, 1])
def test_generate_phantom_shapes_and_types(label):
    image, lung, lesion = phantoms.generate_phantom(np.random.default_rng(0), label, (150, 180))
    assert image.shape == lung.shape == lesion.shape == (150, 180)
    assert image.dtype == np.uint8 and lung.dtype == bool and lesion.dtype == bool
    # Two lung fields: two connected components of a sensible size.
    n, _, stats, _ = cv2.connectedComponentsWithStats(lung.astype(np.uint8))
    areas = sorted(stats[1:, cv2.CC_STAT_AREA])
    assert n - 1 == 2, f"expected 2 lung fields, got {n - 1}"
    assert 0.04 < areas[0] / lung.size and sum(areas) / lung.size < 0.45
    assert lesion.any() == bool(label)


def test_default_size_is_in_the_documented_range():
    for seed in range(3):
        image, _, _ = phantoms.generate_phantom(np.random.default_rng(seed), 0)
        h, w = image.shape
        assert phantoms.DEFAULT_MIN_SIZE <= h <= phantoms.DEFAULT_MAX_SIZE
        assert phantoms.DEFAULT_MIN_SIZE <= w <= phantoms.DEFAULT_MAX_SIZE


def test_film_looks_like_a_chest_radiograph():
    """Lungs darker than the mediastinum/spine, background darker than the body."""
    image, lung, _ = phantoms.generate_phantom(np.random.default_rng(5), 0, (300, 340))
    h, w = image.shape
    lung_mean = image[lung].mean()
    centre = image[int(0.3 * h):int(0.6 * h), int(0.47 * w):int(0.53 * w)].mean()  # spine
    corner = image[-int(0.3 * h):, :int(0.03 * w)].mean()  # beside the body, low down
    body_side = image[int(0.5 * h):int(0.6 * h), int(0.13 * w):int(0.16 * w)].mean()  # chest wall
    assert centre - lung_mean > 40, (centre, lung_mean)
    assert body_side - corner > 40, (body_side, corner)
    assert lung_mean - corner > 5, (lung_mean, corner)


def test_lesions_are_inside_lungs_visible_and_mostly_inside_the_crop_box():
    inside_crop, contrast = [], []
    for seed in range(12):
        ph = phantoms.render_phantom(np.random.default_rng(seed), 1, (160, 200))
        assert 1 <= ph.num_lesions <= 2 and ph.subtype == phantoms.BACTERIAL  # the default
        assert ph.lesion_mask.any()
        assert not (ph.lesion_mask & ~ph.lung_mask).any(), "lesion outside the lung mask"
        crop = _box_mask(ph.image.shape, fixed_crop_box(*ph.image.shape))
        inside_crop.append((ph.lesion_mask & crop).sum() / ph.lesion_mask.sum())
        clear_lung = ph.lung_mask & ~cv2.dilate(ph.lesion_mask.astype(np.uint8),
                                                np.ones((9, 9), np.uint8)).astype(bool)
        contrast.append(ph.image[ph.lesion_mask].mean() - ph.image[clear_lung].mean())
    assert np.mean(inside_crop) > 0.85 and min(inside_crop) > 0.5, inside_crop
    # Opacities are clearly brighter than the surrounding lung (gray levels).
    assert min(contrast) > 12 and np.mean(contrast) > 25, contrast


def test_opacity_survives_fixed_crop_and_resize_to_64px():
    """What the classifier sees: the lesion region stays brighter than clear lung at 64 px."""
    from pneumo_tf.image.preprocess import crop_lung_fixed, resize_area

    for seed in range(6):
        ph = phantoms.render_phantom(np.random.default_rng(100 + seed), 1, (400, 440))
        small = resize_area(crop_lung_fixed(ph.image), 64).astype(float)
        lesion = resize_area(crop_lung_fixed(ph.lesion_mask.astype(np.uint8) * 255), 64) > 127
        lung = resize_area(crop_lung_fixed(ph.lung_mask.astype(np.uint8) * 255), 64) > 127
        assert lesion.sum() >= 12, f"seed {seed}: lesion only {lesion.sum()} px at 64 px"
        assert small[lesion].mean() - small[lung & ~lesion].mean() > 12


def _lung_coverage(ph) -> tuple[float, float]:
    """``(lesion fraction of the lungs, smallest lesion fraction of one lung field)``."""
    n, fields = cv2.connectedComponents(ph.lung_mask.astype(np.uint8))
    per_field = [(ph.lesion_mask & (fields == k)).sum() / (fields == k).sum() for k in range(1, n)]
    return ph.lesion_mask.sum() / ph.lung_mask.sum(), min(per_field)


@pytest.mark.parametrize("size", [(160, 200), (500, 430)])  # 500 px: the upsampled path
def test_lesion_masks_separate_bacterial_focal_from_viral_diffuse(size):
    """One statistic, the share of the lungs under the lesion mask, splits the subtypes: focal
    bacterial opacities cover a small part of the lungs, the viral pattern most of both."""
    bacterial, viral = [], []
    for seed in range(10):
        b = phantoms.render_phantom(np.random.default_rng(seed), 1, size,
                                    subtype=phantoms.BACTERIAL)
        v = phantoms.render_phantom(np.random.default_rng(seed), 1, size, subtype=phantoms.VIRAL)
        np.testing.assert_array_equal(b.lung_mask, v.lung_mask)  # the same anatomy
        assert (b.subtype, v.subtype, v.num_lesions) == (1, 2, 2) and 1 <= b.num_lesions <= 2
        for ph in (b, v):
            assert not (ph.lesion_mask & ~ph.lung_mask).any(), "lesion outside the lung mask"
        bacterial.append(_lung_coverage(b))
        viral.append(_lung_coverage(v))
    bacterial, viral = np.array(bacterial), np.array(viral)
    assert bacterial[:, 0].max() < 0.3 < 0.5 < viral[:, 0].min(), (bacterial, viral)
    assert viral[:, 1].min() > 0.3, viral  # both lung fields involved
    assert np.median(bacterial[:, 1]) == 0.0  # usually one lung only


def test_viral_lungs_are_hazier_than_normal_ones():
    """The viral veil raises the lungs towards the mediastinum's brightness."""
    def lung_level(ph) -> float:  # 0: as dark as the background, 1: as bright as the spine
        img = ph.image.astype(float)
        h, w = img.shape
        spine = img[int(0.3 * h):int(0.6 * h), int(0.47 * w):int(0.53 * w)].mean()
        corner = img[-int(0.3 * h):, :int(0.03 * w)].mean()
        return (img[ph.lung_mask].mean() - corner) / (spine - corner)

    normal = [lung_level(phantoms.render_phantom(np.random.default_rng(s), 0, (300, 340)))
              for s in range(12)]
    viral = [lung_level(phantoms.render_phantom(np.random.default_rng(s), 1, (300, 340),
                                                subtype=phantoms.VIRAL)) for s in range(12)]
    assert np.mean(viral) - np.mean(normal) > 0.08, (normal, viral)


def test_subtype_must_fit_the_label():
    with pytest.raises(ValueError, match="subtype 2 does not fit label 0"):
        phantoms.render_phantom(np.random.default_rng(0), 0, (64, 64), subtype=phantoms.VIRAL)
    with pytest.raises(ValueError, match="subtype 0 does not fit label 1"):
        phantoms.render_phantom(np.random.default_rng(0), 1, (64, 64), subtype=0)
    assert phantoms.render_phantom(np.random.default_rng(0), 0, (64, 64), subtype=0).subtype == 0


def test_normal_phantoms_have_no_lesion():
    for seed in range(4):
        ph = phantoms.render_phantom(np.random.default_rng(seed), 0, (96, 96))
        assert ph.num_lesions == 0 and not ph.lesion_mask.any()


def test_confounder_changes_only_a_tag_outside_the_fixed_crop_box():
    for seed in range(8):
        size = (64 + 13 * seed, 90 + 7 * seed)
        plain = phantoms.render_phantom(np.random.default_rng(seed), seed % 2, size)
        tagged = phantoms.render_phantom(np.random.default_rng(seed), seed % 2, size,
                                         confounder=True)
        assert plain.marker_box is None and tagged.marker_box is not None
        box = tagged.marker_box
        changed = plain.image != tagged.image
        assert changed.any()
        assert not (changed & ~_box_mask(size, box)).any(), "pixels changed outside the tag"
        crop = fixed_crop_box(*size)
        overlaps = (box.top < crop.bottom and crop.top < box.bottom
                    and box.left < crop.right and crop.left < box.right)
        assert not overlaps, f"tag {box} overlaps the crop box {crop}"
        assert tagged.image[box.top:box.bottom, box.left:box.right].max() >= 235
        np.testing.assert_array_equal(plain.lesion_mask, tagged.lesion_mask)


def test_bad_label_and_size_are_refused():
    with pytest.raises(ValueError, match="label must be 0"):
        phantoms.generate_phantom(np.random.default_rng(0), 2, (64, 64))
    with pytest.raises(ValueError, match="at least 32 px"):
        phantoms.generate_phantom(np.random.default_rng(0), 0, (16, 64))


# ----------------------------------------------------------------------------- the data set


def test_layout_names_and_patients(phantom_set):
    out, summary = phantom_set
    assert sorted(p.name for p in out.iterdir()) == ["lung_masks", "masks", "phantoms.json",
                                                     "test", "train"]
    patients_of = defaultdict(set)  # patient -> {(split, class)}
    images_of = defaultdict(int)
    image_numbers = []
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((out / split / cls).iterdir())
            assert len(files) == summary["counts"][split][cls]
            for f in files:
                if cls == "NORMAL":
                    m = NORMAL_NAME.match(f.name)
                    assert m, f.name
                    patient = f"IM-{m[1]}"
                else:
                    m = PNEUMONIA_NAME.match(f.name)
                    assert m, f.name
                    patient = f"person{int(m[1])}"
                    image_numbers.append(int(m[3]))
                patients_of[patient].add((split, cls))
                images_of[patient] += 1
    # Split sizes: round(n * 0.74) PNEUMONIA.
    assert summary["counts"]["train"] == {"NORMAL": 10, "PNEUMONIA": 30}
    assert summary["counts"]["test"] == {"NORMAL": 3, "PNEUMONIA": 9}
    # No patient in two classes or splits; several images for some patients, at most 4.
    assert all(len(v) == 1 for v in patients_of.values()), dict(patients_of)
    assert max(images_of.values()) <= 4 and max(images_of.values()) >= 2
    assert sum(v >= 2 for v in images_of.values()) >= 5
    assert len(set(image_numbers)) == len(image_numbers)
    # Numbers for both classes come from one counter: IM-0003 and person3 are never both used.
    numbers = [int(re.search(r"\d+", p)[0]) for p in patients_of]
    assert len(set(numbers)) == len(numbers)
    total_patients = sum(n for s in summary["patients"].values() for n in s.values())
    assert total_patients == len(patients_of)


def test_masks_exist_match_sizes_and_are_consistent(phantom_set):
    out, summary = phantom_set
    records = phantoms.read_phantom_summary(out)["images"]
    assert len(records) == 52
    for rec in records:
        want = 0 if rec["label"] == 0 else 1 if "_bacteria_" in rec["path"] else 2
        assert rec["subtype"] == want, rec["path"]  # the pattern follows the file name
        image = cv2.imread(str(out / rec["path"]), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.ndim == 2, rec["path"]
        assert image.shape == (rec["height"], rec["width"])
        lung_path, lesion_path = phantoms.mask_paths(out, rec["path"])
        assert lung_path.parent == out / "masks" / rec["path"].rsplit("/", 1)[0]
        lung = cv2.imread(str(lung_path), cv2.IMREAD_UNCHANGED)
        lesion = cv2.imread(str(lesion_path), cv2.IMREAD_UNCHANGED)
        assert lung.shape == lesion.shape == image.shape and lung.dtype == np.uint8
        assert set(np.unique(lung)) <= {0, 255} and set(np.unique(lesion)) <= {0, 255}
        assert lung.any()
        assert not ((lesion > 0) & (lung == 0)).any(), f"{rec['path']}: lesion outside lung"
        assert int((lesion > 0).sum()) == rec["lesion_pixels"]
        if rec["label"] == 0:
            assert not lesion.any() and rec["num_lesions"] == 0
        else:
            assert lesion.any() and rec["num_lesions"] >= 1
            coverage = (lesion > 0).sum() / (lung > 0).sum()
            assert coverage > 0.5 if rec["subtype"] == 2 else coverage < 0.3, rec["path"]
    by_subtype = {s: sum(r["subtype"] == s for r in records if r["split"] == "train")
                  for s in (0, 1, 2)}
    assert summary["subtype_counts"]["train"] == dict(zip(("NORMAL", "BACTERIAL", "VIRAL"),
                                                          by_subtype.values()))
    assert by_subtype[1] > 0 and by_subtype[2] > 0
    # Nothing but images in the split folders (the converter reads them).
    assert {p.suffix for p in (out / "train").rglob("*") if p.is_file()} == {".jpeg"}


def test_confounder_rate_tags_pneumonia_only_outside_the_crop(phantom_set):
    out, summary = phantom_set
    assert summary["confounders"]["train"] == {"NORMAL": 0, "PNEUMONIA": 30}
    assert summary["confounders"]["test"] == {"NORMAL": 0, "PNEUMONIA": 9}
    for rec in phantoms.read_phantom_summary(out)["images"]:
        if rec["label"] == 0:
            assert rec["marker_box"] is None
            continue
        top, bottom, left, right = rec["marker_box"]
        crop = fixed_crop_box(rec["height"], rec["width"])
        assert bottom <= crop.top or top >= crop.bottom or right <= crop.left or left >= crop.right
        image = cv2.imread(str(out / rec["path"]), cv2.IMREAD_GRAYSCALE)
        # The bright tag is in the saved JPEG (its text stroke is dark, so use a high quantile).
        assert np.percentile(image[top:bottom, left:right], 60) > 200


def test_partial_confounder_rates(tmp_path):
    summary = phantoms.write_phantom_dataset(tmp_path / "p", num_train=120, num_test=0, seed=1,
                                             confounder_rate=0.5, confounder_normal_rate=0.25,
                                             min_size=40, max_size=48)
    tagged = summary["confounders"]["train"]
    counts = summary["counts"]["train"]
    assert counts == {"NORMAL": 31, "PNEUMONIA": 89}
    # Binomial draws: 0.5 * 89 and 0.25 * 31, well inside +-4 standard deviations.
    assert 26 <= tagged["PNEUMONIA"] <= 63 and 1 <= tagged["NORMAL"] <= 16
    assert tagged["PNEUMONIA"] / 89 > tagged["NORMAL"] / 31


def test_same_seed_gives_byte_identical_files(tmp_path):
    kwargs = dict(num_train=10, num_test=4, confounder_rate=0.5, **SMALL)
    phantoms.write_phantom_dataset(tmp_path / "a", seed=7, **kwargs)
    phantoms.write_phantom_dataset(tmp_path / "b", seed=7, **kwargs)
    phantoms.write_phantom_dataset(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_all_files(tmp_path / n) for n in "abc")
    assert len(a) == 14 * 4 + 1  # image, lung and lesion mask, mirrored lung mask; the json
    assert a == b
    jpegs = [k for k in a if k.endswith(".jpeg")]
    assert sum(a[k] != c.get(k) for k in jpegs) == len(jpegs), "another seed must change images"


def test_rerun_replaces_an_earlier_phantom_set(tmp_path):
    out = tmp_path / "set"
    phantoms.write_phantom_dataset(out, num_train=12, num_test=4, seed=0, **SMALL)
    phantoms.write_phantom_dataset(out, num_train=3, num_test=1, seed=0, **SMALL)
    images = [p for p in out.rglob("*.jpeg")]
    masks = [p for p in (out / "masks").rglob("*.png")]
    assert len(images) == 4 and len(masks) == 8
    assert phantoms.read_phantom_summary(out)["params"]["num_train"] == 3


def test_an_interrupted_run_looks_incomplete_and_a_rerun_recovers(tmp_path, monkeypatch):
    out = tmp_path / "set"
    calls = []

    def dying_write_json(path, obj):  # the run is killed just before phantoms.json is written
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(phantoms.atomic_files, "write_json_atomic", dying_write_json)
    with pytest.raises(KeyboardInterrupt):
        phantoms.write_phantom_dataset(out, num_train=6, num_test=2, seed=0, **SMALL)
    monkeypatch.undo()
    assert calls and len(list(out.rglob("*.jpeg"))) == 8
    assert (out / phantoms.IN_PROGRESS).exists() and not (out / "phantoms.json").exists()
    with pytest.raises(ValueError, match="not a complete phantom set"):
        phantoms.read_phantom_summary(out)
    phantoms.write_phantom_dataset(out, num_train=2, num_test=1, seed=0, **SMALL)
    assert len(list(out.rglob("*.jpeg"))) == 3
    assert not (out / phantoms.IN_PROGRESS).exists()


def test_refuses_a_folder_that_is_not_a_phantom_set(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no phantoms.json"):
        phantoms.write_phantom_dataset(out, num_train=2, num_test=0, **SMALL)
    assert (out / "precious.txt").read_text() == "keep me"
    # A phantom set with a stranger inside is refused too (nothing is deleted).
    phantoms.write_phantom_dataset(tmp_path / "set", num_train=2, num_test=0, **SMALL)
    (tmp_path / "set" / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="plus other files"):
        phantoms.write_phantom_dataset(tmp_path / "set", num_train=2, num_test=0, **SMALL)
    assert (tmp_path / "set" / "train").is_dir()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_train=-1), r"--num_train must be a whole number >= 0, got -1"),
    (dict(num_test=-5), r"--num_test must be a whole number >= 0"),
    (dict(num_train=0, num_test=0), r"both 0: nothing to generate"),
    (dict(min_size=700, max_size=500), r"--min_size \(700\) is larger than --max_size \(500\)"),
    (dict(min_size=8), r"--min_size must be >= 32"),
    (dict(confounder_rate=1.5), r"--confounder_rate must be a fraction in \[0, 1\]"),
    (dict(confounder_normal_rate=-0.1), r"--confounder_normal_rate must be a fraction"),
    (dict(pneumonia_fraction=2.0), r"--pneumonia_fraction must be a fraction"),
    (dict(images_per_patient=(3, 2)), r"--images_per_patient must be MIN,MAX"),
    (dict(images_per_patient=(0, 2)), r"--images_per_patient must be MIN,MAX"),
    (dict(site="c"), r"--site='c' is not one of \('a', 'b'\)"),
    (dict(site_b_contrast=0.0), r"--site_b_contrast must be > 0"),
    (dict(site_b_blur=-0.1), r"--site_b_blur must be >= 0"),
    (dict(site_b_exposure=1.5), r"--site_b_exposure must be in \(-1, 1\)"),
    (dict(site_b_pneumonia_fraction=1.2), r"--site_b_pneumonia_fraction must be a fraction"),
    (dict(jpeg_quality=101), r"--jpeg_quality must be in 0-100"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, message):
    args = dict(num_train=4, num_test=0, min_size=64, max_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        phantoms.write_phantom_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists(), "bad arguments must not touch --out"


def test_config_declares_the_flags_and_a_config_or_overrides_write_the_same(tmp_path):
    from absl import flags

    import pneumo_tf.make_phantoms  # noqa: F401  (the command defines the flags on import)
    from pneumo_tf.core import cli

    names = [f.name for f in cli.flag_fields(phantoms.PhantomConfig)]
    assert {"num_train", "num_test", "seed", "images_per_patient", "site", "site_b_exposure",
            "site_b_contrast", "site_b_blur", "site_b_pneumonia_fraction"} <= set(names)
    defaults = phantoms.PhantomConfig()
    for name in names:  # one flag per field, with the field's default
        default = getattr(defaults, name)
        want = [str(v) for v in default] if isinstance(default, tuple) else default
        assert flags.FLAGS[name].default == want, name
    config = phantoms.PhantomConfig(num_train=3, num_test=1, seed=2, **SMALL)
    phantoms.write_phantom_dataset(tmp_path / "config", config)
    phantoms.write_phantom_dataset(tmp_path / "keywords", num_train=3, num_test=1, seed=2, **SMALL)
    assert _all_files(tmp_path / "config") == _all_files(tmp_path / "keywords")
    with pytest.raises(TypeError, match="num_train=..."):
        phantoms.write_phantom_dataset(tmp_path / "positional", 3)


# ----------------------------------------------------------------------------- sites

# Digest of site-a renders made by the code before the site switch existed (commit d623f88):
# site a must keep drawing exactly those films. numpy picks its exp and cos kernels by the CPU's
# vector width, and the AVX-512 and AVX2 kernels differ in the last bit, which moves a few grey
# levels: so the same code has one digest per kernel family (both taken with that commit's
# renders; the AVX2 one on an AMD EPYC without AVX-512).
SITE_A_DIGESTS = {"AVX512": "f79d8766e41f2bde6f5626933122665777560832717dd9f7c3d3c10d161e12ef",
                  "AVX2": "e6571d3c4d3f1fd22300c976122b3ddd62128a11ddd74140c8e43a15f924c95b"}


def _numpy_kernels() -> str:
    """``AVX512`` when numpy runs its AVX-512 kernels here, else ``AVX2``."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return "AVX512" if features.get("AVX512_SKX") else "AVX2"


SITE_A_DIGEST = SITE_A_DIGESTS[_numpy_kernels()]


def _render_digest(**site) -> str:
    digest = hashlib.sha256()
    for seed, label, size, tag in ((0, 0, (96, 120), False), (1, 1, (200, 260), True),
                                   (2, 1, (500, 430), False)):  # 500 px: the upsampled path
        ph = phantoms.render_phantom(np.random.default_rng(seed), label, size, tag, **site)
        for array in (ph.image, ph.lung_mask, ph.lesion_mask):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_site_a_is_unchanged():
    assert _render_digest() == SITE_A_DIGEST
    assert _render_digest(site=phantoms.SITE_A) == SITE_A_DIGEST
    assert phantoms.PhantomConfig().site_look() == phantoms.SITE_A


# NORMAL files (images and masks) of a site-a set written by the code before subtypes (commit
# 8910506): subtype patterns change PNEUMONIA films only.
NORMAL_SET_DIGEST = "48a6b3db195595b2f3b207629f823385f2bb6c011c70905b5ca3b6c47b6ac909"


def test_normal_files_of_a_set_are_unchanged_by_subtypes(tmp_path):
    out = tmp_path / "set"
    phantoms.write_phantom_dataset(out, num_train=16, num_test=6, seed=5, min_size=64,
                                   max_size=112)
    digest = hashlib.sha256()
    files = sorted(p for p in out.rglob("*") if p.is_file() and "NORMAL" in p.parts
                   and phantoms.LUNG_MASKS_DIR not in p.parts)  # the mirrored copies came later
    for p in files:
        digest.update(str(p.relative_to(out)).encode())
        digest.update(p.read_bytes())
    assert len(files) == 18 and digest.hexdigest() == NORMAL_SET_DIGEST


def _laplacian_variance(image: np.ndarray) -> float:
    return float(cv2.Laplacian(image.astype(np.float64), cv2.CV_64F).var())


def test_site_b_films_are_darker_flatter_and_blurrier():
    site_b = phantoms.PhantomConfig(site="b").site_look()
    assert site_b == phantoms.SiteLook(exposure=-0.1, contrast=0.75, blur=0.005)
    for seed in range(4):
        # The same random state: the same anatomy and masks, only the look differs.
        a = phantoms.render_phantom(np.random.default_rng(seed), seed % 2, (300, 340))
        b = phantoms.render_phantom(np.random.default_rng(seed), seed % 2, (300, 340), site=site_b)
        np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
        np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
        mean_a, mean_b = a.image.mean(), b.image.mean()
        assert mean_a - mean_b > 15, (seed, mean_a, mean_b)  # -0.1 of full scale: ~25 levels
        lung_a = a.image[a.lung_mask].mean()
        body_a = a.image[~a.lung_mask].mean()
        lung_b, body_b = b.image[b.lung_mask].mean(), b.image[~b.lung_mask].mean()
        assert abs(body_b - lung_b) < 0.85 * abs(body_a - lung_a), seed  # contrast 0.75
        assert b.image.std() < 0.85 * a.image.std(), seed
        assert _laplacian_variance(b.image) < 0.3 * _laplacian_variance(a.image), seed


def test_site_b_set_records_its_site_prevalence_and_other_patients(tmp_path):
    a = phantoms.write_phantom_dataset(tmp_path / "a", num_train=20, num_test=8, seed=4, **SMALL)
    b = phantoms.write_phantom_dataset(tmp_path / "b", num_train=20, num_test=8, seed=4,
                                       site="b", **SMALL)
    assert a["site"] == {"name": "a", "exposure": 0.0, "contrast": 1.0, "blur": 0.0,
                         "pneumonia_fraction": 0.74}
    assert b["site"] == {"name": "b", "exposure": -0.1, "contrast": 0.75, "blur": 0.005,
                         "pneumonia_fraction": 0.5}
    assert phantoms.read_phantom_summary(tmp_path / "b")["site"]["name"] == "b"
    assert b["params"]["site"] == "b" and b["params"]["site_b_contrast"] == 0.75
    assert a["counts"]["train"] == {"NORMAL": 5, "PNEUMONIA": 15}  # round(20 * 0.74)
    assert b["counts"]["train"] == {"NORMAL": 10, "PNEUMONIA": 10}  # round(20 * 0.5)
    # Other random streams: no film of site b repeats one of site a.
    images_a = {v for k, v in _all_files(tmp_path / "a").items() if k.endswith(".jpeg")}
    images_b = {v for k, v in _all_files(tmp_path / "b").items() if k.endswith(".jpeg")}
    assert len(images_b) == 28 and not images_a & images_b
    # A site-a set written with site="a" spelled out is the default set, byte for byte.
    phantoms.write_phantom_dataset(tmp_path / "a2", num_train=20, num_test=8, seed=4, site="a",
                                   **SMALL)
    assert _all_files(tmp_path / "a2") == _all_files(tmp_path / "a")


# ----------------------------------------------------------------------------- command line


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_phantoms"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_cli_writes_a_set_and_rejects_bad_flags(tmp_path):
    out = tmp_path / "cli"
    ok = _run_tool(f"--out={out}", "--num_train=6", "--num_test=2", "--min_size=48",
                   "--max_size=64", "--confounder_rate=1", "--images_per_patient=2,2", "--seed=4")
    assert ok.returncode == 0, ok.stderr
    assert str(out) in ok.stdout
    summary = json.loads((out / "phantoms.json").read_text())
    assert summary["params"]["images_per_patient"] == [2, 2] and summary["seed"] == 4
    assert summary["counts"]["train"] == {"NORMAL": 2, "PNEUMONIA": 4}
    assert summary["patients"]["train"] == {"NORMAL": 1, "PNEUMONIA": 2}

    bad = _run_tool(f"--out={tmp_path / 'bad'}", "--min_size=700", "--max_size=500")
    assert bad.returncode != 0
    assert "--min_size (700) is larger than --max_size (500)" in bad.stderr
    missing = _run_tool("--num_train=2")
    assert missing.returncode != 0 and "--out is required" in missing.stderr
    garbled = _run_tool(f"--out={tmp_path / 'g'}", "--images_per_patient=a,b")
    assert garbled.returncode != 0 and "two integers MIN,MAX" in garbled.stderr
    helpfull = _run_tool("--helpfull")
    for flag in ("--num_train", "--num_test", "--confounder_rate", "--min_size", "--max_size",
                 "--pneumonia_fraction", "--images_per_patient", "--out", "--seed"):
        assert flag in helpfull.stdout + helpfull.stderr, flag
    for flag in ("--site", "--site_b_exposure", "--site_b_contrast", "--site_b_blur",
                 "--site_b_pneumonia_fraction", "--jpeg_quality"):
        assert flag in helpfull.stdout, flag
    site_b = _run_tool(f"--out={tmp_path / 'b'}", "--num_train=4", "--num_test=0",
                       "--min_size=48", "--max_size=64", "--site=b", "--site_b_contrast=0.5")
    assert site_b.returncode == 0, site_b.stderr
    summary = json.loads((tmp_path / "b" / "phantoms.json").read_text())
    assert summary["site"]["name"] == "b" and summary["site"]["contrast"] == 0.5
    assert bad.stderr.strip().splitlines()[-1].startswith("pneumo_tf.data.phantoms: error: ")


def test_mirrored_lung_masks_equal_the_lung_masks(tmp_path):
    out = tmp_path / "set"
    summary = phantoms.write_phantom_dataset(out, num_train=6, num_test=2, seed=3, **SMALL)
    assert summary["layout"]["lung_masks"] == "lung_masks/{split}/{CLASS}/{stem}.png"
    images = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpeg"))
    mirrored = sorted(p.relative_to(out / phantoms.LUNG_MASKS_DIR).as_posix()
                      for p in (out / phantoms.LUNG_MASKS_DIR).rglob("*.png"))
    assert mirrored == [str(Path(p).with_suffix(".png")) for p in images] and len(images) == 8
    for rel in images:
        lung, _ = phantoms.mask_paths(out, rel)
        path = phantoms.lung_mask_path(out, rel)
        assert path.read_bytes() == lung.read_bytes()
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == cv2.imread(str(out / rel), cv2.IMREAD_GRAYSCALE).shape
        assert set(np.unique(mask)) == {0, 255}
