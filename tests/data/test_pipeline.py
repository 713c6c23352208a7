"""Tests of pneumo_tf.data.pipeline on tiny data dirs written through the real record writers."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from pneumo_tf.data import pipeline, records
from conftest import REPO, write_tiny_dataset

# 4 NORMAL + 12 PNEUMONIA in train: balanced weights 16/(2*4) = 2 and 16/(2*12) = 2/3.
UNBALANCED = {"train": (4, 12), "test": (5, 6)}


@pytest.fixture
def unbalanced_dir(tmp_path):
    return write_tiny_dataset(tmp_path / "data", counts=UNBALANCED, image_size=16, num_shards=2)


def _paths_of(dataset, n_batches=None, lookup=None):
    """Source paths of the images of the first ``n_batches`` batches, in stream order.

    Evaluation batches carry their paths; training batches (no strings) are identified by their
    pixels through ``lookup`` (:func:`_pixel_lookup`).
    """
    out = []
    for i, batch in enumerate(dataset):
        if n_batches is not None and i >= n_batches:
            break
        if "path" in batch:
            out.extend(p.decode() for p in batch["path"].numpy())
        else:
            out.extend(lookup[image.tobytes()] for image in batch["image"].numpy())
    return out


def _all_records(data_dir, split):
    """{path: (image [S, S, 1] uint8, label)} read independently of the pipeline."""
    manifest = records.read_manifest(data_dir)
    size = manifest["image_size"]
    out = {}
    for shard in records.split_shards(data_dir, manifest, split):
        for raw in tf.data.TFRecordDataset(str(shard), records.tf_compression_type(
                manifest["compression"])):
            ex = tf.io.parse_single_example(raw, records.feature_spec())
            if manifest["encoding"] == "raw":
                img = tf.reshape(tf.io.decode_raw(ex["image"], tf.uint8), [size, size, 1])
            else:
                img = tf.io.decode_png(ex["image"], channels=1)
            out[ex["path"].numpy().decode()] = (img.numpy(), int(ex["label"]))
    return out


def _pixel_lookup(data_dir, split="train"):
    """{image bytes: path} of a split whose images are all different (noise images are)."""
    table = {img.tobytes(): path for path, (img, _) in _all_records(data_dir, split).items()}
    assert len(table) == records.read_manifest(data_dir)["splits"][split]["count"]
    return table


@pytest.mark.parametrize("cache", [False, True])
def test_training_batches_shapes_weights_and_epoch_coverage(unbalanced_dir, cache):
    ds = pipeline.make_train_dataset(unbalanced_dir, 4, cache=cache, seed=1)
    assert ds.element_spec["image"].shape.as_list() == [4, 16, 16, 1]  # fixed batch shape
    assert ds.element_spec["image"].dtype == tf.uint8
    for batch in ds.take(12):  # 3 epochs of 16 images: repeats forever
        images, labels, weights = batch["image"], batch["label"], batch["weight"]
        assert images.shape == (4, 16, 16, 1) and labels.dtype == tf.float32
        want = np.where(labels.numpy() == 0, 2.0, 2.0 / 3.0)
        np.testing.assert_allclose(weights.numpy(), want, rtol=1e-6)
    # Each epoch of a training stream holds every image exactly once. Exactly: only in a
    # deterministic stream (with deterministic=False a batch may overtake the one before it,
    # across the epoch boundary too).
    ordered = pipeline.make_train_dataset(unbalanced_dir, 4, cache=cache, seed=1,
                                          deterministic=True)
    seen = _paths_of(ordered, n_batches=8, lookup=_pixel_lookup(unbalanced_dir))
    assert sorted(seen[:16]) == sorted(seen[16:]) and len(set(seen[:16])) == 16
    assert seen[:16] != seen[16:]  # reshuffled each epoch


def test_weights_none_gives_ones(unbalanced_dir):
    ds = pipeline.make_train_dataset(unbalanced_dir, 4, class_weights="none")
    w = next(iter(ds))["weight"]
    np.testing.assert_array_equal(w.numpy(), np.ones(4, np.float32))
    evaluation = pipeline.make_eval_dataset(unbalanced_dir, "test", 11, class_weights="none")
    np.testing.assert_array_equal(next(iter(evaluation))["weight"].numpy(),
                                  np.ones(11, np.float32))


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("encoding,compression", [("raw", "none"), ("png", "gzip")])
def test_eval_one_pass_in_file_order_with_exact_pixels(tmp_path, encoding, compression, cache):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"test": (5, 6)}, image_size=16,
                                  encoding=encoding, compression=compression, num_shards=2)
    truth = _all_records(data_dir, "test")
    ds = pipeline.make_eval_dataset(data_dir, "test", 4, cache=cache)
    batches = list(ds)
    assert [len(b["path"]) for b in ds] == [4, 4, 3]  # a second pass (cached: from RAM)
    assert [int(b["image"].shape[0]) for b in batches] == [4, 4, 3]  # last partial batch kept
    paths = [p.decode() for b in batches for p in b["path"].numpy()]
    assert paths == list(truth)  # shard 0 then shard 1, each in written order
    for b in batches:
        for img, label, path in zip(b["image"].numpy(), b["label"].numpy(), b["path"].numpy()):
            want_img, want_label = truth[path.decode()]
            np.testing.assert_array_equal(img, want_img)
            assert label == want_label
    # The evaluation dicts carry the training stream's keys plus the ids.
    assert set(batches[0]) == {"image", "label", "subtype", "weight", "patient_id", "path"}


def test_raw_and_png_shards_give_identical_batches(tmp_path):
    raw = write_tiny_dataset(tmp_path / "raw", counts={"val": (3, 4)}, image_size=16, seed=3)
    png = write_tiny_dataset(tmp_path / "png", counts={"val": (3, 4)}, image_size=16, seed=3,
                             encoding="png", compression="gzip")
    a = list(pipeline.make_eval_dataset(raw, "val", 3))
    b = list(pipeline.make_eval_dataset(png, "val", 3))
    for batch_a, batch_b in zip(a, b):
        np.testing.assert_array_equal(batch_a["image"].numpy(), batch_b["image"].numpy())
        np.testing.assert_array_equal(batch_a["label"].numpy(), batch_b["label"].numpy())


def test_deterministic_order_follows_seed(unbalanced_dir):
    lookup = _pixel_lookup(unbalanced_dir)

    def order(seed, cache):
        ds = pipeline.make_train_dataset(unbalanced_dir, 4, cache=cache, seed=seed,
                                         deterministic=True)
        return _paths_of(ds, n_batches=8, lookup=lookup)

    for cache in (False, True):
        assert order(0, cache) == order(0, cache)
        assert order(0, cache) != order(1, cache)
    assert pipeline.make_train_dataset(unbalanced_dir, 4,
                                       deterministic=True).options().deterministic is True
    assert pipeline.make_train_dataset(unbalanced_dir, 4).options().deterministic is False


def test_cache_decision_follows_budget(unbalanced_dir):
    manifest = records.read_manifest(unbalanced_dir)
    need = pipeline.decoded_split_bytes(manifest, "train")
    assert need == 16 * (16 * 16 + pipeline.RECORD_OVERHEAD_BYTES)
    assert pipeline.decoded_split_bytes(manifest, "train", num_pipelines=2) == need // 2
    assert pipeline.resolve_cache(None, manifest, "train", cache_budget_bytes=need) is True
    assert pipeline.resolve_cache(None, manifest, "train", cache_budget_bytes=need - 1) is False
    assert pipeline.resolve_cache(False, manifest, "train", cache_budget_bytes=10**12) is False
    assert pipeline.resolve_cache(True, manifest, "train", cache_budget_bytes=1) is True
    assert pipeline.available_memory_bytes() > 0
    # Over budget -> streaming graph (no CacheDataset); within budget -> cached graph.
    def has_cache(ds):
        graph = ds._as_serialized_graph().numpy()
        return b"CacheDatasetV2" in graph or b"MemoryCache" in graph

    assert not has_cache(pipeline.make_train_dataset(unbalanced_dir, 4,
                                                     cache_budget_bytes=need - 1))
    assert has_cache(pipeline.make_train_dataset(unbalanced_dir, 4, cache_budget_bytes=need))


# 2 shards: file-level sharding; 1 (fewer than pipelines) and 3 (uneven): record-level.
@pytest.mark.parametrize("num_shards", [2, 1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_input_context_shards_disjoint_and_complete(tmp_path, num_shards, training):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (4, 12)}, image_size=16,
                                  num_shards=num_shards)
    lookup = _pixel_lookup(data_dir)
    per_pipeline = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        # Deterministic: "the first 4 batches are one epoch" holds only in order.
        if training:
            ds = pipeline.make_train_dataset(data_dir, 2, input_context=ctx, deterministic=True)
        else:
            ds = pipeline.make_eval_dataset(data_dir, "train", 2, input_context=ctx)
        per_pipeline.append(_paths_of(ds, n_batches=4, lookup=lookup))  # 8 images = one epoch
    a, b = map(set, per_pipeline)
    assert len(a) == len(b) == 8 and not a & b and len(a | b) == 16


def test_file_sharding_only_when_files_divide_evenly():
    assert pipeline.file_sharding_is_even(4, 2) and pipeline.file_sharding_is_even(3, 1)
    assert pipeline.file_sharding_is_even(6, 3)
    assert not pipeline.file_sharding_is_even(4, 3)  # one pipeline would read 2 shards
    assert not pipeline.file_sharding_is_even(2, 3)


def _context(pid, num=2):
    return tf.distribute.InputContext(num_input_pipelines=num, input_pipeline_id=pid,
                                      num_replicas_in_sync=num)


def test_plan_shards_by_file_or_by_record(tmp_path):
    two = write_tiny_dataset(tmp_path / "two", counts={"train": (4, 12)}, num_shards=2)
    three = write_tiny_dataset(tmp_path / "three", counts={"train": (4, 12)}, num_shards=3)

    def shards(d):
        return [str(p) for p in records.split_shards(d, records.read_manifest(d), "train")]

    alone = pipeline.plan_shards(two, records.read_manifest(two), "train")
    assert alone.paths == tuple(shards(two)) and alone.counts == (8, 8) and alone.counts_known
    assert (alone.num_pipelines, alone.by_record, alone.records_per_pipeline) == (1, False, 16)
    # 2 shards, 2 pipelines: one file each.
    plans = [pipeline.plan_shards(two, records.read_manifest(two), "train", _context(i))
             for i in range(2)]
    assert [p.paths for p in plans] == [(shards(two)[0],), (shards(two)[1],)]
    assert not any(p.by_record for p in plans) and plans[1].records_per_pipeline == 8
    # 3 shards, 2 pipelines: every file, every other record.
    plan = pipeline.plan_shards(three, records.read_manifest(three), "train", _context(1))
    assert plan.paths == tuple(shards(three)) and plan.by_record and plan.pipeline_id == 1
    assert plan.split_files == 3
    # No shard_counts in the manifest: counts unknown (nothing to assert at a shard's end).
    manifest = records.read_manifest(two)
    del manifest["splits"]["train"]["shard_counts"]
    plan = pipeline.plan_shards(two, manifest, "train")
    assert plan.counts == (-1, -1) and not plan.counts_known
    manifest["compression"] = "zip"
    with pytest.raises(records.DataDirError, match="unknown compression 'zip'"):
        pipeline.plan_shards(two, manifest, "train")


def _paths_in(serialized):
    return [tf.io.parse_single_example(r, records.feature_spec())["path"].numpy().decode()
            for r in serialized]


def test_read_records_in_file_order_or_every_nth(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (3, 4)}, num_shards=3)
    manifest = records.read_manifest(data_dir)
    in_order = list(_all_records(data_dir, "train"))
    plan = pipeline.plan_shards(data_dir, manifest, "train")
    assert _paths_in(pipeline.read_records(plan)) == in_order
    # Interleaved (training): the same records, files in turn.
    interleaved = _paths_in(pipeline.read_records(plan, interleave=True))
    assert sorted(interleaved) == sorted(in_order) and interleaved != in_order
    # By record: the pipelines keep every other record of the same order.
    for pid in range(2):
        mine = pipeline.plan_shards(data_dir, manifest, "train", _context(pid))
        shuffled = pipeline.read_records(mine, file_shuffle_seed=3)  # by record: not shuffled
        assert _paths_in(shuffled) == in_order[pid::2]


def test_batch_parser_decodes_one_batch(unbalanced_dir):
    manifest = records.read_manifest(unbalanced_dir)
    plan = pipeline.plan_shards(unbalanced_dir, manifest, "test")
    serialized = next(iter(pipeline.read_records(plan).batch(5)))
    truth = list(_all_records(unbalanced_dir, "test").values())[:5]
    plain = pipeline.batch_parser(manifest, unbalanced_dir, with_meta=False)(serialized)
    assert set(plain) == {"image", "label", "subtype"} and plain["image"].dtype == tf.uint8
    assert plain["subtype"].dtype == tf.int32
    np.testing.assert_array_equal(plain["image"].numpy(), np.stack([t[0] for t in truth]))
    np.testing.assert_array_equal(plain["label"].numpy(), [float(t[1]) for t in truth])
    meta = pipeline.batch_parser(manifest, unbalanced_dir, with_meta=True)(serialized)
    assert set(meta) == {"image", "label", "subtype", "patient_id", "path"}
    manifest["encoding"] = "jpeg"
    with pytest.raises(records.DataDirError, match="unknown encoding 'jpeg'.*re-run"):
        pipeline.batch_parser(manifest, unbalanced_dir, with_meta=False)


def test_class_weight_table(unbalanced_dir):
    manifest = records.read_manifest(unbalanced_dir)
    table = pipeline.class_weight_table(manifest, unbalanced_dir, "balanced")
    np.testing.assert_allclose(table.numpy(), [2.0, 2.0 / 3.0], rtol=1e-6)
    del manifest["class_weights"]
    np.testing.assert_array_equal(
        pipeline.class_weight_table(manifest, unbalanced_dir, "none").numpy(), [1.0, 1.0])
    with pytest.raises(records.DataDirError, match="no class_weights"):
        pipeline.class_weight_table(manifest, unbalanced_dir, "balanced")


def _subtypes_by_path(data_dir, split):
    """{path: subtype} read independently of the pipeline."""
    manifest = records.read_manifest(data_dir)
    out = {}
    for shard in records.split_shards(data_dir, manifest, split):
        for raw in tf.data.TFRecordDataset(str(shard)):
            ex = tf.io.parse_single_example(raw, records.feature_spec())
            out[ex["path"].numpy().decode()] = int(ex["subtype"])
    return out


def test_streams_carry_the_subtype_of_every_image(unbalanced_dir):
    truth = _subtypes_by_path(unbalanced_dir, "train")
    # 4 NORMAL; the 12 PNEUMONIA take 1, 1, 2, -1 in turn: 6 BACTERIAL, 3 VIRAL, 3 unknown.
    assert collections.Counter(truth.values()) == {0: 4, 1: 6, 2: 3, -1: 3}
    batches = list(pipeline.make_eval_dataset(unbalanced_dir, "train", 5))
    got = {p.decode(): int(s) for b in batches
           for p, s in zip(b["path"].numpy(), b["subtype"].numpy())}
    assert got == truth
    assert all(b["subtype"].dtype == tf.int32 for b in batches)
    lookup = _pixel_lookup(unbalanced_dir)
    for batch in pipeline.make_train_dataset(unbalanced_dir, 4, cache=True).take(8):
        for image, subtype in zip(batch["image"].numpy(), batch["subtype"].numpy()):
            assert truth[lookup[image.tobytes()]] == subtype


@pytest.mark.parametrize("cache", [False, True])
def test_balanced_subtype_weights_and_unknown_weighs_nothing(unbalanced_dir, cache):
    manifest = records.read_manifest(unbalanced_dir)
    # sklearn "balanced" over the 13 known subtypes: 13 / (3 * n_c); unknown images weigh 0.
    want = {0: 13 / 12, 1: 13 / 18, 2: 13 / 9, -1: 0.0}
    assert manifest["subtype_class_weights"] == pytest.approx(
        {str(c): w for c, w in want.items() if c >= 0})
    table = pipeline.class_weight_table(manifest, unbalanced_dir, "balanced_subtype")
    np.testing.assert_allclose(table.numpy(), [want[0], want[1], want[2]], rtol=1e-6)
    ds = pipeline.make_train_dataset(unbalanced_dir, 4, cache=cache, deterministic=True,
                                     class_weights="balanced_subtype")
    total = 0.0
    for batch in ds.take(4):  # one epoch of 16 images
        subtypes, weights = batch["subtype"].numpy(), batch["weight"].numpy()
        np.testing.assert_allclose(weights, [want[s] for s in subtypes], rtol=1e-6)
        total += float(weights.sum())
    assert total == pytest.approx(13.0)  # balanced: the weights of the known images sum to 13
    evaluation = next(iter(pipeline.make_eval_dataset(unbalanced_dir, "train", 16,
                                                      class_weights="balanced_subtype")))
    np.testing.assert_allclose(evaluation["weight"].numpy(),
                               [want[s] for s in evaluation["subtype"].numpy()], rtol=1e-6)


def test_version_1_data_dir_reads_with_unknown_subtypes(tmp_path):
    old = write_tiny_dataset(tmp_path / "v1", counts=UNBALANCED, image_size=16, version=1)
    batch = next(iter(pipeline.make_eval_dataset(old, "test", 11)))
    assert batch["subtype"].numpy().tolist() == [-1] * 11  # NORMAL images too
    assert sorted(batch["label"].numpy().tolist()) == [0.0] * 5 + [1.0] * 6
    train = next(iter(pipeline.make_train_dataset(old, 4)))  # binary weights work as before
    np.testing.assert_allclose(train["weight"].numpy(),
                               np.where(train["label"].numpy() == 0, 2.0, 2.0 / 3.0), rtol=1e-6)
    assert train["subtype"].numpy().tolist() == [-1] * 4
    with pytest.raises(records.DataDirError, match=r"has no subtype_class_weights .*manifest "
                       r"version 1; subtypes arrived in version 2\); re-run tools/make_tfrecords"):
        pipeline.make_train_dataset(old, 4, class_weights="balanced_subtype")
    with pytest.raises(ValueError, match="class_weights='subtype'"):
        pipeline.make_train_dataset(old, 4, class_weights="subtype")


def test_train_and_eval_streams_share_their_common_keys(unbalanced_dir):
    train = pipeline.make_train_dataset(unbalanced_dir, 4).element_spec
    evaluation = pipeline.make_eval_dataset(unbalanced_dir, "test", 4).element_spec
    assert set(train) == {"image", "label", "subtype", "weight"}
    assert set(evaluation) == set(train) | {"patient_id", "path"}
    for key in train:
        assert train[key].dtype == evaluation[key].dtype, key
        assert train[key].shape[1:] == evaluation[key].shape[1:], key
        assert train[key].shape[0] == 4 and evaluation[key].shape[0] is None, key
    # No strings in the training stream: MirroredStrategy puts every tensor on the GPUs.
    assert all(spec.dtype != tf.string for spec in train.values())


def test_nondeterministic_train_stream_holds_only_the_split(unbalanced_dir):
    lookup = _pixel_lookup(unbalanced_dir)
    seen = _paths_of(pipeline.make_train_dataset(unbalanced_dir, 4, cache=False), 12, lookup)
    assert len(seen) == 48 and set(seen) <= set(lookup.values())


def test_make_dataset_wrapper_gives_tuples_for_keras_fit(unbalanced_dir):
    # The training stream: (image, label, weight) tuples of a fixed batch shape, repeated.
    train = pipeline.make_dataset(unbalanced_dir, "train", 4, True)
    images, labels, weights = next(iter(train))
    assert images.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(weights.numpy(), np.where(labels.numpy() == 0, 2.0, 2.0 / 3.0),
                               rtol=1e-6)
    assert len(list(train.take(9))) == 9  # 2.25 epochs of 16 images
    # One evaluation pass, in file order, the last partial batch kept: the eval builder's
    # batches without the ids.
    ds = pipeline.make_dataset(unbalanced_dir, "test", batch_size=4, training=False, cache=False)
    assert [int(b[0].shape[0]) for b in ds] == [4, 4, 3]
    for (images, labels, weights), batch in zip(ds, pipeline.make_eval_dataset(
            unbalanced_dir, "test", 4)):
        np.testing.assert_array_equal(images.numpy(), batch["image"].numpy())
        np.testing.assert_array_equal(labels.numpy(), batch["label"].numpy())
        np.testing.assert_array_equal(weights.numpy(), batch["weight"].numpy())
    # The earlier keywords are gone: their callers use the builders.
    with pytest.raises(TypeError, match="'shuffle'"):
        pipeline.make_dataset(unbalanced_dir, "train", 4, True, shuffle=False)
    with pytest.raises(TypeError, match="'with_meta'"):
        pipeline.make_dataset(unbalanced_dir, "test", 4, False, with_meta=True)


def test_builders_serve_what_the_older_keywords_did(unbalanced_dir):
    # One batch of images of an evaluation pass (what export's parity batch reads).
    batch = next(iter(pipeline.make_eval_dataset(unbalanced_dir, "test", 11, cache=False)))
    assert batch["image"].shape == (11, 16, 16, 1)
    # The training stream of one of two input pipelines, throughput first, without weights.
    ds = pipeline.make_train_dataset(unbalanced_dir, 2, cache=False, seed=3,
                                     class_weights="none", input_context=_context(0))
    assert ds.options().deterministic is False and len(list(ds.take(9))) == 9
    # Every image of a split with its ids, and the same order on every pass.
    meta = pipeline.make_eval_dataset(unbalanced_dir, "test", 4)
    assert {"image", "label", "patient_id", "path"} <= set(meta.element_spec)
    assert len(_paths_of(meta)) == 11 and _paths_of(meta) == _paths_of(meta)
    assert set(_paths_of(meta)) == set(_all_records(unbalanced_dir, "test"))


@pytest.mark.parametrize("cache", [False, True])
def test_uneven_shards_give_every_image_the_same_frequency(tmp_path, cache):
    # 3 shards of 4 images over 2 pipelines: by file, one pipeline would repeat 8 images and the
    # other 4 (seen twice as often); by record each pipeline repeats 6.
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (6, 6)}, image_size=16,
                                  num_shards=3)
    lookup = _pixel_lookup(data_dir)
    seen = collections.Counter()
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        ds = pipeline.make_train_dataset(data_dir, 2, cache=cache, input_context=ctx,
                                         deterministic=True)
        seen.update(_paths_of(ds, n_batches=12, lookup=lookup))  # 4 epochs of 6 per pipeline
    assert len(seen) == 12 and set(seen.values()) == {4}, seen


def test_auto_shard_policy(unbalanced_dir, monkeypatch):
    policy = tf.data.experimental.AutoShardPolicy
    ds = pipeline.make_train_dataset(unbalanced_dir, 4)
    assert ds.options().experimental_distribute.auto_shard_policy == policy.FILE
    cluster = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))  # 3 workers > 2 shards
    ds = pipeline.make_train_dataset(unbalanced_dir, 4)
    assert ds.options().experimental_distribute.auto_shard_policy == policy.DATA
    three = write_tiny_dataset(unbalanced_dir.parent / "three", counts=UNBALANCED, image_size=16,
                               num_shards=3)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]}}))
    assert pipeline.make_train_dataset(unbalanced_dir, 4).options() \
        .experimental_distribute.auto_shard_policy == policy.FILE  # 2 shards, 2 workers
    assert pipeline.make_train_dataset(three, 4).options() \
        .experimental_distribute.auto_shard_policy == policy.DATA  # 3 shards, 2 workers


def test_dataset_size(unbalanced_dir):
    assert pipeline.dataset_size(unbalanced_dir, "train") == 16
    assert pipeline.dataset_size(unbalanced_dir, "test") == 11


def _truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])


def _flip_byte(path, fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_byte])
@pytest.mark.parametrize("training", [False, True])
def test_corrupt_shard_error_names_the_shard(unbalanced_dir, damage, training):
    bad = unbalanced_dir / "train-00001-of-00002.tfrecord"
    damage(bad)
    ds = (pipeline.make_train_dataset(unbalanced_dir, 4, cache=False) if training
          else pipeline.make_eval_dataset(unbalanced_dir, "train", 4, cache=False))
    with pytest.raises(pipeline.CorruptShardError, match="train-00001-of-00002.tfrecord") as info:
        for _ in pipeline.iterate_checked(ds, unbalanced_dir, "train"):
            pass
    assert "Re-run the converter" in str(info.value) and "skip_corrupt" in str(info.value)
    assert [p.name for p, _ in info.value.shards] == [bad.name]
    assert isinstance(info.value.__cause__, pipeline.DATA_LOSS_ERRORS)


def test_explain_data_loss_for_a_fit_style_loop(unbalanced_dir):
    _flip_byte(unbalanced_dir / "train-00000-of-00002.tfrecord")
    ds = pipeline.make_eval_dataset(unbalanced_dir, "train", 4)
    with pytest.raises(pipeline.DATA_LOSS_ERRORS) as info:
        for _ in ds:
            pass
    err = pipeline.explain_data_loss(unbalanced_dir, "train", info.value)
    assert isinstance(err, pipeline.CorruptShardError)
    assert "train-00000-of-00002.tfrecord: unreadable after" in str(err)
    assert "corrupted record at" in str(err)
    # Intact shards: the original error comes back (the loss is not in the shards).
    clean = write_tiny_dataset(unbalanced_dir.parent / "clean", counts=UNBALANCED)
    assert pipeline.explain_data_loss(clean, "train", info.value) is info.value


def test_find_corrupt_shards_checks_counts(unbalanced_dir):
    shards = records.split_shards(unbalanced_dir, records.read_manifest(unbalanced_dir), "train")
    assert pipeline.find_corrupt_shards(shards, "none", [8, 8]) == []
    bad = pipeline.find_corrupt_shards(shards, "none", [8, 9])
    assert len(bad) == 1 and bad[0][0] == shards[1] and "holds 8 records" in bad[0][1]


def _record_starts(path) -> list[int]:
    """Byte offset of each record of an uncompressed TFRecord file (length, crc, data, crc)."""
    data, starts, pos = path.read_bytes(), [], 0
    while pos < len(data):
        starts.append(pos)
        pos += 8 + 4 + int.from_bytes(data[pos:pos + 8], "little") + 4
    return starts


def test_skip_corrupt_drops_the_rest_of_the_shard_and_reports_it(unbalanced_dir, capfd):
    bad = unbalanced_dir / "train-00001-of-00002.tfrecord"
    starts = _record_starts(bad)
    assert len(starts) == 8
    _flip_byte(bad, (starts[2] + 12 + 5) / bad.stat().st_size)  # inside record 2's data
    ds = pipeline.make_eval_dataset(unbalanced_dir, "train", 4, skip_corrupt=True)
    n = sum(int(batch["image"].shape[0]) for batch in ds)
    # Shard 0 whole, shard 1 up to its bad record: records 3-7 are intact but lost as well.
    assert n == 8 + 2
    err = capfd.readouterr().err
    assert f'shard "{bad}" ended after 2 of 8 records; 6 records lost' in err, err[-2000:]
    assert "train-00000-of-00002" not in err  # the intact shard is not reported


def test_skip_corrupt_reports_a_truncated_shard(unbalanced_dir, capfd):
    bad = unbalanced_dir / "train-00001-of-00002.tfrecord"
    _truncate(bad)
    ds = pipeline.make_eval_dataset(unbalanced_dir, "train", 4, skip_corrupt=True)
    n = sum(int(batch["image"].shape[0]) for batch in ds)
    assert 8 <= n < 16  # shard 0 whole, shard 1 partly
    assert f"{n - 8} of 8 records; {16 - n} records lost" in capfd.readouterr().err


def test_bad_inputs_give_actionable_errors(tmp_path, unbalanced_dir):
    with pytest.raises(records.DataDirError, match="manifest.json is missing"):
        pipeline.make_train_dataset(tmp_path, 4)
    with pytest.raises(records.DataDirError, match="split 'val' is not in"):
        pipeline.make_eval_dataset(unbalanced_dir, "val", 4)
    with pytest.raises(ValueError, match="class_weights='equal'"):
        pipeline.make_train_dataset(unbalanced_dir, 4, class_weights="equal")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipeline.make_train_dataset(unbalanced_dir, 0)
    # A manifest that lies about the image size: the error names the data dir and the fix.
    manifest = records.read_manifest(unbalanced_dir)
    manifest["image_size"] = 32
    records.write_manifest(unbalanced_dir, manifest)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not 32x32 raw uint8.*re-run"):
        next(iter(pipeline.make_eval_dataset(unbalanced_dir, "train", 4)))


_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pneumo_tf.data import pipeline
    from pneumo_tf.image.augment import RandomAffine

    data_dir, per_replica = sys.argv[1], 3
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}

    def fn(ctx):
        return pipeline.make_eval_dataset(data_dir, "test", ctx.get_per_replica_batch_size(
            per_replica * ctx.num_replicas_in_sync), input_context=ctx)

    def paths_and_global_batches(dist):
        paths, sizes = [], []
        for batch in dist:
            parts = strategy.experimental_local_results(batch["path"])
            sizes.append(sum(int(p.shape[0]) for p in parts))
            paths += [s.decode() for p in parts for s in p.numpy()]
        return paths, sizes

    out["from_function"] = paths_and_global_batches(
        strategy.distribute_datasets_from_function(fn))
    global_ds = pipeline.make_eval_dataset(data_dir, "test", per_replica * 2)
    out["distribute_dataset"] = paths_and_global_batches(
        strategy.experimental_distribute_dataset(global_ds))

    # Training stream + the augmentation layer in a replicated step.
    train = strategy.distribute_datasets_from_function(lambda ctx: pipeline.make_train_dataset(
        data_dir, per_replica, input_context=ctx))
    with strategy.scope():
        layer = RandomAffine(seed=1, resampler="gather")

    @tf.function
    def step(batch):
        images = tf.repeat(tf.cast(batch["image"], tf.float32), 3, axis=-1)
        return layer(images, training=True)

    res = strategy.run(step, args=(next(iter(train)),))
    local = [r.numpy() for r in strategy.experimental_local_results(res)]
    out["train_shapes"] = [list(r.shape) for r in local]
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_strategy_two_replicas(tmp_path):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (6, 6), "test": (7, 6)},
                                  image_size=16, num_shards=2)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _DISTRIBUTED_SCRIPT, str(data_dir)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["replicas"] == 2
    every = {f"test/{i}.png" for i in range(13)}
    for key in ("from_function", "distribute_dataset"):
        paths, sizes = out[key]
        assert collections.Counter(paths) == collections.Counter(every), key  # each image once
        assert sizes[0] == 6, key  # global batch = 3 per replica x 2 replicas
    assert out["train_shapes"] == [[3, 16, 16, 3], [3, 16, 16, 3]]


# ---------------------------------------------------------------------------------------------
# Lung masks (a data dir converted with --masks)


@pytest.fixture(scope="module", params=["raw", "png"])
def masks_dir(request, tmp_path_factory):
    """Phantoms converted with --masks at 32 px; every third film's mask deleted first."""
    from pneumo_tf.data import convert, phantoms

    root = tmp_path_factory.mktemp(f"masks_{request.param}")
    phantoms.write_phantom_dataset(root / "src", num_train=12, num_test=6, seed=4, min_size=64,
                                   max_size=96)
    masks = root / "src" / phantoms.LUNG_MASKS_DIR
    for path in sorted(masks.rglob("*.png"))[::3]:
        path.unlink()
    convert.convert_dataset(root / "src", root / "out", image_size=32, workers=1,
                            progress=False, masks=str(masks), encoding=request.param,
                            num_shards=2)
    return root / "out"


def _stored_masks(data_dir, split):
    """``{path: (image [32, 32, 1] uint8, mask [32, 32] uint8 or None)}`` read straight from the
    records, independently of the pipeline."""
    manifest = records.read_manifest(data_dir)

    def decode(data):
        if manifest["encoding"] == "raw":
            return np.frombuffer(data, np.uint8).reshape(32, 32, 1)
        return tf.io.decode_png(data, channels=1).numpy()

    out = {}
    for shard in records.split_shards(data_dir, manifest, split):
        for raw in tf.data.TFRecordDataset(str(shard)):
            ex = tf.io.parse_single_example(raw, records.feature_spec())
            mask = decode(ex["lung_mask"].numpy())[..., 0] if ex["has_lung_mask"] else None
            out[ex["path"].numpy().decode()] = (decode(ex["image"].numpy()), mask)
    return out


def test_eval_stream_yields_the_stored_masks(masks_dir):
    stored = {p: m for p, (_, m) in _stored_masks(masks_dir, "test").items()}
    assert 0 < sum(m is None for m in stored.values()) < len(stored)
    seen = {}
    for batch in pipeline.make_eval_dataset(masks_dir, "test", 4, masks="all"):
        assert batch["lung_mask"].dtype == tf.uint8 and batch["has_lung_mask"].dtype == tf.bool
        for path, mask, has in zip(batch["path"].numpy(), batch["lung_mask"].numpy(),
                                   batch["has_lung_mask"].numpy()):
            seen[path.decode()] = (mask[..., 0], has)
    assert sorted(seen) == sorted(stored)
    for path, want in stored.items():
        mask, has = seen[path]
        assert has == (want is not None)
        np.testing.assert_array_equal(mask, np.zeros((32, 32), np.uint8) if want is None
                                      else want)
    only = [p.decode() for b in pipeline.make_eval_dataset(masks_dir, "test", 4, masks="only")
            for p in b["path"].numpy()]
    assert sorted(only) == sorted(p for p, m in stored.items() if m is not None)
    plain = next(iter(pipeline.make_eval_dataset(masks_dir, "test", 4)))
    assert "lung_mask" not in plain and "has_lung_mask" not in plain


def test_lung_train_stream_pairs_each_image_with_its_mask(masks_dir):
    stored = _stored_masks(masks_dir, "train")
    mask_of = {image.tobytes(): mask for image, mask in stored.values()}
    assert len(mask_of) == len(stored)
    ds = pipeline.make_lung_train_dataset(masks_dir, 3, seed=1)
    assert ds.element_spec["lung_mask"].shape.as_list() == [3, 32, 32, 1]
    for batch in ds.take(6):
        assert batch["has_lung_mask"].numpy().all()
        assert set(np.unique(batch["lung_mask"].numpy())) <= {0, 255}
        np.testing.assert_array_equal(batch["weight"].numpy(), np.ones(3, np.float32))
        for image, mask in zip(batch["image"].numpy(), batch["lung_mask"].numpy()):
            np.testing.assert_array_equal(mask[..., 0], mask_of[image.tobytes()])
    everything = pipeline.make_lung_train_dataset(masks_dir, 3, seed=1, masks="all")
    flags = np.concatenate([b["has_lung_mask"].numpy() for b in everything.take(12)])
    assert flags.any() and not flags.all()


def test_classifier_streams_ignore_masks(masks_dir, unbalanced_dir):
    batch = next(iter(pipeline.make_train_dataset(masks_dir, 4, class_weights="none")))
    assert sorted(batch) == ["image", "label", "subtype", "weight"]
    with pytest.raises(records.DataDirError, match=r"converted without --masks.*--masks=DIR"):
        pipeline.make_eval_dataset(unbalanced_dir, "test", 4, masks="all")
    with pytest.raises(records.DataDirError, match="converted without --masks"):
        pipeline.make_lung_train_dataset(unbalanced_dir, 4)
    with pytest.raises(ValueError, match=r"masks='some'; expected one of"):
        pipeline.make_eval_dataset(masks_dir, "test", 4, masks="some")
    with pytest.raises(ValueError, match="use make_train_dataset"):
        pipeline.make_lung_train_dataset(masks_dir, 4, masks="none")
