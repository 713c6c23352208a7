"""The TFRecord contract between the converter and the input pipeline.

A data directory holds ``{split}-{i:05d}-of-{n:05d}.tfrecord[.gz]`` shards and a
``manifest.json`` written last. Each record is a ``tf.train.Example`` with the features in
:data:`FEATURES`; the image is one grayscale channel, ``[image_size, image_size]`` uint8, stored
raw (row-major bytes) or PNG-encoded.

Writers here are atomic: a shard is written under a temporary name and renamed when complete,
and the manifest is renamed into place last, so a run killed at any moment leaves nothing that
looks complete.

``manifest.json`` (keys the rest of the project relies on; the converter adds more)::

    {"version": 2, "tool_version": "0.1.0", "image_size": 224, "channels": 1,
     "crop": "fixed", "encoding": "raw", "compression": "none",
     "splits": {"train": {"count": 4172, "class_counts": {"NORMAL": 1073, "PNEUMONIA": 3099},
                          "subtype_counts": {"NORMAL": 1073, "BACTERIAL": 2023, "VIRAL": 1076,
                                             "UNKNOWN": 0},
                          "patients": 2100, "shards": ["train-00000-of-00004.tfrecord", ...],
                          "shard_counts": [1043, ...]}, "val": {...}, "test": {...}},
     "class_weights": {"0": 1.94, "1": 0.67},   # sklearn "balanced", from the train split
     "subtype_class_weights": {"0": 1.30, "1": 0.69, "2": 1.29},  # the same, known subtypes
     "rejected": 0, "duplicates_dropped": 0, "flags": {...}, "source": {...}}

Lung masks. A data dir converted with ``--masks=DIR`` has a ``masks`` manifest entry and a
``lung_masks`` count per split; each of its records has ``has_lung_mask`` (1 or 0) and, when 1,
``lung_mask``: the film's lung mask cropped and resized like the image (nearest neighbour),
``[S, S]`` uint8 0/255, encoded like the image (raw or PNG). Both features are optional (a record
without them parses as "no mask"), so the manifest version stays 2 and readers that ignore masks
(a classifier) read either kind of data dir.

Versions. Version 2 added the ``subtype`` feature and the ``subtype_counts`` and
``subtype_class_weights`` manifest keys. A version-1 data dir still reads everywhere: its records
parse with ``subtype`` -1 (unknown) for every image, NORMAL ones included (a version-1 record does
not say, and one rule for every missing feature beats a guess per label); it has no subtype
counts or weights, so only a subtype-weighted stream (``class_weights="balanced_subtype"``)
refuses it, naming the re-conversion that fixes it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from pneumo_tf import SUBTYPE_NAMES
from pneumo_tf.core import atomic_files

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
ENCODINGS = ("raw", "png")
COMPRESSIONS = ("none", "gzip")
SPLITS = ("train", "val", "test")

# Feature name -> (kind, shape). kind: bytes | int64. Shape () is a scalar, (4,) a vector.
FEATURES: dict[str, tuple[str, tuple[int, ...]]] = {
    "image": ("bytes", ()),          # raw uint8 [S, S] bytes or PNG
    "label": ("int64", ()),          # 1 = PNEUMONIA, 0 = NORMAL
    "subtype": ("int64", ()),        # 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (version 2)
    "patient_id": ("bytes", ()),
    "path": ("bytes", ()),           # source path relative to --src (or an npz index)
    "height": ("int64", ()),         # stored image height (= image_size)
    "width": ("int64", ()),          # stored image width (= image_size)
    "orig_height": ("int64", ()),    # decoded source height, pixels
    "orig_width": ("int64", ()),     # decoded source width, pixels
    "crop_box": ("int64", (4,)),     # top, bottom, left, right in source pixels
    "crop_method": ("bytes", ()),    # fixed | none | adaptive[_fallback] | lungs[_fallback]
    "lung_mask": ("bytes", ()),      # converted with --masks: [S, S] uint8 0/255, as "image"
    "has_lung_mask": ("int64", ()),  # converted with --masks: 1 = lung_mask present, 0 = none
}

UNKNOWN_SUBTYPE = -1
# Keys of a split's ``subtype_counts`` in the manifest: subtypes 0, 1, 2, then -1.
SUBTYPE_COUNT_NAMES = (*SUBTYPE_NAMES, "UNKNOWN")
# Features a record may lack, and the value they parse as there: version-1 records have no
# subtype; records converted without --masks (or of a film without a mask) have no lung mask.
FEATURE_DEFAULTS = {"subtype": UNKNOWN_SUBTYPE, "lung_mask": b"", "has_lung_mask": 0}
# The stored lung_mask of a film without one (the --masks record of a film that has none).
NO_MASK = b""

_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord(?P<gz>\.gz)?$")


class DataDirError(ValueError):
    """A data directory is missing, incomplete or inconsistent; the message says how to fix it."""


def shard_name(split: str, index: int, num_shards: int, compression: str = "none") -> str:
    """``train-00003-of-00008.tfrecord`` (``.gz`` appended for gzip)."""
    suffix = ".tfrecord.gz" if compression == "gzip" else ".tfrecord"
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}"


def parse_shard_name(name: str) -> tuple[str, int, int, str] | None:
    """``(split, index, num_shards, compression)`` for a shard file name, else None."""
    m = _SHARD_RE.match(name)
    if not m:
        return None
    return m["split"], int(m["i"]), int(m["n"]), "gzip" if m["gz"] else "none"


def tf_compression_type(compression: str) -> str:
    """The ``compression_type`` string TensorFlow's readers and writers take."""
    return {"none": "", "gzip": "GZIP"}[compression]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    # Feature.bytes_list (field 1) -> BytesList.value (field 1, repeated bytes)
    return _length_delimited(1, _length_delimited(1, value))


def _int64_feature(values: Iterable[int]) -> bytes:
    # Feature.int64_list (field 3) -> Int64List.value (field 1, packed varints)
    packed = b"".join(_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values)
    return _length_delimited(3, _length_delimited(1, packed))


def serialize_example(image_bytes: bytes, label: int, subtype: int | None, patient_id: str,
                      path: str, size_hw: tuple[int, int], orig_hw: tuple[int, int],
                      crop_box: Iterable[int], crop_method: str,
                      lung_mask: bytes | None = None) -> bytes:
    """The serialized ``tf.train.Example`` of one stored image (see :data:`FEATURES`).

    Encoded here in pure Python, byte for byte what
    ``tf.train.Example.SerializeToString(deterministic=True)`` writes (map keys sorted), so the
    converter's worker processes build records without importing TensorFlow and the parent only
    writes bytes. ``tests/data/test_records.py`` checks the equality against TensorFlow.

    Args:
        image_bytes: the stored image (raw ``[S, S]`` uint8 bytes or PNG).
        label: 1 PNEUMONIA, 0 NORMAL.
        subtype: 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown; None leaves the feature out, which
            is a version-1 record (for tests that need a data dir of the old format).
        size_hw: the stored ``(height, width)``, pixels; orig_hw: the decoded source's.
        crop_box: top, bottom, left, right of the crop in source pixels.
        lung_mask: None (converted without ``--masks``: neither mask feature is written, the
            record is byte-identical to one of a converter without masks); :data:`NO_MASK`
            (a film without a mask: ``has_lung_mask`` 0 only); else the stored mask, encoded like
            the image (``has_lung_mask`` 1 and ``lung_mask``).
    """
    def utf8(v: bytes | str) -> bytes:
        return v.encode("utf-8") if isinstance(v, str) else v

    features = {
        "image": _bytes_feature(image_bytes), "label": _int64_feature([label]),
        "patient_id": _bytes_feature(utf8(patient_id)), "path": _bytes_feature(utf8(path)),
        "height": _int64_feature([size_hw[0]]), "width": _int64_feature([size_hw[1]]),
        "orig_height": _int64_feature([orig_hw[0]]), "orig_width": _int64_feature([orig_hw[1]]),
        "crop_box": _int64_feature(crop_box), "crop_method": _bytes_feature(utf8(crop_method)),
    }
    if subtype is not None:
        features["subtype"] = _int64_feature([subtype])
    if lung_mask is not None:
        features["has_lung_mask"] = _int64_feature([1 if lung_mask else 0])
        if lung_mask:
            features["lung_mask"] = _bytes_feature(lung_mask)
    # Features.feature is map<string, Feature>: each entry {key = 1, value = 2} is field 1.
    entries = b"".join(
        _length_delimited(1, _length_delimited(1, key.encode("utf-8")) + _length_delimited(2, f))
        for key, f in sorted(features.items()))
    return _length_delimited(1, entries)  # Example.features = 1


def subtype_fits_label(subtype: int, label: int) -> bool:
    """Whether a subtype agrees with the binary label.

    NORMAL images (label 0) have subtype 0, or -1 when the source says nothing about subtypes
    (MedMNIST); PNEUMONIA images (label 1) have 1, 2 or -1.
    """
    allowed = (0, UNKNOWN_SUBTYPE) if label == 0 else (1, 2, UNKNOWN_SUBTYPE)
    return subtype in allowed


def subtype_counts(subtypes: Iterable[int]) -> dict[str, int]:
    """``{"NORMAL": n, "BACTERIAL": n, "VIRAL": n, "UNKNOWN": n}`` of a list of subtypes."""
    values = list(subtypes)
    return {name: values.count(value)
            for name, value in zip(SUBTYPE_COUNT_NAMES, (0, 1, 2, UNKNOWN_SUBTYPE))}


def feature_spec() -> dict:
    """``tf.io.parse_example`` spec for :data:`FEATURES`; a feature of
    :data:`FEATURE_DEFAULTS` missing from a record (a version-1 record) parses as its default."""
    import tensorflow as tf

    dtypes = {"bytes": tf.string, "int64": tf.int64}
    return {k: tf.io.FixedLenFeature(shape, dtypes[kind], FEATURE_DEFAULTS.get(k))
            for k, (kind, shape) in FEATURES.items()}


class ShardWriter:
    """Writes one shard atomically: ``<name>.partial`` while open, renamed to ``<name>`` on close.

    Use as a context manager; on an exception the partial file is removed.
    """

    def __init__(self, path: str | os.PathLike, compression: str = "none"):
        import tensorflow as tf

        self.path = Path(path)
        self.tmp_path = atomic_files.partial_path(self.path)
        self.count = 0
        self._writer = tf.io.TFRecordWriter(
            str(self.tmp_path), options=tf.io.TFRecordOptions(tf_compression_type(compression)))

    def write(self, serialized: bytes) -> None:
        self._writer.write(serialized)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        atomic_files.commit(self.tmp_path, self.path)

    def abort(self) -> None:
        self._writer.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (call it after every shard is closed)."""
    atomic_files.write_json_atomic(Path(data_dir) / MANIFEST_NAME, manifest)


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


def looks_like_image_folder(folder: Path, max_entries: int = 2000) -> bool:
    """Whether ``folder`` holds image files or class/split folders (a converter *source*)."""
    names = {"normal", "pneumonia", "train", "val", "test"}
    for i, entry in enumerate(folder.rglob("*")):
        if i >= max_entries:
            break
        if entry.is_dir() and entry.name.lower() in names and entry.parent == folder:
            return True
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            return True
    return False


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and sanity-check ``data_dir/manifest.json``.

    Raises:
        DataDirError: the directory or manifest is missing or malformed, naming the fix.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} does not exist; create it with "
                           f"`tools/make_tfrecords --src=... --out={data_dir}`")
    if not path.is_file():
        if looks_like_image_folder(data_dir):
            raise DataDirError(
                f"{data_dir} holds radiographs, not a converter output (no {MANIFEST_NAME}). "
                f"Convert it first: `tools/make_tfrecords --src={data_dir} --out=<a new "
                f"folder>`, then pass that new folder as --data_dir")
        raise DataDirError(f"{path} is missing: {data_dir} is not a finished converter output "
                           f"(an interrupted conversion leaves no manifest). Re-run "
                           f"`tools/make_tfrecords --src=... --out={data_dir}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataDirError(f"{path} is not valid JSON ({e}); re-run the converter") from e
    for key in ("splits", "image_size", "encoding", "compression", "crop"):
        if key not in manifest:
            raise DataDirError(f"{path} has no {key!r} entry; it was not written by "
                               f"pneumo_tf's converter (re-run tools/make_tfrecords)")
    return manifest


def split_shards(data_dir: str | os.PathLike, manifest: dict, split: str) -> list[Path]:
    """The shard files of ``split`` listed by the manifest, checked to exist.

    Raises:
        DataDirError: unknown or empty split, or a listed shard is missing.
    """
    data_dir = Path(data_dir)
    splits = manifest["splits"]
    if split not in splits:
        raise DataDirError(f"split {split!r} is not in {data_dir / MANIFEST_NAME} "
                           f"(it has: {', '.join(sorted(splits)) or 'none'})")
    info = splits[split]
    if int(info.get("count", 0)) == 0:
        raise DataDirError(f"split {split!r} of {data_dir} is empty (0 images); "
                           f"check the converter's summary and rejects.jsonl")
    paths = [data_dir / name for name in info["shards"]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataDirError(f"{data_dir}: shard(s) listed in the manifest are missing: "
                           f"{', '.join(missing[:5])}; re-run the converter")
    return paths


def tf_error_text(error: BaseException) -> str:
    """The human part of a TensorFlow op error: its first line without ``{{function_node ...}}``
    decorations or the trailing ``[Op:...]``."""
    text = (getattr(error, "message", None) or str(error)).strip()
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text.splitlines()[0] if text else "")
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip()


# Manifest keys that decide what a model sees; a run refuses data that differs in any of them.
COMPAT_KEYS = ("image_size", "crop", "encoding", "channels")


def manifest_mismatches(run_manifest: dict, data_manifest: dict) -> list[str]:
    """Human-readable differences in :data:`COMPAT_KEYS` between two manifests (empty if none),
    and for ``--crop=lungs`` data in the lung model that cropped them."""
    out = []
    for key in COMPAT_KEYS:
        a, b = run_manifest.get(key), data_manifest.get(key)
        if a != b:
            out.append(f"{key}: run has {a!r}, data dir has {b!r}")
    if run_manifest.get("crop") == "lungs" == data_manifest.get("crop"):
        a, b = ((m.get("lung_model") or {}).get("sha256") for m in (run_manifest, data_manifest))
        if a != b:  # another lung model crops other boxes
            out.append(f"lung_model: run's crop used {a!r}, data dir's {b!r} (sha256 of model.keras)")
    return out
