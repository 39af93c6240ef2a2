"""The paper's stage-1 ablations (Table 4), one config whose argument picks the row.

    python -m vitvq.main --config=configs/ablations.py:row=no_l2norm --workdir=DIR
    python -m vitvq.main --config=configs/ablations.py:row=cnn,scale=small   # this machine
    python benchmarks/ablations.py                                         # every row, a table

Rows (each differs from the baseline `bb` in one thing, as in the paper):

    bb           ViT-VQGAN BB: Base encoder + Base decoder, l2-normalized 32-d codes, StyleGAN
                 discriminator (the paper's ablation default)
    ss, sl       Small + Small, Small + Large transformers
    cnn          the original VQGAN's convolutional encoder/decoder (taming-transformers),
                 trained with the row's loss and fixed weights: taming's adaptive GAN
                 weight (a gradient-norm ratio at the decoder's last layer) is not used,
                 as in every other row
    no_l2norm    codes and codebook not l2-normalized (Euclidean nearest code)
    code_dim_N   lookup dimension N, for N in 4, 8, 16, 32, 64, 128, 256 (32 is the baseline)
    patchgan     a PatchGAN discriminator instead of the StyleGAN one

Scales (`scale=`, default `paper`):

    paper     ImageNet 256x256 at the paper's hyperparameters (configs/common.py stage1); `cnn`
              is taming's VQGAN at 8x downsampling, 128 channels
    small     the bundled photos at 64x64 with models shrunk alike (ViT 128/192/256 wide for
              S/B/L; CNN 32 channels), 1024 codes, L2 + VQ + GAN losses, LPIPS at evaluation
              only, dead-code restart until 3/4 of the run (the paper has none; without it
              every row collapsed here); what `benchmarks/ablations.py` trains
    runlocal  the bundled digits at 32x32, tiny models, 2 steps, no LPIPS or R1: seconds,
              for tests

The argument is comma-separated: `row=NAME`, `scale=NAME`; a bare `small` or `runlocal`
means that scale. No argument is the `bb` row at paper scale.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common, photos  # noqa: E402

CODE_DIMS = (4, 8, 16, 32, 64, 128, 256)
# row -> (encoder size, decoder size); the other rows use the baseline's B + B.
SIZES = {"bb": ("B", "B"), "ss": ("S", "S"), "sl": ("S", "L")}
ROWS = (*SIZES, "cnn", "no_l2norm", *(f"code_dim_{d}" for d in CODE_DIMS), "patchgan")
SCALES = ("paper", "small", "runlocal")

# The small scale's transformers for the paper's S, B and L: width, depth, heads, MLP.
SMALL_SIZES = {
    "S": dict(width=128, depth=2, num_heads=4, mlp_dim=512),
    "B": dict(width=192, depth=3, num_heads=6, mlp_dim=768),
    "L": dict(width=256, depth=4, num_heads=8, mlp_dim=1024),
}


def parse_arg(arg):
    """(row, scale) from the config argument, e.g. "row=cnn,scale=small"."""
    row, scale = "bb", "paper"
    for part in (arg or "").split(","):
        key, sep, value = part.strip().partition("=")
        if not key:
            continue
        if not sep and key in SCALES:
            scale = key
        elif key == "row" and value in ROWS:
            row = value
        elif key == "scale" and value in SCALES:
            scale = value
        elif key == "row":
            raise ValueError(f"unknown ablation row {value!r}; expected one of {', '.join(ROWS)}")
        elif key == "scale":
            raise ValueError(f"unknown scale {value!r}; expected one of {', '.join(SCALES)}")
        else:
            raise ValueError(
                f"unknown argument {part!r} of configs/ablations.py; expected row=NAME "
                f"({', '.join(ROWS)}) and/or scale=NAME ({', '.join(SCALES)}), comma-separated"
            )
    return row, scale


def get_config(arg=None):
    row, scale = parse_arg(arg)
    encoder, decoder = SIZES.get(row, SIZES["bb"])
    c = common.imagenet_stage1(encoder, decoder, "runlocal" if scale == "runlocal" else None)
    if scale == "small":
        _small(c, encoder, decoder)
    elif scale == "runlocal":
        _runlocal(c)
    _apply_row(c, row)
    return c


def _apply_row(c, row: str) -> None:
    if row == "cnn":
        c.model.backbone = "cnn"
    elif row == "no_l2norm":
        c.model.l2_normalize_codes = False
    elif row.startswith("code_dim_"):
        c.model.code_dim = int(row.removeprefix("code_dim_"))
    elif row == "patchgan":
        c.discriminator.kind = "patchgan"


def _small(c, encoder: str, decoder: str) -> None:
    """The bundled photos at 64x64, models shrunk alike; see the module docstring."""
    photos.use_photos_data(c)
    c.total_steps = 600
    c.log_every_steps = 100
    c.eval_every_steps = 600
    c.image_every_steps = 600
    c.checkpoint_every_steps = 600
    c.model.encoder = common.transformer("S", **SMALL_SIZES[encoder])
    c.model.decoder = common.transformer("S", **SMALL_SIZES[decoder])
    c.model.cnn = common.cnn(
        channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8
    )
    c.model.codebook_size = 1024
    c.model.output = "raw"  # the photos recipe (configs/photos.py): L2 without logit-Laplace
    c.loss.logit_laplace = 0.0
    c.loss.perceptual = 0.0  # LPIPS costs more than the model on a CPU; evaluated only
    c.loss.r1_every = 4
    c.discriminator.base_channels = 32
    c.discriminator.max_channels = 128
    # Dead-code restart in every row, stopped at 3/4 of the run. Without it even the
    # baseline collapsed to 1 code by step 40 here (BENCHMARKS.md): at this scale the
    # encoder's initial outputs all fall nearest to a handful of codes.
    c.codebook_restart.every_steps = 25
    c.codebook_restart.threshold = 0.01
    c.codebook_restart.start_step = 0
    c.codebook_restart.stop_step = 450
    c.optimizer = common.optimizer(lr=5e-4, end_lr=1e-5, warmup_steps=100, b2=0.99)
    c.disc_optimizer = common.optimizer(lr=2e-4, end_lr=1e-5, warmup_steps=100, b2=0.99)
    # The rows' figures were measured with the GAN from the first step at a fixed weight and
    # a 100-step warmup (a sixth of the run), before the stage-1 defaults moved all three.
    c.loss.disc_start_fraction = 0.0
    c.loss.adaptive_gan_weight = False
    for opt in (c.optimizer, c.disc_optimizer):
        opt.max_warmup_fraction = 0.0


def _runlocal(c) -> None:
    """Seconds on a CPU: 2 steps on the digits, no LPIPS, one evaluation at the end."""
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.image_every_steps = 2
    c.checkpoint_every_steps = 2
    c.loss.perceptual = 0.0
    c.eval_lpips = False
    c.loss.r1_gamma = 0.0  # a lazy-R1 step is a second compiled program: minutes on a CPU
