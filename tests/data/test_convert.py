"""Tests for pneumo_tf.data.convert: source -> shards + manifest, verify, bad input, kills."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumo_tf.image import preprocess
from pneumo_tf.data import convert, decode, records

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


def _film(rng: np.random.Generator, h: int, w: int, label: int) -> np.ndarray:
    """``[h, w] uint8`` radiograph-ish: bright body, two dark lungs, a blob for PNEUMONIA."""
    img = np.full((h, w), 30, np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (int(w * 0.45), int(h * 0.48)), 0, 0, 360, 170, -1)
    for cx in (0.33, 0.67):
        cv2.ellipse(img, (int(w * cx), int(h * 0.5)), (int(w * 0.12), int(h * 0.3)), 0, 0, 360,
                    70, -1)
    if label:
        cv2.circle(img, (int(w * 0.35), int(h * 0.55)), max(3, w // 12), 200, -1)
    noise = rng.normal(0, 6, (h, w))
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_kaggle_source(root: Path, n_train_patients: int = 14, n_test_patients: int = 4,
                        seed: int = 0, shape=(72, 88)) -> dict[str, int]:
    """Kaggle layout with realistic names and 1-3 images per patient; returns images per split.

    PNEUMONIA patients 1, 5, 9, ... (``p % 4 == 1``) are viral, the others bacterial.
    """
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n_pat, first in (("train", n_train_patients, 0), ("test", n_test_patients, 500)):
        n = 0
        for p in range(first, first + n_pat):
            label = p % 3 != 0  # ~2/3 PNEUMONIA, like the real data
            folder = root / split / ("PNEUMONIA" if label else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(1 + p % 3):
                kind = "virus" if p % 4 == 1 else "bacteria"
                name = (f"person{p}_{kind}_{p * 10 + j}.jpeg" if label
                        else f"IM-{p:04d}-{j + 1:04d}.jpeg")
                h = shape[0] + int(rng.integers(0, 9))
                w = shape[1] + int(rng.integers(0, 9))
                cv2.imwrite(str(folder / name), _film(rng, h, w, int(label)))
                n += 1
        counts[split] = n
    return counts


def read_records(out: Path, split: str) -> list[dict]:
    """Every record of a split, in shard order, as plain Python values."""
    import tensorflow as tf

    manifest = records.read_manifest(out)
    paths = [str(p) for p in records.split_shards(out, manifest, split)]
    ds = tf.data.TFRecordDataset(paths, records.tf_compression_type(manifest["compression"]))
    spec = records.feature_spec()
    rows = []
    for raw in ds.as_numpy_iterator():
        ex = tf.io.parse_single_example(raw, spec)
        rows.append({k: (v.numpy().tolist() if v.dtype != tf.string else v.numpy())
                     for k, v in ex.items()})
    return rows


def test_kaggle_layout_counts_splits_and_records(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    n = write_kaggle_source(src)
    m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False)

    assert m["image_size"] == SIZE and m["channels"] == 1 and m["crop"] == "fixed"
    assert m["encoding"] == "raw" and m["rejected"] == 0 and m["duplicates_dropped"] == 0
    sp = m["splits"]
    assert sp["train"]["count"] + sp["val"]["count"] == n["train"]
    assert sp["test"]["count"] == n["test"]
    assert m["patient_overlap"] == {}
    assert m["source"]["kind"] == "folder" and m["source"]["path"] == str(src)
    assert len(m["source"]["checksum"]) == 64
    for name, s in sp.items():
        assert sum(s["class_counts"].values()) == s["count"] == sum(s["shard_counts"])
        assert s["crop_methods"] == {"fixed": s["count"]}
    n0 = sp["train"]["class_counts"]["NORMAL"]
    n1 = sp["train"]["class_counts"]["PNEUMONIA"]
    from sklearn.utils.class_weight import compute_class_weight
    expected = compute_class_weight("balanced", classes=np.array([0, 1]),
                                    y=np.array([0] * n0 + [1] * n1))
    assert m["class_weights"] == pytest.approx({"0": expected[0], "1": expected[1]})
    assert m["version"] == records.MANIFEST_VERSION == 2
    assert json.loads((out / "manifest.json").read_text()) == m
    assert (out / "rejects.jsonl").read_text() == ""

    patients = {}
    for split in ("train", "val", "test"):
        rows = read_records(out, split)
        assert len(rows) == sp[split]["count"]
        assert len({r["patient_id"] for r in rows}) == sp[split]["patients"]
        for r in rows:
            patients.setdefault(r["patient_id"], set()).add(split)
            rel = r["path"].decode()
            assert rel.startswith(f"{'test' if split == 'test' else 'train'}/")
            assert r["label"] == (1 if "/PNEUMONIA/" in rel else 0)
            assert r["subtype"] == (0 if not r["label"] else 1 if "_bacteria_" in rel else 2)
            gray = cv2.imread(str(src / rel), cv2.IMREAD_GRAYSCALE)
            want, box, _ = preprocess.preprocess_gray(gray, SIZE, "fixed")
            got = np.frombuffer(r["image"], np.uint8).reshape(SIZE, SIZE)
            np.testing.assert_array_equal(got, want)
            assert (r["orig_height"], r["orig_width"]) == gray.shape
            assert r["crop_box"] == list(box)
            assert (r["height"], r["width"]) == (SIZE, SIZE)
            assert r["crop_method"] == b"fixed"
        assert sp[split]["subtype_counts"] == records.subtype_counts(r["subtype"] for r in rows)
    assert all(len(s) == 1 for s in patients.values()), "a patient sits in two splits"
    # 14 train patients with 1 + p % 3 images: NORMAL 0, 3, 6, 9, 12 (one image each), viral
    # 1, 5, 13 (2 + 3 + 2 images), the other 6 bacterial.
    pool = {k: sp["train"]["subtype_counts"][k] + sp["val"]["subtype_counts"][k]
            for k in records.SUBTYPE_COUNT_NAMES}
    assert pool == {"NORMAL": 5, "BACTERIAL": 15, "VIRAL": 7, "UNKNOWN": 0}
    sc = sp["train"]["subtype_counts"]
    subtype_y = np.repeat([0, 1, 2], [sc["NORMAL"], sc["BACTERIAL"], sc["VIRAL"]])
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=subtype_y)
    assert m["subtype_class_weights"] == pytest.approx(dict(zip("012", expected)))
    assert convert.verify_data_dir(out) == []
    summary = convert.format_summary(m, out)
    assert "bacterial" in summary and "subtype weights" in summary
    assert "train" in summary and "rejected 0" in summary and len(summary.splitlines()) < 25
    assert "class weights (train, balanced)" in summary
    # A sample of another site (one split, test) has no train split to weigh classes on.
    test_only = dict(m, splits={"test": m["splits"]["val"]})
    assert "weights" not in convert.format_summary(test_only, out)


@pytest.mark.parametrize("encoding,compression", [("raw", "none"), ("png", "gzip")])
def test_same_inputs_and_seed_give_byte_identical_shards(tmp_path, encoding, compression):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=10, n_test_patients=2)
    kw = dict(image_size=SIZE, encoding=encoding, compression=compression, num_shards=2,
              progress=False)
    a = convert.convert_dataset(src, tmp_path / "a", workers=1, **kw)
    b = convert.convert_dataset(src, tmp_path / "b", workers=1, **kw)
    c = convert.convert_dataset(src, tmp_path / "c", workers=1, seed=1, **kw)
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tfrecord*"))
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    assert names and all(n.endswith(suffix) for n in names)
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.tfrecord*"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["splits"] == b["splits"]
    # Another seed: another carve or order, so some train/val shard differs.
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes()
               for n in names if (tmp_path / "c" / n).exists() and not n.startswith("test"))
    assert c["splits"]["test"] == a["splits"]["test"]
    assert convert.verify_data_dir(tmp_path / "a") == []


@pytest.mark.slow
def test_worker_pool_output_equals_single_process(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=12, n_test_patients=3)
    kw = dict(image_size=SIZE, num_shards=2, progress=False, crop="adaptive")
    one = convert.convert_dataset(src, tmp_path / "one", workers=1, **kw)
    two = convert.convert_dataset(src, tmp_path / "two", workers=2, **kw)
    assert one["splits"] == two["splits"]
    assert two["flags"]["workers"] == 2
    for p in (tmp_path / "one").glob("*.tfrecord"):
        assert p.read_bytes() == (tmp_path / "two" / p.name).read_bytes(), p.name
    methods = one["splits"]["train"]["crop_methods"]
    assert set(methods) <= {"adaptive", "adaptive_fallback"}
    assert sum(methods.values()) == one["splits"]["train"]["count"]


def test_workers_never_import_tensorflow(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=1, n_test_patients=0)
    code = (
        "import sys\n"
        "from pneumo_tf.data import convert, sources\n"
        f"items = sources.discover({str(src)!r}).items\n"
        "cfg = convert._WorkerConfig(image_size=16, crop='fixed', encoding='png',\n"
        "                            max_pixels=10**8)\n"
        "r = convert.process_item(0, items[0], cfg)\n"
        "assert r.payload and r.reject_reason is None, r\n"
        "print('tensorflow' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_bad_inputs_are_rejected_and_the_run_completes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    n = write_kaggle_source(src, n_train_patients=8, n_test_patients=2)
    normal = src / "train" / "NORMAL"
    (normal / "IM-9001-0001.jpeg").write_bytes(b"")
    good = cv2.imencode(".jpg", _film(np.random.default_rng(5), 80, 80, 0))[1].tobytes()
    (normal / "IM-9002-0001.jpeg").write_bytes(good[: len(good) // 2])
    (normal / "IM-9003-0001.jpeg").write_text("this is not an image\n")
    (src / "train" / "COVID").mkdir()
    cv2.imwrite(str(src / "train" / "COVID" / "c1.jpeg"),
                _film(np.random.default_rng(6), 80, 80, 1))
    (src / "val" / "NORMAL").mkdir(parents=True)  # an empty folder: reported, not an error
    big = normal / "IM-9004-0001.png"
    cv2.imwrite(str(big), np.zeros((120, 120), np.uint8))

    m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False,
                                max_pixels=100 * 100)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_path = {r["path"]: r["reason"] for r in rejects}
    assert set(by_path) == {"train/NORMAL/IM-9001-0001.jpeg", "train/NORMAL/IM-9002-0001.jpeg",
                            "train/NORMAL/IM-9003-0001.jpeg", "train/COVID/c1.jpeg",
                            "train/NORMAL/IM-9004-0001.png"}
    assert "empty" in by_path["train/NORMAL/IM-9001-0001.jpeg"]
    assert "truncated" in by_path["train/NORMAL/IM-9002-0001.jpeg"]
    assert "COVID" in by_path["train/COVID/c1.jpeg"]
    assert "exceeds" in by_path["train/NORMAL/IM-9004-0001.png"]
    assert m["rejected"] == 5 and sum(m["rejects_by_reason"].values()) == 5
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == n["train"]
    assert m["splits"]["test"]["count"] == n["test"]
    assert any(f.startswith("val") for f in m["empty_folders"])
    assert "rejected 5" in convert.format_summary(m)
    assert convert.verify_data_dir(out) == []


def _copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


def test_duplicates_reported_and_dedupe_drops_them(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=8, n_test_patients=2)
    pn = src / "train" / "PNEUMONIA"
    first = sorted(pn.glob("*.jpeg"))[0]
    _copy(first, pn / "person900_bacteria_1.jpeg")            # byte-identical copy
    gray = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(pn / "person901_bacteria_2.png"), gray)    # same pixels, other bytes
    test_copy = src / "test" / "PNEUMONIA" / "person902_virus_3.jpeg"
    _copy(first, test_copy)                                    # a leak into test

    m = convert.convert_dataset(src, tmp_path / "keep", image_size=SIZE, workers=1,
                                progress=False)
    d = m["duplicates"]
    rel = first.relative_to(src).as_posix()
    assert d["byte_identical"] == [sorted(["test/PNEUMONIA/person902_virus_3.jpeg", rel,
                                           "train/PNEUMONIA/person900_bacteria_1.jpeg"])]
    assert d["pixel_identical_groups"] == 1
    assert "train/PNEUMONIA/person901_bacteria_2.png" in d["pixel_identical"][0]
    assert m["duplicates_dropped"] == 0
    assert d["cross_split_groups"] >= 1  # the test copy leaks into test
    assert "span two splits" in convert.format_summary(m)
    total = sum(s["count"] for s in m["splits"].values())

    dd = convert.convert_dataset(src, tmp_path / "dedupe", image_size=SIZE, workers=1,
                                 progress=False, dedupe=True)
    assert dd["duplicates_dropped"] == 3
    assert dd["duplicates"]["cross_split_groups"] == 0
    assert sum(s["count"] for s in dd["splits"].values()) == total - 3
    keys = {r["path"].decode() for s in dd["splits"] for r in read_records(tmp_path / "dedupe", s)}
    # The official test copy is kept, the train copies dropped.
    assert "test/PNEUMONIA/person902_virus_3.jpeg" in keys
    assert not keys & {rel, "train/PNEUMONIA/person900_bacteria_1.jpeg",
                       "train/PNEUMONIA/person901_bacteria_2.png"}


def _split_of_paths(out: Path, manifest: dict) -> dict[str, str]:
    return {r["path"].decode(): s for s in manifest["splits"] for r in read_records(out, s)}


def test_duplicates_under_other_patient_ids_share_a_split_without_dedupe(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=12, n_test_patients=0)
    groups = []
    for i, first in enumerate(sorted((src / "train").glob("*/*.jpeg"))[::3]):
        # The same film under another patient id: a byte copy and a re-encoded (pixel) copy.
        byte_copy = first.parent / f"person{700 + i}_bacteria_1.jpeg"
        pixel_copy = first.parent / f"person{800 + i}_bacteria_1.png"
        _copy(first, byte_copy)
        cv2.imwrite(str(pixel_copy), cv2.imread(str(first), cv2.IMREAD_GRAYSCALE))
        groups.append([p.relative_to(src).as_posix() for p in (first, byte_copy, pixel_copy)])
    for seed in (0, 1):
        out = tmp_path / f"out{seed}"
        m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False,
                                    val_fraction=0.4, seed=seed)
        assert m["duplicates_dropped"] == 0 and m["splits"]["val"]["count"] > 0
        split_of = _split_of_paths(out, m)
        assert [{split_of[k] for k in g} for g in groups] == [{split_of[g[0]]} for g in groups]
        assert m["duplicates"]["cross_split_groups"] == 0
        assert m["patient_overlap"] == {}


def test_dedupe_keeps_the_official_test_copy_even_when_it_sorts_last(tmp_path):
    rng = np.random.default_rng(3)
    rows = ["path,label,patient_id,split"]
    for i in range(8):
        cv2.imwrite(str(tmp_path / f"m{i}.png"), _film(rng, 64, 64, i % 2))
        rows.append(f"m{i}.png,{i % 2},pat{i},{'test' if i < 2 else 'train'}")
    _copy(tmp_path / "m0.png", tmp_path / "a_train_copy.png")  # sorts before the test copy
    _copy(tmp_path / "m0.png", tmp_path / "b_val_copy.png")
    rows += ["a_train_copy.png,0,patA,train", "b_val_copy.png,0,patB,val"]
    _copy(tmp_path / "m2.png", tmp_path / "a_pool_copy.png")  # train-only group
    rows += ["a_pool_copy.png,0,patC,train"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    m = convert.convert_dataset(tmp_path / "list.csv", out, image_size=SIZE, workers=1,
                                progress=False, dedupe=True, val_fraction=0.3)
    assert m["duplicates"]["dropped"] == ["a_train_copy.png", "b_val_copy.png", "m2.png"]
    split_of = _split_of_paths(out, m)
    assert split_of["m0.png"] == "test" and split_of["m1.png"] == "test"
    assert m["splits"]["test"]["count"] == 2  # the official test split is unchanged
    assert "a_pool_copy.png" in split_of


def test_bad_src_leaves_a_previous_good_output_alone(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=4, n_test_patients=1)
    convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="no such file"):
        convert.convert_dataset(tmp_path / "srx", out, image_size=SIZE, workers=1,
                                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "empty" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(convert.ConvertError, match="lists no image files.*left as it was"):
        convert.convert_dataset(tmp_path / "empty", out, image_size=SIZE, workers=1,
                                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert convert.verify_data_dir(out) == []


def test_spool_is_removed_when_the_conversion_fails(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=4, n_test_patients=1)

    def failing_write_split(*args, **kwargs):
        assert (out / convert.SPOOL_NAME).is_file()  # the spool exists while shards are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "_write_split", failing_write_split)
    with pytest.raises(OSError, match="No space left"):
        convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False)
    assert not (out / convert.SPOOL_NAME).exists()
    assert not (out / records.MANIFEST_NAME).exists()


def test_patient_in_official_train_and_test_is_reported(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=6, n_test_patients=2)
    cv2.imwrite(str(src / "test" / "PNEUMONIA" / "person1_virus_77.jpeg"),
                _film(np.random.default_rng(9), 70, 70, 1))
    m = convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, workers=1, progress=False)
    pairs = m["patient_overlap"]
    assert list(pairs) in (["train/test"], ["val/test"])
    assert next(iter(pairs.values())) == {"count": 1, "ids": ["person1"]}
    assert "person1" in convert.format_summary(m)
    assert convert.verify_data_dir(tmp_path / "out") == []


def test_medmnist_npz_keeps_its_splits_and_defaults_to_no_crop(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, **arrays)
    m = convert.convert_dataset(npz, tmp_path / "out", image_size=28, workers=1, progress=False,
                                encoding="png")
    assert m["crop"] == "none" and m["source"]["kind"] == "medmnist"
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 12, "val": 4, "test": 5}
    assert m["splits"]["train"]["patients"] == 12
    rows = read_records(tmp_path / "out", "val")
    by_index = {int(r["path"].decode().rsplit("/", 1)[1]): r for r in rows}
    for i, r in by_index.items():
        img = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(img, arrays["val_images"][i])  # no crop, no resize
        assert r["label"] == int(arrays["val_labels"][i, 0])
        assert r["subtype"] == -1  # MedMNIST says nothing of subtypes, NORMAL or not
    assert m["splits"]["train"]["subtype_counts"] == {
        "NORMAL": 0, "BACTERIAL": 0, "VIRAL": 0, "UNKNOWN": 12}
    assert m["subtype_class_weights"] == {"0": 1.0, "1": 1.0, "2": 1.0}  # no known subtype
    assert convert.verify_data_dir(tmp_path / "out") == []


def test_csv_source(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["path,label,patient_id,subtype"]
    subtypes = {0: "normal", 1: "viral", 3: "bacterial", 5: "unknown", 7: "2", 9: "Bacteria"}
    for i in range(10):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), _film(rng, 64, 64, i % 2))
        subtype = subtypes.get(i, "")  # NORMAL rows 2-8: empty, so 0 from the label
        rows.append(f"img{i}.png,{'PNEUMONIA' if i % 2 else 'NORMAL'},pat{i // 2},{subtype}")
    cv2.imwrite(str(tmp_path / "odd.png"), _film(rng, 64, 64, 0))
    rows.append("odd.png,NORMAL,pat9,Virus")  # contradicts its label: rejected
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    m = convert.convert_dataset(tmp_path / "list.csv", tmp_path / "out", image_size=SIZE,
                                workers=1, progress=False, val_fraction=0.4)
    assert m["source"]["kind"] == "csv"
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 10
    assert m["splits"]["val"]["patients"] == 2  # 2 of 5 patients, both classes each
    assert m["patient_overlap"] == {}
    pool = {k: m["splits"]["train"]["subtype_counts"][k] + m["splits"]["val"]["subtype_counts"][k]
            for k in records.SUBTYPE_COUNT_NAMES}
    assert pool == {"NORMAL": 5, "BACTERIAL": 2, "VIRAL": 2, "UNKNOWN": 1}
    assert m["rejected"] == 1
    assert json.loads((tmp_path / "out" / "rejects.jsonl").read_text()) == {
        "path": "odd.png", "reason": "line 12: subtype 'Virus' contradicts label NORMAL (a NORMAL "
                                     "image is normal); fix the label or the subtype"}
    assert convert.verify_data_dir(tmp_path / "out") == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratify_subtype_carves_viral_patients_into_val(tmp_path, seed):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=14, n_test_patients=0)
    kw = dict(image_size=SIZE, workers=1, progress=False, seed=seed, num_shards=1)
    m = convert.convert_dataset(src, tmp_path / "subtype", stratify="subtype", **kw)
    assert m["flags"]["stratify"] == "subtype"
    # 7 viral images of 3 patients (2, 3 and 2 images): 20 % is 1.4, nearest a 2-image patient.
    assert m["splits"]["val"]["subtype_counts"]["VIRAL"] == 2
    assert m["patient_overlap"] == {}
    assert convert.verify_data_dir(tmp_path / "subtype") == []


def test_phantom_subtypes_reach_the_records(tmp_path):
    from pneumo_tf.data import phantoms

    summary = phantoms.write_phantom_dataset(tmp_path / "src", num_train=30, num_test=10, seed=2,
                                             min_size=64, max_size=96)
    m = convert.convert_dataset(tmp_path / "src", tmp_path / "out", image_size=SIZE, workers=1,
                                progress=False, stratify="subtype", num_shards=1)
    for split, parts in (("train", ("train", "val")), ("test", ("test",))):
        found = {name: sum(m["splits"][s]["subtype_counts"][name] for s in parts)
                 for name in records.SUBTYPE_COUNT_NAMES}
        assert found == {**summary["subtype_counts"][split], "UNKNOWN": 0}, split
    assert m["splits"]["val"]["subtype_counts"]["VIRAL"] > 0


def test_bad_settings_name_the_flag(tmp_path):
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=1, n_test_patients=0)
    for kw, flag in ((dict(encoding="jpeg"), "--encoding"), (dict(compression="zip"),
                     "--compression"), (dict(crop="lungs"), "--crop"),
                     (dict(val_fraction=1.0), "--val_fraction"), (dict(num_shards=0),
                     "--num_shards"), (dict(split_by="study"), "--split_by"),
                     (dict(stratify="patient"), "--stratify")):
        with pytest.raises(convert.ConvertError, match=flag):
            convert.convert_dataset(src, tmp_path / "out", progress=False, **kw)
    with pytest.raises(ValueError, match="no such file"):
        convert.convert_dataset(tmp_path / "missing", tmp_path / "out", progress=False)


def test_convert_config_declares_the_flags_and_takes_overrides(tmp_path):
    from absl import flags

    import pneumo_tf.convert  # noqa: F401  (the command defines the flags on import)
    from pneumo_tf.core import cli

    names = [f.name for f in cli.flag_fields(convert.ConvertConfig)]
    assert names == ["image_size", "crop", "encoding", "val_fraction", "split_by", "stratify",
                     "seed",
                     "num_shards", "workers", "compression", "max_rejects", "dedupe",
                     "use_official_val", "download", "cache_dir", "max_pixels", "masks",
                     "lung_model", "lung_margin", "min_lung_fraction"]
    defaults = convert.ConvertConfig()
    for name in names:  # one flag per field, with the field's default
        assert flags.FLAGS[name].default == getattr(defaults, name), name
    src = tmp_path / "src"
    write_kaggle_source(src, n_train_patients=4, n_test_patients=1)
    config = convert.ConvertConfig(image_size=SIZE, workers=1, num_shards=1, progress=False)
    a = convert.convert_dataset(src, tmp_path / "a", config)
    b = convert.convert_dataset(src, tmp_path / "b", image_size=SIZE, workers=1, num_shards=1,
                                progress=False)
    assert a["splits"] == b["splits"] and a["flags"]["image_size"] == SIZE
    # Resolved settings are what the manifest records.
    assert a["flags"]["crop"] == "fixed" and a["flags"]["workers"] == 1
    assert convert.convert_dataset(src, tmp_path / "c", config, seed=5)["flags"]["seed"] == 5
    with pytest.raises(TypeError, match="imagesize"):
        convert.convert_dataset(src, tmp_path / "d", config, imagesize=SIZE)
    with pytest.raises(convert.ConvertError, match="--image_size=4 is too small"):
        convert.ConvertConfig(image_size=4).check()


@pytest.mark.slow
def test_cli_bad_input_ends_in_one_line_and_help_lists_only_converter_flags(tmp_path):
    res = _run_cli([f"--src={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("pneumo_tf.data.convert: error: ")
    assert "no such file" in res.stderr and not (tmp_path / "out").exists()
    stray = _run_cli([f"--out={tmp_path / 'out'}", "extra"])
    assert stray.returncode != 0 and "unexpected arguments: extra" in stray.stderr
    help_text = _run_cli(["--helpfull"]).stdout
    assert "--image_size" in help_text and "--max_pixels" in help_text
    assert not re.search(r"--(run_dir|split)\b", help_text)


def test_default_shard_count():
    assert convert.default_num_shards(10, 10 * 50_000) == 1
    assert convert.default_num_shards(4172, 4172 * 224 * 224) == 4
    assert convert.default_num_shards(300, 300 * 50_000) == 2
    big = convert.default_num_shards(100_000, 100_000 * 224 * 224)
    assert big == int(np.ceil(100_000 * 224 * 224 / convert.TARGET_SHARD_BYTES))


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_verify_names_corrupt_truncated_and_missing_shards(tmp_path, compression):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=10, n_test_patients=2)
    m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False,
                                num_shards=2, compression=compression)
    assert convert.verify_data_dir(out) == []
    s0, s1 = m["splits"]["train"]["shards"]

    data = bytearray((out / s0).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern inside a record's image bytes
    (out / s0).write_bytes(bytes(data))
    problems = convert.verify_data_dir(out)
    assert len(problems) == 1 and problems[0].startswith(f"{s0}: unreadable after"), problems
    assert ("corrupted record at" if compression == "none" else "incorrect data check") \
        in problems[0]

    full = (out / s1).read_bytes()
    (out / s1).write_bytes(full[: len(full) - 100])
    problems = convert.verify_data_dir(out)
    assert any(p.startswith(s1) and "truncated record at" in p for p in problems), problems

    (out / s1).unlink()
    assert any(s1 in p and "missing" in p for p in convert.verify_data_dir(out))
    (out / "manifest.json").unlink()
    assert "manifest.json is missing" in convert.verify_data_dir(out)[0]


def test_verify_catches_manifest_count_mismatch_and_stray_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=6, n_test_patients=2)
    m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False)
    m["splits"]["test"]["class_counts"]["NORMAL"] += 1
    m["splits"]["train"]["subtype_counts"]["VIRAL"] += 1
    records.write_manifest(out, m)
    (out / "train-00000-of-00009.tfrecord").write_bytes(b"")
    problems = convert.verify_data_dir(out)
    assert any("split test" in p and "NORMAL" in p for p in problems), problems
    viral = m["splits"]["train"]["subtype_counts"]["VIRAL"]
    assert f"split train: {viral - 1} VIRAL subtype records, manifest says {viral}" in problems
    assert any(p.startswith("train-00000-of-00009.tfrecord: shard file not listed")
               for p in problems)


def test_verify_reads_version_1_data_dirs_and_checks_subtypes_against_labels(tmp_path):
    from conftest import write_tiny_dataset

    old = write_tiny_dataset(tmp_path / "v1", version=1)  # no subtype feature, no counts
    assert convert.verify_data_dir(old) == []
    assert "-" in convert.format_summary(records.read_manifest(old)).splitlines()[3]
    new = write_tiny_dataset(tmp_path / "v2", counts={"test": (1, 1)}, num_shards=1)
    shard = new / "test-00000-of-00001.tfrecord"
    with records.ShardWriter(shard) as w:  # the same two records, the NORMAL one marked viral
        for label, path in ((0, "a.png"), (1, "b.png")):
            w.write(records.serialize_example(bytes(32 * 32), label, 2, "p", path, (32, 32),
                                              (32, 32), (0, 32, 0, 32), "fixed"))
    problems = convert.verify_data_dir(new)
    assert problems[0] == ("test-00000-of-00001.tfrecord: record 0 has subtype 2 with label 0 "
                           "(NORMAL is subtype 0 or -1, PNEUMONIA 1, 2 or -1)")
    assert problems[1:] == ["split test: 0 NORMAL subtype records, manifest says 1",
                            "split test: 0 BACTERIAL subtype records, manifest says 1",
                            "split test: 2 VIRAL subtype records, manifest says 0"]


def test_rerun_replaces_old_outputs(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=10, n_test_patients=2)
    convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False, num_shards=3)
    (out / "val-00000-of-00002.tfrecord.partial").write_bytes(b"junk")
    (out / "notes.txt").write_text("mine")
    convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False, num_shards=1)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "notes.txt", "rejects.jsonl", "test-00000-of-00001.tfrecord",
                     "train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"]
    assert convert.verify_data_dir(out) == []


# ---------------------------------------------------------------------------------------------
# End to end through the command line (subprocesses: a few seconds each).

_SLOW_WRITER = """
import sys, time
from pneumo_tf.data import records
_write = records.ShardWriter.write
def slow_write(self, serialized):
    time.sleep(0.01)  # make the shard-writing phase long enough to be killed inside it
    _write(self, serialized)
records.ShardWriter.write = slow_write
from pneumo_tf import convert
sys.argv = ["make_tfrecords"] + sys.argv[1:]
convert.run()
"""


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_tfrecords"), *args],
                          capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.slow
def test_cli_exit_status_follows_max_rejects_and_verify(tmp_path):
    from conftest import run_command

    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=6, n_test_patients=2)
    (src / "train" / "NORMAL" / "IM-9001-0001.jpeg").write_bytes(b"")
    args = [f"--src={src}", f"--out={out}", f"--image_size={SIZE}", "--workers=1", "--verify"]
    res = _run_cli(args)  # the tool, in its own process
    assert res.returncode == 1, res.stderr
    assert "more than --max_rejects=0" in res.stderr
    assert "rejected 1" in res.stdout and "verify" in res.stdout and "OK" in res.stdout
    assert (out / "manifest.json").exists()  # the output is complete without the bad file
    # Byte-identical across processes too (protobuf map order is per-process unless asked).
    here = convert.convert_dataset(src, tmp_path / "here", image_size=SIZE, workers=1,
                                   progress=False)
    for s in here["splits"].values():
        for name in s["shards"]:
            assert (out / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    assert run_command("pneumo_tf.convert", *args, "--max_rejects=1").returncode == 0
    shard = sorted(out.glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    bad = run_command("pneumo_tf.convert", "--verify", f"--out={out}")
    assert bad.returncode == 1 and shard.name in bad.stderr
    usage = run_command("pneumo_tf.convert", f"--out={out}")
    assert usage.returncode != 0 and "--src is required" in usage.stderr
    help_text = _run_cli(["--helpfull"]).stdout
    for flag in ("--src", "--out", "--image_size", "--crop", "--encoding", "--val_fraction",
                 "--split_by", "--seed", "--num_shards", "--workers", "--compression",
                 "--max_rejects", "--dedupe", "--use_official_val", "--verify", "--download",
                 "--max_pixels"):
        assert flag in help_text or flag.replace("--", "--[no]") in help_text, flag


def _pgroup_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _start_and_kill(src: Path, out: Path, ready) -> None:
    """Start a slow-writing conversion, SIGKILL its main process once ``ready(out)``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, f"--src={src}", f"--out={out}", "--image_size=48",
         "--workers=2", "--num_shards=4"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ready(out):
            assert proc.poll() is None, f"converter ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "converter never reached the kill point"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, like an OOM kill
        proc.wait(timeout=30)
        # Its decoding workers must not outlive it.
        deadline = time.monotonic() + 20
        while _pgroup_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pgroup_alive(proc.pid) == [], "worker processes survived the killed converter"
    finally:
        if _pgroup_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()


def _assert_nothing_looks_complete(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    with pytest.raises(records.DataDirError, match="missing"):
        records.read_manifest(out)
    assert convert.verify_data_dir(out)  # verify refuses the folder


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_that_looks_complete(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_kaggle_source(src, n_train_patients=45, n_test_patients=8, shape=(240, 260))
    # Killed while decoding (the spool exists, no shard yet).
    _start_and_kill(src, out, lambda o: (o / convert.SPOOL_NAME).exists())
    _assert_nothing_looks_complete(out)
    assert not list(out.glob("*.tfrecord"))

    # Killed while writing shards: some shards complete, one partial, no manifest.
    _start_and_kill(src, out, lambda o: len(list(o.glob("*.tfrecord"))) >= 1)
    _assert_nothing_looks_complete(out)
    complete = list(out.glob("*.tfrecord"))
    assert complete and len(complete) < 12  # 3 splits x 4 shards would be a full set
    assert list(out.glob("*.partial"))

    # A rerun cleans up and completes.
    convert.convert_dataset(src, out, image_size=48, workers=1, num_shards=4, progress=False)
    assert not list(out.glob("*.partial"))
    assert len(list(out.glob("*.tfrecord"))) == 12
    assert convert.verify_data_dir(out) == []


def test_reduced_size_decoding_records_the_box_in_source_pixels(tmp_path):
    src = tmp_path / "src"
    folder = src / "train" / "NORMAL"
    folder.mkdir(parents=True)
    gray = _film(np.random.default_rng(3), 480, 640, 0)
    cv2.imwrite(str(folder / "IM-0001-0001.jpeg"), gray)
    convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, workers=1, progress=False,
                            val_fraction=0.0)
    (r,) = read_records(tmp_path / "out", "train")
    assert (r["orig_height"], r["orig_width"]) == (480, 640)
    want = preprocess.fixed_crop_box(480, 640)
    # Decoded at 1/scale, the box is exact to within one scale step of source pixels.
    assert np.all(np.abs(np.array(r["crop_box"]) - np.array(want)) <= 8), (r["crop_box"], want)
    img = np.frombuffer(r["image"], np.uint8).reshape(SIZE, SIZE).astype(int)
    full = preprocess.preprocess_gray(gray, SIZE, "fixed")[0].astype(int)
    assert np.abs(img - full).mean() < 4  # same picture as a full-size decode, up to JPEG noise


# ---------------------------------------------------------------------------------------------
# Lung masks (--masks)


def _left_lung_mask(h: int, w: int) -> np.ndarray:
    """``[h, w] uint8`` 0/255: a block in the image's left half only (rows 30-80 %, columns
    25-45 %), so a flip or a wrong crop shows."""
    mask = np.zeros((h, w), np.uint8)
    mask[int(h * 0.3):int(h * 0.8), int(w * 0.25):int(w * 0.45)] = 255
    return mask


def write_masks(src: Path, masks: Path, skip_every: int = 4,
                scale: int = 2) -> dict[str, np.ndarray]:
    """Masks mirroring ``src`` at ``scale`` x the image size (nearest), every ``skip_every``-th
    film left without one; returns ``{key: mask at the image's own size}``."""
    written = {}
    for i, path in enumerate(sorted(src.rglob("*.jpeg"))):
        if i % skip_every == skip_every - 1:
            continue
        key = path.relative_to(src).as_posix()
        h, w = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape
        mask = _left_lung_mask(h, w)
        big = cv2.resize(mask, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        target = masks / Path(key).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), big)
        written[key] = mask
    return written


def _stored_mask(row: dict, encoding: str = "raw") -> np.ndarray:
    if encoding == "raw":
        return np.frombuffer(row["lung_mask"], np.uint8).reshape(SIZE, SIZE)
    return cv2.imdecode(np.frombuffer(row["lung_mask"], np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("crop,encoding", [("fixed", "raw"), ("none", "png")])
def test_masks_are_stored_cropped_and_resized_like_their_images(tmp_path, crop, encoding):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_kaggle_source(src)
    written = write_masks(src, masks)
    m = convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, workers=1,
                                progress=False, crop=crop, encoding=encoding)
    assert "masks" not in m and all("lung_masks" not in s for s in m["splits"].values())
    m = convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, workers=1,
                                progress=False, crop=crop, encoding=encoding, masks=str(masks))
    seen = 0
    for split in m["splits"]:
        rows = read_records(tmp_path / "out", split)
        assert sum(r["has_lung_mask"] for r in rows) == m["splits"][split]["lung_masks"]
        for r in rows:
            key = r["path"].decode()
            assert r["has_lung_mask"] == (key in written), key
            if key not in written:
                assert r["lung_mask"] == b""
                continue
            # The mask goes onto the decoded film first (a JPEG may decode at reduced size).
            gray = decode.decode_bytes((src / key).read_bytes(), name=key, target_size=SIZE,
                                       crop=crop).gray
            mask = cv2.resize(written[key], gray.shape[::-1], interpolation=cv2.INTER_NEAREST)
            box = preprocess.crop_box_for(gray, crop)[0]
            want = cv2.resize(preprocess.apply_box(mask, box), (SIZE, SIZE),
                              interpolation=cv2.INTER_NEAREST)
            got = _stored_mask(r, encoding)
            np.testing.assert_array_equal(got, want)
            assert set(np.unique(got)) <= {0, 255}
            assert got[:, SIZE // 2 + 2:].max() == 0 and got[:, :SIZE // 2].max() == 255
            seen += 1
    assert seen == len(written) == m["masks"]["stored"]
    total = sum(s["count"] for s in m["splits"].values())
    assert m["masks"]["films_without_mask"] == total - len(written)
    assert m["masks"]["rejected"] == 0 and m["masks"]["files"] == len(written)
    assert m["masks"]["path"] == str(masks.absolute()) == m["flags"]["masks"]
    assert convert.verify_data_dir(tmp_path / "out") == []


def test_mask_checksum_follows_the_mask_files(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_kaggle_source(src, n_train_patients=4, n_test_patients=1)
    write_masks(src, masks)
    kw = dict(image_size=SIZE, workers=1, progress=False, masks=str(masks))
    a = convert.convert_dataset(src, tmp_path / "a", **kw)["masks"]["checksum"]
    b = convert.convert_dataset(src, tmp_path / "b", **kw)["masks"]["checksum"]
    first = sorted(masks.rglob("*.png"))[0]
    cv2.imwrite(str(first), 255 - cv2.imread(str(first), cv2.IMREAD_GRAYSCALE))
    c = convert.convert_dataset(src, tmp_path / "c", **kw)["masks"]["checksum"]
    assert a == b != c


def test_bad_masks_are_counted_and_their_films_kept(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_kaggle_source(src, n_train_patients=6, n_test_patients=2)
    written = write_masks(src, masks, skip_every=1000)
    keys = sorted(written)
    (masks / Path(keys[0]).with_suffix(".png")).write_bytes(b"not a png at all")
    cv2.imwrite(str(masks / Path(keys[1]).with_suffix(".png")), np.zeros((40, 40), np.uint8))
    empty_in_crop = np.zeros((80, 80), np.uint8)
    empty_in_crop[:4, :4] = 255  # a corner the fixed crop cuts away
    cv2.imwrite(str(masks / Path(keys[2]).with_suffix(".png")), empty_in_crop)
    (masks / "stray").mkdir()
    cv2.imwrite(str(masks / "stray" / "other.png"), np.full((8, 8), 255, np.uint8))
    m = convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, workers=1,
                                progress=False, masks=str(masks))
    assert m["rejected"] == 0 and sum(s["count"] for s in m["splits"].values()) == len(keys)
    assert m["masks"]["rejected"] == 3 and m["masks"]["stored"] == len(keys) - 3
    assert m["masks"]["rejects_by_reason"] == {"mask all zero": 1,
                                               "mask does not decode as an image": 1,
                                               "mask empty after the crop": 1}
    assert [r["path"] for r in m["masks"]["rejects"]] == sorted(
        Path(k).with_suffix(".png").as_posix() for k in keys[:3])
    assert m["masks"]["unmatched_files"] == 1 and m["masks"]["files"] == len(keys) + 1
    assert "3 rejected" in convert.format_summary(m)
    assert convert.verify_data_dir(tmp_path / "out") == []


def test_masks_in_the_wrong_layout_fail_before_out_is_touched(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_kaggle_source(src, n_train_patients=3, n_test_patients=1)
    write_masks(src, masks / "train")  # one folder too deep: masks/train/train/NORMAL/...
    out = tmp_path / "out"
    convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(convert.ConvertError,
                       match=re.escape(f"pass --masks={masks / 'train'}")):
        convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False,
                                masks=str(masks))
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(convert.ConvertError, match="--masks=.*is not a folder"):
        convert.convert_dataset(src, out, progress=False, masks=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(convert.ConvertError, match="holds no .png file"):
        convert.convert_dataset(src, out, progress=False, masks=str(tmp_path / "empty"))


def test_verify_checks_mask_counts_and_shapes(tmp_path):
    src, masks = tmp_path / "src", tmp_path / "masks"
    write_kaggle_source(src, n_train_patients=4, n_test_patients=1)
    write_masks(src, masks)
    out = tmp_path / "out"
    m = convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False,
                                masks=str(masks), num_shards=1)
    m["splits"]["train"]["lung_masks"] += 1
    records.write_manifest(out, m)
    problems = convert.verify_data_dir(out)
    assert len(problems) == 1 and re.match(
        r"split train: \d+ records with a lung_mask, manifest says \d+", problems[0])
    # A record whose lung_mask has the wrong size.
    m["splits"]["train"]["lung_masks"] -= 1
    records.write_manifest(out, m)
    shard = out / m["splits"]["test"]["shards"][0]
    bad = records.serialize_example(bytes(SIZE * SIZE), 0, 0, "p", "x.jpeg", (SIZE, SIZE),
                                    (SIZE, SIZE), (0, SIZE, 0, SIZE), "none", bytes(10))
    with records.ShardWriter(shard) as w:
        for r in _raw_records(shard):
            w.write(r)
        w.write(bad)
    m["splits"]["test"]["count"] += 1
    m["splits"]["test"]["shard_counts"][0] += 1
    m["splits"]["test"]["class_counts"]["NORMAL"] += 1
    m["splits"]["test"]["subtype_counts"]["NORMAL"] += 1
    m["splits"]["test"]["patients"] += 1
    records.write_manifest(out, m)
    problems = convert.verify_data_dir(out)
    assert any("lung_mask: raw image of 10 bytes" in p for p in problems), problems
    assert any("records with a lung_mask, manifest says" in p for p in problems), problems


def _raw_records(shard: Path) -> list[bytes]:
    import tensorflow as tf

    return list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())


def test_phantom_lung_masks_convert_with_masks(tmp_path):
    from pneumo_tf.data import phantoms

    phantoms.write_phantom_dataset(tmp_path / "src", num_train=10, num_test=4, seed=1,
                                   min_size=120, max_size=160)
    masks = tmp_path / "src" / phantoms.LUNG_MASKS_DIR
    m = convert.convert_dataset(tmp_path / "src", tmp_path / "out", image_size=64, workers=1,
                                progress=False, masks=str(masks))
    assert m["masks"]["stored"] == 14 and m["masks"]["films_without_mask"] == 0
    assert sum(s["count"] for s in m["splits"].values()) == 14  # the masks are not films
    for r in read_records(tmp_path / "out", "test"):
        image = np.frombuffer(r["image"], np.uint8).reshape(64, 64)
        lung = np.frombuffer(r["lung_mask"], np.uint8).reshape(64, 64) > 0
        assert 0.1 < lung.mean() < 0.8
        assert image[lung].mean() < image[~lung].mean()  # the lungs are the dark fields


# ---------------------------------------------------------------------------------------------
# The lung crop (--crop=lungs)


def test_lung_crop_boxes_each_film_to_the_lungs_its_model_finds(lung_run, tmp_path):
    from pneumo_tf.modeling import lungs as lungs_lib

    run, src = lung_run
    kw = dict(image_size=SIZE, crop="lungs", lung_model=str(run), progress=False)
    m = convert.convert_dataset(src, tmp_path / "out", workers=2, **kw)
    lungs = lungs_lib.LungModel(run)
    entry = m["lung_model"]
    assert {k: entry[k] for k in ("path", "sha256", "image_size")} == lungs.describe()
    assert entry["margin"] == 0.05 and entry["min_lung_fraction"] == 0.1
    methods = {k: sum(s["crop_methods"].get(k, 0) for s in m["splits"].values())
               for k in ("lungs", "lungs_fallback")}
    assert (entry["lungs_found"], entry["fallbacks"]) == (methods["lungs"],
                                                           methods["lungs_fallback"])
    assert entry["lungs_found"] + entry["fallbacks"] == sum(s["count"] for s in m["splits"].values())
    assert 0.0 < entry["lung_fraction"]["min"] <= entry["lung_fraction"]["max"] <= 1.0
    assert m["flags"]["lung_model"] == str(run.absolute()) and m["crop"] == "lungs"
    # Each record's box is the lung model's box of its film (decoded as the converter does).
    boxes = []
    for r in read_records(tmp_path / "out", "test"):
        decoded = decode.decode_bytes((src / r["path"].decode()).read_bytes(), name="x",
                                      target_size=SIZE, crop="lungs")
        finding = lungs.find([decoded.gray])[0]
        box, method = preprocess.crop_box_for(decoded.gray, "lungs", finding.box)
        assert tuple(r["crop_box"]) == convert.source_box(box, decoded.scale, r["orig_height"],
                                                          r["orig_width"])
        assert r["crop_method"].decode() == method
        boxes.append(tuple(r["crop_box"]) != (0, r["orig_height"], 0, r["orig_width"]))
    assert any(boxes)  # the lungs are not the whole film: some boxes leave part of it out
    assert convert.verify_data_dir(tmp_path / "out") == []
    one = convert.convert_dataset(src, tmp_path / "one", workers=1, **kw)
    assert one["splits"] == m["splits"]
    assert "lung crop:" in convert.format_summary(m)
    assert m["timing"]["find_lungs_s"] > 0 and "finding the lungs" in convert.format_summary(m)


def test_lung_crop_falls_back_to_fixed_where_too_few_lungs_are_found(lung_run, tmp_path):
    run, src = lung_run
    m = convert.convert_dataset(src, tmp_path / "out", image_size=SIZE, crop="lungs",
                                lung_model=str(run), min_lung_fraction=0.99, workers=1,
                                progress=False)
    n = sum(s["count"] for s in m["splits"].values())
    assert m["lung_model"]["fallbacks"] == n and m["lung_model"]["lungs_found"] == 0
    for r in read_records(tmp_path / "out", "test"):
        assert r["crop_method"] == b"lungs_fallback"
        decoded = decode.decode_bytes((src / r["path"].decode()).read_bytes(), name="x",
                                      target_size=SIZE, crop="lungs")
        fixed = preprocess.fixed_crop_box(*decoded.gray.shape)
        assert tuple(r["crop_box"]) == convert.source_box(fixed, decoded.scale, r["orig_height"],
                                                          r["orig_width"])


def test_bad_lung_models_stop_the_run_before_out_is_touched(lung_run, tiny_run, tmp_path):
    run, src = lung_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    classifier = tiny_run[0]
    for kw, message in ((dict(crop="lungs"), r"--crop=lungs needs --lung_model="),
                        (dict(crop="lungs", lung_model=str(classifier)), r"not a lung model"),
                        (dict(crop="lungs", lung_model=str(tmp_path / "none")),
                         r"no such directory"),
                        (dict(crop="fixed", lung_model=str(run)), r"add --crop=lungs or drop")):
        with pytest.raises(convert.ConvertError, match=message):
            convert.convert_dataset(src, out, image_size=SIZE, workers=1, progress=False, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
