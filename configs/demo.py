"""python -m vitvq.main --config=configs/demo.py

The whole pipeline on bundled real data on a laptop CPU: a small ViT-VQGAN on scikit-learn's
handwritten digits (32x32, 4x4 = 16 codes of 9 bits per image), about 5 minutes on 2 cores.
Writes reconstructions to runs/demo/images/ and prints the final held-out metrics.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402


def get_config(arg=None):
    c = common.stage1()
    c.dataset = common.dataset("digits", num_classes=10)
    c.image_size = 32
    c.dtype = "float32"
    c.total_steps = 1500
    c.batch_size = 64
    c.eval_batch_size = 99  # the 297 held-out digits in three batches
    c.eval_num_examples = 0  # all of them
    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.image_every_steps = 500
    c.checkpoint_every_steps = 500
    c.model.encoder = common.transformer("S", width=128, depth=2, num_heads=4, mlp_dim=256)
    c.model.decoder = common.transformer("S", width=128, depth=2, num_heads=4, mlp_dim=256)
    c.model.patch_size = 8
    c.model.codebook_size = 512
    c.model.code_dim = 16
    c.discriminator.base_channels = 16
    c.discriminator.max_channels = 64
    # LPIPS (a VGG16) would cost more than the whole tokenizer here and means little on
    # digits: it is only evaluated. The discriminator joins for the last third.
    c.loss.perceptual = 0.0
    c.loss.disc_start_step = 1000
    # Dead codes (unused for ~100 steps) jump onto current encoder outputs.
    c.codebook_restart.every_steps = 50
    c.codebook_restart.start_step = 50
    c.codebook_restart.stop_step = 1200
    for opt in (c.optimizer, c.disc_optimizer):
        opt.lr = 1e-3
        opt.end_lr = 1e-4
        opt.warmup_steps = 100
    if arg:
        raise ValueError(f"unknown config variant {arg!r}; configs/demo.py has none")
    return c
