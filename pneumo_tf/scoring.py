"""Score one split of a data dir with a model: probabilities, labels and ids in file order.

Shared by evaluation, calibration, Grad-CAM and export parity checks, so every stage reads the
split the same way: :func:`pneumo_tf.data.pipeline.make_eval_dataset` (one pass, the manifest's
file order, no augmentation) and the model called with ``training=False``.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np


def iterate_split(data_dir: str | os.PathLike, split: str, batch_size: int = 64) -> Iterator[dict]:
    """Batches of ``split`` in file order as numpy dicts.

    Yields:
        ``{"image": [B, S, S, 1] uint8, "label": [B] int64, "path": [B] str,
        "patient_id": [B] str}``.

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
            "path": np.array([p.decode("utf-8") for p in batch["path"].numpy()], dtype=object),
            "patient_id": np.array([p.decode("utf-8") for p in batch["patient_id"].numpy()],
                                   dtype=object),
        }


def make_predict_fn(model):
    """A traced ``[B, S, S, 1] uint8 -> [B] float32`` probability function for ``model``.

    One trace serves every batch size (the batch dimension is left unknown).
    """
    import tensorflow as tf

    size = model.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.uint8)])
    def predict(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    return predict


def predict_split(model, data_dir: str | os.PathLike, split: str, batch_size: int = 64,
                  return_images: bool = False, progress_label: str | None = None) -> dict:
    """Probabilities of PNEUMONIA for every image of ``split``, in file order.

    Args:
        model: ``[B, S, S, 1] uint8 -> [B, 1]`` probability model
            (:func:`pneumo_tf.model.build_model`).
        data_dir: converter output; its image size must match the model's input.
        split: a split the manifest lists.
        batch_size: images per forward pass.
        return_images: also keep the decoded images (``"image": [N, S, S, 1] uint8``, N * S^2
            bytes: 31 MB for 624 images at 224 px), so a caller that needs some of them does not
            decode the split a second time.
        progress_label: show a :class:`pneumo_tf.progress.Progress` bar with this label on
            stderr (None: silent).

    Returns:
        ``{"probability": [N] float32, "label": [N] int64, "path": [N] str (object),
        "patient_id": [N] str (object)}``, plus ``"image"`` with ``return_images``.

    Raises:
        ValueError: the data's image size differs from the model's input size.
    """
    from pneumo_tf.data import records

    manifest = records.read_manifest(data_dir)
    size = int(manifest["image_size"])
    if tuple(model.input_shape[1:3]) != (size, size):
        raise ValueError(f"data dir {data_dir} holds {size}x{size} images but the model takes "
                         f"{model.input_shape[1]}x{model.input_shape[2]}; use the data dir the run "
                         f"was trained on (see its data_manifest.json)")
    from pneumo_tf.progress import Progress

    predict = make_predict_fn(model)
    kept = ("label", "path", "patient_id") + (("image",) if return_images else ())
    parts = {"probability": [], **{key: [] for key in kept}}
    total = int((manifest["splits"].get(split) or {}).get("count", 0))
    bar = Progress(total, progress_label or "", enabled=progress_label is not None)
    for batch in iterate_split(data_dir, split, batch_size):
        parts["probability"].append(predict(batch["image"]).numpy())
        for key in kept:
            parts[key].append(batch[key])
        bar.update(sum(len(b) for b in parts["label"]))
    bar.close()
    if not parts["label"]:
        raise records.DataDirError(f"split {split!r} of {data_dir} yielded no images")
    return {k: np.concatenate(v) for k, v in parts.items()}
