"""Compare evaluated runs side by side: the paper's Table I, generalised, with bootstrap CIs.

Usage::

    python -m pneumo_tf.compare --runs=R1,R2 --split=test --out=DIR [--data_dir=D] \
        [--allow_unpaired]

Reads each run's ``eval/<split>/metrics.json``. A run without one is evaluated first when
``--data_dir`` is given (``pneumo_tf.evaluate``, which refuses data whose manifest differs from the
run's); without ``--data_dir`` such a run is an error naming the command that fixes it. Runs are
never re-evaluated silently: an existing ``metrics.json`` is used as is.

Writes ``DIR/comparison.md`` (markdown table, value [95 % CI]), ``DIR/comparison.json`` and
``DIR/comparison.png`` (grouped bars with CI error bars) of accuracy, ROC AUC, NORMAL recall,
PNEUMONIA recall and macro F1.

Differences. Every run is also compared with the first (``--runs``' reference): the difference in
ROC AUC, accuracy, sensitivity and specificity (each run at its own operating threshold) with a
95 % CI. Runs evaluated on the same images (the same files with the same labels, matched by
path: before/after cropping arms of one source qualify) are compared **paired**: one bootstrap
draw of the images scores both runs, and DeLong's test gives a p-value for the AUC difference.
Runs evaluated on different images are refused unless ``allow_unpaired`` (``--allow_unpaired``):
their figures describe different films, so a difference mixes the runs with the data. Allowed,
they are compared **unpaired** (independent bootstraps), and the report says so. The figure's
second panel shows the differences with their CIs.

Rows are named by run: the run directories' names, leaving out the trailing folders every run
shares (``out/a/run`` and ``out/b/run`` are ``a`` and ``b``), with parents added where names
collide.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.evaluation import metrics as pmetrics

# What compare_runs writes into its --out folder.
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
COMPARISON_JSON = "comparison.json"

DIFF_TITLES = {"roc_auc": "ROC AUC", "accuracy": "accuracy", "sensitivity": "PNEUMONIA recall",
               "specificity": "NORMAL recall"}

# (column title, metrics.json value path, ci95 key)
COLUMNS = (
    ("accuracy", ("accuracy",), "accuracy"),
    ("ROC AUC", ("roc_auc",), "roc_auc"),
    ("NORMAL recall", ("recall_per_class", "NORMAL"), "specificity"),
    ("PNEUMONIA recall", ("recall_per_class", "PNEUMONIA"), "sensitivity"),
    ("macro F1", ("f1_macro",), "f1_macro"),
    ("average precision", ("average_precision",), "average_precision"),
)
BAR_COLUMNS = ("accuracy", "ROC AUC", "NORMAL recall", "PNEUMONIA recall", "macro F1")


class UnpairedRunsError(ValueError):
    """Runs evaluated on different images compared without ``--allow_unpaired``."""


def run_labels(run_dirs: list[str | os.PathLike]) -> list[str]:
    """Short unique names: the run dirs' names without the trailing folders all of them share
    (two or more runs: ``x/a/run``, ``x/b/run`` -> ``a``, ``b``), with parents added where they
    collide."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    while len(parts) > 1 and all(len(p) > 1 for p in parts) and len({p[-1] for p in parts}) == 1:
        parts = [p[:-1] for p in parts]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return ["/".join(p) for p in parts]


def load_metrics(run_dir: str | os.PathLike, split: str, data_dir: str | os.PathLike | None,
                 batch_size: int = 64, seed: int = 0) -> dict:
    """The run's ``metrics.json`` of ``split`` of ``data_dir`` (its own data when None:
    :func:`pneumo_tf.core.rundir.evaluation_dir`), evaluating it first if needed and possible."""
    path = rundir.evaluation_dir(run_dir, data_dir, split) / rundir.METRICS_NAME
    if not path.is_file():
        if data_dir is None:
            raise rundir.RunDirError(
                f"{path} is missing: run `python -m pneumo_tf.evaluate --run_dir={run_dir} "
                f"--data_dir=... --split={split}` first, or pass --data_dir to compare")
        from pneumo_tf.evaluation import evaluator

        return evaluator.evaluate_run(run_dir, data_dir, split, batch_size=batch_size, seed=seed)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise rundir.RunDirError(f"{path} is not valid JSON ({e}); "
                                 f"re-run pneumo_tf.evaluate") from e


def _value(metrics: dict, keys: tuple[str, ...]) -> float:
    v = metrics
    for k in keys:
        v = v[k]
    return float(v)


def comparison_rows(names: list[str], all_metrics: list[dict]) -> list[dict]:
    """One row per run: ``{"run", "n", "threshold", column: {"value", "ci": [lo, hi] | None}}``."""
    rows = []
    for name, m in zip(names, all_metrics):
        row = {"run": name, "n": m.get("n"), "threshold": m.get("threshold", {})}
        for title, keys, ci_key in COLUMNS:
            ci = (m.get("ci95") or {}).get(ci_key)
            row[title] = {"value": _value(m, keys), "ci": list(ci) if ci else None}
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], split: str) -> str:
    """The comparison as a markdown table: value [95 % CI] per metric and run."""
    titles = [t for t, _, _ in COLUMNS]
    lines = [f"Split `{split}`; 95 % CIs from the stratified bootstrap of each run's evaluation; "
             f"threshold chosen on each run's validation split.", "",
             "| run | n | threshold | " + " | ".join(titles) + " |",
             "|---|---|---|" + "---|" * len(titles)]
    for r in rows:
        cells = []
        for t in titles:
            v, ci = r[t]["value"], r[t]["ci"]
            cells.append(f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}")
        thr = r["threshold"]
        lines.append(f"| {r['run']} | {r['n']} | {thr.get('value', float('nan')):.3f} "
                     f"({thr.get('method', '?')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_predictions(run_dir: str | os.PathLike, split: str,
                     data_dir: str | os.PathLike | None = None) -> dict | None:
    """The ``predictions.csv`` beside :func:`load_metrics`'s file as arrays: ``path``
    (sorted), ``label``, ``probability`` and ``prediction`` (the run's decision at its own
    threshold); None when the run has no such file (an evaluation by an older version)."""
    path = rundir.evaluation_dir(run_dir, data_dir, split) / rundir.PREDICTIONS_NAME
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["path"])
    return {"path": np.array([r["path"] for r in rows], dtype=object),
            "label": np.array([int(r["label"]) for r in rows]),
            "probability": np.array([float(r["probability"]) for r in rows]),
            "prediction": np.array([int(r["prediction"]) for r in rows])}


def same_images(a: dict, b: dict) -> bool:
    """Whether two runs' predictions cover the same files with the same labels."""
    return (len(a["path"]) == len(b["path"]) and bool(np.all(a["path"] == b["path"]))
            and bool(np.all(a["label"] == b["label"])))


def differences(reference: dict, other: dict, num_resamples: int, seed: int) -> dict:
    """``other`` minus ``reference``: paired on the same images, else unpaired (see above)."""
    if same_images(reference, other):
        return pmetrics.paired_differences(
            reference["label"], reference["probability"], reference["prediction"],
            other["probability"], other["prediction"], num_resamples, seed)
    return pmetrics.unpaired_differences(
        (reference["label"], reference["probability"], reference["prediction"]),
        (other["label"], other["probability"], other["prediction"]), num_resamples, seed)


def differences_markdown(names: list[str], diffs: list[dict]) -> str:
    """The differences against the first run as a markdown table."""
    lines = [f"## Differences against {names[0]}", "",
             "Each run minus the reference, 95 % CI; paired: one bootstrap draw of the same "
             "images scores both runs (DeLong's test for the AUC); unpaired: the runs were "
             "evaluated on different images, each bootstrapped on its own.", "",
             "| run | comparison | " + " | ".join(DIFF_TITLES.values()) + " | DeLong p (AUC) |",
             "|---|---|" + "---|" * (len(DIFF_TITLES) + 1)]
    for name, d in zip(names[1:], diffs):
        cells = [f"{d[k]['difference']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]"
                 for k in DIFF_TITLES]
        p = f"{d['delong']['p_value']:.3g}" if "delong" in d else "n/a (unpaired)"
        kind = "paired" if d["paired"] else "unpaired (different images)"
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + f" | {p} |")
    return "\n".join(lines)


def comparison_figure(rows: list[dict], names: list[str], diffs: list[dict], split: str):
    """Grouped bars of every run (left) and the differences against the first (right)."""
    from pneumo_tf.evaluation import report  # selects the Agg backend

    fig, (ax, dx) = report.plt.subplots(
        1, 2, figsize=(11.5, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    _bars(ax, rows, split)
    _difference_panel(dx, names, diffs)
    fig.tight_layout()
    return fig


def _bars(ax, rows: list[dict], split: str) -> None:
    n_runs = len(rows)
    x = np.arange(len(BAR_COLUMNS))
    width = 0.8 / n_runs
    for i, r in enumerate(rows):
        values = np.array([r[c]["value"] for c in BAR_COLUMNS])
        lo = np.array([r[c]["ci"][0] if r[c]["ci"] else r[c]["value"] for c in BAR_COLUMNS])
        hi = np.array([r[c]["ci"][1] if r[c]["ci"] else r[c]["value"] for c in BAR_COLUMNS])
        err = np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
        bars = ax.bar(x + (i - (n_runs - 1) / 2) * width, values, width, yerr=err, capsize=3,
                      label=r["run"])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() / 2, f"{v:.2f}", ha="center",
                    va="center", fontsize=9, color="white", fontweight="bold")
    ax.set_xticks(x, BAR_COLUMNS, fontsize=9)
    n = rows[0]["n"] if rows else "?"
    ax.set(ylim=(0, 1.08), ylabel="value (95 % CI)",
           title=f"Runs on the {split} split (n = {n})")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(n_runs, 4), fontsize=9)


def _difference_panel(ax, names: list[str], diffs: list[dict]) -> None:
    keys = list(DIFF_TITLES)
    for j, (name, d) in enumerate(zip(names[1:], diffs)):
        ys = np.arange(len(keys)) + 0.15 * (j - (len(diffs) - 1) / 2)
        vals = np.array([d[k]["difference"] for k in keys])
        lo = np.array([d[k]["ci95"][0] for k in keys])
        hi = np.array([d[k]["ci95"][1] for k in keys])
        kind = "paired" if d["paired"] else "unpaired"
        ax.errorbar(vals, ys, xerr=[vals - lo, hi - vals], fmt="o", capsize=3,
                    label=f"{name} ({kind})")
    ax.axvline(0.0, color="gray", lw=1, ls="--")
    ax.set_yticks(np.arange(len(keys)), [DIFF_TITLES[k] for k in keys], fontsize=9)
    ax.invert_yaxis()
    ref = names[0] if names else "?"
    ax.set(xlabel=f"difference from {ref} (95 % CI)", title=f"Against {ref}")
    if diffs:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "one run: nothing to compare", ha="center", transform=ax.transAxes)


def _other_images(names: list[str], all_metrics: list[dict], preds: list[dict | None]
                  ) -> list[str]:
    """The runs after the first evaluated on other images than the first: other files or labels
    in ``predictions.csv``, or (an evaluation without one) another image count."""
    other = []
    for name, metrics, pred in zip(names[1:], all_metrics[1:], preds[1:]):
        if pred is not None and preds[0] is not None:
            if not same_images(preds[0], pred):
                other.append(name)
        elif metrics.get("n") != all_metrics[0].get("n"):
            other.append(name)
    return other


def compare_runs(run_dirs: list[str | os.PathLike], split: str, out_dir: str | os.PathLike,
                 data_dir: str | os.PathLike | None = None, batch_size: int = 64,
                 seed: int = 0, diff_resamples: int = 2000, allow_unpaired: bool = False
                 ) -> dict:
    """Write ``comparison.{md,json,png}`` for ``run_dirs`` on ``split`` into ``out_dir``.

    Each run directory (a path or a :class:`pneumo_tf.core.rundir.Run`) is opened once: its
    manifest, evaluation folder and (when it is evaluated first) model serve every step.

    Returns:
        ``{"split", "runs": [run dirs], "rows": comparison_rows(...), "differences": [one per
        run after the first, against the first]}``.

    Raises:
        UnpairedRunsError: runs evaluated on other images than the first, without
            ``allow_unpaired`` (the message names them and both fixes).
    """
    if len(run_dirs) < 1:
        raise ValueError("--runs needs at least one run directory (two to compare)")
    runs = [rundir.Run.open(r) for r in run_dirs]
    names = run_labels(runs)
    all_metrics = [load_metrics(run, split, data_dir, batch_size, seed) for run in runs]
    rows = comparison_rows(names, all_metrics)
    preds = [read_predictions(run, split, data_dir) for run in runs] if len(runs) > 1 else []
    other = _other_images(names, all_metrics, preds) if preds else []
    if other and not allow_unpaired:
        raise UnpairedRunsError(
            f"{', '.join(other)} evaluated on other images than {names[0]} (split {split}): "
            f"their figures describe different films. Pass --data_dir=D to evaluate every run "
            f"on the same data, or --allow_unpaired to compare them unpaired")
    missing = [n for n, p in zip(names, preds) if p is None]
    diffs = [] if missing else [differences(preds[0], p, diff_resamples, seed)
                                for p in preds[1:]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"# Comparison on the {split} split\n\n" + markdown_table(rows, split) + "\n\n"
    if diffs:
        text += differences_markdown(names, diffs) + "\n\n"
    elif missing:
        text += (f"No differences: {', '.join(missing)} lack eval/{split}/predictions.csv; "
                 f"re-run `python -m pneumo_tf.evaluate` for them.\n\n")
    from pneumo_tf.evaluation import report

    text += f"![comparison]({COMPARISON_PNG})\n"
    atomic_files.write_text_atomic(out_dir / COMPARISON_MD, text)
    atomic_files.write_bytes_atomic(out_dir / COMPARISON_PNG, report.figure_png(
        comparison_figure(rows, names, diffs, split)))
    result = {"split": split, "runs": [str(r) for r in run_dirs], "rows": rows,
              "differences": [{"run": n, **d} for n, d in zip(names[1:], diffs)]}
    atomic_files.write_json_atomic(out_dir / COMPARISON_JSON, result)
    return result
