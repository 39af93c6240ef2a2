"""Drawing pictures for people: image grids, row labels, column captions and PNG files.

    grid = image_grid([originals, reconstructions])       # rows of [N, H, W, 3] in [0, 1]
    grid = label_rows(grid, ["original", "rec."], 32)     # a margin naming each row
    save_png("runs/x/images/step_100.png", grid)          # atomically, locally or gs://

The training loop's sample and reconstruction images, the demo's figures and the sampler's
class grids are drawn here, with PIL's bundled font (nothing is downloaded). Reading image
files is `vitvq.images`' job.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitvq import paths


def image_grid(rows: list[np.ndarray], max_columns: int = 8) -> np.ndarray:
    """Stacks rows of images [N, H, W, 3] in [0, 1] into one uint8 grid with 2-pixel gaps."""
    n = min(max_columns, min(len(r) for r in rows))
    h, w = rows[0].shape[1:3]
    gap = GRID_GAP
    grid = np.ones(((h + gap) * len(rows) - gap, (w + gap) * n - gap, 3), np.float32)
    for i, row in enumerate(rows):
        for j in range(n):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = row[j]
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


GRID_GAP = 2  # pixels between the cells of `image_grid`
_TEXT = (0, 0, 0)


def _font():
    return ImageFont.load_default()  # PIL's bundled font: nothing to download


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font())
    return right - left, bottom - top


def label_rows(grid: np.ndarray, labels: list[str], row_height: int) -> np.ndarray:
    """`grid` (uint8, rows of `row_height` pixels apart by `GRID_GAP`) with a white margin on
    the left that names each row, its text centred on the row."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(_text_size(probe, text)[0] for text in labels) + 8
    out = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), (255, 255, 255))
    out.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        _, height = _text_size(draw, text)
        top = i * (row_height + GRID_GAP) + max(0, (row_height - height) // 2)
        draw.text((4, top), text, fill=_TEXT, font=_font())
    return np.asarray(out)


def caption_columns(
    grid: np.ndarray,
    captions: list[str],
    column_width: int,
    *,
    left: int = 0,
    title: str | None = None,
) -> np.ndarray:
    """`grid` (uint8, columns of `column_width` pixels apart by `GRID_GAP`, the first at
    x=`left`) with a white strip below it that carries one caption, centred, under each
    column, and `title` at the strip's left end (in a `label_rows` margin)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    height = max(_text_size(probe, text)[1] for text in [*captions, title or ""]) + 6
    out = Image.new("RGB", (grid.shape[1], grid.shape[0] + height), (255, 255, 255))
    out.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(captions):
        width, _ = _text_size(draw, text)
        x = left + j * (column_width + GRID_GAP) + (column_width - width) // 2
        draw.text((x, grid.shape[0] + 3), text, fill=_TEXT, font=_font())
    if title:
        draw.text((4, grid.shape[0] + 3), title, fill=_TEXT, font=_font())
    return np.asarray(out)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image atomically (locally: a temporary name, then rename; on
    an object store such as gs://: one upload), creating its directory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())
