"""Grad-CAM of a run: explain a split's images and quantify where the model looks.

Usage::

    python -m pneumo_tf.gradcam --run_dir=R --data_dir=D --split=test --num_images=64 \
        [--calibration=val|NAME]

The maths (batched Grad-CAM, overlays, attention statistics) is :mod:`pneumo_tf.explain.cam`; this app
picks the images, runs it and writes the results. Images are grouped TP/FP/FN/TN at the
operating point of ``--calibration`` (``val``: ``calibration.json``; ``NAME``: a site
calibration from ``pneumo_tf.calibrate``). An ensemble run's maps are the mean of its members'
maps (:class:`pneumo_tf.explain.cam.EnsembleCamModel`), its probabilities the ensemble's.

``--cam_class`` chooses what is explained: ``pneumonia`` (default), ``predicted``, or for a
three-class run (``--task=subtype``) ``bacterial`` / ``viral`` (that class's log-odds against
the other two); the groups stay the binary TP/FP/FN/TN at the operating point.

Outputs: ``{TP,FP,FN,TN}.png`` overlay grids and ``cam_stats.json`` (share of the positive CAM
mass inside the lung region per group; on phantoms also the pointing game: how often the CAM peak
falls inside a lesion, next to the chance level = lesion area fraction) in ``R/gradcam/`` for the
run's own data, in ``R/gradcam/<evaluation name>/`` for another data dir or a site calibration
(``R/gradcam/test-site_b/``, named as ``evaluate`` names ``R/eval/``:
:func:`pneumo_tf.core.rundir.gradcam_dir`); and TensorBoard image summaries under
``R/tb/gradcam`` tagged ``<evaluation name>/<group>`` (``test/TP``, ``test-site_b/TP``). An
image whose map is empty (all zero after the ReLU) has no peak: in the pointing game it counts as
a miss, and ``pointing_empty`` says how many such misses there were.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration
from pneumo_tf.explain import cam
from pneumo_tf.core import rundir
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.evaluation import scoring

def _cams(cam_model, images: np.ndarray, batch_size: int, cam_class: str,
          threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cams [N, S, S] float32, probabilities [N] float32)`` of ``images``, batch by batch."""
    cams, probs = [], []
    for start in range(0, len(images), batch_size):
        out = cam.gradcam_batch(cam_model, images[start:start + batch_size], cam_class, threshold)
        cams.append(out["cam"])
        probs.append(out["probability"])
    return np.concatenate(cams), np.concatenate(probs)


def _write_pictures(paths: rundir.RunPaths, out: Path,
                    tiles: dict[str, list[tuple[np.ndarray, dict]]], context: dict) -> None:
    """One overlay grid per group: ``<out>/<group>.png`` and one image each in ``R/tb/gradcam``
    tagged ``<evaluation name>/<group>`` (a handful of tags, not one per tile)."""
    import tensorflow as tf

    from pneumo_tf.evaluation import report

    out.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(str(paths.tb / "gradcam"))
    with writer.as_default(step=0):
        for g in cam.GROUPS:
            if not tiles[g]:
                continue
            title = (f"Grad-CAM {g} ({cam.GROUP_MEANING[g]}), {context['split']} split, "
                     f"{len(tiles[g])} images\nthreshold {context['threshold']:.3f} on the raw "
                     f"probability (calibration '{context['calibration']}'), explaining "
                     f"{context['cam_class']}")
            fig = cam.grid_figure([t for t, _ in tiles[g]],
                                  [cam.tile_caption(e["path"], e["probability"])
                                   for _, e in tiles[g]], title)
            png = report.figure_png(fig)
            atomic_files.write_bytes_atomic(out / f"{g}.png", png)
            tf.summary.image(f"{context['evaluation']}/{g}",
                             tf.io.decode_png(png, channels=4)[tf.newaxis])
    writer.flush()
    writer.close()


def run_gradcam(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                num_images: int = 64, layer: str | None = None, batch_size: int = 32,
                seed: int = 0, cam_class: str = "pneumonia", model=None,
                calibration_name: str = rundir.VAL_CALIBRATION) -> dict:
    """Explain ``num_images`` images of ``split``; write them to
    :func:`pneumo_tf.core.rundir.gradcam_dir` (``R/gradcam/`` for the run's own data) and
    ``R/tb/gradcam``.

    Images are grouped TP/FP/FN/TN at the run's operating point (``calibration.json``, fitted
    on val first if missing, or the site calibration ``calibration_name``; its threshold applied
    to the quantity it was chosen on, see :func:`pneumo_tf.evaluation.calibration.raw_threshold`) and drawn
    evenly across the groups. ``run_dir`` may be an ensemble (the members' mean map).

    Returns:
        The ``cam_stats.json`` dict (``evaluation``: the evaluation's name,
        :func:`pneumo_tf.core.rundir.evaluation_name`).
    """
    manifest = rundir.check_data_compatible(run_dir, data_dir)
    paths = rundir.RunPaths(run_dir)
    out = rundir.gradcam_dir(run_dir, data_dir, split, calibration_name)
    evaluation = rundir.evaluation_name(run_dir, data_dir, split, calibration_name)
    if model is None:
        model = rundir.load_model(run_dir)
    try:
        backbone_name = rundir.read_summary(run_dir).get("config", {}).get("backbone")
    except rundir.RunDirError:
        backbone_name = None
    cam_model = cam.cam_model_for(model, layer, backbone_name)
    if cam_class in cam.SUBTYPE_CAM_CLASSES and not cam_model.subtype:
        raise ValueError(f"--cam_class={cam_class} needs a three-class run (trained with "
                         f"--task=subtype); {run_dir} is binary: use pneumonia or predicted")
    # The stored operating point, as a raw-probability cut.
    point = calibration.operating_point(run_dir, rundir.own_data_dir(run_dir, data_dir), None,
                                        model, batch_size, calibration_name)
    threshold = point["threshold"]

    # The scoring pass keeps the decoded images, so the chosen ones need no second decode.
    pred = scoring.predict_split(model, data_dir, split, batch_size, return_images=True)
    predictions = pmetrics.decide_label(pred["probability"], threshold)
    groups = [cam.group_of(y, p) for y, p in zip(pred["label"], predictions)]
    chosen = cam.select_balanced(groups, num_images, seed)
    images = pred.pop("image")[chosen]
    cams, probs = _cams(cam_model, images, batch_size, cam_class, threshold)

    boxes = cam.read_crop_boxes(data_dir, split)
    source_root = (manifest.get("source") or {}).get("path")
    entries, tiles = [], {g: [] for g in cam.GROUPS}
    for k, i in enumerate(chosen):
        rec_path = pred["path"][i]
        size = images.shape[1]
        regions = cam.image_regions(images[k, ..., 0], rec_path,
                                    boxes.get(rec_path, (0, size, 0, size)), source_root)
        entry = {"path": rec_path, "label": int(pred["label"][i]), "group": groups[i],
                 "probability": float(probs[k]),
                 cam.SHARE_KEYS[regions["source"]]: cam.lung_mass_share(cams[k], regions["lung"]),
                 "region_source": regions["source"]}
        entry.update(cam.pointing_entry(cams[k], regions["lesion"]))
        entries.append(entry)
        tiles[groups[i]].append((cam.overlay_cam(images[k, ..., 0], cams[k]), entry))
    _write_pictures(paths, out, tiles, {"split": split, "threshold": threshold,
                                        "calibration": calibration_name, "cam_class": cam_class,
                                        "evaluation": evaluation})

    sources = sorted({e["region_source"] for e in entries})
    stats = {"split": split, "evaluation": evaluation, "layer": cam_model.layer,
             "cam_class": cam_class,
             "threshold": threshold, "threshold_method": point["method"],
             "calibration": calibration_name, "ensemble_members": (
                 len(cam_model.members) if isinstance(cam_model, cam.EnsembleCamModel) else 0),
             "num_images": len(entries), "region_source": sources,
             "groups": cam.summarise_attention(entries),
             "images": [{k: v for k, v in e.items()} for e in entries]}
    atomic_files.write_json_atomic(out / rundir.CAM_STATS_NAME, stats)
    return stats
