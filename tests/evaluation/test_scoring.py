"""Scoring a split: the named outputs of a model (probability, class logits, OOD features)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_tiny_dataset

SIZE = 32


@pytest.fixture(scope="module")
def models():
    import keras

    from pneumo_tf.modeling import ensemble_model
    from pneumo_tf.modeling import model as pmodel

    keras.utils.set_random_seed(0)
    binary = pmodel.build_model("small_cnn", SIZE, trainable_layers=-1)
    subtype = pmodel.build_model("small_cnn", SIZE, trainable_layers=-1, task="subtype")
    members = [pmodel.build_model("small_cnn", SIZE, trainable_layers=-1) for _ in range(2)]
    return {"binary": binary, "subtype": subtype,
            "ensemble": ensemble_model.build_ensemble_model(members)}


@pytest.mark.parametrize("kind", ["binary", "subtype", "ensemble"])
def test_outputs_model_gives_the_models_probability_and_its_features(models, kind):
    from pneumo_tf.serving import ood
    from pneumo_tf.evaluation import scoring

    model = models[kind]
    images = np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 1), dtype=np.uint8)
    out = scoring.make_outputs_fn(model, "dense")(images)
    np.testing.assert_allclose(out["probability"].numpy(),
                               scoring.make_predict_fn(model)(images).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["features"].numpy(),
                               ood.feature_model(model, "dense")(images).numpy(), atol=1e-5)
    assert ("class_logits" in out) == (kind == "subtype")
    if kind == "subtype":
        from pneumo_tf.evaluation import calibration
        from pneumo_tf.modeling import model as pmodel

        probs = pmodel.class_probability_model(model)(images).numpy()
        np.testing.assert_allclose(calibration.softmax(out["class_logits"].numpy()), probs,
                                   atol=1e-6)
        assert set(scoring.make_outputs_fn(model)(images)) == {"probability", "class_logits"}
    with pytest.raises(ValueError, match="no layer 'nope'"):
        scoring.outputs_model(model, "nope")


def test_predict_split_carries_subtypes_logits_and_ood_scores(models, tmp_path):
    from pneumo_tf.serving import ood
    from pneumo_tf.evaluation import scoring

    data = write_tiny_dataset(tmp_path / "v2", image_size=SIZE)
    old = write_tiny_dataset(tmp_path / "v1", image_size=SIZE, version=1)
    model = models["subtype"]
    feats = ood.feature_model(model, "dense")  # the layer of OodStats that name none
    stats = ood.OodStats(np.zeros((2, 128), np.float32), np.eye(128, dtype=np.float32), 1.0)
    pred = scoring.predict_split(model, data, "test", batch_size=5, ood_stats=stats)
    assert pred["class_logits"].shape == (12, 3) and set(pred["subtype"]) <= {-1, 0, 1, 2}
    assert (pred["subtype"][pred["label"] == 0] == 0).all()
    images = np.concatenate([b["image"] for b in scoring.iterate_split(data, "test", 64)])
    np.testing.assert_allclose(pred["ood_score"], stats.scores(feats(images).numpy()), rtol=1e-5)
    plain = scoring.predict_split(models["binary"], old, "test")
    assert set(plain) == {"probability", "label", "subtype", "path", "patient_id"}
    assert (plain["subtype"] == -1).all()  # version 1: no subtypes
