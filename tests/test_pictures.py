"""Pictures people look at: named rows, captioned columns, each run's curves.png."""

import json

import numpy as np
from PIL import Image

from vitvq.pictures import GRID_GAP, caption_columns, image_grid, label_rows
from vitvq.train import curves


def _grid(rows: int, columns: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return image_grid([rng.uniform(size=(columns, size, size, 3)) for _ in range(rows)], columns)


def _dark(image: np.ndarray) -> np.ndarray:
    return image.min(axis=-1) < 100  # text pixels (the margins are white)


def test_label_rows_names_each_row_and_keeps_the_grid():
    grid = _grid(3, 4)
    out = label_rows(grid, ["zero", "one", "two"], 16)
    margin = out.shape[1] - grid.shape[1]
    assert out.shape[0] == grid.shape[0] and margin >= 8
    np.testing.assert_array_equal(out[:, margin:], grid)  # the pictures untouched
    for row in range(3):  # each row's margin holds text, within that row's band
        top = row * (16 + GRID_GAP)
        assert _dark(out[top : top + 16, :margin]).any(), row
    assert not _dark(out[:, :2]).any()  # a little white before the text


def test_caption_columns_writes_under_each_column():
    grid = _grid(2, 5)
    out = caption_columns(grid, ["1.0", "2.0", "3.0", "4.0", "5.0"], 16, title="PSNR")
    assert out.shape[1] == grid.shape[1] and out.shape[0] > grid.shape[0]
    np.testing.assert_array_equal(out[: grid.shape[0]], grid)
    strip = out[grid.shape[0] :]
    for column in range(5):
        left = column * (16 + GRID_GAP)
        assert _dark(strip[:, left : left + 16]).any(), column


def test_read_series_takes_finite_values_the_last_of_a_repeated_step_and_skips_torn_lines():
    rows = [
        {"step": 100, "train/loss/total": 0.5},
        {"step": 200, "train/loss/total": "nan"},  # JsonlWriter writes non-finite as text
        {"step": 200, "eval/psnr": 20.0},
        {"step": 200, "train/loss/total": 0.4},  # a resumed run redid step 200
        {"step": 200, "train/loss/total": 0.3},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 3'  # torn by a crash
    series = curves.read_series(text, ["train/loss/total", "eval/psnr", "eval/codebook_usage"])
    assert series["train/loss/total"] == ([100, 200], [0.5, 0.3])
    assert series["eval/psnr"] == ([200], [20.0])
    assert series["eval/codebook_usage"] == ([], [])


def test_write_curves_draws_every_panel(tmp_path):
    rows = [{"step": s, "train/loss/total": 1.0 / s} for s in range(1, 50)]
    rows += [{"step": s, "eval/psnr": 20.0 + s / 10, "eval/codebook_usage": 0.5} for s in (25, 49)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = curves.write_curves(str(tmp_path), curves.STAGE1_PANELS, "tokenizer")
    with Image.open(path) as image:
        picture = np.asarray(image.convert("RGB"))
    assert picture.shape[1] >= 3 * picture.shape[0]  # one row of three panels
    # matplotlib's default line colour (C0, #1f77b4) drawn in each third of the picture.
    blue = np.abs(picture.astype(int) - [31, 119, 180]).sum(-1) < 60
    thirds = np.array_split(np.arange(picture.shape[1]), 3)
    assert all(blue[:, cols].sum() > 20 for cols in thirds)


def test_write_curves_before_any_metrics(tmp_path):
    path = curves.write_curves(str(tmp_path), curves.STAGE2_PANELS, "VIM")
    with Image.open(path) as image:
        assert image.size[0] > 0
