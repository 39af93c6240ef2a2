"""Metric and image outputs of a run: clu writers, `metrics.jsonl`, PNG grids.

The workdir may be a local path or a URL (gs://bucket/run): files go through `vitvq.paths`,
and clu's TensorBoard writer reaches URLs through tf.io.gfile itself.
"""

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

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
