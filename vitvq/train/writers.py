"""Metric and image outputs of a run: clu writers, `metrics.jsonl`, PNG grids.

The workdir may be a local path or a URL (gs://bucket/run): files go through `vitvq.paths`,
and clu's TensorBoard writer reaches URLs through tf.io.gfile itself.
"""

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from PIL import Image

from vitvq import paths


class JsonlWriter(metric_writers.MetricWriter):
    """Appends one JSON object per written step to `path`: {"step": 100, "train/loss": ...}."""

    def __init__(self, path: str):
        self._path = path
        paths.makedirs(paths.as_path(path).parent)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        for key, value in scalars.items():
            value = float(np.asarray(value))
            row[key] = value if math.isfinite(value) else str(value)
        paths.append_text(self._path, json.dumps(row) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """Console + TensorBoard + metrics.jsonl on process 0; console only elsewhere."""
    lead = jax.process_index() == 0
    default = metric_writers.create_default_writer(
        workdir, just_logging=not lead, asynchronous=False
    )
    if not lead:
        return default
    return metric_writers.MultiWriter([default, JsonlWriter(paths.join(workdir, "metrics.jsonl"))])


def image_grid(rows: list[np.ndarray], max_columns: int = 8) -> np.ndarray:
    """Stacks rows of images [N, H, W, 3] in [0, 1] into one uint8 grid with 2-pixel gaps."""
    n = min(max_columns, min(len(r) for r in rows))
    h, w = rows[0].shape[1:3]
    gap = 2
    grid = np.ones(((h + gap) * len(rows) - gap, (w + gap) * n - gap, 3), np.float32)
    for i, row in enumerate(rows):
        for j in range(n):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = row[j]
    return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image atomically (locally: a temporary name, then rename; on
    an object store such as gs://: one upload), creating its directory."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())
