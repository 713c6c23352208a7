"""Temperature scaling and the operating threshold, both fitted on validation only.

``R/calibration.json`` (written by :func:`calibrate_run`; the training app calls it at the end of
every run, ``pneumo_tf.evaluate``/``pneumo_tf.gradcam`` only when it is missing)::

    {"temperature": 1.7, "threshold": 0.62, "calibrated_threshold": 0.57,
     "threshold_method": "val_youden", "source": "val", "threshold_applies_to": "probability",
     "n_val": 834, "val": {"nll_before": .., "nll_after": .., "ece_before": .., "ece_after": ..,
     "sensitivity": .., "specificity": ..}}

It holds the run's operating point, which export, predict and Grad-CAM use: evaluating with
another ``--threshold`` method computes that threshold on val in memory
(:func:`operating_point`) and never rewrites the file.

A subtype run (``--task=subtype``) adds ``"subtype": {"temperature": 1.3, "n_val": .., "nll_before":
.., "nll_after": ..}``: one temperature on its three-way softmax logits, fitted on the val images of
known subtype (:func:`subtype_calibration`). It never changes the subtype decision (the larger
of the two pneumonia logits stays larger); it makes the class probabilities honest.

``threshold_applies_to`` says which quantity ``threshold`` was chosen on: the model's raw
probability (what :func:`calibrate_predictions` writes) or the calibrated probability.
:func:`raw_threshold` and :func:`calibrated_threshold` are the one place that turns it into a
cut on either scale; ``calibrated_threshold`` is the same cut on the calibrated probability,
``sigmoid(logit(threshold) / T)`` (files written before it existed get it computed).
Temperature scaling is monotone, so it never changes which side of the threshold an image falls
on (up to float rounding at the threshold itself); it only makes the probabilities honest.
Calibrated probability: ``sigmoid(logit(p) / T)`` (:func:`apply_temperature`, numpy or
TensorFlow).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

# sklearn (half a second to import) is imported inside the functions that use it, so
# the commands that import this module for their flags start without it.

import pneumo_tf
from pneumo_tf.core import atomic_files, cli
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.core import rundir
from pneumo_tf.data import records

log = logging.getLogger(__name__)

THRESHOLD_METHODS_HELP = (
    "calibrated:<cut on the calibrated probability, e.g. 0.5> | val_youden | "
    "val_sensitivity:<target, e.g. 0.95> | val_prevalence:<a site's prevalence, e.g. 0.5> | "
    "<fixed value on the raw probability, e.g. 0.5>")


def threshold_option():
    """The ``--threshold`` flag field of the commands that choose a threshold (evaluate,
    calibrate; :func:`pneumo_tf.core.cli.option`)."""
    return cli.option(
        None, f"Operating threshold method: {THRESHOLD_METHODS_HELP}. evaluate: chosen on the "
        "val split, default the run's stored operating point (another method never rewrites "
        "calibration.json and is written to eval/<split>@<method>); calibrate: chosen on the "
        "site's sample, default val_youden.")


# The operating point every finished run gets (the training app calls calibrate_run with it).
# Measured on another collection than the training one (BUILD.md, "Threshold methods on another
# collection"): the cuts fitted to validation's labels (Youden, a sensitivity target) sit at the
# low edge of a validation split that saturates (AUC 0.99+: a wide plateau of equally good cuts)
# and call a third of another hospital's healthy children ill; 0.5 on the calibrated probability
# does better; the Bayes cut for a site of unknown (even) prevalence held up best: NORMAL recall
# 0.78-0.93 with PNEUMONIA recall 0.89-0.97 over the six recipes measured.
DEFAULT_THRESHOLD_METHOD = "val_prevalence:0.5"
THRESHOLD_APPLIES_TO = ("probability", "calibrated_probability")
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before taking logits (float32 sigmoid)


def prob_to_logit(probs) -> np.ndarray:
    """``log(p / (1 - p))`` in float64, with ``p`` clipped away from 0 and 1."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs, temperature: float):
    """Calibrated probabilities ``sigmoid(logit(p) / T)``, ``p`` clipped away from 0 and 1.

    The one temperature scaling of the project, on the host and in exported graphs.

    Args:
        probs: probabilities, any shape: numpy arrays, numbers or lists, or a TensorFlow tensor
            (also a symbolic one inside a ``tf.function``).
        temperature: T > 0.

    Returns:
        float64 numpy values for numpy input; a tensor of ``probs``' dtype for a tensor.
    """
    tf = sys.modules.get("tensorflow")  # a tensor implies TensorFlow is imported already
    if tf is None or not tf.is_tensor(probs):
        return 0.5 * (1.0 + np.tanh(0.5 * prob_to_logit(probs) / float(temperature)))
    p = tf.clip_by_value(probs, _EPS, 1.0 - _EPS)
    return tf.sigmoid((tf.math.log(p) - tf.math.log1p(-p)) / float(temperature))


def _nll(labels: np.ndarray, logits: np.ndarray) -> float:
    # Mean binary cross-entropy from logits, stable for large |logit|.
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def _temperature_root(grad, min_t: float, max_t: float) -> float:
    """The ``T`` where ``grad(log(1 / T))`` (increasing) crosses zero, clamped to
    ``[min_t, max_t]``; bisection on ``log(1 / T)``."""
    lo, hi = np.log(1.0 / max_t), np.log(1.0 / min_t)
    if grad(lo) >= 0.0:
        return float(max_t)
    if grad(hi) <= 0.0:
        return float(min_t)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if grad(mid) < 0.0 else (lo, mid)
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def fit_temperature(labels, logits, min_t: float = 1e-2, max_t: float = 1e2) -> float:
    """The temperature ``T`` minimising the NLL of ``sigmoid(logits / T)``.

    The NLL is convex in ``a = 1/T``; its derivative ``mean((sigmoid(a z) - y) z)`` is increasing,
    so its root is found by bisection on ``log a`` (robust, no tuning). Perfectly separable data
    push ``T`` to ``min_t`` (a warning-free clamp: the val set cannot tell how sharp to be).

    Args:
        labels: ``[N]`` 0/1.
        logits: ``[N]`` float logits (see :func:`prob_to_logit`).

    Returns:
        T in ``[min_t, max_t]``.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if y.size == 0:
        raise ValueError("cannot fit a temperature on zero images")

    def grad(log_a: float) -> float:
        a = np.exp(log_a)
        sigmoid = 0.5 * (1.0 + np.tanh(0.5 * a * z))  # overflow-free logistic
        return float(np.mean((sigmoid - y) * z))

    return _temperature_root(grad, min_t, max_t)


# ---------------------------------------------------------------------------------------------
# The subtype head: one temperature on the three-way softmax logits


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``[N, K]`` float64 ``softmax(logits / T)`` (stable for large logits)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def softmax_nll(labels, logits, temperature: float = 1.0) -> float:
    """Mean negative log likelihood of class ``labels`` under ``softmax(logits / T)``."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    z = np.asarray(logits, np.float64) / float(temperature)
    top = z.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(y.size), y]))


def fit_softmax_temperature(labels, logits, min_t: float = 1e-2, max_t: float = 1e2) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (``[N, K]`` logits).

    As :func:`fit_temperature`: the NLL is convex in ``a = 1/T`` and its derivative
    ``mean(sum_k softmax(a z)_k z_k - z_y)`` increases, so bisection on ``log a`` finds it.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    z = np.asarray(logits, np.float64)
    if y.size == 0:
        raise ValueError("cannot fit a temperature on zero images")
    z_true = z[np.arange(y.size), y]

    def grad(log_a: float) -> float:
        return float(np.mean((softmax(z, 1.0 / np.exp(log_a)) * z).sum(axis=-1) - z_true))

    return _temperature_root(grad, min_t, max_t)


def subtype_calibration(subtypes, class_logits) -> dict | None:
    """The subtype temperature fitted on (validation) images of known subtype.

    Args:
        subtypes: ``[N]`` 0 NORMAL, 1 BACTERIAL, 2 VIRAL, -1 unknown (skipped).
        class_logits: ``[N, 3]`` the ``class_logits`` layer's outputs.

    Returns:
        ``calibration.json``'s ``subtype`` entry: ``{"temperature", "n_val", "nll_before",
        "nll_after"}``; None when no image has a known subtype.
    """
    y = np.asarray(subtypes).astype(np.int64).reshape(-1)
    known = y >= 0
    if not known.any():
        return None
    y, z = y[known], np.asarray(class_logits, np.float64)[known]
    temperature = fit_softmax_temperature(y, z)
    return {"temperature": temperature, "n_val": int(y.size), "nll_before": softmax_nll(y, z),
            "nll_after": softmax_nll(y, z, temperature)}


def subtype_temperature(run_dir, data_dir, model, batch_size: int = 64) -> tuple[float, str]:
    """``(T, where it comes from)``: ``calibration.json``'s ``subtype`` temperature, or one
    fitted on the ``val`` split in memory (a run calibrated before the entry existed; the file
    is not rewritten), or 1.0 when val has no image of known subtype. ``run_dir``: a path or
    a :class:`pneumo_tf.core.rundir.Run`."""
    run = rundir.Run.open(run_dir)
    stored = (run.calibration() or {}).get("subtype") or {}
    if "temperature" in stored:
        return float(stored["temperature"]), run.paths.calibration.name
    val = _predict_val(run, data_dir, model, batch_size)
    fitted = subtype_calibration(val["subtype"], val["class_logits"])
    if fitted is None:
        return 1.0, "none: no val image of known subtype"
    return fitted["temperature"], "fitted on val (in memory)"


def parse_threshold_method(method: str) -> tuple[str, float | None]:
    """``("val_youden", None)``, ``("val_sensitivity", 0.95)``, ``("val_prevalence", 0.5)``,
    ``("calibrated", 0.5)`` or ``("fixed", 0.5)``.

    Raises:
        ValueError: naming ``--threshold`` and the accepted forms.
    """
    method = str(method).strip()
    if method == "val_youden":
        return "val_youden", None
    m = re.fullmatch(r"(val_sensitivity|val_prevalence|calibrated):([0-9.]+)", method)
    if m:
        kind, value = m[1], float(m[2])
        if not 0.0 < value < 1.0 and not (kind == "val_sensitivity" and value == 1.0):
            raise ValueError(f"--threshold={method}: the {kind.split('_')[-1]} value must be "
                             f"in (0, 1)")
        return kind, value
    try:
        value = float(method)
    except ValueError:
        raise ValueError(f"--threshold={method!r} is not understood; use "
                         f"{THRESHOLD_METHODS_HELP}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--threshold={method}: a fixed threshold must be in [0, 1]")
    return "fixed", value


def method_label(method: str) -> str:
    """A threshold method in one spelling (``0.50`` -> ``0.5``, ``val_sensitivity:0.950`` ->
    ``val_sensitivity:0.95``): the ``@<method>`` of a what-if evaluation's name
    (:func:`pneumo_tf.core.rundir.evaluation_name`).

    Raises:
        ValueError: as :func:`parse_threshold_method`.
    """
    kind, value = parse_threshold_method(method)
    if value is None:
        return kind
    return f"{value:g}" if kind == "fixed" else f"{kind}:{value:g}"


def choose_threshold(labels, probs, method: str = DEFAULT_THRESHOLD_METHOD,
                     temperature: float | None = None) -> float:
    """The operating threshold on the raw ``probs``, chosen on (validation) ``labels``.

    - ``calibrated:c``: the cut ``c`` on the calibrated probability ``sigmoid(logit(p) / T)``,
      mapped back to the raw one (``c = 0.5`` stays 0.5: temperature keeps logit 0 in place);
      needs ``temperature``, else fits it on ``labels``.
    - ``val_youden``: maximises sensitivity + specificity - 1.
    - ``val_sensitivity:t``: the highest threshold whose sensitivity is at least ``t`` (best
      specificity under that constraint).
    - ``val_prevalence:q``: the Bayes decision for a site whose prevalence is ``q``: the
      temperature-calibrated probability (calibrated on validation, at its prevalence ``v``) has
      its prior odds moved from ``v`` to ``q`` and is cut at 0.5, i.e. the cut
      ``odds(v) / (odds(v) + odds(q))`` on the calibrated probability (``q = 0.5``: the
      validation prevalence itself); needs ``temperature``, else fits it.
    - a number: that fixed threshold on the raw probability.

    The data-driven cuts lie midway between two neighbouring distinct validation scores, so they
    do not sit exactly on an image's score.

    Returns:
        Threshold in [0, 1]; images with ``prob >= threshold`` are PNEUMONIA.
    """
    from sklearn import metrics as skm

    kind, value = parse_threshold_method(method)
    if kind == "fixed":
        return float(value)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if kind == "calibrated":
        if temperature is None:
            temperature = fit_temperature(labels, prob_to_logit(probs))
        return float(apply_temperature(np.float64(value), 1.0 / temperature))
    if labels.min() == labels.max():
        raise ValueError(f"threshold method {method!r} needs both classes in the validation "
                         f"split; it has only {pneumo_tf.CLASS_NAMES[labels[0]]}")
    if kind == "val_prevalence":
        if temperature is None:
            temperature = fit_temperature(labels, prob_to_logit(probs))
        odds_val = np.mean(labels) / (1.0 - np.mean(labels))
        cut = odds_val / (odds_val + value / (1.0 - value))
        return float(apply_temperature(np.float64(cut), 1.0 / temperature))
    fpr, tpr, thr = skm.roc_curve(labels, probs, drop_intermediate=False)
    # thr[0] is +inf (nothing positive); candidate k predicts positive for probs >= thr[k].
    if kind == "val_youden":
        k = 1 + int(np.argmax((tpr - fpr)[1:]))
    else:
        k = int(np.nonzero(tpr >= value - 1e-12)[0][0])
        k = max(k, 1)
    upper = float(thr[k])
    lower = float(thr[k + 1]) if k + 1 < thr.size else 0.0
    return float(np.clip(0.5 * (upper + lower), 0.0, 1.0))


def calibrate_predictions(labels, probs,
                          threshold_method: str = DEFAULT_THRESHOLD_METHOD) -> dict:
    """Fit temperature and threshold on validation predictions (no files).

    Returns:
        The ``calibration.json`` content without run/data provenance.
    """
    labels, probs = pmetrics._check(labels, probs)  # noqa: SLF001 -- same module family
    logits = prob_to_logit(probs)
    temperature = fit_temperature(labels, logits)
    threshold = choose_threshold(labels, probs, threshold_method, temperature)
    calibrated = apply_temperature(probs, temperature)
    at = pmetrics.threshold_metrics(labels, probs, threshold)
    return {
        "temperature": temperature,
        "threshold": threshold,
        "calibrated_threshold": float(apply_temperature(np.float64(threshold), temperature)),
        "threshold_method": str(threshold_method),
        "threshold_applies_to": "probability",
        "source": "val",
        "n_val": int(labels.size),
        "val": {"nll_before": _nll(labels, logits), "nll_after": _nll(labels, logits / temperature),
                "ece_before": pmetrics.expected_calibration_error(labels, probs),
                "ece_after": pmetrics.expected_calibration_error(labels, calibrated),
                "sensitivity": at["recall"], "specificity": at["specificity"]},
    }


def calibrate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                  threshold_method: str = DEFAULT_THRESHOLD_METHOD, model=None,
                  batch_size: int = 64) -> dict:
    """Fit temperature and threshold on the ``val`` split and write ``R/calibration.json``.

    Only the validation split is read: the test split cannot influence the threshold.

    Args:
        run_dir: run directory (``model.keras`` and ``data_manifest.json``), or its
            :class:`pneumo_tf.core.rundir.Run`.
        data_dir: the data dir the run was trained on (must contain a ``val`` split).
        threshold_method: see :func:`choose_threshold`.
        model: an already loaded model to use instead of the Run's; None: the Run's model
            (the training loop's and the ensemble's :class:`~pneumo_tf.core.rundir.Run` hold
            the model they have just saved; a path loads ``R/model.keras``).
        batch_size: images per forward pass.

    Returns:
        The dict written to ``calibration.json``.

    Raises:
        rundir.RunDirError: data dir incompatible with the run.
        records.DataDirError: no usable ``val`` split.
    """
    parse_threshold_method(threshold_method)  # fail before predicting anything
    run = rundir.Run.open(run_dir)
    pred = _predict_val(run, data_dir, model, batch_size)
    result = calibrate_predictions(pred["label"], pred["probability"], threshold_method)
    subtype = (subtype_calibration(pred["subtype"], pred["class_logits"])
               if "class_logits" in pred else None)
    if subtype is not None:
        result["subtype"] = subtype
    result.update(data_dir=str(Path(data_dir).resolve()), tool_version=pneumo_tf.__version__)
    atomic_files.write_json_atomic(run.paths.calibration, result)
    return result


def _predict_val(run: rundir.Run, data_dir, model, batch_size: int) -> dict:
    """:func:`pneumo_tf.evaluation.scoring.predict_split` of ``val``, refusing a data dir without one."""
    from pneumo_tf.evaluation import scoring

    manifest = rundir.check_data_compatible(run, data_dir)
    if "val" not in manifest["splits"]:
        raise records.DataDirError(
            f"{Path(data_dir) / records.MANIFEST_NAME} has no 'val' split; calibration and the "
            f"threshold are fitted on validation only. Convert with a validation split "
            f"(tools/make_tfrecords --val_fraction=0.2, the default)")
    return scoring.predict_split(run.model if model is None else model, data_dir, "val",
                                 batch_size)


def _threshold_applies_to(cal: dict) -> str:
    applies_to = cal.get("threshold_applies_to", "probability")
    if applies_to not in THRESHOLD_APPLIES_TO:
        raise ValueError(f"calibration.json: threshold_applies_to={applies_to!r}, expected one "
                         f"of {THRESHOLD_APPLIES_TO}; re-calibrate the run")
    return applies_to


def raw_threshold(cal: dict) -> float:
    """The operating threshold of a ``calibration.json`` dict, expressed on the raw probability.

    A threshold chosen on the calibrated probability ``c`` maps back through the inverse
    temperature scaling, ``sigmoid(T * logit(c))``; one chosen on the raw probability is returned
    as is. Images with ``raw probability >= raw_threshold(cal)`` are PNEUMONIA for evaluation and
    Grad-CAM grouping.

    Raises:
        ValueError: unknown ``threshold_applies_to`` (naming the accepted values).
    """
    threshold = float(cal["threshold"])
    if _threshold_applies_to(cal) == "probability":
        return threshold
    return float(apply_temperature(np.float64(threshold), 1.0 / float(cal["temperature"])))


def calibrated_threshold(cal: dict) -> float:
    """The operating threshold of a ``calibration.json`` dict on the calibrated probability.

    ``sigmoid(logit(threshold) / T)`` for a threshold chosen on the raw probability (computed
    with :func:`apply_temperature`, so an image whose raw probability equals the threshold gets
    exactly this calibrated probability); a threshold chosen on the calibrated probability is
    returned as is. The stored ``calibrated_threshold`` key is never trusted over this.

    Raises:
        ValueError: unknown ``threshold_applies_to`` (naming the accepted values).
    """
    threshold = float(cal["threshold"])
    if _threshold_applies_to(cal) == "calibrated_probability":
        return threshold
    return float(apply_temperature(np.float64(threshold), float(cal["temperature"])))


def ensure_calibration(run_dir: str | os.PathLike, data_dir: str | os.PathLike, model=None,
                       batch_size: int = 64) -> dict:
    """``R/calibration.json``; fitted on ``val`` with :data:`DEFAULT_THRESHOLD_METHOD` if missing.

    An existing file is never rewritten: it is the run's operating point. ``run_dir``: a path
    or a :class:`pneumo_tf.core.rundir.Run`.
    """
    run = rundir.Run.open(run_dir)
    cal = run.calibration()
    if cal is not None:
        return cal
    log.info("%s is missing; fitting temperature and the %s threshold on val",
             run.paths.calibration, DEFAULT_THRESHOLD_METHOD)
    return calibrate_run(run, data_dir, DEFAULT_THRESHOLD_METHOD, model, batch_size)


def operating_point(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    threshold_method: str | None = None, model=None,
                    batch_size: int = 64, calibration_name: str = rundir.VAL_CALIBRATION) -> dict:
    """Temperature and raw-probability threshold to apply, never fitted on the evaluated data.

    ``calibration_name="val"`` (the default): the stored operating point (``R/calibration.json``,
    fitted first if missing) when ``threshold_method`` is None or the stored method; otherwise
    that method's threshold is chosen on the ``val`` split in memory, and ``calibration.json``
    is left unchanged. Another name: ``R/calibrations/<name>.json`` as stored (fitted on a
    site's sample by ``pneumo_tf.calibrate``); another ``threshold_method`` is refused, since
    its threshold can only be re-fitted on that sample.

    Args:
        run_dir: run directory, or its :class:`pneumo_tf.core.rundir.Run` (read once).
        data_dir: the run's data dir (its ``val`` split is read when a threshold is computed).
        threshold_method: see :func:`choose_threshold`; None = the stored one.
        model: an already loaded model, or None to load ``R/model.keras`` when needed.
        batch_size: images per forward pass.
        calibration_name: ``val`` or the name of a site calibration.

    Returns:
        ``{"threshold": float (on the raw probability), "temperature": float,
        "method": str, "source": str ("val" or the site calibration's), "calibration": name,
        "from_calibration_json": bool (the stored threshold)}``.

    Raises:
        rundir.RunDirError: a named calibration the run does not have.
        ValueError: a bad ``threshold_method``, or another method with a named calibration.
    """
    if threshold_method is not None:
        parse_threshold_method(threshold_method)  # fail before predicting anything
    run = rundir.Run.open(run_dir)
    if calibration_name != rundir.VAL_CALIBRATION:
        return _named_point(run, calibration_name, threshold_method)
    cal = ensure_calibration(run, data_dir, model, batch_size)
    point = {"temperature": float(cal["temperature"]), "source": "val",
             "calibration": rundir.VAL_CALIBRATION}
    stored = cal.get("threshold_method")
    if threshold_method is None or _same_method(threshold_method, stored):
        return {**point, "threshold": raw_threshold(cal), "method": str(stored),
                "from_calibration_json": True}
    kind, value = parse_threshold_method(threshold_method)
    if kind == "fixed":
        threshold = float(value)
    else:
        val = _predict_val(run, data_dir, model, batch_size)
        threshold = choose_threshold(val["label"], val["probability"], threshold_method)
    log.info("threshold %s = %.4f chosen on val (calibration.json keeps %s)",
                 threshold_method, threshold, stored)
    return {**point, "threshold": threshold, "method": str(threshold_method),
            "from_calibration_json": False}


def _named_point(run: rundir.Run, name: str, threshold_method: str | None) -> dict:
    """:func:`operating_point` of the site calibration ``name``, as stored."""
    cal = run.calibration(name)
    stored = cal.get("threshold_method")
    if threshold_method is not None and not _same_method(threshold_method, stored):
        raise ValueError(
            f"--threshold={threshold_method} with --calibration={name}: that calibration's "
            f"threshold ({stored}) was fitted on its site's sample, the only data that can "
            f"re-fit it. Drop --threshold, or re-fit with `python -m pneumo_tf.calibrate "
            f"--run_dir={run} --data_dir=<site data dir> --name={name} "
            f"--threshold={threshold_method}`")
    return {"temperature": float(cal["temperature"]), "threshold": raw_threshold(cal),
            "method": str(stored), "source": str(cal.get("source", name)), "calibration": name,
            "from_calibration_json": True}


def manifest_sha256(data_dir: str | os.PathLike) -> str:
    """SHA-256 of a data dir's ``manifest.json`` bytes: which conversion a calibration saw."""
    path = Path(data_dir) / records.MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise records.DataDirError(f"cannot read {path} ({e.strerror or e}); is {data_dir} a "
                                   f"converter output?") from e


def fitted_on(cal: dict, data_dir: str | os.PathLike, split: str) -> bool:
    """Whether calibration ``cal`` was fitted on ``split`` of ``data_dir``: its recorded split
    matches and so does its data dir (resolved path, or the manifest's SHA-256)."""
    if cal.get("split", "val" if cal.get("source") == "val" else None) != split:
        return False
    if cal.get("data_dir") and Path(cal["data_dir"]).resolve() == Path(data_dir).resolve():
        return True
    stored = cal.get("manifest_sha256")
    return stored is not None and stored == manifest_sha256(data_dir)


def _same_method(a: str, b: str | None) -> bool:
    # "0.5" and "0.50" are the same fixed threshold.
    try:
        return b is not None and parse_threshold_method(a) == parse_threshold_method(b)
    except ValueError:
        return False
