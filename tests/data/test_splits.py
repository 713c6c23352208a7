"""Tests for pneumo_tf.data.splits: patient-grouped stratified carve, duplicates, overlaps."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pneumo_tf.data import splits


def _kaggle_like_pool(rng: np.random.Generator, n_patients: int = 400):
    """Keys/labels/patients like the Kaggle train split: 1-4 images per patient, ~74 % PNEUMONIA,
    a few patients with images of both classes."""
    keys, labels, patients = [], [], []
    for p in range(n_patients):
        label = int(rng.random() < 0.74)
        for j in range(int(rng.integers(1, 5))):
            y = label if rng.random() > 0.05 else 1 - label  # 5 %: mixed-class patients
            keys.append(f"{'PNEUMONIA' if y else 'NORMAL'}/person{p}_{j}.jpeg")
            labels.append(y)
            patients.append(f"person{p}")
    return keys, labels, patients


def test_carve_hits_fraction_per_class_and_keeps_patients_whole():
    keys, labels, patients = _kaggle_like_pool(np.random.default_rng(1))
    assigned = splits.assign_splits([None] * len(keys), labels, patients, keys,
                                    val_fraction=0.2, seed=0)
    for c in (0, 1):
        total = sum(1 for y in labels if y == c)
        in_val = sum(1 for y, s in zip(labels, assigned) if y == c and s == "val")
        assert abs(in_val / total - 0.2) < 0.02, (c, in_val, total)
    split_of_patient = collections.defaultdict(set)
    for p, s in zip(patients, assigned):
        split_of_patient[p].add(s)
    assert all(len(s) == 1 for s in split_of_patient.values())
    mixed = [p for p in set(patients)
             if len({y for y, q in zip(labels, patients) if q == p}) == 2]
    assert mixed, "the fixture should contain mixed-class patients"
    assert splits.patient_overlap(assigned, patients) == {}


def test_carve_is_seeded():
    keys, labels, patients = _kaggle_like_pool(np.random.default_rng(2), 200)
    a = splits.assign_splits([None] * len(keys), labels, patients, keys, val_fraction=0.2, seed=3)
    b = splits.assign_splits([None] * len(keys), labels, patients, keys, val_fraction=0.2, seed=3)
    c = splits.assign_splits([None] * len(keys), labels, patients, keys, val_fraction=0.2, seed=4)
    assert a == b
    assert a != c


def test_official_test_kept_and_tiny_official_val_joins_train_pool():
    keys = [f"k{i}" for i in range(60)]
    labels = [i % 2 for i in range(60)]
    patients = [f"p{i}" for i in range(60)]
    official = ["test"] * 10 + ["val"] * 4 + ["train"] * 46
    assigned = splits.assign_splits(official, labels, patients, keys, val_fraction=0.25, seed=0)
    assert assigned[:10] == ["test"] * 10
    pool = assigned[10:]
    assert set(pool) == {"train", "val"}
    assert pool.count("val") == 12  # 25 % of the 50-image pool, 6 per class
    kept = splits.assign_splits(official, labels, patients, keys, val_fraction=0.25, seed=0,
                                keep_official_val=True)
    assert kept == official


def test_split_by_image_may_split_a_patient_and_overlap_reports_it():
    keys = [f"k{i}" for i in range(40)]
    labels = [0] * 20 + [1] * 20
    patients = ["same"] * 40
    by_patient = splits.assign_splits([None] * 40, labels, patients, keys, val_fraction=0.2,
                                      seed=0)
    assert set(by_patient) == {"train"}  # one patient cannot be split: it stays in train
    by_image = splits.assign_splits([None] * 40, labels, patients, keys, val_fraction=0.2,
                                    seed=0, split_by="image")
    assert by_image.count("val") == 8
    assert splits.patient_overlap(by_image, patients) == {"train/val": ["same"]}


def test_overlap_between_official_train_and_test_is_reported():
    assigned = ["train", "train", "test", "test", "val"]
    patients = ["a", "b", "b", "c", "c"]
    assert splits.patient_overlap(assigned, patients) == {"train/test": ["b"], "val/test": ["c"]}


def test_zero_val_fraction_and_bad_settings():
    assert splits.carve_validation(["a", "b"], [0, 1], 0.0, 0) == set()
    with pytest.raises(splits.SplitError, match="--val_fraction"):
        splits.carve_validation(["a"], [0], 1.0, 0)
    with pytest.raises(splits.SplitError, match="--split_by"):
        splits.assign_splits([None], [0], ["a"], ["k"], val_fraction=0.2, seed=0, split_by="x")
    with pytest.raises(splits.SplitError, match="unknown split 'holdout'"):
        splits.assign_splits(["holdout"], [0], ["a"], ["k"], val_fraction=0.2, seed=0)


def test_duplicates_byte_and_pixel_groups_and_drop_keeps_first_key():
    keys = ["b.jpeg", "a.jpeg", "c.png", "d.jpeg", "e.jpeg"]
    byte_h = ["X", "X", "Y", "Z", "W"]
    pixel_h = ["P", "P", "P", "Q", None]  # c.png: same pixels as a/b, other bytes
    rep = splits.find_duplicates(keys, byte_h, pixel_h)
    assert rep.byte_identical == [["a.jpeg", "b.jpeg"]]
    assert rep.pixel_identical == [["a.jpeg", "b.jpeg", "c.png"]]
    assert rep.drop == ["b.jpeg", "c.png"]
    assert rep.num_groups == 2
    none = splits.find_duplicates(["a", "b"], ["1", "2"], ["3", "4"])
    assert (none.byte_identical, none.pixel_identical, none.drop) == ([], [], [])


def test_merge_linked_groups_is_union_find():
    groups = ["p1", "p2", "p3", "p4", "p2", "p5"]
    # p3~p1 through images 2/0, p4~p3 through 3/2 (a chain), p5 alone.
    assert splits.merge_linked_groups(groups, [[2, 0], [3, 2]]) == [
        "p1", "p2", "p1", "p1", "p2", "p5"]
    assert splits.merge_linked_groups(groups, []) == groups
    assert splits.merge_linked_groups(groups, [[1, 5]])[4:] == ["p2", "p2"]  # whole patient moves


def test_duplicates_under_different_patients_always_share_a_split():
    keys, labels, patients = _kaggle_like_pool(np.random.default_rng(5), 120)
    # Ten images re-filed under new patient ids (byte- or pixel-identical copies).
    dup_groups = []
    for i in range(10):
        src = i * 7
        keys.append(f"copy/dup{i}.jpeg")
        labels.append(labels[src])
        patients.append(f"other{i}")
        dup_groups.append(sorted([keys[src], keys[-1]]))
    official = [None] * len(keys)
    leaked_without_links = 0
    for seed in range(8):
        linked = splits.assign_splits(official, labels, patients, keys, val_fraction=0.3,
                                      seed=seed, linked_keys=dup_groups)
        plain = splits.assign_splits(official, labels, patients, keys, val_fraction=0.3,
                                     seed=seed)
        split_of = dict(zip(keys, linked))
        assert all(split_of[a] == split_of[b] for a, b in dup_groups), seed
        assert splits.patient_overlap(linked, patients) == {}  # patients still whole
        plain_of = dict(zip(keys, plain))
        leaked_without_links += sum(plain_of[a] != plain_of[b] for a, b in dup_groups)
    assert leaked_without_links > 0  # the fixture does exercise the leak


def test_dedupe_keeps_official_test_then_val_then_train_copy():
    keys = ["a_train.png", "b_val.png", "z_test.png",   # group 1: test copy sorts last
            "c_train.png", "d_val.png",                  # group 2: no test copy
            "e_train.png", "f_train.png",                # group 3: train only
            "x_test.png", "y_test.png", "g_train.png"]   # group 4: two test copies
    official = ["train", "val", "test", "train", "val", None, "train", "test", "test", "train"]
    pixel_h = ["G1", "G1", "G1", "G2", "G2", "G3", "G3", "G4", "G4", "G4"]
    byte_h = [str(i) for i in range(len(keys))]
    rep = splits.find_duplicates(keys, byte_h, pixel_h, official)
    assert rep.drop == ["a_train.png", "b_val.png", "c_train.png", "f_train.png", "g_train.png"]
    # Without official splits, the first by key is kept (the old behaviour for one pool).
    assert "z_test.png" in splits.find_duplicates(keys, byte_h, pixel_h).drop


def test_strata_follow_stratify():
    labels, subtypes = [0, 1, 1, 1, 0], [0, 1, 2, -1, 0]
    assert splits.strata(labels, subtypes, "label") == [0, 1, 1, 1, 0]
    assert splits.strata(labels, subtypes, "subtype") == [0, 1, 2, 3, 0]
    with pytest.raises(splits.SplitError, match="--stratify='patient' is not one of"):
        splits.strata(labels, subtypes, "patient")


def _rare_viral_pool():
    """60 NORMAL, 60 BACTERIAL and 5 VIRAL patients, one image each, plus 3 of unknown subtype."""
    subtypes = [0] * 60 + [1] * 60 + [2] * 5 + [-1] * 3
    labels = [int(s != 0) for s in subtypes]
    keys = [f"k{i}" for i in range(len(subtypes))]
    return keys, labels, subtypes, [f"p{i}" for i in range(len(subtypes))]


def test_subtype_stratified_carve_keeps_each_subtype_in_val():
    keys, labels, subtypes, patients = _rare_viral_pool()
    viral_in_val = {}
    for stratify in ("label", "subtype"):
        strata = splits.strata(labels, subtypes, stratify)
        for seed in range(8):
            assigned = splits.assign_splits([None] * len(keys), strata, patients, keys,
                                            val_fraction=0.2, seed=seed)
            in_val = collections.Counter(s for s, a in zip(subtypes, assigned) if a == "val")
            viral_in_val[stratify, seed] = in_val[2]
            if stratify == "subtype":  # 20 % of each: 12, 12, 1 and 0.6 -> 1
                assert (in_val[0], in_val[1], in_val[2], in_val[-1]) == (12, 12, 1, 1), seed
    # By label, the five viral images are only PNEUMONIA: some seeds carve none into val.
    assert min(viral_in_val["label", seed] for seed in range(8)) == 0
