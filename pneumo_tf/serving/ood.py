"""Know when not to answer: an out-of-distribution (OOD) score fitted on the run's own features.

``python -m pneumo_tf.ood --run_dir=R [--data_dir=D] [--ood_val_rate=0.01]`` (also run at the end
of training) fits and writes ``R/ood.json`` and ``R/ood_stats.npz``.

The score (:func:`mahalanobis_scores`): the squared Mahalanobis distance of an image's features
(``--ood_layer=auto``: the backbone's pooled ``gap`` features when they are at most 1,024 wide,
as for ``small_cnn``'s 256, else the head's 128-wide hidden ``dense`` layer, whose constants stay
small in an exported model; the members' features side by side for an ensemble) to the
nearer of two class-wise Gaussians with one shared covariance, fitted on the train split and
shrunk towards a scaled identity (Ledoit-Wolf), so that a few hundred films give
a well-conditioned inverse. The threshold is set on the val split so that ``--ood_val_rate`` of
its (in-distribution) images score above it. An image above the threshold is not a film the
model has learnt to read: ``in_distribution`` is false, and ``predict`` refers it.

A score on the single sigmoid logit (energy, max-softmax) separates nothing for a binary model;
distances in feature space see a photo, a document or a rotated film as far from every film of
the training set. Cheap image checks catch what features can miss: an inverted film (lungs
bright, spine dark) and a film on its side (:func:`film_orientation_reasons`, fixed rules on the
full film), and an upside-down film (:func:`upright_reasons`: a linear probe on a 16x16
thumbnail of the model's input, fitted with the guard on the run's train films against their
vertical flips; an upside-down film keeps the spine band and most of its features).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.serving.refer import INVERTED, ON_ITS_SIDE, UPSIDE_DOWN

log = logging.getLogger(__name__)

OOD_JSON = rundir.OOD_JSON  # the file names live with the run directory
OOD_STATS = rundir.OOD_STATS
DEFAULT_LAYER = "auto"
# ``auto`` reads the pooled backbone features up to this width: on a small_cnn run at 128 px they
# flagged every kind of bench_ood's far and transformed images by features alone at least as often
# as the dense layer did (quarter crops 0.95 vs 0.33, inverted films 0.98 vs 0.28) and none of
# the other collection's films (dense: 1.4 %). Wider (ResNet50: 2,048) would put a 2,048^2
# precision matrix into every export.
AUTO_MAX_GAP_WIDTH = 1024
LEGACY_LAYER = "dense"   # the layer of an ood.json that does not name one
DEFAULT_VAL_RATE = 0.01
THUMB = 16


@dataclasses.dataclass
class OodStats:
    """The fitted statistics: class means ``[K, D]``, shared precision ``[D, D]``, threshold."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    layer: str = LEGACY_LAYER
    upright: dict | None = None   # ood.json's "upright" probe (None: fitted before it existed)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """:func:`mahalanobis_scores` of ``[N, D]`` features."""
        return mahalanobis_scores(features, self.means, self.precision)


def mahalanobis_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray
                       ) -> np.ndarray:
    """``[N]`` squared Mahalanobis distance of each row of ``features`` to the nearest mean."""
    x = np.asarray(features, np.float64)
    best = None
    for mean in np.asarray(means, np.float64):
        d = x - mean
        dist = np.einsum("nd,de,ne->n", d, precision, d)
        best = dist if best is None else np.minimum(best, dist)
    return best


def whitening(means: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(A [D, D], mean_rows [K, D], scale)`` with ``(x - mean_k) P (x - mean_k) =
    scale^2 * |x A - mean_rows[k]|^2``: ``P = W W^T`` (eigen decomposition, float64) and
    ``A = W / scale``, so every constant lies in [-1, 1] whatever the features' units.

    An exported model may store its constants as float16 (range +-65504): the precision matrix
    itself can exceed that (features of a barely trained model are tiny, their precision huge),
    its scaled square root cannot.
    """
    values, vectors = np.linalg.eigh(np.asarray(precision, np.float64))
    w = vectors * np.sqrt(np.clip(values, 0.0, None))
    scale = float(np.abs(w).max()) or 1.0
    a = w / scale
    return a, np.asarray(means, np.float64) @ a, scale


def tf_mahalanobis_scores(features, means: np.ndarray, precision: np.ndarray):
    """In-graph twin of :func:`mahalanobis_scores`: ``[B, D]`` features -> ``[B]`` float32.

    The fitted constants are baked into the graph in the scaled whitening form of
    :func:`whitening` (``D * D + K * D + 1`` floats: 66 KB in float32, 33 KB in float16 for the
    128-wide ``dense`` layer). Computed in float32, the host's float64 scores agree to a relative
    1e-5 or so.

    The product with the whitening matrix is written as a broadcast multiply and a sum, not a
    matmul: TFLite's dynamic-range (int8) quantisation turns a matmul with a constant into an
    int8 one that quantises the features too, which moved the scores of a real run by up to
    150 % (median 10 %); a multiply keeps the matrix in float32 (66 KB) and the scores within
    5 % (median 1 %). The float16 model stores it in float16 either way (within 1 %).
    """
    import tensorflow as tf

    a, mean_rows, scale = whitening(means, precision)
    x = tf.reduce_sum(tf.cast(features, tf.float32)[:, :, tf.newaxis]
                      * tf.constant(a, tf.float32)[tf.newaxis], axis=1)             # [B, D]
    u = x[:, tf.newaxis, :] - tf.constant(mean_rows, tf.float32)[tf.newaxis]       # [B, K, D]
    s = tf.constant(scale, tf.float32)
    # scale * (scale * |u|^2): each factor stays within float16's range for scale < 65504.
    return s * (s * tf.reduce_min(tf.reduce_sum(u * u, axis=-1), axis=-1))


def fit_gaussians(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the shrunk shared precision matrix of ``[N, D]`` features.

    Returns:
        ``(means [K, D], precision [D, D])``, K = the classes present in ``labels``.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(int).reshape(-1)
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    return means, np.linalg.pinv(cov, hermitian=True)


def threshold_at_rate(val_scores: np.ndarray, rate: float) -> float:
    """The score above which a fraction ``rate`` of the validation images lie."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"--ood_val_rate={rate} must be in [0, 1)")
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - rate))


# ---------------------------------------------------------------------------------------------
# Features of a run's model


def resolve_layer(model, layer: str = DEFAULT_LAYER) -> str:
    """``layer``, with ``auto`` made ``gap`` or ``dense`` (see :data:`AUTO_MAX_GAP_WIDTH`)."""
    if layer != "auto":
        return layer
    from pneumo_tf.modeling.ensemble_model import ensemble_members

    try:
        width = sum(int(m.get_layer("gap").output.shape[-1])
                    for m in ensemble_members(model) or [model])
    except ValueError:  # no 'gap' layer: not a model of pneumo_tf.modeling.model.build_model
        return LEGACY_LAYER
    return "gap" if width <= AUTO_MAX_GAP_WIDTH else "dense"


def feature_model(model, layer: str = DEFAULT_LAYER):
    """``[B, S, S, 1] uint8 -> [B, D] float32`` features of ``layer`` (members' side by side;
    ``auto``: :func:`resolve_layer`)."""
    import keras

    from pneumo_tf.modeling.ensemble_model import ensemble_members

    layer = resolve_layer(model, layer)
    members = ensemble_members(model) or [model]
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name="image")
    parts = []
    for member in members:
        try:
            inner = member.get_layer(layer)
        except ValueError as e:
            raise ValueError(f"the model has no layer {layer!r} for OOD features (a model built "
                             f"by pneumo_tf.modeling.model.build_model has 'dense' and 'gap')") from e
        sub = keras.Model(member.inputs, inner.output)
        parts.append(keras.ops.cast(sub(inputs), "float32"))
    out = parts[0] if len(parts) == 1 else keras.layers.Concatenate(dtype="float32")(parts)
    return keras.Model(inputs, out, name="ood_features")


def split_features(features_fn, data_dir, split: str, batch_size: int = 64
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features [N, D], labels [N], thumbnails [N, 16, 16])`` of a whole split through
    ``features_fn`` (the thumbnails: :func:`thumbnails` of the images)."""
    from pneumo_tf.evaluation import scoring

    def collect(batch, features, parts):
        parts.setdefault("features", []).append(np.asarray(features, np.float32))
        parts.setdefault("label", []).append(batch["label"])
        parts.setdefault("thumbnails", []).append(thumbnails(batch["image"]))

    parts = scoring.collect_batches(scoring.iterate_split(data_dir, split, batch_size),
                                    features_fn, collect, total=0)
    return tuple(np.concatenate(parts.get(key, []))
                 for key in ("features", "label", "thumbnails"))


def fit_run(run_dir: "str | os.PathLike | rundir.Run",
            data_dir: str | os.PathLike | None = None, val_rate: float = DEFAULT_VAL_RATE,
            layer: str = DEFAULT_LAYER, batch_size: int = 64) -> dict:
    """Fit the OOD statistics of a run on its train split, the threshold on val; write them.

    Args:
        run_dir: a finished run (or ensemble) directory, or its
            :class:`~pneumo_tf.core.rundir.Run` (whose model is used).
        data_dir: the run's data dir; default: the one in its summary / ``flags.txt``.
        val_rate: fraction of val images the threshold flags.
        layer: the feature layer (``auto``: :func:`resolve_layer`; ood.json names the one used).

    Returns:
        The ``ood.json`` content.
    """
    run = rundir.Run.open(run_dir)
    data_dir = data_dir or run.data_dir
    if not data_dir:
        raise rundir.RunDirError(f"{run} does not name its data dir; pass --data_dir")
    rundir.check_data_compatible(run, data_dir)
    threshold_at_rate(np.zeros(1), val_rate)  # validate before the long part
    model = run.model
    layer = resolve_layer(model, layer)
    features = feature_model(model, layer)
    train_x, train_y, train_thumbs = split_features(features, data_dir, "train", batch_size)
    means, precision = fit_gaussians(train_x, train_y)
    val_x, _, val_thumbs = split_features(features, data_dir, "val", batch_size)
    val_scores = mahalanobis_scores(val_x, means, precision)
    threshold = threshold_at_rate(val_scores, val_rate)
    paths = run.paths
    with atomic_files.atomic_output(paths.root / OOD_STATS, keep_suffix=True) as tmp:
        np.savez(tmp, means=means.astype(np.float32), precision=precision.astype(np.float32))
    info = {"method": "mahalanobis_shared_ledoit_wolf", "layer": layer,
            "feature_dim": int(means.shape[1]), "threshold": threshold, "val_rate": val_rate,
            "val_flagged": float(np.mean(val_scores > threshold)),
            "fitted_on": {"data_dir": str(Path(data_dir).resolve()), "train": int(len(train_y)),
                          "val": int(len(val_scores))},
            "train_score_median": float(np.median(mahalanobis_scores(train_x, means, precision))),
            "val_score_median": float(np.median(val_scores)),
            "upright": fit_upright_probe(train_thumbs, val_thumbs, val_rate)}
    atomic_files.write_json_atomic(paths.root / OOD_JSON, info)
    return info


def read_guard(run_dir: str | os.PathLike) -> dict | None:
    """The run's ``ood.json``, or None without a fitted guard (``ood.json`` and its statistics
    file; older runs have neither)."""
    import json

    paths = rundir.RunPaths(run_dir)
    if not (paths.ood_json.is_file() and paths.ood_stats.is_file()):
        return None
    return json.loads(paths.ood_json.read_text(encoding="utf-8"))


def load_stats(run_dir: str | os.PathLike) -> OodStats | None:
    """The run's fitted OOD statistics, or None for a run without ``ood.json`` (older runs)."""
    info = read_guard(run_dir)
    if info is None:
        return None
    with np.load(rundir.RunPaths(run_dir).ood_stats) as arrays:
        return OodStats(arrays["means"], arrays["precision"], float(info["threshold"]),
                        info.get("layer", LEGACY_LAYER), info.get("upright"))


# ---------------------------------------------------------------------------------------------
# Image checks: polarity and orientation of a frontal film

# On a frontal chest film the spine and mediastinum make a bright vertical band between two dark
# lung fields. On the film's standardised 64x64 thumbnail, the band's contrast against the lungs
# (``vertical_band``) and the same measured across rows (``horizontal_band``) separate upright
# films from inverted (MONOCHROME1) ones and from films on their side. Thresholds keep 99 % of
# real films (1,000 full-resolution Kermany train films, 5,216 224-px ones and the 210 of the
# other collection) passing.
MIN_VERTICAL_BAND = 0.15     # below: no bright spine between dark lungs (inverted, or sideways)
MAX_BAND_RATIO_GAP = 0.25    # horizontal_band above vertical_band by this: the film is on its side


def band_contrasts(gray: np.ndarray) -> tuple[float, float]:
    """``(vertical_band, horizontal_band)`` of a ``[H, W] uint8`` image (see above).

    Each is the mean of the central fifth minus the mean of the two lateral fifths (between 15 %
    and 35 % from either edge), in units of the image's standard deviation, over the middle half
    of the other axis.
    """
    import cv2

    s = cv2.resize(np.asarray(gray, np.uint8), (64, 64), interpolation=cv2.INTER_AREA)
    s = s.astype(np.float32)
    s = (s - s.mean()) / (s.std() + 1e-6)

    def band(a):
        mid = a[16:48]
        return float(mid[:, 26:38].mean() - 0.5 * (mid[:, 10:22].mean() + mid[:, 42:54].mean()))

    return band(s), band(s.T)


def film_orientation_reasons(gray: np.ndarray) -> list[str]:
    """``[INVERTED]``, ``[ON_ITS_SIDE]`` or ``[]`` for a decoded ``[H, W] uint8`` film (the
    names: :mod:`pneumo_tf.serving.refer`)."""
    vertical, horizontal = band_contrasts(gray)
    sideways = horizontal - vertical > MAX_BAND_RATIO_GAP and horizontal > MIN_VERTICAL_BAND
    if vertical >= MIN_VERTICAL_BAND and not sideways:
        return []
    # A dark spine (inverted) or a bright band across the rows (on its side): the stronger wins.
    return [INVERTED] if -vertical >= horizontal else [ON_ITS_SIDE]


def tf_film_orientation_flags(gray):
    """In-graph twin of :func:`film_orientation_reasons` for one ``[H, W, 1] uint8`` film.

    TensorFlow's area resize to the 64x64 thumbnail stands in for OpenCV's (float vs fixed
    point: the band contrasts agree to about 1e-3, so only films within that of a limit can
    decide differently).

    Returns:
        ``(inverted, on_its_side)``: two scalar bools, at most one true.
    """
    import tensorflow as tf

    s = tf.image.resize(tf.cast(gray, tf.float32), (64, 64), method="area")[..., 0]
    s = (s - tf.reduce_mean(s)) / (tf.math.reduce_std(s) + 1e-6)

    def band(a):
        mid = a[16:48]
        return (tf.reduce_mean(mid[:, 26:38])
                - 0.5 * (tf.reduce_mean(mid[:, 10:22]) + tf.reduce_mean(mid[:, 42:54])))

    vertical, horizontal = band(s), band(tf.transpose(s))
    sideways = tf.logical_and(horizontal - vertical > MAX_BAND_RATIO_GAP,
                              horizontal > MIN_VERTICAL_BAND)
    flagged = tf.logical_or(vertical < MIN_VERTICAL_BAND, sideways)
    inverted = -vertical >= horizontal
    return (tf.logical_and(flagged, inverted),
            tf.logical_and(flagged, tf.logical_not(inverted)))


# ---------------------------------------------------------------------------------------------
# Upside down: a linear probe on the model input's thumbnail

def area_matrix(size: int, out: int = THUMB) -> np.ndarray:
    """``[out, size]`` area-resampling weights: row i averages the pixels under output cell i
    (fractional overlaps weighted), as OpenCV's ``INTER_AREA`` does. As a matrix product it runs
    alike on the host, in a SavedModel and in TFLite (which has no area resize)."""
    edges = np.arange(out + 1) * (size / out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0.0, None)
    return overlap / (size / out)


def thumbnails(images) -> np.ndarray:
    """``[N, 16, 16] float32`` standardised (zero mean, unit deviation) area-resampled
    thumbnails of ``[N, H, W, 1]`` (or ``[N, H, W]``) images."""
    images = np.asarray(images, np.float32)
    images = images[..., 0] if images.ndim == 4 else images
    rows, cols = area_matrix(images.shape[1]), area_matrix(images.shape[2])
    out = np.einsum("ih,nhw,jw->nij", rows, images, cols).astype(np.float32)
    mean = out.mean(axis=(1, 2), keepdims=True)
    return (out - mean) / (out.std(axis=(1, 2), keepdims=True) + 1e-6)


def fit_upright_probe(train_thumbs: np.ndarray, val_thumbs: np.ndarray, val_rate: float) -> dict:
    """A logistic regression of upright films (as given and mirrored left-right) against the
    same films upside down (flipped vertically, and rotated 180 degrees) on their thumbnails.

    The threshold on its decision value flags at most ``val_rate`` of the upright val films
    (never above 0, the fitted boundary). Returns ood.json's ``upright`` entry: ``weights``
    (``16*16``, row-major), ``bias``, ``threshold``, ``val_flagged`` and
    ``val_upside_down_caught`` (the fraction of flipped val films flagged).
    """
    from sklearn.linear_model import LogisticRegression

    def views(t):
        up = np.concatenate([t, t[:, :, ::-1]])
        down = np.concatenate([t[:, ::-1], t[:, ::-1, ::-1]])
        return up.reshape(len(up), -1), down.reshape(len(down), -1)

    up, down = views(np.asarray(train_thumbs, np.float64))
    x = np.concatenate([up, down])
    y = np.concatenate([np.ones(len(up)), np.zeros(len(down))])
    probe = LogisticRegression(C=0.1, max_iter=2000).fit(x, y)
    weights, bias = probe.coef_[0], float(probe.intercept_[0])
    val_up, val_down = views(np.asarray(val_thumbs, np.float64))
    up_values, down_values = val_up @ weights + bias, val_down @ weights + bias
    threshold = min(0.0, float(np.quantile(up_values, val_rate)))
    return {"weights": [float(w) for w in weights], "bias": bias, "threshold": threshold,
            "val_flagged": float(np.mean(up_values < threshold)),
            "val_upside_down_caught": float(np.mean(down_values < threshold))}


def upside_down(upright: dict, images) -> np.ndarray:
    """``[N] bool``: the probe reads the ``[N, S, S, 1]`` model inputs as upside down."""
    values = thumbnails(images).reshape(-1, THUMB * THUMB) @ np.asarray(upright["weights"])
    return values + upright["bias"] < upright["threshold"]


def upright_reasons(ood_info: dict | None, image) -> list[str]:
    """``[UPSIDE_DOWN]`` or ``[]`` for one ``[S, S]`` model input, by the guard's probe
    (``ood_info``: ood.json; none without a guard or for guards fitted before the probe)."""
    upright = (ood_info or {}).get("upright")
    if upright is None or not bool(upside_down(upright, np.asarray(image)[None])[0]):
        return []
    return [UPSIDE_DOWN]


def tf_upside_down(images, upright: dict):
    """In-graph twin of :func:`upside_down` for ``[N, H, W, 1]`` images of a static size."""
    import tensorflow as tf

    x = tf.cast(images, tf.float32)[..., 0]
    rows = tf.constant(area_matrix(int(x.shape[1])), tf.float32)
    cols = tf.constant(area_matrix(int(x.shape[2])).T, tf.float32)
    t = tf.matmul(tf.matmul(rows[tf.newaxis], x), cols)   # batch matmuls: TFLite has them
    mean, var = tf.nn.moments(t, axes=[1, 2], keepdims=True)
    t = (t - mean) / (tf.sqrt(var) + 1e-6)
    values = tf.reshape(t, [-1, THUMB * THUMB]) @ tf.constant(
        np.asarray(upright["weights"], np.float32)[:, None])
    return values[:, 0] + upright["bias"] < upright["threshold"]
