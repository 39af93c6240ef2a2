"""python -m vitvq.main --config=configs/photos.py[:VARIANT[,steps=N]]

A small ViT-VQGAN on the bundled scikit-image photos at 64x64 (64 codes per image):
encoder and decoder 256 wide x 4 blocks, patch 8, random square crops of 20-100% of a photo's
shorter side, batch 16. `benchmarks/quality_photos.py` measures it (BENCHMARKS.md). Two
variants:

- `l2` (the default): the L2 loss alone (FSQ has no codebook loss), a decoder without the
  output sigmoid (`model.output="raw"`, +0.2 dB), and FSQ in place of the paper's codebook: levels
  (8, 8, 8, 5, 5, 5), 64,000 codes of about 16 bits per token (the paper: 8192 learned codes,
  13 bits). 5200 steps (40 minutes on 2 quiet CPU cores). This departs from the paper twice:
  LPIPS and the GAN cost more than the model on a CPU budget (and logit-Laplace lowered
  PSNR), and FSQ reconstructed 1.7 dB better than the paper's quantizer on two held-back
  training photos at the same steps and time (BENCHMARKS.md). The paper's quantizer with
  the k-means init and restart, as before: `--config.model.quantizer.kind=vq
  --config.codebook_restart.every_steps=50`.
- `full`: the paper's loss at the paper's weights (L2 1.0, logit-Laplace 0.1, LPIPS 0.1,
  StyleGAN2 discriminator 0.1, sigmoid output) and the paper's quantizer (8192 codes of 32
  dimensions, with the stage-1 defaults' k-means init and dead codes restarted every 50
  steps until 90% of the run), 1600 steps (about 30 minutes, estimated from each phase's cost
  per step). The paper does not say when the terms start: here LPIPS joins at 40% of the
  run and the discriminator (32-128 channels) for the last 10%
  (`loss.perceptual_start_fraction`, `loss.disc_start_fraction`), and the GAN's weight is
  scaled each step by the stage-1 defaults' adaptive GAN weight (the paper uses a fixed
  weight). On a CPU budget it does not yet beat L2 alone, even on LPIPS (BENCHMARKS.md).

Both decay the learning rate over `total_steps`; `steps=N` sets that to what another budget
fits.
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


VARIANTS = ("l2", "full")


def parse_arg(arg):
    """(variant, total steps or None) from e.g. "full" or "full,steps=1400"."""
    variant, steps = "l2", None
    for part in (arg or "").split(","):
        key, sep, value = part.strip().partition("=")
        if not key:
            continue
        if not sep and key in VARIANTS:
            variant = key
        elif key == "steps" and value.isdigit() and int(value) > 0:
            steps = int(value)
        else:
            raise ValueError(
                f"unknown config variant part {part.strip()!r} in {arg!r}; configs/photos.py "
                f"takes one of {VARIANTS} and steps=N (a positive integer), e.g. 'full,steps=1400'"
            )
    return variant, steps


def get_config(arg=None):
    variant, steps = parse_arg(arg)
    c = common.stage1()
    use_photos_data(c)
    c.total_steps = 5200  # what fits 40 minutes on 2 quiet cores (BENCHMARKS.md)
    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.image_every_steps = 1000
    c.checkpoint_every_steps = 1000
    width = dict(width=256, depth=4, num_heads=4, mlp_dim=1024)
    c.model.encoder = common.transformer("S", **width)
    c.model.decoder = common.transformer("S", **width)
    c.model.codebook_size = 8192
    c.model.code_dim = 32
    c.optimizer = common.optimizer(lr=5e-4, end_lr=1e-5, warmup_steps=200, b2=0.99)
    c.codebook_restart.every_steps = 50
    c.codebook_restart.threshold = 0.01
    c.codebook_restart.start_step = 0
    if variant == "l2":
        # FSQ with 64,000 codes (16 bits per token) in place of the paper's 8192-code VQ: on
        # two training photos held back it reconstructed 1.7 dB better at the same steps and
        # time (BENCHMARKS.md). FSQ has no codebook: no k-means init, nothing to restart.
        c.model.quantizer = common.quantizer(kind="fsq", levels=(8, 8, 8, 5, 5, 5))
        c.codebook_restart.every_steps = 0
        c.model.output = "raw"  # no sigmoid: better conditioned for L2 alone (run 11, +0.22 dB)
        c.loss.perceptual = 0.0
        c.loss.adversarial = 0.0
        c.loss.logit_laplace = 0.0  # its logit-space L1 outweighs L2's gradient; PSNR wants L2
    else:
        # The paper's loss at the paper's weights (configs/common.py): L2 1.0, logit-Laplace
        # 0.1 (with the decoder's sigmoid, which that loss needs), LPIPS 0.1, StyleGAN2 0.1.
        # The paper does not say when LPIPS and the discriminator start; here LPIPS joins at
        # 40% of the run and the GAN for its last 10% (the better of two schedules tried on a
        # split of the training photos, BENCHMARKS.md; neither beat L2 alone there).
        c.loss.perceptual_start_fraction = 0.4
        c.loss.disc_start_fraction = 0.9
        c.discriminator.base_channels = 32
        c.discriminator.max_channels = 128
        c.disc_optimizer = common.optimizer(lr=1e-4, end_lr=1e-5, warmup_steps=200, b2=0.99)
        c.total_steps = 1600  # about 30 minutes on 2 quiet cores (each phase's step cost)
    if steps is not None:
        c.total_steps = steps
    c.codebook_restart.stop_step = c.total_steps * 9 // 10
    return c
