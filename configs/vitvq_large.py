"""python -m vitvq.main --config=configs/vitvq_large.py --workdir=DIR

ViT-VQGAN SL (Small encoder + Large decoder; the paper's best reconstructions)
on ImageNet 256x256 with the paper's hyperparameters.

    python -m vitvq.main --config=configs/vitvq_large.py:runlocal --workdir=DIR   # seconds, CPU

Departs from the paper in two training-time defaults (configs/common.py, docs/codebook.md):
the codebook starts as k-means of the first batch's encoder outputs instead of a normal
draw, and dead codes are restarted every 25 steps; with the paper's init and no restart the
codebook collapses to a few codes within 20 steps. `--config.codebook_init.kind=normal
--config.codebook_restart.every_steps=0` trains the paper's recipe as written.

ImageNet must be prepared for TFDS first (docs/config.md, "Preparing ImageNet").
`runlocal` is the same config shrunk to a tiny model on the bundled digits.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402


def get_config(arg=None):
    return common.imagenet_stage1("S", "L", arg)
