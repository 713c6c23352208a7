"""Site calibration: re-fit temperature and threshold on a labelled sample of a new site.

Usage::

    python -m pneumo_tf.calibrate --run_dir=R --data_dir=SITE --split=test --name=NAME \
        [--threshold=val_youden] [--folds=5]

A model trained on one collection keeps its ranking on another better than its operating point
(docs/protocol.md, "Another hospital"). This app scores ``--split`` of the site's data dir
(converted with the run's image size and crop) and fits, on that sample only, the temperature
(:func:`pneumo_tf.evaluation.calibration.fit_temperature`) and the threshold (``--threshold``: the
``val_*`` methods of :func:`pneumo_tf.evaluation.calibration.choose_threshold`, applied to the sample). It
writes ``R/calibrations/NAME.json``; ``evaluate``, ``gradcam``, ``export`` and ``predict`` use it
with ``--calibration=NAME``. ``R/calibration.json`` (the val calibration) is never touched.

What to expect at the site, without fooling itself: the sample's patients are split into
stratified folds (:func:`patient_folds`: no patient in two folds); temperature and threshold are
fitted on all folds but one and applied to the held one, and the held-out decisions and
calibrated probabilities of every fold are pooled into accuracy, both recalls, AUC and ECE with
stratified bootstrap 95 % CIs (``cross_validation`` in the file). The fitted numbers themselves
(``in_sample``) are optimistic and only reported.

Sample size: fewer than :data:`MIN_PER_CLASS` images of either class are refused (a threshold
fitted on a dozen films moves by whole percentage points with one film); under
:data:`WARN_PER_CLASS` the file carries a warning. Folds: :data:`DEFAULT_FOLDS`, fewer when a
class has fewer patients than that, so that every fold can hold patients of both classes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

import pneumo_tf
from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration
from pneumo_tf.core import rundir
from pneumo_tf.evaluation import scoring
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.data import records

log = logging.getLogger(__name__)

MIN_PER_CLASS = 20
WARN_PER_CLASS = 50
DEFAULT_FOLDS = 5
# A site calibration exists to move the operating point to the site, so its default threshold
# is chosen on the site's own labels (Youden's J on the sample; the validation default,
# calibrated:0.5, would re-fit only the temperature and leave the cut where it was).
SITE_THRESHOLD_METHOD = "val_youden"


class SampleTooSmallError(ValueError):
    """The site's sample is too small to re-fit an operating point; the message names the class."""


def check_sample_size(class_counts: dict[str, int], where: str) -> list[str]:
    """Refuse fewer than :data:`MIN_PER_CLASS` images of a class; warnings under the warn size.

    Args:
        class_counts: ``{"NORMAL": n0, "PNEUMONIA": n1}``.
        where: the sample's description, for messages.

    Returns:
        Warning texts (empty when every class has at least :data:`WARN_PER_CLASS` images).

    Raises:
        SampleTooSmallError: naming the short class(es) and the minimum.
    """
    counts = {name: int(class_counts.get(name, 0)) for name in pneumo_tf.CLASS_NAMES}
    short = [f"{counts[name]} {name}" for name in pneumo_tf.CLASS_NAMES
             if counts[name] < MIN_PER_CLASS]
    if short:
        raise SampleTooSmallError(
            f"{where} has only {' and '.join(short)} images; a site calibration needs at least "
            f"{MIN_PER_CLASS} images of each class (NORMAL and PNEUMONIA). Label more films of "
            f"the short class and convert the sample again")
    return [f"{where} has {counts[name]} {name} images (fewer than {WARN_PER_CLASS}): the "
            f"threshold and the cross-validated figures are uncertain; see their CIs"
            for name in pneumo_tf.CLASS_NAMES if counts[name] < WARN_PER_CLASS]


def num_folds_for(labels, patient_ids, requested: int = DEFAULT_FOLDS) -> int:
    """``requested`` folds, fewer when a class has fewer patients than that.

    Raises:
        SampleTooSmallError: a class with fewer than two patients (nothing to hold out).
    """
    labels, patient_ids = np.asarray(labels), np.asarray(patient_ids)
    per_class = [len(np.unique(patient_ids[labels == c])) for c in (0, 1)]
    folds = min(int(requested), *per_class)
    if folds < 2:
        raise SampleTooSmallError(
            f"cross-validation by patient needs at least 2 patients of each class; the sample "
            f"has {per_class[0]} NORMAL and {per_class[1]} PNEUMONIA patients")
    return folds


def patient_folds(labels, patient_ids, num_folds: int, seed: int = 0) -> np.ndarray:
    """``[N]`` fold index per image: stratified by class, grouped by patient, seeded.

    Uses scikit-learn's ``StratifiedGroupKFold`` (shuffled): all images of a patient share a
    fold, and each fold's class mix is as close to the sample's as the patients allow.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    splitter = StratifiedGroupKFold(n_splits=int(num_folds), shuffle=True, random_state=seed)
    folds = np.full(labels.size, -1, np.int64)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(labels.size), labels,
                                                    np.asarray(patient_ids))):
        folds[held] = fold
    return folds


def _fold_fit(labels, probs, folds, fold: int, threshold_method: str) -> dict:
    """Temperature and threshold fitted on every fold but ``fold``."""
    train = folds != fold
    if np.unique(labels[train]).size < 2:
        raise SampleTooSmallError(
            f"fold {fold}: the other folds hold only one class, so no threshold can be fitted "
            f"without it; use fewer --folds")
    return calibration.calibrate_predictions(labels[train], probs[train], threshold_method)


def cross_validate(pred: dict, threshold_method: str, num_folds: int, seed: int = 0,
                   num_resamples: int = 2000) -> dict:
    """Patient-grouped k-fold estimate of the site calibration (the module docstring).

    Args:
        pred: ``{"label": [N], "probability": [N] raw, "patient_id": [N]}``.
        threshold_method: see :func:`pneumo_tf.evaluation.calibration.choose_threshold`.
        num_folds: folds (:func:`num_folds_for`).
        seed: of the folds and of the bootstrap.
        num_resamples: bootstrap resamples of the CIs.

    Returns:
        The ``cross_validation`` entry of ``R/calibrations/NAME.json``.
    """
    labels = np.asarray(pred["label"]).astype(np.int64)
    probs = np.asarray(pred["probability"], np.float64)
    patients = np.asarray(pred["patient_id"])
    folds = patient_folds(labels, patients, num_folds, seed)
    held_cal, held_pred, per_fold = np.zeros(labels.size), np.zeros(labels.size), []
    for fold in range(num_folds):
        fit, held = _fold_fit(labels, probs, folds, fold, threshold_method), folds == fold
        held_cal[held] = calibration.apply_temperature(probs[held], fit["temperature"])
        held_pred[held] = pmetrics.decide_label(probs[held], fit["threshold"])
        per_fold.append({"fold": fold, "n": int(held.sum()),
                         "patients": sorted(str(p) for p in np.unique(patients[held])),
                         "class_counts": _class_counts(labels[held]),
                         "temperature": fit["temperature"], "threshold": fit["threshold"]})
    at = pmetrics.threshold_metrics(labels, held_pred, 0.5)
    decisions_ci = pmetrics.bootstrap_ci(labels, held_pred, 0.5, num_resamples, seed)
    ci = {key: decisions_ci[key] for key in ("accuracy", "sensitivity", "specificity")}
    ci["roc_auc"] = pmetrics.bootstrap_ci(labels, probs, 0.5, num_resamples, seed)["roc_auc"]
    ci["ece"] = pmetrics.bootstrap_ece_ci(labels, held_cal, num_resamples, seed)
    ci.update(num_resamples=int(num_resamples), seed=int(seed), level=0.95)
    return {
        "folds": int(num_folds), "grouping": "patient_id", "stratified": True, "seed": int(seed),
        "threshold_method": str(threshold_method),
        "pooled": {"n": int(labels.size), "accuracy": at["accuracy"],
                   "sensitivity": at["recall"], "specificity": at["specificity"],
                   "roc_auc": pmetrics.ranking_metrics(labels, probs)["roc_auc"],
                   "ece": pmetrics.expected_calibration_error(labels, held_cal)},
        "ci95": ci, "per_fold": per_fold,
        "method": "each image is decided and temperature-scaled by the temperature and threshold "
                  "fitted on the other folds' patients; AUC is of the model's probability "
                  "(temperature scaling does not reorder)",
    }


def _class_counts(labels: np.ndarray) -> dict[str, int]:
    return {name: int(np.sum(labels == i)) for i, name in enumerate(pneumo_tf.CLASS_NAMES)}


def calibrate_site(run_dir: str | os.PathLike, data_dir: str | os.PathLike, name: str,
                   split: str = "test", threshold_method: str | None = None,
                   num_folds: int = DEFAULT_FOLDS, batch_size: int = 64,
                   num_resamples: int = 2000, seed: int = 0, model=None) -> dict:
    """Fit calibration ``name`` on ``split`` of a site's data dir; write ``R/calibrations/``.

    Args:
        run_dir: a finished run (or ensemble) directory, or its
            :class:`pneumo_tf.core.rundir.Run` (read once).
        data_dir: the site's sample, converted with the run's image size and crop.
        name: the calibration's name (not ``val``: that is ``calibration.json``).
        split: the labelled split of ``data_dir`` to fit on.
        threshold_method: see :func:`pneumo_tf.evaluation.calibration.choose_threshold`, fitted on the
            site's sample; None = :data:`SITE_THRESHOLD_METHOD`.
        num_folds: requested cross-validation folds (fewer when a class has fewer patients).
        batch_size: images per forward pass.
        num_resamples, seed: of the bootstrap CIs (``seed`` also shuffles the folds).
        model: an already loaded model, or None to load ``R/model.keras``.

    Returns:
        The dict written to ``R/calibrations/<name>.json``.

    Raises:
        SampleTooSmallError: fewer than :data:`MIN_PER_CLASS` images of a class.
        rundir.RunDirError, records.DataDirError: unusable run or data dir.
        ValueError: a bad name or threshold method.
    """
    method = threshold_method or SITE_THRESHOLD_METHOD
    run = rundir.Run.open(run_dir)
    target = _check_request(run, name, method, num_folds)
    manifest = rundir.check_data_compatible(run, data_dir)
    where = f"split {split!r} of {data_dir}"
    info = manifest["splits"].get(split)
    if info is None:
        raise records.DataDirError(f"split {split!r} is not in {data_dir} (it has: "
                                   f"{', '.join(sorted(manifest['splits']))}); pass --split")
    if "class_counts" in info:  # fail before loading the model
        check_sample_size(info["class_counts"], where)
    pred = scoring.predict_split(model if model is not None else run.model,
                                 data_dir, split, batch_size, progress_label=f"calibrate {split}")
    warnings = check_sample_size(_class_counts(pred["label"]), where)
    for text in warnings:
        log.warning("%s", text)
    folds = num_folds_for(pred["label"], pred["patient_id"], num_folds)
    fit = calibration.calibrate_predictions(pred["label"], pred["probability"], method)
    result = {
        "name": name, **{k: fit[k] for k in ("temperature", "threshold", "calibrated_threshold",
                                              "threshold_method", "threshold_applies_to")},
        "source": "site", "split": split, "n": int(pred["label"].size),
        "class_counts": _class_counts(pred["label"]),
        "patients": int(np.unique(pred["patient_id"]).size),
        "data_dir": str(Path(data_dir).resolve()),
        "manifest_sha256": calibration.manifest_sha256(data_dir),
        "source_checksum": (manifest.get("source") or {}).get("checksum"),
        "in_sample": fit["val"],
        "cross_validation": {"requested_folds": int(num_folds),
                             **cross_validate(pred, method, folds, seed, num_resamples)},
        "warnings": warnings, "run_dir": str(run.root.resolve()),
        "tool_version": pneumo_tf.__version__,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json_atomic(target, result)
    return result


def _check_request(run: rundir.Run, name: str, method: str, num_folds: int) -> Path:
    """The target file of calibration ``name``, after checking the arguments (no model yet)."""
    if name == rundir.VAL_CALIBRATION:
        raise ValueError(f"--name={name} is the run's own calibration (calibration.json, fitted "
                         f"on its val split by training); give the site a name, e.g. "
                         f"--name=site_b")
    calibration.parse_threshold_method(method)
    if num_folds < 2:
        raise ValueError(f"--folds={num_folds}: cross-validation needs at least 2 folds")
    rundir.read_run_manifest(run)  # a run directory at all
    return run.paths.calibration_file(name)
