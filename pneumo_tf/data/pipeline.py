"""tf.data input pipeline: TFRecord shards + manifest.json -> uint8 batches for the accelerator.

Two builders, one per use (like big_vision's ``make_for_train`` / ``make_for_inference``):

* :func:`make_train_dataset`: the train split, seeded shuffle, repeated forever, a fixed batch
  shape; dicts ``{"image", "label", "subtype", "weight"}``. No strings: MirroredStrategy places
  every tensor of a batch on the replicas' devices, and a string tensor cannot live on a GPU.
* :func:`make_eval_dataset`: one pass over any split in the manifest's file order, the last
  partial batch kept; the same keys plus ``"patient_id"`` and ``"path"``.

A data dir converted with ``--masks`` also gives lung masks: ``make_eval_dataset(...,
masks="all" | "only")`` adds ``"lung_mask"`` and ``"has_lung_mask"``, and
:func:`make_lung_train_dataset` is the training stream with them (a lung segmentation task).
Classifier streams never read the mask features.

:func:`make_dataset` is the older single entry point, a thin wrapper that yields tuples for
``keras.Model.fit``.

Both are chained from the same named stages (per input pipeline, i.e. per worker)::

    plan_shards    the shard files this pipeline reads and how it shares them with the others
    read_records   shard files -> serialized records:
                     [shuffle files, training & streaming] -> interleave TFRecordDataset
                     -> [keep every n-th record, when sharding by record]
    then either
      streamed:      [shuffle records] -> [repeat] -> batch -> parse (batch_parser)
      cached:        batch -> parse -> unbatch -> cache (decoded uint8, in RAM)
                     -> [shuffle] -> [repeat] -> batch
    weights        + per-image sample weight from the manifest's class (or subtype) weights
    finish         prefetch(AUTOTUNE), determinism and auto-shard options

Sharding across input pipelines (workers) is by file only when every pipeline gets the same number
of files (shards divisible by pipelines): each pipeline repeats its own files, so with 4 shards
and 3 pipelines one pipeline would read 2 shards and the others 1, and the images of the single
shards would be seen twice as often per step. Otherwise every pipeline reads all files and keeps
every n-th record (record-level, like ``AutoShardPolicy.DATA``).

Records are parsed a whole batch at a time (one ``parse_example`` and one ``decode_raw`` per batch
instead of one per image): per-element tf.data overhead, not I/O, bounds a pipeline over small
images. Images stay ``[B, S, S, 1] uint8`` here; float conversion, 3-channel replication and
augmentation run on the device (:mod:`pneumo_tf.modeling.model`, :mod:`pneumo_tf.image.augment`).

Decoded images are cached in RAM when the pipeline's share of the split fits the cache budget
(:func:`resolve_cache`: 25 % of ``MemAvailable`` unless told otherwise); else they are streamed
from the shards every epoch.

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

Auto-shard policy: without an ``input_context`` the datasets carry ``AutoShardPolicy.FILE`` when
the shards divide evenly among the workers in ``TF_CONFIG``, else ``DATA``; with one, ``OFF``
(the pipeline has sharded itself).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import tensorflow as tf

from pneumo_tf.data import records

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
# tf.data traces the functions it maps with AutoGraph unless told not to. None of the pipeline's
# functions has Python control flow on tensors (they branch with tf.cond and tf.where), so they
# skip AutoGraph's source rewrite, as the package's tf.functions do (autograph=False).
without_autograph = tf.autograph.experimental.do_not_convert
# Per-image sample weights: by label from the manifest's class_weights, by subtype from its
# subtype_class_weights (unknown subtype: 0), or none (all ones).
CLASS_WEIGHT_MODES = ("balanced", "balanced_subtype", "none")
# Lung masks in a stream (a data dir converted with --masks): none (no mask keys), all (every
# film; a film without a mask yields zeros and has_lung_mask False), only (films with a mask).
MASK_MODES = ("none", "all", "only")
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
    records.split_shards(data_dir, manifest, split)  # same checks/errors as the builders
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
        log.debug("split %s: decoded size %.1f MiB, cache budget %.1f MiB -> %s", split,
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


# ---------------------------------------------------------------------------------------------
# Stages


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What one input pipeline reads of a split (made by :func:`plan_shards`).

    Attributes:
        paths: shard files this pipeline reads, in manifest order (every file of the split when
            the pipelines share it by record).
        counts: records in each of ``paths`` (the manifest's ``shard_counts``); -1 = unknown.
        compression: ``none`` | ``gzip`` (the manifest's ``compression``).
        num_pipelines: input pipelines sharing the split (1 without an input context).
        pipeline_id: this pipeline's index among them.
        by_record: the pipelines share the split by record (this one keeps every
            ``num_pipelines``-th record from ``pipeline_id``) rather than by file.
        records_per_pipeline: the split's images divided among the pipelines, rounded up.
        split_files: shard files of the whole split (for the auto-shard policy).
    """

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    compression: str = "none"
    num_pipelines: int = 1
    pipeline_id: int = 0
    by_record: bool = False
    records_per_pipeline: int = 0
    split_files: int = 0

    @property
    def counts_known(self) -> bool:
        """Whether the manifest gives every shard's record count (so it can be asserted)."""
        return all(c >= 0 for c in self.counts)


def plan_shards(data_dir: str | os.PathLike, manifest: dict, split: str,
                input_context: tf.distribute.InputContext | None = None) -> ShardPlan:
    """The shard files of ``split`` this input pipeline reads (see the module docstring).

    Raises:
        records.DataDirError: unknown split, missing shard or unknown compression; the message
            names the file and the fix.
    """
    paths = [str(p) for p in records.split_shards(data_dir, manifest, split)]
    compression = manifest["compression"]
    if compression not in records.COMPRESSIONS:
        raise records.DataDirError(f"{Path(data_dir) / records.MANIFEST_NAME}: unknown compression "
                                   f"{compression!r}; re-run the converter")
    info = manifest["splits"][split]
    counts = info.get("shard_counts")
    counts = [int(c) for c in counts] if counts and len(counts) == len(paths) else [-1] * len(paths)
    num = input_context.num_input_pipelines if input_context else 1
    pid = input_context.input_pipeline_id if input_context else 0
    by_file = num > 1 and file_sharding_is_even(len(paths), num)
    return ShardPlan(
        paths=tuple(paths[pid::num] if by_file else paths),
        counts=tuple(counts[pid::num] if by_file else counts), compression=compression,
        num_pipelines=num, pipeline_id=pid, by_record=num > 1 and not by_file,
        records_per_pipeline=-(-int(info["count"]) // num), split_files=len(paths))


def _report_short_shard(records_ds: tf.data.Dataset, path: tf.Tensor,
                        expected: tf.Tensor) -> tf.data.Dataset:
    """The records of one shard, printing a warning to stderr if it ends short of ``expected``.

    For ``skip_corrupt``: counts the records that came through and, at the shard's end, prints
    the shard, the count and the records lost (the manifest's count minus it). A negative
    ``expected`` (count unknown) prints nothing. Costs a few tf.data steps per record, so it is
    only used when skipping.
    """
    end_marker = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
    tagged = records_ds.map(without_autograph(lambda r: (r, tf.constant(False))))
    tagged = tagged.concatenate(end_marker)

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

    counted = tagged.scan(tf.constant(0, tf.int64), without_autograph(count))
    return counted.filter(without_autograph(keep)).map(
        without_autograph(lambda record, is_end, n: record))


def _shard_reader(compression: str, skip_corrupt: bool, check_counts: bool):
    """A function ``(path, expected count) -> records of that shard`` for ``interleave``.

    TFRecordDataset ends quietly at a shard truncated mid-record, so each shard's count is
    asserted (an error at the shard's end) unless skipping is asked, when a short shard is
    reported instead.
    """
    compression_type = records.tf_compression_type(compression)

    def read(path, count):
        ds = tf.data.TFRecordDataset(path, compression_type=compression_type,
                                     buffer_size=4 * 2**20)
        if skip_corrupt:
            return _report_short_shard(ds.ignore_errors(log_warning=True), path, count)
        if check_counts:
            return ds.apply(tf.data.experimental.assert_cardinality(count))
        return ds

    return without_autograph(read)


def read_records(plan: ShardPlan, *, interleave: bool = False, deterministic: bool = True,
                 file_shuffle_seed: int | None = None,
                 skip_corrupt: bool = False) -> tf.data.Dataset:
    """Serialized records (``[] string``) of the planned shards, in the planned order.

    Args:
        plan: from :func:`plan_shards`.
        interleave: read up to :data:`INTERLEAVE_CYCLE` files at once, in parallel (training);
            False reads the files one after another, record by record, in manifest order.
        deterministic: with ``interleave``, keep a fixed order across files.
        file_shuffle_seed: shuffle the files, differently each epoch (None: manifest order).
        skip_corrupt: read each shard up to its first bad record and report what was lost, instead
            of failing (see the module docstring).
    """
    files = tf.data.Dataset.from_tensor_slices(
        (list(plan.paths), tf.constant(plan.counts, tf.int64)))
    # Sharding by record needs the same record order in every pipeline: the files in manifest
    # order and a deterministic interleave upstream of the shard.
    if file_shuffle_seed is not None and not plan.by_record:
        files = files.shuffle(len(plan.paths), seed=file_shuffle_seed,
                              reshuffle_each_iteration=True)
    read = _shard_reader(plan.compression, skip_corrupt, plan.counts_known)
    if interleave:
        ds = files.interleave(read, cycle_length=min(len(plan.paths), INTERLEAVE_CYCLE),
                              block_length=1, num_parallel_calls=AUTOTUNE,
                              deterministic=deterministic or plan.by_record)
    else:
        ds = files.interleave(read, cycle_length=1, num_parallel_calls=None)
    if plan.by_record:
        ds = ds.shard(plan.num_pipelines, plan.pipeline_id)
    return ds


def _mask_decoder(size: int, encoding: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function: ``[N] string`` stored lung masks -> ``[N, S, S, 1] uint8`` (0/255); an empty
    string (a film without a mask) decodes to zeros."""
    zeros = tf.zeros([size, size, 1], tf.uint8)

    if encoding == "raw":
        def decode(strings):
            blank = tf.constant(bytes(size * size))
            filled = tf.where(tf.strings.length(strings) == 0, blank, strings)
            return tf.reshape(tf.io.decode_raw(filled, tf.uint8), [-1, size, size, 1])
        return decode

    def one(png):
        return tf.cond(tf.strings.length(png) > 0,
                       lambda: tf.ensure_shape(tf.io.decode_png(png, channels=1),
                                               [size, size, 1]),
                       lambda: zeros)

    return lambda strings: tf.map_fn(
        one, strings, fn_output_signature=tf.TensorSpec([size, size, 1], tf.uint8))


def batch_parser(manifest: dict, data_dir: str | os.PathLike,
                 with_meta: bool, with_masks: bool = False) -> Callable[[tf.Tensor], dict]:
    """A function: ``[N] string`` serialized Examples -> one batch of decoded tensors.

    The batch is ``{"image": [N, S, S, 1] uint8, "label": [N] float32, "subtype": [N] int32}``
    (subtype 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown; -1 for every record of a version-1
    data dir), plus ``"patient_id"`` and ``"path"`` (``[N] string``) with ``with_meta``, plus
    ``"lung_mask"`` (``[N, S, S, 1] uint8``, 0/255, zeros for a film without one) and
    ``"has_lung_mask"`` (``[N] bool``) with ``with_masks``.

    Raises:
        records.DataDirError: the manifest names an unknown encoding.
    """
    size = int(manifest["image_size"])
    encoding = manifest["encoding"]
    if encoding not in records.ENCODINGS:
        raise records.DataDirError(f"{Path(data_dir) / records.MANIFEST_NAME}: unknown encoding "
                                   f"{encoding!r} (expected one of {records.ENCODINGS}); "
                                   f"re-run the converter")
    full_spec = records.feature_spec()
    keys = ["image", "label", "subtype"] + (["patient_id", "path"] if with_meta else [])
    keys += ["lung_mask", "has_lung_mask"] if with_masks else []
    spec = {k: full_spec[k] for k in keys}
    decode_masks = _mask_decoder(size, encoding)
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
        out = {"image": images, "label": tf.cast(ex["label"], tf.float32),
               "subtype": tf.cast(ex["subtype"], tf.int32)}
        if with_meta:
            out["patient_id"] = ex["patient_id"]
            out["path"] = ex["path"]
        if with_masks:
            out["lung_mask"] = decode_masks(ex["lung_mask"])
            out["has_lung_mask"] = ex["has_lung_mask"] > 0
        return out

    return without_autograph(parse)


def class_weight_table(manifest: dict, data_dir: str | os.PathLike,
                       class_weights: str) -> tf.Tensor:
    """The sample weight of each class: ``[2] float32`` by label, ``[3]`` by subtype.

    Args:
        class_weights: ``balanced`` -> the manifest's ``class_weights`` (sklearn "balanced", from
            the train split), indexed by label; ``balanced_subtype`` -> its
            ``subtype_class_weights`` (the same over the train split's known subtypes), indexed
            by subtype 0, 1, 2; ``none`` -> all ones, by label.

    Raises:
        ValueError: an unknown mode.
        records.DataDirError: the manifest lacks the weights the mode needs (a version-1 data dir
            has no subtype weights); the message names the file and the fix.
    """
    if class_weights not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class_weights={class_weights!r}; expected one of {CLASS_WEIGHT_MODES}")
    if class_weights == "none":
        return tf.constant([1.0, 1.0], tf.float32)
    path = Path(data_dir) / records.MANIFEST_NAME
    if class_weights == "balanced_subtype":
        weights = manifest.get("subtype_class_weights") or {}
        if not all(k in weights for k in ("0", "1", "2")):
            raise records.DataDirError(
                f"{path} has no subtype_class_weights {{'0': .., '1': .., '2': ..}} (manifest "
                f"version {manifest.get('version', 1)}; subtypes arrived in version "
                f"{records.MANIFEST_VERSION}); re-run tools/make_tfrecords on the source, or use "
                f"class_weights='balanced' or 'none'")
        return tf.constant([float(weights[k]) for k in ("0", "1", "2")], tf.float32)
    weights = manifest.get("class_weights") or {}
    if "0" not in weights or "1" not in weights:
        raise records.DataDirError(
            f"{path} has no class_weights {{'0': .., '1': ..}} "
            f"(it has {weights!r}); re-run the converter or use class_weights='none'")
    return tf.constant([float(weights["0"]), float(weights["1"])], tf.float32)


def sample_weights(table: tf.Tensor, class_weights: str) -> Callable[[dict], tf.Tensor]:
    """A function: batch dict -> ``[B] float32`` weights from :func:`class_weight_table`.

    By label, or by subtype for ``balanced_subtype``, where an image of unknown subtype (-1)
    weighs 0: it adds nothing to a three-way loss, whose target it does not know (a version-1
    data dir is all unknown, hence refused by :func:`class_weight_table` for this mode).
    """
    if class_weights == "balanced_subtype":
        def by_subtype(batch: dict) -> tf.Tensor:
            subtype = batch["subtype"]
            known = tf.gather(table, tf.maximum(subtype, 0))
            return tf.where(subtype >= 0, known, tf.zeros_like(known))

        return by_subtype
    return lambda batch: tf.gather(table, tf.cast(batch["label"], tf.int32))


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one stream is put together; filled in by the public builders."""

    split: str
    batch_size: int
    training: bool            # seeded shuffles and an interleaved read
    repeat: bool
    drop_remainder: bool
    deterministic: bool
    cache: bool | None = None
    seed: int = 0
    class_weights: str = "balanced"
    with_meta: bool = False
    input_context: tf.distribute.InputContext | None = None
    skip_corrupt: bool = False
    cache_budget_bytes: int | None = None
    shuffle_buffer: int | None = None
    masks: str = "none"       # a MASK_MODES entry


def _has_lung_mask(serialized: tf.Tensor) -> tf.Tensor:
    """Whether one serialized record carries a lung mask (scalar bool)."""
    spec = {"has_lung_mask": records.feature_spec()["has_lung_mask"]}
    return tf.io.parse_single_example(serialized, spec)["has_lung_mask"] > 0


def check_masks(manifest: dict, data_dir: str | os.PathLike, masks: str) -> None:
    """Refuse a mask stream the data dir cannot give.

    Raises:
        ValueError: ``masks`` is not a :data:`MASK_MODES` entry.
        records.DataDirError: masks asked for from a data dir converted without ``--masks``.
    """
    if masks not in MASK_MODES:
        raise ValueError(f"masks={masks!r}; expected one of {MASK_MODES}")
    if masks != "none" and "masks" not in manifest:
        raise records.DataDirError(
            f"{Path(data_dir) / records.MANIFEST_NAME} has no lung masks (converted without "
            f"--masks); re-run tools/make_tfrecords with --masks=DIR, or use masks='none'")


def _streamed_batches(serialized: tf.data.Dataset, parse, recipe: _Recipe, plan: ShardPlan,
                      image_size: int) -> tf.data.Dataset:
    """Streamed batches: [shuffle records] -> [repeat] -> batch -> parse."""
    ds = serialized
    if recipe.training:
        default_buffer = max(recipe.batch_size, STREAMING_SHUFFLE_BYTES // (image_size ** 2 + 1))
        ds = ds.shuffle(recipe.shuffle_buffer or min(plan.records_per_pipeline, default_buffer),
                        seed=recipe.seed, reshuffle_each_iteration=True)
    if recipe.repeat:
        ds = ds.repeat()
    ds = ds.batch(recipe.batch_size, drop_remainder=recipe.drop_remainder)
    return ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=recipe.deterministic)


def _cached_batches(serialized: tf.data.Dataset, parse, recipe: _Recipe,
                    plan: ShardPlan) -> tf.data.Dataset:
    """Cached batches: batch -> parse -> unbatch -> cache -> [shuffle] -> [repeat] -> batch."""
    ds = serialized.batch(max(recipe.batch_size, 64)).map(
        parse, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch().cache()
    if recipe.training:  # the whole (per-pipeline) split fits the buffer: a full shuffle
        ds = ds.shuffle(recipe.shuffle_buffer or plan.records_per_pipeline, seed=recipe.seed,
                        reshuffle_each_iteration=True)
    if recipe.repeat:
        ds = ds.repeat()
    return ds.batch(recipe.batch_size, drop_remainder=recipe.drop_remainder,
                    num_parallel_calls=AUTOTUNE, deterministic=recipe.deterministic)


def _finish(ds: tf.data.Dataset, recipe: _Recipe, plan: ShardPlan) -> tf.data.Dataset:
    """The last stage: prefetch, and the determinism and auto-shard options."""
    options = tf.data.Options()
    options.deterministic = recipe.deterministic
    policy = tf.data.experimental.AutoShardPolicy
    if recipe.input_context is not None:
        options.experimental_distribute.auto_shard_policy = policy.OFF  # sharded by plan_shards
    else:
        options.experimental_distribute.auto_shard_policy = (
            policy.FILE if file_sharding_is_even(plan.split_files, _num_workers_from_tf_config())
            else policy.DATA)
    return ds.prefetch(AUTOTUNE).with_options(options)


def _build(data_dir: str | os.PathLike, recipe: _Recipe,
           output: Callable[[dict], object] | None = None) -> tf.data.Dataset:
    """The stages chained for ``recipe``; ``output`` maps each batch dict before the prefetch."""
    if recipe.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {recipe.batch_size}")
    manifest = records.read_manifest(data_dir)
    plan = plan_shards(data_dir, manifest, recipe.split, recipe.input_context)
    weigh = sample_weights(class_weight_table(manifest, data_dir, recipe.class_weights),
                           recipe.class_weights)
    check_masks(manifest, data_dir, recipe.masks)
    parse = batch_parser(manifest, data_dir, recipe.with_meta, recipe.masks != "none")
    use_cache = resolve_cache(recipe.cache, manifest, recipe.split, plan.num_pipelines,
                              recipe.cache_budget_bytes)
    # Cached data is shuffled whole after the cache; streamed data is shuffled by file too.
    serialized = read_records(
        plan, interleave=recipe.training, deterministic=recipe.deterministic,
        file_shuffle_seed=recipe.seed if recipe.training and not use_cache else None,
        skip_corrupt=recipe.skip_corrupt)
    if recipe.masks == "only":
        serialized = serialized.filter(without_autograph(_has_lung_mask))
    if use_cache:
        ds = _cached_batches(serialized, parse, recipe, plan)
    else:
        ds = _streamed_batches(serialized, parse, recipe, plan, int(manifest["image_size"]))
    ds = ds.map(without_autograph(lambda b: {**b, "weight": weigh(b)}))
    if output is not None:
        ds = ds.map(without_autograph(output))
    return _finish(ds, recipe, plan)


# ---------------------------------------------------------------------------------------------
# Builders


def make_train_dataset(data_dir: str | os.PathLike, batch_size: int, *, seed: int = 0,
                       cache: bool | None = None, deterministic: bool = False,
                       class_weights: str = "balanced",
                       input_context: tf.distribute.InputContext | None = None,
                       skip_corrupt: bool = False, cache_budget_bytes: int | None = None,
                       shuffle_buffer: int | None = None) -> tf.data.Dataset:
    """The training stream of the train split: seeded shuffle, repeated forever, fixed batches.

    Args:
        data_dir: converter output (shards + ``manifest.json``).
        batch_size: images per batch: per replica when ``input_context`` is given
            (``distribute_datasets_from_function``), else the global batch
            (``experimental_distribute_dataset`` splits it across replicas).
        seed: seed of the file and record shuffles.
        cache: True caches decoded images in RAM, False streams from the shards every epoch, None
            caches when this pipeline's share of the decoded split fits ``cache_budget_bytes``.
        deterministic: True -> the same order on every run (see "Order and epochs" in the module
            docstring); False -> throughput first.
        class_weights: ``balanced`` -> weights by label from the manifest's ``class_weights``
            (sklearn "balanced", from the train split); ``balanced_subtype`` -> weights by
            subtype from its ``subtype_class_weights``, 0 for an image of unknown subtype (so it
            does not train a three-way head; a version-1 data dir, which has no subtype weights,
            is refused); ``none`` -> all ones.
        input_context: from ``strategy.distribute_datasets_from_function``: this pipeline reads
            its share of the shard files when they divide evenly among the pipelines, else every
            n-th record of all files (so every image is seen equally often).
        skip_corrupt: do not fail on a corrupt or truncated shard: read each shard up to its first
            bad record and DROP THE REST OF THAT SHARD, warning on stderr each time a shard is
            read short (every epoch when streaming, once when cached). Off by default: a corrupt
            shard must not silently shrink a split.
        cache_budget_bytes: RAM the automatic cache may use, bytes; None = 25 % of MemAvailable.
        shuffle_buffer: records in the shuffle buffer; None = the whole (per-pipeline) split when
            cached, else as many serialized records as fit in 32 MiB (650 at 224 px).

    Returns:
        ``tf.data.Dataset`` of ``{"image": [B, S, S, 1] uint8, "label": [B] float32,
        "subtype": [B] int32, "weight": [B] float32}`` with a static batch dimension B
        (``drop_remainder``). Subtype: 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (every image of
        a version-1 data dir).

    Raises:
        records.DataDirError: missing/incomplete data dir, no train split, missing shard, unknown
            encoding, no class weights; the message names the file and the fix.
        ValueError: bad argument values.
    """
    return _build(data_dir, _Recipe(
        split="train", batch_size=batch_size, training=True, repeat=True, drop_remainder=True,
        deterministic=bool(deterministic), cache=cache, seed=seed, class_weights=class_weights,
        input_context=input_context, skip_corrupt=skip_corrupt,
        cache_budget_bytes=cache_budget_bytes, shuffle_buffer=shuffle_buffer))


def make_eval_dataset(data_dir: str | os.PathLike, split: str, batch_size: int, *,
                      cache: bool | None = False, skip_corrupt: bool = False,
                      class_weights: str = "balanced",
                      input_context: tf.distribute.InputContext | None = None,
                      masks: str = "none") -> tf.data.Dataset:
    """One pass over ``split`` in the manifest's file order, the last partial batch kept.

    Args:
        data_dir: converter output (shards + ``manifest.json``).
        split: any split the manifest lists (``train`` | ``val`` | ``test``).
        batch_size: images per batch (per replica with ``input_context``).
        cache: as in :func:`make_train_dataset`; off by default (one pass gains nothing from it).
        skip_corrupt: as in :func:`make_train_dataset`.
        class_weights: as in :func:`make_train_dataset` (``none`` needs no weights in the
            manifest).
        input_context: from ``strategy.distribute_datasets_from_function``: this pipeline reads
            its share of the split (by file or by record, as for training); every image is read
            by exactly one pipeline.
        masks: ``none``; ``all`` adds ``"lung_mask"`` (``[B, S, S, 1] uint8`` 0/255, zeros for a
            film without one) and ``"has_lung_mask"`` (``[B] bool``); ``only`` does the same for
            the films that have a mask and skips the others. Needs a data dir converted with
            ``--masks``.

    Returns:
        ``tf.data.Dataset`` of ``{"image": [B, S, S, 1] uint8, "label": [B] float32,
        "subtype": [B] int32, "weight": [B] float32, "patient_id": [B] string,
        "path": [B] string}`` (plus the mask keys, as ``masks`` says).

    Raises:
        records.DataDirError, ValueError: as :func:`make_train_dataset`, or an unknown split.
    """
    return _build(data_dir, _Recipe(
        split=split, batch_size=batch_size, training=False, repeat=False, drop_remainder=False,
        deterministic=True, cache=cache, class_weights=class_weights, with_meta=True,
        input_context=input_context, skip_corrupt=skip_corrupt, masks=masks))


def make_lung_train_dataset(data_dir: str | os.PathLike, batch_size: int, *, seed: int = 0,
                            cache: bool | None = None, deterministic: bool = False,
                            masks: str = "only",
                            input_context: tf.distribute.InputContext | None = None,
                            skip_corrupt: bool = False, cache_budget_bytes: int | None = None,
                            shuffle_buffer: int | None = None) -> tf.data.Dataset:
    """The training stream of :func:`make_train_dataset` with lung masks (a lung segmentation
    task): the same shuffles, repeat and fixed batches, all sample weights 1.

    The masks come unaugmented, like the images: a model augments both with one matrix per image
    (:meth:`pneumo_tf.augment.RandomAffine.augment_with_mask`).

    Args:
        masks: ``only`` (default: the films that have a mask) or ``all`` (every film; a film
            without a mask yields zeros and ``has_lung_mask`` False).
        Others: as :func:`make_train_dataset`.

    Returns:
        ``tf.data.Dataset`` of ``{"image": [B, S, S, 1] uint8, "lung_mask": [B, S, S, 1] uint8
        (0/255), "has_lung_mask": [B] bool, "label": [B] float32, "subtype": [B] int32,
        "weight": [B] float32}``.

    Raises:
        records.DataDirError: as :func:`make_train_dataset`, or the data dir was converted
            without ``--masks``.
        ValueError: ``masks`` is ``none`` or unknown, or other bad argument values.
    """
    if masks == "none":
        raise ValueError("make_lung_train_dataset(masks='none') has no masks to give; use "
                         "make_train_dataset, or masks='only' / 'all'")
    return _build(data_dir, _Recipe(
        split="train", batch_size=batch_size, training=True, repeat=True, drop_remainder=True,
        deterministic=bool(deterministic), cache=cache, seed=seed, class_weights="none",
        input_context=input_context, skip_corrupt=skip_corrupt,
        cache_budget_bytes=cache_budget_bytes, shuffle_buffer=shuffle_buffer, masks=masks))


def make_dataset(data_dir: str | os.PathLike, split: str, batch_size: int, training: bool,
                 cache: bool | None = None) -> tf.data.Dataset:
    """Batches of ``split`` as tuples for ``keras.Model.fit``: a thin wrapper over the builders.

    ``training=True`` gives the training stream of ``split`` (as :func:`make_train_dataset`
    gives it for ``train``: shuffled with seed 0, repeated, fixed batch shape); ``training=False``
    one pass in file order (as :func:`make_eval_dataset`). Anything else (a seed, distribution,
    the ids of the images) comes from the builders themselves.

    Args:
        data_dir, split, batch_size, cache: as in :func:`make_eval_dataset`, except that
            ``cache=None`` (the default here) decides from the RAM budget.
        training: the training stream, or one evaluation pass.

    Returns:
        ``tf.data.Dataset`` of ``(images [B, S, S, 1] uint8, labels [B] float32,
        sample_weights [B] float32)``.

    Raises:
        records.DataDirError, ValueError: as :func:`make_train_dataset`.
    """
    training = bool(training)
    recipe = _Recipe(split=split, batch_size=batch_size, training=training, repeat=training,
                     drop_remainder=training, deterministic=not training, cache=cache)
    return _build(data_dir, recipe, output=lambda b: (b["image"], b["label"], b["weight"]))


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

