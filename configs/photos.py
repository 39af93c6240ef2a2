"""python -m vitvq.main --config=configs/photos.py

A small ViT-VQGAN on the bundled scikit-image photos at 64x64 (64 codes of 13 bits per
image): encoder and decoder 256 wide x 4 blocks, patch 8, code_dim 32, 8192 codes. This is
the recipe measured by `benchmarks/quality_photos.py` (BENCHMARKS.md): random square crops of
20-100% of a photo's shorter side, L2 + VQ losses (LPIPS and the GAN cost more than the model on a
CPU budget and are off; logit-Laplace lowered PSNR), a decoder without the output sigmoid
(`model.output="raw"`, +0.2 dB) and dead-code restart until step 1800.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402


def use_photos_data(c) -> None:
    """The data side of this recipe (also configs/ablations.py's small scale): random crops
    of the bundled photos at 64x64, batch 16, evaluation on all held-out crops."""
    c.dataset = common.dataset("photos", crop_scale=(0.2, 1.0))
    c.image_size = 64
    c.dtype = "float32"
    c.batch_size = 16
    c.eval_batch_size = 64
    c.eval_num_examples = 0


def get_config(arg=None):
    c = common.stage1()
    use_photos_data(c)
    c.total_steps = 2000  # what fits 10 minutes on 2 cores (BENCHMARKS.md, runs 9 and 11)
    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.image_every_steps = 1000
    c.checkpoint_every_steps = 1000
    width = dict(width=256, depth=4, num_heads=4, mlp_dim=1024)
    c.model.encoder = common.transformer("S", **width)
    c.model.decoder = common.transformer("S", **width)
    c.model.codebook_size = 8192
    c.model.code_dim = 32
    c.model.output = "raw"  # no sigmoid: better conditioned for L2 alone (run 11, +0.22 dB)
    c.loss.perceptual = 0.0
    c.loss.adversarial = 0.0
    c.loss.logit_laplace = 0.0  # its logit-space L1 outweighs L2's gradient; PSNR wants L2
    c.codebook_restart.every_steps = 50
    c.codebook_restart.threshold = 0.01
    c.codebook_restart.start_step = 0
    c.codebook_restart.stop_step = 1800
    c.optimizer = common.optimizer(lr=5e-4, end_lr=1e-5, warmup_steps=200, b2=0.99)
    if arg:
        raise ValueError(f"unknown config variant {arg!r}; configs/photos.py has none")
    return c
