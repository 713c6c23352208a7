"""Data stage: radiographs -> TFRecord shards (convert) -> tf.data batches (pipeline)."""


def make_dataset(*args, **kwargs):
    """See :func:`pneumo_tf.data.pipeline.make_dataset` (imported lazily: it needs TensorFlow)."""
    from pneumo_tf.data.pipeline import make_dataset as _make_dataset

    return _make_dataset(*args, **kwargs)
