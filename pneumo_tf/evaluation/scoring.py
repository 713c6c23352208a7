"""Score one split of a data dir with a model: probabilities, labels and ids in file order.

Shared by evaluation, calibration, Grad-CAM and export parity checks, so every stage reads the
split the same way: :func:`pneumo_tf.data.pipeline.make_eval_dataset` (one pass, the manifest's
file order, no augmentation) and the model called with ``training=False``. The loop itself
(:func:`collect_batches`: score each batch, keep its arrays, show progress) is also the one the
trainer validates with (:meth:`pneumo_tf.training.trainer.Trainer.predict_split`) and the lungs
evaluation scores masks with.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import numpy as np

from pneumo_tf.core.progress import Progress


def iterate_split(data_dir: str | os.PathLike, split: str, batch_size: int = 64) -> Iterator[dict]:
    """Batches of ``split`` in file order as numpy dicts.

    Yields:
        ``{"image": [B, S, S, 1] uint8, "label": [B] int64, "subtype": [B] int64 (0 NORMAL,
        1 BACTERIAL, 2 VIRAL, -1 unknown: every record of a version-1 data dir), "path": [B]
        str, "patient_id": [B] str}``.

    Raises:
        pneumo_tf.data.records.DataDirError: unusable data dir or split, or a corrupt shard
            (named, with the fix).
    """
    from pneumo_tf.data import pipeline

    # Sample weights are not used here: "none" needs no class weights in the manifest.
    ds = pipeline.make_eval_dataset(data_dir, split, batch_size, cache=False,
                                    class_weights="none")
    for batch in pipeline.iterate_checked(ds, data_dir, split):
        yield {
            "image": batch["image"].numpy(),
            "label": batch["label"].numpy().astype(np.int64),
            "subtype": batch["subtype"].numpy().astype(np.int64),
            "path": np.array([p.decode("utf-8") for p in batch["path"].numpy()], dtype=object),
            "patient_id": np.array([p.decode("utf-8") for p in batch["patient_id"].numpy()],
                                   dtype=object),
        }


def collect_batches(batches: Iterable[dict], predict: Callable, collect: Callable,
                    total: int, progress_label: str | None = None) -> dict:
    """The scoring loop: ``predict`` every batch's images, ``collect`` what it keeps.

    Args:
        batches: dicts with ``"image": [B, S, S, 1] uint8`` (numpy or tensors), in file order.
        predict: ``images -> outputs`` (a traced model function; the trainer's distributed one).
        collect: ``(batch, outputs, parts) -> None``; appends the batch's arrays to ``parts``
            (a dict of lists).
        total: images expected (the progress bar's end).
        progress_label: show a :class:`pneumo_tf.core.progress.Progress` bar with this label on
            stderr (None: silent).

    Returns:
        ``parts``: whatever ``collect`` put there (empty for no batch).
    """
    parts: dict = {}
    bar = Progress(total, progress_label or "", enabled=progress_label is not None)
    seen = 0
    for batch in batches:
        collect(batch, predict(batch["image"]), parts)
        seen += len(batch["image"])
        bar.update(seen)
    bar.close()
    return parts


def make_predict_fn(model):
    """A traced ``[B, S, S, 1] uint8 -> [B] float32`` probability function for ``model``.

    One trace serves every batch size (the batch dimension is left unknown).
    """
    import tensorflow as tf

    size = model.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.uint8)], autograph=False)
    def predict(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    return predict


def outputs_model(model, feature_layer: str | None = None):
    """``model`` rebuilt with named outputs, weights shared: one forward pass gives them all.

    Returns:
        ``keras.Model``: ``[B, S, S, 1] uint8`` -> ``{"probability": [B, 1]}``, plus
        ``"class_logits": [B, 3]`` for a subtype model (:func:`pneumo_tf.modeling.model.is_subtype_model`)
        and ``"features": [B, D] float32`` of ``feature_layer`` when given (an ensemble's members'
        features side by side, as :func:`pneumo_tf.ood.feature_model`; its probability is
        the members' mean, as the ensemble's own).
    """
    import keras

    from pneumo_tf.modeling import model as model_lib
    from pneumo_tf.modeling.ensemble_model import COMBINE, ensemble_members

    members = ensemble_members(model)
    if not members:
        outputs = {"probability": model.outputs[0]}
        if model_lib.is_subtype_model(model):
            outputs["class_logits"] = model.get_layer("class_logits").output
        if feature_layer is not None:
            outputs["features"] = keras.ops.cast(_layer(model, feature_layer).output, "float32")
        return keras.Model(model.inputs[0], outputs, name="outputs")
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
    probs, feats = [], []
    for member in members:
        parts = [member.outputs[0]] + ([_layer(member, feature_layer).output]
                                       if feature_layer is not None else [])
        out = keras.Model(member.inputs[0], parts)(inputs)
        probs.append(out[0])
        feats.append(keras.ops.cast(out[1], "float32") if feature_layer is not None else None)
    outputs = {"probability": keras.layers.Average(name=COMBINE, dtype="float32")(probs)}
    if feature_layer is not None:
        outputs["features"] = keras.layers.Concatenate(dtype="float32")(feats)
    return keras.Model(inputs, outputs, name="outputs")


def _layer(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError as e:
        raise ValueError(f"the model has no layer {name!r} for OOD features (a model built by "
                         f"pneumo_tf.modeling.model.build_model has 'dense' and 'gap')") from e


def make_outputs_fn(model, feature_layer: str | None = None):
    """A traced ``[B, S, S, 1] uint8 -> dict`` function of :func:`outputs_model`'s outputs.

    Returns:
        ``{"probability": [B] float32}``, plus ``"class_logits": [B, 3]`` and ``"features":
        [B, D]`` as :func:`outputs_model` gives them.
    """
    import tensorflow as tf

    net = outputs_model(model, feature_layer)

    @tf.function(input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)],
                 autograph=False)
    def outputs(images):
        out = net(images, training=False)
        return {**out, "probability": tf.reshape(tf.cast(out["probability"], tf.float32), [-1])}

    return outputs


def predict_split(model, data_dir: str | os.PathLike, split: str, batch_size: int = 64,
                  return_images: bool = False, progress_label: str | None = None,
                  ood_stats=None) -> dict:
    """Probabilities of PNEUMONIA for every image of ``split``, in file order.

    Args:
        model: ``[B, S, S, 1] uint8 -> [B, 1]`` probability model
            (:func:`pneumo_tf.modeling.model.build_model`).
        data_dir: converter output; its image size must match the model's input.
        split: a split the manifest lists.
        batch_size: images per forward pass.
        return_images: also keep the decoded images (``"image": [N, S, S, 1] uint8``, N * S^2
            bytes: 31 MB for 624 images at 224 px), so a caller that needs some of them does not
            decode the split a second time.
        progress_label: show a :class:`pneumo_tf.core.progress.Progress` bar with this label on
            stderr (None: silent).
        ood_stats: a run's :class:`pneumo_tf.ood.OodStats`: also score every image's features
            (same forward pass).

    Returns:
        ``{"probability": [N] float32, "label": [N] int64, "subtype": [N] int64, "path": [N]
        str (object), "patient_id": [N] str (object)}``, plus ``"image"`` with
        ``return_images``, ``"class_logits": [N, 3] float32`` for a subtype model and
        ``"ood_score": [N] float64`` with ``ood_stats``.

    Raises:
        ValueError: the data's image size differs from the model's input size.
    """
    from pneumo_tf.modeling import model as model_lib
    from pneumo_tf.data import records

    manifest = records.read_manifest(data_dir)
    size = int(manifest["image_size"])
    if tuple(model.input_shape[1:3]) != (size, size):
        raise ValueError(f"data dir {data_dir} holds {size}x{size} images but the model takes "
                         f"{model.input_shape[1]}x{model.input_shape[2]}; use the data dir the run "
                         f"was trained on (see its data_manifest.json)")
    if ood_stats is None and not model_lib.is_subtype_model(model):
        plain = make_predict_fn(model)

        def predict(images):
            return {"probability": plain(images)}
    else:
        predict = make_outputs_fn(model, ood_stats.layer if ood_stats is not None else None)
    kept = ("label", "subtype", "path", "patient_id") + (("image",) if return_images else ())

    def collect(batch: dict, outputs: dict, parts: dict) -> None:
        for key in kept:
            parts.setdefault(key, []).append(batch[key])
        for key, value in _scored(outputs, ood_stats).items():
            parts.setdefault(key, []).append(value)

    total = int((manifest["splits"].get(split) or {}).get("count", 0))
    parts = collect_batches(iterate_split(data_dir, split, batch_size), predict, collect, total,
                            progress_label)
    if not parts:
        raise records.DataDirError(f"split {split!r} of {data_dir} yielded no images")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _scored(outputs: dict, ood_stats) -> dict:
    """A batch's numpy outputs, the features replaced by their OOD score."""
    out = {k: v.numpy() for k, v in outputs.items() if k != "features"}
    if ood_stats is not None:
        out["ood_score"] = ood_stats.scores(outputs["features"].numpy())
    return out
