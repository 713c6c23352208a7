"""Predict PNEUMONIA for image files: the library of `python -m pneumo_tf.predict` (:func:`load_predictor`, :func:`predict_paths`).

Usage::

    python -m pneumo_tf.predict --model=PATH [--calibration=NAME] [--format=jsonl|table] \
        [--gradcam_dir=DIR] FILE_OR_DIR...

``--model`` is a run directory, a SavedModel directory written by :mod:`pneumo_tf.export`, a
``.keras`` file inside a run directory, or a ``.tflite`` file inside ``R/export/``. Files are read
exactly as the converter reads them (:func:`pneumo_tf.data.decode.decode_bytes`, then
:func:`pneumo_tf.image.preprocess.preprocess_gray` with the run's image size and crop), so every model
kind sees the pixels training saw; folders are searched recursively for JPEG, PNG and DICOM
files. A SavedModel is called through its ``preprocessed`` signature for the same reason.

One JSON line per input, in input order::

    {"path": "a.jpeg", "probability": 0.91, "calibrated_probability": 0.84, "threshold": 0.57,
     "calibration": "val", "label": 1, "class_name": "PNEUMONIA", "refer": false,
     "refer_reasons": [], "ood_score": 41.3, "in_distribution": true}
    {"path": "cat.jpeg", "probability": 0.95, ..., "label": null, "class_name": null,
     "refer": true, "refer_reasons": ["not_a_chest_film"], "ood_score": 512.8,
     "in_distribution": false}
    {"path": "b.txt", "error": "not an image (unrecognised file format)"}

With a lung model (``--lung_model=LUNGS_RUN``, a run trained on ``--crop=lungs`` data by default,
or the one an exported model carries) every row adds ``lung_fraction`` (the lung share of the
whole film) and ``lung_confidence`` (the lung model's mean probability over those pixels), and a
film where it finds no lungs (:func:`pneumo_tf.serving.lungs.lungs_found`: the share under
``--min_lung_fraction`` or the confidence under ``--min_lung_confidence``) is referred with
``no_lungs_found``, beside the OOD guard's reasons; both are null without a lung model. A
``--crop=lungs`` run crops each film to the lungs its lung model finds, as the converter did.

A three-class run (``--task=subtype``) adds ``"subtype": "BACTERIAL" | "VIRAL"`` and
``"subtype_probability"`` (the larger of the two pneumonia probabilities given pneumonia,
temperature-scaled with the run's subtype temperature), both null where ``label`` is 0.

``probability`` is the model's, ``calibrated_probability`` its temperature-scaled value; the
decision is taken on the calibrated one: ``threshold`` is the run's operating threshold
on the calibrated scale, and ``label`` is 1 exactly when
``calibrated_probability >= threshold`` (:func:`pneumo_tf.evaluation.metrics.decide_label`).
``calibration`` names where temperature and threshold come from: ``val`` (the run's
``calibration.json``, the default for a run directory), a site calibration
(``--calibration=NAME``: ``R/calibrations/NAME.json``), or for an exported model the one baked
in at export (``--calibration`` must then name that one). ``refer`` is
true when the case should go to a human: the calibrated probability lies within
``--refer_band`` of the threshold (``uncertain``; by default the model's band: 0.1, or the one
an exported model was given), the image looks unlike a chest film (see
:func:`pneumo_tf.serving.refer.film_refer_reasons`), or the run's out-of-distribution guard
(:mod:`pneumo_tf.ood`) rejects it: ``inverted`` or ``on_its_side`` (image checks of the decoded
full film), ``upside_down`` (the guard's probe on the model input) or ``not_a_chest_film`` (its
feature score is above the guard's threshold; the probe reads the features as a film's, so
``upside_down`` is only given for inputs the score accepts: a photo is not an upside-down
film). ``refer_reasons`` lists them in :data:`pneumo_tf.serving.refer.REFER_REASONS` order, by
the rule the SavedModel's bytes signature follows (:func:`pneumo_tf.serving.refer.decide`).
``ood_score`` is that score and ``in_distribution`` is true when it is at most the threshold
and no image check failed. An input with ``in_distribution`` false gets no diagnosis:
``label``, ``class_name`` (and a three-class run's ``subtype`` fields) are null, ``refer`` is
true, and the probabilities stay for audit (the table shows ``-`` as its label). A model
without a guard (a run without ``ood.json``, or exported from one) still
predicts: ``ood_score`` and ``in_distribution`` are null (the image checks still refer). A
failed input has ``path`` and ``error`` only; the other inputs are still predicted and the
exit status is 1.

Grad-CAM overlays (``--gradcam_dir``) need the Keras model (a run directory or ``.keras`` file):
a SavedModel or TFLite file has no access to the backbone's feature maps, so the command refuses
``--gradcam_dir`` with them and names the run directory to use instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

import pneumo_tf
from pneumo_tf.evaluation import calibration
from pneumo_tf.evaluation import metrics as pmetrics
from pneumo_tf.serving import lungs as lung_serving
from pneumo_tf.serving import ood, refer
from pneumo_tf.image import preprocess
from pneumo_tf.core import rundir
from pneumo_tf.serving import runtime as serving
from pneumo_tf.data import decode

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
MODEL_KINDS = ("run_dir", "keras", "saved_model", "tflite")
OUTPUT_FORMATS = ("jsonl", "table")


class PredictError(ValueError):
    """The model path or the arguments are unusable; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Predictor:
    """A loaded model of any kind behind one interface.

    Attributes:
        kind: one of :data:`MODEL_KINDS`.
        source: the ``--model`` path.
        config: image size, crop, temperature, threshold, task and OOD guard.
        outputs: ``[N, S, S, 1] uint8 -> {"probability": [N], "ood_score": [N] (with a guard),
            "class_probabilities": [N, 3] (a subtype model)}`` numpy arrays.
        keras_model: the Keras model (run dir and ``.keras`` only), for Grad-CAM.
        run: the run the model belongs to (run dir and ``.keras`` only), opened once: its
            serving config, OOD guard and lung model are read from it.
        saved_model: the loaded SavedModel (``saved_model`` only), loaded once: its
            ``preprocessed`` signature gives :attr:`outputs`, its ``lungs`` one the lung model.
        lungs: the lung model on the host (:class:`pneumo_tf.serving.lungs.HostLungs`), or None.
    """

    kind: str
    source: Path
    config: serving.ServingConfig
    outputs: Callable[[np.ndarray], dict]
    keras_model: object | None = None
    run: rundir.Run | None = None
    saved_model: object | None = None
    lungs: lung_serving.HostLungs | None = None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``[N] float64`` probability of PNEUMONIA for ``[N, S, S, 1] uint8`` images."""
        return np.asarray(self.outputs(images)["probability"], np.float64).reshape(-1)

    @property
    def ood_info(self) -> dict | None:
        """The OOD guard (the run's ``ood.json``, or the one baked into an exported model);
        None for a model without one."""
        return self.config.ood


def _run_config(run: rundir.Run, calibration_name: str) -> serving.ServingConfig:
    cal = run.calibration(calibration_name)
    if cal is not None:
        cal = serving.calibration_from_json(cal, str(run.paths.calibration_file(calibration_name)))
    return serving.serving_config_for_run(run, cal, calibration_name)


def _check_baked_calibration(config: serving.ServingConfig, path: Path,
                             calibration_name: str | None) -> None:
    """Refuse a ``--calibration`` other than the one an exported model has baked in."""
    if calibration_name is not None and calibration_name != config.calibration:
        raise PredictError(
            f"--calibration={calibration_name}: {path} was exported with calibration "
            f"{config.calibration!r} baked in. Export the run with `python -m pneumo_tf.export "
            f"--calibration={calibration_name}` (R/export_{calibration_name}/), or pass "
            f"--model=<the run directory> to apply any of its calibrations")


def _read_serving_config(path: Path, model_path: Path) -> serving.ServingConfig:
    if not path.is_file():
        raise PredictError(f"{path} is missing, so the image size, crop and calibration of "
                           f"{model_path} are unknown; use a model written by "
                           f"`python -m pneumo_tf.export` (or pass the run directory)")
    try:
        return serving.ServingConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise PredictError(f"{path} is not a valid serving config ({e}); re-run the export") from e


def _keras_predictor(kind: str, source: Path, run: rundir.Run, calibration_name: str
                     ) -> Predictor:
    from pneumo_tf.modeling import model as model_lib
    from pneumo_tf.serving import ood
    from pneumo_tf.evaluation import scoring

    model, config = run.model, _run_config(run, calibration_name)
    config.task = "subtype" if model_lib.is_subtype_model(model) else "binary"
    stats = ood.load_stats(run)
    outputs = scoring.make_outputs_fn(model, stats.layer if stats is not None else None)

    def predict(images: np.ndarray) -> dict:
        out = outputs(images)
        result = {"probability": out["probability"].numpy().astype(np.float64)}
        if stats is not None:
            result["ood_score"] = stats.scores(out["features"].numpy())
        if "class_logits" in out:
            result["class_probabilities"] = calibration.softmax(out["class_logits"].numpy())
        return result

    return Predictor(kind, source, config, predict, model, run)


def _signature_outputs(signature) -> Callable[[np.ndarray], dict]:
    """The ``preprocessed`` signature of a SavedModel as :attr:`Predictor.outputs`."""
    import tensorflow as tf

    def predict(images: np.ndarray) -> dict:
        out = signature(image=tf.constant(images))
        return {key: out[key].numpy() for key in ("probability", "ood_score",
                                                  "class_probabilities") if key in out}

    return predict


def model_kind(path: str | os.PathLike) -> str:
    """Which of :data:`MODEL_KINDS` ``path`` is (by its files, not by trust in its name).

    Raises:
        PredictError: missing path, or nothing this command can load.
    """
    path = Path(path)
    if not path.exists():
        raise PredictError(f"--model={path}: no such file or directory")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        if rundir.RunPaths(path).model.is_file():
            return "run_dir"
        raise PredictError(f"--model={path}: a directory without model.keras or saved_model.pb; "
                           f"give a run directory or R/export/saved_model")
    if path.suffix == ".keras":
        return "keras"
    if path.suffix == ".tflite":
        return "tflite"
    raise PredictError(f"--model={path}: unknown model file; give a run directory, a SavedModel "
                       f"directory, a .keras file or a .tflite file")


def load_predictor(path: str | os.PathLike, calibration_name: str | None = None,
                   lungs: lung_serving.LungOptions | None = None) -> Predictor:
    """Load ``--model`` (see the module docstring) with its serving config and lung model.

    ``.keras`` files are loaded with Keras safe mode (:func:`pneumo_tf.core.rundir.load_model`);
    SavedModels and TFLite files are graphs and flatbuffers, nothing is unpickled.

    Args:
        path: a run (or ensemble) directory, ``.keras`` file, SavedModel or ``.tflite`` file.
        calibration_name: for a run directory or ``.keras`` file, the run's calibration to
            apply (None = ``val``); for an exported model, None or the name baked in.
        lungs: ``--lung_model`` and the no-lungs thresholds (None: the run's own lung model or
            the one baked in, with their thresholds).

    Raises:
        PredictError, rundir.RunDirError: unusable model path, calibration or lung model (the
            message says what to give).
    """
    predictor = _load_model(Path(path), calibration_name)
    predictor.lungs = _host_lungs(predictor, lungs or lung_serving.LungOptions())
    if predictor.lungs is not None:
        predictor.config.lungs = predictor.lungs.settings.to_json()
    if not predictor.config.calibrated:
        log.warning("%s has no calibration.json: calibrated_probability = probability "
                    "(T = 1) and the threshold is 0.5. Calibrate the run on its validation "
                    "split for honest probabilities.", path)
    return predictor


def _load_model(path: Path, calibration_name: str | None) -> Predictor:
    """The model of ``--model`` and its serving config (see :func:`load_predictor`)."""
    kind = model_kind(path)
    name = calibration_name or rundir.VAL_CALIBRATION
    if kind == "run_dir":
        run = rundir.Run(path)
        if run.task == "lungs":
            raise PredictError(f"--model={path} is a lung model (--task=lungs); predict with a "
                               f"classifier run and pass --lung_model={path}")
        predictor = _keras_predictor(kind, path, run, name)
    elif kind == "keras":
        if not rundir.RunPaths(path.parent).data_manifest.is_file():
            raise PredictError(f"--model={path}: no data_manifest.json beside it, so the image size "
                               f"and crop the model was trained with are unknown; point --model "
                               f"at the run directory that holds it")
        predictor = _keras_predictor(
            kind, path, rundir.Run(path.parent, model=rundir.load_model(path)), name)
    elif kind == "saved_model":
        import tensorflow as tf

        config = _read_serving_config(path / "assets.extra" / serving.SERVING_CONFIG_NAME, path)
        _check_baked_calibration(config, path, calibration_name)
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures.get("preprocessed")
        if signature is None:
            raise PredictError(f"--model={path}: SavedModel has no 'preprocessed' signature; "
                               f"re-export it with `python -m pneumo_tf.export`")
        predictor = Predictor(kind, path, config, _signature_outputs(signature),
                              saved_model=loaded)
    else:
        config = _read_serving_config(path.parent / serving.SERVING_CONFIG_NAME, path)
        _check_baked_calibration(config, path, calibration_name)
        runner = serving.TFLiteRunner(path)
        if runner.image_size != config.image_size:
            raise PredictError(f"--model={path} takes {runner.image_size}px images but "
                               f"{serving.SERVING_CONFIG_NAME} beside it says "
                               f"{config.image_size}px; re-export the run")
        predictor = Predictor(kind, path, config, runner.outputs)
    if predictor.config.task == "lungs":
        raise PredictError(f"--model={path} is an exported lung model; predict with a "
                           f"classifier and pass --lung_model=<its lungs run>")
    return predictor


def _host_lungs(predictor: Predictor, options: lung_serving.LungOptions
                ) -> lung_serving.HostLungs | None:
    """The lung model ``predictor`` runs on the host: a run's own or ``--lung_model`` (Keras), or
    an exported model's (its SavedModel's ``lungs`` signature, the TFLite lung model beside it).

    Raises:
        PredictError, rundir.RunDirError: ``--lung_model`` beside an exported model that carries
            one, a missing TFLite lung model, or an unusable lung model.
    """
    from pneumo_tf.modeling import lungs as lungs_lib

    source = predictor.source
    if predictor.run is not None:
        lung_model, settings = lung_serving.for_run(predictor.run, options)
        return None if lung_model is None else lung_serving.keras_lungs(lung_model, settings)
    baked = predictor.config.lungs
    if baked is None:
        if not options.lung_model:
            return None
        lung_model = lungs_lib.LungModel(options.lung_model)
        return lung_serving.keras_lungs(lung_model, lung_serving.settings_for(
            lung_model, None, options.min_lung_fraction, options.min_lung_confidence))
    if options.lung_model:
        raise PredictError(f"--lung_model={options.lung_model}: {source} was exported with the "
                           f"lung model {baked['path']} baked in; pass --model=<the run "
                           f"directory> to serve it with another")
    settings = options.apply(lung_serving.LungSettings.from_json(baked))
    if predictor.saved_model is not None:
        signature = predictor.saved_model.signatures.get("lungs")
        if signature is None:
            raise PredictError(f"--model={source}: no 'lungs' signature although its serving "
                               f"config names a lung model; re-export the run")
        return lung_serving.saved_model_lungs(signature, settings)
    tflite = source.parent / lung_serving.LUNG_TFLITE_NAME
    if not tflite.is_file():
        raise PredictError(f"{tflite} is missing: {source} needs its lung model beside it; "
                           f"re-export the run with --formats=tflite")
    return lung_serving.tflite_lungs(tflite, settings)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class InputImage:
    """One input after reading and preprocessing, or the reason it failed.

    Attributes:
        path: the path as given (or found in a folder).
        image: ``[S, S] uint8`` model input (None when ``error``).
        refer_reasons: film-likeness reasons (:func:`pneumo_tf.serving.refer.film_refer_reasons`).
        error: why the input could not be used, or None.
        image_checks: the OOD guard's image checks of the full film
            (:func:`pneumo_tf.ood.film_orientation_reasons`: ``inverted``, ``on_its_side``).
        lungs: what the lung model found on the whole film, or None (no lung model).
    """

    path: str
    image: np.ndarray | None = None
    refer_reasons: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    image_checks: list[str] = dataclasses.field(default_factory=list)
    lungs: preprocess.LungFinding | None = None


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[InputImage]:
    """Files as given, folders expanded (recursive, sorted) to their JPEG/PNG/DICOM files.

    Missing paths and folders without images become failed inputs, not exceptions. A file given
    explicitly is tried whatever its extension (the decoder judges it by its content).
    """
    out = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                out.append(InputImage(str(given), error=f"folder has no {'/'.join(IMAGE_SUFFIXES)} "
                                                        f"files"))
            out.extend(InputImage(str(f)) for f in found)
        elif p.is_file():
            out.append(InputImage(str(given)))
        else:
            out.append(InputImage(str(given), error="no such file or directory"))
    return out


def read_input(path: str, image_size: int, crop: str,
               lungs: lung_serving.HostLungs | None = None) -> InputImage:
    """Read, decode and preprocess one file like the converter; failures become ``error``."""
    return read_inputs([InputImage(path)], image_size, crop, lungs)[0]


def read_inputs(items: list[InputImage], image_size: int, crop: str,
                lungs: lung_serving.HostLungs | None = None) -> list[InputImage]:
    """Read, decode and preprocess files like the converter (failures become ``error``); with a
    lung model, run on the decoded films together, each film's lungs (and a ``--crop=lungs``
    run's crop box)."""
    decoded = {}
    for i, item in enumerate(items):
        if item.error is None:
            try:
                data = Path(item.path).read_bytes()
            except OSError as e:
                items[i] = InputImage(item.path, error=f"cannot read file ({e.strerror or e})")
                continue
            result = _decode_input(data, item.path, image_size, crop)
            if isinstance(result, InputImage):
                items[i] = result
            else:
                decoded[i] = result
    findings = lungs.find([d.gray for d in decoded.values()]) if lungs is not None else None
    for k, (i, d) in enumerate(decoded.items()):
        items[i] = _finish_input(items[i].path, d.gray, (d.orig_height, d.orig_width), d.scale,
                                 (image_size, crop), findings[k] if findings else None)
    return items


def read_input_bytes(data: bytes, path: str, image_size: int, crop: str,
                     lungs: lung_serving.HostLungs | None = None) -> InputImage:
    """Decode and preprocess one file's bytes like the converter; failures become ``error``."""
    d = _decode_input(data, path, image_size, crop)
    if isinstance(d, InputImage):
        return d
    finding = lungs.find([d.gray])[0] if lungs is not None else None
    return _finish_input(path, d.gray, (d.orig_height, d.orig_width), d.scale, (image_size, crop),
                         finding)


def _decode_input(data: bytes, path: str, image_size: int, crop: str):
    """The decoded film (:class:`pneumo_tf.data.decode.DecodedImage`) or a failed input."""
    try:
        return decode.decode_bytes(data, name=Path(path).name, target_size=image_size, crop=crop)
    except decode.RejectError as e:
        return InputImage(path, error=str(e))
    except Exception as e:  # noqa: BLE001 -- one bad file must not stop the others; it is reported
        return InputImage(path, error=f"unexpected decoder error: {type(e).__name__}: {e}")


def _finish_input(path: str, gray: np.ndarray, orig_hw: tuple[int, int], scale: int,
                  model_input: tuple[int, str], finding: preprocess.LungFinding | None
                  ) -> InputImage:
    """A decoded film cropped and resized (``model_input``: image size and crop; the lung crop
    from ``finding``), with its film-likeness reasons, image checks and lungs."""
    image_size, crop = model_input
    if crop == "lungs":
        if finding is None:
            raise PredictError("--crop=lungs runs need their lung model on the host")
        image, box, _ = preprocess.preprocess_gray(gray, image_size, crop, finding.box)
    else:
        image, box, _ = preprocess.preprocess_gray(gray, image_size, crop)
    crop_hw = ((box.bottom - box.top) * scale, (box.right - box.left) * scale)
    reasons = refer.film_refer_reasons(gray, orig_hw[0], orig_hw[1], crop_hw, image_size)
    return InputImage(path, image=image, refer_reasons=reasons,
                      image_checks=ood.film_orientation_reasons(gray), lungs=finding)


def read_input_gray(gray: np.ndarray, path: str, image_size: int, crop: str,
                    lungs: lung_serving.HostLungs | None = None) -> InputImage:
    """An already decoded ``[H, W] uint8`` film through the rest of :func:`read_input_bytes`'s
    path (lungs, crop, resize, film-likeness reasons, image checks), as if decoded at full
    size."""
    gray = np.ascontiguousarray(gray, np.uint8)
    finding = lungs.find([gray])[0] if lungs is not None else None
    return _finish_input(path, gray, gray.shape[:2], 1, (image_size, crop), finding)


# ---------------------------------------------------------------------------------------------
# Prediction


def result_record(path: str, probability: float, config: serving.ServingConfig,
                  film_reasons: list[str], refer_band: float, ood_score: float | None = None,
                  image_checks: list[str] = (), class_probabilities=None,
                  lungs: preprocess.LungFinding | None = None) -> dict:
    """The output record of one predicted input (see the module docstring); refer, its reasons
    and ``in_distribution`` by :func:`pneumo_tf.serving.refer.decide`, as the bytes signature.

    ``label`` is :func:`pneumo_tf.evaluation.metrics.decide_label` of the record's own
    ``calibrated_probability`` and ``threshold`` (the calibrated-scale threshold), so
    ``label == (calibrated_probability >= threshold)`` holds for the numbers in the record.

    Args:
        film_reasons: the film checks that failed (:data:`pneumo_tf.serving.refer.FILM_REASONS`).
        refer_band: half-width of the ``uncertain`` band around the threshold.
        ood_score: the image's OOD score, or None (a model without a guard).
        image_checks: the guard's image checks that failed (``inverted``, ``on_its_side``,
            ``upside_down``).
        class_probabilities: ``[3]`` for a subtype model (adds ``subtype`` and
            ``subtype_probability``), else None.
        lungs: what the lung model (``config.lungs``) found on the whole film, or None:
            ``lung_fraction`` and ``lung_confidence``, and ``no_lungs_found`` where
            :func:`pneumo_tf.serving.lungs.lungs_found` says so.
    """
    calibrated = float(calibration.apply_temperature(np.float64(probability), config.temperature))
    threshold = config.calibrated_threshold()
    label = int(pmetrics.decide_label(calibrated, threshold))
    found = set(film_reasons) | set(image_checks)
    if lungs is not None and not lung_serving.lungs_found(
            lungs.fraction, lungs.confidence, lung_serving.LungSettings.from_json(config.lungs)):
        found.add(refer.NO_LUNGS_FOUND)
    known = ood_score is not None and config.ood_threshold is not None
    decided = refer.decide({name: np.bool_(name in found) for name in refer.CHECKS},
                           np.bool_(known and ood_score > config.ood_threshold),
                           np.bool_(abs(calibrated - threshold) <= refer_band), known)
    in_distribution = bool(decided["in_distribution"]) if known else None
    diagnosed = in_distribution is not False  # no diagnosis for what the guard rejects
    record = {"path": path, "probability": float(probability),
              "calibrated_probability": calibrated, "threshold": threshold,
              "calibration": config.calibration, "label": label if diagnosed else None,
              "class_name": pneumo_tf.CLASS_NAMES[label] if diagnosed else None,
              "refer": bool(decided["refer"]),
              "refer_reasons": refer.reason_names(decided["reasons"]),
              "ood_score": float(ood_score) if known else None,
              "in_distribution": in_distribution,
              "lung_fraction": float(lungs.fraction) if lungs is not None else None,
              "lung_confidence": float(lungs.confidence) if lungs is not None else None}
    if class_probabilities is not None:
        record.update(serving.subtype_fields(class_probabilities, label if diagnosed else 0,
                                             config.subtype_temperature))
    return record


def gradcam_file_name(index: int, path: str) -> str:
    """``00003_person12_bacteria.png``: input order first, so equal base names never collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "image"
    return f"{index:05d}_{stem}.png"


def predict_paths(predictor: Predictor, paths: Iterable[str | os.PathLike], batch_size: int = 32,
                  refer_band: float | None = None,
                  gradcam_dir: str | os.PathLike | None = None) -> Iterator[dict]:
    """Predict every input, batch by batch; yields one record per input, in input order.

    Args:
        predictor: from :func:`load_predictor`.
        paths: files and folders.
        batch_size: images per forward pass.
        refer_band: half-width of the uncertainty band around the threshold, in calibrated
            probability (None: the model's, ``config.refer_band``: the one baked in at export,
            else :data:`pneumo_tf.serving.refer.DEFAULT_REFER_BAND`).
        gradcam_dir: write one Grad-CAM overlay PNG per predicted input here (Keras models only).

    Raises:
        PredictError: ``gradcam_dir`` with a SavedModel/TFLite model, or bad arguments.
    """
    if batch_size < 1:
        raise PredictError(f"--batch_size={batch_size}: must be at least 1")
    refer_band = predictor.config.refer_band if refer_band is None else refer_band
    if not 0.0 <= refer_band <= 1.0:
        raise PredictError(f"--refer_band={refer_band}: must be in [0, 1]")
    cam_model = None
    if gradcam_dir is not None:
        if predictor.keras_model is None:
            raise PredictError(
                f"--gradcam_dir needs the Keras model: a {predictor.kind} has no access to the "
                f"backbone's feature maps. Pass --model=<run directory> (the one exported to "
                f"{predictor.source})")
        from pneumo_tf.explain import cam

        cam_model = cam.cam_model_for(predictor.keras_model, predictor.config.cam_layer,
                                      predictor.config.backbone)
        Path(gradcam_dir).mkdir(parents=True, exist_ok=True)
    cfg = predictor.config
    items = expand_inputs(paths)
    for start in range(0, len(items), batch_size):
        chunk = [item if item.error else _with_upright_check(item, cfg) for item in read_inputs(
            items[start:start + batch_size], cfg.image_size, cfg.crop, predictor.lungs)]
        ok = [i for i, item in enumerate(chunk) if item.error is None]
        records_out: list[dict] = [{"path": item.path, "error": item.error} for item in chunk]
        if ok:
            images = np.stack([chunk[i].image for i in ok])[..., None]
            outputs = predictor.outputs(images)
            for k, i in enumerate(ok):
                records_out[i] = _record_of(chunk[i], outputs, k, cfg, refer_band)
            if cam_model is not None:
                _write_gradcam(cam_model, images, [start + i for i in ok],
                               [records_out[i] for i in ok], Path(gradcam_dir))
        yield from records_out


def _with_upright_check(item: InputImage, cfg: serving.ServingConfig) -> InputImage:
    """``item`` with the guard's upside-down check of its model input among its image checks."""
    if item.error is None:
        item.image_checks = item.image_checks + ood.upright_reasons(cfg.ood, item.image)
    return item


def _record_of(item: InputImage, outputs: dict, k: int, cfg: serving.ServingConfig,
               refer_band: float) -> dict:
    """:func:`result_record` of the ``k``-th image of a batch's ``outputs``."""
    score = outputs.get("ood_score")
    probs = outputs.get("class_probabilities")
    return result_record(item.path, float(np.asarray(outputs["probability"]).reshape(-1)[k]), cfg,
                         item.refer_reasons, refer_band,
                         float(score[k]) if score is not None else None, item.image_checks,
                         probs[k] if probs is not None else None, item.lungs)


def ood_rates(predictor: Predictor, gray_images: list[np.ndarray], batch_size: int = 32) -> dict:
    """How many decoded films the OOD guard flags, through predict's own path.

    Args:
        predictor: from :func:`load_predictor`, with an OOD guard.
        gray_images: ``[H, W] uint8`` decoded images (full films: the image checks see them).

    Returns:
        ``{"n", "flagged", "flagged_by_features", "flagged_by_image_checks"}``: the count and
        the fractions not ``in_distribution``, above the score threshold, and failing an image
        check (the last two overlap).

    Raises:
        PredictError: the model has no OOD guard.
    """
    cfg = predictor.config
    if cfg.ood_threshold is None:
        raise PredictError(f"{predictor.source} has no OOD guard (no ood.json); fit it with "
                           f"`python -m pneumo_tf.ood --run_dir=<run dir>`")
    by_features, by_checks = [], []
    for start in range(0, len(gray_images), batch_size):
        items = [_with_upright_check(read_input_gray(g, f"image_{start + i}", cfg.image_size,
                                                     cfg.crop, predictor.lungs), cfg)
                 for i, g in enumerate(gray_images[start:start + batch_size])]
        scores = predictor.outputs(np.stack([item.image for item in items])[..., None])["ood_score"]
        by_features += [bool(score > cfg.ood_threshold) for score in scores]
        by_checks += [bool(item.image_checks) for item in items]
    n = len(by_features)
    flagged = [a or b for a, b in zip(by_features, by_checks)]
    return {"n": n, "flagged": float(np.mean(flagged)) if n else 0.0,
            "flagged_by_features": float(np.mean(by_features)) if n else 0.0,
            "flagged_by_image_checks": float(np.mean(by_checks)) if n else 0.0}


def _write_gradcam(cam_model, images: np.ndarray, indices: list[int], recs: list[dict],
                   out_dir: Path) -> None:
    import cv2

    from pneumo_tf.explain import cam

    cams = cam.gradcam_batch(cam_model, images)["cam"]
    for image, heat, index, rec in zip(images, cams, indices, recs):
        target = out_dir / gradcam_file_name(index, rec["path"])
        rgb = cam.overlay_cam(image[..., 0], heat)
        if not cv2.imwrite(str(target), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {target}")
        rec["gradcam"] = str(target)


def format_table_row(rec: dict) -> str:
    """One fixed-width text row of :func:`format_table_header`'s columns (``label`` shows the
    subtype of a three-class model's PNEUMONIA rows, ``ood`` the guard's verdict: ``in``,
    ``OUT`` or ``-`` without a guard)."""
    if "error" in rec:
        return (f"{'-':>11} {'-':>10} {'-':>9} {'ERROR':<9} {'-':<5} {'-':<3} {rec['path']}  "
                f"({rec['error']})")
    reasons = f"  ({', '.join(rec['refer_reasons'])})" if rec["refer_reasons"] else ""
    label = rec.get("subtype") or rec["class_name"] or "-"
    verdict = {None: "-", True: "in", False: "OUT"}[rec.get("in_distribution")]
    return (f"{rec['probability']:>11.4f} {rec['calibrated_probability']:>10.4f} "
            f"{rec['threshold']:>9.4f} {label:<9} {'yes' if rec['refer'] else 'no':<5} "
            f"{verdict:<3} {rec['path']}{reasons}")


def format_table_header() -> str:
    return (f"{'probability':>11} {'calibrated':>10} {'threshold':>9} {'label':<9} {'refer':<5} "
            f"{'ood':<3} path")
