"""Radiograph source -> verified TFRecord shards + ``manifest.json``.

Usage::

    tools/make_tfrecords --src=chest_xray --out=data/cxr224          # convert
    tools/make_tfrecords --verify --out=data/cxr224                  # check an existing output
    python -m pneumo_tf.data.convert --src=pneumoniamnist_128.npz --out=data/mnist128

How a conversion runs (:func:`convert_dataset`; settings in :class:`ConvertConfig`, whose fields
are also the command line's flags):

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
   every duplicate group kept in one split, the val carve stratified by class or by subtype
   (``--stratify``; :mod:`pneumo_tf.data.splits`), order each split by a seeded shuffle.
5. Copy each split's records from the spool into its shards, each atomically (``*.partial``
   then rename), then write ``rejects.jsonl``.
6. Write ``manifest.json``, last.

Same inputs and seed give byte-identical shards whatever ``--workers`` is. A run killed at any
moment leaves no manifest, so nothing downstream mistakes a half-written folder for data.

Each record carries the image's binary ``label`` and its ``subtype`` (0 NORMAL, 1 BACTERIAL,
2 VIRAL, -1 unknown; from the file name or a CSV column, see :mod:`pneumo_tf.data.sources`); the
manifest counts both per split and holds "balanced" weights for both (``class_weights``,
``subtype_class_weights``).

With ``--masks=DIR`` (a folder of lung masks mirroring ``--src``) each record also carries its
film's lung mask, cropped and resized like the image (nearest neighbour; ``lung_mask`` and
``has_lung_mask``, see :mod:`pneumo_tf.data.records`); films without a mask are kept and marked,
bad masks are counted by reason in the manifest's ``masks`` entry (docs/data_contracts.md).

With ``--crop=lungs --lung_model=RUN`` a first pass decodes every film and runs the lung model
(:class:`pneumo_tf.modeling.lungs.LungModel`, in the parent process: the workers stay free of
TensorFlow) on it squashed to the model's input; each film is then cropped to the bounding box of
its predicted lungs plus ``--lung_margin``, or to the fixed box where the model finds less than
``--min_lung_fraction`` of the film (``crop_method`` ``lungs_fallback``, counted like adaptive's
fallbacks). The manifest's ``lung_model`` entry names the model (path, sha256 of its
``model.keras``) and what it found; runs trained on the data serve with that model.

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

import pneumo_tf
from pneumo_tf.core import atomic_files, cli
from pneumo_tf.core.progress import Progress
from pneumo_tf.image import preprocess
from pneumo_tf.data import records, splits

log = logging.getLogger(__name__)

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


class ConvertError(ValueError):
    """Bad converter settings or output folder; the message names the flag or file and the fix."""


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """How :func:`convert_dataset` converts a source; every field is also a converter flag.

    ``crop=None`` and ``workers=None`` are resolved when a conversion starts (the source's default
    crop, all cores); the manifest's ``flags`` records the resolved values.
    """

    image_size: int = cli.option(224, "Side of the stored square images, pixels.", lower=8)
    crop: str | None = cli.option(
        None, "Lung crop: fixed (the paper's fixed lung crop: rows 15-90 %, columns 20-80 %), "
        "none, adaptive (lung-field box, falls back to fixed), lungs (the bounding box of the "
        "lungs a lung model finds, --lung_model, plus --lung_margin; fixed where it finds "
        "fewer than --min_lung_fraction). Default: the source's default (fixed; none for "
        "MedMNIST, which is already cropped).",
        choices=preprocess.CROP_METHODS)
    encoding: str = cli.option(
        "raw", "How the uint8 image is stored: raw bytes (fastest to read) or png (about half "
        "the size).", choices=records.ENCODINGS)
    val_fraction: float = cli.option(
        0.2, "Fraction of each class of the train pool carved into val, by patient.",
        lower=0.0, upper=0.95)
    split_by: str = cli.option(
        "patient", "Group of the train/val carve: patient (no patient in two splits) or image.",
        choices=splits.SPLIT_BY)
    stratify: str = cli.option(
        "label", "What the train/val carve stratifies on: label (NORMAL / PNEUMONIA) or subtype "
        "(NORMAL / BACTERIAL / VIRAL / unknown, so val holds each subtype in proportion). "
        "Patients stay whole either way.", choices=splits.STRATIFY)
    seed: int = cli.option(0, "Seed of the val carve and of the record order in each split.")
    num_shards: int | None = cli.option(
        None, f"Shards per split. Default: size-based, ~{TARGET_SHARD_BYTES // 2**20} MiB per "
        f"shard and at least {MIN_SHARDS} when the split has {MIN_SHARDS}x{MIN_IMAGES_PER_SHARD} "
        f"images.", lower=1)
    workers: int | None = cli.option(
        None, "Decoding processes. Default: all CPU cores available to this process; 1 decodes "
        "in the converter's own process.", lower=1)
    compression: str = cli.option("none", "TFRecord compression.", choices=records.COMPRESSIONS)
    max_rejects: int = cli.option(
        0, "Rejected inputs tolerated before the exit status becomes 1 (the output is written "
        "anyway; see OUT/rejects.jsonl). -1: any number.", lower=-1)
    dedupe: bool = cli.option(
        False, "Drop byte- and pixel-identical duplicate images from train/val: a group keeps "
        "its official test copies (test is never changed), else its official val copy, else the "
        "first by path. Without it duplicates are only reported (and kept in one split).")
    use_official_val: bool = cli.option(
        False, "Keep the source's own val split instead of carving val from train (the Kaggle "
        "val has 16 images; without this flag they join the train pool). MedMNIST splits are "
        "always kept.")
    download: bool = cli.option(
        False, "MedMNIST only: fetch --src (e.g. pneumoniamnist_128.npz) from Zenodo into "
        "--cache_dir, checking its MD5, when it is not a local file.")
    cache_dir: str | None = cli.option(
        None, "Download cache for --download (default ~/.cache/pneumo_tf).")
    max_pixels: int = cli.option(
        DEFAULT_MAX_PIXELS, "Reject images with more pixels than this (decompression-bomb "
        "guard).", lower=1)
    masks: str | None = cli.option(
        None, "Folder of lung masks mirroring --src: the mask of SRC/train/NORMAL/x.jpeg is "
        "MASKS/train/NORMAL/x.png (any size: resized to its film, then cropped and resized like "
        "it, nearest neighbour; > 127 = lung). Stored as the records' lung_mask feature; films "
        "without a mask are kept (has_lung_mask 0).")
    lung_model: str | None = cli.lung_model_option(
        "--crop=lungs crops each film to the lungs it finds; the manifest records it (path and "
        "the sha256 of its model.keras), and runs trained on the data serve with it.")
    lung_margin: float = cli.option(
        preprocess.DEFAULT_LUNG_MARGIN, "--crop=lungs: margin added on every side of the lungs' "
        "bounding box, a fraction of the film's height (top, bottom) and width (left, right).",
        lower=0.0, upper=0.5)
    min_lung_fraction: float = cli.min_lung_fraction_option()
    progress: bool = True  # a progress bar on stderr (not a flag: the app always shows it)

    def check(self) -> None:
        """Raise :class:`ConvertError` naming the flag for any value out of range."""
        for name, allowed in (("encoding", records.ENCODINGS),
                              ("compression", records.COMPRESSIONS),
                              ("crop", (None, *preprocess.CROP_METHODS)),
                              ("split_by", splits.SPLIT_BY),
                              ("stratify", splits.STRATIFY)):
            if getattr(self, name) not in allowed:
                raise ConvertError(f"--{name}={getattr(self, name)!r} is not one of "
                                   f"{tuple(a for a in allowed if a is not None)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConvertError(f"--val_fraction={self.val_fraction} must be in [0, 1)")
        if self.image_size < 8:
            raise ConvertError(f"--image_size={self.image_size} is too small (at least 8 pixels)")
        if self.num_shards is not None and self.num_shards < 1:
            raise ConvertError(f"--num_shards={self.num_shards} must be >= 1 (or unset for "
                               f"size-based)")
        if self.crop == "lungs" and not self.lung_model:
            raise ConvertError("--crop=lungs needs --lung_model=<a lungs run directory> (train "
                               "one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`)")
        if self.lung_model and self.crop != "lungs":
            raise ConvertError(f"--lung_model is used by --crop=lungs only (got --crop="
                               f"{self.crop}); add --crop=lungs or drop --lung_model")


# ---------------------------------------------------------------------------------------------
# Worker side: no TensorFlow here (workers are spawned and import only numpy/cv2/decoders).


@dataclasses.dataclass(frozen=True)
class _WorkerConfig:
    image_size: int
    crop: str
    encoding: str
    max_pixels: int
    parent_pid: int = 0
    masks: str | None = None  # the --masks folder, absolute
    lung_size: int = 0        # --crop=lungs, finding the lungs: the lung model's input side


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
    # With --masks: "stored", "missing" (no mask file) or why the mask was not stored; the
    # mask file's sha256 and size when it was read.
    mask_status: str | None = None
    mask_sha256: str | None = None
    mask_size_bytes: int = 0
    lung_fraction: float | None = None  # --crop=lungs: the lung model's lung share of the film


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


MASK_SUFFIX = ".png"
MASK_STORED, MASK_MISSING = "stored", "missing"


def mask_path_for(masks: str | os.PathLike, key: str) -> Path:
    """The mask file of the source item ``key`` in a ``--masks`` folder that mirrors ``--src``:
    ``MASKS/<key with its suffix replaced by .png>`` (an absolute key loses its root)."""
    rel = Path(key)
    if rel.is_absolute():
        rel = rel.relative_to(rel.anchor)
    return Path(masks) / rel.with_suffix(MASK_SUFFIX)


def read_stored_mask(key: str, image_hw: tuple[int, int], box: preprocess.CropBox,
                     config: _WorkerConfig, out: ProcessedImage) -> bytes:
    """The stored ``lung_mask`` of one film, and its status in ``out.mask_status``.

    Reads ``mask_path_for(config.masks, key)`` and brings it onto the stored image with
    :func:`pneumo_tf.image.preprocess.preprocess_mask`. Never raises on a bad mask: the film keeps
    its record without a mask and the reason is its status.

    Returns:
        The mask encoded like the image (``[S, S]`` uint8 0/255), or :data:`records.NO_MASK`.
    """
    path = mask_path_for(config.masks, key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        out.mask_status = MASK_MISSING
        return records.NO_MASK
    except OSError as e:
        out.mask_status = f"mask unreadable ({e.strerror or e})"
        return records.NO_MASK
    out.mask_sha256, out.mask_size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None or mask.size == 0:
        out.mask_status = "mask does not decode as an image"
        return records.NO_MASK
    if not (mask > 127).any():
        out.mask_status = "mask all zero (no lung drawn)"
        return records.NO_MASK
    stored = preprocess.preprocess_mask(mask, image_hw, box, config.image_size)
    if not stored.any():
        out.mask_status = "mask empty after the crop"
        return records.NO_MASK
    out.mask_status = MASK_STORED
    return encode_image(stored, config.encoding)


def _decode_source_item(item, config: _WorkerConfig, out: ProcessedImage):
    """Read and decode one source item as the conversion does (its bytes' hash into ``out``).

    Returns:
        The :class:`pneumo_tf.data.decode.DecodedImage`, or None when the file cannot be read
        (``out.reject_reason`` says why).

    Raises:
        decode.RejectError: the item does not decode to a correct image.
    """
    from pneumo_tf.data import decode

    if item.path is None:
        return decode.decode_item(item, target_size=config.image_size, crop=config.crop,
                                  max_pixels=config.max_pixels)
    try:
        data = Path(item.path).read_bytes()
    except OSError as e:
        out.reject_reason = f"cannot read file ({e.strerror or e})"
        return None
    out.byte_sha256 = hashlib.sha256(data).hexdigest()
    out.size_bytes = len(data)
    return decode.decode_bytes(data, name=item.key, target_size=config.image_size,
                               crop=config.crop, max_pixels=config.max_pixels)


def lung_thumbnail_item(index: int, item, config: _WorkerConfig) -> tuple[int, np.ndarray | None]:
    """``(index, [G, G] uint8 thumbnail)`` of one source item for the lung model (``--crop=lungs``,
    first pass): the film decoded exactly as :func:`process_item` decodes it, squashed to the lung
    model's input (:func:`pneumo_tf.image.preprocess.lung_thumbnail`); None for a file that will
    be rejected (the second pass says why)."""
    try:
        decoded = _decode_source_item(item, config, ProcessedImage(index=index))
        if decoded is None:
            return index, None
        return index, preprocess.lung_thumbnail(decoded.gray, config.lung_size)
    except Exception:  # noqa: BLE001 -- the second pass decodes it again and records the reason
        return index, None


def process_item(index: int, item, config: _WorkerConfig,
                 lungs: preprocess.LungFinding | None = None) -> ProcessedImage:
    """Read, hash, decode, crop, resize and encode one source item. Never raises on bad input.

    Args:
        index: position of the item in the listing (echoed back for ordering checks).
        item: a :class:`pneumo_tf.data.sources.SourceItem`.
        config: image size, crop, encoding and pixel limit.
        lungs: ``--crop=lungs``: what the lung model found on this film (None: nothing, the
            fixed crop).
    """
    from pneumo_tf.data import decode

    out = ProcessedImage(index=index)
    try:
        decoded = _decode_source_item(item, config, out)
        if decoded is None:
            return out
        gray = decoded.gray
        if out.byte_sha256 is None:  # in-memory item (MedMNIST): its bytes are its pixels
            out.byte_sha256 = hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()
            out.size_bytes = gray.nbytes
        if config.crop == "lungs":
            out.lung_fraction = None if lungs is None else float(lungs.fraction)
            image, box, method = preprocess.preprocess_gray(
                gray, config.image_size, config.crop, None if lungs is None else lungs.box)
        else:
            image, box, method = preprocess.preprocess_gray(gray, config.image_size, config.crop)
        # "Pixel-identical" = the same stored pixels: what the model would see twice. Hashing
        # the small stored image (not the decoded one) keeps this nearly free.
        out.pixel_hash = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
        out.orig_height, out.orig_width = int(decoded.orig_height), int(decoded.orig_width)
        out.crop_box = source_box(box, int(decoded.scale), out.orig_height, out.orig_width)
        out.crop_method = method
        mask = (read_stored_mask(item.key, gray.shape[:2], box, config, out)
                if config.masks else None)
        # The record is serialized here, in parallel, so the parent only writes bytes.
        out.payload = records.serialize_example(
            encode_image(image, config.encoding), int(item.label), int(item.subtype),
            item.patient_id, item.key, (config.image_size, config.image_size),
            (out.orig_height, out.orig_width), out.crop_box, method, mask)
    except decode.RejectError as e:
        out.reject_reason = str(e)
    except Exception as e:  # noqa: BLE001 -- bad input must never stop a run; it is reported
        out.reject_reason = f"unexpected decoder error: {type(e).__name__}: {e}"
    if out.reject_reason is not None:
        out.payload = None
    return out


def _process_chunk(tasks: list[tuple]) -> list[ProcessedImage]:
    """Tasks are ``(index, item)``, or ``(index, item, lung finding)`` for ``--crop=lungs``."""
    return [process_item(task[0], task[1], _worker_config, *task[2:]) for task in tasks]


def _thumbnail_chunk(tasks: list[tuple]) -> list[tuple[int, np.ndarray | None]]:
    return [lung_thumbnail_item(task[0], task[1], _worker_config) for task in tasks]


# ---------------------------------------------------------------------------------------------
# Parent side.


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


def balanced_class_weights(labels: Sequence[int],
                           classes: Sequence[int] = (0, 1)) -> dict[str, float]:
    """sklearn's ``compute_class_weight("balanced")``: ``n / (len(classes) * n_c)`` per class.

    Args:
        labels: the class of each sample; values outside ``classes`` (an unknown subtype, -1)
            are left out, of ``n`` too.
        classes: the classes to weigh: (0, 1) for the labels, (0, 1, 2) for the subtypes.

    Returns:
        ``{"0": w, "1": w, ...}``; a class absent from ``labels`` gets 1.0 (sklearn would raise).
    """
    counts = collections.Counter(int(y) for y in labels if int(y) in classes)
    n = sum(counts.values())
    return {str(c): (n / (len(classes) * counts[c]) if counts[c] else 1.0) for c in classes}


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
    subtype: int
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


def _run_workers(tasks: list[tuple], config: _WorkerConfig, workers: int,
                 on_result: Callable[[Any], None], chunk_fn: Callable = _process_chunk) -> None:
    """Process ``tasks`` in ``workers`` spawned processes (inline when 1); results in order.

    ``chunk_fn`` maps a list of tasks to their results in a worker (:func:`_process_chunk`:
    records; :func:`_thumbnail_chunk`: the lung model's thumbnails).

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
        _init_worker(dataclasses.replace(config, parent_pid=0))
        for task in tasks:
            for result in chunk_fn([task]):
                on_result(result)
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
            pending = collections.deque(pool.submit(chunk_fn, c)
                                        for c in itertools.islice(chunks, 4 * workers))
            while pending:
                results = pending.popleft().result()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append(pool.submit(chunk_fn, nxt))
                for r in results:
                    on_result(r)
    except concurrent.futures.process.BrokenProcessPool as e:
        raise ConvertError(
            f"a decoding worker process died ({e}): a decoder crashed or the machine ran out of "
            f"memory. Re-run with --workers=1 to see which file, or lower --workers") from e


@dataclasses.dataclass
class _Decoded:
    """Stage 3's result: what the workers made of the listing."""

    kept: list[_Kept]
    rejects: list[dict]            # {"path", "reason"}, in listing order
    checksum_lines: list[str]      # "key<TAB>size<TAB>sha256\n" of every item read
    first_result_at: float | None  # time.monotonic() of the first result (end of start-up)
    mask_lines: list[str] = dataclasses.field(default_factory=list)  # the same, of masks read
    mask_rejects: list[dict] = dataclasses.field(default_factory=list)  # {"path", "reason"}
    lung_model: dict | None = None  # --crop=lungs: LungModel.describe()
    lungs_s: float | None = None    # --crop=lungs: seconds of the first pass


@dataclasses.dataclass
class _Assignment:
    """Stage 4's result: duplicates found and every kept image's split."""

    by_split: dict[str, list[_Kept]]   # records.SPLITS -> members, in spool order
    report: splits.DuplicateReport
    dropped: set[str]                  # keys removed by --dedupe
    cross_split: list[list[str]]       # duplicate groups spread over two splits
    overlap: dict[str, list[str]]      # "a/b" -> patient ids in both splits
    keep_official_val: bool


def _list_source(src, out: Path, config: ConvertConfig):
    """Stage 1: check the settings and the paths, list the source and refuse an empty one.

    Nothing in ``out`` is touched yet: a mistyped ``--src`` must fail before an earlier good
    output is deleted.

    Returns:
        The :class:`pneumo_tf.data.sources.SourceListing`.
    """
    from pneumo_tf.data import sources

    config.check()
    if out == Path(src).absolute():
        raise ConvertError(f"--out={out} must not be the source itself; pick another folder")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out={out} exists and is not a folder; pick a folder path")
    listing = sources.discover(str(src), download=config.download, cache_dir=config.cache_dir)
    _check_listing_not_empty(listing, src, out)
    if config.masks:
        check_mask_layout(config.masks, [item.key for item in listing.items], src)
    if config.lung_model:
        _open_lung_model(config.lung_model)
    return listing


def _open_lung_model(path: str):
    """The ``--lung_model`` run as a :class:`pneumo_tf.modeling.lungs.LungModel` (the model
    loads on first use).

    Raises:
        ConvertError: not a finished lungs run (the message names the fix).
    """
    from pneumo_tf.core import rundir
    from pneumo_tf.modeling import lungs as lungs_lib

    try:
        return lungs_lib.LungModel(path)
    except rundir.RunDirError as e:
        raise ConvertError(str(e)) from e


def mask_files(masks: str | os.PathLike) -> list[str]:
    """Every ``*.png`` under a ``--masks`` folder, as sorted posix paths relative to it."""
    root = Path(masks)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + MASK_SUFFIX)
                  if p.is_file())


def check_mask_layout(masks: str | os.PathLike, keys: Sequence[str], src) -> int:
    """Check that a ``--masks`` folder mirrors the source; return how many films have a mask file.

    Raises:
        ConvertError: the folder is missing, holds no PNG, or none of its PNGs sits where a film
            of ``--src`` expects its mask (the message shows both layouts and, when the masks sit
            one folder deeper, the ``--masks`` that fits).
    """
    root = Path(masks)
    if not root.is_dir():
        raise ConvertError(f"--masks={masks} is not a folder; pass the folder of lung masks that "
                           f"mirrors --src (MASKS/train/NORMAL/x.png for SRC/train/NORMAL/x.jpeg)")
    files = set(mask_files(root))
    if not files:
        raise ConvertError(f"--masks={masks} holds no {MASK_SUFFIX} file; pass the folder of "
                           f"lung masks (one PNG per film, mirroring --src)")
    wanted = [mask_path_for("", k).as_posix() for k in keys]
    matched = sum(w in files for w in wanted)
    if matched:
        return matched
    hint = ""
    for sub in sorted({f.split("/")[0] for f in files if "/" in f}):
        if any(f"{sub}/{w}" in files for w in wanted):
            hint = f"; the masks sit one folder deeper: pass --masks={root / sub}"
            break
    raise ConvertError(f"--masks={masks} does not mirror --src={src}: no film has its mask "
                       f"(the film {keys[0] if keys else '?'} expects "
                       f"{wanted[0] if wanted else '?'}, the folder holds e.g. "
                       f"{sorted(files)[0]}){hint}")


def _tasks_and_rejects(listing) -> tuple[list[tuple[int, Any]], list[dict]]:
    """The items to decode (``(index, item)``) and the rejects known before decoding."""
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
    return tasks, rejects


def _find_lungs(tasks: list[tuple[int, Any]], config: ConvertConfig,
                worker_config: _WorkerConfig) -> tuple[list[tuple], dict]:
    """``--crop=lungs``, first pass: every film's lungs by the lung model.

    The workers decode each film as the conversion will and squash it to the lung model's input;
    the parent runs the model on batches of these thumbnails as they arrive
    (:func:`pneumo_tf.image.preprocess.find_lungs`: lung share, confidence, box plus
    ``--lung_margin``, none below ``--min_lung_fraction``).

    Returns:
        ``(tasks with each film's finding appended (None: it did not decode), the lung model's
        description for the manifest)``.
    """
    lung_model = _open_lung_model(config.lung_model)
    findings: dict[int, preprocess.LungFinding] = {}
    batch: list[tuple[int, np.ndarray]] = []
    bar = Progress(len(tasks), "find lungs", enabled=config.progress)

    def flush() -> None:
        if batch:
            probs = lung_model.grid_probabilities(np.stack([t for _, t in batch])[..., None])
            for (index, _), prob in zip(batch, probs):
                findings[index] = preprocess.find_lungs(prob, config.lung_margin,
                                                        config.min_lung_fraction)
            batch.clear()

    def on_result(result: tuple[int, np.ndarray | None]) -> None:
        if result[1] is not None:
            batch.append(result)
            if len(batch) >= lung_model.batch_size:
                flush()
        bar.update(result[0] + 1)

    _run_workers(tasks, dataclasses.replace(worker_config, lung_size=lung_model.image_size),
                 config.workers, on_result, chunk_fn=_thumbnail_chunk)
    flush()
    bar.close()
    return ([(index, item, findings.get(index)) for index, item in tasks],
            lung_model.describe())


def _decode_to_spool(tasks: list[tuple[int, Any]], config: ConvertConfig, spool) -> _Decoded:
    """Stage 3: decode every item in worker processes; append each record to ``spool``.

    The parent writes each serialized record to the spool as it arrives, so memory stays flat.
    With ``--crop=lungs`` a first pass finds every film's lungs (:func:`_find_lungs`).
    """
    items = [task[1] for task in tasks]
    decoded = _Decoded(kept=[], rejects=[], checksum_lines=[], first_result_at=None)
    bar = Progress(len(tasks), "convert", enabled=config.progress)

    def on_result(r: ProcessedImage) -> None:
        if decoded.first_result_at is None:
            decoded.first_result_at = time.monotonic()
        item = items[r.index]
        if r.byte_sha256 is not None:
            decoded.checksum_lines.append(f"{item.key}\t{r.size_bytes}\t{r.byte_sha256}\n")
        if r.mask_sha256 is not None:
            decoded.mask_lines.append(f"{mask_path_for('', item.key).as_posix()}\t"
                                      f"{r.mask_size_bytes}\t{r.mask_sha256}\n")
        if r.payload is None:
            decoded.rejects.append({"path": item.key, "reason": r.reject_reason})
        else:
            if r.mask_status not in (None, MASK_STORED, MASK_MISSING):
                decoded.mask_rejects.append({"path": mask_path_for("", item.key).as_posix(),
                                             "reason": r.mask_status})
            offset = spool.tell()
            spool.write(r.payload)
            length = len(r.payload)
            r.payload = None  # the spool holds it now
            decoded.kept.append(_Kept(item.key, int(item.label), int(item.subtype),
                                      item.patient_id, item.split, r, offset, length))
        bar.update(r.index + 1)

    worker_config = _WorkerConfig(image_size=config.image_size, crop=config.crop,
                                  encoding=config.encoding, max_pixels=config.max_pixels,
                                  masks=config.masks)
    if config.crop == "lungs":
        started = time.monotonic()
        tasks, decoded.lung_model = _find_lungs(tasks, config, worker_config)
        decoded.lungs_s = time.monotonic() - started
    _run_workers(tasks, worker_config, config.workers, on_result)
    bar.close()
    return decoded


def _assign_splits(kept: list[_Kept], config: ConvertConfig, source_kind: str) -> _Assignment:
    """Stage 4: find duplicates (drop them with ``--dedupe``), then assign splits by patient.

    Duplicates left in the pool (all of them without ``--dedupe``) share a split.
    """
    report = splits.find_duplicates([k.key for k in kept], [k.result.byte_sha256 for k in kept],
                                    [k.result.pixel_hash for k in kept],
                                    [k.official_split for k in kept])
    dropped = set(report.drop) if config.dedupe else set()
    kept = [k for k in kept if k.key not in dropped]
    keep_official_val = config.use_official_val or source_kind == "medmnist"
    groups = report.byte_identical + report.pixel_identical
    strata = splits.strata([k.label for k in kept], [k.subtype for k in kept], config.stratify)
    assigned = splits.assign_splits(
        [k.official_split for k in kept], strata, [k.patient_id for k in kept],
        [k.key for k in kept], val_fraction=config.val_fraction, seed=config.seed,
        split_by=config.split_by, keep_official_val=keep_official_val, linked_keys=groups)
    # Duplicates that ended up in different splits leak between them (unless --dedupe).
    split_of = {k.key: s for k, s in zip(kept, assigned)}
    cross_split = [g for g in groups if len({split_of[x] for x in g if x in split_of}) > 1]
    by_split: dict[str, list[_Kept]] = {s: [] for s in records.SPLITS}
    for k, s in zip(kept, assigned):
        by_split[s].append(k)
    return _Assignment(by_split, report, dropped, cross_split,
                       splits.patient_overlap(assigned, [k.patient_id for k in kept]),
                       keep_official_val)


def _write_shards(out: Path, by_split: dict[str, list[_Kept]], spool,
                  config: ConvertConfig) -> dict[str, dict]:
    """Stage 5: each split's records in a seeded order, copied from the spool into its shards.

    Returns:
        ``{split: manifest entry}`` for the splits that have images.
    """
    spool.flush()
    split_info = {}
    for si, name in enumerate(records.SPLITS):
        members = by_split[name]
        if not members:
            continue
        # Seeded order inside the split: shards mix classes and patients. Offsetting the seed
        # per split keeps the orders independent.
        order = np.random.default_rng([config.seed, si]).permutation(len(members))
        split_info[name] = _write_split(out, name, [members[i] for i in order], spool,
                                        config.num_shards, config.compression)
        if config.masks:
            split_info[name]["lung_masks"] = sum(k.result.mask_status == MASK_STORED
                                                 for k in members)
    return split_info


def _write_rejects(out: Path, rejects: list[dict]) -> None:
    """``OUT/rejects.jsonl``: one ``{"path", "reason"}`` line per rejected input, by path."""
    rejects.sort(key=lambda r: r["path"])
    atomic_files.write_text_atomic(out / REJECTS_NAME,
                                   "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))


def _duplicates_entry(assignment: _Assignment) -> dict:
    report = assignment.report
    return {
        "byte_identical_groups": len(report.byte_identical),
        "pixel_identical_groups": len(report.pixel_identical),
        "byte_identical": report.byte_identical[:MAX_LISTED_DUPLICATE_GROUPS],
        "pixel_identical": report.pixel_identical[:MAX_LISTED_DUPLICATE_GROUPS],
        "dropped": sorted(assignment.dropped),
        "cross_split_groups": len(assignment.cross_split),
        "cross_split": assignment.cross_split[:MAX_LISTED_DUPLICATE_GROUPS],
    }


def _source_entry(listing, checksum_lines: list[str]) -> dict:
    checksum = hashlib.sha256("".join(sorted(checksum_lines)).encode("utf-8")).hexdigest()
    return {
        "path": str(Path(listing.root).absolute()),
        "kind": listing.kind,
        "items": len(listing.items) + len(listing.rejects),
        "checksum": checksum,
        "checksum_method": "sha256 over sorted lines 'key<TAB>size<TAB>sha256(file bytes)' "
                           "of every item read (npz items: of their pixels)",
    }


def _masks_entry(config: ConvertConfig, listing, decoded: _Decoded,
                 assignment: _Assignment) -> dict:
    """The manifest's ``masks`` entry of a ``--masks`` conversion: the folder, its checksum and
    what became of its masks (see docs/data_contracts.md)."""
    files = mask_files(config.masks)
    wanted = {mask_path_for("", item.key).as_posix() for item in listing.items}
    members = [k for split in assignment.by_split.values() for k in split]
    status = collections.Counter(k.result.mask_status for k in members)
    rejects = sorted(decoded.mask_rejects, key=lambda r: r["path"])
    return {
        "path": config.masks,
        "files": len(files),
        "unmatched_files": len(set(files) - wanted),
        "stored": status[MASK_STORED],
        "films_without_mask": status[MASK_MISSING],
        "rejected": sum(n for k, n in status.items() if k not in (MASK_STORED, MASK_MISSING)),
        "rejects_by_reason": dict(sorted(collections.Counter(
            _reason_class(r["reason"]) for r in rejects).items())),
        "rejects": rejects[:MAX_LISTED_DUPLICATE_GROUPS],
        "checksum": hashlib.sha256("".join(sorted(decoded.mask_lines)).encode()).hexdigest(),
        "checksum_method": "sha256 over sorted lines 'mask path<TAB>size<TAB>sha256(file "
                           "bytes)' of every mask file read",
    }


def _lung_model_entry(config: ConvertConfig, decoded: _Decoded, assignment: _Assignment) -> dict:
    """The manifest's ``lung_model`` entry of a ``--crop=lungs`` conversion: which model (path,
    sha256 of its model.keras, input size), the crop's settings and what it found on the kept
    films (see docs/data_contracts.md)."""
    members = [k for split in assignment.by_split.values() for k in split]
    fractions = np.array([k.result.lung_fraction for k in members
                          if k.result.lung_fraction is not None], np.float64)
    methods = collections.Counter(k.result.crop_method for k in members)
    stats = ({"mean": float(fractions.mean()), "min": float(fractions.min()),
              "median": float(np.median(fractions)), "max": float(fractions.max())}
             if fractions.size else None)
    return {**decoded.lung_model, "margin": config.lung_margin,
            "min_lung_fraction": config.min_lung_fraction,
            "lungs_found": methods["lungs"], "fallbacks": methods["lungs_fallback"],
            "lung_fraction": stats,
            "method": "bounding box of the lung model's pixels above 0.5 on the film squashed to "
                      "its input, plus margin (fractions of the film's height and width); the "
                      "fixed crop below min_lung_fraction"}


def _flags_entry(src, out: Path, config: ConvertConfig, keep_official_val: bool) -> dict:
    """The settings of the run (crop and workers resolved) as the manifest records them."""
    settings = {f.name: getattr(config, f.name) for f in cli.flag_fields(ConvertConfig)
                if f.name != "cache_dir"}
    return {"src": str(Path(src).absolute()), "out": str(out), **settings,
            "keep_official_val": keep_official_val}


def _timing_entry(times: dict[str, float], converted: int) -> dict:
    """Seconds per phase; ``times``: start, first (result), decoded, written (monotonic), and
    ``lungs`` (seconds of the ``--crop=lungs`` first pass, which ends before the first result)."""
    first = times["first"] or times["decoded"]
    steady = times["written"] - first
    lungs = times.get("lungs")
    return {
        "total_s": round(times["written"] - times["start"], 3),
        "startup_s": round(first - times["start"] - (lungs or 0.0), 3),
        **({"find_lungs_s": round(lungs, 3)} if lungs is not None else {}),
        "decode_s": round(times["decoded"] - first, 3),
        "write_s": round(times["written"] - times["decoded"], 3),
        "images_per_s": round(converted / steady, 1) if steady > 0 else None,
    }


def _manifest(src, out: Path, config: ConvertConfig, listing, decoded: _Decoded,
              assignment: _Assignment, split_info: dict, times: dict[str, float]) -> dict:
    """Stage 6's content: everything ``manifest.json`` says about the conversion."""
    rejects = decoded.rejects
    reasons = collections.Counter(_reason_class(r["reason"]) for r in rejects)
    extras = {"masks": _masks_entry(config, listing, decoded, assignment)} if config.masks else {}
    if config.crop == "lungs":
        extras["lung_model"] = _lung_model_entry(config, decoded, assignment)
    return {
        "version": records.MANIFEST_VERSION,
        "tool_version": pneumo_tf.__version__,
        "image_size": config.image_size,
        "channels": 1,
        "crop": config.crop,
        "encoding": config.encoding,
        "compression": config.compression,
        "splits": split_info,
        "class_weights": balanced_class_weights([k.label for k in assignment.by_split["train"]]),
        "subtype_class_weights": balanced_class_weights(
            [k.subtype for k in assignment.by_split["train"]], classes=(0, 1, 2)),
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "duplicates_dropped": len(assignment.dropped),
        "duplicates": _duplicates_entry(assignment),
        "patient_overlap": {pair: {"count": len(ids), "ids": ids[:MAX_LISTED_OVERLAP_IDS]}
                            for pair, ids in assignment.overlap.items()},
        "empty_folders": sorted(listing.empty_folders),
        "source": _source_entry(listing, decoded.checksum_lines),
        **extras,
        "flags": _flags_entry(src, out, config, assignment.keep_official_val),
        "timing": _timing_entry(times, sum(v["count"] for v in split_info.values())),
    }


def convert_dataset(src: str | os.PathLike, out: str | os.PathLike,
                    config: ConvertConfig | None = None, **overrides) -> dict:
    """Convert a radiograph source into TFRecord shards + ``manifest.json`` in ``out``.

    The stages of the module docstring: list + validate, clean ``out``, decode in workers,
    duplicates + splits, write shards, manifest.

    Args:
        src: Kaggle-layout folder, CSV manifest or MedMNIST npz (see
            :func:`pneumo_tf.data.sources.discover`).
        out: output folder (created; earlier converter outputs in it are replaced).
        config: the settings; None = the defaults of :class:`ConvertConfig`.
        **overrides: :class:`ConvertConfig` fields to change, e.g. ``image_size=64,
            workers=1, progress=False``.

    Returns:
        The manifest written to ``out/manifest.json`` (plus ``timing``).

    Raises:
        ConvertError: bad settings (naming the flag) or an unusable ``out``.
        pneumo_tf.data.sources.SourceError: ``src`` is missing or has no known layout.
        TypeError: an override that is not a :class:`ConvertConfig` field.

    Note:
        Workers are started with ``spawn``, which re-imports the caller's main script in each
        worker (Python's rule for ``spawn``): keep heavy imports such as TensorFlow inside
        ``main()`` or under ``if __name__ == "__main__":`` of scripts that call this with
        ``workers > 1``, or every worker pays for them.
    """
    times = {"start": time.monotonic()}
    config = dataclasses.replace(config or ConvertConfig(), **overrides)
    out = Path(out).absolute()
    listing = _list_source(src, out, config)
    out.mkdir(parents=True, exist_ok=True)
    clean_output_dir(out)
    # TensorFlow is needed to write shards; import it before the clock of the steady state
    # starts (workers are spawned, so the parent's TensorFlow never reaches them).
    import tensorflow  # noqa: F401

    config = dataclasses.replace(
        config, crop=config.crop or listing.default_crop,
        workers=config.workers or default_workers(),
        masks=str(Path(config.masks).absolute()) if config.masks else None,
        lung_model=str(Path(config.lung_model).absolute()) if config.lung_model else None)
    tasks, rejects = _tasks_and_rejects(listing)
    spool_path = out / SPOOL_NAME
    spool = open(spool_path, "w+b")  # noqa: SIM115 -- closed and removed in the finally below
    try:
        decoded = _decode_to_spool(tasks, config, spool)
        times["first"], times["decoded"] = decoded.first_result_at, time.monotonic()
        times["lungs"] = decoded.lungs_s
        assignment = _assign_splits(decoded.kept, config, listing.kind)
        split_info = _write_shards(out, assignment.by_split, spool, config)
    finally:
        spool.close()
        spool_path.unlink(missing_ok=True)  # also on error: no stale spool beside the output
    times["written"] = time.monotonic()
    decoded.rejects = rejects + decoded.rejects
    _write_rejects(out, decoded.rejects)
    manifest = _manifest(src, out, config, listing, decoded, assignment, split_info, times)
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
        "subtype_counts": records.subtype_counts(k.subtype for k in members),
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
    lines.append(f"  {'split':<6} {'images':>7} {'NORMAL':>7} {'PNEUMONIA':>9} {'bacterial':>9} "
                 f"{'viral':>6} {'unknown':>7} {'patients':>8} {'shards':>6}  crop methods")
    for name, s in manifest["splits"].items():
        cc = s["class_counts"]
        sc = s.get("subtype_counts", {})
        subtypes = " ".join(f"{sc.get(k, '-'):>{w}}"
                            for k, w in (("BACTERIAL", 9), ("VIRAL", 6), ("UNKNOWN", 7)))
        methods = ", ".join(f"{m} {c}" for m, c in s.get("crop_methods", {}).items())
        lines.append(f"  {name:<6} {s['count']:>7} {cc['NORMAL']:>7} {cc['PNEUMONIA']:>9} "
                     f"{subtypes} {s['patients']:>8} {len(s['shards']):>6}  {methods}")
    cw = manifest["class_weights"]
    trained_on = "train" in manifest["splits"]  # a sample of another site has test only
    if trained_on:
        lines.append(f"  class weights (train, balanced): 0 -> {cw['0']:.3f}, 1 -> {cw['1']:.3f}")
    sw = manifest.get("subtype_class_weights")
    if sw and trained_on:
        lines.append("  subtype weights (train, balanced over known subtypes): "
                     + ", ".join(f"{c} -> {sw[c]:.3f}" for c in ("0", "1", "2")))
    lung = manifest.get("lung_model")
    if lung:
        share = lung.get("lung_fraction") or {}
        lines.append(f"  lung crop: {lung['lungs_found']} films cropped to their lungs, "
                     f"{lung['fallbacks']} fixed (lung share < {lung['min_lung_fraction']}); "
                     f"lung share median {share.get('median', float('nan')):.2f} "
                     f"(min {share.get('min', float('nan')):.2f}); model {lung['path']}")
    masks = manifest.get("masks")
    if masks:
        per_split = ", ".join(f"{n} {s.get('lung_masks', 0)}"
                              for n, s in manifest["splits"].items())
        why = ", ".join(f"{r}: {c}" for r, c in masks["rejects_by_reason"].items())
        lines.append(f"  lung masks: {masks['stored']} stored ({per_split}); "
                     f"{masks['films_without_mask']} films without one; {masks['rejected']} "
                     f"rejected{f' ({why})' if why else ''}; {masks['unmatched_files']} of "
                     f"{masks['files']} mask files match no film")
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
        lungs = f", finding the lungs {t['find_lungs_s']:.1f} s" if "find_lungs_s" in t else ""
        lines.append(f"  time {t['total_s']:.1f} s (start-up {t['startup_s']:.1f} s{lungs}), "
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


@dataclasses.dataclass
class _ShardScan:
    """What reading one shard found (see :func:`_verify_shard`)."""

    labels: list[int] = dataclasses.field(default_factory=list)
    subtypes: list[int] = dataclasses.field(default_factory=list)
    patients: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    readable: bool = True
    masks: int = 0  # records with has_lung_mask 1


def _check_record(name: str, n: int, parsed: dict, j: int, size: int) -> list[str]:
    """Problems of record ``j`` of a parsed batch (the ``n``-th of shard ``name``)."""
    problems = []
    label, subtype = int(parsed["label"][j]), int(parsed["subtype"][j])
    if label not in (0, 1):
        problems.append(f"{name}: record {n} has label {label} (expected 0/1)")
    elif not records.subtype_fits_label(subtype, label):
        problems.append(f"{name}: record {n} has subtype {subtype} with label {label} (NORMAL is "
                        f"subtype 0 or -1, PNEUMONIA 1, 2 or -1)")
    if int(parsed["height"][j]) != size or int(parsed["width"][j]) != size:
        problems.append(f"{name}: record {n} is {parsed['height'][j]}x"
                        f"{parsed['width'][j]}, manifest image_size is {size}")
    return problems


def _verify_shard(path: Path, compression: str, encoding: str, size: int) -> _ShardScan:
    """Read one shard fully, CRC checked: its labels, subtypes, patients and problems.

    A version-1 shard (no ``subtype`` feature) reads with subtype -1 everywhere.
    """
    import tensorflow as tf

    scan = _ShardScan()
    spec = records.feature_spec()

    def check(batch: list[bytes]) -> None:
        parsed = {k: v.numpy() for k, v in tf.io.parse_example(batch, spec).items()}
        for j in range(len(batch)):
            n = len(scan.labels)
            scan.labels.append(int(parsed["label"][j]))
            scan.subtypes.append(int(parsed["subtype"][j]))
            scan.patients.append(parsed["patient_id"][j].decode("utf-8", "replace"))
            scan.problems.extend(_check_record(path.name, n, parsed, j, size))
            bad = _check_image(parsed["image"][j], encoding, size)
            if bad:
                scan.problems.append(f"{path.name}: record {n}: {bad}")
            if int(parsed["has_lung_mask"][j]):
                scan.masks += 1
                bad = _check_image(parsed["lung_mask"][j], encoding, size)
                if bad:
                    scan.problems.append(f"{path.name}: record {n}: lung_mask: {bad}")

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
        position = len(scan.labels) + len(batch)
        scan.problems.append(f"{path.name}: unreadable after {position} good records "
                             f"({records.tf_error_text(e)}); re-run the converter to rewrite it")
        scan.readable = False
    return scan


def _check_shard_name(name: str, split: str, num_shards: int, compression: str) -> list[str]:
    parsed = records.parse_shard_name(name)
    if parsed is None or parsed[0] != split or parsed[2] != num_shards \
            or parsed[3] != compression:
        return [f"{name}: name does not fit split {split!r} with {num_shards} shards and "
                f"compression {compression!r}"]
    return []


def _listed_shards(split: str, info: dict) -> tuple[list[str], list[int | None], list[str]]:
    """``(shard names, expected counts, problems)`` of one split's manifest entry."""
    shards = list(info.get("shards", []))
    counts = info.get("shard_counts") or [None] * len(shards)
    if len(counts) != len(shards):
        return shards, [None] * len(shards), [
            f"manifest: split {split} lists {len(shards)} shards but {len(counts)} shard_counts"]
    return shards, list(counts), []


def _check_split_totals(split: str, info: dict, found: _ShardScan) -> list[str]:
    """Records, records per class and per subtype, and patients of a split against its manifest
    entry (subtypes only when the entry counts them: a version-1 manifest does not)."""
    problems = []
    if len(found.labels) != int(info.get("count", -1)):
        problems.append(f"split {split}: {len(found.labels)} records in its shards, manifest says "
                        f"{info.get('count')}")
    by_class = collections.Counter(found.labels)
    want = info.get("class_counts", {})
    for c, cname in enumerate(CLASS_NAMES):
        if by_class.get(c, 0) != int(want.get(cname, -1)):
            problems.append(f"split {split}: {by_class.get(c, 0)} {cname} records, manifest says "
                            f"{want.get(cname)}")
    if "subtype_counts" in info:
        want = info["subtype_counts"]
        for name, n in records.subtype_counts(found.subtypes).items():
            if n != int(want.get(name, -1)):
                problems.append(f"split {split}: {n} {name} subtype records, manifest says "
                                f"{want.get(name)}")
    if "lung_masks" in info and found.masks != int(info["lung_masks"]):
        problems.append(f"split {split}: {found.masks} records with a lung_mask, manifest says "
                        f"{info['lung_masks']}")
    elif "lung_masks" not in info and found.masks:
        problems.append(f"split {split}: {found.masks} records with a lung_mask, but the manifest "
                        f"counts no masks; re-run the converter")
    patients = set(found.patients)
    if "patients" in info and len(patients) != int(info["patients"]):
        problems.append(f"split {split}: {len(patients)} patients in its records, manifest "
                        f"says {info['patients']}")
    return problems


def _verify_split(out: Path, manifest: dict, split: str) -> tuple[list[str], set[str]]:
    """Every shard of ``split`` read and checked: ``(problems, patient ids found)``."""
    info = manifest["splits"][split]
    size, encoding = int(manifest["image_size"]), manifest["encoding"]
    compression = manifest["compression"]
    shards, expected_counts, problems = _listed_shards(split, info)
    found = _ShardScan()
    for name, expected in zip(shards, expected_counts):
        problems += _check_shard_name(name, split, len(shards), compression)
        if not (out / name).is_file():
            problems.append(f"{name}: listed in the manifest but missing; re-run the converter")
            found.readable = False
            continue
        scan = _verify_shard(out / name, compression, encoding, size)
        problems += scan.problems
        found.readable &= scan.readable
        if scan.readable and expected is not None and len(scan.labels) != int(expected):
            problems.append(f"{name}: {len(scan.labels)} records, manifest says {expected}")
        found.labels += scan.labels
        found.masks += scan.masks
        found.subtypes += scan.subtypes
        found.patients += scan.patients
    if found.readable:  # else the shard is named above; split totals would only repeat it
        problems += _check_split_totals(split, info, found)
    return problems, set(found.patients)


def _check_patient_overlap(reported: dict, patients_by_split: dict[str, set[str]]) -> list[str]:
    """Patients shared by two splits against the manifest's ``patient_overlap``."""
    names = [s for s in records.SPLITS if s in patients_by_split]
    names += sorted(set(patients_by_split) - set(names))
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = patients_by_split[a] & patients_by_split[b]
            n_reported = int(reported.get(f"{a}/{b}", {}).get("count", 0))
            if len(shared) != n_reported:
                problems.append(f"splits {a}/{b} share {len(shared)} patients, manifest reports "
                                f"{n_reported} (e.g. {', '.join(sorted(shared)[:3])})")
    return problems


def _check_stray_files(out: Path, listed: set[str]) -> list[str]:
    """Shard files the manifest does not list and leftover ``*.partial`` files."""
    problems = []
    for p in sorted(out.iterdir()):
        if records.parse_shard_name(p.name) and p.name not in listed:
            problems.append(f"{p.name}: shard file not listed in the manifest (left from another "
                            f"run?); delete it or re-run the converter")
        elif p.name.endswith(".partial"):
            problems.append(f"{p.name}: leftover temporary file of an interrupted run; re-run the "
                            f"converter")
    return problems


def verify_data_dir(out: str | os.PathLike) -> list[str]:
    """Check a converter output folder against its manifest.

    Re-reads every shard with CRC checks, decodes every image (raw: ``S*S`` bytes; PNG: decodes to
    ``[S, S]`` uint8), and compares records per shard, per split and per class, and patients per
    split, with ``manifest.json``. Also flags shard files the manifest does not list, leftover
    ``*.partial`` files and patients shared by two splits that the manifest did not report.

    Returns:
        Problems, each naming the shard or file; empty when everything matches.
    """
    out = Path(out)
    try:
        manifest = records.read_manifest(out)
    except records.DataDirError as e:
        return [str(e)]
    problems: list[str] = []
    patients_by_split: dict[str, set[str]] = {}
    listed: set[str] = set()
    for split, info in manifest["splits"].items():
        listed.update(info.get("shards", []))
        split_problems, patients_by_split[split] = _verify_split(out, manifest, split)
        problems += split_problems
    problems += _check_patient_overlap(manifest.get("patient_overlap", {}), patients_by_split)
    return problems + _check_stray_files(out, listed)


if __name__ == "__main__":  # the old spelling, python -m pneumo_tf.data.convert
    from pneumo_tf.convert import run

    run("pneumo_tf.data.convert")
