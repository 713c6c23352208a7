"""Find the radiographs of a source (``--src``) and their labels, patients and official splits.

Three kinds of source, told apart by what ``--src`` is:

- ``folder``: the Kaggle/Mendeley layout ``SRC/{train,val,test}/{NORMAL,PNEUMONIA}/*`` (or
  ``SRC/{NORMAL,PNEUMONIA}/*`` without official splits). Folder names match case-insensitively
  (``val``, ``valid`` and ``validation`` all mean ``val``). Files may sit in sub-folders of a
  class folder. Hidden files and folders (``.DS_Store``), ``Thumbs.db`` and ``desktop.ini`` are
  ignored, and so are top-level folders that are neither splits nor classes (``masks/``,
  ``__MACOSX/``). Files under an unknown folder inside a split are rejected, one reject each.
- ``csv``: a manifest with a header row ``path,label[,patient_id][,split][,subtype]`` (any
  column order, more columns allowed). ``label`` is 0/1 or NORMAL/PNEUMONIA; relative paths are
  resolved against the CSV's folder; each bad row becomes a reject naming its line number.
- ``medmnist``: a PneumoniaMNIST ``.npz`` (``{train,val,test}_images`` ``[N, H, W] uint8`` and
  ``{split}_labels`` ``[N, 1]``). Its splits are kept; each image is its own patient. With
  ``download=True`` a known file name is fetched from the MedMNIST v2 Zenodo record into a cache
  and its MD5 checked (:func:`fetch_medmnist`).

Subtypes (0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown; :attr:`SourceItem.subtype`): a NORMAL
image is 0 whatever its name; a PNEUMONIA image's subtype comes from its file name
(:func:`subtype_from_name`: ``person12_bacteria_34.jpeg`` is BACTERIAL, ``person12_virus_35.jpeg``
VIRAL, a name saying neither is unknown). A CSV's ``subtype`` column, when a row fills it,
overrides the name: ``normal``, ``bacterial`` / ``bacteria``, ``viral`` / ``virus``, ``unknown``
or 0 / 1 / 2 / -1, any case (``unknown`` on a NORMAL row is NORMAL); a subtype that contradicts
the label (a NORMAL row marked viral) rejects the row. MedMNIST images are all unknown (-1), the
NORMAL ones too: the data set says nothing about subtypes.

DICOM files may appear in folder and CSV sources; the decoder recognises them. Listing reads no
pixels, so it is fast even for 100k files. This module imports no TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import posixpath
import re
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from pneumo_tf import CLASS_NAMES
from pneumo_tf.core import atomic_files
from pneumo_tf.data import records

log = logging.getLogger(__name__)

SOURCE_KINDS = ("folder", "csv", "medmnist")
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test"}
_LABELS = {"0": 0, "1": 1, CLASS_NAMES[0].lower(): 0, CLASS_NAMES[1].lower(): 1}
_IGNORED_FILE_NAMES = frozenset({"thumbs.db", "desktop.ini"})
# A CSV's subtype column: these words, any case, or the numbers -1, 0, 1, 2.
_SUBTYPES = {"normal": 0, "bacterial": 1, "bacteria": 1, "viral": 2, "virus": 2, "unknown": -1}
# Words of a PNEUMONIA file name that say its subtype (Kermany: person12_bacteria_34.jpeg).
_SUBTYPE_WORDS = {"bacteria": 1, "bacterial": 1, "virus": 2, "viral": 2}
_NAME_WORD_RE = re.compile(r"[^a-z0-9]+")

# MedMNIST v2 on Zenodo (record 10519652). MD5s copied from the official medmnist package,
# medmnist/info.py, INFO["pneumoniamnist"]["MD5" | "MD5_64" | "MD5_128" | "MD5_224"] (v3.0).
# To add a file: put its name and MD5 here; the URL follows the template.
MEDMNIST_URL_TEMPLATE = "https://zenodo.org/records/10519652/files/{name}?download=1"
MEDMNIST_MD5 = {
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",      # 28 x 28
    "pneumoniamnist_64.npz": "8f4eceb4ccffa70c672198ea285246c6",
    "pneumoniamnist_128.npz": "05b46931834c231683c68f40c47b2971",
    "pneumoniamnist_224.npz": "d6a3c71de1b945ea11211b03746c1fe1",
}
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "pneumo_tf")
_DOWNLOAD_CHUNK_BYTES = 1 << 20
_DOWNLOAD_TIMEOUT_SECONDS = 60

_PERSON_RE = re.compile(r"^(person\d+)_", re.IGNORECASE)      # person1234_bacteria_4567
_IM_RE = re.compile(r"^((?:[A-Za-z]+\d*-)?IM-\d+)-\d+$")       # [NORMAL2-]IM-0123-0001


class SourceError(ValueError):
    """``--src`` cannot be listed at all; the message names the file or folder and the fix."""


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    Attributes:
        key: path relative to ``--src`` (folder), the path as written in the CSV (csv), or
            ``"<npz file name>/<split>/<index>"`` (medmnist). Unique within a listing.
        label: 1 PNEUMONIA, 0 NORMAL.
        patient_id: from the file name (:func:`patient_id_from_name`) or the CSV column;
            MedMNIST: the key (one patient per image).
        split: official split ``train`` | ``val`` | ``test`` when the source says, else None.
        path: absolute file path to read; None for in-memory (MedMNIST) items.
        npz: ``(npz path, split, index)`` for MedMNIST items: the image is
            ``np.load(npz path)[f"{split}_images"][index]``.
        subtype: 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (see the module docstring).
    """

    key: str
    label: int | None
    patient_id: str
    split: str | None
    path: str | None
    npz: tuple[str, str, int] | None = None
    subtype: int = records.UNKNOWN_SUBTYPE


@dataclasses.dataclass
class SourceListing:
    """Everything :func:`discover` found.

    Attributes:
        kind: ``folder`` | ``csv`` | ``medmnist``.
        root: absolute ``--src`` folder, CSV file or npz file.
        items: sorted by ``key``.
        rejects: ``{"path": key, "reason": ...}`` found while listing, sorted by path.
        empty_folders: class/split folders (relative to root) holding no files.
        default_crop: ``fixed`` for folder/csv; ``none`` for MedMNIST (already centre-cropped).
    """

    kind: str
    root: str
    items: list[SourceItem]
    rejects: list[dict]
    empty_folders: list[str]
    default_crop: str


def patient_id_from_name(file_name: str) -> str:
    """The patient id encoded in a Kermany-dataset file name, else the file's stem.

    ``person1234_bacteria_4567.jpeg`` -> ``person1234``; ``IM-0123-0001.jpeg`` -> ``IM-0123``;
    ``NORMAL2-IM-0456-0001.jpeg`` -> ``NORMAL2-IM-0456``; ``scan_7.png`` -> ``scan_7``.
    """
    base = posixpath.basename(file_name.replace("\\", "/"))
    stem = os.path.splitext(base)[0]
    m = _PERSON_RE.match(stem)
    if m:
        return m.group(1)
    m = _IM_RE.match(stem)
    if m:
        return m.group(1)
    return stem


def subtype_from_name(file_name: str, label: int) -> int:
    """The subtype of an image from its label and file name.

    NORMAL (``label`` 0) is subtype 0 whatever the name. A PNEUMONIA file name is split into words
    at anything but letters and digits, case ignored: ``bacteria`` or ``bacterial`` -> 1,
    ``virus`` or ``viral`` -> 2; none of them, or words of both kinds, -> -1 (unknown). Only the
    file's own name counts, not its folders.

    ``person1234_bacteria_4567.jpeg`` -> 1; ``person7_virus_13.jpeg`` -> 2; ``scan_7.png`` -> -1.
    """
    if label == 0:
        return 0
    stem = os.path.splitext(posixpath.basename(file_name.replace("\\", "/")))[0]
    found = {_SUBTYPE_WORDS[w] for w in _NAME_WORD_RE.split(stem.lower()) if w in _SUBTYPE_WORDS}
    return found.pop() if len(found) == 1 else records.UNKNOWN_SUBTYPE


def discover(src: str, *, download: bool = False, cache_dir: str | None = None) -> SourceListing:
    """List the images of ``src`` (a folder, a CSV manifest or a MedMNIST npz).

    Args:
        src: the ``--src`` value.
        download: fetch a MedMNIST npz named by ``src`` (e.g. ``pneumoniamnist_128.npz``) when it
            is not a local file (``--download``).
        cache_dir: download cache; default ``~/.cache/pneumo_tf``.

    Raises:
        SourceError: ``src`` is missing, of an unknown kind, or has no usable layout.
    """
    if not src:
        raise SourceError("--src is empty; pass a dataset folder, a CSV manifest or an .npz file")
    path = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(path):
        if download:
            raise SourceError(f"--download fetches MedMNIST files only; --src={src} is a folder: "
                              "drop --download")
        return list_folder(path)
    if path.lower().endswith(".npz"):
        if not os.path.isfile(path):
            if not download:
                raise SourceError(
                    f"--src={src}: no such file; pass --download to fetch it from Zenodo "
                    f"(known names: {', '.join(MEDMNIST_MD5)})")
            path = fetch_medmnist(os.path.basename(path), cache_dir)
        return list_medmnist(path)
    if not os.path.exists(path):
        raise SourceError(f"--src={src}: no such file or folder")
    if download:
        raise SourceError(f"--download fetches MedMNIST .npz files only, not --src={src}")
    if path.lower().endswith(".csv"):
        return list_csv(path)
    raise SourceError(f"--src={src} is neither a folder, a .csv manifest nor a MedMNIST .npz file")


# ---------------------------------------------------------------------------------------------
# Folder layout


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_FILE_NAMES


def _walk(folder: str):
    """``os.walk`` that follows symlinked folders (a class folder may be a link to elsewhere)
    and skips hidden entries; a link back into a folder already seen is not entered twice."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        yield dirpath, [f for f in filenames if not _is_ignored(f)]


def _visible_files(folder: str) -> list[str]:
    """Absolute paths of the non-hidden files under ``folder`` (recursively), sorted."""
    return sorted(os.path.join(dirpath, f) for dirpath, files in _walk(folder) for f in files)


def _has_visible_file(folder: str) -> bool:
    return any(files for _, files in _walk(folder))


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_ignored(e.name))


def _class_label(folder_name: str) -> int | None:
    upper = folder_name.upper()
    return CLASS_NAMES.index(upper) if upper in CLASS_NAMES else None


def list_folder(root: str) -> SourceListing:
    """List a Kaggle/Mendeley-layout folder (see the module docstring)."""
    root = os.path.abspath(root)
    items: list[SourceItem] = []
    rejects: list[dict] = []
    empty: list[str] = []

    def rel(p: str) -> str:
        return Path(os.path.relpath(p, root)).as_posix()

    def add_class_folder(folder: str, label: int, split: str | None) -> None:
        files = _visible_files(folder)
        if not files:
            empty.append(rel(folder))
        for f in files:
            key = rel(f)
            items.append(SourceItem(key=key, label=label, patient_id=patient_id_from_name(f),
                                    split=split, path=f, subtype=subtype_from_name(f, label)))

    top = _subfolders(root)
    split_dirs = [d for d in top if d.lower() in _SPLIT_ALIASES]
    class_dirs = [d for d in top if _class_label(d) is not None]
    if not split_dirs and not class_dirs:
        hint = ""
        nested = [d for d in top if any(s.lower() in _SPLIT_ALIASES or _class_label(s) is not None
                                        for s in _subfolders(os.path.join(root, d)))]
        if nested:
            hint = f"; did you mean --src={os.path.join(root, nested[0])}?"
        raise SourceError(
            f"--src={root} has no train/val/test or NORMAL/PNEUMONIA folders (found: "
            f"{', '.join(top) or 'no folders'}); expected SRC/{{train,val,test}}/"
            f"{{NORMAL,PNEUMONIA}}/* or SRC/{{NORMAL,PNEUMONIA}}/*{hint}")
    seen_splits: dict[str, str] = {}
    for d in split_dirs:
        split = _SPLIT_ALIASES[d.lower()]
        if split in seen_splits:
            raise SourceError(f"--src={root} has two folders for split {split!r}: "
                              f"{seen_splits[split]!r} and {d!r}; merge or remove one")
        seen_splits[split] = d
        split_dir = os.path.join(root, d)
        if not _has_visible_file(split_dir):
            empty.append(rel(split_dir))
            continue
        for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if _is_ignored(entry.name):
                continue
            if entry.is_dir():
                label = _class_label(entry.name)
                if label is None:
                    why = f"unknown class folder {entry.name!r}"
                    rejects.extend({"path": rel(f), "reason": why}
                                   for f in _visible_files(entry.path))
                else:
                    add_class_folder(entry.path, label, split)
            else:
                rejects.append({"path": rel(entry.path),
                                "reason": "not inside a NORMAL or PNEUMONIA class folder"})
    for d in class_dirs:
        add_class_folder(os.path.join(root, d), _class_label(d), None)
    return _listing("folder", root, items, rejects, empty, "fixed")


# ---------------------------------------------------------------------------------------------
# CSV manifest


def _parse_code(text: str, words: dict[str, int]) -> int | None:
    """A CSV cell holding one of ``words``' values: a word (any case) or the number itself,
    also as spreadsheets write it (1.0). None for anything else.

    ``_parse_code("Pneumonia", _LABELS)`` -> 1; ``_parse_code("-1.0", _SUBTYPES)`` -> -1.
    """
    text = text.strip().lower()
    if text in words:
        return words[text]
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value in set(words.values()) else None


def _csv_subtype(text: str, label: int, written: str) -> tuple[int, str | None]:
    """``(subtype, None)`` of a CSV row, or ``(-1, why the row is rejected)``.

    An empty cell (or no ``subtype`` column) leaves the subtype to the file name.
    """
    if not text:
        return subtype_from_name(written, label), None
    subtype = _parse_code(text, _SUBTYPES)
    if subtype is None:
        return records.UNKNOWN_SUBTYPE, (f"subtype {text!r} is not normal, bacterial, viral, "
                                         f"unknown or 0, 1, 2, -1")
    if label == 0 and subtype == records.UNKNOWN_SUBTYPE:
        return 0, None  # the label says NORMAL, so the subtype is known
    if not records.subtype_fits_label(subtype, label):
        expected = "normal" if label == 0 else "bacterial, viral or unknown"
        return records.UNKNOWN_SUBTYPE, (
            f"subtype {text!r} contradicts label {CLASS_NAMES[label]} (a {CLASS_NAMES[label]} "
            f"image is {expected}); fix the label or the subtype")
    return subtype, None


def _csv_row(cell, line: int, csv_path: str, first_line_of: dict[str, int]) -> SourceItem | dict:
    """One non-blank CSV row: its :class:`SourceItem`, or its reject ``{"path", "reason"}``.

    Args:
        cell: column name -> the row's stripped cell ("" when the row or header lacks it).
        line: the row's line number in the file.
        first_line_of: absolute file path -> line that listed it first (updated here).
    """
    written = cell("path")
    where = f"line {line}"
    if not written:
        return {"path": f"{os.path.basename(csv_path)}:{line}", "reason": f"{where}: empty path"}
    label = _parse_code(cell("label"), _LABELS)
    split_text = cell("split")
    split = _SPLIT_ALIASES.get(split_text.lower()) if split_text else None
    file_path = os.path.normpath(os.path.join(os.path.dirname(csv_path),
                                              os.path.expanduser(written)))
    subtype, reason = records.UNKNOWN_SUBTYPE, None
    if label is None:
        reason = f"label {cell('label')!r} is not 0, 1, NORMAL or PNEUMONIA"
    else:
        subtype, reason = _csv_subtype(cell("subtype"), label, written)
    if reason is None:
        if split_text and split is None:
            reason = f"split {split_text!r} is not train, val or test"
        elif file_path in first_line_of:
            reason = f"same file as line {first_line_of[file_path]}"
        elif not os.path.isfile(file_path):
            reason = f"file not found ({file_path})"
    if reason:
        return {"path": written, "reason": f"{where}: {reason}"}
    first_line_of[file_path] = line
    return SourceItem(key=written, label=label,
                      patient_id=cell("patient_id") or patient_id_from_name(written),
                      split=split, path=file_path, subtype=subtype)


def list_csv(csv_path: str) -> SourceListing:
    """List a CSV manifest with header ``path,label[,patient_id][,split][,subtype]``."""
    csv_path = os.path.abspath(csv_path)
    items: list[SourceItem] = []
    rejects: list[dict] = []
    first_line_of: dict[str, int] = {}
    try:
        f = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise SourceError(f"--src={csv_path}: cannot read the CSV ({e.strerror or e})") from e
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"--src={csv_path}: the CSV is empty; expected a header row "
                              "'path,label[,patient_id][,split][,subtype]'") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise SourceError(f"--src={csv_path}: not a readable CSV ({e})") from e
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise SourceError(
                f"--src={csv_path}: the header row lacks column(s) {', '.join(missing)} (found: "
                f"{', '.join(h.strip() for h in header)}); expected "
                "'path,label[,patient_id][,split][,subtype]'")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as e:
                raise SourceError(f"--src={csv_path}: line {reader.line_num}: {e}") from e
            if not any(cell.strip() for cell in row):
                continue  # blank line

            def cell(name: str, row=row) -> str:
                i = columns.get(name)
                return row[i].strip() if i is not None and i < len(row) else ""

            found = _csv_row(cell, reader.line_num, csv_path, first_line_of)
            (items if isinstance(found, SourceItem) else rejects).append(found)
    return _listing("csv", csv_path, items, rejects, [], "fixed")


# ---------------------------------------------------------------------------------------------
# MedMNIST


def _npy_header(npz: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` inside an npz without reading its data."""
    with npz.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


def list_medmnist(npz_path: str) -> SourceListing:
    """List a PneumoniaMNIST npz: its own splits, one patient per image."""
    npz_path = os.path.abspath(npz_path)
    name = os.path.basename(npz_path)
    expected = "train_images, train_labels, val_images, val_labels, test_images, test_labels"
    try:
        with zipfile.ZipFile(npz_path) as zf:
            keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            shapes = {k: _npy_header(zf, k) for k in keys if k.endswith("_images")}
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise SourceError(f"--src={npz_path}: not a readable .npz file ({e})") from e
    splits = [s for s in SPLIT_NAMES if f"{s}_images" in keys and f"{s}_labels" in keys]
    if not splits:
        raise SourceError(f"--src={npz_path}: no MedMNIST arrays (found keys: "
                          f"{', '.join(keys) or 'none'}; expected {expected})")
    items: list[SourceItem] = []
    rejects: list[dict] = []
    with np.load(npz_path, allow_pickle=False) as npz:
        for split in splits:
            shape, dtype = shapes[f"{split}_images"]
            gray = len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)
            if not gray or dtype != np.uint8:
                raise SourceError(f"--src={npz_path}: {split}_images is {dtype} {list(shape)}; "
                                  "expected uint8 [N, H, W] grayscale images")
            labels = np.asarray(npz[f"{split}_labels"]).reshape(-1)
            if len(labels) != shape[0]:
                raise SourceError(f"--src={npz_path}: {split}_labels has {len(labels)} entries "
                                  f"but {split}_images has {shape[0]} images")
            for i, value in enumerate(labels.tolist()):
                key = f"{name}/{split}/{i}"
                if value not in (0, 1):
                    rejects.append({"path": key, "reason": f"label {value!r} is not 0 or 1"})
                    continue
                items.append(SourceItem(key=key, label=int(value), patient_id=key, split=split,
                                        path=None, npz=(npz_path, split, i)))
    return _listing("medmnist", npz_path, items, rejects, [], "none")


def file_md5(path: str) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_medmnist(name: str, cache_dir: str | None = None) -> str:
    """Path of MedMNIST file ``name`` in the cache, downloading it from Zenodo when needed.

    A cached file is reused when its MD5 matches :data:`MEDMNIST_MD5`. A download is streamed
    to a temporary file in the cache folder, checked, and only then renamed into place, so the
    cache never holds a partial or corrupt file under the real name.

    Args:
        name: e.g. ``pneumoniamnist_128.npz`` (a key of :data:`MEDMNIST_MD5`).
        cache_dir: default ``~/.cache/pneumo_tf``.

    Raises:
        SourceError: unknown name, network failure or MD5 mismatch.
    """
    expected_md5 = MEDMNIST_MD5.get(name)
    if expected_md5 is None:
        raise SourceError(f"--download: unknown MedMNIST file {name!r}; known: "
                          f"{', '.join(MEDMNIST_MD5)}")
    cache = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    target = os.path.join(cache, name)
    if os.path.isfile(target):
        actual = file_md5(target)
        if actual == expected_md5:
            log.info("Using cached %s (MD5 ok)", target)
            return target
        log.warning("Cached %s has MD5 %s, expected %s: downloading it again",
                        target, actual, expected_md5)
    os.makedirs(cache, exist_ok=True)
    url = MEDMNIST_URL_TEMPLATE.format(name=name)
    log.info("Downloading %s to %s", url, target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_SECONDS) as response:
                    for chunk in iter(lambda: response.read(_DOWNLOAD_CHUNK_BYTES), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as e:  # URLError, HTTPError and socket timeouts are all OSErrors
                raise SourceError(f"--download: could not fetch {url} ({e}); check the network, "
                                  f"or download it yourself and pass --src=<path to {name}>") from e
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise SourceError(f"--download: {url} has MD5 {actual}, expected {expected_md5}; the "
                              "download is corrupt or the file changed upstream. Nothing was "
                              "written to the cache; retry, or fix MEDMNIST_MD5 in "
                              "pneumo_tf/data/sources.py if the record was updated")
        atomic_files.commit(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _listing(kind: str, root: str, items: list[SourceItem], rejects: list[dict],
             empty: list[str], default_crop: str) -> SourceListing:
    return SourceListing(kind=kind, root=root, items=sorted(items, key=lambda it: it.key),
                         rejects=sorted(rejects, key=lambda r: r["path"]),
                         empty_folders=sorted(empty), default_crop=default_crop)
