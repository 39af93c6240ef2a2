"""Reading arbitrary image files as RGB uint8 arrays, with PIL only (no TensorFlow).

    image = read_image("photo.heic.jpg")          # uint8 [H, W, 3], EXIF orientation applied
    square = fit_square(image, 256)                # uint8 [256, 256, 3], center crop
    paths = list_images("photos/")                 # every regular, non-hidden file, sorted

`read_image` opens whatever PIL can decode, whatever the file's extension, and converts
every mode to RGB: grayscale, palette (with or without transparency), alpha (composited
over white), CMYK, YCbCr, 16/32-bit integer (scaled by the file's bit depth, not clipped),
float and bilevel. Anything that cannot be read (empty, truncated, not an image, too large)
raises `ImageReadError`, a `DataError` that names the file and the reason. Drawing grids and
writing PNGs is `vitvq.pictures`' job.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vitvq.errors import DataError, InputError

MAX_PIXELS = 20000 * 20000  # larger than PIL's own decompression-bomb limit (~89.5M pixels)

# PIL's decompression-bomb limit and truncated-image leniency are module globals. They are
# changed only while this lock is held, only for as long as one open or one load takes, and
# restored afterwards; ordinary images load without the lock (in parallel in threads).
_PIL_GLOBALS_LOCK = threading.Lock()

_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339
_WHITE = 255.0


class ImageReadError(DataError):
    """A file that is not a readable image; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


@contextlib.contextmanager
def _pil_limits():
    """PIL without its own pixel limit (ours is checked instead) and strict about truncation."""
    with _PIL_GLOBALS_LOCK:
        saved_pixels, saved_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved_pixels
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image (no image format recognized)"
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
    if "truncated" in text.lower():
        return f"truncated or incomplete image data ({text})"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _declared_max(image: Image.Image) -> int | None:
    """The largest value an integer image's samples can take, as its file declares it.

    Signed samples (a TIFF's SampleFormat 2, PIL raw modes "I;32S", ...) top out at
    2**(bits - 1) - 1; their negative values become 0.
    """
    maxval = image.info.get("maxval")  # PGM/PPM
    if isinstance(maxval, int) and maxval > 0:
        return maxval
    bits, signed = None, False
    tags = getattr(image, "tag_v2", None)  # TIFF
    if tags is not None:
        bits, sample_format = tags.get(_TIFF_BITS_PER_SAMPLE), tags.get(_TIFF_SAMPLE_FORMAT)
        bits = bits[0] if isinstance(bits, tuple | list) and bits else bits
        sample_format = (
            sample_format[0]
            if isinstance(sample_format, tuple | list) and sample_format
            else sample_format
        )
        signed = sample_format == 2
    for tile in image.tile:  # e.g. PNG: args "I;16B"; TIFF: ("I;32S", 0, 1)
        rawmode = tile.args[0] if isinstance(tile.args, tuple) else tile.args
        if isinstance(rawmode, str) and rawmode.startswith("I;"):
            digits = "".join(c for c in rawmode[2:] if c.isdigit())
            bits = bits if isinstance(bits, int) else (int(digits) if digits else None)
            signed = signed or "S" in rawmode[2:]
            break
    if not isinstance(bits, int) and image.mode.startswith("I;16"):
        bits = 16
    if not isinstance(bits, int) or not 0 < bits <= 32:
        return None
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def _integer_to_uint8(values: np.ndarray, maximum: int | None) -> np.ndarray:
    """Integer samples in [0, maximum] -> uint8, scaled (65535 -> 255), negatives -> 0."""
    values = values.astype(np.float64)
    if maximum is None:  # unknown bit depth: the smallest of 8/16/32 bits that holds the data
        top = float(values.max(initial=0.0))
        maximum = next((m for m in (255, 65535) if top <= m), 2**32 - 1)
    scaled = np.clip(values, 0.0, maximum) * (255.0 / maximum)
    return np.round(scaled).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float samples: [0, 1] -> [0, 255]; [0, 255] kept; other ranges stretched. NaN -> 0."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low < 0.0 or high > 255.0:
        values = (values - low) * (255.0 / (high - low))
    return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] (straight alpha) composited over white -> uint8 [H, W, 3]."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32)
    return np.round(rgb * alpha + _WHITE * (1.0 - alpha)).astype(np.uint8)


def _to_rgb(image: Image.Image, declared_max: int | None) -> np.ndarray:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N, ...
        gray = _integer_to_uint8(np.asarray(image), declared_max)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        gray = _float_to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=-1)
    has_alpha = "A" in mode or "a" in mode or "transparency" in image.info
    if has_alpha:  # RGBA, RGBa, LA, La, PA, P/L/RGB with a transparency key
        return _over_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # 1, L, P, CMYK, YCbCr, LAB, HSV


def read_image(
    path: str | os.PathLike, max_side: int | None = None, *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The image in the file at `path` as uint8 RGB [H, W, 3], upright (EXIF orientation).

    Args:
        path: any file PIL can decode; the extension is ignored.
        max_side: a hint that the caller will downscale to about this size: JPEGs are then
            decoded at a reduced scale (1/2, 1/4 or 1/8) that keeps both sides >= max_side
            where the source is large enough. Other formats are decoded at full size.
        max_pixels: larger images (in decoded pixels) are refused rather than decoded.

    Raises:
        ImageReadError (a DataError) naming the file and the reason: it is missing, empty,
        not an image, truncated or corrupt, or larger than `max_pixels`.
    """
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageReadError(path, err.strerror or str(err)) from None
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if size == 0:
        raise ImageReadError(path, "the file is empty")
    try:
        with _pil_limits():
            image = Image.open(path)
    except Exception as err:  # PIL raises many types for undecodable files
        raise ImageReadError(path, _describe(err)) from None
    with image:
        try:
            if max_side is not None and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (max(1, int(max_side)), max(1, int(max_side))))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    path,
                    f"{width}x{height} = {width * height} pixels is more than the limit of "
                    f"{max_pixels} pixels",
                )
            if width == 0 or height == 0:
                raise ImageReadError(path, f"the image has no pixels ({width}x{height})")
            declared_max = _declared_max(image)
            # PIL re-checks its pixel limit while loading some formats; and truncated data
            # must fail even if some other code made PIL lenient. Both need its globals.
            with _PIL_GLOBALS_LOCK:  # their real values: nobody else is changing them now
                needs_globals = ImageFile.LOAD_TRUNCATED_IMAGES or (
                    Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS
                )
            if needs_globals:
                with _pil_limits():
                    image.load()
            else:
                image.load()
        except ImageReadError:
            raise
        except Exception as err:
            raise ImageReadError(path, _describe(err)) from None
        try:
            upright = ImageOps.exif_transpose(image)
        except Exception:  # unreadable EXIF data: keep the image as stored
            upright = image
        try:
            rgb = _to_rgb(upright, declared_max)
        except (ValueError, OSError) as err:  # a mode PIL cannot convert to RGB
            raise ImageReadError(path, f"unsupported image mode {image.mode}: {err}") from None
    return rgb if rgb.flags.writeable else rgb.copy()


def fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the shorter side scaled to `size`, centered.

    Equivalent to resizing so that the shorter side is `size` and cropping the center, but
    the crop is taken first (as a resampling box), so extreme aspect ratios never build a
    huge intermediate. Bicubic with antialiasing; big downscales first reduce by an integer
    factor (PIL's `reducing_gap`). Upscales tiny images (even 1x1) the same way.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"fit_square takes uint8 [H, W, 3], got {image.dtype} {image.shape}")
    size = int(size)
    if size < 1:
        raise InputError(f"size must be >= 1, got {size}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InputError(f"fit_square got an empty image of shape {image.shape}")
    if height == width == size:
        return image.copy()
    side = min(height, width)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    resized = Image.fromarray(image).resize(
        (size, size),
        Image.Resampling.BICUBIC,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0 if side > 3 * size else None,
    )
    return np.asarray(resized, dtype=np.uint8)


def list_images(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files to try as images: `path` itself, or every regular file under a directory.

    Hidden files and directories (names starting with ".") are skipped; nothing is
    filtered by extension, so a non-image is later reported rather than silently ignored.
    Directories are walked recursively (symlinked directories are not followed); the
    result is sorted by relative path.

    Raises DataError if `path` does not exist or is neither a file nor a directory.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} is neither a regular file nor a directory")
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        root_path = pathlib.Path(root)
        for name in files:
            candidate = root_path / name
            if not name.startswith(".") and candidate.is_file():
                found.append(candidate)
    return sorted(found, key=lambda p: p.relative_to(path).parts)
