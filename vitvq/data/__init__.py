"""Input pipelines: per-process batches of images in [0, 1] for the trainers.

Sources (`dataset.name`): `digits` (scikit-learn), `photos` (scikit-image), `folder` (a
directory of images), `tfds` (any TFDS image dataset), `synthetic` (noise). Batches are a
function of (seed, step) only; see `vitvq.data.pipeline` for the scheme. Importing this
package, and the digits, photos and synthetic sources, never imports TensorFlow.
"""

from vitvq.data.pipeline import (
    KNOWN_SOURCES,
    dataset_info,
    eval_batches,
    local_batch_size,
    sources_kept,
    train_batches,
)

__all__ = [
    "KNOWN_SOURCES",
    "dataset_info",
    "eval_batches",
    "local_batch_size",
    "sources_kept",
    "train_batches",
]
