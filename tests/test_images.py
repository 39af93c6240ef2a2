"""vitvq.images: every PIL mode to RGB, EXIF orientation, errors naming the file, fit_square
and list_images."""

import pathlib
import warnings

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from vitvq import images
from vitvq.errors import DataError, InputError
from vitvq.images import ImageReadError, fit_square, list_images, read_image

ASTRONAUT = skimage.data.astronaut()  # uint8 [512, 512, 3]
CHELSEA = skimage.data.chelsea()  # uint8 [300, 451, 3]


def save(tmp_path, name, image, fmt=None, **kw) -> pathlib.Path:
    path = tmp_path / name
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image.save(path, format=fmt, **kw)
    return path


def mode_of(path) -> str:
    with Image.open(path) as image:
        return image.mode


def gray3(values) -> np.ndarray:
    values = np.asarray(values, np.uint8)
    return np.repeat(values[..., None], 3, axis=-1)


# --- modes ---------------------------------------------------------------------------------


def test_rgb_png_exact_and_jpeg_close(tmp_path):
    crop = ASTRONAUT[:60, :80]
    out = read_image(save(tmp_path, "a.png", crop))
    assert out.dtype == np.uint8 and out.shape == (60, 80, 3)
    np.testing.assert_array_equal(out, crop)
    jpeg = read_image(save(tmp_path, "a.jpg", crop, quality=95))
    assert jpeg.shape == (60, 80, 3) and np.abs(jpeg.astype(int) - crop).mean() < 4


def test_png_named_jpg_and_no_extension(tmp_path):
    crop = CHELSEA[:30, :40]
    np.testing.assert_array_equal(read_image(save(tmp_path, "png.jpg", crop, "PNG")), crop)
    np.testing.assert_array_equal(read_image(save(tmp_path, "noext", crop, "PNG")), crop)


def test_grayscale_and_bilevel(tmp_path):
    gray = np.dot(ASTRONAUT[:20, :30], [0.299, 0.587, 0.114]).astype(np.uint8)
    np.testing.assert_array_equal(read_image(save(tmp_path, "l.png", gray)), gray3(gray))
    bits = Image.fromarray(gray > 100).convert("1")
    assert bits.mode == "1"
    np.testing.assert_array_equal(
        read_image(save(tmp_path, "b.png", bits)), gray3(np.where(gray > 100, 255, 0))
    )


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    assert mode_of(path) == "I;16"
    expected = np.round(values / 65535.0 * 255.0).astype(np.uint8)
    out = read_image(path)
    np.testing.assert_array_equal(out, gray3(expected))
    assert out[0, 3, 0] == 255 and out[0, 2, 0] == 128 and out[0, 1, 0] == 1


def test_16_bit_big_endian_tiff(tmp_path):
    image = Image.new("I;16B", (3, 2), 65535)
    path = save(tmp_path, "g16b.tif", image)
    assert mode_of(path) == "I;16B"
    np.testing.assert_array_equal(read_image(path), np.full((2, 3, 3), 255, np.uint8))


def test_32_bit_integer_tiff(tmp_path):
    values = np.array([[0, 2**31 - 1, 2**30, -5]], np.int32)  # signed: max 2**31 - 1
    path = save(tmp_path, "i32.tif", Image.fromarray(values))
    assert mode_of(path) == "I"
    np.testing.assert_array_equal(read_image(path), gray3([[0, 255, 128, 0]]))


def test_float_image(tmp_path):
    path = save(tmp_path, "f.tif", Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)))
    assert mode_of(path) == "F"
    np.testing.assert_array_equal(read_image(path), gray3([[0, 128, 255]]))
    wide = save(tmp_path, "f2.tif", Image.fromarray(np.array([[-1.0, 0.0, 1.0]], np.float32)))
    np.testing.assert_array_equal(read_image(wide), gray3([[0, 128, 255]]))


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = ASTRONAUT[:2, :3]
    rgba[0, :, 3] = [0, 255, 128]
    rgba[1, :, 3] = 255
    rgba[0, 0, :3] = [10, 20, 30]  # fully transparent: its color must not show
    out = read_image(save(tmp_path, "rgba.png", rgba))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], rgba[0, 1, :3])
    np.testing.assert_array_equal(out[1], rgba[1, :, :3])
    half = np.round(rgba[0, 2, :3] * (128 / 255) + 255 * (127 / 255))
    np.testing.assert_allclose(out[0, 2], half, atol=1)


def test_gray_alpha(tmp_path):
    la = Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), mode="LA")
    np.testing.assert_array_equal(read_image(save(tmp_path, "la.png", la)), gray3([[50, 255]]))


def test_palette_colors_preserved(tmp_path):
    palette_image = Image.fromarray(CHELSEA[:40, :60]).quantize(16)
    assert palette_image.mode == "P"
    out = read_image(save(tmp_path, "p.png", palette_image))
    np.testing.assert_array_equal(out, np.asarray(palette_image.convert("RGB")))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 4


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200] + [0] * (768 - 9))
    image.putdata([0, 1, 2])
    out = read_image(save(tmp_path, "pt.png", image, transparency=1))
    np.testing.assert_array_equal(out[0], [[200, 10, 10], [255, 255, 255], [10, 10, 200]])
    gif = read_image(save(tmp_path, "pt.gif", image, transparency=1))
    np.testing.assert_array_equal(gif[0], [[200, 10, 10], [255, 255, 255], [10, 10, 200]])


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (4, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)])
    out = read_image(save(tmp_path, "cmyk.tif", cmyk))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])
    photo = Image.fromarray(ASTRONAUT[:64, :64]).convert("CMYK")
    out = read_image(save(tmp_path, "cmyk.jpg", photo, quality=95))
    assert mode_of(tmp_path / "cmyk.jpg") == "CMYK"
    assert np.abs(out.astype(int) - ASTRONAUT[:64, :64]).mean() < 6


def test_ycbcr(tmp_path):
    ycbcr = Image.fromarray(ASTRONAUT[:16, :16]).convert("YCbCr")
    path = save(tmp_path, "ycc.tif", ycbcr)
    assert mode_of(path) == "YCbCr"
    np.testing.assert_array_equal(read_image(path), np.asarray(ycbcr.convert("RGB")))


# --- EXIF orientation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, k=-1)),  # stored rotated: display turned 90 deg clockwise
        (8, lambda a: np.rot90(a, k=1)),
    ],
)
def test_exif_orientation(tmp_path, orientation, upright):
    stored = ASTRONAUT[100:140, 150:210]  # 40 x 60, not symmetric
    exif = Image.Exif()
    exif[0x0112] = orientation
    png = read_image(save(tmp_path, "o.png", stored, exif=exif))
    np.testing.assert_array_equal(png, upright(stored))
    jpeg = read_image(save(tmp_path, "o.jpg", stored, exif=exif, quality=95))
    assert jpeg.shape == upright(stored).shape
    assert np.abs(jpeg.astype(int) - upright(stored)).mean() < 6


# --- errors --------------------------------------------------------------------------------


def check_error(path, *words, **kw):
    with pytest.raises(ImageReadError) as err:
        read_image(path, **kw)
    assert isinstance(err.value, DataError)
    message = str(err.value)
    assert str(path) in message and err.value.path == str(path)
    for word in words:
        assert word in message.lower(), message
    return err.value


def test_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    check_error(empty, "empty")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    check_error(text, "not an image")
    check_error(tmp_path / "missing.jpg", "no such file")
    (tmp_path / "dir.png").mkdir()
    check_error(tmp_path / "dir.png", "not a regular file")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_is_an_error(tmp_path, fmt, monkeypatch):
    whole = save(tmp_path, "whole", ASTRONAUT[:128, :128], fmt)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    check_error(truncated, "truncated")
    # ... even where other code made PIL lenient, and without changing that setting.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    check_error(truncated, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    check_error(truncated, "truncated", max_side=16)


def test_pixel_limit_is_ours_not_pils(tmp_path, monkeypatch):
    path = save(tmp_path, "a.png", ASTRONAUT[:40, :50])
    error = check_error(path, "50x40", "limit", max_pixels=1999)
    assert "2000 pixels" in error.reason
    assert read_image(path, max_pixels=2000).shape == (40, 50, 3)
    # PIL's own limit (here set tiny) neither refuses the image nor warns, and is restored.
    assert images.MAX_PIXELS > 2 * Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning
        assert read_image(path).shape == (40, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_jpeg_draft_for_max_side(tmp_path):
    big = np.asarray(Image.fromarray(CHELSEA).resize((1800, 1200)))
    path = save(tmp_path, "big.jpg", big, quality=90)
    assert read_image(path).shape == (1200, 1800, 3)
    reduced = read_image(path, max_side=140)  # 1/8 would give 150 x 225
    assert reduced.shape == (150, 225, 3)
    assert read_image(path, max_side=200).shape == (300, 450, 3)  # 1/4: shorter side >= 200
    assert read_image(path, max_side=2000).shape == (1200, 1800, 3)  # no upscaling
    png = save(tmp_path, "big.png", big[:300, :400])
    assert read_image(png, max_side=50).shape == (300, 400, 3)  # a hint only for JPEGs
    full = fit_square(read_image(path), 64)
    cheap = fit_square(reduced, 64)
    assert np.abs(full.astype(int) - cheap).mean() < 3


# --- fit_square ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (480, 640), (640, 480), (3, 20000)])
def test_fit_square_shapes(shape):
    image = np.resize(ASTRONAUT, (*shape, 3))
    out = fit_square(image, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_fit_square_tiny_upscale_is_constant():
    out = fit_square(np.array([[[200, 30, 90]]], np.uint8), 16)
    np.testing.assert_array_equal(out, np.broadcast_to([200, 30, 90], (16, 16, 3)))


def test_fit_square_crops_the_center():
    image = np.zeros((40, 120, 3), np.uint8)
    image[:, :40] = [0, 0, 255]
    image[:, 40:80] = [255, 0, 0]  # the center square
    image[:, 80:] = [0, 255, 0]
    out = fit_square(image, 20)
    np.testing.assert_array_equal(out[:, 2:-2], np.broadcast_to([255, 0, 0], (20, 16, 3)))
    tall = fit_square(np.ascontiguousarray(image.transpose(1, 0, 2)), 20)
    np.testing.assert_array_equal(tall[2:-2], np.broadcast_to([255, 0, 0], (16, 20, 3)))
    same = fit_square(image[:, 40:80], 40)
    np.testing.assert_array_equal(same, image[:, 40:80])


def test_fit_square_downscale_is_antialiased():
    stripes = np.zeros((400, 400, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a point-sampling resize would give 0 or 255
    out = fit_square(stripes, 20)
    assert np.abs(out.astype(int) - 127.5).max() < 10
    photo = fit_square(ASTRONAUT, 64)
    reference = np.asarray(Image.fromarray(ASTRONAUT).resize((64, 64), Image.Resampling.BOX))
    assert np.abs(photo.astype(int) - reference).mean() < 4


def test_fit_square_rejects_bad_input():
    with pytest.raises(InputError):
        fit_square(np.zeros((4, 4), np.uint8), 2)
    with pytest.raises(InputError):
        fit_square(np.zeros((4, 4, 3), np.float32), 2)
    with pytest.raises(InputError):
        fit_square(np.zeros((4, 4, 3), np.uint8), 0)


# --- list_images ---------------------------------------------------------------------------


def test_list_images(tmp_path):
    root = tmp_path / "in"
    for name in ["b.png", "a.txt", "sub/c.jpg", "sub/deeper/d", ".hidden.png", ".git/x.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "emptydir").mkdir()
    found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a.txt",
        "b.png",
        "sub/c.jpg",
        "sub/deeper/d",
    ]
    assert list_images(root / "b.png") == [root / "b.png"]
    assert list_images(root / "emptydir") == []
    with pytest.raises(DataError, match="nowhere"):
        list_images(tmp_path / "nowhere")
