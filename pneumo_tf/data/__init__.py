"""Data stage: radiographs -> TFRecord shards (convert) -> tf.data batches (pipeline)."""
