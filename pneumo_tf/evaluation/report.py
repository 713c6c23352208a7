"""Figures and documents of the evaluation report (matplotlib Agg, markdown, HTML, TensorBoard).

Every figure function takes plain numpy inputs and returns a ``matplotlib.figure.Figure``;
:func:`save_figures` writes them as PNG, :func:`write_markdown` / :func:`write_html` assemble the
report, :func:`write_tensorboard` logs the same figures (as images) and the metrics table (as
markdown text).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from pneumo_tf import CLASS_NAMES, SUBTYPE_NAMES  # noqa: E402
from pneumo_tf.evaluation import metrics as pmetrics  # noqa: E402

# Training-curve panels: Keras history column stem -> title. Columns that are absent are skipped.
CURVE_METRICS = (("accuracy", "accuracy"), ("loss", "loss"), ("auc", "ROC AUC"),
                 ("recall", "recall (sensitivity)"))
# The report's section on metrics.json's lung_evidence (the first after the metrics table).
LUNG_EVIDENCE_TITLE = "Evidence in the lungs (Grad-CAM against the lungs)"


def _split_title(name: str, split: str, labels) -> str:
    return f"{name}: {split} split (n = {len(labels)})"


def _operating_point(labels, probs, threshold: float) -> dict[str, float]:
    """Sensitivity, 1 - specificity and precision of ``probs >= threshold``."""
    labels = np.asarray(labels)
    pred = pmetrics.decide_label(probs, threshold) == 1
    tp = float(np.sum(pred & (labels == 1)))
    fp = float(np.sum(pred & (labels == 0)))
    return {"tpr": tp / max(1, int(np.sum(labels == 1))),
            "fpr": fp / max(1, int(np.sum(labels == 0))),
            "precision": tp / (tp + fp) if tp + fp else 1.0}


def roc_figure(labels, probs, threshold: float | None = None, split: str = "evaluated"
               ) -> Figure:
    """ROC curve with the AUC in the legend, titled with the split and n, and the operating
    point (``probs >= threshold``) marked."""
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    auc = skm.roc_auc_score(labels, probs)
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot(fpr, tpr, lw=2, label=f"model (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="chance (AUC = 0.5)")
    if threshold is not None:
        op = _operating_point(labels, probs, threshold)
        ax.plot(op["fpr"], op["tpr"], "o", ms=9, mfc="none", mew=2, color="C3",
                label=f"threshold {threshold:.3f}: sens {op['tpr']:.2f}, spec "
                      f"{1 - op['fpr']:.2f}")
    ax.set(xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)",
           title=_split_title("ROC curve", split, labels), xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def pr_figure(labels, probs, threshold: float | None = None, split: str = "evaluated"
              ) -> Figure:
    """Precision-recall curve with the average precision in the legend, titled with the split
    and n, and the operating point marked."""
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    ap = skm.average_precision_score(labels, probs)
    prevalence = float(np.mean(labels))
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.step(recall, precision, where="post", lw=2, label=f"model (AP = {ap:.3f})")
    ax.axhline(prevalence, ls="--", color="gray", lw=1, label=f"chance (AP = {prevalence:.3f})")
    if threshold is not None:
        op = _operating_point(labels, probs, threshold)
        ax.plot(op["tpr"], op["precision"], "o", ms=9, mfc="none", mew=2, color="C3",
                label=f"threshold {threshold:.3f}: recall {op['tpr']:.2f}, precision "
                      f"{op['precision']:.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision",
           title=_split_title("Precision-recall curve", split, labels), xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _draw_confusion(ax, cm: np.ndarray, names, fontsize: int = 10) -> None:
    """A confusion matrix (rows: true class, columns: predicted) with counts and row %."""
    ax.imshow(cm, cmap="Blues")
    rows = cm.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, f"{cm[i, j]}\n{100 * cm[i, j] / rows[i, 0]:.1f} %", ha="center",
                    va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(names)), [f"pred {c}" for c in names], fontsize=fontsize)
    ax.set_yticks(range(len(names)), [f"true {c}" for c in names], fontsize=fontsize)


def confusion_figure(confusion: dict, threshold: float) -> Figure:
    """Confusion matrix (counts and row percentages) at ``threshold``."""
    cm = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    _draw_confusion(ax, cm, CLASS_NAMES)
    ax.set_title(f"Confusion matrix (threshold {threshold:.3f})")
    fig.tight_layout()
    return fig


def reliability_figure(labels, probs, calibrated, num_bins: int = pmetrics.ECE_BINS,
                       split: str = "evaluated") -> Figure:
    """Reliability diagram before and after temperature scaling.

    Marker area follows each bin's image count (a sparse bin's zig-zag is then seen to weigh
    little, as it does in the ECE) and the busier curve's counts are written beside its
    markers; the legend (with each curve's ECE) sits below the axes, over no data.
    """
    fig, ax = plt.subplots(figsize=(5.0, 5.6))
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    n = max(1, len(labels))
    for p, name, color in ((probs, "before", "C0"), (calibrated, "after temperature", "C1")):
        curve = pmetrics.reliability_curve(labels, p, num_bins)
        ece = pmetrics.expected_calibration_error(labels, p, num_bins)
        used = curve["count"] > 0
        x, y, count = curve["confidence"][used], curve["frequency"][used], curve["count"][used]
        ax.plot(x, y, "-", color=color, lw=1, alpha=0.6)
        ax.scatter(x, y, s=20 + 400 * count / n, color=color, alpha=0.7, edgecolors="k",
                   linewidths=0.5, label=f"{name} (ECE = {ece:.3f})")
        if name == "before":
            for xi, yi, c in zip(x, y, count):
                ax.annotate(str(int(c)), (xi, yi), textcoords="offset points", xytext=(6, -10),
                            fontsize=7, color=color)
    ax.set(xlabel="predicted probability of PNEUMONIA", ylabel="observed fraction of PNEUMONIA",
           title=_split_title("Reliability diagram", split, labels) + "\n(marker area: images "
           "in the bin; numbers: count before)", xlim=(0, 1), ylim=(0, 1.02))
    ax.title.set_fontsize(9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def histogram_figure(labels, probs, threshold: float) -> Figure:
    """Histograms of the PNEUMONIA probability per true class, with the threshold."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    bins = np.linspace(0, 1, 26)
    for label, name in enumerate(CLASS_NAMES):
        ax.hist(np.asarray(probs)[labels == label], bins=bins, alpha=0.6,
                label=f"true {name} (n={int((labels == label).sum())})")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="calibrated probability of PNEUMONIA", ylabel="images",
           title="Probability by true class")
    ax.legend()
    fig.tight_layout()
    return fig


def shift_scores_figure(reference: dict, evaluated: dict, threshold: float,
                        temperature: float = 1.0) -> Figure:
    """Per true class, the probability histograms of the run's val split and the evaluated
    split overlaid (densities, so splits of different sizes compare), with the val threshold:
    on the calibrated scale (``temperature`` applied to the samples' raw probabilities,
    ``threshold`` given on that scale)."""
    from pneumo_tf.evaluation.calibration import apply_temperature

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=False)
    bins = np.linspace(0, 1, 26)
    for ax, (label, name) in zip(axes, enumerate(CLASS_NAMES)):
        for sample, title in ((reference, "val (reference)"), (evaluated, "evaluated")):
            probs = np.asarray(sample["probability"])[np.asarray(sample["label"]) == label]
            probs = apply_temperature(probs.astype(np.float64), temperature)
            if probs.size:
                ax.hist(probs, bins=bins, density=True, alpha=0.55,
                        label=f"{title} (n={probs.size})")
        ax.axvline(threshold, color="black", ls="--", lw=1, label=f"val threshold {threshold:.3f}")
        ax.set(xlabel="calibrated probability of PNEUMONIA", ylabel="density",
               title=f"true {name}")
        ax.legend(fontsize=8)
    fig.suptitle("Scores: the run's val split vs the evaluated split")
    fig.tight_layout()
    return fig


def shift_statistics_figure(reference: dict, evaluated: dict) -> Figure:
    """Box plots of each image statistic per class, val split beside the evaluated split."""
    from pneumo_tf.evaluation import shift

    keys = list(shift.STATISTICS)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        data, names = [], []
        for label, name in enumerate(CLASS_NAMES):
            for sample, tag in ((reference, "val"), (evaluated, "eval")):
                chosen = np.asarray(sample["label"]) == label
                data.append(np.asarray(sample["statistics"][key])[chosen])
                names.append(f"{name[:4]}\n{tag}")
        kept = [(d, n) for d, n in zip(data, names) if d.size]
        ax.boxplot([d for d, _ in kept], showfliers=False)
        ax.set_xticks(range(1, len(kept) + 1), [n for _, n in kept], fontsize=8)
        ax.set(title=key.replace("_", " "), ylabel=shift.STATISTICS[key][0])
    fig.suptitle("Image statistics per class: val split vs evaluated split")
    fig.tight_layout()
    return fig


def shift_figures(reference: dict, evaluated: dict, threshold: float,
                  temperature: float = 1.0) -> dict[str, bytes]:
    """``{"shift_scores": PNG, "shift_image_statistics": PNG}`` for :func:`make_figures`' dict.

    Args:
        reference, evaluated: ``{"label", "probability", "statistics"}`` of the run's val split
            and of the evaluated split (:func:`pneumo_tf.evaluation.shift.image_statistics`).
        threshold, temperature: the val threshold on the calibrated probability, and the
            temperature that makes it from the raw one.
    """
    return {"shift_scores": figure_png(shift_scores_figure(reference, evaluated, threshold,
                                                           temperature)),
            "shift_image_statistics": figure_png(shift_statistics_figure(reference, evaluated))}


def read_history(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``history.csv`` as ``{column: [epochs] float}`` (empty dict when the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        try:
            out[key] = np.array([float(r[key]) if r[key] not in ("", None) else np.nan
                                 for r in rows])
        except ValueError:
            continue  # a non-numeric column (e.g. a timestamp) has no curve
    return out


def training_curves_figure(history: dict[str, np.ndarray]) -> Figure | None:
    """Train vs val curves of accuracy, loss, AUC and recall; None when there is no history."""
    panels = [(k, t) for k, t in CURVE_METRICS if k in history or f"val_{k}" in history]
    if not panels:
        return None
    epochs = history.get("epoch", np.arange(len(next(iter(history.values())))))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.3), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for col, name in ((key, "train"), (f"val_{key}", "val")):
            if col in history:
                ax.plot(epochs, history[col], marker=".", label=name)
        ax.set(title=title, xlabel="epoch", ylabel=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.legend()
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig`` (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def make_figures(labels, probs, calibrated, threshold: float, confusion: dict,
                 history: dict | None, split: str = "evaluated") -> dict[str, bytes]:
    """All report figures as ``{name: PNG bytes}`` (name = file stem, e.g. ``roc``).

    ``threshold`` is the operating threshold on the calibrated scale (``calibrated``, what predict
    shows): the figures read the calibrated probabilities, ROC and PR included (a temperature
    keeps the order, so the curves and the operating point are those of the raw ones). ROC/PR
    need both classes; they are skipped for a single-class split.
    """
    labels = np.asarray(labels)
    figs = {}
    if labels.min() != labels.max():
        figs["roc"] = roc_figure(labels, calibrated, threshold, split)
        figs["pr"] = pr_figure(labels, calibrated, threshold, split)
    figs["confusion_matrix"] = confusion_figure(confusion, threshold)
    figs["reliability"] = reliability_figure(labels, probs, calibrated, split=split)
    figs["probability_histogram"] = histogram_figure(labels, calibrated, threshold)
    curves = training_curves_figure(history or {})
    if curves is not None:
        figs["training_curves"] = curves
    return {name: figure_png(fig) for name, fig in figs.items()}


def save_figures(figures: dict[str, bytes], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``{name}.png`` files; returns ``{name: path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in figures.items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(png)
    return paths


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def _ci(metrics: dict, key: str) -> str:
    ci = (metrics.get("ci95") or {}).get(key)
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def metrics_table_markdown(metrics: dict) -> str:
    """The headline metrics as a markdown table (value, 95 % CI, value at threshold 0.5)."""
    at05 = metrics.get("at_0.5", {})
    rows = [
        ("accuracy", metrics["accuracy"], _ci(metrics, "accuracy"), at05.get("accuracy")),
        ("sensitivity (PNEUMONIA recall)", metrics["recall"], _ci(metrics, "sensitivity"),
         at05.get("recall")),
        ("specificity (NORMAL recall)", metrics["specificity"], _ci(metrics, "specificity"),
         at05.get("specificity")),
        ("precision", metrics["precision"], "", at05.get("precision")),
        ("F1 NORMAL", metrics["f1_per_class"]["NORMAL"], "",
         at05.get("f1_per_class", {}).get("NORMAL")),
        ("F1 PNEUMONIA", metrics["f1_per_class"]["PNEUMONIA"], "",
         at05.get("f1_per_class", {}).get("PNEUMONIA")),
        ("macro F1", metrics["f1_macro"], _ci(metrics, "f1_macro"), at05.get("f1_macro")),
        ("ROC AUC", metrics["roc_auc"], _ci(metrics, "roc_auc"), None),
        ("average precision", metrics["average_precision"], _ci(metrics, "average_precision"),
         None),
        ("Brier score", metrics["brier"], "", None),
        (f"ECE ({pmetrics.ECE_BINS} bins)", metrics["ece"], "", None),
    ]
    if "calibrated" in metrics:
        rows += [("Brier score, temperature-scaled", metrics["calibrated"]["brier"], "", None),
                 ("ECE, temperature-scaled", metrics["calibrated"]["ece"], "", None)]
    thr = metrics["threshold"]
    shown = thr.get("calibrated_value", thr["value"])  # evaluations before it was recorded: raw
    lines = [f"| metric | at threshold {shown:.4f} | 95 % CI | at 0.5 |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(v)} | {ci} | {_fmt(v05) if v05 is not None else ''} |"
              for name, v, ci, v05 in rows]
    cm = metrics["confusion_matrix"]
    lines += ["", f"Confusion matrix at the threshold: TN {cm['tn']}, FP {cm['fp']}, "
                  f"FN {cm['fn']}, TP {cm['tp']}."]
    return "\n".join(lines)


def _with_ci(value, ci) -> str:
    return _fmt(value) + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def shift_markdown(shift: dict) -> str:
    """The shift section's tables: metrics on both splits, then per-class image statistics."""
    ref, ev, diff = shift["reference"], shift["evaluated"], shift["difference"]
    rows = (("ROC AUC", "roc_auc"), ("sensitivity at the val threshold", "sensitivity"),
            ("specificity at the val threshold", "specificity"), ("ECE", "ece"),
            ("ECE, val temperature", "ece_calibrated"))
    from pneumo_tf.evaluation.calibration import apply_temperature

    shown = float(apply_temperature(np.float64(shift["threshold"]), shift["temperature"]))
    lines = [f"Scored at the run's val operating point (threshold {shown:.4f} on the calibrated "
             f"probability, temperature {shift['temperature']:.3f}); val: "
             f"{ref['n']} images, evaluated: {ev['n']} images. 95 % CIs: stratified bootstrap, "
             f"{shift['num_resamples']} resamples.", "",
             "| metric | val (reference) | evaluated split | difference |", "|---|---|---|---|"]
    for title, key in rows:
        diff_ci = shift.get("roc_auc_difference_ci95") if key == "roc_auc" else None
        lines.append(f"| {title} | {_with_ci(ref[key], (ref.get('ci95') or {}).get(key))} | "
                     f"{_with_ci(ev[key], (ev.get('ci95') or {}).get(key))} | "
                     f"{_with_ci(diff[key], diff_ci)} |")
    lines += ["", "| class | image statistic | val mean (sd) | evaluated mean (sd) | difference |",
              "|---|---|---|---|---|"]
    for name, stats in shift["image_statistics"].items():
        for key, entry in stats.items():
            a, b = entry["reference"], entry["evaluated"]
            lines.append(f"| {name} | {key.replace('_', ' ')} | {_fmt(a['mean'])} "
                         f"({_fmt(a['std'])}) | {_fmt(b['mean'])} ({_fmt(b['std'])}) | "
                         f"{_fmt(entry['difference'])} |")
    return "\n".join(lines)


def cross_validated_markdown(cross_validated: dict) -> str:
    """The cross-validated figures of a site calibration as a markdown table."""
    pooled = cross_validated["pooled"]
    intro = (f"{cross_validated['folds']}-fold cross-validation grouped by patient on this "
             f"sample ({pooled['n']} images): each image decided by the threshold and "
             f"temperature fitted on the other folds.")
    rows = [(key.replace("_", " "), _fmt(pooled[key]), _ci(cross_validated, key))
            for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")]
    return "\n".join([intro, ""] + markdown_rows(("metric", "cross-validated", "95 % CI"), rows))


def markdown_rows(header: tuple[str, ...], rows) -> list[str]:
    """A markdown table's lines: the header, the separator, one line per row of cells."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def subtype_confusion_figure(matrix: list[list[int]], threshold: float) -> Figure:
    """The three-class confusion matrix (rows: true NORMAL/BACTERIAL/VIRAL, columns: predicted)
    with counts and row percentages."""
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    _draw_confusion(ax, np.asarray(matrix), SUBTYPE_NAMES, fontsize=8)
    ax.set_title(f"Subtypes (binary threshold {threshold:.3f}, then the larger)", fontsize=9)
    fig.tight_layout()
    return fig


def subtype_markdown(section: dict) -> str:
    """The ``subtype`` section of ``metrics.json`` as markdown tables."""
    ci = section["ci95"]
    intro = (f"{section['n']} images of known subtype ({section['unknown']} unknown left out): "
             f"{section['decision']}. AUCs one-vs-rest on the model's softmax; 95 % CIs: "
             f"bootstrap stratified by subtype, {ci['num_resamples']} resamples.")
    rows = [(name, section[name]["n"], *(_with_ci(section[name][k], ci[name].get(k))
                                         for k in ("precision", "recall", "f1", "auc")))
            for name in SUBTYPE_NAMES]
    lines = [intro, ""] + markdown_rows(("class", "n", "precision", "recall", "F1", "AUC"), rows)
    bv = section["bacterial_vs_viral"]
    bv_ci = bv.get("ci95") or {}
    temperature = section.get("temperature") or {}
    lines += ["", f"macro F1 {_with_ci(section['macro_f1'], ci['macro_f1'])}; bacterial vs "
                  f"viral among {bv['n']} pneumonia cases: AUC {_with_ci(bv['auc'], bv_ci.get('auc'))}"
                  f", accuracy {_with_ci(bv['accuracy'], bv_ci.get('accuracy'))}."]
    if temperature:
        lines.append(f"Subtype temperature {temperature['value']:.3f} ({temperature['source']}): "
                     f"NLL {temperature['nll_before']:.4f} -> {temperature['nll_after']:.4f} on "
                     f"this split.")
    matrix = section["confusion_matrix"]
    lines += ["", "| true \\ predicted | " + " | ".join(SUBTYPE_NAMES) + " |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(SUBTYPE_NAMES, matrix)]
    return "\n".join(lines)


def ood_markdown(section: dict) -> str:
    """The ``ood`` section of ``metrics.json`` as one paragraph."""
    if "skipped" in section:
        return f"Not computed: {section['skipped']}"
    by_class = ", ".join(f"{k} {_fmt(v)}" for k, v in section["flagged_fraction_by_class"].items())
    return (f"The run's out-of-distribution guard flags {section['flagged']} of {section['n']} "
            f"images ({_fmt(section['flagged_fraction'])}; by class: {by_class}) at threshold "
            f"{section['threshold']:.2f} on the `{section['layer']}` features; "
            f"{section['checks']}.")


def lung_evidence_markdown(section: dict) -> str:
    """``metrics.json``'s ``lung_evidence`` as a paragraph and a table per TP/FP/FN/TN group.

    It leads with ``lift`` (the CAM mass inside the lungs over a flat map's) and
    ``pointing_lungs``, says where the lungs came from and repeats any warning.
    """
    if "skipped" in section:
        return f"Not computed: {section['skipped']}"
    groups = section["groups"]
    overall = groups["all"]
    lead = (f"**lift {_fmt(overall.get('lift'))}** (1.0 = a flat map), **pointing_lungs "
            f"{_fmt(overall.get('pointing_lungs'))}**: Grad-CAM (layer `{section['layer']}`, "
            f"explaining PNEUMONIA) of {section['num_images']} images drawn evenly across the "
            f"groups from {section['drawn_from']} measurable ones, against the lungs from "
            f"`{section['lung_source']}`: {section['lung_source_meaning']}"
            + (f", `{section['lung_model']}`" if section.get("lung_model") else "") + ".")
    rows = [(g, stats["n"], _fmt(stats.get("lift")), _fmt(stats.get("pointing_lungs")),
             _fmt(stats.get("lung_share")), _fmt(stats.get("lung_fraction")), stats["empty_cams"])
            for g, stats in groups.items()]
    lines = [lead, ""] + markdown_rows(("group", "n", "lift", "pointing_lungs", "lung_share",
                                        "lung_fraction", "empty CAMs"), rows)
    lines += ["", f"{section['definition']}. Images without a lung mask: "
                  f"{section['skipped_no_mask']}."]
    secondary = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}"
                          for k, v in (section.get("secondary") or {}).items())
    if secondary:
        lines += ["", f"Secondary (the older, coarser measure): {secondary}."]
    lines += ["", *[f"**warning: {w}**" for w in section.get("warnings") or []]]
    return "\n".join(lines).rstrip() + "\n"


def _section_tag(title: str) -> str:
    """The TensorBoard text tag of a report section."""
    for word, tag in (("Shift", "shift"), ("Subtype", "subtype"), ("distribution", "ood"),
                      ("lungs", "lung_evidence")):
        if word in title:
            return tag
    return "cross_validated"


def _sections(metrics: dict) -> list[tuple[str, str]]:
    """``(title, markdown)`` of the optional sections: the lung evidence first, then the
    cross-validated figures, the shift, the subtypes (a subtype run) and the OOD guard."""
    out = []
    if metrics.get("lung_evidence"):
        out.append((LUNG_EVIDENCE_TITLE, lung_evidence_markdown(metrics["lung_evidence"])))
    if metrics.get("calibration_in_sample") and metrics.get("cross_validated"):
        out.append((f"Cross-validated figures of calibration `{metrics['calibration']}` (quote "
                    f"these)", cross_validated_markdown(metrics["cross_validated"])))
    shift = metrics.get("shift") or {}
    if "reference" in shift:
        out.append(("Shift from the run's val split", shift_markdown(shift)))
    elif "skipped" in shift:
        out.append(("Shift from the run's val split", f"Not computed: {shift['skipped']}"))
    subtype = metrics.get("subtype") or {}
    if subtype:
        out.append(("Subtypes: NORMAL, BACTERIAL, VIRAL", subtype_markdown(subtype)
                    if "skipped" not in subtype else f"Not computed: {subtype['skipped']}"))
    if metrics.get("ood"):
        out.append(("Out of distribution", ood_markdown(metrics["ood"])))
    return out


def _header(metrics: dict, context: dict) -> list[str]:
    thr = metrics["threshold"]
    shown = thr.get("calibrated_value", thr["value"])  # evaluations before it was recorded: raw
    counts = metrics.get("class_counts", {})
    ci = metrics.get("ci95") or {}
    lines = [
        f"- **split evaluated: `{context['split']}`** ({metrics['n']} images: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")",
        f"- run: `{context['run_dir']}`; data: `{context['data_dir']}`",
    ]
    name = metrics.get("calibration", "val")
    if name == "val":
        where = ("this same split, so the figures at it are optimistic"
                 if context["split"] == "val" else "never on the evaluated split")
        lines.append(f"- threshold {shown:.4f} on the calibrated probability (predict's "
                     f"scale) chosen by `{thr['method']}` on `{thr['source']}` ({where}); "
                     f"temperature "
                     f"{context.get('temperature', 1.0):.3f} fitted on `val`")
    else:
        lines.append(f"- calibration `{name}`: threshold {shown:.4f} on the calibrated "
                     f"probability chosen by "
                     f"`{thr['method']}` and temperature {context.get('temperature', 1.0):.3f} "
                     f"fitted on {context.get('calibration_fitted_on', 'a site sample')}")
    if metrics.get("calibration_in_sample"):
        lines.append(f"- **note: calibration `{name}` was fitted on this very split: the "
                     f"figures at its threshold are in-sample and optimistic; expect the "
                     f"cross-validated figures instead**")
    if ci:
        lines.append(f"- 95 % CIs: stratified percentile bootstrap, {ci.get('num_resamples')} "
                     f"resamples, seed {ci.get('seed')}")
    overall = ((metrics.get("lung_evidence") or {}).get("groups") or {}).get("all") or {}
    if "lift" in overall:
        lungs = metrics["lung_evidence"]
        lines.append(f"- **Grad-CAM evidence in the lungs: lift {overall['lift']:.2f} (1.0 = a "
                     f"flat map), pointing_lungs {overall['pointing_lungs']:.2f}** on "
                     f"{overall['n']} images, lungs from `{lungs['lung_source']}` (section "
                     f"\"{LUNG_EVIDENCE_TITLE}\")")
    return lines


def report_markdown(metrics: dict, context: dict) -> str:
    """The report's text as markdown, figures aside: title, header, metrics table, sections."""
    lines = [f"# Evaluation report: {context['split']} split", ""] + _header(metrics, context)
    lines += ["", metrics_table_markdown(metrics), ""]
    for title, text in _sections(metrics):
        lines += [f"## {title}", "", text, ""]
    return "\n".join(lines)


def write_markdown(path: str | os.PathLike, metrics: dict, figure_files: dict[str, Path],
                   context: dict) -> None:
    """``report.md``: :func:`report_markdown`, then the figures linked as sibling PNG files."""
    lines = [report_markdown(metrics, context)]
    for name, fpath in figure_files.items():
        lines += [f"## {name.replace('_', ' ')}", "", f"![{name}]({Path(fpath).name})", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


def markdown_to_html(text: str) -> str:
    """Markdown (tables, bold, code spans) as HTML, by the ``markdown`` library; raw HTML in the
    text (``--data_dir=<the site's data dir>`` in a message) is shown as text, not run."""
    import markdown

    md = markdown.Markdown(extensions=["tables"], output_format="html")
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md.convert(text)


def write_html(path: str | os.PathLike, metrics: dict, figures: dict[str, bytes],
               context: dict) -> None:
    """``report.html``: :func:`report_markdown` rendered, self-contained (figures inline as
    base64 PNG)."""
    body = markdown_to_html(report_markdown(metrics, context))
    imgs = "".join(
        f"<h2>{html.escape(name.replace('_', ' '))}</h2><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'/>"
        for name, png in figures.items())
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation: "
           f"{html.escape(context['split'])}</title><style>body{{font-family:sans-serif;"
           f"max-width:1100px;margin:auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}"
           f"table{{border-collapse:collapse}}img{{max-width:100%}}</style></head><body>"
           f"{body}{imgs}</body></html>")
    Path(path).write_text(doc, encoding="utf-8")


def write_tensorboard(log_dir: str | os.PathLike, figures: dict[str, bytes], metrics: dict,
                      evaluation: str, step: int = 0) -> None:
    """Log every figure as an image summary ``<evaluation>/<figure>``, the tables as text and
    the headline metrics as scalars, all under the evaluation's name (``test-site_b/accuracy``;
    :func:`pneumo_tf.core.rundir.evaluation_name`), so one data dir's evaluation never hides
    another's in ``R/tb/eval``."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default(step=step):
        for name, png in figures.items():
            image = tf.io.decode_png(png, channels=4)[tf.newaxis]
            tf.summary.image(f"{evaluation}/{name}", image)
        tf.summary.text(f"{evaluation}/metrics", metrics_table_markdown(metrics))
        for title, text in _sections(metrics):
            tf.summary.text(f"{evaluation}/{_section_tag(title)}", text)
        scalars = {key: metrics.get(key) for key in (
            "accuracy", "recall", "specificity", "f1_macro", "roc_auc", "average_precision",
            "brier", "ece")}
        shift = metrics.get("shift") or {}
        scalars.update({f"shift_{key}_difference": value
                        for key, value in (shift.get("difference") or {}).items()})
        lungs = metrics.get("lung_evidence") or {}
        for group, stats in (lungs.get("groups") or {}).items():
            scalars.update({f"lung_evidence/{group}/{key}": stats.get(key) for key in (
                "lift", "pointing_lungs", "lung_share", "lung_fraction")})
        for key, value in scalars.items():
            if isinstance(value, float) and np.isfinite(value):
                tf.summary.scalar(f"{evaluation}/{key}", value)
    writer.flush()
    writer.close()
