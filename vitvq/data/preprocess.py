"""Crops, flips and decoding, in numpy (in-memory sources) and TensorFlow (records).

Randomness never comes from here: every training example carries four uniform numbers
in [0, 1) drawn from (seed, step) by the pipeline, `(u_top, u_left, u_flip, u_scale)`. The
crop's top-left corner is `floor(u * (extent - side + 1))` along each axis and the image is
mirrored when `u_flip < 0.5`, so a batch depends only on those numbers and the examples.
The crop side is the output size, or, with `dataset.crop_scale = (lo, hi)` (in-memory
sources), `round((lo + (hi - lo) * u_scale) * shorter side)`, resized to the output size.

TensorFlow is imported inside the functions that need it, never at module import.
"""

import numpy as np
from PIL import Image


def crop_offset(u: float, extent: int, size: int) -> int:
    """The start of a crop of `size` in `extent`, from a uniform number `u` in [0, 1)."""
    return min(int(np.floor(u * (extent - size + 1))), extent - size)


def train_crop_np(
    image: np.ndarray,
    params: np.ndarray,
    size: int,
    flip: bool,
    crop_scale: tuple[float, float] | None = None,
) -> np.ndarray:
    """Random crop (+ optional mirror) of a uint8 [H, W, 3] image; H, W >= size.

    With `crop_scale` the square's side is a random fraction of the shorter side (see the
    module docstring) and the crop is resized to `size` (bicubic, antialiased).
    """
    height, width = image.shape[:2]
    side = size
    if crop_scale is not None:
        lo, hi = crop_scale
        side = int(round((lo + (hi - lo) * float(params[3])) * min(height, width)))
        side = max(1, min(side, height, width))
    top = crop_offset(params[0], height, side)
    left = crop_offset(params[1], width, side)
    crop = image[top : top + side, left : left + side]
    if side != size:
        crop = resize_np(crop, size)
    if flip and params[2] < 0.5:
        crop = crop[:, ::-1]
    return crop


def resize_np(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes a uint8 [H, W, 3] image to [size, size, 3] (PIL bicubic, antialiased)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def center_crop_np(image: np.ndarray, size: int) -> np.ndarray:
    """Center crop of a uint8 [H, W, 3] image; H, W >= size."""
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def to_float_np(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


_tf_hidden_accelerators = False


def import_tf():
    """Imports TensorFlow for input processing only, hiding accelerators from it."""
    global _tf_hidden_accelerators
    # deferred: TensorFlow, only for records (folder/tfds) input
    import tensorflow as tf

    if not _tf_hidden_accelerators:
        _tf_hidden_accelerators = True
        for kind in ("GPU", "TPU"):  # TF must not take accelerator memory that JAX needs
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):  # already initialized, or no such device
                pass
    return tf


def _decode_and_resize(encoded, size: int):
    """Encoded image bytes -> float32 [h, w, 3] in [0, 1], shorter side resized to `size`."""
    tf = import_tf()
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.cast(image, tf.float32) / 255.0
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    # Antialiased bilinear: a triangle filter with positive weights keeps values in [0, 1].
    image = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def _tf_offset(u, extent, size: int):
    tf = import_tf()
    start = tf.cast(tf.floor(u * tf.cast(extent - size + 1, tf.float32)), tf.int32)
    return tf.minimum(start, extent - size)


def tf_train_example(size: int, flip: bool):
    """A tf.data map function: (bytes, label, params[4], mask) -> {image, label}.

    Decode, resize the shorter side to `size`, crop at the given position, maybe mirror.
    """
    tf = import_tf()

    def fn(encoded, label, params, mask):
        del mask  # training batches hold no padding
        image = _decode_and_resize(encoded, size)
        shape = tf.shape(image)
        top = _tf_offset(params[0], shape[0], size)
        left = _tf_offset(params[1], shape[1], size)
        image = image[top : top + size, left : left + size]
        if flip:
            image = tf.cond(params[2] < 0.5, lambda: image[:, ::-1], lambda: image)
        image = tf.ensure_shape(image, [size, size, 3])
        return {"image": image, "label": label}

    return fn


def tf_eval_example(size: int):
    """A tf.data map function: (bytes, label, params, mask) -> {image, label, mask}.

    Decode, resize the shorter side to `size`, center crop. Padding (mask 0, empty bytes)
    becomes a black image.
    """
    tf = import_tf()

    def real(encoded):
        image = _decode_and_resize(encoded, size)
        shape = tf.shape(image)
        top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
        return image[top : top + size, left : left + size]

    def fn(encoded, label, params, mask):
        del params
        image = tf.cond(
            mask > 0, lambda: real(encoded), lambda: tf.zeros([size, size, 3], tf.float32)
        )
        image = tf.ensure_shape(image, [size, size, 3])
        return {"image": image, "label": label, "mask": mask}

    return fn
