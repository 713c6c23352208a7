"""An ensemble as one Keras model: the members nested as ``member_0``, ``member_1``, ... and a mean.

The model side of :mod:`pneumo_tf.evaluation.ensemble` (which writes ensemble run directories):
scoring, Grad-CAM and the OOD guard find the members of a loaded model here.
"""

from __future__ import annotations

COMBINE = "mean_probability"
MEMBER_PREFIX = "member_"


def build_ensemble_model(members: list):
    """One Keras model averaging ``members``' probabilities (each ``[B, S, S, 1] -> [B, 1]``)."""
    import keras

    inputs = keras.Input(members[0].input_shape[1:], dtype=members[0].inputs[0].dtype,
                         name="image")
    outputs = []
    for i, member in enumerate(members):
        member.name = f"{MEMBER_PREFIX}{i}"
        outputs.append(member(inputs))
    mean = keras.layers.Average(name=COMBINE, dtype="float32")(outputs)
    return keras.Model(inputs, mean, name="pneumo_ensemble")


def ensemble_members(model) -> list:
    """The member models of an ensemble model, or ``[]`` for a single model."""
    return [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]
