"""A trained lung segmentation run (``--task=lungs``) as a tool other stages use.

:class:`LungModel` opens a lungs run directory and answers, for films of any size, the lung
probability per pixel and the lung mask: Grad-CAM measures its evidence against it
(``--lung_model``), the converter crops to it (``--crop=lungs``) and serving refers films where it
finds no lungs. The U-Net sees every film squashed to its own input size (as it was trained:
whole films resized without keeping the aspect ratio); its answer is resized back to the film.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from pneumo_tf.core import rundir

LUNGS_TASK = "lungs"
# A pixel is lung where the model's probability is above this.
MASK_THRESHOLD = 0.5


def check_lung_run(run: "rundir.Run", flag: str = "--lung_model") -> dict:
    """The ``config`` of a finished lungs run (``flag`` names it in errors).

    Raises:
        rundir.RunDirError: the run is missing, unfinished or not a ``--task=lungs`` run.
    """
    if not run.root.is_dir():
        raise rundir.RunDirError(f"{flag}={run}: no such run directory; train a lung model "
                                 f"with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`")
    try:
        config = run.summary.get("config") or {}
    except rundir.RunDirError as e:
        raise rundir.RunDirError(f"{flag}={run}: {e}") from None
    if run.task != LUNGS_TASK:
        raise rundir.RunDirError(
            f"{flag}={run}: a run of --task={run.task}, not a lung model; "
            f"train one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`")
    return config


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
        self.model = self.run.model

    @property
    def path(self) -> str:
        return str(self.run.root)

    def model_inputs(self, films) -> np.ndarray:
        """``[N, S, S, 1]`` uint8: each grey film resized (area) to the model's input size S."""
        out = np.empty((len(films), self.image_size, self.image_size, 1), np.uint8)
        for i, film in enumerate(films):
            film = np.asarray(film)
            film = film[..., 0] if film.ndim == 3 else film
            if film.dtype != np.uint8:
                raise ValueError(f"film {i}: dtype {film.dtype}; expected uint8 pixels")
            out[i, ..., 0] = cv2.resize(film, (self.image_size, self.image_size),
                                        interpolation=cv2.INTER_AREA)
        return out

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
        inputs = self.model_inputs(films)
        probs = np.concatenate([
            np.asarray(self.model(inputs[i:i + self.batch_size], training=False), np.float32)
            for i in range(0, len(inputs), self.batch_size)])[..., 0]
        out = []
        for film, prob in zip(films, probs):
            h, w = np.asarray(film).shape[:2]
            out.append(prob if (h, w) == prob.shape else
                       cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR))
        return out

    def masks(self, films, threshold: float = MASK_THRESHOLD) -> list[np.ndarray]:
        """``[H, W]`` bool lung masks of each film (probability above ``threshold``)."""
        return [p > threshold for p in self.probabilities(films)]
