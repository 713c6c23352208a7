"""A trained model in float32, whatever precision it was trained in.

Runs trained with ``--precision=auto`` may hold a ``mixed_bfloat16`` model; TFLite cannot convert
one, and a lung model must give the same maps on the host (the converter, predict) as in an
exported graph. :func:`float32_model` rebuilds such a model in float32 with the same weights (the
variables of a mixed-precision model are float32 already).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def is_mixed_precision(model) -> bool:
    """True when any layer computes in a dtype other than float32 (e.g. ``mixed_bfloat16``)."""
    return any(getattr(layer, "compute_dtype", "float32") not in ("float32", None)
               for layer in _all_layers(model))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _force_float32_policies(obj):
    """Replace every mixed dtype policy in a Keras config tree by ``float32`` (in place)."""
    if isinstance(obj, dict):
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
                obj.get("config"), dict) and str(obj["config"].get("name", "")).startswith("mixed_"):
            obj["config"]["name"] = "float32"
        for key, value in obj.items():
            if key == "dtype" and isinstance(value, str) and value.startswith("mixed_"):
                obj[key] = "float32"
            else:
                _force_float32_policies(value)
    elif isinstance(obj, list):
        for value in obj:
            _force_float32_policies(value)
    return obj


def float32_model(model):
    """``model`` itself when it is all float32, else a float32 rebuild with the same weights.

    TFLite cannot convert a ``mixed_bfloat16`` graph; the variables of a mixed-precision model are
    float32 already, so rebuilding the architecture with float32 policies and copying the weights
    gives the model the run would have been in float32.
    """
    import keras

    import pneumo_tf.modeling.model  # noqa: F401  (registers the custom layers for from_config)

    if not is_mixed_precision(model):
        return model
    config = _force_float32_policies(model.get_config())
    # Layers whose config names no dtype take the global policy, which a trainer (the precision
    # probe, a bf16 run loading a --lung_gate) may have set to a mixed one: rebuild under float32.
    outer = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        rebuilt = model.__class__.from_config(config)
    finally:
        keras.mixed_precision.set_global_policy(outer)
    rebuilt.set_weights(model.get_weights())
    if is_mixed_precision(rebuilt):
        raise ValueError("could not rebuild the model in float32 (a layer keeps a mixed dtype); "
                         "rebuild it with pneumo_tf.modeling.model.build_model under a float32 policy")
    log.info("rebuilt the mixed-precision model in float32")
    return rebuilt
