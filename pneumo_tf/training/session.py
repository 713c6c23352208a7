"""One training request as ``python -m pneumo_tf.train`` makes it: a run or an ensemble of seeds,
then the steps after training declared here (calibration on val and the out-of-distribution fit
for a classifier, the lung guard for a lung model).

The loop (:mod:`pneumo_tf.training.loop`) runs the :class:`~pneumo_tf.training.loop.AfterTraining`
steps its owner hands it and records their results in ``summary.json``; it knows nothing of
calibration or OOD guards. Ensemble training is :func:`pneumo_tf.evaluation.ensemble.train_ensemble`.
"""

from __future__ import annotations

import logging

from pneumo_tf.core import rundir
from pneumo_tf.training import distribute, loop, resume
from pneumo_tf.training import task as task_lib
from pneumo_tf.training.config import TrainConfig

log = logging.getLogger("pneumo_tf.train")


def run_calibration(cfg: TrainConfig, run: rundir.Run) -> str:
    """Fit temperature and threshold on val (pneumo_tf.evaluation.calibration) if asked.

    A failure is logged, never raised: training has finished and its files are complete.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.calibrate:
        return "skipped: --nocalibrate"
    from pneumo_tf.evaluation import calibration  # scikit-learn and the scoring path: when needed

    try:
        calibration.calibrate_run(run, cfg.data_dir, batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("calibration on val failed (%s: %s); training is complete. Re-run it with "
                  "`python -m pneumo_tf.evaluate --run_dir=%s --split=val`", type(e).__name__, e,
                  cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


def run_ood_fit(cfg: TrainConfig, run: rundir.Run) -> str:
    """Fit the out-of-distribution guard (pneumo_tf.ood) if asked; a failure is logged.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.fit_ood:
        return "skipped: --nofit_ood"
    from pneumo_tf.serving import ood

    try:
        ood.fit_run(run, cfg.data_dir, cfg.ood_val_rate, batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("fitting the out-of-distribution guard failed (%s: %s); training is "
                  "complete. Re-run it with `python -m pneumo_tf.ood --run_dir=%s`",
                  type(e).__name__, e, cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


def _calibration_pending(cfg: TrainConfig) -> str:
    return "pending" if cfg.calibrate else "skipped: --nocalibrate"


def _calibration_missing(cfg: TrainConfig, paths: rundir.RunPaths) -> bool:
    return cfg.calibrate and not paths.calibration.is_file()


def run_lung_guard_fit(cfg: TrainConfig, run: rundir.Run) -> str:
    """Fit a lungs run's no-lungs guard (pneumo_tf.serving.lungs.fit_guard: the lung confidence
    under which ``--ood_val_rate`` of the val films lie) if ``--fit_ood``; a failure is logged.

    Returns:
        ``ok``, ``skipped: ...`` or ``failed: ...`` (recorded in summary.json).
    """
    if not cfg.fit_ood:
        return "skipped: --nofit_ood"
    from pneumo_tf.serving import lungs

    try:
        lungs.fit_guard(run, cfg.data_dir, cfg.ood_val_rate, batch_size=cfg.val_batch_size)
    except Exception as e:  # noqa: BLE001 -- logged; training results stay valid
        log.error("fitting the lung guard failed (%s: %s); training is complete. Re-run it with "
                  "`python -m pneumo_tf.ood --run_dir=%s`", type(e).__name__, e, cfg.run_dir)
        return f"failed: {type(e).__name__}: {e}"
    return "ok"


def _lung_guard_missing(cfg: TrainConfig, paths: rundir.RunPaths) -> bool:
    return cfg.fit_ood and not paths.lung_guard.is_file()


CALIBRATION = loop.AfterTraining("calibration", run_calibration, pending=_calibration_pending,
                                 redo=_calibration_missing)
OOD_FIT = loop.AfterTraining("ood", run_ood_fit)
LUNG_GUARD = loop.AfterTraining("lung_guard", run_lung_guard_fit, redo=_lung_guard_missing)
# In this order, on the finished model (chief only).
AFTER_TRAINING = (CALIBRATION, OOD_FIT)


def after_training(cfg: TrainConfig) -> tuple:
    """The after-training steps of ``cfg``'s task: calibration and the OOD fit for a
    classifier, the lung guard for a segmentation (``--task=lungs``)."""
    return AFTER_TRAINING if task_lib.get_task(cfg.task).classifier else (LUNG_GUARD,)


def _train_one(cfg: TrainConfig, setup: distribute.DistributionSetup | None,
               flags_text: str | None) -> dict:
    return loop.train(cfg, setup, flags_text, after_training=after_training(cfg))


def train(cfg: TrainConfig, setup: distribute.DistributionSetup | None = None,
          flags_text: str | None = None) -> dict:
    """Train (or resume, or report complete) the run or ensemble ``cfg.run_dir``.

    Args:
        cfg: the run's settings (``--ensemble_seeds``: one member per seed, then their
            ensemble, :func:`pneumo_tf.evaluation.ensemble.train_ensemble`).
        setup: resolved distribution; None resolves it from ``cfg``.
        flags_text: contents for ``flags.txt`` (a flagfile repeating the run).

    Returns:
        The summary dict (also ``summary.json``).

    Raises:
        As :func:`pneumo_tf.training.loop.train`.
    """
    if not cfg.member_seeds():
        return _train_one(cfg, setup, flags_text)
    cfg.validate()
    cfg.profile_range()
    done = resume.completed_run(cfg, rundir.RunPaths(cfg.run_dir), setup, flags_text,
                                AFTER_TRAINING)
    if done is not None:
        return done
    from pneumo_tf.evaluation import ensemble  # Keras models of finished runs: when needed

    return ensemble.train_ensemble(cfg, setup, flags_text, _train_one, after_training=(OOD_FIT,))
