"""Synthetic chest-radiograph "phantoms" with ground truth, for the demo and the tests.

Each phantom is a procedurally drawn frontal chest film: dark background, soft-tissue body
outline with neck, two dark lung fields cut by domed hemidiaphragms and the heart, a bright
mediastinum and spine with vertebrae, posterior and anterior rib arcs, clavicles, faint lung
markings, film noise, and a random size, position and contrast. NORMAL phantoms carry no
opacity. PNEUMONIA phantoms carry one of two patterns, by subtype, so a three-class model has
something to learn (:func:`render_phantom`):

- BACTERIAL (lobar / focal): one or two compact, dense, patchy, soft-edged opacities inside a
  lung field;
- VIRAL (interstitial): a diffuse hazy veil with a fine reticular net of lines spread over both
  lungs, fainter than a bacterial opacity.

Both stay mostly inside the paper's fixed crop box, so a model trained on fixed-crop images can
see them. A data set's PNEUMONIA file names say the subtype (``person3_bacteria_12``,
``person4_virus_13``), and the drawn pattern follows the name.

Optionally an image carries a *confounder*: a bright burned-in tag in a corner, always outside
the fixed crop box (:func:`pneumo_tf.image.preprocess.fixed_crop_box`), placed on PNEUMONIA images
with probability ``confounder_rate`` and on NORMAL images with ``confounder_normal_rate``
(default never). A model trained on uncropped images can cheat with it; cropping removes it,
which reproduces the paper's before/after-crop effect.

Two acquiring sites, for a known, controllable site shift (``--site``). Site a is the reference.
Site b films are darker or brighter (``site_b_exposure``), flatter (``site_b_contrast``) and
blurrier (``site_b_blur``), and each split holds another share of PNEUMONIA images
(``site_b_pneumonia_fraction``); its patients and films are drawn from other random streams
than site a's, so two sets written with the same seed share no anatomy. ``phantoms.json``
records the site and its look. The anatomy drawn from a given random state is the same at both
sites (:func:`render_phantom`): only how the film looks differs.

Output (Kaggle layout; masks live outside the split folders so a converter pointed at ``OUT``
does not take them for data)::

    OUT/train/NORMAL/IM-0007-0001.jpeg            # NORMAL: IM-{patient:04d}-{k:04d}
    OUT/train/PNEUMONIA/person3_virus_12.jpeg     # person{patient}_{bacteria|virus}_{image}
    OUT/test/...
    OUT/masks/train/NORMAL/IM-0007-0001_lung.png  # uint8 0/255, same size as the image
    OUT/masks/train/NORMAL/IM-0007-0001_lesion.png  # all zero for NORMAL
    OUT/lung_masks/train/NORMAL/IM-0007-0001.png  # the lung mask again, mirroring the images:
                                                  # the converter's --masks=OUT/lung_masks
    OUT/phantoms.json                             # parameters, counts, one record per image
                                                  # (with its subtype: 0, 1 bacteria, 2 virus)

Usage::

    tools/make_phantoms --out=/tmp/phantoms --num_train=200 --num_test=50 \\
        --min_size=400 --max_size=600 --confounder_rate=0.5
    tools/make_phantoms --out=/tmp/phantoms_b --num_train=0 --num_test=200 --site=b

Settings are a :class:`PhantomConfig`, whose fields are also the flags.

Same flags and seed give byte-identical files. Every image draws from its own random stream
(seeded by ``(seed, image index)``, plus the site for site b), so changing one image's
parameters never shifts the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

import pneumo_tf
from pneumo_tf.core import atomic_files, cli
from pneumo_tf.image.preprocess import CropBox, fixed_crop_box

log = logging.getLogger(__name__)

CLASS_NAMES = pneumo_tf.CLASS_NAMES  # label 0, label 1
SPLIT_NAMES = ("train", "test")
PHANTOMS_JSON = "phantoms.json"
IN_PROGRESS = ".phantoms_in_progress"  # present while a set is being written
MASKS_DIR = "masks"
LUNG_MASKS_DIR = "lung_masks"  # lung masks in the layout of the images (converter --masks)
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
# Subtypes (as in the records: pneumo_tf.SUBTYPE_NAMES) and the file-name word of each.
NORMAL, BACTERIAL, VIRAL = 0, 1, 2
SUBTYPE_OF_KIND = {"bacteria": BACTERIAL, "virus": VIRAL}
MAX_BACTERIAL_LESIONS = 2
SITES = ("a", "b")
# Extra words of each site's random-stream seeds: site a keeps the original streams (its files
# never change); site b draws other patients and films than site a for the same --seed.
_SITE_STREAMS = {"a": (), "b": (1,)}


class Phantom(NamedTuple):
    """One rendered phantom and its ground truth.

    Attributes:
        image: ``[H, W] uint8`` radiograph, lungs dark (MONOCHROME2).
        lung_mask: ``[H, W] bool``, both lung fields (heart and diaphragm excluded).
        lesion_mask: ``[H, W] bool``, where an opacity is visible; all False for NORMAL.
        marker_box: the confounder tag's box in pixels, or None when the image has none.
        num_lesions: number of opacities drawn: 0 for NORMAL, 1-2 for BACTERIAL, 2 for VIRAL
            (its one diffuse pattern spreads over both lungs).
        subtype: 0 NORMAL, 1 BACTERIAL, 2 VIRAL.
    """

    image: np.ndarray
    lung_mask: np.ndarray
    lesion_mask: np.ndarray
    marker_box: CropBox | None
    num_lesions: int
    subtype: int = NORMAL


@dataclasses.dataclass(frozen=True)
class SiteLook:
    """How a site's films look beside site a's; the defaults are site a (nothing changed).

    Attributes:
        exposure: shift of the film's brightness, fraction of full scale (-0.1: darker by about
            25 gray levels).
        contrast: scale of the film's deviations from its mean brightness (1: site a's; below 1
            flatter films).
        blur: Gaussian blur sigma as a fraction of the image's short side (0: none). Applied
            after the quantum noise, like a detector's blur, so it softens the noise too.
    """

    exposure: float = 0.0
    contrast: float = 1.0
    blur: float = 0.0


SITE_A = SiteLook()


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What :func:`write_phantom_dataset` writes; every field is also a flag of make_phantoms."""

    num_train: int = cli.option(400, "Phantom images in the train split.")
    num_test: int = cli.option(100, "Phantom images in the test split.")
    seed: int = cli.option(0, "Random seed; same flags and seed -> byte-identical files.")
    confounder_rate: float = cli.option(
        0.0, "Fraction of PNEUMONIA phantoms carrying a bright corner tag outside the fixed crop "
        "box (a label-correlated shortcut that cropping removes).")
    confounder_normal_rate: float = cli.option(
        0.0, "Fraction of NORMAL phantoms carrying the same tag.")
    min_size: int = cli.option(DEFAULT_MIN_SIZE, "Smallest phantom height, pixels.")
    max_size: int = cli.option(DEFAULT_MAX_SIZE, "Largest phantom height, pixels.")
    pneumonia_fraction: float = cli.option(
        0.74, "Fraction of PNEUMONIA images per split at site a (Kaggle train: 0.74); site b "
        "uses --site_b_pneumonia_fraction.")
    bacteria_fraction: float = cli.option(
        BACTERIA_FRACTION, "Fraction of PNEUMONIA patients with bacterial (focal) pneumonia; the "
        "rest are viral (diffuse). The Kaggle set has about two bacterial per viral.",
        lower=0.0, upper=1.0)
    images_per_patient: tuple[int, int] = cli.option(
        (1, 4), "MIN,MAX images per patient (drawn uniformly per patient), e.g. 1,4.")
    jpeg_quality: int = cli.option(JPEG_QUALITY, "JPEG quality of the images, 0-100.")
    site: str = cli.option(
        "a", "Acquiring site: a (the reference look and prevalence) or b (a known site shift: "
        "other exposure, lower contrast, more blur and another prevalence, set by the "
        "--site_b_* flags). Site b draws other patients than site a for the same seed.",
        choices=SITES)
    site_b_exposure: float = cli.option(
        -0.1, "Site b: shift of the film's brightness, fraction of full scale (negative: "
        "darker films; -0.1 is about 25 gray levels).")
    site_b_contrast: float = cli.option(
        0.75, "Site b: scale of the film's deviations from its mean brightness (1: site a's "
        "contrast; below 1: flatter films).")
    site_b_blur: float = cli.option(
        0.005, "Site b: Gaussian blur sigma, fraction of the image's short side (0.005: 2.5 px on "
        "a 500 px film), applied after the noise like a detector's blur.")
    site_b_pneumonia_fraction: float = cli.option(
        0.5, "Site b: fraction of PNEUMONIA images per split (site a: --pneumonia_fraction).")

    def site_look(self) -> SiteLook:
        """How this site's films look (site a: :data:`SITE_A`, nothing changed)."""
        if self.site == "a":
            return SITE_A
        return SiteLook(self.site_b_exposure, self.site_b_contrast, self.site_b_blur)

    def prevalence(self) -> float:
        """Fraction of PNEUMONIA images per split at this site."""
        return self.pneumonia_fraction if self.site == "a" else self.site_b_pneumonia_fraction

    def check(self) -> None:
        """Raise ValueError naming the flag and the fix for any bad value."""
        for name in ("num_train", "num_test"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"--{name} must be a whole number >= 0, got {value!r}")
        if self.num_train + self.num_test == 0:
            raise ValueError("--num_train and --num_test are both 0: nothing to generate; "
                             "set at least one of them > 0")
        for name in ("confounder_rate", "confounder_normal_rate", "pneumonia_fraction",
                     "site_b_pneumonia_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be a fraction in [0, 1], got "
                                 f"{getattr(self, name)!r}")
        if self.min_size < SMALLEST_SIZE:
            raise ValueError(f"--min_size must be >= {SMALLEST_SIZE} px, got {self.min_size}")
        if self.min_size > self.max_size:
            raise ValueError(f"--min_size ({self.min_size}) is larger than --max_size "
                             f"({self.max_size}); set --min_size <= --max_size")
        lo, hi = self.images_per_patient
        if int(lo) != lo or int(hi) != hi or lo < 1 or lo > hi:
            raise ValueError(f"--images_per_patient must be MIN,MAX with 1 <= MIN <= MAX, "
                             f"got {lo},{hi}")
        self._check_site()

    def _check_site(self) -> None:
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg_quality must be in 0-100, got {self.jpeg_quality}")
        if self.site not in SITES:
            raise ValueError(f"--site={self.site!r} is not one of {SITES}")
        if not -1.0 < self.site_b_exposure < 1.0:
            raise ValueError(f"--site_b_exposure must be in (-1, 1), got {self.site_b_exposure}")
        if self.site_b_contrast <= 0.0:
            raise ValueError(f"--site_b_contrast must be > 0, got {self.site_b_contrast}")
        if self.site_b_blur < 0.0:
            raise ValueError(f"--site_b_blur must be >= 0, got {self.site_b_blur}")


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


class _Frame(NamedTuple):
    """Where the chest sits on the render grid (see the normalised coordinates above)."""

    gh: int             # render grid height, pixels
    gw: int             # render grid width, pixels
    y_top: float        # lung apex row, grid pixels
    chest_h: float      # apex-to-diaphragm height, grid pixels
    xn: np.ndarray      # [1, gw] normalised column of each grid pixel centre
    yn: np.ndarray      # [gh, 1] normalised row of each grid pixel centre
    u: np.ndarray       # [1, gw] |xn|: both sides at once
    edge: float         # a pixel or two of soft edge, in xn units


def _checked_size(rng: np.random.Generator, label: int,
                  size_hw: tuple[int, int] | None) -> tuple[int, int]:
    """``(height, width)`` of the film (drawn when ``size_hw`` is None); refuses bad input."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (NORMAL) or 1 (PNEUMONIA), got {label!r}")
    if size_hw is None:
        size_hw = draw_size(rng, DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE)
    h, w = int(size_hw[0]), int(size_hw[1])
    if h < SMALLEST_SIZE or w < SMALLEST_SIZE:
        raise ValueError(f"phantom size {h}x{w} is too small; use at least {SMALLEST_SIZE} px")
    return h, w


def _checked_subtype(label: int, subtype: int | None) -> int:
    """The subtype to draw: ``subtype``, or NORMAL / BACTERIAL by ``label`` when None."""
    if subtype is None:
        return BACTERIAL if label == 1 else NORMAL
    allowed = (BACTERIAL, VIRAL) if label == 1 else (NORMAL,)
    if subtype not in allowed:
        raise ValueError(f"subtype {subtype!r} does not fit label {label!r}: PNEUMONIA (1) is "
                         f"BACTERIAL (1) or VIRAL (2), NORMAL (0) is 0")
    return int(subtype)


def _chest_frame(rng: np.random.Generator, h: int, w: int) -> _Frame:
    """The render grid and the chest's position and scale on it.

    Anatomy is smooth, so it is drawn on a grid of at most RENDER_MAX_SIDE px and upsampled;
    noise, the tag and the masks' thresholds are applied at full size. Geometry is drawn in
    fractions of the image, so the film does not depend on the grid size.
    """
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
    return _Frame(gh, gw, y_top, chest_h, xn, yn, np.abs(xn), 1.5 / half_w)


def _draw_soft_tissue(rng: np.random.Generator, f: _Frame
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body, lungs, heart and mediastinum: ``(density, lung_soft, body)``, ``[gh, gw]`` each."""
    density = np.full((f.gh, f.gw), 0.04, np.float32)
    # Chest wall widest at the bases; sloping shoulders; the neck above the apices.
    body_half = 0.9 + 0.12 * np.clip(f.yn / 0.7, 0.0, 1.0)
    body_half = np.where(f.yn < -0.04, np.maximum(0.34, 0.9 + 1.6 * (f.yn + 0.04)), body_half)
    body = _soft(body_half - f.u, 0.04 + f.edge)
    density += body * (0.5 + 0.1 * np.clip((f.yn - 0.85) / 0.3, 0.0, 1.0))  # denser abdomen

    lung_soft, heart = _lung_fields(f.xn, f.yn, rng)
    lung_soft *= body
    # Apices sit under more soft tissue than the bases, so they are less dark.
    density -= lung_soft * rng.uniform(0.33, 0.4) * (0.8 + 0.2 * np.clip(f.yn, 0.0, 1.0))
    density += 0.07 * heart * body
    mediastinum = _soft(0.15 - f.u, 0.05) * _soft(1.05 - f.yn, 0.1) * body
    density += 0.07 * mediastinum
    return density, lung_soft, body


def _add_spine(density: np.ndarray, rng: np.random.Generator, f: _Frame,
               body: np.ndarray) -> None:
    """Spine with vertebral bodies (brighter blocks) and disc spaces, in place."""
    spine = _soft(0.075 - f.u, 0.02 + f.edge)
    period = rng.uniform(0.08, 0.095)
    phase = rng.uniform(0.0, 1.0)
    vertebrae = 0.5 + 0.5 * np.cos(2.0 * np.pi * (f.yn / period + phase))
    density += spine * (0.09 + 0.04 * vertebrae) * body


def _add_ribs_and_clavicles(density: np.ndarray, rng: np.random.Generator, f: _Frame) -> None:
    """Rib and clavicle arcs, in place.

    Posterior rib arcs leave the spine, rise a little, then sweep down laterally; anterior arcs
    are fainter and run down towards the midline.
    """
    rib_gap = rng.uniform(0.095, 0.11)
    rib_t = rng.uniform(0.026, 0.034)
    bend = rng.uniform(0.4, 0.5)
    for k in range(11):
        y0 = -0.1 + k * rib_gap
        rows = _rows_for(y0 - 0.06, y0 + bend + 0.06, f.y_top, f.chest_h, f.gh)
        _add_arc(density, f.yn, f.u, rows, lambda uu, y0=y0: y0 - 0.12 * uu + bend * uu * uu,
                 rib_t * (1.0 + 0.1 * k / 10), 0.045, 0.07, 0.97)
    for k in range(6):
        y0 = 0.02 + k * 0.14
        rows = _rows_for(y0 - 0.05, y0 + 0.2, f.y_top, f.chest_h, f.gh)
        _add_arc(density, f.yn, f.u, rows, lambda uu, y0=y0: y0 + 0.22 * (0.92 - uu),
                 0.022, 0.025, 0.3, 0.92)
    clavicle_y = rng.uniform(-0.1, -0.04)
    rows = _rows_for(clavicle_y - 0.15, clavicle_y + 0.08, f.y_top, f.chest_h, f.gh)
    _add_arc(density, f.yn, f.u, rows,
             lambda uu: clavicle_y - 0.16 * (uu - 0.1) + 0.12 * (uu - 0.1) ** 2,
             0.035, 0.12, 0.1, 0.78)


def _draw_anatomy(rng: np.random.Generator, f: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """The chest's density map and soft lung fields on the render grid, ``[gh, gw]`` each."""
    density, lung_soft, body = _draw_soft_tissue(rng, f)
    _add_spine(density, rng, f, body)
    _add_ribs_and_clavicles(density, rng, f)
    # Lung markings: faint low-frequency texture inside the lungs only.
    markings = _smooth_noise(rng, (f.gh, f.gw), 24)
    density += 0.025 * markings * lung_soft
    return density, lung_soft


def _add_lesions(density: np.ndarray, rng: np.random.Generator, f: _Frame,
                 lung_soft: np.ndarray, lung_mask: np.ndarray, count: int,
                 subtype: int) -> tuple[np.ndarray, int]:
    """Add the opacities of ``subtype`` to the full-size ``density`` in place.

    BACTERIAL: ``min(count, 2)`` focal opacities; VIRAL: one diffuse interstitial pattern over
    both lungs (``count`` ignored). Returns ``(lesion mask, number of opacities)``.
    """
    h, w = density.shape
    grid_mask = lung_soft >= 0.5
    if subtype == VIRAL:
        grid_opacity = _draw_interstitial(rng, (f.gh, f.gw), lung_soft, grid_mask)
        count = 2
    else:
        count = min(count, MAX_BACTERIAL_LESIONS)
        grid_opacity = _draw_opacities(rng, (f.gh, f.gw), lung_soft, grid_mask, count)
    opacity = _upsample(grid_opacity, h, w)
    # Confine to the full-size lung mask too, so lesion_mask is inside lung_mask exactly.
    opacity *= lung_mask
    # A viral veil is fainter than a dense bacterial consolidation.
    strength = rng.uniform(0.16, 0.22) if subtype == VIRAL else rng.uniform(0.32, 0.42)
    density += strength * opacity
    return opacity >= LESION_VISIBLE_FRACTION, count


def _expose(density: np.ndarray, rng: np.random.Generator, site: SiteLook) -> np.ndarray:
    """Full-size density -> ``[H, W] uint8`` film: gain, offset, gamma, the site's look, noise.

    Site a (:data:`SITE_A`) changes nothing, so its films stay exactly as they were.
    """
    gain = rng.uniform(0.9, 1.2)
    offset = rng.uniform(-0.04, 0.06)
    gamma = rng.uniform(0.8, 1.25)
    film = np.clip(gain * (density - 0.04) + 0.05 + offset, 0.0, 1.0) ** gamma
    if site.contrast != 1.0 or site.exposure != 0.0:
        mean = float(film.mean())
        film = np.clip(mean + site.contrast * (film - mean) + site.exposure, 0.0, 1.0)
    noise = rng.standard_normal(density.shape, dtype=np.float32) * rng.uniform(2.0, 5.0)
    image = film * 255.0 + noise
    if site.blur > 0.0:
        image = cv2.GaussianBlur(image, (0, 0), site.blur * min(density.shape))
    return np.clip(image, 0, 255).astype(np.uint8)


def render_phantom(rng: np.random.Generator, label: int, size_hw: tuple[int, int] | None = None,
                   confounder: bool = False, site: SiteLook = SITE_A,
                   subtype: int | None = None) -> Phantom:
    """Draw one chest-radiograph phantom and its ground truth.

    The random draws depend on neither ``confounder`` nor ``site``: the same ``rng`` state
    gives the same anatomy, with and without the tag (which only changes the pixels inside
    :attr:`Phantom.marker_box`) and at every site (which only changes how the film looks).

    Args:
        rng: random generator (consumed).
        label: 0 = NORMAL (no opacity), 1 = PNEUMONIA (opacities as ``subtype`` says).
        size_hw: ``(height, width)`` in pixels; None draws the height from
            ``DEFAULT_MIN_SIZE..DEFAULT_MAX_SIZE`` and width / height from 0.8-1.3.
        confounder: burn a bright tag into a corner outside the fixed crop box.
        site: the look of the acquiring site (:data:`SITE_A`: the reference look).
        subtype: for PNEUMONIA, :data:`BACTERIAL` (1 or 2 focal opacities; the default) or
            :data:`VIRAL` (a diffuse interstitial pattern over both lungs); for NORMAL, None or
            0. The draws before the lesions do not depend on it: the same ``rng`` state gives
            the same anatomy for both subtypes.

    Returns:
        A :class:`Phantom`.
    """
    subtype = _checked_subtype(label, subtype)
    h, w = _checked_size(rng, label, size_hw)
    frame = _chest_frame(rng, h, w)
    density, lung_soft = _draw_anatomy(rng, frame)
    # The confounder tag and the lesion count are drawn for every image, so the random stream
    # (and thus the film) does not depend on `confounder` or on the label of earlier draws.
    marker = _marker_box(rng, h, w)
    marker_value = int(rng.integers(235, 256))
    num_lesions = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))

    density = _upsample(density, h, w)
    lung_mask = _upsample(lung_soft, h, w) >= 0.5
    if label == 1:
        lesion_mask, num_lesions = _add_lesions(density, rng, frame, lung_soft, lung_mask,
                                                num_lesions, subtype)
    else:
        lesion_mask, num_lesions = np.zeros((h, w), bool), 0
    image = _expose(density, rng, site)
    if confounder:
        _burn_marker(image, marker, marker_value)
    return Phantom(image, lung_mask, lesion_mask, marker if confounder else None, num_lesions,
                   subtype)


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


def _draw_interstitial(rng: np.random.Generator, shape: tuple[int, int], lung_soft: np.ndarray,
                       lung_mask: np.ndarray) -> np.ndarray:
    """A diffuse interstitial (viral) pattern over both lungs, ``[H, W] float32`` 0..1 (peak 1).

    A hazy veil whose density drifts slowly across the lungs, plus a fine reticular net: thin
    lines along the zero crossings of band-limited noise (about ``1 / cells`` of the image
    apart). Unlike the focal opacities it covers most of both lung fields.
    """
    veil = np.clip(0.75 + 0.25 * _smooth_noise(rng, shape, 3), 0.4, 1.0)
    cells = int(rng.integers(16, 23))
    net = np.exp(-(_smooth_noise(rng, shape, cells) / 0.4) ** 2)
    out = veil * (0.5 + 0.5 * net) * lung_soft * lung_mask
    peak = float(out.max())
    return (out / peak if peak > 0 else out).astype(np.float32)


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
    subtype: int  # NORMAL, or the subtype the PNEUMONIA file name says


def _plan_files(rng: np.random.Generator, counts: dict[str, tuple[int, int]],
                images_per_patient: tuple[int, int],
                bacteria_fraction: float = BACTERIA_FRACTION) -> list[_Item]:
    """Patients and file names for every image, in a fixed order.

    Patient numbers are unique over the whole dataset (no patient in two classes or splits).
    A PNEUMONIA patient's images share one subtype, named in their file names.
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
                kind = "bacteria" if rng.random() < bacteria_fraction else "virus"
                for k in range(1, n + 1):
                    image_number += 1
                    if label == 0:
                        pid, stem = f"IM-{patient:04d}", f"IM-{patient:04d}-{k:04d}"
                    else:
                        pid, stem = f"person{patient}", f"person{patient}_{kind}_{image_number}"
                    subtype = SUBTYPE_OF_KIND[kind] if label == 1 else NORMAL
                    items.append(_Item(split, label, pid, stem, subtype))
                remaining -= n
    return items


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
        owned = set(SPLIT_NAMES) | {MASKS_DIR, LUNG_MASKS_DIR, PHANTOMS_JSON, PHANTOMS_JSON + ".partial",
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


def _class_counts(config: PhantomConfig) -> dict[str, tuple[int, int]]:
    """``{split: (NORMAL, PNEUMONIA)}``: ``round(n * prevalence)`` PNEUMONIA images per split."""
    counts = {}
    for split, n in (("train", int(config.num_train)), ("test", int(config.num_test))):
        n_pneumonia = int(round(n * config.prevalence()))
        counts[split] = (n - n_pneumonia, n_pneumonia)
    return counts


def _write_image(out: Path, config: PhantomConfig, index: int, item: _Item) -> dict:
    """Render image ``index`` of the plan and write it and its masks; its record for the summary."""
    # One stream per image (seed, 1, index): images are independent of each other's draws.
    rng = np.random.default_rng(np.random.SeedSequence(
        [config.seed, 1, index, *_SITE_STREAMS[config.site]]))
    rate = config.confounder_rate if item.label == 1 else config.confounder_normal_rate
    confounder = bool(rng.random() < rate)
    size = draw_size(rng, config.min_size, config.max_size)
    phantom = render_phantom(rng, item.label, size, confounder, config.site_look(),
                             item.subtype)
    rel = f"{item.split}/{CLASS_NAMES[item.label]}/{item.stem}.jpeg"
    ok, data = cv2.imencode(".jpeg", phantom.image,
                            [cv2.IMWRITE_JPEG_QUALITY, int(config.jpeg_quality)])
    if not ok:
        raise OSError(f"JPEG encoding failed for {out / rel}")
    (out / rel).write_bytes(data.tobytes())
    lung_path, lesion_path = mask_paths(out, rel)
    _write_png(lung_path, phantom.lung_mask)
    _write_png(lesion_path, phantom.lesion_mask)
    _write_png(lung_mask_path(out, rel), phantom.lung_mask)
    return {
        "path": rel, "split": item.split, "label": item.label, "subtype": item.subtype,
        "patient_id": item.patient_id,
        "height": size[0], "width": size[1], "num_lesions": phantom.num_lesions,
        "lesion_pixels": int(phantom.lesion_mask.sum()),
        "marker_box": list(phantom.marker_box) if phantom.marker_box else None,
    }


def _summary(config: PhantomConfig, image_records: list[dict]) -> dict:
    """What ``phantoms.json`` says besides the per-image list: settings, site, counts, layout."""
    counts = {s: {c: 0 for c in CLASS_NAMES} for s in SPLIT_NAMES}
    subtypes = {s: {c: 0 for c in pneumo_tf.SUBTYPE_NAMES} for s in SPLIT_NAMES}
    confounders = {s: {c: 0 for c in CLASS_NAMES} for s in SPLIT_NAMES}
    patients: dict[str, dict[str, set]] = {s: {c: set() for c in CLASS_NAMES} for s in SPLIT_NAMES}
    for rec in image_records:
        split, cls = rec["split"], CLASS_NAMES[rec["label"]]
        counts[split][cls] += 1
        subtypes[split][pneumo_tf.SUBTYPE_NAMES[rec["subtype"]]] += 1
        confounders[split][cls] += int(rec["marker_box"] is not None)
        patients[split][cls].add(rec["patient_id"])
    params = {f.name: getattr(config, f.name) for f in cli.flag_fields(PhantomConfig)
              if f.name != "seed"}
    params["images_per_patient"] = list(config.images_per_patient)
    look = config.site_look()
    return {
        "tool": "pneumo_tf.data.phantoms", "tool_version": pneumo_tf.__version__,
        "seed": config.seed, "params": params,
        "site": {"name": config.site, "exposure": look.exposure, "contrast": look.contrast,
                 "blur": look.blur, "pneumonia_fraction": config.prevalence()},
        "counts": counts,
        "subtype_counts": subtypes,
        "patients": {s: {c: len(p) for c, p in v.items()} for s, v in patients.items()},
        "confounders": confounders,
        "layout": {"images": "{split}/{CLASS}/{stem}.jpeg",
                   "lung_mask": MASKS_DIR + "/{split}/{CLASS}/{stem}_lung.png",
                   "lesion_mask": MASKS_DIR + "/{split}/{CLASS}/{stem}_lesion.png",
                   "lung_masks": LUNG_MASKS_DIR + "/{split}/{CLASS}/{stem}.png"},
    }


def write_phantom_dataset(out: str | os.PathLike, config: PhantomConfig | None = None,
                          **overrides) -> dict:
    """Write a Kaggle-layout phantom data set with masks and ``phantoms.json``.

    Args:
        out: output folder; created, or replaced if it holds an earlier phantom set. Any other
            non-empty folder is refused.
        config: what to write (:class:`PhantomConfig`); None = its defaults. Each split gets
            ``round(n * prevalence)`` PNEUMONIA images, the rest NORMAL.
        **overrides: :class:`PhantomConfig` fields to change, e.g. ``num_train=40,
            num_test=12, seed=3, site="b"``.

    Returns:
        The summary written to ``phantoms.json`` minus the per-image list: ``counts``
        (``{split: {NORMAL: n, PNEUMONIA: n}}``), ``subtype_counts`` (``{split: {NORMAL: n,
        BACTERIAL: n, VIRAL: n}}``), ``patients``, ``confounders`` (same shape as ``counts``),
        ``seed``, ``params``, ``site`` (its name and look) and ``out``.

    Raises:
        ValueError: a bad setting (the message names the flag and the fix) or an unusable
            ``out`` folder.
        TypeError: ``config`` is not a :class:`PhantomConfig`, or an unknown override.
    """
    if config is not None and not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig, got {config!r}; pass the image counts "
                        f"as num_train=..., num_test=...")
    config = dataclasses.replace(config or PhantomConfig(), **overrides)
    config.check()
    lo, hi = config.images_per_patient
    config = dataclasses.replace(config, images_per_patient=(int(lo), int(hi)))
    out = Path(out)
    _prepare_out(out)
    plan_rng = np.random.default_rng(np.random.SeedSequence(
        [config.seed, 0, *_SITE_STREAMS[config.site]]))
    items = _plan_files(plan_rng, _class_counts(config), config.images_per_patient,
                        config.bacteria_fraction)
    for split in SPLIT_NAMES:
        for cls in CLASS_NAMES:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            (out / MASKS_DIR / split / cls).mkdir(parents=True, exist_ok=True)
            (out / LUNG_MASKS_DIR / split / cls).mkdir(parents=True, exist_ok=True)
    image_records = [_write_image(out, config, i, item) for i, item in enumerate(items)]
    summary = _summary(config, image_records)
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


def lung_mask_path(out: str | os.PathLike, image_rel_path: str) -> Path:
    """The lung mask of an image ``split/CLASS/stem.jpeg`` in the layout the converter's
    ``--masks=OUT/lung_masks`` reads: ``OUT/lung_masks/split/CLASS/stem.png``."""
    return Path(out) / LUNG_MASKS_DIR / Path(image_rel_path).with_suffix(".png")


if __name__ == "__main__":  # the old spelling, python -m pneumo_tf.data.phantoms
    from pneumo_tf.make_phantoms import run

    run("pneumo_tf.data.phantoms")
