"""On-device random affine augmentation: one projective matrix per image, one resampling.

The paper's augmentation (rotation ±20°, zoom ±20 %, width/height shift ±20 %, shear
0.1, horizontal flip) is sampled per image, composed into ONE matrix and applied with ONE bilinear
interpolation, inside the model (:class:`RandomAffine`, active only when training) so it runs on
the accelerator, after grayscale -> RGB replication and before the backbone's normalisation.

Geometry. Pixel ``(x, y)`` is column ``x``, row ``y``; pixel centres sit at integer coordinates;
the centre of an ``H x W`` image is ``c = ((W - 1) / 2, (H - 1) / 2)``. The image *content* is
moved by ``p = c + M (q - c) + t`` (input point ``q`` -> output point ``p``) with::

    M = R(angle) @ Shear(shear) @ diag(zoom_x, zoom_y) @ Flip
    R(a)     = [[cos a, sin a], [-sin a, cos a]]   positive angle = counter-clockwise on screen
    Shear(s) = [[1, s], [0, 1]]                     a shear FACTOR (x += s * y), not degrees
    zoom > 1 magnifies the content; Flip = diag(-1, 1) mirrors left/right; t = shift in pixels

Resamplers want the inverse (output pixel -> input point), ``q = c + M^-1 (p - c - t)``, as the
8 numbers ``[a0, a1, a2, b0, b1, b2, c0, c1]`` of ``tf.raw_ops.ImageProjectiveTransformV3``:
``x_in = (a0 x + a1 y + a2) / k``, ``y_in = (b0 x + b1 y + b2) / k``, ``k = c0 x + c1 y + 1``.

A mask (lung segmentation) moves with its image: :meth:`RandomAffine.augment_with_mask` applies
the image's matrix to the mask too, resampled nearest neighbour (``interpolation="nearest"`` of
the resamplers), so a 0/255 mask stays 0/255; intensity changes touch the image only.

Two resamplers compute the same thing:

- ``native``: ``tf.raw_ops.ImageProjectiveTransformV3`` (what Keras' random affine layers use).
  It has no XLA kernel, so a ``jit_compile=True`` training step cannot contain it.
- ``gather``: bilinear sampling written with ``tf.gather``; XLA compiles it, so the whole
  training step can be jit-compiled on GPUs. It reproduces the native op's coordinate mapping and
  border handling (fill modes ``nearest``, ``constant``, ``reflect``).
- ``gather_xla``: the gather sampler jit-compiled on its own, for training steps that are not
  jit-compiled as a whole (e.g. bfloat16 on CPUs). On this 2-core CPU it costs ~2x less
  CPU per image than ``native`` and ~6x less than uncompiled ``gather``; ``gather`` inside a
  whole-step ``jit_compile=True`` costs ~5x less than ``native`` (tools/bench_input).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

FILL_MODES = ("nearest", "constant", "reflect")
INTERPOLATIONS = ("bilinear", "nearest")  # nearest for masks: no value a mask did not have
RESAMPLERS = ("native", "gather", "gather_xla")


def sample_affine_params(batch, rotation_deg: float, zoom: float, shift: float, shear: float,
                         flip: bool, seed) -> dict[str, tf.Tensor]:
    """Per-image augmentation parameters, uniform in their ranges.

    Args:
        batch: number of images B (int or scalar tensor).
        rotation_deg: angle drawn from ``[-rotation_deg, rotation_deg]``, degrees.
        zoom: zoom factors (x and y drawn independently, as Keras' ImageDataGenerator does) from
            ``[1 - zoom, 1 + zoom]``; must be < 1.
        shift: shifts drawn from ``[-shift, shift]``, fraction of width (x) / height (y).
        shear: shear factor drawn from ``[-shear, shear]`` (not an angle).
        flip: flip left/right with probability 0.5 when True.
        seed: ``[2]`` integer tensor (stateless RNG): the same seed gives the same parameters.

    Returns:
        Dict of ``[B] float32``: ``angle`` (radians), ``zoom_x``, ``zoom_y``, ``shift_x``,
        ``shift_y`` (fractions), ``shear``, ``flip`` (1.0 = flipped).
    """
    seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), 2**31 - 1), tf.int32)
    u = tf.random.stateless_uniform([7, batch], seed=seed, minval=-1.0, maxval=1.0)
    flipped = tf.cast(u[6] < 0.0, tf.float32) if flip else tf.zeros_like(u[6])
    return {
        "angle": u[0] * (rotation_deg * math.pi / 180.0),
        "zoom_x": 1.0 + u[1] * zoom,
        "zoom_y": 1.0 + u[2] * zoom,
        "shift_x": u[3] * shift,
        "shift_y": u[4] * shift,
        "shear": u[5] * shear,
        "flip": flipped,
    }


def compose_affine(height, width, angle, zoom_x, zoom_y, shift_x, shift_y, shear,
                   flip) -> tf.Tensor:
    """The output->input projective matrices of the content transform in the module docstring.

    Args:
        height, width: image size H, W in pixels.
        angle: ``[B]`` radians, counter-clockwise on screen.
        zoom_x, zoom_y: ``[B]`` content scale factors (> 0).
        shift_x, shift_y: ``[B]`` content shifts, fractions of width / height.
        shear: ``[B]`` shear factor.
        flip: ``[B]`` 1.0 mirrors left/right, 0.0 does not.

    Returns:
        ``[B, 8] float32`` for :func:`transform_native` / :func:`transform_gather`.
    """
    f32 = lambda v: tf.cast(v, tf.float32)  # noqa: E731
    angle, zoom_x, zoom_y, shear, flip = map(f32, (angle, zoom_x, zoom_y, shear, flip))
    h, w = f32(height), f32(width)
    cos, sin = tf.cos(angle), tf.sin(angle)
    sx = zoom_x * (1.0 - 2.0 * flip)  # the flip folds into the x scale
    sy = zoom_y
    # M = R @ Shear @ diag(sx, sy)
    m00 = cos * sx
    m01 = (cos * shear + sin) * sy
    m10 = -sin * sx
    m11 = (-sin * shear + cos) * sy
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    # q = c + Minv (p - c - t)  =>  offset = c - Minv (c + t)
    ox, oy = cx + f32(shift_x) * w, cy + f32(shift_y) * h
    a2 = cx - (i00 * ox + i01 * oy)
    b2 = cy - (i10 * ox + i11 * oy)
    zeros = tf.zeros_like(a2)
    return tf.stack([i00, i01, a2, i10, i11, b2, zeros, zeros], axis=1)


def random_affine_matrices(batch, height, width, rotation_deg: float = 20.0, zoom: float = 0.2,
                           shift: float = 0.2, shear: float = 0.1, flip: bool = True,
                           seed=(0, 0)) -> tf.Tensor:
    """``[B, 8] float32`` random output->input matrices (see :func:`sample_affine_params`)."""
    p = sample_affine_params(batch, rotation_deg, zoom, shift, shear, flip, seed)
    return compose_affine(height, width, p["angle"], p["zoom_x"], p["zoom_y"], p["shift_x"],
                          p["shift_y"], p["shear"], p["flip"])


def _check_fill_mode(fill_mode: str, interpolation: str = "bilinear") -> None:
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode={fill_mode!r}; expected one of {FILL_MODES}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")


def transform_native(images, matrices, fill_mode: str = "nearest", fill_value: float = 0.0,
                     interpolation: str = "bilinear"):
    """Resample ``images`` with ``ImageProjectiveTransformV3`` (no XLA kernel).

    Args:
        images: ``[B, H, W, C] float32``.
        matrices: ``[B, 8] float32`` output->input matrices.
        fill_mode: ``nearest`` | ``constant`` | ``reflect``: how points outside the input are read.
        fill_value: pixel value used outside the input when ``fill_mode="constant"``.
        interpolation: ``bilinear`` (images) or ``nearest`` (masks).

    Returns:
        ``[B, H, W, C]`` float32.
    """
    _check_fill_mode(fill_mode, interpolation)
    images = tf.convert_to_tensor(images, tf.float32)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(matrices, tf.float32),
        output_shape=tf.shape(images)[1:3], fill_value=tf.cast(fill_value, tf.float32),
        interpolation=interpolation.upper(), fill_mode=fill_mode.upper())


def _map_coordinate(coord, size, fill_mode: str):
    """Map input coordinates outside ``[0, size - 1]`` like the native op's ``MapCoordinate``."""
    top = size - 1.0
    if fill_mode == "nearest":
        return tf.clip_by_value(coord, 0.0, top)
    if fill_mode == "constant":
        # Points farther than one pixel outside read only the fill value; bounding them keeps the
        # later int32 cast finite without changing any result.
        return tf.clip_by_value(coord, -2.0, size + 1.0)
    # reflect: [abcd] -> [dcba|abcd|dcba], the same arithmetic as TensorFlow's kernel.
    sz2 = 2.0 * size
    neg = sz2 * tf.cast(tf.cast(-coord / sz2, tf.int32), tf.float32) + coord
    neg = tf.where(neg < -size, neg + sz2, -neg - 1.0)
    pos = coord - sz2 * tf.cast(tf.cast(coord / sz2, tf.int32), tf.float32)
    pos = tf.where(pos >= size, sz2 - pos - 1.0, pos)
    out = tf.where(coord < 0.0, neg, tf.where(coord > top, pos, coord))
    out = tf.where(size <= 1.0, tf.zeros_like(out), out)
    return tf.clip_by_value(out, 0.0, top)


def transform_gather(images, matrices, fill_mode: str = "nearest", fill_value: float = 0.0,
                     interpolation: str = "bilinear"):
    """Resample ``images`` with a gather-based sampler that XLA can compile.

    Same arguments, result and border handling as :func:`transform_native`; ``nearest`` reads
    the input pixel at the coordinates rounded half away from zero, as the native kernel does.
    """
    _check_fill_mode(fill_mode, interpolation)
    images = tf.convert_to_tensor(images, tf.float32)
    m = tf.cast(matrices, tf.float32)
    shape = tf.shape(images)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    xs = tf.reshape(xs, [1, -1])  # [1, H*W] output columns
    ys = tf.reshape(ys, [1, -1])
    col = lambda i: m[:, i:i + 1]  # noqa: E731  [B, 1]
    k = col(6) * xs + col(7) * ys + 1.0
    safe_k = tf.where(k == 0.0, tf.ones_like(k), k)
    x = (col(0) * xs + col(1) * ys + col(2)) / safe_k  # [B, H*W] input columns
    y = (col(3) * xs + col(4) * ys + col(5)) / safe_k
    x = _map_coordinate(x, wf, fill_mode)
    y = _map_coordinate(y, hf, fill_mode)
    if interpolation == "nearest":  # std::round: half away from zero
        x = tf.sign(x) * tf.floor(tf.abs(x) + 0.5)
        y = tf.sign(y) * tf.floor(tf.abs(y) + 0.5)
    x0, y0 = tf.floor(x), tf.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0
    flat = tf.reshape(images, [b, h * w, c])
    fill = tf.cast(fill_value, tf.float32)

    def read(yy, xx):
        yi, xi = tf.cast(yy, tf.int32), tf.cast(xx, tf.int32)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        idx = tf.clip_by_value(yi, 0, h - 1) * w + tf.clip_by_value(xi, 0, w - 1)
        vals = tf.gather(flat, idx, batch_dims=1)  # [B, H*W, C]
        return tf.where(inside[..., None], vals, fill)

    wx0, wx1 = (x1 - x)[..., None], (x - x0)[..., None]
    wy0, wy1 = (y1 - y)[..., None], (y - y0)[..., None]
    top = wx0 * read(y0, x0) + wx1 * read(y0, x1)
    bottom = wx0 * read(y1, x0) + wx1 * read(y1, x1)
    out = wy0 * top + wy1 * bottom
    out = tf.where((k == 0.0)[..., None], fill, out)
    return tf.reshape(out, shape)


# XLA fuses the sampler's many small element-wise ops into one loop; a retrace per image shape.
# No Python control flow depends on a tensor, so AutoGraph has nothing to convert: skipping it
# saves its source rewrite at every trace.
_transform_gather_xla = tf.function(transform_gather, jit_compile=True, reduce_retracing=True,
                                    autograph=False)


def transform_gather_xla(images, matrices, fill_mode: str = "nearest", fill_value: float = 0.0,
                         interpolation: str = "bilinear"):
    """:func:`transform_gather` compiled with XLA on its own (callable from non-XLA graphs)."""
    _check_fill_mode(fill_mode, interpolation)
    return _transform_gather_xla(tf.convert_to_tensor(images, tf.float32),
                                 tf.cast(matrices, tf.float32), fill_mode, float(fill_value),
                                 interpolation)


_RESAMPLE = {"native": transform_native, "gather": transform_gather,
             "gather_xla": transform_gather_xla}


@keras.saving.register_keras_serializable(package="pneumo_tf")
class RandomAffine(keras.layers.Layer):
    """Random rotation, zoom, shift, shear and flip of a batch, composed and resampled once.

    Input and output: ``[B, H, W, C] float32`` pixels (0..255). Identity unless called with
    ``training=True``. Under ``tf.distribute`` each replica folds its replica id into the seed,
    so replicas do not draw the same parameters.

    Args:
        rotation_deg: max rotation, degrees (±).
        zoom: max zoom change, fraction (factors in ``[1 - zoom, 1 + zoom]``, x and y independent).
        shift: max shift, fraction of width / height (±).
        shear: max shear FACTOR (±; ``x += shear * y``), not degrees (the paper's "0.1" is
            ambiguous).
        flip: random left/right flip (turn off when laterality matters).
        fill_mode: ``nearest`` (the paper's loader), ``constant`` or ``reflect``.
        resampler: ``native`` (ImageProjectiveTransformV3; no XLA kernel), ``gather``
            (XLA-compilable: for jit-compiled training steps) or ``gather_xla`` (the gather
            sampler compiled on its own: the cheapest on CPU when the step is not jit-compiled).
        seed: int seed of the layer's seed generator; None = random.
        fill_value: pixel value outside the image for ``fill_mode="constant"``.
    """

    def __init__(self, rotation_deg: float = 20.0, zoom: float = 0.2, shift: float = 0.2,
                 shear: float = 0.1, flip: bool = True, fill_mode: str = "nearest",
                 resampler: str = "native", seed: int | None = None, fill_value: float = 0.0,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        _check_fill_mode(fill_mode)
        if resampler not in RESAMPLERS:
            raise ValueError(f"resampler={resampler!r}; expected one of {RESAMPLERS} "
                             f"(use 'gather' for jit_compile=True / XLA)")
        if not 0.0 <= zoom < 1.0:
            raise ValueError(f"zoom={zoom} must be in [0, 1): factors are 1 ± zoom")
        for name, value in (("rotation_deg", rotation_deg), ("shift", shift), ("shear", shear)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (it is a ± range)")
        self.rotation_deg = float(rotation_deg)
        self.zoom = float(zoom)
        self.shift = float(shift)
        self.shear = float(shear)
        self.flip = bool(flip)
        self.fill_mode = fill_mode
        self.resampler = resampler
        self.seed = seed
        self.fill_value = float(fill_value)
        self.seed_generator = keras.random.SeedGenerator(seed, name="augment_seed")

    def call(self, images, training=None):
        if not training:
            return images
        seed = self._layer_seed()
        x = tf.cast(images, tf.float32)
        out = self._resample(x, self._matrices(tf.shape(x), seed))
        return tf.cast(self._after_geometry(out, seed), images.dtype)

    def augment_with_mask(self, images, masks, training=None):
        """Images and their masks moved together: one random matrix per image for both.

        The image is resampled as :meth:`call` does (bilinear, then any intensity changes); the
        mask with the same matrix, nearest neighbour and the same border mode (0 outside for
        ``constant``), so a 0/255 mask stays 0/255 and lies on its image. Intensity changes
        never touch the mask.

        Args:
            images: ``[B, H, W, C]`` pixels (0..255), any float dtype.
            masks: ``[B, H, W, K]`` masks (e.g. uint8 0/255 or float 0/1).
            training: identity unless True.

        Returns:
            ``(images, masks)`` in their input dtypes.
        """
        if not training:
            return images, masks
        seed = self._layer_seed()
        x = tf.cast(images, tf.float32)
        matrices = self._matrices(tf.shape(x), seed)
        out = self._after_geometry(self._resample(x, matrices), seed)
        moved = self._resample(tf.cast(masks, tf.float32), matrices, interpolation="nearest",
                               fill_value=0.0)
        return tf.cast(out, images.dtype), tf.cast(moved, masks.dtype)

    def _layer_seed(self):
        """The next ``[2]`` int64 seed, folded with the replica id under ``tf.distribute``."""
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            seed = tf.random.experimental.stateless_fold_in(
                seed, tf.cast(replica.replica_id_in_sync_group, tf.int64))
        return seed

    def _matrices(self, shape, seed):
        """``[B, 8]`` random output->input matrices for a batch of ``shape`` ``[B, H, W, C]``."""
        return random_affine_matrices(shape[0], shape[1], shape[2], self.rotation_deg,
                                      self.zoom, self.shift, self.shear, self.flip, seed)

    def _resample(self, x, matrices, interpolation: str = "bilinear", fill_value=None):
        """``[B, H, W, C] float32`` resampled with ``matrices`` by the layer's resampler."""
        fill = self.fill_value if fill_value is None else fill_value
        return _RESAMPLE[self.resampler](x, matrices, self.fill_mode, fill, interpolation)

    def _after_geometry(self, images, seed):
        """What follows the geometry on the image only (nothing here; intensity in
        :class:`RandomAugment`)."""
        del seed
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rotation_deg=self.rotation_deg, zoom=self.zoom, shift=self.shift,
                      shear=self.shear, flip=self.flip, fill_mode=self.fill_mode,
                      resampler=self.resampler, seed=self.seed, fill_value=self.fill_value)
        return config


# ---------------------------------------------------------------------------------------------
# Intensity changes (brightness, contrast, gamma, blur/sharpen, noise), after the geometry

INTENSITY_KEYS = ("brightness", "contrast", "gamma", "sharpness", "noise")
# 5x5 binomial low-pass filter (the blur that --sharpness mixes in or out).
_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def random_intensity(images, seed, brightness: float = 0.0, contrast: float = 0.0,
                     gamma: float = 0.0, sharpness: float = 0.0, noise: float = 0.0):
    """Per-image random intensity changes of ``[B, H, W, C]`` float pixels in 0..255.

    Each parameter is drawn per image, uniformly in its ± range (0 turns a change off):

    - contrast ``c``: ``mean + (x - mean) * (1 + c)``, the image's own mean kept;
    - brightness ``b``: ``x + 255 b`` (a fraction of the full scale);
    - gamma ``g``: ``255 (x / 255) ** exp(g)`` (exp keeps darkening and brightening symmetric);
    - sharpness ``s``: ``x + s (x - blur(x))`` with a 5x5 binomial blur: ``s < 0`` blurs
      (``s = -1`` is the blur itself), ``s > 0`` sharpens;
    - noise ``n``: Gaussian noise of standard deviation ``255 n u``, ``u`` uniform in [0, 1].

    The result is clipped to 0..255. Films differ between hospitals in exactly these ways
    (exposure, processing, detector sharpness and noise), so a model that must not read them as
    signs of pneumonia sees them vary in training.

    Args:
        images: ``[B, H, W, C]`` float32 in 0..255.
        seed: ``[2]`` integer tensor (stateless RNG).

    Returns:
        ``[B, H, W, C]`` float32 in 0..255.
    """
    x = tf.convert_to_tensor(images, tf.float32)
    seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), 2**31 - 1), tf.int32)
    u = tf.random.stateless_uniform([6, tf.shape(x)[0], 1, 1, 1], seed=seed, minval=-1.0,
                                    maxval=1.0)
    if contrast:
        mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
        x = mean + (x - mean) * (1.0 + contrast * u[0])
    if brightness:
        x = x + 255.0 * brightness * u[1]
    if gamma:
        x = 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, tf.exp(gamma * u[2]))
    if sharpness:
        x = x + sharpness * u[3] * (x - _binomial_blur(x))
    if noise:
        sigma = 255.0 * noise * (u[4] + 1.0) / 2.0
        x = x + sigma * tf.random.stateless_normal(tf.shape(x), seed=seed + 1)
    return tf.clip_by_value(x, 0.0, 255.0)


def _binomial_blur(x):
    k = tf.constant(_BINOMIAL_5, tf.float32)
    kernel = tf.tensordot(k, k, axes=0) / tf.reduce_sum(k) ** 2           # [5, 5]
    channels = x.shape[-1] or tf.shape(x)[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])      # [5, 5, C, 1]
    padded = tf.pad(x, [[0, 0], [2, 2], [2, 2], [0, 0]], mode="SYMMETRIC")
    return tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")


@keras.saving.register_keras_serializable(package="pneumo_tf")
class RandomAugment(RandomAffine):
    """:class:`RandomAffine` followed by :func:`random_intensity`, in one layer call.

    The geometric parameters are drawn exactly as :class:`RandomAffine` draws them; the
    intensity parameters come from a seed folded from the same draw, so turning intensity
    changes on does not change the geometry a seed gives.

    Args:
        brightness, contrast, gamma, sharpness, noise: ranges of :func:`random_intensity`
            (0 = off); the rest as :class:`RandomAffine`.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, gamma: float = 0.0,
                 sharpness: float = 0.0, noise: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        for name, value in zip(INTENSITY_KEYS, (brightness, contrast, gamma, sharpness, noise)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (it is a ± range)")
        self.intensity = dict(zip(INTENSITY_KEYS, map(float, (brightness, contrast, gamma,
                                                               sharpness, noise))))

    def _after_geometry(self, images, seed):
        folded = tf.random.experimental.stateless_fold_in(seed, 1)
        return random_intensity(images, folded, **self.intensity)

    def get_config(self):
        return {**super().get_config(), **self.intensity}


def make_augment_layer(**kwargs) -> RandomAffine:
    """:class:`RandomAugment` when an intensity range is set, else :class:`RandomAffine`."""
    if any(kwargs.get(k) for k in INTENSITY_KEYS):
        return RandomAugment(**kwargs)
    return RandomAffine(**{k: v for k, v in kwargs.items() if k not in INTENSITY_KEYS})
