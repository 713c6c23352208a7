"""Train/val/test assignment by patient, duplicate detection and patient-overlap reports.

The official test split is kept as it is; validation is carved out of train **by
patient**, stratified by class (or by subtype, :func:`strata`) and seeded, so the images of one
patient never sit in two splits (also a patient with images of both classes). Byte-identical and pixel-identical images are found
and reported; the carve keeps every duplicate group in one split (:func:`merge_linked_groups`), and
the converter can drop duplicates (``--dedupe``), never from the official test split.

Everything here is pure Python on per-image lists (keys, labels, patient ids, hashes): no image
data, no TensorFlow, so it is cheap to test on made-up lists.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

SPLIT_BY = ("patient", "image")
# What the val carve stratifies on (--stratify): the binary class or the subtype.
STRATIFY = ("label", "subtype")
# The stratum of the images of unknown subtype with --stratify=subtype.
UNKNOWN_SUBTYPE_STRATUM = 3


class SplitError(ValueError):
    """Bad split settings; the message names the flag and the fix."""


def strata(labels: Sequence[int], subtypes: Sequence[int], stratify: str) -> list[int]:
    """The stratum of each image for the val carve (:func:`carve_validation`).

    Args:
        labels: class per image (0 NORMAL, 1 PNEUMONIA).
        subtypes: subtype per image (0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown).
        stratify: ``label`` -> the class; ``subtype`` -> the subtype, unknown as stratum
            :data:`UNKNOWN_SUBTYPE_STRATUM` (its own: the unknown images are carved in proportion
            too, not mixed into a known subtype's count).
    """
    if stratify not in STRATIFY:
        raise SplitError(f"--stratify={stratify!r} is not one of {STRATIFY}")
    if len(labels) != len(subtypes):
        raise ValueError(f"{len(labels)} labels for {len(subtypes)} subtypes")
    if stratify == "label":
        return [int(y) for y in labels]
    return [int(s) if s >= 0 else UNKNOWN_SUBTYPE_STRATUM for s in subtypes]


def carve_validation(groups: Sequence[str], labels: Sequence[int], val_fraction: float,
                     seed: int) -> set[str]:
    """Choose the groups (patients) that form the validation split, stratified by class.

    A seeded greedy search: groups are visited in a seeded random order and a group joins
    validation when that brings the per-class validation counts closer to ``val_fraction`` of
    each class's total (distance measured relative to each class's target, so the minority class
    counts as much as the majority). A group with images of both classes moves as a whole. The
    order is NOT sorted by group size: visiting big groups first fits the target a little more
    tightly but fills validation with many-image patients (measured on the Kermany train split:
    12 % of patients for 20 % of images), so validation would no longer look like the data.
    With many small groups the result is within a few images of the target for every class.

    Args:
        groups: group id (patient id) of each image.
        labels: class (stratum) of each image (0/1, or :func:`strata`; any small non-negative
            ints work). Each image counts in its own stratum; a group moves whole.
        val_fraction: wanted fraction of every class in validation, in [0, 1).
        seed: seed of the visiting order; same inputs and seed -> same result.

    Returns:
        The set of group ids assigned to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"--val_fraction={val_fraction} must be in [0, 1)")
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group ids for {len(labels)} labels")
    if val_fraction == 0.0 or not groups:
        return set()
    num_classes = max(int(v) for v in labels) + 1
    counts: dict[str, np.ndarray] = {}
    for g, y in zip(groups, labels):
        counts.setdefault(g, np.zeros(num_classes, np.int64))[int(y)] += 1
    totals = np.sum(list(counts.values()), axis=0)
    target = val_fraction * totals.astype(np.float64)
    weight = 1.0 / np.maximum(target, 1.0)

    names = sorted(counts)
    visit = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]

    val = np.zeros(num_classes, np.float64)
    chosen: set[str] = set()
    for g in visit:
        before = float(np.sum(weight * np.abs(val - target)))
        after = float(np.sum(weight * np.abs(val + counts[g] - target)))
        if after < before:
            val += counts[g]
            chosen.add(g)
    return chosen


def merge_linked_groups(groups: Sequence[str], links: Iterable[Sequence[int]]) -> list[str]:
    """Merge the groups of linked images (union-find), so linked images share one group.

    Used to keep duplicates together: two identical images filed under different patient ids
    must land in the same split, or the model is validated on an image it trained on.

    Args:
        groups: group id (patient id, or key for ``split_by="image"``) of each image.
        links: index lists of images that must share a group (e.g. duplicate groups);
            out-of-range indices are not allowed.

    Returns:
        The merged group id of each image: the smallest original group id of its merged set,
        so images without links keep their own group id.
    """
    parent: dict[str, str] = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]  # path halving
            g = parent[g]
        return g

    for link in links:
        roots = sorted({root(groups[i]) for i in link})
        for r in roots[1:]:
            parent[r] = roots[0]  # the smallest id represents the merged set
    return [root(g) for g in groups]


def assign_splits(official: Sequence[str | None], labels: Sequence[int],
                  patients: Sequence[str], keys: Sequence[str], *, val_fraction: float,
                  seed: int, split_by: str = "patient", keep_official_val: bool = False,
                  linked_keys: Iterable[Sequence[str]] = ()) -> list[str]:
    """The split (train/val/test) of every image.

    Args:
        official: the source's split per image: "train", "val", "test" or None (= train pool).
        labels: the stratum of each image for the carve: its class, or what :func:`strata`
            gives for ``--stratify``.
        patients: patient id per image.
        keys: unique key per image (used as the group when ``split_by="image"``).
        val_fraction: fraction of the train pool carved into validation (per stratum).
        seed: seed of the carve.
        split_by: "patient" (group by patient id) or "image" (every image its own group;
            patients may then straddle train and val, which the overlap report shows).
        keep_official_val: keep the source's own val split and carve nothing. When False, the
            official val images join the train pool before the carve (Kaggle's 16-image val is
            useless for model selection).
        linked_keys: groups of keys that must share a split (duplicate groups, e.g.
            ``DuplicateReport.byte_identical + DuplicateReport.pixel_identical``): their groups
            are merged before the carve, so identical images filed under different patients
            never straddle train and val. Keys not in ``keys`` are ignored; official test
            members stay in test regardless.

    Returns:
        A split name per image. Official test images always stay in test.
    """
    if split_by not in SPLIT_BY:
        raise SplitError(f"--split_by={split_by!r} is not one of {SPLIT_BY}")
    if not (len(official) == len(labels) == len(patients) == len(keys)):
        raise ValueError("official, labels, patients and keys must have the same length")
    out: list[str] = []
    pool: list[int] = []
    for i, s in enumerate(official):
        if s == "test":
            out.append("test")
        elif s == "val" and keep_official_val:
            out.append("val")
        elif s in (None, "train", "val"):
            out.append("train")
            pool.append(i)
        else:
            raise SplitError(f"unknown split {s!r} for {keys[i]}; expected train, val or test")
    if keep_official_val:
        return out
    group_of = keys if split_by == "image" else patients
    pool_index = {keys[i]: j for j, i in enumerate(pool)}
    links = [[pool_index[k] for k in group if k in pool_index] for group in linked_keys]
    pool_groups = merge_linked_groups([group_of[i] for i in pool], links)
    val_groups = carve_validation(pool_groups, [labels[i] for i in pool], val_fraction, seed)
    for i, g in zip(pool, pool_groups):
        if g in val_groups:
            out[i] = "val"
    return out


@dataclasses.dataclass
class DuplicateReport:
    """Groups of identical images, each group a sorted list of keys.

    Attributes:
        byte_identical: groups whose files have the same bytes (sha256).
        pixel_identical: groups with the same pixels but not all the same bytes (e.g. the same
            film saved twice with different metadata or container). The converter compares the
            stored (cropped, resized) pixels, i.e. what a model would see twice.
        drop: keys that ``--dedupe`` drops from each pixel-identical group (byte duplicates
            included): see :func:`duplicates_to_drop`.
    """

    byte_identical: list[list[str]]
    pixel_identical: list[list[str]]
    drop: list[str]

    @property
    def num_groups(self) -> int:
        return len(self.byte_identical) + len(self.pixel_identical)


def _groups(keys: Sequence[str], hashes: Sequence[str | None]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for k, h in zip(keys, hashes):
        if h is not None:
            by_hash[h].append(k)
    return sorted(sorted(ks) for ks in by_hash.values() if len(ks) > 1)


# Which copy of a duplicate group --dedupe keeps: official test first (the test split is kept
# as it is), then official val, then the train pool (train or no split).
_KEEP_RANK = {"test": 0, "val": 1}
_POOL_RANK = 2


def duplicates_to_drop(group: Sequence[str], official_of: dict[str, str | None]) -> list[str]:
    """Keys of one duplicate group that ``--dedupe`` drops.

    Keeps the official test members (all of them: the official test split is never changed) and,
    when there is none, the first official val member, else the first train-pool member by key.
    Drops every other train/val/pool member, so a test image's copy never stays in train/val.

    Args:
        group: keys of identical images.
        official_of: the source's split per key ("train", "val", "test" or None).
    """
    ranked = sorted(group, key=lambda k: (_KEEP_RANK.get(official_of.get(k), _POOL_RANK), k))
    return sorted(k for k in ranked[1:] if official_of.get(k) != "test")


def find_duplicates(keys: Sequence[str], byte_hashes: Sequence[str | None],
                    pixel_hashes: Sequence[str | None],
                    official: Sequence[str | None] | None = None) -> DuplicateReport:
    """Byte-identical and pixel-identical groups among images.

    Args:
        keys: unique key per image (its path relative to the source).
        byte_hashes: sha256 hex of each file's bytes (None when unknown).
        pixel_hashes: hash of each image's pixels (None when unknown).
        official: the source's split per image ("train", "val", "test" or None); decides which
            copy ``drop`` keeps (:func:`duplicates_to_drop`). None: all in the train pool.
    """
    byte_groups = _groups(keys, byte_hashes)
    pixel_groups = _groups(keys, pixel_hashes)
    byte_of = dict(zip(keys, byte_hashes))
    pixel_only = [g for g in pixel_groups if len({byte_of[k] for k in g}) > 1]
    # Pixel groups contain every byte group whose files decode at all, so dropping along pixel
    # groups covers both; a byte group that failed to decode is not in the output anyway.
    official_of = dict(zip(keys, official)) if official is not None else {}
    drop = sorted(k for g in pixel_groups for k in duplicates_to_drop(g, official_of))
    return DuplicateReport(byte_identical=byte_groups, pixel_identical=pixel_only, drop=drop)


def patient_overlap(splits: Sequence[str], patients: Sequence[str]) -> dict[str, list[str]]:
    """Patient ids found in more than one split, per pair of splits.

    Returns:
        ``{"train/test": [ids...], ...}`` for every pair with at least one shared patient, ids
        sorted; pairs in a fixed order (train/val, train/test, val/test).
    """
    members: dict[str, set[str]] = defaultdict(set)
    for s, p in zip(splits, patients):
        members[s].add(p)
    names = [s for s in ("train", "val", "test") if s in members]
    names += sorted(set(members) - set(names))
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = members[a] & members[b]
            if shared:
                out[f"{a}/{b}"] = sorted(shared)
    return out
