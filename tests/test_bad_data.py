"""Broken and odd files in a `folder` dataset (vitvq.data.screen), with real files written by
PIL: unreadable ones are skipped, counted and logged once each; readable oddities are
converted to RGB; batches do not depend on when a broken file was found (a resumed run reads
what an uninterrupted one reads); a folder with nothing readable stops with a DataError.
"""

import logging
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vitvq import data
from vitvq.data import screen, sources
from vitvq.errors import DataError

SIZE = 16
UNREADABLE = {
    "zero.jpg": "empty file",
    "truncated.jpg": "truncated JPEG",
    "text.jpg": "not an image file",
    "bad_crc.png": "TensorFlow cannot decode it",  # passes the sniff, fails to decode
}
READABLE = (
    "rgb.png",
    "rgb.jpg",
    "png_named.jpg",
    "gray.png",
    "rgba.png",
    "cmyk.jpg",
    "palette.png",
    "sixteen_bit.png",
    "one_pixel.png",
    "huge.png",
)


def _write_all(directory: pathlib.Path) -> None:
    directory.mkdir(parents=True)
    rgb = sources.load_photo("astronaut")[::4, ::4]  # 128 x 128
    image = Image.fromarray(rgb)
    image.save(directory / "rgb.png")
    image.save(directory / "rgb.jpg", quality=95)
    image.save(directory / "png_named.jpg", format="PNG")
    image.convert("L").save(directory / "gray.png")
    image.convert("RGBA").save(directory / "rgba.png")
    image.convert("CMYK").save(directory / "cmyk.jpg", quality=95)
    image.convert("P").save(directory / "palette.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(directory / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(directory / "one_pixel.png")
    Image.new("RGB", (10_000, 10_000), (10, 200, 30)).save(directory / "huge.png")
    (directory / "zero.jpg").write_bytes(b"")
    encoded = (directory / "rgb.jpg").read_bytes()
    (directory / "truncated.jpg").write_bytes(encoded[: len(encoded) // 2])
    (directory / "text.jpg").write_text("this is a text file, not a JPEG\n")
    png = bytearray((directory / "rgb.png").read_bytes())
    start = png.find(b"IDAT") + 64
    png[start : start + 32] = bytes(32)  # corrupt compressed data; the IEND chunk stays
    (directory / "bad_crc.png").write_bytes(bytes(png))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/train and root/validation, each holding every kind of file."""
    root = tmp_path_factory.mktemp("odd_images")
    for split in ("train", "validation"):
        _write_all(root / split)
    return root


def _config(root):
    return ml_collections.ConfigDict(dict(name="folder", path=str(root), random_flip=False))


def _files(root, split):
    return sorted(p.name for p in (pathlib.Path(root) / split).iterdir())


def test_sniff_tells_broken_bytes_from_images(folder):
    for name in _files(folder, "train"):
        reason = screen.sniff((folder / "train" / name).read_bytes())
        if name in UNREADABLE and name != "bad_crc.png":
            assert reason is not None and UNREADABLE[name] in reason, (name, reason)
        else:
            assert reason is None, (name, reason)
    assert "cannot read" in screen.sniff(PermissionError(13, "Permission denied"))


def test_eval_converts_readable_files_and_pads_unreadable_ones(folder, caplog):
    screen.forget_unreadable()
    names = _files(folder, "validation")
    with caplog.at_level(logging.WARNING, logger="vitvq.data.screen"):
        batches = list(data.eval_batches(_config(folder), image_size=SIZE, global_batch_size=2))
    images = np.concatenate([b["image"] for b in batches])[: len(names)]
    mask = np.concatenate([b["mask"] for b in batches])[: len(names)]
    by_name = dict(zip(names, images, strict=True))
    assert dict(zip(names, mask, strict=True)) == {n: float(n not in UNREADABLE) for n in names}
    skipped = {pathlib.Path(p).name: r for p, r in screen.unreadable_records().items()}
    assert set(skipped) == set(UNREADABLE)
    for name, reason in UNREADABLE.items():
        assert reason in skipped[name]
        assert np.all(by_name[name] == 0)  # padding
        # Logged once, with the file's path.
        assert sum(str(folder / "validation" / name) in r.message for r in caplog.records) == 1
    reference = by_name["rgb.png"]
    for name in ("png_named.jpg", "rgba.png"):  # the same pixels, another container
        np.testing.assert_array_equal(by_name[name], reference)
    for name in ("rgb.jpg", "cmyk.jpg", "palette.png"):  # lossy, or a 256-colour palette
        assert np.abs(by_name[name] - reference).mean() < 0.05, name
    for name in ("gray.png", "sixteen_bit.png"):  # one channel repeated
        assert np.array_equal(by_name[name][..., 0], by_name[name][..., 2]), name
    np.testing.assert_allclose(
        by_name["one_pixel.png"], np.broadcast_to([200, 100, 50], (SIZE, SIZE, 3)) / 255, atol=1e-5
    )
    np.testing.assert_allclose(
        by_name["huge.png"], np.broadcast_to([10, 200, 30], (SIZE, SIZE, 3)) / 255, atol=1e-5
    )


def _train(root, start_step, steps):
    batches = data.train_batches(
        _config(root), image_size=SIZE, global_batch_size=4, seed=3, start_step=start_step
    )
    return [next(batches) for _ in range(steps)]


def test_train_skips_unreadable_files_and_resumes_identically(folder, caplog):
    screen.forget_unreadable()
    steps = 12  # 48 examples: every one of the 14 files, three times
    with caplog.at_level(logging.WARNING, logger="vitvq.data.screen"):
        straight = _train(folder, 0, steps)
    skipped = {pathlib.Path(p).name for p in screen.unreadable_records()}
    assert skipped == set(UNREADABLE) and screen.skipped_images() == len(UNREADABLE)
    assert len([r for r in caplog.records if "Skipping unreadable image" in r.message]) == 4
    for batch in straight:
        assert batch["image"].shape == (4, SIZE, SIZE, 3)
        assert np.all(np.isfinite(batch["image"])) and not np.all(batch["image"] == 0)

    # A fresh process resuming at step 7 knows no broken file yet: same batches.
    screen.forget_unreadable()
    resumed = _train(folder, 7, steps - 7)
    for a, b in zip(straight[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_nothing_readable_is_a_clear_error(tmp_path):
    screen.forget_unreadable()
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.png").write_text("text")
    (root / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    with pytest.raises(DataError, match=r"none of the \d train images could be read.*broken"):
        _train(root, 0, 1)
