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


def _paths_of(dataset, n_batches=None):
    out = []
    for i, batch in enumerate(dataset):
        if n_batches is not None and i >= n_batches:
            break
        out.extend(p.decode() for p in batch["path"].numpy())
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


@pytest.mark.parametrize("cache", [False, True])
def test_training_batches_shapes_weights_and_epoch_coverage(unbalanced_dir, cache):
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, training=True, cache=cache, seed=1)
    assert ds.element_spec[0].shape.as_list() == [4, 16, 16, 1]  # fixed batch shape
    assert ds.element_spec[0].dtype == tf.uint8
    for images, labels, weights in ds.take(12):  # 3 epochs of 16 images: repeats forever
        assert images.shape == (4, 16, 16, 1) and labels.dtype == tf.float32
        want = np.where(labels.numpy() == 0, 2.0, 2.0 / 3.0)
        np.testing.assert_allclose(weights.numpy(), want, rtol=1e-6)
    # Each epoch of a training stream holds every image exactly once. Exactly: only in a
    # deterministic stream (with deterministic=False a batch may overtake the one before it,
    # across the epoch boundary too).
    meta = pipeline.make_dataset(unbalanced_dir, "train", 4, True, cache=cache, seed=1,
                                 deterministic=True, with_meta=True)
    seen = _paths_of(meta, n_batches=8)
    assert sorted(seen[:16]) == sorted(seen[16:]) and len(set(seen[:16])) == 16
    assert seen[:16] != seen[16:]  # reshuffled each epoch


def test_weights_none_and_without_weights(unbalanced_dir):
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, True, class_weights="none")
    _, _, w = next(iter(ds))
    np.testing.assert_array_equal(w.numpy(), np.ones(4, np.float32))
    pair = pipeline.make_dataset(unbalanced_dir, "train", 4, True, with_weights=False)
    assert len(pair.element_spec) == 2


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("encoding,compression", [("raw", "none"), ("png", "gzip")])
def test_eval_one_pass_in_file_order_with_exact_pixels(tmp_path, encoding, compression, cache):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"test": (5, 6)}, image_size=16,
                                  encoding=encoding, compression=compression, num_shards=2)
    truth = _all_records(data_dir, "test")
    ds = pipeline.make_dataset(data_dir, "test", 4, training=False, cache=cache, with_meta=True)
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
    assert set(batches[0]) == {"image", "label", "patient_id", "path"}


def test_raw_and_png_shards_give_identical_batches(tmp_path):
    raw = write_tiny_dataset(tmp_path / "raw", counts={"val": (3, 4)}, image_size=16, seed=3)
    png = write_tiny_dataset(tmp_path / "png", counts={"val": (3, 4)}, image_size=16, seed=3,
                             encoding="png", compression="gzip")
    a = list(pipeline.make_dataset(raw, "val", 3, False, with_weights=False))
    b = list(pipeline.make_dataset(png, "val", 3, False, with_weights=False))
    for (ia, la), (ib, lb) in zip(a, b):
        np.testing.assert_array_equal(ia.numpy(), ib.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())


def test_deterministic_order_follows_seed(unbalanced_dir):
    def order(seed, cache):
        ds = pipeline.make_dataset(unbalanced_dir, "train", 4, True, cache=cache, seed=seed,
                                   deterministic=True, with_meta=True)
        return _paths_of(ds, n_batches=8)

    for cache in (False, True):
        assert order(0, cache) == order(0, cache)
        assert order(0, cache) != order(1, cache)
    assert pipeline.make_dataset(unbalanced_dir, "train", 4, True,
                                 deterministic=True).options().deterministic is True
    assert pipeline.make_dataset(unbalanced_dir, "train", 4, True).options().deterministic is False


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

    assert not has_cache(pipeline.make_dataset(unbalanced_dir, "train", 4, True,
                                               cache_budget_bytes=need - 1))
    assert has_cache(pipeline.make_dataset(unbalanced_dir, "train", 4, True,
                                           cache_budget_bytes=need))


# 2 shards: file-level sharding; 1 (fewer than pipelines) and 3 (uneven): record-level.
@pytest.mark.parametrize("num_shards", [2, 1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_input_context_shards_disjoint_and_complete(tmp_path, num_shards, training):
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (4, 12)}, image_size=16,
                                  num_shards=num_shards)
    per_pipeline = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        # Deterministic: "the first 4 batches are one epoch" holds only in order.
        ds = pipeline.make_dataset(data_dir, "train", 2, training, input_context=ctx,
                                   deterministic=True, with_meta=True)
        per_pipeline.append(_paths_of(ds, n_batches=4))  # 8 images = one epoch per pipeline
    a, b = map(set, per_pipeline)
    assert len(a) == len(b) == 8 and not a & b and len(a | b) == 16


def test_file_sharding_only_when_files_divide_evenly():
    assert pipeline.file_sharding_is_even(4, 2) and pipeline.file_sharding_is_even(3, 1)
    assert pipeline.file_sharding_is_even(6, 3)
    assert not pipeline.file_sharding_is_even(4, 3)  # one pipeline would read 2 shards
    assert not pipeline.file_sharding_is_even(2, 3)


@pytest.mark.parametrize("cache", [False, True])
def test_uneven_shards_give_every_image_the_same_frequency(tmp_path, cache):
    # 3 shards of 4 images over 2 pipelines: by file, one pipeline would repeat 8 images and the
    # other 4 (seen twice as often); by record each pipeline repeats 6.
    data_dir = write_tiny_dataset(tmp_path / "d", counts={"train": (6, 6)}, image_size=16,
                                  num_shards=3)
    seen = collections.Counter()
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        ds = pipeline.make_dataset(data_dir, "train", 2, True, cache=cache, input_context=ctx,
                                   deterministic=True, with_meta=True)
        seen.update(_paths_of(ds, n_batches=12))  # 24 images = 4 epochs of 6 per pipeline
    assert len(seen) == 12 and set(seen.values()) == {4}, seen


def test_auto_shard_policy(unbalanced_dir, monkeypatch):
    policy = tf.data.experimental.AutoShardPolicy
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, True)
    assert ds.options().experimental_distribute.auto_shard_policy == policy.FILE
    cluster = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))  # 3 workers > 2 shards
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, True)
    assert ds.options().experimental_distribute.auto_shard_policy == policy.DATA
    three = write_tiny_dataset(unbalanced_dir.parent / "three", counts=UNBALANCED, image_size=16,
                               num_shards=3)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]}}))
    assert pipeline.make_dataset(unbalanced_dir, "train", 4, True).options() \
        .experimental_distribute.auto_shard_policy == policy.FILE  # 2 shards, 2 workers
    assert pipeline.make_dataset(three, "train", 4, True).options() \
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
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, training, cache=False)
    with pytest.raises(pipeline.CorruptShardError, match="train-00001-of-00002.tfrecord") as info:
        for _ in pipeline.iterate_checked(ds, unbalanced_dir, "train"):
            pass
    assert "Re-run the converter" in str(info.value) and "skip_corrupt" in str(info.value)
    assert [p.name for p, _ in info.value.shards] == [bad.name]
    assert isinstance(info.value.__cause__, pipeline.DATA_LOSS_ERRORS)


def test_explain_data_loss_for_a_fit_style_loop(unbalanced_dir):
    _flip_byte(unbalanced_dir / "train-00000-of-00002.tfrecord")
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, False)
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
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, False, skip_corrupt=True)
    n = sum(int(x.shape[0]) for x, _, _ in ds)
    # Shard 0 whole, shard 1 up to its bad record: records 3-7 are intact but lost as well.
    assert n == 8 + 2
    err = capfd.readouterr().err
    assert f'shard "{bad}" ended after 2 of 8 records; 6 records lost' in err, err[-2000:]
    assert "train-00000-of-00002" not in err  # the intact shard is not reported


def test_skip_corrupt_reports_a_truncated_shard(unbalanced_dir, capfd):
    bad = unbalanced_dir / "train-00001-of-00002.tfrecord"
    _truncate(bad)
    ds = pipeline.make_dataset(unbalanced_dir, "train", 4, False, skip_corrupt=True)
    n = sum(int(x.shape[0]) for x, _, _ in ds)
    assert 8 <= n < 16  # shard 0 whole, shard 1 partly
    assert f"{n - 8} of 8 records; {16 - n} records lost" in capfd.readouterr().err


def test_bad_inputs_give_actionable_errors(tmp_path, unbalanced_dir):
    with pytest.raises(records.DataDirError, match="manifest.json is missing"):
        pipeline.make_dataset(tmp_path, "train", 4, True)
    with pytest.raises(records.DataDirError, match="split 'val' is not in"):
        pipeline.make_dataset(unbalanced_dir, "val", 4, True)
    with pytest.raises(ValueError, match="class_weights='equal'"):
        pipeline.make_dataset(unbalanced_dir, "train", 4, True, class_weights="equal")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipeline.make_dataset(unbalanced_dir, "train", 0, True)
    # A manifest that lies about the image size: the error names the data dir and the fix.
    manifest = records.read_manifest(unbalanced_dir)
    manifest["image_size"] = 32
    records.write_manifest(unbalanced_dir, manifest)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not 32x32 raw uint8.*re-run"):
        next(iter(pipeline.make_dataset(unbalanced_dir, "train", 4, False)))


_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pneumo_tf.data import pipeline
    from pneumo_tf.augment import RandomAffine

    data_dir, per_replica = sys.argv[1], 3
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}

    def fn(ctx):
        return pipeline.make_dataset(data_dir, "test", ctx.get_per_replica_batch_size(
            per_replica * ctx.num_replicas_in_sync), False, input_context=ctx, with_meta=True)

    def paths_and_global_batches(dist):
        paths, sizes = [], []
        for batch in dist:
            parts = strategy.experimental_local_results(batch["path"])
            sizes.append(sum(int(p.shape[0]) for p in parts))
            paths += [s.decode() for p in parts for s in p.numpy()]
        return paths, sizes

    out["from_function"] = paths_and_global_batches(
        strategy.distribute_datasets_from_function(fn))
    global_ds = pipeline.make_dataset(data_dir, "test", per_replica * 2, False, with_meta=True)
    out["distribute_dataset"] = paths_and_global_batches(
        strategy.experimental_distribute_dataset(global_ds))

    # Training stream + the augmentation layer in a replicated step.
    train = strategy.distribute_datasets_from_function(lambda ctx: pipeline.make_dataset(
        data_dir, "train", per_replica, True, input_context=ctx))
    with strategy.scope():
        layer = RandomAffine(seed=1, resampler="gather")

    @tf.function
    def step(batch):
        images = tf.repeat(tf.cast(batch[0], tf.float32), 3, axis=-1)
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
