"""python -m vitvq.main --config=configs/demo.py

The whole pipeline on bundled real data on a laptop CPU (vitvq/train/pipeline.py): a small
ViT-VQGAN on scikit-learn's handwritten digits (32x32, 4x4 = 16 codes of 9 bits per image),
exported; a small class-conditional VIM over its codes, exported with it to
runs/demo/bundle/; one row of samples per digit in runs/demo/samples.png and held-out
reconstructions in runs/demo/reconstructions.png. The top-level keys are the tokenizer's
run, `vim` holds the VIM's.
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
    c.loss.adaptive_gan_weight = False  # the fixed weight its figures were measured with
    # Dead codes (unused for ~100 steps) jump onto current encoder outputs.
    c.codebook_restart.every_steps = 50
    c.codebook_restart.start_step = 50
    c.codebook_restart.stop_step = 1200
    for opt in (c.optimizer, c.disc_optimizer):
        opt.lr = 1e-3
        opt.end_lr = 1e-4
        opt.warmup_steps = 100
    c.trainer = "pipeline"
    c.vim = vim_config(c)
    if arg:
        raise ValueError(f"unknown config variant {arg!r}; configs/demo.py has none")
    return c


def vim_config(tokenizer_config):
    """A small class-conditional VIM over the demo tokenizer's 16 codes per digit, trained on
    randomly zoomed digits."""
    v = common.stage2()
    # The tokenizer's digits, each drawn as a random square of 85-100% of its side resized
    # back (a slight zoom and shift) before it is tokenized, as the paper augments images
    # before its frozen tokenizer: without it the VIM memorized
    # the 1,500 training digits' codes and its held-out loss rose after step 500 (4.27 ->
    # 5.94 nats); with it the loss falls to the end (3.62 -> 3.39; BENCHMARKS.md).
    v.dataset = common.dataset("digits", num_classes=10, crop_scale=(0.85, 1.0))
    v.seed = tokenizer_config.seed
    v.mesh = tokenizer_config.mesh
    v.dtype = tokenizer_config.dtype
    v.model.update(width=128, depth=4, num_heads=4, mlp_dim=512, dropout=0.1)
    # Not the paper's (no label dropout): 10% of labels are dropped so that the demo can
    # show classifier-free guidance.
    v.class_dropout = 0.1
    v.total_steps = 1500
    v.batch_size = 64
    v.eval_batch_size = 99
    v.eval_num_examples = 0
    v.log_every_steps = 100
    v.eval_every_steps = 500
    v.image_every_steps = 500
    v.checkpoint_every_steps = 500
    v.optimizer.update(lr=1e-3, end_lr=1e-4, warmup_steps=100, decay_start_step=500)
    # Guidance 2 (measured: 0.96 of samples recognized as their class vs 0.84 without).
    v.sampling.update(num_per_class=10, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=2.0)
    return v
