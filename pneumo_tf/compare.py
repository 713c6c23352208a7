"""Compare evaluated runs side by side: the paper's Table I, generalised, with bootstrap CIs.

Usage::

    python -m pneumo_tf.compare --runs=R1,R2 --split=test --out=DIR [--data_dir=D]

Reads each run's ``eval/<split>/metrics.json``. A run without one is evaluated first when
``--data_dir`` is given (``pneumo_tf.evaluate``, which refuses data whose manifest differs from the
run's); without ``--data_dir`` such a run is an error naming the command that fixes it. Runs are
never re-evaluated silently: an existing ``metrics.json`` is used as is.

Writes ``DIR/comparison.md`` (markdown table, value [95 % CI]), ``DIR/comparison.json`` and
``DIR/comparison.png`` (grouped bars with CI error bars) of accuracy, ROC AUC, NORMAL recall,
PNEUMONIA recall and macro F1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pneumo_tf import atomic_files, cli, rundir

BATCH_SIZE = cli.batch_size_flag()
DATA_DIR = cli.data_dir_flag()
OUT = cli.out_flag()
SEED = cli.seed_flag()
SPLIT = cli.split_flag()

RUNS = cli.runs_flag()

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


def run_labels(run_dirs: list[str | os.PathLike]) -> list[str]:
    """Short unique names: the run dirs' base names, with parents added where they collide."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(Path(r)) for r in run_dirs]


def load_metrics(run_dir: str | os.PathLike, split: str, data_dir: str | os.PathLike | None,
                 batch_size: int = 64, seed: int = 0) -> dict:
    """``eval/<split>/metrics.json`` of a run, evaluating it first if needed and possible."""
    path = rundir.RunPaths(run_dir).eval_dir(split) / "metrics.json"
    if not path.is_file():
        if data_dir is None:
            raise rundir.RunDirError(
                f"{path} is missing: run `python -m pneumo_tf.evaluate --run_dir={run_dir} "
                f"--data_dir=... --split={split}` first, or pass --data_dir to compare")
        from pneumo_tf import evaluate

        return evaluate.evaluate_run(run_dir, data_dir, split, batch_size=batch_size, seed=seed)
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


def bar_chart_png(rows: list[dict], split: str) -> bytes:
    """Grouped bars (metric groups, one bar per run) with CI error bars, as PNG bytes."""
    from pneumo_tf import report  # selects the Agg backend

    plt = report.plt
    n_runs = len(rows)
    x = np.arange(len(BAR_COLUMNS))
    width = 0.8 / n_runs
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(BAR_COLUMNS), 4.8))
    for i, r in enumerate(rows):
        values = np.array([r[c]["value"] for c in BAR_COLUMNS])
        lo = np.array([r[c]["ci"][0] if r[c]["ci"] else r[c]["value"] for c in BAR_COLUMNS])
        hi = np.array([r[c]["ci"][1] if r[c]["ci"] else r[c]["value"] for c in BAR_COLUMNS])
        err = np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
        bars = ax.bar(x + (i - (n_runs - 1) / 2) * width, values, width, yerr=err, capsize=3,
                      label=r["run"])
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, 0.02, f"{v:.2f}", ha="center", va="bottom",
                    fontsize=7, rotation=90, color="white")
    ax.set_xticks(x, BAR_COLUMNS)
    ax.set(ylim=(0, 1.05), ylabel="value (95 % CI)", title=f"Runs compared on the {split} split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(n_runs, 4), fontsize=8)
    fig.tight_layout()
    return report.figure_png(fig)


def compare_runs(run_dirs: list[str | os.PathLike], split: str, out_dir: str | os.PathLike,
                 data_dir: str | os.PathLike | None = None, batch_size: int = 64,
                 seed: int = 0) -> dict:
    """Write ``comparison.{md,json,png}`` for ``run_dirs`` on ``split`` into ``out_dir``.

    Returns:
        ``{"split", "runs": [run dirs], "rows": comparison_rows(...)}``.
    """
    if len(run_dirs) < 1:
        raise ValueError("--runs needs at least one run directory (two to compare)")
    names = run_labels(run_dirs)
    all_metrics = [load_metrics(r, split, data_dir, batch_size, seed) for r in run_dirs]
    rows = comparison_rows(names, all_metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(
        f"# Comparison on the {split} split\n\n" + markdown_table(rows, split) + "\n\n"
        "![comparison](comparison.png)\n", encoding="utf-8")
    (out_dir / "comparison.png").write_bytes(bar_chart_png(rows, split))
    result = {"split": split, "runs": [str(r) for r in run_dirs], "rows": rows}
    atomic_files.write_json_atomic(out_dir / "comparison.json", result)
    return result


def main(argv):
    cli.check_args(argv, RUNS, OUT)
    compare_runs(RUNS.value, SPLIT.value, OUT.value, DATA_DIR.value, BATCH_SIZE.value, SEED.value)
    print((Path(OUT.value) / "comparison.md").read_text(encoding="utf-8"))


def run():
    cli.run_app(main, "pneumo_tf.compare")


if __name__ == "__main__":
    run()
