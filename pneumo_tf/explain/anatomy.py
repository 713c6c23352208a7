"""Grad-CAM evidence measured on anatomy: whose lungs, and how much of the evidence is in them.

``python -m pneumo_tf.gradcam`` and ``python -m pneumo_tf.evaluate`` measure a classifier's
Grad-CAM against the lungs of the very images it sees (the stored images: cropped and resized as
the records hold them). Where the lungs come from (``lung_source``), best first:

- ``records``: the data dir's own lung masks (converter ``--masks``; true masks). The images are
  drawn among the films of the split that have one. True masks win over a lung model.
- ``lung_model``: the masks of a lungs run (``--lung_model=RUN``, ``--task=lungs``;
  :class:`pneumo_tf.modeling.lungs.LungModel`), computed on the stored images themselves.
- ``phantom_masks``: a phantom set's own masks beside its source (``OUT/masks/``), cropped and
  resized like each image (:func:`pneumo_tf.explain.cam.image_regions`).
- ``box``: the adaptive lung box of each image: a rough stand-in that also holds the heart and
  the mediastinum.

The measures are :func:`pneumo_tf.explain.cam.lung_evidence`'s (``lung_share``,
``lung_fraction``, ``lift`` = their ratio, 1.0 = a flat map, ``pointing_lungs``), per TP/FP/FN/TN
group and overall, on a sample drawn evenly across the groups (:func:`measure_sample`).

A lung model trained on another crop than the classifier's data (``summary.json`` ``config.crop``;
the U-Net of ``configs/lungs.cfg`` sees whole films, ``crop=none``, while a classifier on
``--crop=fixed`` data sees a zoomed crop) is used with a warning, logged and written into the
output's ``warnings`` (:func:`crop_mismatch`): measured, not assumed harmless -- that U-Net
(``zoom=0.25`` augmentation) keeps val Dice 0.949 on the fixed crops of the films it scores 0.955
on whole (BUILD.md, "Evidence in the lungs"); ``tools/bench_cam_lungs --lung_model=RUN`` measures
it on any data dir with true masks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import rundir
from pneumo_tf.data import records
from pneumo_tf.explain import cam

log = logging.getLogger(__name__)

LUNG_SOURCES = ("records", "lung_model", "phantom_masks", "box")
# Where the source of each lung_source says it comes from (cam_stats.json, metrics.json).
SOURCE_MEANING = {
    "records": "the data dir's own lung masks (converter --masks)",
    "lung_model": "masks of the lung model, computed on the images the classifier sees",
    "phantom_masks": "the phantom set's own lung masks, cropped and resized like each image",
    "box": "the adaptive lung box of each image (also holds the heart and mediastinum)",
}


class LungModelError(rundir.RunDirError):
    """``--lung_model`` names no usable lungs run; the message names the fix."""


def crop_mismatch(lung_config: dict, manifest: dict) -> str | None:
    """Why a lung model's masks do not fit the classifier's images, or None when they do.

    Args:
        lung_config: the lungs run's ``summary.json`` ``config`` (its ``crop``).
        manifest: the manifest of the data dir the classifier is measured on (its ``crop``).
    """
    trained, seen = lung_config.get("crop"), manifest.get("crop")
    if trained is None or seen is None or trained == seen:
        return None
    return (f"the lung model was trained on crop={trained} films but the classifier's images are "
            f"crop={seen}: it sees them framed unlike its training films; check its Dice there "
            f"with `tools/bench_cam_lungs --lung_model=...` on data with true masks")


def _open_lung_model(path: str | os.PathLike, manifest: dict, batch_size: int):
    """``(LungModel, warnings)`` of ``--lung_model=path``.

    Raises:
        LungModelError: a missing directory, or not a finished lungs run.
    """
    from pneumo_tf.modeling import lungs

    fix = "train one with `python -m pneumo_tf.train --flagfile=configs/lungs.cfg`"
    if not Path(path).is_dir():
        raise LungModelError(f"--lung_model={path}: no such directory; pass a lungs run "
                             f"directory ({fix})")
    try:
        model = lungs.LungModel(path, batch_size=batch_size)
    except rundir.RunDirError as e:
        text = str(e)
        raise LungModelError(text if text.startswith("--lung_model") else
                             f"--lung_model={path}: {text}") from e
    why = crop_mismatch(model.config, manifest)
    return model, [f"--lung_model={path}: {why}"] if why else []


@dataclasses.dataclass(frozen=True)
class LungOptions:
    """How ``gradcam`` and ``evaluate`` find the lungs (their ``--lung_model*`` flags).

    Attributes:
        lung_model: a lungs run directory (``--lung_model``), or None.
        num_images: images ``evaluate`` measures (``--lung_images``; 0 = none); ``gradcam``
            measures the images it explains (``--num_images``) instead.
    """

    lung_model: str | None = None
    num_images: int = 64

    def open(self, data_dir, split: str, batch_size: int = 32) -> "LungSource":
        """:func:`open_lung_source` with these options."""
        return open_lung_source(data_dir, split, self.lung_model, batch_size)


@dataclasses.dataclass
class LungSource:
    """Where the lungs of one split's images come from, opened once.

    Attributes:
        source: a :data:`LUNG_SOURCES` entry.
        data_dir, split: what is measured.
        lung_model: the :class:`pneumo_tf.modeling.lungs.LungModel` (source ``lung_model``).
        warnings: what the output must say (a crop mismatch, an ignored lung model).
        record_masks: source ``records``: ``{"lung_mask": [N, S, S] bool, "has_lung_mask": [N]
            bool, "path": [N] str}`` of the split, in file order.
    """

    source: str
    data_dir: str
    split: str
    lung_model: object = None
    warnings: list = dataclasses.field(default_factory=list)
    record_masks: dict | None = None
    _regions: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        """The output's ``lung_source``, ``lung_source_meaning``, ``lung_model`` and ``warnings``."""
        return {"lung_source": self.source, "lung_source_meaning": SOURCE_MEANING[self.source],
                "lung_model": self.lung_model.path if self.lung_model is not None else None,
                "warnings": list(self.warnings)}

    def eligible(self, paths) -> np.ndarray:
        """``[N] bool``: the films that can be measured (source ``records``: those with a mask)."""
        if self.source != "records":
            return np.ones(len(paths), bool)
        _check_aligned(self.record_masks["path"], paths, self.data_dir, self.split)
        return self.record_masks["has_lung_mask"].copy()

    def masks(self, indices, images: np.ndarray, paths) -> tuple[np.ndarray, np.ndarray]:
        """``(lungs [K, S, S] bool, has_mask [K] bool)`` of the chosen images.

        Args:
            indices: ``[K]`` positions of the images in the split (file order).
            images: ``[K, S, S, 1]`` uint8, the chosen images as the classifier sees them.
            paths: ``[K]`` their record paths.
        """
        size = images.shape[1]
        if self.source == "records":
            lungs = self.record_masks["lung_mask"][indices]
            return lungs, self.record_masks["has_lung_mask"][indices]
        if self.source == "lung_model":
            lungs = np.stack(self.lung_model.masks(images[..., 0])) if len(images) else \
                np.zeros((0, size, size), bool)
            return lungs, lungs.reshape(len(lungs), -1).any(axis=1)
        regions = [self.regions(img[..., 0], p) for img, p in zip(images, paths)]
        lungs = np.stack([r["lung"] for r in regions]) if regions else \
            np.zeros((0, size, size), bool)
        has = np.array([r["source"] == ("phantom_masks" if self.source == "phantom_masks"
                                        else "adaptive_box") for r in regions], bool)
        return lungs, has

    def regions(self, gray: np.ndarray, path: str) -> dict:
        """:func:`pneumo_tf.explain.cam.image_regions` of one stored image (cached by path):
        the phantom masks (lung, lesion) or the adaptive box, for the secondary box line and the
        lesion pointing game, whatever the lung source."""
        if path not in self._regions:
            if "boxes" not in self._regions:
                self._regions["boxes"] = cam.read_crop_boxes(self.data_dir, self.split)
                manifest = records.read_manifest(self.data_dir)
                self._regions["root"] = (manifest.get("source") or {}).get("path")
            size = gray.shape[0]
            box = self._regions["boxes"].get(path, (0, size, 0, size))
            self._regions[path] = cam.image_regions(gray, path, box, self._regions["root"])
        return self._regions[path]


def _check_aligned(mask_paths, paths, data_dir, split) -> None:
    if len(mask_paths) != len(paths) or any(a != b for a, b in zip(mask_paths, paths)):
        raise records.DataDirError(
            f"the lung masks of split {split!r} of {data_dir} are not in the order of its images; "
            f"re-convert it (tools/make_tfrecords --masks=...)")


def read_split_masks(data_dir: str | os.PathLike, split: str, batch_size: int = 64) -> dict:
    """The stored lung masks of every film of ``split``, in file order.

    Returns:
        ``{"lung_mask": [N, S, S] bool, "has_lung_mask": [N] bool, "path": [N] str}``.

    Raises:
        records.DataDirError: the data dir was converted without ``--masks`` (named, with the fix).
    """
    from pneumo_tf.data import pipeline

    ds = pipeline.make_eval_dataset(data_dir, split, batch_size, class_weights="none",
                                    masks="all")
    parts = {"lung_mask": [], "has_lung_mask": [], "path": []}
    for batch in pipeline.iterate_checked(ds, data_dir, split):
        parts["lung_mask"].append(batch["lung_mask"].numpy()[..., 0] > 127)
        parts["has_lung_mask"].append(batch["has_lung_mask"].numpy().astype(bool))
        parts["path"].append(np.array([p.decode("utf-8") for p in batch["path"].numpy()], object))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _phantom_root(manifest: dict) -> str | None:
    """The phantom set the data dir was converted from, when its masks are still there."""
    from pneumo_tf.data import phantoms

    root = (manifest.get("source") or {}).get("path")
    if root and (Path(root) / phantoms.PHANTOMS_JSON).is_file() \
            and (Path(root) / phantoms.MASKS_DIR).is_dir():
        return root
    return None


def open_lung_source(data_dir: str | os.PathLike, split: str,
                     lung_model: str | os.PathLike | None = None,
                     batch_size: int = 32) -> LungSource:
    """The best lung source for ``split`` of ``data_dir`` (module docstring, best first).

    Args:
        data_dir: the data the classifier is measured on.
        split: the split measured.
        lung_model: ``--lung_model``: a lungs run directory, or None.
        batch_size: films per lung-model forward pass.

    Raises:
        LungModelError: as :func:`_open_lung_model` (checked even when true masks win, so a
            wrong ``--lung_model`` never passes silently).
    """
    manifest = records.read_manifest(data_dir)
    model, warnings = (_open_lung_model(lung_model, manifest, batch_size)
                       if lung_model else (None, []))
    has_records = int((manifest["splits"].get(split) or {}).get("lung_masks", 0)) > 0
    if has_records:
        if model is not None:
            warnings = [f"--lung_model={lung_model} not used: the records of split {split!r} "
                        f"carry true lung masks, which win over a model"]
            log.warning("%s", warnings[0])
        return LungSource("records", str(data_dir), split, warnings=warnings,
                          record_masks=read_split_masks(data_dir, split))
    for line in warnings:
        log.warning("%s", line)
    if model is not None:
        return LungSource("lung_model", str(data_dir), split, lung_model=model, warnings=warnings)
    source = "phantom_masks" if _phantom_root(manifest) else "box"
    return LungSource(source, str(data_dir), split)


@dataclasses.dataclass
class Sample:
    """The measured sample of one split (:func:`measure_sample`).

    Attributes:
        chosen: ``[K]`` positions in the split (file order, sorted).
        cams: ``[K, S, S]`` float32 Grad-CAMs in [0, 1]; probabilities: ``[K]``.
        predictions: ``[K]`` decided labels; lungs: ``[K, S, S]`` bool; has_mask: ``[K]`` bool.
        evidence: :func:`pneumo_tf.explain.cam.lung_evidence` of the sample.
        region_shares: ``[K]`` ``(share key, share)``: the older measure, the CAM mass inside
            each image's region of :func:`pneumo_tf.explain.cam.image_regions` (the adaptive
            box: ``lung_box_share``; phantom masks: ``lung_mask_share``).
    """

    chosen: np.ndarray
    cams: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray
    lungs: np.ndarray
    has_mask: np.ndarray
    evidence: dict
    region_shares: list


def cam_model_of(run: "rundir.Run", layer: str | None = None):
    """:func:`pneumo_tf.explain.cam.cam_model_for` of a run's model: ``layer``, else the layer
    a ``--cam_penalty`` run was trained to explain, else its backbone's registered Grad-CAM
    layer (``summary.json`` ``config``)."""
    try:
        config = run.summary.get("config") or {}
    except rundir.RunDirError:
        config = {}
    if not layer and config.get("cam_penalty"):
        layer = config.get("cam_layer")
    return cam.cam_model_for(run.model, layer, config.get("backbone"))


def gradcam_images(cam_model, images: np.ndarray, batch_size: int, cam_class: str = "pneumonia",
                   threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(cams [N, S, S] float32, probabilities [N] float32)`` of ``images``, batch by batch."""
    cams, probs = [], []
    for start in range(0, len(images), batch_size):
        out = cam.gradcam_batch(cam_model, images[start:start + batch_size], cam_class, threshold)
        cams.append(out["cam"])
        probs.append(out["probability"])
    if not cams:
        size = images.shape[1]
        return np.zeros((0, size, size), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(cams), np.concatenate(probs)


def measure_sample(cam_model, pred: dict, threshold: float, source: LungSource,
                   num_images: int, seed: int = 0, batch_size: int = 32,
                   cam_class: str = "pneumonia") -> Sample:
    """Grad-CAM of up to ``num_images`` images of a scored split against their lungs.

    The images are drawn (seeded) evenly across TP/FP/FN/TN at ``threshold``
    (:func:`pneumo_tf.explain.cam.select_balanced`), among the films ``source`` can measure.

    Args:
        cam_model: :func:`pneumo_tf.explain.cam.cam_model_for` of the classifier.
        pred: :func:`pneumo_tf.evaluation.scoring.predict_split` output with ``image``.
        threshold: the operating point on the raw probability.
        source: :func:`open_lung_source` of the same split.
    """
    from pneumo_tf.evaluation import metrics as pmetrics

    predictions = np.asarray(pmetrics.decide_label(pred["probability"], threshold), np.int64)
    groups = [cam.group_of(y, p) for y, p in zip(pred["label"], predictions)]
    eligible = source.eligible(pred["path"])
    chosen = cam.select_balanced([g if ok else "-" for g, ok in zip(groups, eligible)],
                                 num_images, seed)
    images = pred["image"][chosen]
    cams, probs = gradcam_images(cam_model, images, batch_size, cam_class, threshold)
    lungs, has = source.masks(chosen, images, pred["path"][chosen])
    labels = np.asarray(pred["label"])[chosen]
    evidence = cam.lung_evidence(cams, lungs, labels, predictions[chosen], has)
    shares = []
    for k, (image, path) in enumerate(zip(images, pred["path"][chosen])):
        regions = source.regions(image[..., 0], path)
        shares.append((cam.SHARE_KEYS[regions["source"]],
                       cam.lung_mass_share(cams[k], regions["lung"])))
    return Sample(chosen, cams, probs, predictions[chosen], lungs, has, evidence, shares)


def evidence_section(sample: Sample, source: LungSource, layer: str, eligible: int) -> dict:
    """The ``lung_evidence`` entry of ``metrics.json`` / ``cam_stats.json``.

    Returns:
        ``{"lung_source", "lung_source_meaning", "lung_model", "warnings", "layer",
        "num_images", "drawn_from", "groups": {TP, FP, FN, TN, all: stats},
        "skipped_no_mask", "definition", "secondary"}``; ``secondary`` holds the older
        measure, the mean share of the CAM mass inside the adaptive lung box
        (``lung_box_share``) or a phantom set's masks (``lung_mask_share``) over the sample's
        non-empty CAMs.
    """
    ev = sample.evidence
    secondary = {}
    for key in sorted({k for k, _ in sample.region_shares}):
        values = [v for k, v in sample.region_shares if k == key and np.isfinite(v)]
        secondary[key] = float(np.mean(values)) if values else None
    return {**source.describe(), "layer": layer, "num_images": int(len(sample.chosen)),
            "drawn_from": int(eligible), "groups": ev["groups"],
            "skipped_no_mask": ev["skipped_no_mask"], "definition": ev["definition"],
            "secondary": secondary}


def split_evidence(run: "rundir.Run", pred: dict, threshold: float, source: LungSource | None,
                   num_images: int, seed: int = 0, batch_size: int = 32) -> dict:
    """``metrics.json``'s ``lung_evidence``: :func:`measure_sample` of a scored split at the
    backbone's default CAM layer, explaining PNEUMONIA, as ``gradcam`` with the same
    ``num_images`` and ``seed`` measures it.

    No source (``--lung_images=0``) or a model Grad-CAM cannot explain (one not built by
    :func:`pneumo_tf.modeling.model.build_model`) gives ``{"skipped": reason}``.
    """
    if source is None or num_images <= 0:
        return {"skipped": "--lung_images=0"}
    try:
        cam_model = cam_model_of(run)
    except ValueError as e:
        return {"skipped": f"no Grad-CAM for this model ({e})", **source.describe()}
    sample = measure_sample(cam_model, pred, threshold, source, num_images, seed, batch_size)
    return evidence_section(sample, source, cam_model.layer,
                            int(source.eligible(pred["path"]).sum()))


def summary_text(section: dict) -> str:
    """``lift 1.11 (lung share 0.695 / lung fraction 0.626; ...), pointing_lungs 0.84 (lungs:
    records, 60 images measured)``: the overall line a printed result leads with."""
    if "skipped" in section:
        return f"lung evidence not computed: {section['skipped']}"
    overall = section["groups"]["all"]
    if "lift" not in overall:
        return (f"lung evidence: no image with both a lung mask and a non-empty CAM "
                f"(lungs: {section['lung_source']})")
    return (f"lift {overall['lift']:.2f} (lung share {overall['lung_share']:.3f} / lung fraction "
            f"{overall['lung_fraction']:.3f}; 1.0 = a flat map), pointing_lungs "
            f"{overall['pointing_lungs']:.2f} (lungs: {section['lung_source']}, {overall['n']} "
            f"images measured)")


def scalars(section: dict) -> dict[str, float]:
    """``{"<group>/<measure>": value}`` of a ``lung_evidence`` section, for TensorBoard."""
    out = {}
    for group, stats in (section.get("groups") or {}).items():
        for key in ("lift", "lung_share", "lung_fraction", "pointing_lungs"):
            value = stats.get(key)
            if isinstance(value, float) and np.isfinite(value):
                out[f"{group}/{key}"] = value
    return out
