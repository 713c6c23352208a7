"""Data stage: radiographs -> TFRecord shards (convert) -> tf.data batches (pipeline)."""

# The dataset builders of pneumo_tf.data.pipeline, importable from here without importing
# TensorFlow with the package (the converter's worker processes must not import it).
_PIPELINE_BUILDERS = ("make_train_dataset", "make_eval_dataset", "make_dataset")


def __getattr__(name: str):
    if name in _PIPELINE_BUILDERS:
        from pneumo_tf.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
