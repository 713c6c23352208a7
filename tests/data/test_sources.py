"""Tests for pneumo_tf.data.sources: folder, CSV and MedMNIST sources built by the tests."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pneumo_tf.data import sources
from pneumo_tf.data.sources import SourceError, discover, patient_id_from_name


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name,expected", [
    ("person1234_bacteria_4567.jpeg", "person1234"),
    ("person7_virus_13.jpeg", "person7"),
    ("IM-0123-0001.jpeg", "IM-0123"),
    ("NORMAL2-IM-0456-0001.jpeg", "NORMAL2-IM-0456"),
    ("train/NORMAL/IM-0117-0001.jpeg", "IM-0117"),
    ("scan_7.png", "scan_7"),
    ("study.v2.dcm", "study.v2"),
    ("IM-0001.jpeg", "IM-0001"),   # no image number: the stem
])
def test_patient_id_from_name(name, expected):
    assert patient_id_from_name(name) == expected


@pytest.mark.parametrize("name,label,expected", [
    ("person1234_bacteria_4567.jpeg", 1, 1),
    ("train/PNEUMONIA/person7_virus_13.jpeg", 1, 2),
    ("PERSON7_VIRUS_13.JPEG", 1, 2),              # any case
    ("x/bacteria/scan-viral.png", 1, 2),          # only the file's own name counts
    ("case_bacterial.dcm", 1, 1),
    ("scan_7.png", 1, -1),                        # says neither: unknown
    ("person3_bacteria_virus_1.jpeg", 1, -1),     # says both: unknown
    ("virusless_9.png", 1, -1),                   # a word, not a part of one
    ("person9_bacteria_1.jpeg", 0, 0),            # NORMAL whatever its name
    ("IM-0001-0001.jpeg", 0, 0),
])
def test_subtype_from_name(name, label, expected):
    assert sources.subtype_from_name(name, label) == expected


# ---------------------------------------------------------------------------------------------
# Folder layout


def test_kaggle_folder_layout(tmp_path):
    src = tmp_path / "chest_xray"
    touch(src / "train/NORMAL/IM-0001-0001.jpeg")
    touch(src / "train/NORMAL/NORMAL2-IM-0002-0001.jpeg")
    touch(src / "train/NORMAL/.DS_Store")
    touch(src / "train/PNEUMONIA/person1_bacteria_1.jpeg")
    touch(src / "train/PNEUMONIA/person1_bacteria_2.jpeg")
    touch(src / "train/COVID/a.jpeg")          # unknown class folder: each file rejected
    touch(src / "train/COVID/deeper/b.jpeg")
    touch(src / "train/notes.txt")             # loose file in a split folder
    touch(src / "test/normal/IM-0003-0001.jpeg")  # class names match case-insensitively
    (src / "test/PNEUMONIA").mkdir(parents=True)  # empty class folder: reported
    (src / "val").mkdir()                       # empty split folder: reported
    touch(src / "masks/IM-0001-0001_mask.png")  # unknown top-level folder: ignored
    touch(src / "__MACOSX/train/NORMAL/._IM-0001-0001.jpeg")
    touch(src / "PROVENANCE.md")                # top-level files: ignored

    listing = discover(str(src))
    assert (listing.kind, listing.root, listing.default_crop) == ("folder", str(src), "fixed")
    assert [(i.key, i.label, i.patient_id, i.split) for i in listing.items] == [
        ("test/normal/IM-0003-0001.jpeg", 0, "IM-0003", "test"),
        ("train/NORMAL/IM-0001-0001.jpeg", 0, "IM-0001", "train"),
        ("train/NORMAL/NORMAL2-IM-0002-0001.jpeg", 0, "NORMAL2-IM-0002", "train"),
        ("train/PNEUMONIA/person1_bacteria_1.jpeg", 1, "person1", "train"),
        ("train/PNEUMONIA/person1_bacteria_2.jpeg", 1, "person1", "train"),
    ]
    assert [i.subtype for i in listing.items] == [0, 0, 0, 1, 1]
    assert all(i.path == str(src / i.key) and i.npz is None for i in listing.items)
    assert listing.rejects == [
        {"path": "train/COVID/a.jpeg", "reason": "unknown class folder 'COVID'"},
        {"path": "train/COVID/deeper/b.jpeg", "reason": "unknown class folder 'COVID'"},
        {"path": "train/notes.txt", "reason": "not inside a NORMAL or PNEUMONIA class folder"},
    ]
    assert listing.empty_folders == ["test/PNEUMONIA", "val"]


def test_folder_without_splits_has_split_none(tmp_path):
    touch(tmp_path / "NORMAL/IM-0001-0001.jpeg")
    touch(tmp_path / "PNEUMONIA/sub/person2_virus_5.jpeg")
    listing = discover(str(tmp_path))
    assert [(i.key, i.label, i.split) for i in listing.items] == [
        ("NORMAL/IM-0001-0001.jpeg", 0, None), ("PNEUMONIA/sub/person2_virus_5.jpeg", 1, None)]


def test_validation_folder_alias_maps_to_val(tmp_path):
    touch(tmp_path / "validation/NORMAL/IM-0001-0001.jpeg")
    assert [i.split for i in discover(str(tmp_path)).items] == ["val"]


def test_folder_without_known_layout_names_the_fix(tmp_path):
    touch(tmp_path / "chest_xray/train/NORMAL/IM-0001-0001.jpeg")
    with pytest.raises(SourceError, match=r"no train/val/test or NORMAL/PNEUMONIA folders .*"
                                          r"did you mean --src=.*chest_xray\?"):
        discover(str(tmp_path))


def test_missing_src_and_unknown_kind_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        discover(str(tmp_path / "nope"))
    touch(tmp_path / "data.json", b"{}")
    with pytest.raises(SourceError, match="neither a folder, a .csv manifest nor a MedMNIST"):
        discover(str(tmp_path / "data.json"))
    with pytest.raises(SourceError, match="--download fetches MedMNIST files only"):
        discover(str(tmp_path), download=True)


# ---------------------------------------------------------------------------------------------
# CSV manifest


def test_csv_manifest(tmp_path, monkeypatch):
    images = tmp_path / "images"
    touch(images / "a.png")
    touch(images / "person9_bacteria_1.jpeg")
    touch(images / "c.dcm")
    absolute = touch(tmp_path / "elsewhere/d.png")
    meta = tmp_path / "meta"
    meta.mkdir()
    csv_path = meta / "labels.csv"
    csv_path.write_text(
        "\ufeffPath,Label,patient_id,split,notes\n"               # BOM, mixed case, extra column
        "../images/a.png,NORMAL,P1,train,ok\n"
        "../images/person9_bacteria_1.jpeg,1,,test,\n"           # patient id from the file name
        "../images/c.dcm,pneumonia,P3,,\n"                        # no split
        "../images/a.png,0,P1,train,\n"                           # same file again
        "../images/missing.png,0,P4,train,\n"
        "../images/c.dcm,maybe,P3,,\n"
        "../images/c.dcm,1,P3,holdout,\n"
        ",1,P5,,\n"
        "\n"
        f"{absolute},0,P6,val,\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths resolve against the CSV, not cwd
    listing = discover(str(csv_path))
    assert (listing.kind, listing.root, listing.default_crop) == ("csv", str(csv_path), "fixed")
    assert [(i.key, i.label, i.patient_id, i.split, i.path) for i in listing.items] == [
        ("../images/a.png", 0, "P1", "train", str(images / "a.png")),
        ("../images/c.dcm", 1, "P3", None, str(images / "c.dcm")),
        ("../images/person9_bacteria_1.jpeg", 1, "person9", "test",
         str(images / "person9_bacteria_1.jpeg")),
        (str(absolute), 0, "P6", "val", str(absolute)),
    ]
    by_reason = {r["reason"].split(":")[0]: r for r in listing.rejects}
    assert listing.rejects == sorted(listing.rejects, key=lambda r: r["path"])
    assert by_reason["line 5"] == {"path": "../images/a.png",
                                   "reason": "line 5: same file as line 2"}
    assert by_reason["line 6"]["reason"].startswith("line 6: file not found (")
    assert by_reason["line 7"]["reason"] == (
        "line 7: label 'maybe' is not 0, 1, NORMAL or PNEUMONIA")
    assert by_reason["line 8"]["reason"] == "line 8: split 'holdout' is not train, val or test"
    assert by_reason["line 9"] == {"path": "labels.csv:9", "reason": "line 9: empty path"}
    assert len(listing.rejects) == 5 and listing.empty_folders == []


def test_csv_labels_accept_spreadsheet_floats_and_any_case(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        touch(tmp_path / name)
    path = tmp_path / "m.csv"
    path.write_text("label,path\n1.0,a.png\n0.0,b.png\nNormal,c.png\n0.5,d.png\n")
    listing = discover(str(path))
    assert [(i.key, i.label, i.split) for i in listing.items] == [
        ("a.png", 1, None), ("b.png", 0, None), ("c.png", 0, None)]
    assert [r["reason"] for r in listing.rejects] == [
        "line 5: label '0.5' is not 0, 1, NORMAL or PNEUMONIA"]


def test_csv_subtype_column_overrides_the_name_and_rejects_contradictions(tmp_path):
    for i in range(14):
        touch(tmp_path / f"person{i}_virus_{i}.png")
    touch(tmp_path / "plain.png")
    path = tmp_path / "m.csv"
    path.write_text(
        "path,label,subtype\n"
        "person0_virus_0.png,1,bacterial\n"      # the column beats the name
        "person1_virus_1.png,1,\n"               # empty cell: from the name
        "person2_virus_2.png,1,Bacteria\n"
        "person3_virus_3.png,PNEUMONIA,VIRAL\n"
        "person4_virus_4.png,1,unknown\n"        # explicitly unknown, whatever the name
        "person5_virus_5.png,0,normal\n"
        "person6_virus_6.png,0,Unknown\n"        # NORMAL by its label: subtype 0
        "person7_virus_7.png,1,2\n"
        "person8_virus_8.png,1,-1.0\n"
        "person9_virus_9.png,0,0\n"
        "person10_virus_10.png,0,viral\n"        # contradicts the label
        "person11_virus_11.png,1,normal\n"       # contradicts the label
        "person12_virus_12.png,1,fungal\n"       # not a subtype
        "person13_virus_13.png,0,3\n"            # not a subtype
        "plain.png,1,\n")                        # neither column nor name: unknown
    listing = discover(str(path))
    assert {i.key: i.subtype for i in listing.items} == {
        "person0_virus_0.png": 1, "person1_virus_1.png": 2, "person2_virus_2.png": 1,
        "person3_virus_3.png": 2, "person4_virus_4.png": -1, "person5_virus_5.png": 0,
        "person6_virus_6.png": 0, "person7_virus_7.png": 2, "person8_virus_8.png": -1,
        "person9_virus_9.png": 0, "plain.png": -1}
    assert [r["reason"] for r in listing.rejects] == [
        "line 12: subtype 'viral' contradicts label NORMAL (a NORMAL image is normal); fix the "
        "label or the subtype",
        "line 13: subtype 'normal' contradicts label PNEUMONIA (a PNEUMONIA image is bacterial, "
        "viral or unknown); fix the label or the subtype",
        "line 14: subtype 'fungal' is not normal, bacterial, viral, unknown or 0, 1, 2, -1",
        "line 15: subtype '3' is not normal, bacterial, viral, unknown or 0, 1, 2, -1"]
    # Without the column every subtype comes from the label and the name.
    path.write_text("path,label\nperson0_virus_0.png,1\nperson1_virus_1.png,0\nplain.png,1\n")
    assert [i.subtype for i in discover(str(path)).items] == [2, 0, -1]


def test_csv_without_required_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,class\na.png,1\n")
    with pytest.raises(SourceError, match=r"lacks column\(s\) path, label \(found: file, class\)"):
        discover(str(path))
    path.write_text("")
    with pytest.raises(SourceError, match="the CSV is empty"):
        discover(str(path))


# ---------------------------------------------------------------------------------------------
# MedMNIST


def write_medmnist(path: Path, sizes=(("train", 5), ("val", 2), ("test", 3)), side: int = 28,
                   seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def test_medmnist_npz_keeps_its_splits_and_one_patient_per_image(tmp_path):
    from pneumo_tf.data.decode import decode_item

    path = tmp_path / "pneumoniamnist_64.npz"
    arrays = write_medmnist(path, side=64)
    listing = discover(str(path))
    assert (listing.kind, listing.root, listing.default_crop) == ("medmnist", str(path), "none")
    assert len(listing.items) == 10 and listing.rejects == [] and listing.empty_folders == []
    assert [i.key for i in listing.items] == sorted(i.key for i in listing.items)
    assert len({i.patient_id for i in listing.items}) == 10
    assert {i.subtype for i in listing.items} == {-1}  # MedMNIST says nothing of subtypes
    item = next(i for i in listing.items if i.key == "pneumoniamnist_64.npz/test/2")
    assert (item.split, item.label, item.path, item.npz) == ("test", 0, None,
                                                            (str(path), "test", 2))
    assert {(i.split, i.label) for i in listing.items if i.split == "val"} == {("val", 0),
                                                                                ("val", 1)}
    assert np.array_equal(decode_item(item, target_size=64, crop="none").gray,
                          arrays["test_images"][2])


def test_medmnist_bad_labels_are_rejected_and_bad_arrays_are_errors(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8),
             train_labels=np.array([[0], [2], [1]]))
    listing = discover(str(path))
    assert [i.key for i in listing.items] == ["pneumoniamnist.npz/train/0",
                                              "pneumoniamnist.npz/train/2"]
    assert listing.rejects == [{"path": "pneumoniamnist.npz/train/1",
                                "reason": "label 2 is not 0 or 1"}]
    np.savez(path, x=np.zeros(3))
    with pytest.raises(SourceError, match=r"no MedMNIST arrays \(found keys: x;"):
        discover(str(path))
    np.savez(path, train_images=np.zeros((3, 28, 28), np.float32), train_labels=np.zeros((3, 1)))
    with pytest.raises(SourceError, match=r"train_images is float32 \[3, 28, 28\]; expected uint8"):
        discover(str(path))
    np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(SourceError, match="train_labels has 2 entries but train_images has 3"):
        discover(str(path))


@pytest.fixture
def zenodo(tmp_path, monkeypatch):
    """A local "Zenodo": pneumoniamnist_64.npz served by file:// URL, with its MD5 registered."""
    served = tmp_path / "zenodo/pneumoniamnist_64.npz"
    write_medmnist(served, side=64)
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    url_template = (tmp_path / "zenodo").as_uri() + "/{name}"
    monkeypatch.setattr(sources, "MEDMNIST_URL_TEMPLATE", url_template)
    monkeypatch.setitem(sources.MEDMNIST_MD5, "pneumoniamnist_64.npz", md5)
    monkeypatch.chdir(tmp_path)  # the bare name must not resolve to a local file
    return served


def test_download_verifies_md5_and_caches(zenodo, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    listing = discover("pneumoniamnist_64.npz", download=True, cache_dir=str(cache))
    cached = cache / "pneumoniamnist_64.npz"
    assert listing.root == str(cached) and len(listing.items) == 10
    assert cached.read_bytes() == zenodo.read_bytes()
    assert sorted(os.listdir(cache)) == ["pneumoniamnist_64.npz"]  # no temp file left behind

    def no_network(*args, **kwargs):
        raise AssertionError("the cache hit must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    again = discover("pneumoniamnist_64.npz", download=True, cache_dir=str(cache))
    assert again.root == str(cached) and len(again.items) == 10


def test_download_md5_mismatch_leaves_nothing_in_the_cache(zenodo, tmp_path, monkeypatch):
    monkeypatch.setitem(sources.MEDMNIST_MD5, "pneumoniamnist_64.npz", "0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(SourceError, match=r"has MD5 [0-9a-f]{32}, expected 0{32}; the download "
                                          r"is corrupt.*Nothing was written to the cache"):
        discover("pneumoniamnist_64.npz", download=True, cache_dir=str(cache))
    assert os.listdir(cache) == []


def test_download_replaces_a_corrupt_cached_file(zenodo, tmp_path):
    cache = tmp_path / "cache"
    touch(cache / "pneumoniamnist_64.npz", b"half a download")
    listing = discover("pneumoniamnist_64.npz", download=True, cache_dir=str(cache))
    assert len(listing.items) == 10
    assert (cache / "pneumoniamnist_64.npz").read_bytes() == zenodo.read_bytes()


def test_download_failure_and_unknown_names_are_clear_errors(zenodo, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MEDMNIST_URL_TEMPLATE", (tmp_path / "void").as_uri() + "/{name}")
    cache = tmp_path / "cache"
    with pytest.raises(SourceError, match=r"could not fetch file://.*pneumoniamnist_64.npz .*"
                                          r"pass --src=<path to pneumoniamnist_64.npz>"):
        discover("pneumoniamnist_64.npz", download=True, cache_dir=str(cache))
    assert os.listdir(cache) == []
    with pytest.raises(SourceError, match="unknown MedMNIST file 'chestmnist.npz'"):
        discover("chestmnist.npz", download=True, cache_dir=str(cache))
    with pytest.raises(SourceError, match="pass --download to fetch it from Zenodo"):
        discover("pneumoniamnist_64.npz")


def test_md5_table_lists_the_four_pneumoniamnist_files():
    assert set(sources.MEDMNIST_MD5) == {"pneumoniamnist.npz", "pneumoniamnist_64.npz",
                                         "pneumoniamnist_128.npz", "pneumoniamnist_224.npz"}
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in sources.MEDMNIST_MD5.values())
    assert sources.MEDMNIST_URL_TEMPLATE.format(name="pneumoniamnist_128.npz") == (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1")


def test_symlinked_class_and_split_folders_are_followed(tmp_path):
    """A class folder that is a link to elsewhere (src/test/NORMAL -> elsewhere) is listed."""
    import cv2
    import numpy as np

    elsewhere = tmp_path / "elsewhere"
    for name in ("NORMAL", "PNEUMONIA"):
        (elsewhere / name).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(elsewhere / name / f"person{i}_virus_{i}.png"),
                        np.full((16, 16), 100, np.uint8))
    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    (src / "train").mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        (src / "test" / name).symlink_to(elsewhere / name, target_is_directory=True)
    (src / "train" / "NORMAL").mkdir()
    (src / "train" / "NORMAL" / "loop").symlink_to(src / "train", target_is_directory=True)
    cv2.imwrite(str(src / "train" / "NORMAL" / "IM-0001-0001.png"), np.zeros((16, 16), np.uint8))
    listing = sources.discover(str(src))
    by_split = {}
    for item in listing.items:
        by_split.setdefault(item.split, []).append(item.key)
    assert sorted(by_split["test"]) == ["test/NORMAL/person0_virus_0.png",
                                        "test/NORMAL/person1_virus_1.png",
                                        "test/PNEUMONIA/person0_virus_0.png",
                                        "test/PNEUMONIA/person1_virus_1.png"]
    assert by_split["train"] == ["train/NORMAL/IM-0001-0001.png"]  # the loop is not followed
    assert "test" not in listing.empty_folders
