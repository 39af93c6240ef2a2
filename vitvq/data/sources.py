"""In-memory sources: scikit-learn digits, scikit-image photos, synthetic noise.

Everything here is numpy, PIL and the bundled files of scikit-learn / scikit-image: no
TensorFlow and no network. Each loader returns an `ArraySource` whose images are uint8 HWC
arrays at least `image_size` on each side, so training can random-crop them and evaluation
can center-crop them (a no-op for images that are exactly `image_size`).
"""

import dataclasses
import functools

import numpy as np
from PIL import Image

# The sklearn digits are ordered roughly by writer, so a contiguous tail is a fair test set.
DIGITS_NUM_TRAIN = 1500  # examples 0..1499 train
DIGITS_NUM_EVAL = 297  # examples 1500..1796 are the test split

# Colour photographs that ship inside the scikit-image and scikit-learn wheels (no pooch
# download): scikit-image's, and scikit-learn's two sample images ("china", "flower").
# The held-out photos are never used for training.
PHOTOS_TRAIN = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "motorcycle_left",
    "retina",
    "hubble_deep_field",
    "china",
    "flower",
)
_SKLEARN_PHOTOS = {"china": "china.jpg", "flower": "flower.jpg"}
PHOTOS_EVAL = ("chelsea", "coffee")
# Every held-out photo gives a fixed grid of (overlapping) crops: 2 x 12 x 16 = 384 eval
# crops whatever the image size, enough tokens to measure codebook usage.
PHOTOS_EVAL_GRID = (12, 16)
PHOTOS_NUM_EVAL = len(PHOTOS_EVAL) * PHOTOS_EVAL_GRID[0] * PHOTOS_EVAL_GRID[1]

# Synthetic noise: a fixed pool of examples (the batches index into it like a dataset).
SYNTHETIC_NUM_TRAIN = 128
SYNTHETIC_NUM_EVAL = 32


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One split held in memory."""

    images: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each, H and W >= image_size
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.images)


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A small dataset held in memory, with the defaults of its preprocessing."""

    train: ArraySplit
    eval: ArraySplit
    num_classes: int  # 0: the labels carry no class (all 0)
    random_flip: bool  # default of `dataset.random_flip` for this source


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W] / [H, W, 1|3|4] -> uint8 [H, W, 3]."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def ensure_min_side(image: np.ndarray, size: int) -> np.ndarray:
    """Upscales a uint8 [H, W, 3] image (bicubic) so its shorter side is at least `size`."""
    height, width = image.shape[:2]
    if min(height, width) >= size:
        return image
    scale = size / min(height, width)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(new_size, Image.BICUBIC), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def load_digits(image_size: int) -> ArraySource:
    """scikit-learn's 1797 8x8 digits, upscaled (bicubic) to `image_size`, grey as RGB.

    The split is fixed: the first 1500 examples train, the last `DIGITS_NUM_EVAL` evaluate.
    Digits are never flipped by default (a mirrored digit is a different glyph).
    """
    # deferred: scikit-learn, only for the digits source
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = []
    for digit in digits.images.astype(np.float32):  # [8, 8] in 0..16
        big = Image.fromarray(digit).resize((image_size, image_size), Image.BICUBIC)
        big = np.clip(np.asarray(big) * (255.0 / 16.0), 0.0, 255.0)
        images.append(_to_rgb(np.round(big).astype(np.uint8)))
    labels = digits.target.astype(np.int32)
    cut = len(images) - DIGITS_NUM_EVAL
    return ArraySource(
        train=ArraySplit(tuple(images[:cut]), labels[:cut]),
        eval=ArraySplit(tuple(images[cut:]), labels[cut:]),
        num_classes=10,
        random_flip=False,
    )


def load_photo(name: str) -> np.ndarray:
    """One of the bundled photographs as uint8 [H, W, 3]."""
    # deferred: scikit-image (and scikit-learn below), only for the photos source
    import skimage.data

    if name in _SKLEARN_PHOTOS:
        # deferred: scikit-learn, only for the photos source
        from sklearn.datasets import load_sample_image

        image = load_sample_image(_SKLEARN_PHOTOS[name])
    elif name == "motorcycle_left":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    return _to_rgb(np.asarray(image))


def photo_eval_crops(image_size: int) -> list[tuple[str, int, int]]:
    """The fixed evaluation crops as (photo name, top, left), interleaved across photos.

    Positions are on the photo after `ensure_min_side(photo, image_size)`.
    """
    grids = []
    for name in PHOTOS_EVAL:
        height, width = ensure_min_side(load_photo(name), image_size).shape[:2]
        rows = np.linspace(0, height - image_size, PHOTOS_EVAL_GRID[0]).round().astype(int)
        cols = np.linspace(0, width - image_size, PHOTOS_EVAL_GRID[1]).round().astype(int)
        grids.append([(name, int(top), int(left)) for top in rows for left in cols])
    # Round-robin, so that the first k eval examples cover every held-out photo.
    return [crop for group in zip(*grids, strict=True) for crop in group]


@functools.lru_cache(maxsize=4)
def load_photos(image_size: int) -> ArraySource:
    """scikit-image's bundled colour photographs.

    Training examples are the whole `PHOTOS_TRAIN` photos (random crops at native
    resolution are taken per step); evaluation examples are the fixed crops of the
    held-out `PHOTOS_EVAL` photos listed by `photo_eval_crops`. No class labels.
    """
    train = tuple(ensure_min_side(load_photo(name), image_size) for name in PHOTOS_TRAIN)
    held_out = {name: ensure_min_side(load_photo(name), image_size) for name in PHOTOS_EVAL}
    crops = tuple(
        np.ascontiguousarray(held_out[name][top : top + image_size, left : left + image_size])
        for name, top, left in photo_eval_crops(image_size)
    )
    return ArraySource(
        train=ArraySplit(train, np.zeros(len(train), np.int32)),
        eval=ArraySplit(crops, np.zeros(len(crops), np.int32)),
        num_classes=0,
        random_flip=True,
    )


@functools.lru_cache(maxsize=2)
def load_synthetic(image_size: int, num_classes: int) -> ArraySource:
    """Uniform noise images (and uniform labels when `num_classes` > 0) for benchmarks."""
    rng = np.random.default_rng(0)
    splits = []
    for count in (SYNTHETIC_NUM_TRAIN, SYNTHETIC_NUM_EVAL):
        images = rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
        labels = rng.integers(0, max(num_classes, 1), count).astype(np.int32)
        splits.append(ArraySplit(tuple(images), labels))
    return ArraySource(splits[0], splits[1], num_classes=num_classes, random_flip=True)
