"""Grad-CAM of a run: explain a split's images and quantify where the model looks.

Usage::

    python -m pneumo_tf.gradcam --run_dir=R --data_dir=D --split=test --num_images=64 \
        [--calibration=val|NAME] [--lung_model=LUNGS_RUN]

The maths (batched Grad-CAM, overlays, attention statistics) is :mod:`pneumo_tf.explain.cam`,
the lungs it is measured against :mod:`pneumo_tf.explain.anatomy`; this app picks the images,
runs it and writes the results. Images are grouped TP/FP/FN/TN at the operating point of
``--calibration`` (``val``: ``calibration.json``; ``NAME``: a site calibration from
``pneumo_tf.calibrate``) and drawn evenly across the groups, among the films whose lungs are
known. An ensemble run's maps are the mean of its members' maps
(:class:`pneumo_tf.explain.cam.EnsembleCamModel`), its probabilities the ensemble's.

``--cam_class`` chooses what is explained: ``pneumonia`` (default), ``predicted``, or for a
three-class run (``--task=subtype``) ``bacterial`` / ``viral`` (that class's log-odds against
the other two); the groups stay the binary TP/FP/FN/TN at the operating point.

Outputs: ``{TP,FP,FN,TN}.png`` overlay grids (the lungs measured against outlined) and
``cam_stats.json`` in ``R/gradcam/`` for the run's own data, in ``R/gradcam/<evaluation name>/``
for another data dir or a site calibration (``R/gradcam/test-site_b/``, named as ``evaluate``
names ``R/eval/``: :func:`pneumo_tf.core.rundir.gradcam_dir`); and under ``R/tb/gradcam``
TensorBoard image summaries ``<evaluation name>/<group>`` (``test/TP``, ``test-site_b/TP``) and
scalars ``<evaluation name>/lung_evidence/<group>/<measure>``. ``cam_stats.json`` leads with
``lung_source`` and ``lung_evidence`` (lift of the CAM mass inside the lungs over a flat map's,
pointing_lungs, per group: :func:`pneumo_tf.explain.anatomy.evidence_section`); ``groups`` keeps
the older share of the CAM mass inside the adaptive lung box (or a phantom set's masks) and, on
phantoms, the lesion pointing game: how often the CAM peak falls inside a lesion, next to the
chance level = lesion area fraction. An image whose map is empty (all zero after the ReLU) has no
peak: in either pointing game it counts as a miss, and ``pointing_empty`` says how many such
misses there were.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files
from pneumo_tf.evaluation import calibration
from pneumo_tf.explain import anatomy, cam
from pneumo_tf.core import rundir
from pneumo_tf.evaluation import scoring

def _write_pictures(paths: rundir.RunPaths, out: Path,
                    tiles: dict[str, list[tuple[np.ndarray, dict]]], context: dict,
                    evidence: dict) -> None:
    """One overlay grid per group: ``<out>/<group>.png`` and one image each in ``R/tb/gradcam``
    tagged ``<evaluation name>/<group>`` (a handful of tags, not one per tile), and the lung
    evidence as scalars ``<evaluation name>/lung_evidence/<group>/<measure>`` there."""
    import tensorflow as tf

    from pneumo_tf.evaluation import report

    out.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(str(paths.tb_gradcam))
    with writer.as_default(step=0):
        for g in cam.GROUPS:
            if not tiles[g]:
                continue
            stats = evidence["groups"][g]
            lift = f"lift {stats['lift']:.2f}, " if "lift" in stats else ""
            title = (f"Grad-CAM {g} ({cam.GROUP_MEANING[g]}), {context['split']} split, "
                     f"{len(tiles[g])} images\nthreshold {context['threshold']:.3f} on the calibrated "
                     f"probability (calibration '{context['calibration']}'), explaining "
                     f"{context['cam_class']}\nlungs outlined ({evidence['lung_source']}): "
                     f"{lift}pointing_lungs {stats.get('pointing_lungs', float('nan')):.2f}")
            fig = cam.grid_figure([t for t, _ in tiles[g]],
                                  [cam.tile_caption(e["path"], calibration.apply_temperature(
                                      np.float64(e["probability"]), context["temperature"]))
                                   for _, e in tiles[g]], title)
            png = report.figure_png(fig)
            atomic_files.write_bytes_atomic(out / f"{g}.png", png)
            tf.summary.image(f"{context['evaluation']}/{g}",
                             tf.io.decode_png(png, channels=4)[tf.newaxis])
        for key, value in anatomy.scalars(evidence).items():
            tf.summary.scalar(f"{context['evaluation']}/lung_evidence/{key}", value)
    writer.flush()
    writer.close()


def _entries(sample: anatomy.Sample, source: anatomy.LungSource, pred: dict, images: np.ndarray
             ) -> tuple[list[dict], dict[str, list]]:
    """``(cam_stats.json "images" entries, {group: [(tile, entry)]})`` of a measured sample.

    Each entry holds the lung evidence (``lung_share``, ``lung_fraction``, ``pointing_lungs``;
    null where the image has no lung mask), the secondary region share (phantom masks or the
    adaptive box, :data:`pneumo_tf.explain.cam.SHARE_KEYS`) and, on phantoms, the lesion
    pointing game. Tiles outline the lungs measured against.
    """
    entries, tiles = [], {g: [] for g in cam.GROUPS}
    for k, i in enumerate(sample.chosen):
        rec_path, gray, heat = pred["path"][i], images[k, ..., 0], sample.cams[k]
        regions = source.regions(gray, rec_path)
        lung = sample.evidence["per_image"][k]
        group = cam.group_of(pred["label"][i], sample.predictions[k])
        entry = {"path": rec_path, "label": int(pred["label"][i]), "group": group,
                 "probability": float(sample.probabilities[k]),
                 "has_lung_mask": lung is not None,
                 **{key: (lung or {}).get(key)
                    for key in ("lung_share", "lung_fraction", "pointing_lungs")},
                 cam.SHARE_KEYS[regions["source"]]: cam.lung_mass_share(heat, regions["lung"]),
                 "region_source": regions["source"]}
        entry.update(cam.pointing_entry(heat, regions["lesion"]))
        entries.append(entry)
        tile = cam.overlay_cam(gray, heat)
        if lung is not None:
            tile = cam.draw_lung_outline(tile, sample.lungs[k])
        tiles[group].append((tile, entry))
    return entries, tiles


def run_gradcam(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
                num_images: int = 64, layer: str | None = None, batch_size: int = 32,
                seed: int = 0, cam_class: str = "pneumonia",
                calibration_name: str = rundir.VAL_CALIBRATION,
                lungs: anatomy.LungOptions | None = None) -> dict:
    """Explain ``num_images`` images of ``split``; write them to
    :func:`pneumo_tf.core.rundir.gradcam_dir` (``R/gradcam/`` for the run's own data) and
    ``R/tb/gradcam``.

    Images are grouped TP/FP/FN/TN at the run's operating point (``calibration.json``, fitted
    on val first if missing, or the site calibration ``calibration_name``; its threshold applied
    to the quantity it was chosen on, see :func:`pneumo_tf.evaluation.calibration.raw_threshold`)
    and drawn evenly across the groups, among the films whose lungs are known (the lung source:
    :func:`pneumo_tf.explain.anatomy.open_lung_source`, ``lungs`` gives ``--lung_model``).
    ``run_dir`` may be an ensemble (the members' mean map).

    Returns:
        The ``cam_stats.json`` dict (``evaluation``: the evaluation's name,
        :func:`pneumo_tf.core.rundir.evaluation_name`).
    """
    run = rundir.Run.open(run_dir)
    rundir.check_data_compatible(run, data_dir)
    out = rundir.gradcam_dir(run, data_dir, split, calibration_name)
    evaluation = rundir.evaluation_name(run, data_dir, split, calibration_name)
    source = (lungs or anatomy.LungOptions()).open(data_dir, split, batch_size)
    model = run.model
    cam_model = anatomy.cam_model_of(run, layer)
    if cam_class in cam.SUBTYPE_CAM_CLASSES and not cam_model.subtype:
        raise ValueError(f"--cam_class={cam_class} needs a three-class run (trained with "
                         f"--task=subtype); {run_dir} is binary: use pneumonia or predicted")
    # The stored operating point, as a raw-probability cut.
    point = calibration.operating_point(run, rundir.own_data_dir(run, data_dir), None,
                                        model, batch_size, calibration_name)
    threshold = point["threshold"]
    # The scoring pass keeps the decoded images, so the chosen ones need no second decode.
    pred = scoring.predict_split(model, data_dir, split, batch_size, return_images=True)
    sample = anatomy.measure_sample(cam_model, pred, threshold, source, num_images, seed,
                                    batch_size, cam_class)
    eligible = int(source.eligible(pred["path"]).sum())
    entries, tiles = _entries(sample, source, pred, pred.pop("image")[sample.chosen])
    evidence = anatomy.evidence_section(sample, source, cam_model.layer, eligible)
    shown = float(calibration.apply_temperature(np.float64(threshold), point["temperature"]))
    _write_pictures(run.paths, out, tiles, {"split": split, "threshold": shown,
                                            "temperature": point["temperature"],
                                            "calibration": calibration_name,
                                            "cam_class": cam_class, "evaluation": evaluation},
                    evidence)
    stats = {"split": split, "evaluation": evaluation, "layer": cam_model.layer,
             "cam_class": cam_class,
             "threshold": threshold, "calibrated_threshold": shown,
             "threshold_method": point["method"],
             "calibration": calibration_name, "ensemble_members": (
                 len(cam_model.members) if isinstance(cam_model, cam.EnsembleCamModel) else 0),
             "num_images": len(entries), "lung_source": source.source,
             "lung_evidence": evidence,
             "region_source": sorted({e["region_source"] for e in entries}),
             "groups": cam.summarise_attention(entries), "images": entries}
    atomic_files.write_json_atomic(out / rundir.CAM_STATS_NAME, stats)
    return stats
