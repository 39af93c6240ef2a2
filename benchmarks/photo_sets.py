"""The photo sets of the photos benchmarks (benchmarks/quality_photos.py, loss_branches.py):
the held-out crops, the selection split, the thumbnail baseline and PSNR on uint8 images."""

import numpy as np
from PIL import Image

EVAL_FRACTIONS = (0.25, 0.35, 0.5, 0.7, 1.0)  # crop side / shorter side; 1.0 = center crop


# Two training photos of about the held-out photos' size: the same multi-scale grid of crops of
# them tells apart what limits held-out usage, the photos (unseen) or the crops (overlapping
# crops of two photos repeat their patches).
TRAIN_GRID_PHOTOS = ("china", "flower")

# The other photographs in scikit-image's wheel (no download), none of them in training: a
# cameraman, coins, a clock, the moon, and close-ups of brick, grass and gravel. Greyscale.
WIDE_EXTRA = ("camera", "coins", "clock", "moon", "brick", "grass", "gravel")

# The selection split (`--select`): two natural colour photos of the training set, like the
# held-out cat and coffee cup; training then sees the other six.
SELECT_PHOTOS = ("astronaut", "motorcycle_left")

# The two nearly flat photos of WIDE_EXTRA, where an 8x8 thumbnail is almost lossless; the
# other seven are "the textured photos" of the per-photo comparison.
FLAT_PHOTOS = ("clock", "moon")


def use_selection_split() -> None:
    """Train on the training photos less SELECT_PHOTOS and treat those two as held out.

    The photos source reads these module-level lists when the pipeline first loads it, so this
    runs before anything builds a pipeline."""
    from vitvq.data import sources

    sources.PHOTOS_TRAIN = tuple(n for n in sources.PHOTOS_TRAIN if n not in SELECT_PHOTOS)
    sources.PHOTOS_EVAL = SELECT_PHOTOS


def _crop_boxes(h: int, w: int):
    """(top, left, side) of the multi-scale grid of square crops of an h x w photo."""
    short = min(h, w)
    for fraction in EVAL_FRACTIONS:
        side = int(round(fraction * short))
        if side == short:
            yield (h - side) // 2, (w - side) // 2, side
            continue
        for top in range(0, h - side + 1, side // 2):
            for left in range(0, w - side + 1, side // 2):
                yield top, left, side


def held_out_images(size: int, names=None) -> np.ndarray:
    """uint8 [N, size, size, 3] multi-scale crops of the held-out photos (or of `names`)."""
    from vitvq.data import sources

    out = []
    for name in names or sources.PHOTOS_EVAL:
        photo = sources.load_photo(name)
        for top, left, side in _crop_boxes(*photo.shape[:2]):
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            out.append(np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)


def held_out_names(names=None) -> np.ndarray:
    """The photo name of each crop of `held_out_images(size, names)`, in the same order."""
    from vitvq.data import sources

    return np.asarray(
        [
            name
            for name in names or sources.PHOTOS_EVAL
            for _ in _crop_boxes(*sources.load_photo(name).shape[:2])
        ]
    )


def thumbnail(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """Area-downsample to grid x grid, bicubic back to the original size (uint8)."""
    n, size = images.shape[0], images.shape[1]
    k = size // grid
    small = images.reshape(n, grid, k, grid, k, 3).astype(np.float64).mean(axis=(2, 4))
    small = np.clip(np.round(small), 0, 255).astype(np.uint8)
    return np.stack(
        [
            np.asarray(Image.fromarray(s).resize((size, size), Image.Resampling.BICUBIC))
            for s in small
        ]
    )


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def apply_in_chunks(fn, *images_uint8: np.ndarray, chunk: int = 64) -> list[np.ndarray]:
    """`fn` (one float32 batch in [0, 1] per uint8 array given, all of one length -> a tuple
    of per-example arrays), `chunk` examples at a time, the last chunk padded with zeros so
    that `fn` always sees one shape (one compilation); each output concatenated, the padding
    dropped."""
    parts, total = [], len(images_uint8[0])
    for i in range(0, total, chunk):
        n = min(chunk, total - i)
        batches = [
            np.concatenate([a[i : i + n], np.zeros((chunk - n, *a.shape[1:]), np.uint8)])
            for a in images_uint8
        ]
        outputs = fn(*(b.astype(np.float32) / 255.0 for b in batches))
        parts.append([np.asarray(out)[:n] for out in outputs])
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8 (rounded, clipped)."""
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
