"""Tests for pneumo_tf/data/records.py: shard names, atomic writers, manifest checks."""

import json

import pytest

from pneumo_tf.data import records


def test_shard_names_round_trip():
    assert records.shard_name("train", 3, 8) == "train-00003-of-00008.tfrecord"
    assert records.shard_name("val", 0, 1, "gzip") == "val-00000-of-00001.tfrecord.gz"
    assert records.parse_shard_name("test-00002-of-00004.tfrecord.gz") == ("test", 2, 4, "gzip")
    assert records.parse_shard_name("train-00002-of-00004.tfrecord.partial") is None


def test_shard_writer_is_atomic(tmp_path):
    path = tmp_path / records.shard_name("train", 0, 1)
    with pytest.raises(RuntimeError):
        with records.ShardWriter(path) as w:
            w.write(b"abc")
            assert (tmp_path / (path.name + ".partial")).exists() and not path.exists()
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with records.ShardWriter(path) as w:
        w.write(b"abc")
    assert path.exists() and w.count == 1


def test_read_manifest_errors_name_the_fix(tmp_path):
    with pytest.raises(records.DataDirError, match="does not exist"):
        records.read_manifest(tmp_path / "nope")
    with pytest.raises(records.DataDirError, match="manifest.json is missing.*make_tfrecords"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(records.DataDirError, match="not valid JSON"):
        records.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(records.DataDirError, match="no 'image_size' entry"):
        records.read_manifest(tmp_path)


def test_split_shards_checks_split_and_files(tiny_data_dir):
    manifest = records.read_manifest(tiny_data_dir)
    assert [p.name for p in records.split_shards(tiny_data_dir, manifest, "val")] == [
        "val-00000-of-00002.tfrecord", "val-00001-of-00002.tfrecord"]
    with pytest.raises(records.DataDirError, match="split 'extra' is not in"):
        records.split_shards(tiny_data_dir, manifest, "extra")
    (tiny_data_dir / "val-00001-of-00002.tfrecord").unlink()
    with pytest.raises(records.DataDirError, match="missing: val-00001-of-00002.tfrecord"):
        records.split_shards(tiny_data_dir, manifest, "val")
    manifest["splits"]["test"]["count"] = 0
    with pytest.raises(records.DataDirError, match="split 'test' .* is empty"):
        records.split_shards(tiny_data_dir, manifest, "test")


def test_examples_parse_back(tiny_data_dir):
    import numpy as np
    import tensorflow as tf

    manifest = records.read_manifest(tiny_data_dir)
    paths = records.split_shards(tiny_data_dir, manifest, "train")
    raw = next(iter(tf.data.TFRecordDataset([str(p) for p in paths]).batch(4)))
    parsed = tf.io.parse_example(raw, records.feature_spec())
    assert parsed["crop_box"].shape == (4, 4)
    img = np.frombuffer(parsed["image"][0].numpy(), np.uint8)
    assert img.size == 32 * 32
    assert set(parsed["label"].numpy()) <= {0, 1}


def test_manifest_mismatches_lists_each_difference():
    a = {"image_size": 224, "crop": "fixed", "encoding": "raw", "channels": 1}
    b = {"image_size": 128, "crop": "none", "encoding": "raw", "channels": 1}
    assert records.manifest_mismatches(a, b) == [
        "image_size: run has 224, data dir has 128", "crop: run has 'fixed', data dir has 'none'"]
    assert records.manifest_mismatches(a, dict(a)) == []
    lungs = {**a, "crop": "lungs", "lung_model": {"path": "/runs/lungs", "sha256": "aa"}}
    moved = {**lungs, "lung_model": {"path": "/elsewhere/lungs", "sha256": "aa"}}
    assert records.manifest_mismatches(lungs, moved) == []  # the same model, moved
    other = {**lungs, "lung_model": {"path": "/runs/lungs", "sha256": "bb"}}
    assert records.manifest_mismatches(lungs, other) == [
        "lung_model: run's crop used 'aa', data dir's 'bb' (sha256 of model.keras)"]


@pytest.mark.parametrize("label,subtype,box,method", [
    (0, 0, (0, 32, 0, 32), "fixed"), (1, 2, (150, 1900, 300, 2400), "adaptive_fallback"),
    (1, -1, (1, 2, 3, 4), "none"), (1, None, (0, 9, 0, 9), "fixed")])  # None: a version-1 record
def test_pure_python_serialization_is_byte_identical_to_tensorflow(label, subtype, box, method):
    import tensorflow as tf

    args = (bytes(range(256)) * 300, label, subtype, "person1234", "train/PNEUMONIA/ü.jpeg",
            (224, 224), (2000, 2500), box, method)

    def i(*v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() if isinstance(v, str) else v]))

    feature = {
        "image": b(args[0]), "label": i(label), "patient_id": b(args[3]), "path": b(args[4]),
        "height": i(224), "width": i(224), "orig_height": i(2000), "orig_width": i(2500),
        "crop_box": i(*box), "crop_method": b(method)}
    if subtype is not None:
        feature["subtype"] = i(subtype)
    reference = tf.train.Example(features=tf.train.Features(feature=feature))
    ours = records.serialize_example(*args)
    assert ours == reference.SerializeToString(deterministic=True)
    parsed = tf.io.parse_single_example(ours, records.feature_spec())
    assert parsed["crop_box"].numpy().tolist() == list(box)
    assert parsed["path"].numpy().decode() == "train/PNEUMONIA/ü.jpeg"
    assert (parsed["height"], parsed["orig_width"]) == (224, 2500)
    # A version-1 record has no subtype: it parses as -1 (unknown), whatever its label.
    assert int(parsed["subtype"]) == (-1 if subtype is None else subtype)


def test_version_1_data_dir_parses_with_unknown_subtypes(tmp_path):
    import tensorflow as tf

    from conftest import write_tiny_dataset

    old = write_tiny_dataset(tmp_path / "v1", counts={"train": (3, 5)}, version=1)
    manifest = records.read_manifest(old)
    assert manifest["version"] == 1 and "subtype_class_weights" not in manifest
    assert "subtype_counts" not in manifest["splits"]["train"]
    paths = [str(p) for p in records.split_shards(old, manifest, "train")]
    raw = next(iter(tf.data.TFRecordDataset(paths).batch(8)))
    parsed = tf.io.parse_example(raw, records.feature_spec())
    assert sorted(parsed["label"].numpy().tolist()) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert parsed["subtype"].numpy().tolist() == [-1] * 8  # NORMAL records too
    new = write_tiny_dataset(tmp_path / "v2", counts={"train": (3, 5)})
    assert records.read_manifest(new)["version"] == records.MANIFEST_VERSION == 2


def test_subtype_counts_and_label_agreement():
    assert records.subtype_counts([0, 1, 1, 2, -1, 1]) == {
        "NORMAL": 1, "BACTERIAL": 3, "VIRAL": 1, "UNKNOWN": 1}
    assert records.subtype_counts([]) == {"NORMAL": 0, "BACTERIAL": 0, "VIRAL": 0, "UNKNOWN": 0}
    agree = {(s, y): records.subtype_fits_label(s, y) for s in (-1, 0, 1, 2) for y in (0, 1)}
    assert [k for k, ok in agree.items() if ok] == [(-1, 0), (-1, 1), (0, 0), (1, 1), (2, 1)]


def test_an_image_folder_given_as_data_dir_gets_the_convert_command(tmp_path):
    (tmp_path / "xrays" / "NORMAL").mkdir(parents=True)
    (tmp_path / "xrays" / "NORMAL" / "a.jpeg").write_bytes(b"\xff\xd8")
    with pytest.raises(records.DataDirError) as e:
        records.read_manifest(tmp_path / "xrays")
    msg = str(e.value)
    assert "holds radiographs, not a converter output" in msg
    assert f"--src={tmp_path / 'xrays'} --out=<a new folder>" in msg
    assert f"--out={tmp_path / 'xrays'}`" not in msg
    (tmp_path / "half").mkdir()
    with pytest.raises(records.DataDirError, match="is not a finished converter output"):
        records.read_manifest(tmp_path / "half")
