"""tf.data input pipeline: TFRecord shards + manifest.json -> uint8 batches for the accelerator.

Graph built by :func:`make_dataset` (per input pipeline, i.e. per worker)::

    shard files (manifest order) -> [shard files across workers]
      -> [shuffle files, training & streaming] -> interleave TFRecordDataset (parallel)
      -> [shard records across workers, when the files do not divide evenly among them]
      streaming (cache off):                 cached (cache on):
        -> [shuffle serialized records]        -> batch -> parse_example + decode (vectorised)
        -> [repeat]                            -> unbatch -> cache (decoded uint8, in RAM)
        -> batch -> parse_example + decode     -> [shuffle] -> [repeat] -> batch
      -> sample weights -> prefetch(AUTOTUNE)

Sharding across input pipelines (workers) is by file only when every pipeline gets the same number
of files (shards divisible by pipelines): each pipeline repeats its own files, so with 4 shards
and 3 pipelines one pipeline would read 2 shards and the others 1, and the images of the single
shards would be seen twice as often per step. Otherwise every pipeline reads all files and keeps
every n-th record (record-level, like ``AutoShardPolicy.DATA``).

Records are parsed a whole batch at a time (one ``parse_example`` and one ``decode_raw`` per batch
instead of one per image): per-element tf.data overhead, not I/O, bounds a pipeline over small
images. Images stay ``[B, S, S, 1] uint8`` here; float conversion, 3-channel replication and
augmentation run on the device (:mod:`pneumo_tf.model`, :mod:`pneumo_tf.augment`).

Order and epochs. A training stream repeats before it batches, so batches run across epoch
boundaries. With ``deterministic=True`` the order is a function of the seed and every run of
one epoch's images holds each image exactly once. With ``deterministic=False`` (the training
default) the parallel stages after the repeat hand out batches as they finish, so a batch of the
next epoch may come before the last batch of this one: every image is still seen equally often
over the stream, but an epoch-long run of batches need not hold each image exactly once.

Corrupt shards: TensorFlow's ``DataLossError`` (bad CRC) names only a record offset, not the
file, and a shard truncated mid-record simply ends early without any error; the pipeline therefore
asserts each shard's record count from the manifest (``FailedPreconditionError`` at the end of a
short shard). Both errors are :data:`DATA_LOSS_ERRORS`. Training and evaluation loops should either
iterate with :func:`iterate_checked` or wrap their loop in::

    try:
        model.fit(ds, ...)
    except DATA_LOSS_ERRORS as e:
        raise explain_data_loss(data_dir, "train", e) from e

:func:`explain_data_loss` CRC-scans the split's shards (:func:`find_corrupt_shards`) and returns a
:class:`CorruptShardError` naming each bad shard and the fix.

``skip_corrupt=True`` loses more than the bad record: a TFRecord file cannot be resynchronised
after a bad record, so the rest of that shard is dropped too (tf.data's ``ignore_errors`` ends the
shard's reader at the first error). Each time a shard is read short, the pipeline prints to stderr
the shard, the records read and the number lost against the manifest's ``shard_counts``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import tensorflow as tf

from pneumo_tf.data import records

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
CLASS_WEIGHT_MODES = ("balanced", "none")
# Fraction of MemAvailable the automatic cache may use (cache=None).
DEFAULT_CACHE_FRACTION = 0.25
# Streaming shuffle buffer: bytes of serialized records it may hold (cached data shuffles fully).
# Small on purpose: records wait in it long enough to fall out of the CPU caches, so a big buffer
# costs CPU per image (measured with tools/bench_input); files are shuffled each epoch and read
# interleaved on top of it, and the converter writes records in shuffled order.
STREAMING_SHUFFLE_BYTES = 32 * 2**20
# Bytes per record beside the image (label, ids, path, crop box, proto framing): an estimate.
RECORD_OVERHEAD_BYTES = 256
# Files read at once by the parallel interleave (more only adds memory on local disks).
INTERLEAVE_CYCLE = 4


# What reading a corrupt (bad CRC) or truncated (short record count) shard raises in tf.data.
DATA_LOSS_ERRORS = (tf.errors.DataLossError, tf.errors.FailedPreconditionError)


class CorruptShardError(records.DataDirError):
    """One or more shards of a split are corrupt or truncated.

    Attributes:
        shards: ``[(path, reason), ...]`` for every bad shard found.
    """

    def __init__(self, message: str, shards: list[tuple[Path, str]]):
        super().__init__(message)
        self.shards = shards


def dataset_size(data_dir: str | os.PathLike, split: str) -> int:
    """Number of images in ``split`` of ``data_dir``, from its manifest."""
    manifest = records.read_manifest(data_dir)
    records.split_shards(data_dir, manifest, split)  # same checks/errors as make_dataset
    return int(manifest["splits"][split]["count"])


def available_memory_bytes() -> int:
    """Memory the OS can give without swapping (``MemAvailable``), bytes; 0 if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def decoded_split_bytes(manifest: dict, split: str, num_pipelines: int = 1) -> int:
    """Estimated RAM of one pipeline's share of ``split`` decoded and cached, bytes."""
    size = int(manifest["image_size"])
    channels = int(manifest.get("channels", 1))
    count = -(-int(manifest["splits"][split]["count"]) // max(1, num_pipelines))
    return count * (size * size * channels + RECORD_OVERHEAD_BYTES)


def resolve_cache(cache: bool | None, manifest: dict, split: str, num_pipelines: int = 1,
                  cache_budget_bytes: int | None = None) -> bool:
    """Whether to cache decoded images in RAM.

    Args:
        cache: True forces the cache (warns when over budget), False streams, None decides from
            the budget.
        cache_budget_bytes: RAM the cache may take; None = 25 % of ``MemAvailable``.
    """
    need = decoded_split_bytes(manifest, split, num_pipelines)
    budget = (int(DEFAULT_CACHE_FRACTION * available_memory_bytes())
              if cache_budget_bytes is None else int(cache_budget_bytes))
    if cache is None:
        use = need <= budget
        log.info("split %s: decoded size %.1f MiB, cache budget %.1f MiB -> %s", split,
                 need / 2**20, budget / 2**20, "cache in RAM" if use else "stream from shards")
        return use
    if cache and need > budget:
        log.warning("split %s: caching %.1f MiB although the budget is %.1f MiB (cache=True)",
                    split, need / 2**20, budget / 2**20)
    return bool(cache)


def _num_workers_from_tf_config() -> int:
    """Workers in ``TF_CONFIG`` (chief + workers), 1 when it is unset or unreadable."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        return 1
    return max(1, len(cluster.get("worker", [])) + len(cluster.get("chief", [])))


def file_sharding_is_even(num_files: int, num_pipelines: int) -> bool:
    """Whether sharding by file gives every input pipeline the same number of files.

    Each pipeline repeats its own files, so uneven file counts would oversample the images of
    the pipelines with fewer files; record-level sharding is used instead.
    """
    return num_files >= num_pipelines and num_files % num_pipelines == 0


def _report_short_shard(records_ds: tf.data.Dataset, path: tf.Tensor,
                        expected: tf.Tensor) -> tf.data.Dataset:
    """The records of one shard, printing a warning to stderr if it ends short of ``expected``.

    For ``skip_corrupt``: counts the records that came through and, at the shard's end, prints
    the shard, the count and the records lost (the manifest's count minus it). A negative
    ``expected`` (count unknown) prints nothing. Costs a few tf.data steps per record, so it is
    only used when skipping.
    """
    end_marker = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
    tagged = records_ds.map(lambda r: (r, tf.constant(False))).concatenate(end_marker)

    def count(n, element):
        record, is_end = element
        return n + tf.cast(tf.logical_not(is_end), tf.int64), (record, is_end, n)

    def keep(record, is_end, n):
        def warn():
            lost = expected - n
            with tf.control_dependencies([tf.print(
                    "WARNING: skip_corrupt: shard", path, "ended after", n, "of", expected,
                    "records;", lost, "records lost (a corrupt record ends its shard's "
                    "reader); re-run the converter to restore them", output_stream=sys.stderr)]):
                return tf.constant(False)

        short = tf.logical_and(is_end, tf.logical_and(expected >= 0, n < expected))
        return tf.cond(short, warn, lambda: tf.logical_not(is_end))

    return tagged.scan(tf.constant(0, tf.int64), count).filter(keep).map(
        lambda record, is_end, n: record)


def _parse_batch_fn(manifest: dict, data_dir, with_meta: bool):
    """A function: ``[N] string`` serialized Examples -> dict of decoded tensors (one batch)."""
    size = int(manifest["image_size"])
    encoding = manifest["encoding"]
    if encoding not in records.ENCODINGS:
        raise records.DataDirError(f"{Path(data_dir) / records.MANIFEST_NAME}: unknown encoding "
                                   f"{encoding!r} (expected one of {records.ENCODINGS}); "
                                   f"re-run the converter")
    full_spec = records.feature_spec()
    keys = ["image", "label"] + (["patient_id", "path"] if with_meta else [])
    spec = {k: full_spec[k] for k in keys}
    raw_len_msg = (f"records in {data_dir} are not {size}x{size} raw uint8 images as its "
                   f"manifest.json says; the shards and manifest disagree, re-run the converter")

    def decode_png(png):
        return tf.ensure_shape(tf.io.decode_png(png, channels=1), [size, size, 1])

    def parse(serialized):
        ex = tf.io.parse_example(serialized, spec)
        if encoding == "raw":
            check = tf.debugging.assert_equal(tf.strings.length(ex["image"]), size * size,
                                              message=raw_len_msg)
            with tf.control_dependencies([check]):
                flat = tf.io.decode_raw(ex["image"], tf.uint8)
            n = serialized.shape[0]  # static when batched with drop_remainder: keep it
            images = tf.reshape(flat, [-1 if n is None else n, size, size, 1])
        else:
            images = tf.map_fn(decode_png, ex["image"],
                               fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8))
        out = {"image": images, "label": tf.cast(ex["label"], tf.float32)}
        if with_meta:
            out["patient_id"] = ex["patient_id"]
            out["path"] = ex["path"]
        return out

    return parse


def _class_weight_table(manifest: dict, data_dir, class_weights: str) -> tf.Tensor:
    """``[2] float32``: sample weight of label 0 and label 1."""
    if class_weights not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class_weights={class_weights!r}; expected one of {CLASS_WEIGHT_MODES}")
    if class_weights == "none":
        return tf.constant([1.0, 1.0], tf.float32)
    weights = manifest.get("class_weights") or {}
    if "0" not in weights or "1" not in weights:
        raise records.DataDirError(
            f"{Path(data_dir) / records.MANIFEST_NAME} has no class_weights {{'0': .., '1': ..}} "
            f"(it has {weights!r}); re-run the converter or use class_weights='none'")
    return tf.constant([float(weights["0"]), float(weights["1"])], tf.float32)


def make_dataset(data_dir: str | os.PathLike, split: str, batch_size: int, training: bool,
                 cache: bool | None = None, *, seed: int = 0, deterministic: bool | None = None,
                 with_weights: bool = True, class_weights: str = "balanced",
                 repeat: bool | None = None, drop_remainder: bool | None = None,
                 input_context: tf.distribute.InputContext | None = None,
                 skip_corrupt: bool = False, cache_budget_bytes: int | None = None,
                 shuffle_buffer: int | None = None, with_meta: bool = False) -> tf.data.Dataset:
    """Batches of one split of a converter output directory (see the module docstring).

    Args:
        data_dir: converter output (shards + ``manifest.json``).
        split: ``train`` | ``val`` | ``test`` (any split the manifest lists).
        batch_size: images per batch: per replica when ``input_context`` is given
            (``distribute_datasets_from_function``), else the global batch
            (``experimental_distribute_dataset`` splits it across replicas).
        training: True -> seeded shuffle, repeat forever, fixed batch shape; False -> one pass in
            file order, the last partial batch kept.
        cache: True caches decoded images in RAM, False streams from the shards every epoch, None
            caches when the decoded split fits ``cache_budget_bytes``.
        seed: seed of the file and record shuffles.
        deterministic: True -> the same order on every run (deterministic interleave and maps,
            ``options.deterministic``); False -> throughput first (elements may come out of
            order); None -> ``not training`` (evaluation is always in file order).
        with_weights: also yield per-image sample weights.
        class_weights: ``balanced`` -> weights from the manifest's ``class_weights`` (sklearn
            "balanced", from the train split); ``none`` -> all ones.
        repeat: repeat forever; None -> ``training``.
        drop_remainder: drop the last partial batch (static batch shape); None -> ``training``.
        input_context: from ``strategy.distribute_datasets_from_function``: this pipeline reads
            shard files ``input_pipeline_id::num_input_pipelines`` when the shard count is a
            multiple of the pipeline count, else every n-th record of all files (so every image
            is seen equally often).
        skip_corrupt: do not fail on a corrupt or truncated shard: read each shard up to its
            first bad record and DROP THE REST OF THAT SHARD (a TFRecord reader cannot resume
            after a bad record), skipping the shard count check. Each short shard prints a
            warning to stderr naming it with the records read and lost (vs the manifest's
            ``shard_counts``) each time the shard is read (every epoch when streaming, once
            when cached). Off by default: a corrupt shard must not silently shrink a split.
        cache_budget_bytes: RAM the automatic cache may use, bytes; None = 25 % of MemAvailable.
        shuffle_buffer: records in the shuffle buffer; None = the whole (per-pipeline) split when
            cached, else as many serialized records as fit in 32 MiB (650 at 224 px).
        with_meta: yield dicts ``{"image", "label", "patient_id", "path"}`` (evaluation,
            Grad-CAM) instead of tuples; ``with_weights`` is then ignored.

    Returns:
        ``tf.data.Dataset`` of ``(images [B, S, S, 1] uint8, labels [B] float32,
        sample_weights [B] float32)``, or ``(images, labels)`` when ``with_weights=False``, or the
        ``with_meta`` dict (``patient_id``, ``path``: ``[B]`` string).

    Raises:
        records.DataDirError: missing/incomplete data dir, unknown split, missing shard, unknown
            encoding, no class weights; the message names the file and the fix.
        ValueError: bad argument values.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = records.read_manifest(data_dir)
    paths = records.split_shards(data_dir, manifest, split)
    compression = manifest["compression"]
    if compression not in records.COMPRESSIONS:
        raise records.DataDirError(f"{Path(data_dir) / records.MANIFEST_NAME}: unknown compression "
                                   f"{compression!r}; re-run the converter")
    weight_table = _class_weight_table(manifest, data_dir, class_weights) if with_weights else None
    parse_batch = _parse_batch_fn(manifest, data_dir, with_meta)
    deterministic = (not training) if deterministic is None else bool(deterministic)
    repeat = training if repeat is None else bool(repeat)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)

    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    shard_files = num_pipelines > 1 and file_sharding_is_even(len(paths), num_pipelines)
    shard_records = num_pipelines > 1 and not shard_files
    use_cache = resolve_cache(cache, manifest, split, num_pipelines, cache_budget_bytes)

    # Expected records per shard: TFRecordDataset ends quietly at a shard truncated mid-record,
    # so each shard's count is asserted (an error at the shard's end) unless skipping is asked,
    # when a short shard is reported instead.
    counts = manifest["splits"][split].get("shard_counts")
    counts_known = counts is not None and len(counts) == len(paths)
    check_counts = not skip_corrupt and counts_known
    counts = [int(c) for c in counts] if counts_known else [-1] * len(paths)
    files = tf.data.Dataset.from_tensor_slices(
        ([str(p) for p in paths], tf.constant(counts, tf.int64)))
    if shard_files:
        files = files.shard(num_pipelines, pipeline_id)
    # Record-level sharding needs the same record order in every pipeline: no file shuffle and
    # a deterministic interleave upstream of the shard.
    shuffle_files = training and not use_cache and not shard_records
    if shuffle_files:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    compression_type = records.tf_compression_type(compression)

    def read_file(path, count):
        ds = tf.data.TFRecordDataset(path, compression_type=compression_type,
                                     buffer_size=4 * 2**20)
        if skip_corrupt:
            ds = _report_short_shard(ds.ignore_errors(log_warning=True), path, count)
        elif check_counts:
            ds = ds.apply(tf.data.experimental.assert_cardinality(count))
        return ds

    if training:
        det_read = deterministic or shard_records
        ds = files.interleave(read_file, cycle_length=min(len(paths), INTERLEAVE_CYCLE),
                              block_length=1, num_parallel_calls=AUTOTUNE,
                              deterministic=det_read)
    else:
        # Evaluation reads the files one after another: the manifest's order, record by record.
        ds = files.interleave(read_file, cycle_length=1, num_parallel_calls=None)
    if shard_records:
        ds = ds.shard(num_pipelines, pipeline_id)

    if use_cache:
        parse_size = max(batch_size, 64)
        ds = ds.batch(parse_size).map(parse_batch, num_parallel_calls=AUTOTUNE,
                                      deterministic=True).unbatch().cache()
        if training:
            n = -(-int(manifest["splits"][split]["count"]) // num_pipelines)
            ds = ds.shuffle(shuffle_buffer or n, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                      num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    else:
        if training:
            size = int(manifest["image_size"])
            default_buf = max(batch_size, STREAMING_SHUFFLE_BYTES // (size * size + 1))
            n = -(-int(manifest["splits"][split]["count"]) // num_pipelines)
            ds = ds.shuffle(shuffle_buffer or min(n, default_buf), seed=seed,
                            reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(parse_batch, num_parallel_calls=AUTOTUNE, deterministic=deterministic)

    if with_meta:
        out = ds
    elif weight_table is not None:
        out = ds.map(lambda b: (b["image"], b["label"],
                                tf.gather(weight_table, tf.cast(b["label"], tf.int32))))
    else:
        out = ds.map(lambda b: (b["image"], b["label"]))
    out = out.prefetch(AUTOTUNE)

    options = tf.data.Options()
    options.deterministic = deterministic
    policy = tf.data.experimental.AutoShardPolicy
    if input_context is not None:
        options.experimental_distribute.auto_shard_policy = policy.OFF  # sharded above
    else:
        options.experimental_distribute.auto_shard_policy = (
            policy.FILE if file_sharding_is_even(len(paths), _num_workers_from_tf_config())
            else policy.DATA)
    return out.with_options(options)


def find_corrupt_shards(paths: Iterable[str | os.PathLike], compression: str = "none",
                        expected_counts: Iterable[int] | None = None) -> list[tuple[Path, str]]:
    """CRC-scan shards: read every record of each shard on its own.

    Args:
        paths: shard files.
        compression: ``none`` | ``gzip`` (the manifest's ``compression``).
        expected_counts: records each shard should hold (the manifest's ``shard_counts``); a
            shard truncated exactly at a record boundary reads cleanly and is only caught by
            its count.

    Returns:
        ``[(path, reason), ...]`` for the bad shards, in input order; empty when all are fine.
    """
    paths = [Path(p) for p in paths]
    expected = list(expected_counts) if expected_counts is not None else [None] * len(paths)
    bad = []
    for path, want in zip(paths, expected):
        if not path.is_file():
            bad.append((path, "missing"))
            continue
        n = 0
        try:
            # Record by record (not batched) so the report says where the damage starts.
            for _ in tf.data.TFRecordDataset(str(path), records.tf_compression_type(compression)):
                n += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError,
                tf.errors.OutOfRangeError) as e:
            bad.append((path, f"unreadable after {n} good records: {records.tf_error_text(e)}"))
            continue
        if want is not None and n != int(want):
            bad.append((path, f"holds {n} records, the manifest says {want} (truncated?)"))
    return bad


def explain_data_loss(data_dir: str | os.PathLike, split: str,
                      error: BaseException | None = None) -> CorruptShardError | BaseException:
    """Turn a :data:`DATA_LOSS_ERRORS` error (no file named) into one naming the bad shards.

    Scans the split's shards with :func:`find_corrupt_shards`.

    Returns:
        A :class:`CorruptShardError` naming the bad shard(s) and the fix, to raise ``from error``;
        ``error`` itself when the scan finds every shard intact (the loss lies elsewhere).
    """
    manifest = records.read_manifest(data_dir)
    info = manifest["splits"][split]
    paths = [Path(data_dir) / name for name in info["shards"]]
    bad = find_corrupt_shards(paths, manifest["compression"], info.get("shard_counts"))
    if not bad:
        return error if error is not None else CorruptShardError(
            f"no corrupt shard found in split {split!r} of {data_dir}", [])
    lines = "; ".join(f"{p}: {reason}" for p, reason in bad)
    cause = f" (tf.data said: {records.tf_error_text(error)})" if error is not None else ""
    return CorruptShardError(
        f"corrupt shard(s) in split {split!r} of {data_dir}: {lines}{cause}. Re-run the converter "
        f"(`tools/make_tfrecords --out={data_dir} ...`) or pass skip_corrupt=True "
        f"(--skip_corrupt) to skip unreadable records.", bad)


def iterate_checked(dataset: tf.data.Dataset, data_dir: str | os.PathLike,
                    split: str) -> Iterator:
    """Iterate ``dataset`` eagerly; :data:`DATA_LOSS_ERRORS` become a :class:`CorruptShardError`.

    For custom loops and evaluation; wrap ``model.fit`` with :func:`explain_data_loss` instead.
    """
    try:
        for element in dataset:
            yield element
    except DATA_LOSS_ERRORS as e:
        raise explain_data_loss(data_dir, split, e) from e
