"""Synthetic chest-radiograph "phantoms" with ground truth, for the demo and the tests.

Each phantom is a procedurally drawn frontal chest film: dark background, soft-tissue body
outline with neck, two dark lung fields cut by domed hemidiaphragms and the heart, a bright
mediastinum and spine with vertebrae, posterior and anterior rib arcs, clavicles, faint lung
markings, film noise, and a random size, position and contrast. PNEUMONIA phantoms carry 1-3
patchy, soft-edged opacities inside a lung field (mostly inside the paper's fixed crop box, so a
model trained on fixed-crop images can see them); NORMAL phantoms carry none.

Optionally an image carries a *confounder*: a bright burned-in tag in a corner, always outside
the fixed crop box (:func:`pneumo_tf.preprocess.fixed_crop_box`), placed on PNEUMONIA images
with probability ``confounder_rate`` and on NORMAL images with ``confounder_normal_rate``
(default never). A model trained on uncropped images can cheat with it; cropping removes it,
which reproduces the paper's before/after-crop effect.

Output (Kaggle layout; masks live outside the split folders so a converter pointed at ``OUT``
does not take them for data)::

    OUT/train/NORMAL/IM-0007-0001.jpeg            # NORMAL: IM-{patient:04d}-{k:04d}
    OUT/train/PNEUMONIA/person3_virus_12.jpeg     # person{patient}_{bacteria|virus}_{image}
    OUT/test/...
    OUT/masks/train/NORMAL/IM-0007-0001_lung.png  # uint8 0/255, same size as the image
    OUT/masks/train/NORMAL/IM-0007-0001_lesion.png  # all zero for NORMAL
    OUT/phantoms.json                             # parameters, counts, one record per image

Usage::

    tools/make_phantoms --out=/tmp/phantoms --num_train=200 --num_test=50 \\
        --min_size=400 --max_size=600 --confounder_rate=0.5

Same flags and seed give byte-identical files. Every image draws from its own random stream
(seeded by ``(seed, image index)``), so changing one image's parameters never shifts the others.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from absl import app, flags

import pneumo_tf
from pneumo_tf import atomic_files, cli
from pneumo_tf.preprocess import CropBox, fixed_crop_box

log = logging.getLogger(__name__)

OUT = cli.out_flag()
SEED = cli.seed_flag()

CLASS_NAMES = pneumo_tf.CLASS_NAMES  # label 0, label 1
SPLIT_NAMES = ("train", "test")
PHANTOMS_JSON = "phantoms.json"
IN_PROGRESS = ".phantoms_in_progress"  # present while a set is being written
MASKS_DIR = "masks"
DEFAULT_MIN_SIZE = 400
DEFAULT_MAX_SIZE = 1200
SMALLEST_SIZE = 32  # below this the anatomy is a few pixels wide and means nothing
JPEG_QUALITY = 92
# Anatomy is rendered on a grid at most this many pixels on its long side, then upsampled.
RENDER_MAX_SIDE = 384
# Lesion mask threshold: a pixel belongs to the lesion where the added opacity is at least this
# fraction of the lesion's peak opacity (below it the opacity is hard to see on the film).
LESION_VISIBLE_FRACTION = 0.3
# The Kaggle set has about 2 bacterial per viral pneumonia.
BACTERIA_FRACTION = 0.65


class Phantom(NamedTuple):
    """One rendered phantom and its ground truth.

    Attributes:
        image: ``[H, W] uint8`` radiograph, lungs dark (MONOCHROME2).
        lung_mask: ``[H, W] bool``, both lung fields (heart and diaphragm excluded).
        lesion_mask: ``[H, W] bool``, where an opacity is visible; all False for NORMAL.
        marker_box: the confounder tag's box in pixels, or None when the image has none.
        num_lesions: number of opacities drawn (0 for NORMAL).
    """

    image: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    marker_box: CropBox | None
    num_lesions: int


# ---------------------------------------------------------------------------------------------
# Rendering. Anatomy is drawn as a float "density" map D (0 = air, ~0.5 soft tissue, brighter =
# more attenuating) on normalised chest coordinates: xn = (x - body centre) / body half-width,
# yn = (y - lung apex) / (diaphragm - apex). Soft edges come from clipped signed distances, so
# no blur of a full-size image is needed and a 1200 px phantom renders in a fraction of a second.


def _soft(signed: np.ndarray, width: float) -> np.ndarray:
    """0..1 ramp across an edge: 1 where ``signed >= width / 2`` (inside), 0 far outside."""
    return np.clip(0.5 + signed / width, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """``[H, W] float32`` low-frequency noise, roughly zero mean and unit spread.

    A ``cells`` x ``cells`` grid of normal samples upsampled with bicubic interpolation: blobs
    about ``1 / cells`` of the image wide.
    """
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[h, w] float32`` -> ``[height, width]``, bilinear (no-op when already that size)."""
    if field.shape == (height, width):
        return field
    return cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)


def _rows_for(yn_lo: float, yn_hi: float, y_top: float, chest_h: float, height: int) -> slice:
    """Image rows covering normalised heights ``yn_lo..yn_hi`` (clipped to the image)."""
    lo = int(np.floor(y_top + yn_lo * chest_h))
    hi = int(np.ceil(y_top + yn_hi * chest_h)) + 1
    return slice(min(max(lo, 0), height), min(max(hi, 0), height))


def _add_arc(density: np.ndarray, yn: np.ndarray, u: np.ndarray, rows: slice, curve,
             thickness: float, amplitude: float, u_lo: float, u_hi: float) -> None:
    """Add a bone arc (rib, clavicle) in place: a band of ``thickness`` around ``curve(u)``.

    Args:
        density: ``[H, W] float32`` density map, changed in place.
        yn: ``[H, 1]`` normalised row heights; u: ``[1, W]`` ``|xn|`` (both sides at once).
        rows: image rows the arc can touch (bounds the work).
        curve: ``u -> yn`` of the arc's centre line.
        thickness: half-thickness of the band in ``yn`` units.
        amplitude: density added on the centre line.
        u_lo, u_hi: the arc spans ``u_lo <= |xn| <= u_hi`` (soft ends).
    """
    if rows.start >= rows.stop:
        return
    y = yn[rows]
    dist = (y - curve(u)) / thickness
    # Rounded profile: bones look like tubes, brighter in the middle.
    band = np.sqrt(np.clip(1.0 - dist * dist, 0.0, 1.0))
    ends = _soft(u - u_lo, 0.04) * _soft(u_hi - u, 0.08)
    density[rows] += amplitude * band * ends


def _lung_fields(xn: np.ndarray, yn: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Soft lung fields and heart, ``[H, W] float32`` in 0..1 each.

    Each lung is an ellipse that narrows towards the apex, cut below by a domed hemidiaphragm
    (the patient's right, image left, sits higher) and medially by the heart.
    """
    heart_cx = rng.uniform(0.1, 0.2)
    heart_cy = rng.uniform(0.74, 0.82)
    heart_a = rng.uniform(0.42, 0.52)
    heart_b = rng.uniform(0.22, 0.27)
    heart = _soft(1.0 - ((xn - heart_cx) / heart_a) ** 2 - ((yn - heart_cy) / heart_b) ** 2, 0.6)
    lungs = np.zeros(np.broadcast_shapes(xn.shape, yn.shape), np.float32)
    # Narrower near the apex: the horizontal semi-axis grows with height down to mid-lung.
    taper = np.sqrt(0.55 + 0.45 * np.clip((yn + 0.05) / 0.5, 0.0, 1.0))
    for side in (-1.0, 1.0):
        cx = side * rng.uniform(0.47, 0.53)
        a = rng.uniform(0.34, 0.39) * taper
        b = rng.uniform(0.57, 0.63)
        cy = rng.uniform(0.53, 0.57)
        ellipse = _soft(1.0 - ((xn - cx) / a) ** 2 - ((yn - cy) / b) ** 2, 0.15)
        dome_top = 0.88 + (-0.03 if side < 0 else 0.0) + rng.uniform(-0.02, 0.02)
        dome = dome_top + 0.12 * np.clip(((xn - cx) / 0.42) ** 2, 0.0, 1.5)
        below_dome = _soft(dome - yn, 0.02)
        lungs = np.maximum(lungs, np.minimum(ellipse, below_dome))
    lungs = lungs * (1.0 - heart)
    return lungs.astype(np.float32), heart.astype(np.float32)


def _opacity(shape: tuple[int, int], lung_soft: np.ndarray, lung_mask: np.ndarray,
             centre: tuple[int, int], radius: float, rng: np.random.Generator) -> np.ndarray:
    """One patchy opacity, ``[H, W] float32`` in 0..1 (peak 1), confined to the lungs.

    A cluster of 3-6 Gaussian puffs around ``centre`` (row, col), modulated by low-frequency
    noise so it looks patchy rather than like a disc; radius in pixels.
    """
    h, w = shape
    r0, c0 = centre
    half = int(np.ceil(3.0 * radius))
    top, bottom = max(0, r0 - half), min(h, r0 + half + 1)
    left, right = max(0, c0 - half), min(w, c0 + half + 1)
    yy = np.arange(top, bottom, dtype=np.float32)[:, None]
    xx = np.arange(left, right, dtype=np.float32)[None, :]
    field = np.zeros((bottom - top, right - left), np.float32)
    for _ in range(int(rng.integers(3, 7))):
        dy, dx = rng.normal(0.0, 0.45 * radius, 2)
        sigma = rng.uniform(0.35, 0.6) * radius
        field = np.maximum(field, np.exp(-((yy - r0 - dy) ** 2 + (xx - c0 - dx) ** 2)
                                         / (2.0 * sigma * sigma)))
    texture = _smooth_noise(rng, field.shape, 6)
    field *= np.clip(0.75 + 0.25 * texture, 0.3, 1.0)
    out = np.zeros(shape, np.float32)
    window = (slice(top, bottom), slice(left, right))
    # Opacities are airspace disease: only where there is lung, faded at the lung's soft edge.
    out[window] = field * lung_soft[window] * lung_mask[window]
    peak = float(out.max())
    return out / peak if peak > 0 else out


def _marker_box(rng: np.random.Generator, height: int, width: int) -> CropBox:
    """A confounder tag box in one of the four corners, entirely outside the fixed crop box."""
    crop = fixed_crop_box(height, width)
    corner_rows = [(0, crop.top), (crop.bottom, height)]
    corner_cols = [(0, crop.left), (crop.right, width)]
    rows = corner_rows[int(rng.integers(2))]
    cols = corner_cols[int(rng.integers(2))]
    # The tag is ~7 % of the short side, but must fit the corner cell (the bottom band is only
    # 10 % of the height).
    room = min(rows[1] - rows[0], cols[1] - cols[0])
    side = max(1, min(int(round(rng.uniform(0.06, 0.08) * min(height, width))), room - 2))
    top = rows[0] + int(rng.integers(0, max(1, rows[1] - rows[0] - side + 1)))
    left = cols[0] + int(rng.integers(0, max(1, cols[1] - cols[0] - side + 1)))
    return CropBox(top, min(top + side, rows[1]), left, min(left + side, cols[1]))


def render_phantom(rng: np.random.Generator, label: int, size_hw: tuple[int, int] | None = None,
                   confounder: bool = False) -> Phantom:
    """Draw one chest-radiograph phantom and its ground truth.

    The random draws do not depend on ``confounder``: the same ``rng`` state with and without it
    gives the same film, differing only inside :attr:`Phantom.marker_box`.

    Args:
        rng: random generator (consumed).
        label: 0 = NORMAL (no opacity), 1 = PNEUMONIA (1-3 opacities in the lung fields).
        size_hw: ``(height, width)`` in pixels; None draws the height from
            ``DEFAULT_MIN_SIZE..DEFAULT_MAX_SIZE`` and width / height from 0.8-1.3.
        confounder: burn a bright tag into a corner outside the fixed crop box.

    Returns:
        A :class:`Phantom`.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (NORMAL) or 1 (PNEUMONIA), got {label!r}")
    if size_hw is None:
        size_hw = draw_size(rng, DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < SMALLEST_SIZE or w < SMALLEST_SIZE:
        raise ValueError(f"phantom size {h}x{w} is too small; use at least {SMALLEST_SIZE} px")

    # Anatomy is smooth, so it is drawn on a grid of at most RENDER_MAX_SIDE px and upsampled;
    # noise, the tag and the masks' thresholds are applied at full size. Geometry is drawn in
    # fractions of the image, so the film does not depend on the grid size.
    scale = min(1.0, RENDER_MAX_SIDE / max(h, w))
    gh, gw = max(1, round(h * scale)), max(1, round(w * scale))

    # Position and scale: lungs roughly fill the fixed crop box, jittered like real films.
    cx = gw * (0.5 + rng.uniform(-0.03, 0.03))
    half_w = gw * rng.uniform(0.37, 0.44)
    y_top = gh * rng.uniform(0.13, 0.2)
    y_bottom = gh * rng.uniform(0.76, 0.84)
    chest_h = y_bottom - y_top
    # Pixel centres of the grid, so the upsampled maps line up with the full-size pixels.
    xn = ((np.arange(gw, dtype=np.float32) + 0.5 - cx) / half_w)[None, :]
    yn = ((np.arange(gh, dtype=np.float32) + 0.5 - y_top) / chest_h)[:, None]
    u = np.abs(xn)
    edge = 1.5 / half_w  # a pixel or two of soft edge, in xn units

    density = np.full((gh, gw), 0.04, np.float32)
    # Chest wall widest at the bases; sloping shoulders; the neck above the apices.
    body_half = 0.9 + 0.12 * np.clip(yn / 0.7, 0.0, 1.0)
    body_half = np.where(yn < -0.04, np.maximum(0.34, 0.9 + 1.6 * (yn + 0.04)), body_half)
    body = _soft(body_half - u, 0.04 + edge)
    density += body * (0.5 + 0.1 * np.clip((yn - 0.85) / 0.3, 0.0, 1.0))  # abdomen is denser

    lung_soft, heart = _lung_fields(xn, yn, rng)
    lung_soft *= body
    # Apices sit under more soft tissue than the bases, so they are less dark.
    density -= lung_soft * rng.uniform(0.33, 0.4) * (0.8 + 0.2 * np.clip(yn, 0.0, 1.0))
    density += 0.07 * heart * body
    mediastinum = _soft(0.15 - u, 0.05) * _soft(1.05 - yn, 0.1) * body
    density += 0.07 * mediastinum

    # Spine with vertebral bodies (brighter blocks) and disc spaces.
    spine = _soft(0.075 - u, 0.02 + edge)
    period = rng.uniform(0.08, 0.095)
    phase = rng.uniform(0.0, 1.0)
    vertebrae = 0.5 + 0.5 * np.cos(2.0 * np.pi * (yn / period + phase))
    density += spine * (0.09 + 0.04 * vertebrae) * body

    # Ribs: posterior arcs leave the spine, rise a little, then sweep down laterally; anterior
    # arcs are fainter and run down towards the midline.
    rib_gap = rng.uniform(0.095, 0.11)
    rib_t = rng.uniform(0.026, 0.034)
    bend = rng.uniform(0.4, 0.5)
    for k in range(11):
        y0 = -0.1 + k * rib_gap
        rows = _rows_for(y0 - 0.06, y0 + bend + 0.06, y_top, chest_h, gh)
        _add_arc(density, yn, u, rows, lambda uu, y0=y0: y0 - 0.12 * uu + bend * uu * uu,
                 rib_t * (1.0 + 0.1 * k / 10), 0.045, 0.07, 0.97)
    for k in range(6):
        y0 = 0.02 + k * 0.14
        rows = _rows_for(y0 - 0.05, y0 + 0.2, y_top, chest_h, gh)
        _add_arc(density, yn, u, rows, lambda uu, y0=y0: y0 + 0.22 * (0.92 - uu),
                 0.022, 0.025, 0.3, 0.92)
    clavicle_y = rng.uniform(-0.1, -0.04)
    rows = _rows_for(clavicle_y - 0.15, clavicle_y + 0.08, y_top, chest_h, gh)
    _add_arc(density, yn, u, rows,
             lambda uu: clavicle_y - 0.16 * (uu - 0.1) + 0.12 * (uu - 0.1) ** 2,
             0.035, 0.12, 0.1, 0.78)

    # Lung markings: faint low-frequency texture inside the lungs only.
    markings = _smooth_noise(rng, (gh, gw), 24)
    density += 0.025 * markings * lung_soft

    # The confounder tag and the lesion count are drawn for every image, so the random stream
    # (and thus the film) does not depend on `confounder` or on the label of earlier draws.
    marker = _marker_box(rng, h, w)
    marker_value = int(rng.integers(235, 256))
    num_lesions = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))

    density = _upsample(density, h, w)
    lung_soft_full = _upsample(lung_soft, h, w)
    lung_mask = lung_soft_full >= 0.5
    lesion_mask = np.zeros((h, w), bool)
    if label == 1:
        opacity = _upsample(
            _draw_opacities(rng, (gh, gw), lung_soft, lung_soft >= 0.5, num_lesions), h, w)
        # Confine to the full-size lung mask too, so lesion_mask is inside lung_mask exactly.
        opacity *= lung_mask
        density += rng.uniform(0.32, 0.42) * opacity
        lesion_mask = opacity >= LESION_VISIBLE_FRACTION
    else:
        num_lesions = 0

    # Exposure: random gain, offset and gamma, then quantum noise.
    gain = rng.uniform(0.9, 1.2)
    offset = rng.uniform(-0.04, 0.06)
    gamma = rng.uniform(0.8, 1.25)
    film = np.clip(gain * (density - 0.04) + 0.05 + offset, 0.0, 1.0) ** gamma
    noise = rng.standard_normal((h, w), dtype=np.float32) * rng.uniform(2.0, 5.0)
    image = np.clip(film * 255.0 + noise, 0, 255).astype(np.uint8)

    if confounder:
        _burn_marker(image, marker, marker_value)
    return Phantom(image, lung_mask, lesion_mask, marker if confounder else None, num_lesions)


def _draw_opacities(rng: np.random.Generator, shape: tuple[int, int], lung_soft: np.ndarray,
                    lung_mask: np.ndarray, count: int) -> np.ndarray:
    """``count`` opacities combined (max), ``[H, W] float32`` 0..1.

    Centres are drawn among well-inside lung pixels at least ~one radius inside the fixed crop
    box, so lesions survive the paper's crop (only their faint rims may reach beyond it).
    """
    h, w = shape
    crop = fixed_crop_box(h, w)
    lung_core = lung_soft > 0.9
    opacity = np.zeros(shape, np.float32)
    for _ in range(count):
        radius = rng.uniform(0.06, 0.095) * min(h, w)
        margin = int(0.9 * radius)
        inside = np.zeros(shape, bool)
        inside[crop.top + margin:crop.bottom - margin,
               crop.left + margin:crop.right - margin] = True
        candidates = np.flatnonzero(lung_core & inside)
        if candidates.size == 0:  # odd geometry: any lung pixel in the crop, then any at all
            inside[crop.top:crop.bottom, crop.left:crop.right] = True
            candidates = np.flatnonzero(lung_mask & inside)
            if candidates.size == 0:
                candidates = np.flatnonzero(lung_mask)
                if candidates.size == 0:
                    break
        r, c = divmod(int(candidates[rng.integers(candidates.size)]), w)
        opacity = np.maximum(opacity, _opacity(shape, lung_soft, lung_mask, (r, c), radius, rng))
    return opacity


def _burn_marker(image: np.ndarray, box: CropBox, value: int) -> None:
    """Burn a bright tag with a dark text-like stroke into ``image`` in place (a film label)."""
    image[box.top:box.bottom, box.left:box.right] = value
    side = min(box.bottom - box.top, box.right - box.left)
    if side >= 8:
        # A dark "L" inside the tag: text-like detail; the bright square is what survives resizing.
        t = max(1, side // 7)
        r0, c0 = box.top + side // 5, box.left + side // 4
        r1, c1 = box.top + side - side // 5, box.left + side - side // 4
        image[r0:r1, c0:c0 + t] = 20
        image[r1 - t:r1, c0:c1] = 20


def generate_phantom(rng: np.random.Generator, label: int, size_hw: tuple[int, int] | None = None,
                     confounder: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom as ``(image [H, W] uint8, lung_mask [H, W] bool, lesion_mask [H, W] bool)``.

    See :func:`render_phantom` (which also returns the confounder box) for the arguments.
    """
    phantom = render_phantom(rng, label, size_hw, confounder)
    return phantom.image, phantom.lung_mask, phantom.lesion_mask


def draw_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """A random ``(height, width)``: height in ``min_size..max_size`` and width / height in
    0.8-1.3 (real films are often wider than tall), width clipped to the same range."""
    height = int(rng.integers(min_size, max_size + 1))
    width = int(np.clip(round(height * rng.uniform(0.8, 1.3)), min_size, max_size))
    return height, width


# ---------------------------------------------------------------------------------------------
# Dataset writer.


class _Item(NamedTuple):
    split: str
    label: int
    patient_id: str
    stem: str


def _plan_files(rng: np.random.Generator, counts: dict[str, tuple[int, int]],
                images_per_patient: tuple[int, int]) -> list[_Item]:
    """Patients and file names for every image, in a fixed order.

    Patient numbers are unique over the whole dataset (no patient in two classes or splits).
    """
    items = []
    patient = 0
    image_number = 0  # PNEUMONIA file names end in a running image number, like Kaggle's
    lo, hi = images_per_patient
    for split in SPLIT_NAMES:
        for label in (0, 1):
            remaining = counts[split][label]
            while remaining > 0:
                patient += 1
                n = min(int(rng.integers(lo, hi + 1)), remaining)
                kind = "bacteria" if rng.random() < BACTERIA_FRACTION else "virus"
                for k in range(1, n + 1):
                    image_number += 1
                    if label == 0:
                        pid, stem = f"IM-{patient:04d}", f"IM-{patient:04d}-{k:04d}"
                    else:
                        pid, stem = f"person{patient}", f"person{patient}_{kind}_{image_number}"
                    items.append(_Item(split, label, pid, stem))
                remaining -= n
    return items


def _check_args(num_train: int, num_test: int, confounder_rate: float,
                confounder_normal_rate: float, min_size: int, max_size: int,
                pneumonia_fraction: float, images_per_patient: tuple[int, int]) -> None:
    """Raise ValueError naming the flag and the fix for any bad argument."""
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if int(value) != value or value < 0:
            raise ValueError(f"--{name} must be a whole number >= 0, got {value!r}")
    if num_train + num_test == 0:
        raise ValueError("--num_train and --num_test are both 0: nothing to generate; "
                         "set at least one of them > 0")
    for name, value in (("confounder_rate", confounder_rate),
                        ("confounder_normal_rate", confounder_normal_rate),
                        ("pneumonia_fraction", pneumonia_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name} must be a fraction in [0, 1], got {value!r}")
    if min_size < SMALLEST_SIZE:
        raise ValueError(f"--min_size must be >= {SMALLEST_SIZE} px, got {min_size}")
    if min_size > max_size:
        raise ValueError(f"--min_size ({min_size}) is larger than --max_size ({max_size}); "
                         "set --min_size <= --max_size")
    lo, hi = images_per_patient
    if lo < 1 or lo > hi:
        raise ValueError(f"--images_per_patient must be MIN,MAX with 1 <= MIN <= MAX, "
                         f"got {lo},{hi}")


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready: create it, or clear a previous (complete or interrupted) phantom set.

    A folder is ours when it holds ``phantoms.json`` (a finished set) or the in-progress marker
    (a killed run) and nothing else but the folders we write. Anything else is refused rather
    than mixed into (stale images would silently join the new data set) or deleted.
    The marker is written before any image and removed after ``phantoms.json``.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir():
        entries = set(os.listdir(out))
        if entries and not entries & {PHANTOMS_JSON, IN_PROGRESS}:
            raise ValueError(
                f"--out {out} is not empty and holds no {PHANTOMS_JSON} (not a phantom set); "
                "choose a new or empty --out folder")
        owned = set(SPLIT_NAMES) | {MASKS_DIR, PHANTOMS_JSON, PHANTOMS_JSON + ".partial",
                                    IN_PROGRESS}
        foreign = sorted(entries - owned)
        if foreign:
            raise ValueError(f"--out {out} holds a phantom set plus other files ({foreign[:3]}); "
                             "choose a new or empty --out folder")
        # Mark the folder as being rewritten before deleting phantoms.json, so a run killed
        # while clearing neither looks complete nor loses its claim on the folder.
        (out / IN_PROGRESS).touch()
        for name in sorted(entries - {IN_PROGRESS}):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / IN_PROGRESS).touch()


def _write_png(path: Path, mask: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    path.write_bytes(data.tobytes())


def write_phantom_dataset(out: str | os.PathLike, num_train: int, num_test: int, seed: int = 0,
                          confounder_rate: float = 0.0, min_size: int = DEFAULT_MIN_SIZE,
                          max_size: int = DEFAULT_MAX_SIZE, pneumonia_fraction: float = 0.74,
                          images_per_patient: tuple[int, int] = (1, 4),
                          confounder_normal_rate: float = 0.0,
                          jpeg_quality: int = JPEG_QUALITY) -> dict:
    """Write a Kaggle-layout phantom data set with masks and ``phantoms.json``.

    Args:
        out: output folder; created, or replaced if it holds an earlier phantom set. Any other
            non-empty folder is refused.
        num_train, num_test: images per split (each split gets
            ``round(n * pneumonia_fraction)`` PNEUMONIA images, the rest NORMAL).
        seed: random seed; same arguments -> byte-identical files.
        confounder_rate: probability that a PNEUMONIA image carries the corner tag.
        min_size, max_size: image height range in pixels (width follows an aspect ratio 0.8-1.3,
            clipped to the same range).
        pneumonia_fraction: fraction of PNEUMONIA images per split (Kaggle train: 0.74).
        images_per_patient: ``(min, max)`` images per patient, drawn uniformly per patient.
        confounder_normal_rate: probability that a NORMAL image carries the tag (label noise of
            the shortcut; 0 = the tag is a perfect PNEUMONIA cue).
        jpeg_quality: JPEG quality of the images (0-100).

    Returns:
        The summary written to ``phantoms.json`` minus the per-image list: ``counts``
        (``{split: {NORMAL: n, PNEUMONIA: n}}``), ``patients``, ``confounders`` (same shape),
        ``seed``, ``params`` and ``out``.

    Raises:
        ValueError: a bad argument (the message names the flag and the fix) or an unusable
            ``out`` folder.
    """
    images_per_patient = (int(images_per_patient[0]), int(images_per_patient[1]))
    _check_args(num_train, num_test, confounder_rate, confounder_normal_rate, min_size, max_size,
                pneumonia_fraction, images_per_patient)
    out = Path(out)
    _prepare_out(out)

    counts = {}
    for split, n in (("train", int(num_train)), ("test", int(num_test))):
        n_pneumonia = int(round(n * pneumonia_fraction))
        counts[split] = (n - n_pneumonia, n_pneumonia)
    plan_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    items = _plan_files(plan_rng, counts, images_per_patient)

    for split in SPLIT_NAMES:
        for cls in CLASS_NAMES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            (out / MASKS_DIR / split / cls).mkdir(parents=True, exist_ok=True)

    summary_counts = {s: {c: 0 for c in CLASS_NAMES} for s in SPLIT_NAMES}
    confounders = {s: {c: 0 for c in CLASS_NAMES} for s in SPLIT_NAMES}
    patients = {s: {c: set() for c in CLASS_NAMES} for s in SPLIT_NAMES}
    image_records = []
    for index, item in enumerate(items):
        # One stream per image (seed, 1, index): images are independent of each other's draws.
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, index]))
        rate = confounder_rate if item.label == 1 else confounder_normal_rate
        confounder = bool(rng.random() < rate)
        size = draw_size(rng, min_size, max_size)
        phantom = render_phantom(rng, item.label, size, confounder)
        cls = CLASS_NAMES[item.label]
        rel = f"{item.split}/{cls}/{item.stem}.jpeg"
        ok, data = cv2.imencode(".jpeg", phantom.image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise OSError(f"JPEG encoding failed for {out / rel}")
        (out / rel).write_bytes(data.tobytes())
        mask_dir = out / MASKS_DIR / item.split / cls
        _write_png(mask_dir / f"{item.stem}_lung.png", phantom.lung_mask)
        _write_png(mask_dir / f"{item.stem}_lesion.png", phantom.lesion_mask)
        summary_counts[item.split][cls] += 1
        confounders[item.split][cls] += int(confounder)
        patients[item.split][cls].add(item.patient_id)
        image_records.append({
            "path": rel, "split": item.split, "label": item.label, "patient_id": item.patient_id,
            "height": size[0], "width": size[1], "num_lesions": phantom.num_lesions,
            "lesion_pixels": int(phantom.lesion_mask.sum()),
            "marker_box": list(phantom.marker_box) if phantom.marker_box else None,
        })

    summary = {
        "tool": "pneumo_tf.data.phantoms", "tool_version": pneumo_tf.__version__, "seed": seed,
        "params": {"num_train": int(num_train), "num_test": int(num_test),
                   "confounder_rate": confounder_rate,
                   "confounder_normal_rate": confounder_normal_rate, "min_size": min_size,
                   "max_size": max_size, "pneumonia_fraction": pneumonia_fraction,
                   "images_per_patient": list(images_per_patient), "jpeg_quality": jpeg_quality},
        "counts": summary_counts,
        "patients": {s: {c: len(p) for c, p in v.items()} for s, v in patients.items()},
        "confounders": confounders,
        "layout": {"images": "{split}/{CLASS}/{stem}.jpeg",
                   "lung_mask": MASKS_DIR + "/{split}/{CLASS}/{stem}_lung.png",
                   "lesion_mask": MASKS_DIR + "/{split}/{CLASS}/{stem}_lesion.png"},
    }
    # Written last: its presence marks a complete set (and lets a re-run replace it).
    atomic_files.write_json_atomic(out / PHANTOMS_JSON, {**summary, "images": image_records})
    (out / IN_PROGRESS).unlink()
    return {**summary, "out": str(out)}


def read_phantom_summary(out: str | os.PathLike) -> dict:
    """Load ``out/phantoms.json`` (raises ValueError naming the file when it is missing)."""
    path = Path(out) / PHANTOMS_JSON
    if not path.is_file():
        raise ValueError(f"{path} not found: {out} is not a complete phantom set; "
                         "run tools/make_phantoms --out=... first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mask_paths(out: str | os.PathLike, image_rel_path: str) -> tuple[Path, Path]:
    """``(lung mask, lesion mask)`` paths of an image given as ``split/CLASS/stem.jpeg``."""
    rel = Path(image_rel_path)
    base = Path(out) / MASKS_DIR / rel.parent
    return base / f"{rel.stem}_lung.png", base / f"{rel.stem}_lesion.png"


# ---------------------------------------------------------------------------------------------
# Command line.

NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "Phantom images in the train split.")
NUM_TEST = flags.DEFINE_integer("num_test", 100, "Phantom images in the test split.")
CONFOUNDER_RATE = flags.DEFINE_float(
    "confounder_rate", 0.0,
    "Fraction of PNEUMONIA phantoms carrying a bright corner tag outside the fixed crop box "
    "(a label-correlated shortcut that cropping removes).")
CONFOUNDER_NORMAL_RATE = flags.DEFINE_float(
    "confounder_normal_rate", 0.0, "Fraction of NORMAL phantoms carrying the same tag.")
MIN_SIZE = flags.DEFINE_integer("min_size", DEFAULT_MIN_SIZE, "Smallest phantom height, pixels.")
MAX_SIZE = flags.DEFINE_integer("max_size", DEFAULT_MAX_SIZE, "Largest phantom height, pixels.")
PNEUMONIA_FRACTION = flags.DEFINE_float(
    "pneumonia_fraction", 0.74, "Fraction of PNEUMONIA images per split (Kaggle train: 0.74).")
IMAGES_PER_PATIENT = flags.DEFINE_list(
    "images_per_patient", ["1", "4"],
    "MIN,MAX images per patient (drawn uniformly per patient), e.g. 1,4.")


def _parse_images_per_patient(values: list[str]) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in values)
    except ValueError:
        raise app.UsageError(
            f"--images_per_patient must be two integers MIN,MAX (e.g. 1,4), got {values}"
        ) from None
    return lo, hi


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not OUT.value:
        raise app.UsageError("--out is required: the folder to write the phantom set into")
    try:
        summary = write_phantom_dataset(
            OUT.value, NUM_TRAIN.value, NUM_TEST.value, seed=SEED.value,
            confounder_rate=CONFOUNDER_RATE.value,
            confounder_normal_rate=CONFOUNDER_NORMAL_RATE.value,
            min_size=MIN_SIZE.value, max_size=MAX_SIZE.value,
            pneumonia_fraction=PNEUMONIA_FRACTION.value,
            images_per_patient=_parse_images_per_patient(IMAGES_PER_PATIENT.value))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    for split in SPLIT_NAMES:
        c, p = summary["counts"][split], summary["patients"][split]
        k = summary["confounders"][split]
        log.info("%s: NORMAL %d images / %d patients, PNEUMONIA %d / %d; tags %d N, %d P",
                     split, c["NORMAL"], p["NORMAL"], c["PNEUMONIA"], p["PNEUMONIA"],
                     k["NORMAL"], k["PNEUMONIA"])
    print(f"phantoms written to {summary['out']} (summary: {Path(summary['out']) / PHANTOMS_JSON})")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
