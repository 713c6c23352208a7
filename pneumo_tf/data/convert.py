"""Radiograph source -> verified TFRecord shards + ``manifest.json`` (SPEC §5; issue 2).

Usage::

    tools/make_tfrecords --src=chest_xray --out=data/cxr224          # convert
    tools/make_tfrecords --verify --out=data/cxr224                  # check an existing output
    python -m pneumo_tf.data.convert --src=pneumoniamnist_128.npz --out=data/mnist128

How a conversion runs (:func:`convert_dataset`):

1. List the source (:func:`pneumo_tf.data.sources.discover`) and check it has something to
   convert: a bad ``--src`` fails here and leaves an earlier good output in ``--out`` alone.
2. Clean ``--out``: the old manifest first (so the folder never looks complete while it changes),
   then old shards, ``rejects.jsonl`` and stale ``*.partial`` files. Nothing else is touched.
3. Decode, crop, resize and encode every image in a pool of worker processes (``spawn``: the
   workers never import TensorFlow, which is slow to import and not fork-safe). Results come back
   in listing order; the parent builds each record's ``tf.train.Example`` while the workers
   keep decoding (so on N cores that work overlaps theirs instead of running alone after them)
   and appends it to a spool file (``_convert_spool.partial``, removed at the end, also on
   error): memory stays flat however large the source.
4. With every image's hashes known: find duplicates (``--dedupe`` drops the extra copies, keeping
   an official test copy first, then val, then the first by key), assign splits by patient with
   every duplicate group kept in one split (:mod:`pneumo_tf.data.splits`), order each split by a
   seeded shuffle.
5. Copy each split's records from the spool into its shards, each atomically (``*.partial``
   then rename), then write ``rejects.jsonl``, then ``manifest.json`` last.

Same inputs and seed give byte-identical shards whatever ``--workers`` is. A run killed at any
moment leaves no manifest, so nothing downstream mistakes a half-written folder for data.

Bad input never stops a run: each rejected file is one line ``{"path", "reason"}`` in
``OUT/rejects.jsonl``; the exit status is non-zero only when there are more rejects than
``--max_rejects``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from absl import app, flags

import pneumo_tf
from pneumo_tf import atomic_files, cli, preprocess
from pneumo_tf.data import records, splits

log = logging.getLogger(__name__)

OUT = cli.out_flag()
SEED = cli.seed_flag()

SPOOL_NAME = "_convert_spool.partial"
REJECTS_NAME = "rejects.jsonl"
# Default shard size: big enough that per-file overhead vanishes, small enough that a split is
# several files that can be read in parallel.
TARGET_SHARD_BYTES = 128 * 2**20
# A split gets at least this many shards (when it has MIN_IMAGES_PER_SHARD images for each), so
# tf.data can interleave reads and MirroredStrategy workers can split files.
MIN_SHARDS = 4
MIN_IMAGES_PER_SHARD = 128
MAX_LISTED_DUPLICATE_GROUPS = 200
MAX_LISTED_OVERLAP_IDS = 200
DEFAULT_MAX_PIXELS = 100_000_000
CLASS_NAMES = pneumo_tf.CLASS_NAMES

_SRC = flags.DEFINE_string(
    "src", None,
    "Source to convert: a Kaggle/Mendeley folder ({train,val,test}/{NORMAL,PNEUMONIA}/*), a CSV "
    "manifest (path,label[,patient_id][,split]) or a MedMNIST pneumoniamnist[_64|_128|_224].npz.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Side of the stored square images, pixels.", lower_bound=8)
_CROP = flags.DEFINE_enum(
    "crop", None, list(preprocess.CROP_METHODS),
    "Lung crop: fixed (SPEC §2 box), none, adaptive (lung-field box, falls back to fixed). "
    "Default: the source's default (fixed; none for MedMNIST, which is already cropped).")
_ENCODING = flags.DEFINE_enum(
    "encoding", "raw", list(records.ENCODINGS),
    "How the uint8 image is stored: raw bytes (fastest to read) or png (about half the size).")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.2, "Fraction of each class of the train pool carved into val, by patient.",
    lower_bound=0.0, upper_bound=0.95)
_SPLIT_BY = flags.DEFINE_enum(
    "split_by", "patient", list(splits.SPLIT_BY),
    "Group of the train/val carve: patient (no patient in two splits) or image.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None,
    f"Shards per split. Default: size-based, ~{TARGET_SHARD_BYTES // 2**20} MiB per shard and at "
    f"least {MIN_SHARDS} when the split has {MIN_SHARDS}x{MIN_IMAGES_PER_SHARD} images.",
    lower_bound=1)
_WORKERS = flags.DEFINE_integer(
    "workers", None, "Decoding processes. Default: all CPU cores available to this process.",
    lower_bound=1)
_COMPRESSION = flags.DEFINE_enum(
    "compression", "none", list(records.COMPRESSIONS), "TFRecord compression.")
_MAX_REJECTS = flags.DEFINE_integer(
    "max_rejects", 0,
    "Rejected inputs tolerated before the exit status becomes 1 (the output is written anyway; "
    "see OUT/rejects.jsonl). -1: any number.", lower_bound=-1)
_DEDUPE = flags.DEFINE_boolean(
    "dedupe", False,
    "Drop byte- and pixel-identical duplicate images from train/val: a group keeps its official "
    "test copies (test is never changed), else its official val copy, else the first by path. "
    "Without it duplicates are only reported (and kept in one split).")
_USE_OFFICIAL_VAL = flags.DEFINE_boolean(
    "use_official_val", False,
    "Keep the source's own val split instead of carving val from train (the Kaggle val has 16 "
    "images; without this flag they join the train pool). MedMNIST splits are always kept.")
_VERIFY = flags.DEFINE_boolean(
    "verify", False,
    "Check --out: re-read every shard with CRC checks, decode every image, compare counts with "
    "the manifest; exit 1 naming the shard on any mismatch. Without --src only verifies; with "
    "--src verifies right after converting.")
_DOWNLOAD = flags.DEFINE_boolean(
    "download", False,
    "MedMNIST only: fetch --src (e.g. pneumoniamnist_128.npz) from Zenodo into --cache_dir, "
    "checking its MD5, when it is not a local file.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Download cache for --download (default ~/.cache/pneumo_tf).")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", DEFAULT_MAX_PIXELS,
    "Reject images with more pixels than this (decompression-bomb guard).", lower_bound=1)


class ConvertError(ValueError):
    """Bad converter settings or output folder; the message names the flag or file and the fix."""


# ---------------------------------------------------------------------------------------------
# Worker side: no TensorFlow here (workers are spawned and import only numpy/cv2/decoders).


@dataclasses.dataclass(frozen=True)
class _WorkerConfig:
    image_size: int
    crop: str
    encoding: str
    max_pixels: int
    parent_pid: int = 0


_worker_config: _WorkerConfig | None = None


def _init_worker(config: _WorkerConfig) -> None:
    global _worker_config
    _worker_config = config
    # One decoding thread per process: the pool already uses every core.
    cv2.setNumThreads(1)
    if config.parent_pid and sys.platform.startswith("linux"):
        # Die with the parent: a converter killed with SIGKILL must not leave workers behind
        # (they would wait forever on the task queue, whose write end they also hold).
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if os.getppid() != config.parent_pid:  # the parent died before prctl took effect
            os._exit(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass
class ProcessedImage:
    """What a worker returns for one source item (``payload`` is None for a reject)."""

    index: int
    payload: bytes | None = None       # the serialized tf.train.Example of the stored image
    orig_height: int = 0
    orig_width: int = 0
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, bottom, left, right; source px
    crop_method: str = ""
    byte_sha256: str | None = None      # of the file's bytes (npz items: of the array)
    size_bytes: int = 0
    pixel_hash: str | None = None       # sha256 of the stored [S, S] pixels (before PNG)
    reject_reason: str | None = None


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """``[S, S] uint8`` -> stored bytes (row-major raw bytes, or PNG)."""
    if encoding == "raw":
        return np.ascontiguousarray(image, np.uint8).tobytes()
    if encoding == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError("cv2.imencode failed to write a PNG")
        return buf.tobytes()
    raise ConvertError(f"--encoding={encoding!r} is not one of {records.ENCODINGS}")


def source_box(box: preprocess.CropBox, scale: int, orig_height: int,
               orig_width: int) -> tuple[int, int, int, int]:
    """A crop box on an image decoded at 1/``scale`` size, in full-size source pixels."""
    return (min(box.top * scale, orig_height), min(box.bottom * scale, orig_height),
            min(box.left * scale, orig_width), min(box.right * scale, orig_width))


def process_item(index: int, item, config: _WorkerConfig) -> ProcessedImage:
    """Read, hash, decode, crop, resize and encode one source item. Never raises on bad input.

    Args:
        index: position of the item in the listing (echoed back for ordering checks).
        item: a :class:`pneumo_tf.data.sources.SourceItem`.
        config: image size, crop, encoding and pixel limit.
    """
    from pneumo_tf.data import decode

    out = ProcessedImage(index=index)
    try:
        if item.path is not None:
            try:
                data = Path(item.path).read_bytes()
            except OSError as e:
                out.reject_reason = f"cannot read file ({e.strerror or e})"
                return out
            out.byte_sha256 = hashlib.sha256(data).hexdigest()
            out.size_bytes = len(data)
            decoded = decode.decode_bytes(data, name=item.key, target_size=config.image_size,
                                          crop=config.crop, max_pixels=config.max_pixels)
        else:
            decoded = decode.decode_item(item, target_size=config.image_size, crop=config.crop,
                                         max_pixels=config.max_pixels)
        gray = decoded.gray
        if out.byte_sha256 is None:  # in-memory item (MedMNIST): its bytes are its pixels
            out.byte_sha256 = hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()
            out.size_bytes = gray.nbytes
        image, box, method = preprocess.preprocess_gray(gray, config.image_size, config.crop)
        # "Pixel-identical" = the same stored pixels: what the model would see twice. Hashing
        # the small stored image (not the decoded one) keeps this nearly free.
        out.pixel_hash = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        out.orig_height, out.orig_width = int(decoded.orig_height), int(decoded.orig_width)
        out.crop_box = source_box(box, int(decoded.scale), out.orig_height, out.orig_width)
        out.crop_method = method
        # The record is serialized here, in parallel, so the parent only writes bytes.
        out.payload = records.serialize_example(
            encode_image(image, config.encoding), int(item.label), item.patient_id, item.key,
            config.image_size, config.image_size, out.orig_height, out.orig_width,
            out.crop_box, method)
    except decode.RejectError as e:
        out.reject_reason = str(e)
    except Exception as e:  # noqa: BLE001 -- bad input must never stop a run; it is reported
        out.reject_reason = f"unexpected decoder error: {type(e).__name__}: {e}"
    if out.reject_reason is not None:
        out.payload = None
    return out


def _process_chunk(tasks: list[tuple[int, Any]]) -> list[ProcessedImage]:
    return [process_item(index, item, _worker_config) for index, item in tasks]


# ---------------------------------------------------------------------------------------------
# Parent side.


class _Progress:
    """A one-line progress bar on stderr (a line every 10 % when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.start = time.monotonic()
        self.last = 0.0
        self.last_decile = -1
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        if not self.enabled or self.total == 0:
            return
        now = time.monotonic()
        decile = done * 10 // self.total
        if self.tty and (now - self.last < 0.2 and done < self.total):
            return
        if not self.tty and decile == self.last_decile:
            return
        self.last, self.last_decile = now, decile
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        bar = "#" * (done * 30 // self.total)
        line = (f"{self.label} [{bar:<30}] {done}/{self.total} {rate:6.0f} img/s "
                f"ETA {eta:5.0f} s")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_shards(count: int, total_bytes: int) -> int:
    """Size-based shard count: ~:data:`TARGET_SHARD_BYTES` each, at least :data:`MIN_SHARDS`
    for splits with ``MIN_SHARDS * MIN_IMAGES_PER_SHARD`` images or more, never more shards
    than images."""
    by_size = math.ceil(total_bytes / TARGET_SHARD_BYTES)
    by_parallelism = min(MIN_SHARDS, count // MIN_IMAGES_PER_SHARD)
    return max(1, min(count, max(by_size, by_parallelism)))


def balanced_class_weights(labels: Sequence[int]) -> dict[str, float]:
    """sklearn's ``compute_class_weight("balanced")`` over classes 0 and 1: ``n / (2 * n_c)``.

    A class absent from ``labels`` gets weight 1.0 (sklearn would raise).
    """
    n = len(labels)
    counts = collections.Counter(int(y) for y in labels)
    return {str(c): (n / (2 * counts[c]) if counts[c] else 1.0) for c in (0, 1)}


def clean_output_dir(out: Path) -> list[str]:
    """Remove what an earlier (possibly killed) conversion left in ``out``; return the names.

    Order matters: the manifest goes first, so the folder stops looking complete before any shard
    it lists disappears. Only converter outputs are removed (manifest, shards by name pattern,
    ``rejects.jsonl``, ``*.partial``); other files are left alone.
    """
    removed = []
    manifest = out / records.MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()
        removed.append(manifest.name)
    for p in sorted(out.iterdir()):
        if p.is_file() and (records.parse_shard_name(p.name) or p.name == REJECTS_NAME
                            or p.name.endswith(".partial")):
            p.unlink()
            removed.append(p.name)
    return removed


@dataclasses.dataclass
class _Kept:
    """Parent-side record of one converted image (its serialized Example lives in the spool)."""

    key: str
    label: int
    patient_id: str
    official_split: str | None
    result: ProcessedImage
    offset: int
    length: int


def _check_listing_not_empty(listing, src, out: Path) -> None:
    """Refuse a source that lists no file at all (it would replace ``out`` with an empty output).

    Raises:
        ConvertError: naming ``--src``, its empty folders, and saying ``out`` was left alone.
    """
    if listing.items or listing.rejects:
        return
    empty = f" (empty folders: {', '.join(sorted(listing.empty_folders)[:5])})" \
        if listing.empty_folders else ""
    raise ConvertError(f"--src={src} lists no image files{empty}; nothing to convert, --out={out} "
                       f"was left as it was. Check the --src path")


def _run_workers(tasks: list[tuple[int, Any]], config: _WorkerConfig, workers: int,
                 on_result: Callable[[ProcessedImage], None]) -> None:
    """Process ``tasks`` in ``workers`` spawned processes (inline when 1); results in order.

    At most a few chunks per worker are in flight, so results waiting for a slow earlier item
    stay few and memory stays flat.

    Raises:
        ConvertError: a worker process died (a crash in a decoder, or out of memory).
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file and not os.path.exists(main_file):
        # `spawn` re-imports the main script in each worker; a script read from stdin cannot be.
        log.warning("main script %s is not a file; decoding in this process only", main_file)
        workers = 1
    if workers <= 1 or len(tasks) <= 1:
        config = dataclasses.replace(config, parent_pid=0)
        _init_worker(config)
        for index, item in tasks:
            on_result(process_item(index, item, config))
        return
    # Large chunks: a per-chunk round trip through the pool costs more than it seems (measured:
    # 8 images/chunk 1.7x the naive loop, 64 images/chunk 2.1x on 2 cores), while 8 chunks per
    # worker still keep the tail short.
    chunk = max(1, min(64, len(tasks) // (workers * 8)))
    chunks = iter([tasks[i:i + chunk] for i in range(0, len(tasks), chunk)])
    config = dataclasses.replace(config, parent_pid=os.getpid())
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(config,)) as pool:
            pending = collections.deque(pool.submit(_process_chunk, c)
                                        for c in itertools.islice(chunks, 4 * workers))
            while pending:
                results = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(_process_chunk, nxt))
                for r in results:
                    on_result(r)
    except concurrent.futures.process.BrokenProcessPool as e:
        raise ConvertError(
            f"a decoding worker process died ({e}): a decoder crashed or the machine ran out of "
            f"memory. Re-run with --workers=1 to see which file, or lower --workers") from e


def convert_dataset(src: str | os.PathLike, out: str | os.PathLike, *, image_size: int = 224,
                    crop: str | None = None, encoding: str = "raw", val_fraction: float = 0.2,
                    split_by: str = "patient", seed: int = 0, num_shards: int | None = None,
                    workers: int | None = None, compression: str = "none",
                    max_rejects: int = 0, dedupe: bool = False, use_official_val: bool = False,
                    download: bool = False, cache_dir: str | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> dict:
    """Convert a radiograph source into TFRecord shards + ``manifest.json`` in ``out``.

    Args:
        src: Kaggle-layout folder, CSV manifest or MedMNIST npz (see
            :func:`pneumo_tf.data.sources.discover`).
        out: output folder (created; earlier converter outputs in it are replaced).
        image_size: stored side, pixels; records hold ``[image_size, image_size]`` uint8.
        crop: fixed | none | adaptive; None = the source's default.
        encoding: raw | png.
        val_fraction: fraction of each class of the train pool carved into val.
        split_by: patient | image.
        seed: seed of the val carve and of the record order inside each split.
        num_shards: shards per split (capped at the split's image count); None = size-based.
        workers: decoding processes; None = all cores; 1 = in this process.
        compression: none | gzip.
        max_rejects: recorded in the manifest flags; the CLI exits 1 when ``rejected`` exceeds
            it (-1 = unlimited). The conversion itself always completes.
        dedupe: drop duplicates (all but the first key of each pixel-identical group).
        use_official_val: keep the source's val split instead of carving one.
        download: let a MedMNIST source be fetched (see sources.discover).
        cache_dir: download cache.
        max_pixels: decompression-bomb limit per image.
        progress: show a progress bar on stderr.

    Returns:
        The manifest written to ``out/manifest.json`` (plus ``timing``).

    Raises:
        ConvertError: bad settings (naming the flag) or an unusable ``out``.
        pneumo_tf.data.sources.SourceError: ``src`` is missing or has no known layout.

    Note:
        Workers are started with ``spawn``, which re-imports the caller's main script in each
        worker (Python's rule for ``spawn``): keep heavy imports such as TensorFlow inside
        ``main()`` or under ``if __name__ == "__main__":`` of scripts that call this with
        ``workers > 1``, or every worker pays for them.
    """
    from pneumo_tf.data import sources

    t_start = time.monotonic()
    if encoding not in records.ENCODINGS:
        raise ConvertError(f"--encoding={encoding!r} is not one of {records.ENCODINGS}")
    if compression not in records.COMPRESSIONS:
        raise ConvertError(f"--compression={compression!r} is not one of {records.COMPRESSIONS}")
    if crop is not None and crop not in preprocess.CROP_METHODS:
        raise ConvertError(f"--crop={crop!r} is not one of {preprocess.CROP_METHODS}")
    if split_by not in splits.SPLIT_BY:
        raise ConvertError(f"--split_by={split_by!r} is not one of {splits.SPLIT_BY}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConvertError(f"--val_fraction={val_fraction} must be in [0, 1)")
    if image_size < 8:
        raise ConvertError(f"--image_size={image_size} is too small (at least 8 pixels)")
    if num_shards is not None and num_shards < 1:
        raise ConvertError(f"--num_shards={num_shards} must be >= 1 (or unset for size-based)")
    workers = workers or default_workers()

    out = Path(out).absolute()
    src_abs = Path(src).absolute()
    if out == src_abs:
        raise ConvertError(f"--out={out} must not be the source itself; pick another folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out={out} exists and is not a folder; pick a folder path")
    # The source first: a mistyped --src must fail before an earlier good output is deleted.
    listing = sources.discover(str(src), download=download, cache_dir=cache_dir)
    _check_listing_not_empty(listing, src, out)
    out.mkdir(parents=True, exist_ok=True)
    clean_output_dir(out)

    # TensorFlow is needed to write shards; import it before the clock of the steady state
    # starts (workers are spawned, so the parent's TensorFlow never reaches them).
    import tensorflow  # noqa: F401

    crop = crop or listing.default_crop
    rejects: list[dict] = [dict(r) for r in listing.rejects]

    tasks = []
    for item in listing.items:
        if item.label not in (0, 1):
            rejects.append({"path": item.key, "reason": f"no valid label ({item.label!r}); "
                                                       f"expected 0/NORMAL or 1/PNEUMONIA"})
        elif item.split not in (None, "train", "val", "test"):
            rejects.append({"path": item.key, "reason": f"unknown split {item.split!r}"})
        else:
            tasks.append((len(tasks), item))
    items = [t[1] for t in tasks]

    config = _WorkerConfig(image_size=image_size, crop=crop, encoding=encoding,
                           max_pixels=max_pixels)
    kept: list[_Kept] = []
    checksum_lines: list[str] = []
    spool_path = out / SPOOL_NAME
    bar = _Progress(len(tasks), "convert", progress)
    times = {"first": None}
    spool = open(spool_path, "w+b")  # noqa: SIM115 -- closed and removed in the finally below
    try:
        def on_result(r: ProcessedImage) -> None:
            if times["first"] is None:
                times["first"] = time.monotonic()
            item = items[r.index]
            if r.byte_sha256 is not None:
                checksum_lines.append(f"{item.key}\t{r.size_bytes}\t{r.byte_sha256}\n")
            if r.payload is None:
                rejects.append({"path": item.key, "reason": r.reject_reason})
            else:
                example = r.payload
                offset = spool.tell()
                spool.write(example)
                r.payload = None  # the spool holds it now
                kept.append(_Kept(item.key, int(item.label), item.patient_id, item.split,
                                  r, offset, len(example)))
            bar.update(r.index + 1)

        _run_workers(tasks, config, workers, on_result)
        t_decoded = time.monotonic()

        # Duplicates, then splits on what survived.
        report = splits.find_duplicates([k.key for k in kept],
                                        [k.result.byte_sha256 for k in kept],
                                        [k.result.pixel_hash for k in kept],
                                        [k.official_split for k in kept])
        dropped = set(report.drop) if dedupe else set()
        kept = [k for k in kept if k.key not in dropped]
        keep_official_val = use_official_val or listing.kind == "medmnist"
        # Duplicates left in the pool (all of them without --dedupe) share a split.
        assigned = splits.assign_splits(
            [k.official_split for k in kept], [k.label for k in kept],
            [k.patient_id for k in kept], [k.key for k in kept], val_fraction=val_fraction,
            seed=seed, split_by=split_by, keep_official_val=keep_official_val,
            linked_keys=report.byte_identical + report.pixel_identical)
        overlap = splits.patient_overlap(assigned, [k.patient_id for k in kept])
        # Duplicates that ended up in different splits leak between them (unless --dedupe).
        split_of = {k.key: s for k, s in zip(kept, assigned)}
        cross_split = [g for g in report.byte_identical + report.pixel_identical
                       if len({split_of[x] for x in g if x in split_of}) > 1]

        by_split: dict[str, list[_Kept]] = {s: [] for s in records.SPLITS}
        for k, s in zip(kept, assigned):
            by_split[s].append(k)
        split_info = {}
        spool.flush()
        for si, name in enumerate(records.SPLITS):
            members = by_split[name]
            if not members:
                continue
            # Seeded order inside the split: shards mix classes and patients. Offsetting the
            # seed per split keeps the orders independent.
            order = np.random.default_rng([seed, si]).permutation(len(members))
            members = [members[i] for i in order]
            split_info[name] = _write_split(out, name, members, spool, num_shards, compression)
    finally:
        spool.close()
        spool_path.unlink(missing_ok=True)  # also on error: no stale spool beside the output
    t_written = time.monotonic()

    rejects.sort(key=lambda r: r["path"])
    atomic_files.write_text_atomic(out / REJECTS_NAME,
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    checksum = hashlib.sha256("".join(sorted(checksum_lines)).encode("utf-8")).hexdigest()
    train_labels = [k.label for k in by_split["train"]]
    reasons = collections.Counter(_reason_class(r["reason"]) for r in rejects)
    converted = sum(v["count"] for v in split_info.values())
    steady = t_written - (times["first"] or t_decoded)
    manifest = {
        "version": records.MANIFEST_VERSION,
        "tool_version": pneumo_tf.__version__,
        "image_size": image_size,
        "channels": 1,
        "crop": crop,
        "encoding": encoding,
        "compression": compression,
        "splits": split_info,
        "class_weights": balanced_class_weights(train_labels),
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "duplicates_dropped": len(dropped),
        "duplicates": {
            "byte_identical_groups": len(report.byte_identical),
            "pixel_identical_groups": len(report.pixel_identical),
            "byte_identical": report.byte_identical[:MAX_LISTED_DUPLICATE_GROUPS],
            "pixel_identical": report.pixel_identical[:MAX_LISTED_DUPLICATE_GROUPS],
            "dropped": sorted(dropped),
            "cross_split_groups": len(cross_split),
            "cross_split": cross_split[:MAX_LISTED_DUPLICATE_GROUPS],
        },
        "patient_overlap": {pair: {"count": len(ids), "ids": ids[:MAX_LISTED_OVERLAP_IDS]}
                            for pair, ids in overlap.items()},
        "empty_folders": sorted(listing.empty_folders),
        "source": {
            "path": str(Path(listing.root).absolute()),
            "kind": listing.kind,
            "items": len(listing.items) + len(listing.rejects),
            "checksum": checksum,
            "checksum_method": "sha256 over sorted lines 'key<TAB>size<TAB>sha256(file bytes)' "
                               "of every item read (npz items: of their pixels)",
        },
        "flags": {
            "src": str(src_abs), "out": str(out), "image_size": image_size, "crop": crop,
            "encoding": encoding, "val_fraction": val_fraction, "split_by": split_by,
            "seed": seed, "num_shards": num_shards, "workers": workers,
            "compression": compression, "max_rejects": max_rejects, "dedupe": dedupe,
            "use_official_val": use_official_val, "keep_official_val": keep_official_val,
            "download": download, "max_pixels": max_pixels,
        },
        "timing": {
            "total_s": round(t_written - t_start, 3),
            "startup_s": round((times["first"] or t_decoded) - t_start, 3),
            "decode_s": round(t_decoded - (times["first"] or t_decoded), 3),
            "write_s": round(t_written - t_decoded, 3),
            "images_per_s": round(converted / steady, 1) if steady > 0 else None,
        },
    }
    records.write_manifest(out, manifest)
    return manifest


def _reason_class(reason: str) -> str:
    """A reason without its specifics (``truncated JPEG (...)`` -> ``truncated JPEG``)."""
    return reason.split(" (")[0].split(":")[0].strip()


def _write_split(out: Path, name: str, members: list[_Kept], spool, num_shards: int | None,
                 compression: str) -> dict:
    """Copy one split's serialized records from the spool into shards; return its manifest entry."""
    count = len(members)
    total_bytes = sum(k.length for k in members)
    n = min(num_shards, count) if num_shards else default_num_shards(count, total_bytes)
    bounds = [round(i * count / n) for i in range(n + 1)]
    shards, shard_counts = [], []
    for i in range(n):
        shard = records.shard_name(name, i, n, compression)
        with records.ShardWriter(out / shard, compression) as w:
            for k in members[bounds[i]:bounds[i + 1]]:
                spool.seek(k.offset)
                w.write(spool.read(k.length))
        shards.append(shard)
        shard_counts.append(bounds[i + 1] - bounds[i])
    labels = collections.Counter(k.label for k in members)
    return {
        "count": count,
        "class_counts": {CLASS_NAMES[c]: labels.get(c, 0) for c in (0, 1)},
        "patients": len({k.patient_id for k in members}),
        "shards": shards,
        "shard_counts": shard_counts,
        "crop_methods": dict(sorted(collections.Counter(k.result.crop_method
                                                        for k in members).items())),
        "bytes": total_bytes,  # serialized records, before compression
    }


def format_summary(manifest: dict, out: str | os.PathLike | None = None) -> str:
    """A one-screen, human-readable summary of a conversion's manifest."""
    lines = []
    src = manifest.get("source", {})
    lines.append(f"converted {src.get('path')} ({src.get('kind')}) -> {out or ''}".rstrip())
    lines.append(f"  {manifest['image_size']}x{manifest['image_size']} x1 {manifest['encoding']}, "
                 f"crop {manifest['crop']}, compression {manifest['compression']}")
    lines.append(f"  {'split':<6} {'images':>7} {'NORMAL':>7} {'PNEUMONIA':>9} {'patients':>8} "
                 f"{'shards':>6}  crop methods")
    for name, s in manifest["splits"].items():
        cc = s["class_counts"]
        methods = ", ".join(f"{m} {c}" for m, c in s.get("crop_methods", {}).items())
        lines.append(f"  {name:<6} {s['count']:>7} {cc['NORMAL']:>7} {cc['PNEUMONIA']:>9} "
                     f"{s['patients']:>8} {len(s['shards']):>6}  {methods}")
    cw = manifest["class_weights"]
    lines.append(f"  class weights (train, balanced): 0 -> {cw['0']:.3f}, 1 -> {cw['1']:.3f}")
    rej = manifest["rejected"]
    if rej:
        why = ", ".join(f"{r}: {c}" for r, c in manifest.get("rejects_by_reason", {}).items())
        lines.append(f"  rejected {rej} ({why}); see {REJECTS_NAME}")
    else:
        lines.append("  rejected 0")
    d = manifest.get("duplicates", {})
    lines.append(f"  duplicates: {d.get('byte_identical_groups', 0)} byte-identical, "
                 f"{d.get('pixel_identical_groups', 0)} pixel-identical groups; dropped "
                 f"{manifest['duplicates_dropped']}"
                 + ("" if manifest["duplicates_dropped"] or not (
                     d.get("byte_identical_groups") or d.get("pixel_identical_groups"))
                    else " (use --dedupe to drop them)"))
    if d.get("cross_split_groups"):
        lines.append(f"  WARNING: {d['cross_split_groups']} duplicate group(s) span two splits "
                     f"(e.g. {', '.join(d['cross_split'][0])}); --dedupe removes the leak")
    overlap = manifest.get("patient_overlap", {})
    if overlap:
        for pair, v in overlap.items():
            lines.append(f"  patients in {pair}: {v['count']} (e.g. {', '.join(v['ids'][:3])})")
    else:
        lines.append("  patients in two splits: none")
    if manifest.get("empty_folders"):
        lines.append(f"  empty folders: {', '.join(manifest['empty_folders'][:5])}")
    t = manifest.get("timing", {})
    if t:
        lines.append(f"  time {t['total_s']:.1f} s (start-up {t['startup_s']:.1f} s), "
                     f"{t['images_per_s']} img/s steady state")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Verification.


def _check_image(image: bytes, encoding: str, size: int) -> str | None:
    if encoding == "raw":
        if len(image) != size * size:
            return f"raw image of {len(image)} bytes, expected {size}x{size}={size * size}"
        return None
    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        return "PNG image does not decode"
    if decoded.shape != (size, size) or decoded.dtype != np.uint8:
        return f"PNG decodes to {decoded.shape} {decoded.dtype}, expected ({size}, {size}) uint8"
    return None


def _verify_shard(path: Path, compression: str, encoding: str, size: int):
    """Read one shard fully, CRC checked: ``(labels, patients, problems, readable)``."""
    import tensorflow as tf

    labels: list[int] = []
    patients: list[str] = []
    problems: list[str] = []
    spec = records.feature_spec()

    def check(batch: list[bytes]) -> None:
        parsed = {k: v.numpy() for k, v in tf.io.parse_example(batch, spec).items()}
        for j in range(len(batch)):
            n = len(labels)
            label = int(parsed["label"][j])
            labels.append(label)
            patients.append(parsed["patient_id"][j].decode("utf-8", "replace"))
            if label not in (0, 1):
                problems.append(f"{path.name}: record {n} has label {label} (expected 0/1)")
            if int(parsed["height"][j]) != size or int(parsed["width"][j]) != size:
                problems.append(f"{path.name}: record {n} is {parsed['height'][j]}x"
                                f"{parsed['width'][j]}, manifest image_size is {size}")
            bad = _check_image(parsed["image"][j], encoding, size)
            if bad:
                problems.append(f"{path.name}: record {n}: {bad}")

    # Records one by one (the CRC check happens here, so an error names its position), parsed
    # in batches (fast).
    ds = tf.data.TFRecordDataset(str(path), records.tf_compression_type(compression))
    batch: list[bytes] = []
    try:
        for raw in ds.as_numpy_iterator():
            batch.append(raw)
            if len(batch) == 256:
                check(batch)
                batch = []
        if batch:
            check(batch)
    except tf.errors.OpError as e:
        position = len(labels) + len(batch)
        problems.append(f"{path.name}: unreadable after {position} good records "
                        f"({records.tf_error_text(e)}); re-run the converter to rewrite it")
        return labels, patients, problems, False
    return labels, patients, problems, True


def verify_data_dir(out: str | os.PathLike) -> list[str]:
    """Check a converter output folder against its manifest.

    Re-reads every shard with CRC checks, decodes every image (raw: ``S*S`` bytes; PNG: decodes to
    ``[S, S]`` uint8), and compares records per shard, per split and per class, and patients per
    split, with ``manifest.json``. Also flags shard files the manifest does not list, leftover
    ``*.partial`` files and patients shared by train and val that the manifest did not report.

    Returns:
        Problems, each naming the shard or file; empty when everything matches.
    """
    out = Path(out)
    try:
        manifest = records.read_manifest(out)
    except records.DataDirError as e:
        return [str(e)]
    problems: list[str] = []
    size = int(manifest["image_size"])
    encoding, compression = manifest["encoding"], manifest["compression"]
    listed: set[str] = set()
    patients_by_split: dict[str, set[str]] = {}
    for split, info in manifest["splits"].items():
        shards = list(info.get("shards", []))
        shard_counts = info.get("shard_counts") or [None] * len(shards)
        if len(shard_counts) != len(shards):
            problems.append(f"manifest: split {split} lists {len(shards)} shards but "
                            f"{len(shard_counts)} shard_counts")
            shard_counts = [None] * len(shards)
        labels: list[int] = []
        patients: set[str] = set()
        all_readable = True
        for name, expected in zip(shards, shard_counts):
            listed.add(name)
            parsed = records.parse_shard_name(name)
            if parsed is None or parsed[0] != split or parsed[2] != len(shards) \
                    or parsed[3] != compression:
                problems.append(f"{name}: name does not fit split {split!r} with {len(shards)} "
                                f"shards and compression {compression!r}")
            path = out / name
            if not path.is_file():
                problems.append(f"{name}: listed in the manifest but missing; re-run the "
                                f"converter")
                all_readable = False
                continue
            got, pats, shard_problems, readable = _verify_shard(path, compression, encoding,
                                                                size)
            problems += shard_problems
            all_readable &= readable
            if readable and expected is not None and len(got) != int(expected):
                problems.append(f"{name}: {len(got)} records, manifest says {expected}")
            labels += got
            patients.update(pats)
        patients_by_split[split] = patients
        if not all_readable:  # the shard is named above; split totals would only repeat it
            continue
        count = len(labels)
        if count != int(info.get("count", -1)):
            problems.append(f"split {split}: {count} records in its shards, manifest says "
                            f"{info.get('count')}")
        cc = collections.Counter(labels)
        want = info.get("class_counts", {})
        for c, cname in enumerate(CLASS_NAMES):
            if cc.get(c, 0) != int(want.get(cname, -1)):
                problems.append(f"split {split}: {cc.get(c, 0)} {cname} records, manifest says "
                                f"{want.get(cname)}")
        if "patients" in info and len(patients) != int(info["patients"]):
            problems.append(f"split {split}: {len(patients)} patients in its records, manifest "
                            f"says {info['patients']}")
    reported = manifest.get("patient_overlap", {})
    split_names = [s for s in records.SPLITS if s in patients_by_split]
    split_names += sorted(set(patients_by_split) - set(split_names))
    for i, a in enumerate(split_names):
        for b in split_names[i + 1:]:
            shared = patients_by_split[a] & patients_by_split[b]
            n_reported = int(reported.get(f"{a}/{b}", {}).get("count", 0))
            if len(shared) != n_reported:
                problems.append(f"splits {a}/{b} share {len(shared)} patients, manifest reports "
                                f"{n_reported} (e.g. {', '.join(sorted(shared)[:3])})")
    for p in sorted(out.iterdir()):
        if records.parse_shard_name(p.name) and p.name not in listed:
            problems.append(f"{p.name}: shard file not listed in the manifest (left from another "
                            f"run?); delete it or re-run the converter")
        elif p.name.endswith(".partial"):
            problems.append(f"{p.name}: leftover temporary file of an interrupted run; re-run the "
                            f"converter")
    return problems


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    out = OUT.value
    if not out:
        raise app.UsageError("--out is required: the folder for shards + manifest.json "
                             "(with --verify: the folder to check)")
    status = 0
    if _SRC.value:
        try:
            manifest = convert_dataset(
                _SRC.value, out, image_size=_IMAGE_SIZE.value, crop=_CROP.value,
                encoding=_ENCODING.value, val_fraction=_VAL_FRACTION.value,
                split_by=_SPLIT_BY.value, seed=SEED.value,
                num_shards=_NUM_SHARDS.value, workers=_WORKERS.value,
                compression=_COMPRESSION.value, max_rejects=_MAX_REJECTS.value,
                dedupe=_DEDUPE.value, use_official_val=_USE_OFFICIAL_VAL.value,
                download=_DOWNLOAD.value, cache_dir=_CACHE_DIR.value,
                max_pixels=_MAX_PIXELS.value)
        except (ValueError, OSError) as e:  # bad settings/source: a message, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_summary(manifest, out))
        limit = _MAX_REJECTS.value
        if limit >= 0 and manifest["rejected"] > limit:
            print(f"error: {manifest['rejected']} inputs rejected, more than --max_rejects="
                  f"{limit}; the output is complete without them (see "
                  f"{Path(out) / REJECTS_NAME}); raise --max_rejects to accept", file=sys.stderr)
            status = 1
    elif not _VERIFY.value:
        raise app.UsageError("--src is required (or use --verify --out=DIR to check an output)")
    if _VERIFY.value:
        problems = verify_data_dir(out)
        if problems:
            print(f"verify {out}: {len(problems)} problem(s)", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        m = records.read_manifest(out)
        n = sum(s["count"] for s in m["splits"].values())
        k = sum(len(s["shards"]) for s in m["splits"].values())
        print(f"verify {out}: OK ({n} records in {k} shards match manifest.json)")
    return status


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
