"""A trained lung segmentation run (``--task=lungs``) as a tool other stages use.

:class:`LungModel` opens a lungs run directory and answers, for films of any size, the lung
probability per pixel and the lung mask: Grad-CAM measures its evidence against it
(``--lung_model``), the converter crops to it (``--crop=lungs``: :meth:`LungModel.find`) and
serving refers films where it finds no lungs. The U-Net sees every film squashed to its own input
size (as it was trained: whole films resized without keeping the aspect ratio; its "thumbnail",
:func:`pneumo_tf.image.preprocess.lung_thumbnail`); its answer is resized back to the film.

A run trained on ``--crop=lungs`` data names its lung model in its data manifest (``lung_model``:
path, checksum of ``model.keras``, input size); :func:`lung_model_for_run` opens it (or the one
given with ``--lung_model``) for export and predict.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np

from pneumo_tf.core import rundir
from pneumo_tf.image import preprocess
from pneumo_tf.modeling import precision

log = logging.getLogger(__name__)

LUNGS_TASK = "lungs"
# A pixel is lung where the model's probability is above this.
MASK_THRESHOLD = preprocess.LUNG_PROBABILITY_THRESHOLD
TRAIN_LUNGS = "train one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`"


def check_lung_run(run: "rundir.Run", flag: str = "--lung_model") -> dict:
    """The ``config`` of a finished lungs run (``flag`` names it in errors).

    Raises:
        rundir.RunDirError: the directory is missing, the run is unfinished, or it is not a
            ``--task=lungs`` run (each named with the fix).
    """
    if not run.root.is_dir():
        raise rundir.RunDirError(f"{flag}={run}: no such directory; pass a lungs run "
                                 f"directory (--task=lungs), or {TRAIN_LUNGS}")
    if not run.paths.summary.is_file():
        raise rundir.RunDirError(f"{flag}={run}: no summary.json, so not a finished run; "
                                 f"finish training it, or {TRAIN_LUNGS}")
    config = run.summary.get("config") or {}
    if run.task != LUNGS_TASK:
        raise rundir.RunDirError(f"{flag}={run}: a run of --task={run.task}, not a lung model; "
                                 f"{TRAIN_LUNGS}")
    return config


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a run's ``model.keras``), hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LungModel:
    """A lungs run's model, loaded once.

    Args:
        run_dir: a finished ``--task=lungs`` run directory (or :class:`pneumo_tf.core.rundir.Run`).
        batch_size: films per forward pass.

    Raises:
        rundir.RunDirError: as :func:`check_lung_run`.
    """

    def __init__(self, run_dir: "str | os.PathLike | rundir.Run", batch_size: int = 32):
        self.run = rundir.Run.open(run_dir)
        self.config = check_lung_run(self.run)
        self.image_size = int(self.config["image_size"])
        self.batch_size = int(batch_size)

    @functools.cached_property
    def model(self):
        """``model.keras`` in float32 (``[B, S, S, 1]`` uint8 -> ``lung_mask`` ``[B, S, S, 1]``
        float32): a run trained in mixed precision is rebuilt in float32
        (:func:`pneumo_tf.modeling.precision.float32_model`), so the converter, predict and an
        exported graph compute the very same maps."""
        return precision.float32_model(self.run.model)

    @property
    def path(self) -> str:
        return str(self.run.root)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the run's ``model.keras``: names the exact weights a lung crop came from."""
        return model_sha256(self.run.paths.model)

    def describe(self) -> dict:
        """``{"path", "sha256", "image_size"}``: how a data manifest or an export names it."""
        return {"path": str(Path(self.path).absolute()), "sha256": self.sha256,
                "image_size": self.image_size}

    def model_inputs(self, films) -> np.ndarray:
        """``[N, S, S, 1]`` uint8: each grey film resized (area) to the model's input size S."""
        out = np.empty((len(films), self.image_size, self.image_size, 1), np.uint8)
        for i, film in enumerate(films):
            film = np.asarray(film)
            film = film[..., 0] if film.ndim == 3 else film
            if film.dtype != np.uint8:
                raise ValueError(f"film {i}: dtype {film.dtype}; expected uint8 pixels")
            out[i, ..., 0] = preprocess.lung_thumbnail(film, self.image_size)
        return out

    def grid_probabilities(self, thumbnails: np.ndarray) -> np.ndarray:
        """``[N, S, S]`` float32 P(lung) of ``[N, S, S, 1]`` uint8 thumbnails
        (:meth:`model_inputs`)."""
        thumbnails = np.asarray(thumbnails, np.uint8)
        if len(thumbnails) == 0:
            return np.zeros((0, self.image_size, self.image_size), np.float32)
        return np.concatenate([
            np.asarray(self.model(thumbnails[i:i + self.batch_size], training=False), np.float32)
            for i in range(0, len(thumbnails), self.batch_size)])[..., 0]

    def probabilities(self, films) -> list[np.ndarray]:
        """The lung probability of every pixel of each film.

        Args:
            films: a sequence of ``[H, W]`` or ``[H, W, 1]`` uint8 films (sizes may differ), or an
                ``[N, H, W, 1]`` array.

        Returns:
            One ``[H, W]`` float32 map in [0, 1] per film, at the film's own size.
        """
        films = list(films)
        if not films:
            return []
        probs = self.grid_probabilities(self.model_inputs(films))
        out = []
        for film, prob in zip(films, probs):
            h, w = np.asarray(film).shape[:2]
            out.append(prob if (h, w) == prob.shape else
                       cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR))
        return out

    def masks(self, films, threshold: float = MASK_THRESHOLD) -> list[np.ndarray]:
        """``[H, W]`` bool lung masks of each film (probability above ``threshold``)."""
        return [p > threshold for p in self.probabilities(films)]

    def find(self, films, margin: float = preprocess.DEFAULT_LUNG_MARGIN,
             min_fraction: float = preprocess.DEFAULT_MIN_LUNG_FRACTION
             ) -> list[preprocess.LungFinding]:
        """Each film's lung share, confidence and lung crop box
        (:func:`pneumo_tf.image.preprocess.find_lungs` on the model's map of the film)."""
        probs = self.grid_probabilities(self.model_inputs(list(films)))
        return [preprocess.find_lungs(p, margin, min_fraction) for p in probs]


def lung_model_for_run(run: "rundir.Run", override: str | os.PathLike | None = None
                       ) -> LungModel | None:
    """The lung model a classifier run serves with: ``override`` (``--lung_model``), else the one
    its data was cropped with (the manifest's ``lung_model``), else None.

    A run trained on ``--crop=lungs`` data needs a lung model of the same input size (the crop
    would differ from training's otherwise); another checksum than training's is allowed with a
    warning (a retrained or moved copy).

    Raises:
        rundir.RunDirError: ``override`` is not a usable lungs run, or is of another input size
            than the run's lung crop, or the run's own lung model is gone (each with the fix).
    """
    entry = run.manifest.get("lung_model") if run.paths.data_manifest.is_file() else None
    if override is None and entry is None:
        return None
    if override is None:
        path = Path(entry["path"])
        if not rundir.RunPaths(path).model.is_file():
            raise rundir.RunDirError(
                f"{run}: its data was cropped with the lung model {path}, which is missing; pass "
                f"--lung_model=<that lungs run, moved> (same input size, "
                f"{entry.get('image_size')} px)")
        override = path
    lungs = LungModel(override)
    if entry is not None:
        if int(entry.get("image_size", lungs.image_size)) != lungs.image_size:
            raise rundir.RunDirError(
                f"--lung_model={override}: a {lungs.image_size} px lung model, but {run} was "
                f"trained on films cropped by a {entry['image_size']} px one ({entry['path']}); "
                f"pass that lungs run (or one of the same size)")
        if entry.get("sha256") and entry["sha256"] != lungs.sha256:
            log.warning("--lung_model=%s is not the lung model %s's data was cropped with "
                        "(%s): its crops may differ from training's", override, run,
                        entry["path"])
    return lungs
