"""Evaluate a lung segmentation run (``--task=lungs``) on one split: Dice and IoU with CIs.

``python -m pneumo_tf.evaluate --run_dir=LUNGS_RUN --data_dir=D --split=S`` comes here for a
lungs run. It scores the films of the split that carry a lung mask (converter ``--masks``) and
writes ``R/eval/<split>/`` (``<split>-<data dir name>`` for another data dir):

- ``metrics.json``: ``task`` (``lungs``), ``split``, ``n``, ``dice``, ``iou`` (means over films
  of the mask cut at 0.5), ``ci95`` (percentile bootstrap over films), ``threshold``,
  ``lung_fraction`` (mean true and predicted lung share of the image), ``worst`` (the five films
  of lowest Dice, by path);
- ``predictions.csv``: one row per film (path, patient, label, dice, iou, true and predicted lung
  fraction);
- ``report.md``, ``contours.png`` (films with the true lungs in green and the predicted ones in
  red, the worst first) and the same figures and scalars in TensorBoard (``R/tb/eval``).
"""

from __future__ import annotations

import csv

import numpy as np

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.data import pipeline, records
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.evaluation import report, scoring
from pneumo_tf.explain import cam
from pneumo_tf.modeling import lungs as lungs_lib

# Films shown in contours.png (the lowest Dice first, then in file order).
CONTOUR_TILES = 16


def predict_masks(model, data_dir, split: str, batch_size: int = 32) -> dict:
    """The lung probabilities of every film of ``split`` that has a lung mask, in file order.

    Returns:
        ``{"image": [N, S, S] uint8, "lung_mask": [N, S, S] bool (true), "lung_probability":
        [N, S, S] float32, "label": [N], "path": [N] str, "patient_id": [N] str}``.

    Raises:
        records.DataDirError: the data dir was converted without ``--masks``, or the split has
            no film with a mask.
    """
    manifest = records.read_manifest(data_dir)
    count = int(manifest["splits"].get(split, {}).get("lung_masks", 0))
    if not count:
        raise records.DataDirError(
            f"split {split!r} of {data_dir} has no film with a lung mask; convert it with "
            f"--masks=DIR (tools/make_tfrecords)")
    ds = pipeline.make_eval_dataset(data_dir, split, batch_size, class_weights="none",
                                    masks="only")

    def collect(batch: dict, probs: np.ndarray, parts: dict) -> None:
        for key, value in (("image", batch["image"].numpy()[..., 0]),
                           ("lung_mask", batch["lung_mask"].numpy()[..., 0] > 127),
                           ("lung_probability", probs), ("label", batch["label"].numpy()),
                           ("path", batch["path"].numpy().astype(str)),
                           ("patient_id", batch["patient_id"].numpy().astype(str))):
            parts.setdefault(key, []).append(value)

    parts = scoring.collect_batches(
        pipeline.iterate_checked(ds, data_dir, split),
        lambda images: np.asarray(model(images, training=False), np.float32)[..., 0],
        collect, count, f"evaluate {split}")
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_lung_run(run_dir, data_dir, split: str = "test", batch_size: int = 32,
                      num_resamples: int = 2000, seed: int = 0, model=None) -> dict:
    """Evaluate the lungs run ``run_dir`` on ``split`` of ``data_dir`` (see the module docstring).

    Returns:
        The ``metrics.json`` dict.

    Raises:
        rundir.RunDirError: not a finished lungs run, or data of another image size or crop.
        records.DataDirError: as :func:`predict_masks`.
    """
    run = rundir.Run.open(run_dir)
    lungs_lib.check_lung_run(run)
    rundir.check_data_compatible(run, data_dir)
    model = run.model if model is None else model
    pred = predict_masks(model, data_dir, split, batch_size)
    threshold = lungs_lib.MASK_THRESHOLD
    metrics = {"task": lungs_lib.LUNGS_TASK, "split": split, "threshold": threshold,
               **pmetrics.segmentation_report(pred["lung_mask"], pred["lung_probability"],
                                              threshold, num_resamples, seed)}
    per_image = pmetrics.mask_scores(pred["lung_mask"], pred["lung_probability"], threshold)
    predicted = pred["lung_probability"] > threshold
    fractions = {"true": pred["lung_mask"].mean(axis=(1, 2)), "predicted": predicted.mean(axis=(1, 2))}
    metrics["lung_fraction"] = {k: float(np.mean(v)) for k, v in fractions.items()}
    order = np.argsort(per_image["dice"], kind="stable")
    metrics["worst"] = [{"path": str(pred["path"][i]), "dice": float(per_image["dice"][i])}
                        for i in order[:5]]
    out = rundir.evaluation_dir(run, data_dir, split)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / rundir.PREDICTIONS_NAME, pred, per_image, fractions)
    atomic_files.write_json_atomic(out / rundir.METRICS_NAME, metrics)
    tiles = [cam.contour_tile(pred["image"][i], pred["lung_mask"][i], predicted[i])
             for i in order[:CONTOUR_TILES]]
    captions = [f"Dice {per_image['dice'][i]:.3f}" for i in order[:CONTOUR_TILES]]
    png = report.figure_png(cam.grid_figure(
        tiles, captions, f"Lungs, {split} split: true green, predicted red (lowest Dice first)",
        colorbar=False))
    atomic_files.write_bytes_atomic(out / "contours.png", png)
    (out / rundir.REPORT_MD_NAME).write_text(report_markdown(metrics, run, data_dir),
                                             encoding="utf-8")
    _write_tensorboard(run.paths.tb_eval, metrics, png, out.name)
    return metrics


def _write_predictions(path, pred: dict, per_image: dict, fractions: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label", "dice", "iou", "true_lung_fraction",
                    "predicted_lung_fraction"])
        for i in range(len(pred["path"])):
            w.writerow([pred["path"][i], pred["patient_id"][i], int(pred["label"][i]),
                        f"{per_image['dice'][i]:.6f}", f"{per_image['iou'][i]:.6f}",
                        f"{fractions['true'][i]:.6f}", f"{fractions['predicted'][i]:.6f}"])


def report_markdown(metrics: dict, run, data_dir) -> str:
    """The lungs evaluation's ``report.md``."""
    ci = metrics["ci95"]
    lines = [f"# Lung segmentation: split `{metrics['split']}`", "",
             f"Run `{run}`, data `{data_dir}`: {metrics['n']} films with a lung mask; a pixel is "
             f"lung where the model's probability is above {metrics['threshold']}.", "",
             "| metric | mean over films | 95 % CI (bootstrap over films) |", "|---|---|---|"]
    for key in pmetrics.SEGMENTATION_METRICS:
        lines.append(f"| {key} | {metrics[key]:.4f} | [{ci[key][0]:.4f}, {ci[key][1]:.4f}] |")
    frac = metrics["lung_fraction"]
    lines += ["", f"Lungs cover {frac['true']:.3f} of the image on the true masks and "
              f"{frac['predicted']:.3f} on the predicted ones.", "",
              "Lowest Dice: " + ", ".join(f"`{w['path']}` ({w['dice']:.3f})"
                                          for w in metrics["worst"]), "",
              "![true lungs green, predicted red; lowest Dice first](contours.png)", ""]
    return "\n".join(lines)


def _write_tensorboard(log_dir, metrics: dict, png: bytes, name: str) -> None:
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default(step=0):
        for key in pmetrics.SEGMENTATION_METRICS:
            tf.summary.scalar(f"{name}/{key}", metrics[key])
        tf.summary.image(f"{name}/lung_contours", tf.io.decode_png(png, channels=4)[None])
    writer.close()


def summary_line(metrics: dict) -> str:
    """The printed result of a lungs evaluation."""
    ci = metrics["ci95"]
    return (f"{metrics['split']}: n={metrics['n']} Dice={metrics['dice']:.4f} "
            f"[{ci['dice'][0]:.4f}, {ci['dice'][1]:.4f}] IoU={metrics['iou']:.4f} "
            f"[{ci['iou'][0]:.4f}, {ci['iou'][1]:.4f}]")
