"""Helpers shared by the config files: the keys every training config has, and model sizes.

Config files import this module as `from configs import common` after putting the repository
root on `sys.path` (two lines at the top of each file), so they work from any directory.
"""

import dataclasses

import ml_collections

from vitvq import parallel
from vitvq.models.quantizers import QuantizerSpec
from vitvq.models.vim import VIM_PRESETS
from vitvq.models.vitvqgan import TRANSFORMER_PRESETS

# The paper's sizes (docs/paper.md), written once in the models: width, depth, heads, MLP.
TRANSFORMER_SIZES = {
    name: {k: v for k, v in dataclasses.asdict(spec).items() if k != "dropout"}
    for name, spec in TRANSFORMER_PRESETS.items()
}

# Logical axis name -> mesh axes (vitvq.parallel.default_axis_rules says why each).
DEFAULT_AXIS_RULES = list(parallel.default_axis_rules())


def transformer(size: str, dropout: float = 0.0, **overrides) -> ml_collections.ConfigDict:
    """A transformer stack of the paper's size S, B or L, with overrides."""
    return ml_collections.ConfigDict({**TRANSFORMER_SIZES[size], "dropout": dropout, **overrides})


def cnn(**overrides) -> ml_collections.ConfigDict:
    """The convolutional encoder/decoder (`model.backbone == "cnn"`): taming-transformers'
    VQGAN at 8x downsampling (its f8 layout: 128 channels, 2 residual blocks per level, one
    attention block at the lowest resolution)."""
    c = ml_collections.ConfigDict(
        dict(
            channels=128,  # width of the first level
            channel_mult=(1, 1, 2, 4),  # width multiplier per level; 2x down between levels
            num_res_blocks=2,
            attention=True,  # the mid block's self-attention at the lowest resolution
            norm_groups=32,  # GroupNorm groups; must divide every level's width
            dropout=0.0,
        )
    )
    c.update(overrides)
    return c


def quantizer(**overrides) -> ml_collections.ConfigDict:
    """The `model.quantizer` block (vitvq/models/quantizers.py): which quantizer and its
    settings. Each kind reads only its own keys; the others stay at these defaults (the
    config check refuses a changed key that the chosen kind does not read)."""
    d = dataclasses.asdict(QuantizerSpec())
    q = ml_collections.ConfigDict(
        dict(
            # "vq" (the paper's codebook), "simvq" (a frozen random basis times a learned
            # map), "fsq" (a fixed grid of `levels`) or "lfq" (`bits` signs).
            kind=d["kind"],
            # vq: "gradient" (the paper) or "ema" (the codebook follows moving averages of
            # its assigned encoder outputs; ema_decay in (0, 1), ema_epsilon > 0).
            update=d["update"],
            ema_decay=d["ema_decay"],
            ema_epsilon=d["ema_epsilon"],
            # vq and simvq: "straight_through" (the paper) or "rotation" (the rotation trick).
            gradient=d["gradient"],
            # fsq: levels per code dimension (prod(levels) codes, len(levels) dimensions).
            levels=tuple(d["levels"]),
            # lfq: 2**bits codes; the entropy loss (weight, its batch-entropy share
            # diversity_gamma) factorized over entropy_groups groups of bits; commitment
            # weight; the entropy weight starts at entropy_anneal_factor times its value and
            # reaches it linearly at entropy_anneal_steps (0: no annealing).
            bits=d["bits"],
            entropy_weight=d["entropy_weight"],
            entropy_groups=d["entropy_groups"],
            diversity_gamma=d["diversity_gamma"],
            commitment_weight=d["commitment_weight"],
            entropy_anneal_steps=d["entropy_anneal_steps"],
            entropy_anneal_factor=d["entropy_anneal_factor"],
        )
    )
    q.update(overrides)
    return q


def dataset(name: str = "tfds", **overrides) -> ml_collections.ConfigDict:
    """The `dataset` block read by `vitvq.data`."""
    d = ml_collections.ConfigDict(
        dict(
            name=name,  # digits | photos | folder | tfds | synthetic
            tfds_name="imagenet2012",  # any TFDS image dataset, when name == "tfds"
            data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data dir
            path=ml_collections.FieldReference(None, field_type=str),  # root, name == "folder"
            train_split="train",
            eval_split="validation",
            num_classes=0,  # 0 = unconditional
            shuffle_buffer=10_000,
            # (lo, hi): random square crops of lo..hi of the shorter side, resized (in-memory
            # sources); None: crops of image_size at native resolution.
            crop_scale=ml_collections.FieldReference(None, field_type=tuple),
        )
    )
    d.update(overrides)
    return d


def base(**overrides) -> ml_collections.ConfigDict:
    """Keys every training config has (docs/config.md lists them)."""
    c = ml_collections.ConfigDict()
    c.trainer = "vitvqgan"
    c.seed = 0
    c.total_steps = 500_000
    c.batch_size = 256  # global, all hosts
    c.image_size = 256
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.log_every_steps = 100
    c.eval_every_steps = 10_000
    c.eval_num_examples = 10_000  # held-out examples per evaluation (0 = the whole split)
    c.eval_batch_size = 256
    c.image_every_steps = 10_000  # reconstruction grids written to workdir/images
    c.dataset = dataset()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = the rest
    c.axis_rules = DEFAULT_AXIS_RULES
    c.dtype = "bfloat16"  # compute dtype; parameters and optimizer states stay float32
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # bundle or checkpoint
    c.inception_weights = ml_collections.FieldReference(None, field_type=str)  # FID at eval
    c.trainable = "all"  # "decoder": encoder and codebook frozen (fine-tuning, stage 1)
    c.max_consecutive_nonfinite = 10  # skipped steps in a row before the run stops
    c.restart_from_scratch = False  # True: when every checkpoint is damaged, start again
    c.update(overrides)
    return c


def stage1(encoder: str = "S", decoder: str = "S", **overrides) -> ml_collections.ConfigDict:
    """A ViT-VQGAN (stage 1) config with the paper's hyperparameters (docs/paper.md)."""
    c = base(trainer="vitvqgan")
    c.model = ml_collections.ConfigDict(
        dict(
            encoder=transformer(encoder),
            decoder=transformer(decoder),
            patch_size=8,
            codebook_size=8192,
            code_dim=32,  # lookup dimension of the factorized codes
            beta=0.25,  # commitment weight
            output="sigmoid",  # "sigmoid" (logit-Laplace mean, paper) or "raw" (Parti)
            logit_laplace_eps=0.1,
            posemb="sincos",  # "sincos" or "learn"
            search_chunk_size=1024,  # codes compared at once in the nearest-code search
            usage_decay=0.99,  # EMA of per-code usage, read by the dead-code restart
            l2_normalize_codes=True,  # False: the paper's ablation without l2-normalization
            # Which quantizer (vitvq/models/quantizers.py): the paper's by default. The keys
            # above configure the "vq" and "simvq" codebooks; "fsq" and "lfq" have none.
            quantizer=quantizer(),
            # "vit" (the paper) or "cnn": the original VQGAN's convolutional encoder and
            # decoder (`cnn` below; `encoder`/`decoder` are then unused). The CNN downsamples
            # by 2 per level, 2 ** (len(channel_mult) - 1) in all, which must be patch_size.
            backbone="vit",
            cnn=cnn(),
            # Recompute each ViT block in the backward pass: activation memory of one block
            # instead of all, for ~1/3 more FLOPs (python -m vitvq.aot shows when it is needed).
            remat=False,
        )
    )
    c.discriminator = ml_collections.ConfigDict(
        dict(
            kind="stylegan",  # "stylegan" (StyleGAN2 residual, the paper) or "patchgan"
            base_channels=64,  # width at full resolution (both kinds)
            max_channels=512,  # cap on the width (stylegan)
            num_layers=3,  # strided conv layers (patchgan)
        )
    )
    c.eval_lpips = True  # LPIPS in the held-out evaluation (loads the VGG even when unused)
    # docs/paper.md: L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2.
    c.loss = ml_collections.ConfigDict(
        dict(
            l2=1.0,
            logit_laplace=0.1,
            perceptual=0.1,
            adversarial=0.1,
            vq=1.0,
            # Codebook entropy regularizer (not in the paper; 0 = off): mean per-token
            # entropy minus the entropy of the batch's mean soft assignment.
            entropy=0.0,
            entropy_temperature=0.01,  # of the soft assignments softmax(cos / T)
            # When LPIPS and the discriminator join: at the step where one is set (> 0),
            # else at the fraction of total_steps (vitvq/train/schedule.py).
            perceptual_start_step=0,  # LPIPS term switched on at this step
            disc_start_step=0,  # discriminator trained and used from this step
            perceptual_start_fraction=0.0,
            # The same for the logit-Laplace term (default: from the first step).
            logit_laplace_start_step=0,
            logit_laplace_start_fraction=0.0,
            # LPIPS on one random square window of this side per image and step (the same
            # window of the reconstruction and the target); 0 = the whole image (the paper).
            perceptual_crop=0,
            # Not the paper's (it does not say): the discriminator joins half-way, once the
            # reconstruction terms have had their start (BENCHMARKS.md, "Stability at paper
            # scale": at its fixed weight the GAN's term outweighs a small L2).
            disc_start_fraction=0.5,
            gan_loss="non_saturating",  # or "hinge"
            r1_gamma=10.0,  # R1 penalty weight (0 = off)
            r1_every=16,  # lazy R1: applied every N steps, scaled by N
            lecam=0.0,  # LeCam regularizer weight (0 = off)
            lecam_decay=0.99,
            # Not the paper's (it is silent): the adversarial weight is scaled each step by
            # the ratio of the reconstruction terms' gradient norm to the GAN term's, both at
            # the decoder's output (taming's adaptive weight). With a fixed weight the GAN's
            # term outweighed a small L2 and L2 rose once it joined (BENCHMARKS.md,
            # "Stability at paper scale"); False is the paper's fixed weight.
            adaptive_gan_weight=True,
        )
    )
    # Adam b1 0.9 b2 0.99, warmup to 1e-4 over 50k steps, cosine to 5e-5, decoupled wd 1e-4.
    c.optimizer = optimizer(lr=1e-4, end_lr=5e-5, warmup_steps=50_000, b2=0.99)
    c.disc_optimizer = optimizer(lr=1e-4, end_lr=5e-5, warmup_steps=50_000, b2=0.99)
    c.ema_decay = 0.0  # EMA of generator params (0 = off); exported when on
    # Not in the paper (which draws the codebook from a normal distribution): the first step
    # sets the codebook to k-means of that batch's encoder outputs ("kmeans"), which keeps
    # the paper's quantizer from collapsing onto a few codes (BENCHMARKS.md, "Codebook
    # collapse"). "normal": the paper's init. Lloyd iterations after k-means++ seeding.
    c.codebook_init = ml_collections.ConfigDict(dict(kind="kmeans", iterations=10))
    # Dead-code restart (not in the paper; every_steps 0 = off): every 25 steps, codes whose
    # usage EMA is below 0.03 tokens per step (unused for about a hundred steps) move onto
    # current encoder outputs. With the k-means init, what keeps the codebook in use as the
    # encoder's outputs move (BENCHMARKS.md, "Codebook collapse"). stop_step -1 = never.
    c.codebook_restart = ml_collections.ConfigDict(
        dict(every_steps=25, threshold=0.03, start_step=25, stop_step=-1)
    )
    c.update(overrides)
    return c


# VIM-Base and VIM-Large (dropout 0.1 on residual, activation and attention outputs).
VIM_SIZES = {name: dataclasses.asdict(VIM_PRESETS[name]) for name in ("base", "large")}


def stage2(size: str = "base", **overrides) -> ml_collections.ConfigDict:
    """A VIM (stage 2) config with the paper's hyperparameters (docs/paper.md)."""
    c = base(trainer="vim")
    c.image_size = ml_collections.FieldReference(None, field_type=int)  # the tokenizer's
    c.batch_size = 1024
    c.total_steps = 450_000
    c.tokenizer_bundle = ml_collections.FieldReference(None, field_type=str)  # stage-1 bundle
    c.model = ml_collections.ConfigDict(dict(VIM_SIZES[size]))
    # Recompute each block in the backward pass: needed for batch 1024 on 32 GiB chips
    # (python -m vitvq.aot; BENCHMARKS.md), at ~1/3 more FLOPs.
    c.model.remat = False
    # Share of labels replaced by the null class, which classifier-free guidance needs. The
    # paper trains with plain class conditioning (0); the `cfg` variants set 0.1.
    c.class_dropout = 0.0
    # Adam b1 0.9 b2 0.96; linear warmup to a constant 4.5e-4 over 5k steps, exponential
    # decay to 1e-5 from step 80k.
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=4.5e-4,
            end_lr=1e-5,
            warmup_steps=5_000,
            decay_start_step=80_000,
            b1=0.9,
            b2=0.96,
            weight_decay=0.0,
            grad_clip_norm=0.0,
        )
    )
    # Samples written at every image step (one row per class when conditional).
    c.sampling = ml_collections.ConfigDict(
        dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, num_per_class=8, num_samples=16)
    )
    c.update(overrides)
    return c


def _runlocal_loop(c: ml_collections.ConfigDict) -> None:
    """The data, batches, steps and intervals both stages' `runlocal` variants share."""
    c.dataset = dataset("digits", num_classes=10)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.eval_num_examples = 16
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.image_every_steps = 4
    c.checkpoint_every_steps = 2
    c.dtype = "float32"


def runlocal_stage2(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a stage-2 config to run in seconds on a CPU on the bundled digits."""
    _runlocal_loop(c)
    c.model = ml_collections.ConfigDict(
        dict(width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.1, remat=False)
    )
    c.optimizer.update(lr=1e-3, end_lr=1e-4, warmup_steps=1, decay_start_step=2)
    c.sampling.num_per_class = 2
    return c


STAGE2_VARIANTS = ("cfg", "uncond", "runlocal")


def imagenet_stage2(size: str, arg=None) -> ml_collections.ConfigDict:
    """The paper's class-conditional ImageNet VIM over an SS tokenizer.

    `arg` is a comma-separated list of variants: `cfg` drops 10% of the labels (for
    classifier-free guidance), `uncond` trains without labels (the paper's linear-probe
    models), `runlocal` shrinks the run (and needs a digits tokenizer bundle:
    --config.tokenizer_bundle=...).
    """
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    unknown = [p for p in parts if p not in STAGE2_VARIANTS]
    if unknown or ("cfg" in parts and "uncond" in parts):
        raise ValueError(
            f"unknown config variant {arg!r}; expected nothing or a comma-separated choice of "
            f"{STAGE2_VARIANTS} ('cfg' and 'uncond' exclude each other)"
        )
    c = stage2(size)
    c.dataset = dataset("tfds", tfds_name="imagenet2012", num_classes=1000)
    if "runlocal" in parts:
        runlocal_stage2(c)
    if "cfg" in parts:
        c.class_dropout = 0.1
    if "uncond" in parts:
        c.dataset.num_classes = 0  # labels are read but never given to the model
    return c


def optimizer(**overrides) -> ml_collections.ConfigDict:
    """Adam with decoupled weight decay and a warmup + cosine schedule."""
    o = ml_collections.ConfigDict(
        dict(
            lr=1e-4,  # peak learning rate, reached after warmup_steps
            end_lr=5e-5,  # cosine decay ends here at total_steps
            warmup_steps=1000,
            b1=0.9,
            b2=0.99,
            weight_decay=1e-4,  # decoupled (AdamW)
            grad_clip_norm=0.0,  # 0 = off
            codebook_lr_multiplier=1.0,  # the codebook's learning rate relative to lr
            # The warmup is at most this share of total_steps (the paper's 50k of 500k);
            # 0 = no cap (the warmup is only clamped to the run).
            max_warmup_fraction=0.1,
        )
    )
    o.update(overrides)
    return o


def runlocal_stage1(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a stage-1 config to run in seconds on a CPU on the bundled digits."""
    _runlocal_loop(c)
    c.image_size = 32
    c.model.encoder = transformer("S", width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.decoder = transformer("S", width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.codebook_size = 64
    c.model.code_dim = 8
    c.model.cnn = cnn(channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)
    c.discriminator.base_channels = 8
    c.discriminator.max_channels = 16
    c.loss.disc_start_fraction = 0.0  # every term from the first step: seconds test them all
    c.loss.adaptive_gan_weight = False  # one backward pass less to compile (tested elsewhere)
    for opt in (c.optimizer, c.disc_optimizer):
        opt.warmup_steps = 1
        opt.lr = 1e-3
        opt.end_lr = 1e-4
    return c


def imagenet_stage1(encoder: str, decoder: str, arg=None) -> ml_collections.ConfigDict:
    """The paper's stage-1 setup on ImageNet 256x256; `arg="runlocal"` shrinks it."""
    c = stage1(encoder=encoder, decoder=decoder)
    c.dataset = dataset("tfds", tfds_name="imagenet2012", num_classes=1000)
    if arg == "runlocal":
        return runlocal_stage1(c)
    if arg:
        raise ValueError(f"unknown config variant {arg!r}; expected 'runlocal' or nothing")
    return c
