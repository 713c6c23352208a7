"""Evaluate a trained run on one split: predictions, metrics with CIs, report, TensorBoard.

Usage::

    python -m pneumo_tf.evaluate --run_dir=R --data_dir=D --split=test [--threshold=val_youden] \
        [--calibration=val|NAME] [--val_data_dir=V]

Writes ``R/eval/<name>/``, ``<name>`` being the evaluation's name
(:func:`pneumo_tf.core.rundir.evaluation_name`, also ``metrics.json``'s ``evaluation``):
``<split>``, ``<split>-<data dir name>`` for another data dir, ``-cal_<name>`` added at a site
calibration, ``@<method>`` added for a what-if threshold. It holds ``predictions.csv``,
``metrics.json``, ``report.md``, ``report.html`` (figures inline) and the PNG figures; the same
figures, the metrics table and the headline scalars go to TensorBoard under ``R/tb/eval``,
tagged ``<name>/<what>`` (``test/accuracy``, ``test-site_b/roc``), so evaluations of other data
sit beside the run's own. The threshold and the temperature come from ``R/calibration.json``
(fitted on validation, first if it is missing). Another ``--threshold`` method than the stored
one is a what-if: its threshold is chosen on the ``val`` split in memory, ``calibration.json``
keeps the run's operating point (the one export, predict and Grad-CAM use) and the evaluation
goes to its own folder, ``R/eval/<split>@<method>`` (``test@val_youden``), leaving the split's
own evaluation alone. The evaluated split never influences either.

``--calibration=NAME`` applies a site calibration instead (``R/calibrations/NAME.json``, from
``pneumo_tf.calibrate``); ``metrics.json`` names the calibration used (``calibration``). When
that calibration was fitted on the very split evaluated, its figures there are in-sample:
``calibration_in_sample`` is true, ``cross_validated`` holds the calibration's patient-grouped
cross-validated figures, and the report and the printed line give those instead.

``metrics.json`` also holds ``ood``: the fraction of the split the run's out-of-distribution
guard flags (feature score only; ``{"skipped": ...}`` without ``ood.json``), and for a
three-class run (``--task=subtype``) ``subtype``: the 3x3 confusion matrix at the operating
point (the binary threshold, then the larger of the two pneumonia probabilities), per-class
precision, recall, F1 and one-vs-rest AUC, macro F1 and bacterial vs viral among pneumonia
cases, with bootstrap CIs (:func:`pneumo_tf.evaluation.metrics.subtype_report`), over the images of known
subtype; the report gains both sections (docs/data_contracts.md).

Another site: when ``--data_dir`` is not the data the run was trained on (its manifest differs
from ``R/data_manifest.json``), ``metrics.json`` gains ``shift`` and the report a section comparing
the run's val split (of ``--val_data_dir``, default the run's own data dir: ``summary.json``
``config.data_dir``, else ``flags.txt``) with the evaluated split at the val operating point:
AUC with CIs and their difference, sensitivity and specificity, ECE, score histograms per class
and per-class image statistics (:mod:`pneumo_tf.evaluation.shift`).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from pneumo_tf import CLASS_NAMES
from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration
from pneumo_tf.explain import anatomy
from pneumo_tf.serving import ood
from pneumo_tf.evaluation import report
from pneumo_tf.core import rundir
from pneumo_tf.evaluation import scoring, shift
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.data import records

log = logging.getLogger(__name__)

def write_predictions_csv(path: str | os.PathLike, pred: dict, calibrated: np.ndarray,
                          threshold: float) -> None:
    """One row per image: path, patient, label, probability, calibrated probability, prediction;
    then ``ood_score`` (a run with an OOD guard) and ``subtype``, ``p_normal``,
    ``p_bacterial``, ``p_viral`` (the model's softmax) and ``predicted_subtype`` (0/1/2 at the
    operating point; a subtype run)."""
    from pneumo_tf.evaluation import calibration as calibration_lib

    extra = (["ood_score"] if "ood_score" in pred else []) + (
        ["subtype", "p_normal", "p_bacterial", "p_viral", "predicted_subtype"]
        if "class_logits" in pred else [])
    if "class_logits" in pred:
        class_probs = calibration_lib.softmax(pred["class_logits"])
        decided = pmetrics.subtype_decisions(pred["probability"], class_probs, threshold)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "probability", "calibrated_probability",
                    "prediction"] + extra)
        for i in range(pred["label"].size):
            p = float(pred["probability"][i])
            row = [pred["path"][i], pred["patient_id"][i], int(pred["label"][i]),
                   f"{p:.6f}", f"{float(calibrated[i]):.6f}",
                   int(pmetrics.decide_label(p, threshold))]
            if "ood_score" in pred:
                row.append(f"{float(pred['ood_score'][i]):.4f}")
            if "class_logits" in pred:
                row += [int(pred["subtype"][i])] + [f"{v:.6f}" for v in class_probs[i]] + [
                    int(decided[i])]
            w.writerow(row)


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                 threshold_method: str | None = None, batch_size: int = 64,
                 num_resamples: int = 2000, seed: int = 0,
                 calibration_name: str = rundir.VAL_CALIBRATION,
                 val_data_dir: str | os.PathLike | None = None,
                 lungs: anatomy.LungOptions | None = None) -> dict:
    """Evaluate ``run_dir``'s model on ``split`` of ``data_dir`` and write ``R/eval/<split>/``.

    Args:
        run_dir: finished run (or ensemble) directory.
        data_dir: data dir converted with the run's settings (checked against its manifest).
        split: split to evaluate (``val`` is allowed; the report says so).
        threshold_method: see :func:`pneumo_tf.evaluation.calibration.choose_threshold`; None = the
            run's stored operating point. Another method is computed on ``val`` in memory;
            ``R/calibration.json`` is never rewritten (see
            :func:`pneumo_tf.evaluation.calibration.operating_point`).
        batch_size: images per forward pass.
        num_resamples, seed: of the bootstrap CIs.
        calibration_name: ``val`` (``calibration.json``) or a site calibration's name.
        val_data_dir: the data dir of the run's val split (shift reference, missing
            calibration); None = the run's own (:func:`pneumo_tf.core.rundir.run_data_dir`).
        lungs: the lung evidence's sample size and ``--lung_model``
            (:class:`pneumo_tf.explain.anatomy.LungOptions`; None = its defaults: 64 images,
            the records' masks, else the adaptive box).

    Returns:
        The ``metrics.json`` dict.

    Raises:
        rundir.RunDirError: incompatible data, an unfinished run or a missing calibration.
        records.DataDirError: unusable data dir or split.
    """
    if threshold_method is not None:
        calibration.parse_threshold_method(threshold_method)
    run_dir = rundir.Run.open(run_dir)  # opened once: the layers below read this Run
    rundir.check_data_compatible(run_dir, data_dir)
    lungs = lungs or anatomy.LungOptions()
    # Opened first: a wrong --lung_model stops the run before the scoring pass.
    source = lungs.open(data_dir, split, batch_size) if lungs.num_images > 0 else None
    reference = _shift_reference(run_dir, data_dir, val_data_dir)
    val_dir = val_data_dir or rundir.own_data_dir(run_dir, data_dir)  # calibrates, if needed
    model = run_dir.model
    point = calibration.operating_point(run_dir, val_dir, threshold_method, model, batch_size,
                                        calibration_name)
    stats = ood.load_stats(run_dir)
    pred = scoring.predict_split(model, data_dir, split, batch_size,
                                 return_images=reference is not None or source is not None,
                                 progress_label=f"evaluate {split}", ood_stats=stats)
    labels, probs = pred["label"], pred["probability"].astype(np.float64)
    calibrated = calibration.apply_temperature(probs, point["temperature"])
    threshold_info = _threshold_info(point)
    shown = threshold_info["calibrated_value"]
    metrics = pmetrics.binary_report(labels, probs, point["threshold"], threshold_info,
                                     num_resamples, seed)
    metrics["split"] = split
    metrics["evaluation"] = _evaluation_name(run_dir, data_dir, split, calibration_name, point)
    metrics["temperature"] = point["temperature"]
    metrics["calibrated"] = {"brier": pmetrics.ranking_metrics(labels, calibrated)["brier"],
                             "ece": pmetrics.expected_calibration_error(labels, calibrated)}
    metrics.update(_calibration_entries(run_dir, calibration_name, data_dir, split))
    metrics["ood"] = ood_section(run_dir, pred, stats)
    metrics["lung_evidence"] = anatomy.split_evidence(run_dir, pred, point["threshold"], source,
                                                      lungs.num_images, seed, batch_size)
    figures = report.make_figures(labels, probs, calibrated, shown,
                                  metrics["confusion_matrix"],
                                  report.read_history(rundir.RunPaths(run_dir).history),
                                  split=split)
    if "class_logits" in pred:
        temperature = calibration.subtype_temperature(run_dir, val_dir, model, batch_size)
        _add_subtype(metrics, figures, pred, (point["threshold"], shown), temperature,
                     (num_resamples, seed))
    if reference is not None:
        val_point = calibration.operating_point(run_dir, val_dir, None, model, batch_size)
        metrics["shift"], shift_figures = _shift_section(
            run_dir, model, reference, pred, val_point, batch_size, (num_resamples, seed),
            explicit=val_data_dir is not None)
        metrics["shift"].get("evaluated", {}).update(data_dir=str(data_dir), split=split)
        figures.update(shift_figures)
    _write_outputs(run_dir, data_dir, metrics, figures, pred, calibrated)
    return metrics


def _evaluation_name(run: rundir.Run, data_dir, split: str, calibration_name: str,
                     point: dict) -> str:
    """The evaluation's name (:func:`pneumo_tf.core.rundir.evaluation_name`): a threshold other
    than the stored one (a what-if ``--threshold``) adds ``@<method>``."""
    what_if = None if point["from_calibration_json"] else calibration.method_label(
        point["method"])
    return rundir.evaluation_name(run, data_dir, split, calibration_name, what_if)


def ood_section(run_dir, pred: dict, stats) -> dict:
    """``metrics.json``'s ``ood``: how much of the evaluated split the run's OOD guard flags.

    The records keep the cropped, resized image only, so the score is the feature score alone:
    the guard's image checks (inverted, on its side) need the full film and run in ``predict``.
    A run without ``ood.json``: ``{"skipped": reason}``.
    """
    if stats is None:
        return {"skipped": f"the run has no {ood.OOD_JSON}; fit it with `python -m pneumo_tf.ood "
                           f"--run_dir={run_dir}`"}
    flagged = pred["ood_score"] > stats.threshold
    labels = pred["label"]
    return {"threshold": stats.threshold, "layer": stats.layer, "n": int(flagged.size),
            "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
            "flagged_fraction_by_class": {
                name: float(flagged[labels == c].mean()) if (labels == c).any() else None
                for c, name in enumerate(CLASS_NAMES)},
            "score_median": float(np.median(pred["ood_score"])),
            "checks": "feature score only (the image checks need the full film; predict runs "
                      "them)"}


def _threshold_info(point: dict) -> dict:
    """``metrics.json``'s ``threshold`` for an operating point. Decisions are taken on the raw
    probability (``value``); people read the same cut on the calibrated scale, predict's
    (``calibrated_value``): the report, the figures and TensorBoard show that one."""
    shown = float(calibration.apply_temperature(np.float64(point["threshold"]),
                                                point["temperature"]))
    return {"value": point["threshold"], "method": point["method"], "source": point["source"],
            "applies_to": "probability", "calibrated_value": shown}


def _add_subtype(metrics: dict, figures: dict, pred: dict, thresholds: tuple[float, float],
                 temperature: tuple[float, str], resampling: tuple[int, int]) -> None:
    """``metrics["subtype"]`` (:func:`subtype_section`) and its confusion-matrix figure;
    ``thresholds``: the binary threshold on the raw and on the calibrated probability."""
    metrics["subtype"] = subtype_section(pred, thresholds[0], temperature, resampling)
    if "confusion_matrix" in metrics["subtype"]:
        figures["subtype_confusion_matrix"] = report.figure_png(report.subtype_confusion_figure(
            metrics["subtype"]["confusion_matrix"], thresholds[1]))


def subtype_section(pred: dict, threshold: float, temperature: tuple[float, str],
                    resampling: tuple[int, int]) -> dict:
    """``metrics.json``'s ``subtype`` (:func:`pneumo_tf.evaluation.metrics.subtype_report`) plus the
    subtype temperature (fitted on val) and the NLL it gives on the evaluated split."""
    section = pmetrics.subtype_report(pred["subtype"], pred["probability"], pred["class_logits"],
                                      threshold, *resampling)
    if "skipped" in section:
        return section
    known = pred["subtype"] >= 0
    y, z = pred["subtype"][known], pred["class_logits"][known]
    t, source = temperature
    section["decision"] = ("NORMAL below the binary threshold on P(pneumonia); else the larger "
                           "of the BACTERIAL and VIRAL probabilities")
    section["threshold"] = float(threshold)
    section["temperature"] = {"value": t, "source": source,
                              "nll_before": calibration.softmax_nll(y, z),
                              "nll_after": calibration.softmax_nll(y, z, t)}
    return section


def _shift_reference(run_dir, data_dir, val_data_dir) -> str | None:
    """The data dir whose val split the shift report compares with; None when ``data_dir`` is
    the run's own data (no shift report) or the run's own data dir is unknown."""
    if rundir.is_run_data(run_dir, data_dir):
        return None
    reference = val_data_dir or rundir.run_data_dir(run_dir)
    if reference is None:
        log.warning("%s is not the data %s was trained on, but the run does not name its own "
                    "data dir: pass --val_data_dir=<the run's data dir> for a shift report",
                    data_dir, run_dir)
        return None
    return str(reference)


def _shift_section(run_dir, model, reference: str, pred: dict, val_point: dict,
                   batch_size: int, resampling: tuple[int, int], explicit: bool
                   ) -> tuple[dict, dict]:
    """``(metrics.json "shift" entry, shift figures)`` of the evaluated ``pred`` (with images)
    against the val split of ``reference``, at the val operating point.

    An unusable reference the user did not name (the run's own data dir, moved or deleted)
    gives ``{"skipped": reason}`` and a warning instead of an error.
    """
    try:
        rundir.check_data_compatible(run_dir, reference)
        ref = scoring.predict_split(model, reference, "val", batch_size, return_images=True,
                                    progress_label="evaluate val (shift reference)")
    except (records.DataDirError, rundir.RunDirError) as e:
        if explicit:
            raise
        log.warning("no shift report: the run's val split is unusable (%s); pass "
                    "--val_data_dir", e)
        return {"skipped": f"the run's val split is unusable ({e}); pass --val_data_dir"}, {}
    samples = []
    for sample in (ref, pred):
        samples.append({"label": sample["label"], "probability": sample["probability"],
                        "statistics": shift.image_statistics(sample.pop("image"))})
    result = shift.shift_report(samples[0], samples[1], val_point["threshold"],
                                val_point["temperature"], *resampling)
    result["reference"].update(data_dir=str(reference), split="val")
    result["calibration"] = rundir.VAL_CALIBRATION
    shown = float(calibration.apply_temperature(np.float64(val_point["threshold"]),
                                                val_point["temperature"]))
    return result, report.shift_figures(samples[0], samples[1], shown,
                                        val_point["temperature"])


def _calibration_entries(run_dir, name: str, data_dir, split: str) -> dict:
    """``metrics.json``'s ``calibration`` (the name used), ``calibration_in_sample`` and, for a
    site calibration fitted on this very split, its ``cross_validated`` figures."""
    entries = {"calibration": name, "calibration_in_sample": False}
    if name == rundir.VAL_CALIBRATION:
        return entries
    cal = rundir.read_named_calibration(run_dir, name)
    entries["calibration_fitted_on"] = {"data_dir": cal.get("data_dir"), "split": cal.get("split")}
    if calibration.fitted_on(cal, data_dir, split):
        log.warning("calibration %s was fitted on this very split (%s of %s): the figures at "
                    "its threshold are in-sample; its cross-validated figures are reported",
                    name, split, data_dir)
        entries["calibration_in_sample"] = True
        entries["cross_validated"] = cal.get("cross_validation")
    return entries


def _write_outputs(run_dir, data_dir, metrics: dict, figures: dict, pred: dict,
                   calibrated: np.ndarray) -> None:
    """``R/eval/<evaluation name>`` (predictions, metrics, figures, reports) and ``R/tb/eval``
    (tags ``<evaluation name>/...``)."""
    paths, split, name = rundir.RunPaths(run_dir), metrics["split"], metrics["evaluation"]
    out = paths.eval_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / rundir.PREDICTIONS_NAME, pred, calibrated, metrics["threshold"]["value"])
    atomic_files.write_json_atomic(out / rundir.METRICS_NAME, metrics)
    figure_files = report.save_figures(figures, out)
    fitted_on = metrics.get("calibration_fitted_on") or {}
    context = {"split": split, "run_dir": str(Path(run_dir)), "data_dir": str(Path(data_dir)),
               "temperature": metrics["temperature"],
               "calibration_fitted_on": f"split `{fitted_on.get('split')}` of "
                                        f"`{fitted_on.get('data_dir')}`"}
    report.write_markdown(out / rundir.REPORT_MD_NAME, metrics, figure_files, context)
    report.write_html(out / rundir.REPORT_HTML_NAME, metrics, figures, context)
    report.write_tensorboard(paths.tb_eval, figures, metrics, name)


def summary_line(metrics: dict) -> str:
    """The printed result: the split's figures, or a site calibration's cross-validated ones
    when it was fitted on this split; the AUC drop from val when there is a shift report."""
    def ci(entry: dict, key: str) -> str:
        lo_hi = (entry.get("ci95") or {}).get(key)
        return f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""

    line = f"{metrics['split']}: n={metrics['n']} calibration={metrics.get('calibration', 'val')} "
    cv = metrics.get("cross_validated") if metrics.get("calibration_in_sample") else None
    if cv:
        pooled = cv["pooled"]
        line += (f"(fitted on this split; {cv['folds']}-fold cross-validated by patient) "
                 f"accuracy={pooled['accuracy']:.4f}{ci(cv, 'accuracy')} "
                 f"sensitivity={pooled['sensitivity']:.4f}{ci(cv, 'sensitivity')} "
                 f"specificity={pooled['specificity']:.4f}{ci(cv, 'specificity')} "
                 f"AUC={pooled['roc_auc']:.4f}{ci(cv, 'roc_auc')}")
    else:
        line += (f"accuracy={metrics['accuracy']:.4f} sensitivity={metrics['recall']:.4f} "
                 f"specificity={metrics['specificity']:.4f} "
                 f"AUC={metrics['roc_auc']:.4f}{ci(metrics, 'roc_auc')}")
    sub = metrics.get("subtype") or {}
    if "macro_f1" in sub:
        bv = sub["bacterial_vs_viral"]
        line += f"; subtype macro F1={sub['macro_f1']:.4f}, bacterial vs viral AUC={bv['auc']:.4f}"
    lungs = metrics.get("lung_evidence") or {}
    if "all" in (lungs.get("groups") or {}) and "lift" in lungs["groups"]["all"]:
        overall = lungs["groups"]["all"]
        line += (f"; Grad-CAM lung lift={overall['lift']:.2f} "
                 f"pointing_lungs={overall['pointing_lungs']:.2f} ({lungs['lung_source']})")
    guard = metrics.get("ood") or {}
    if "flagged_fraction" in guard:
        line += f"; OOD flagged {guard['flagged_fraction']:.4f}"
    moved = metrics.get("shift") or {}
    if "difference" in moved:
        diff_ci = moved.get("roc_auc_difference_ci95")
        line += (f"; AUC vs val {moved['difference']['roc_auc']:+.4f}"
                 + (f" [{diff_ci[0]:+.4f}, {diff_ci[1]:+.4f}]" if diff_ci else ""))
    return line
