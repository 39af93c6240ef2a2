"""Checks every training config value once, before anything is built or compiled.

`check(config)` is the entry point: it validates the config (and, given the device and
process counts, the batch sizes against the mesh) and returns it frozen as
`vitvq.settings.Settings`, which everything past it reads without checking a key again.

`validate(config)` walks the trainers' tables of rules: one row per key (its type, range or
allowed values), plus the checks that relate keys (heads that divide the width, a patch
that divides the image, the mesh against the device count, ...). The first bad value raises
a `ConfigError` whose message is one line that names the full key, the value and what is
allowed (the rule and value-spec classes, how a rule is applied and that wording live in
vitvq/config_rules.py; this module holds what is checked), e.g.

    config.model.encoder.num_heads=5 is invalid: width 32 is not divisible by 5 heads;
    allowed: a divisor of config.model.encoder.width=32 (1, 2, 4, 8, 16, 32)

(on one line). Keys a config does not have are skipped unless the trainer reads them
without a default (then they are reported as missing): configs differ by trainer, and
configs written before a key existed still load. ml_collections already checks the types of
overrides; these rules add ranges, choices and the relations between keys.

Trainers (`config.trainer`): "vitvqgan" (stage 1, vitvq/train/stage1.py), "vim" (stage 2,
vitvq/train/stage2.py) and "pipeline" (vitvq/train/pipeline.py: the top-level keys are a
stage-1 config, `config.vim` a stage-2 config).
"""

import dataclasses
import math
from typing import Any

from vitvq import parallel
from vitvq.config_quantizer import (
    QUANTIZER_RULES,
    check_quantizer_relations,
    check_vim_vocabulary,
)
from vitvq.config_rules import (
    MISSING,
    Bool,
    Fractions,
    Int,
    OneOf,
    PositiveInts,
    Real,
    Rule,
    Text,
    apply,
    divisors,
    fail,
    get,
    is_int,
    is_real,
)
from vitvq.data.pipeline import KNOWN_SOURCES
from vitvq.errors import ConfigError
from vitvq.losses import GAN_LOSS_KINDS
from vitvq.models.discriminator import DISCRIMINATOR_KINDS, patch_logits_size
from vitvq.models.kmeans import CODEBOOK_INITS
from vitvq.models.perceptual import MIN_IMAGE_SIZE
from vitvq.models.vim import VIM_CONFIG_KEYS, VIM_PRESETS
from vitvq.models.vit import POSEMB_KINDS
from vitvq.models.vitvqgan import BACKBONES, OUTPUT_KINDS
from vitvq.parallel import MESH_AXES
from vitvq.settings import DTYPES, TRAINABLE, Settings

TRAINERS = ("vitvqgan", "vim", "pipeline")
IN_MEMORY_SOURCES = ("digits", "photos", "synthetic")  # the sources dataset.crop_scale applies to
MAX_SEED = 2**32 - 1  # jax.random.key keeps the low 32 bits: larger seeds alias smaller ones


# --- rule tables ---------------------------------------------------------------------------

POSITIVE = Int(lo=1)
NON_NEGATIVE = Int(lo=0)
WEIGHT = Real(lo=0.0)  # a loss weight (0 = off)
DECAY = Real(lo=0.0, hi=1.0, hi_open=True)  # an EMA decay or a probability below 1
ADAM_BETA = Real(lo=0.0, hi=1.0, hi_open=True)
RATE = Real(lo=0.0, lo_open=True)
START_FRACTION = Real(lo=0.0, hi=1.0, hi_open=True, note="read where the step key is 0")

# Both trainers' loop, data and parallelism keys (vitvq/train/runner.py, loop.py, data/).
LOOP_RULES = (
    Rule("trainer", OneOf(TRAINERS)),
    Rule("seed", Int(lo=0, hi=MAX_SEED), required=True),
    Rule("total_steps", NON_NEGATIVE, required=True),
    Rule("batch_size", POSITIVE, required=True),
    Rule("eval_batch_size", POSITIVE, required=True),
    Rule("log_every_steps", POSITIVE, required=True),
    Rule("eval_every_steps", POSITIVE, required=True),
    Rule("checkpoint_every_steps", POSITIVE, required=True),
    Rule("image_every_steps", Int(lo=0, note="0: only at the end")),
    Rule("eval_num_examples", Int(lo=0, note="0: the whole split")),
    Rule("keep_checkpoints", Int(lo=1, also=(None,), note="None: keep all"), required=True),
    Rule("max_consecutive_nonfinite", POSITIVE),
    Rule("restart_from_scratch", Bool()),
    Rule("dtype", OneOf(DTYPES), required=True),
    Rule("init_from", Text(optional=True, note="a bundle or checkpoint directory")),
    Rule("inception_weights", Text(optional=True, note="converted InceptionV3 safetensors")),
    Rule("eval_lpips", Bool()),
    *(
        Rule(f"mesh.{axis}", Int(lo=1, also=(-1,), note="-1: the rest of the devices"))
        for axis in MESH_AXES
    ),
    Rule("dataset.name", OneOf(KNOWN_SOURCES), required=True),
    Rule("dataset.num_classes", Int(lo=0, note="0: unconditional")),
    Rule("dataset.crop_scale", Fractions()),
    Rule("dataset.eval_fraction", Real(lo=0.0, hi=1.0, hi_open=True)),
    Rule("dataset.shuffle_buffer", NON_NEGATIVE),
    Rule("dataset.train_split", Text()),
    Rule("dataset.eval_split", Text()),
    Rule(
        "dataset.path",
        Text(note="a directory of images"),
        required=True,
        when=lambda c: get(c, "dataset.name") == "folder",
        reason="required when dataset.name='folder'",
    ),
    Rule(
        "dataset.tfds_name",
        Text(note="a TFDS dataset name, e.g. 'imagenet2012'"),
        required=True,
        when=lambda c: get(c, "dataset.name") == "tfds",
        reason="required when dataset.name='tfds'",
    ),
)


def _transformer_rules(block: str, required: bool) -> tuple[Rule, ...]:
    return (
        Rule(f"{block}.width", POSITIVE, required=required),
        Rule(f"{block}.depth", POSITIVE, required=required),
        Rule(f"{block}.num_heads", POSITIVE, required=required),
        Rule(f"{block}.mlp_dim", POSITIVE, required=required),
        Rule(f"{block}.dropout", DECAY),
    )


def _optimizer_rules(block: str, *, stage2: bool, required: bool = True) -> tuple[Rule, ...]:
    """The keys of make_optimizer (stage 1) or make_adam (stage 2) in vitvq/train/optim.py."""
    rules = (
        Rule(f"{block}.lr", RATE, required=required),
        # Stage 2 decays exponentially towards end_lr (a ratio end_lr / lr): it must be > 0.
        Rule(f"{block}.end_lr", RATE if stage2 else WEIGHT, required=required),
        # Both schedules cap the warmup (vitvq/train/schedule.py): any count >= 0 works.
        Rule(f"{block}.warmup_steps", NON_NEGATIVE, required=required),
        Rule(f"{block}.max_warmup_fraction", Real(lo=0.0, hi=1.0, note="0: no cap")),
        Rule(f"{block}.b1", ADAM_BETA, required=required),
        Rule(f"{block}.b2", ADAM_BETA, required=required),
        Rule(f"{block}.weight_decay", WEIGHT, required=required and not stage2),
        Rule(f"{block}.grad_clip_norm", Real(lo=0.0, note="0: off")),
    )
    if stage2:
        return (*rules, Rule(f"{block}.decay_start_step", NON_NEGATIVE, required=required))
    return (*rules, Rule(f"{block}.codebook_lr_multiplier", WEIGHT))


def _gan_on(config) -> bool:
    return is_real(w := get(config, "loss.adversarial", 0.0)) and w > 0


def _cnn_on(config) -> bool:
    return get(config, "model.backbone", "vit") == "cnn"


def _patchgan_on(config) -> bool:
    return _gan_on(config) and get(config, "discriminator.kind", "stylegan") == "patchgan"


def _stylegan_on(config) -> bool:
    return _gan_on(config) and get(config, "discriminator.kind", "stylegan") == "stylegan"


_WHEN_CNN = dict(when=_cnn_on, reason="read when model.backbone='cnn'")


STAGE1_RULES = (
    Rule("trainable", OneOf(TRAINABLE)),
    Rule("image_size", POSITIVE, required=True),
    Rule("model.patch_size", POSITIVE, required=True),
    Rule("model.codebook_size", Int(lo=2), required=True),
    Rule("model.code_dim", POSITIVE, required=True),
    Rule("model.beta", WEIGHT),
    Rule("model.output", OneOf(OUTPUT_KINDS)),
    Rule("model.logit_laplace_eps", Real(lo=0.0, hi=0.5, hi_open=True)),
    Rule("model.posemb", OneOf(POSEMB_KINDS)),
    Rule("model.search_chunk_size", Int(lo=0, note="0: all codes at once")),
    Rule("model.usage_decay", DECAY),
    Rule("model.l2_normalize_codes", Bool()),
    Rule("model.backbone", OneOf(BACKBONES)),
    Rule("model.remat", Bool()),
    *QUANTIZER_RULES,  # model.quantizer (vitvq/config_quantizer.py)
    *_transformer_rules("model.encoder", required=True),
    *_transformer_rules("model.decoder", required=True),
    Rule("model.cnn.channels", POSITIVE, required=True, **_WHEN_CNN),
    Rule("model.cnn.channel_mult", PositiveInts(), required=True, **_WHEN_CNN),
    Rule("model.cnn.num_res_blocks", POSITIVE, **_WHEN_CNN),
    Rule("model.cnn.attention", Bool(), **_WHEN_CNN),
    Rule("model.cnn.norm_groups", POSITIVE, **_WHEN_CNN),
    Rule("model.cnn.dropout", DECAY, **_WHEN_CNN),
    Rule("discriminator.kind", OneOf(DISCRIMINATOR_KINDS), when=_gan_on),
    Rule("discriminator.base_channels", POSITIVE, required=True, when=_gan_on),
    Rule("discriminator.max_channels", POSITIVE, required=True, when=_stylegan_on),
    Rule("discriminator.channel_multiplier", POSITIVE),
    Rule(
        "discriminator.num_layers",
        POSITIVE,
        when=_patchgan_on,
        reason="read when discriminator.kind='patchgan'",
    ),
    *(
        Rule(f"loss.{k}", WEIGHT, required=True)
        for k in ("l2", "logit_laplace", "perceptual", "adversarial", "vq", "r1_gamma", "lecam")
    ),
    Rule("loss.entropy", WEIGHT),
    Rule("loss.entropy_temperature", RATE),
    Rule("loss.perceptual_start_step", NON_NEGATIVE, required=True),
    Rule("loss.disc_start_step", NON_NEGATIVE, required=True),
    Rule("loss.perceptual_start_fraction", START_FRACTION),
    Rule("loss.logit_laplace_start_step", NON_NEGATIVE),
    Rule("loss.logit_laplace_start_fraction", START_FRACTION),
    Rule("loss.perceptual_crop", Int(lo=0, note="0: the whole image")),
    Rule("loss.disc_start_fraction", START_FRACTION),
    Rule("loss.gan_loss", OneOf(GAN_LOSS_KINDS), required=True),
    Rule(
        "loss.r1_every",
        POSITIVE,
        required=True,
        when=lambda c: is_real(g := get(c, "loss.r1_gamma", 0.0)) and g > 0,
    ),
    Rule("loss.lecam_decay", DECAY, required=True),
    Rule("loss.adaptive_gan_weight", Bool()),
    *_optimizer_rules("optimizer", stage2=False),
    # Read only with the GAN on (loss.adversarial > 0); checked whenever present.
    *_optimizer_rules("disc_optimizer", stage2=False, required=False),
    Rule("ema_decay", Real(lo=0.0, hi=1.0, hi_open=True, note="0: off"), required=True),
    Rule("codebook_init.kind", OneOf(CODEBOOK_INITS)),
    Rule("codebook_init.iterations", Int(lo=0)),
    Rule("codebook_restart.every_steps", Int(lo=0, note="0: off"), required=True),
    Rule(
        "codebook_restart.threshold",
        RATE,
        required=True,
        when=lambda c: is_int(n := get(c, "codebook_restart.every_steps", 0)) and n > 0,
    ),
    Rule("codebook_restart.start_step", NON_NEGATIVE, required=True),
    Rule("codebook_restart.stop_step", Int(lo=-1, note="-1: never"), required=True),
)

STAGE2_RULES = (
    # The tokenizer bundle fixes the image size; set, it must be the same (checked later).
    Rule("image_size", Int(lo=1, also=(None,), note="None: the tokenizer's")),
    Rule("tokenizer_bundle", Text(optional=True, note="a stage-1 bundle directory")),
    Rule("model.preset", OneOf(tuple(sorted(VIM_PRESETS)))),
    *_transformer_rules("model", required=False),
    Rule("model.remat", Bool()),
    Rule("class_dropout", DECAY, required=True),
    *_optimizer_rules("optimizer", stage2=True),
    Rule("sampling.temperature", Real(lo=0.0, note="0: greedy"), required=True),
    Rule("sampling.top_k", Int(lo=0, note="0: off"), required=True),
    Rule("sampling.top_p", Real(lo=0.0, hi=1.0, lo_open=True, note="1: off"), required=True),
    Rule("sampling.cfg_scale", Real(lo=0.0, note="1: off"), required=True),
    Rule("sampling.num_per_class", POSITIVE, required=True),
    Rule("sampling.num_samples", POSITIVE),
)


# --- checks that relate keys ---------------------------------------------------------------


def _check_heads(width, heads, path: str, width_path: str) -> None:
    if is_int(width) and is_int(heads) and width > 0 and heads > 0 and width % heads:
        fail(
            path,
            heads,
            f"a divisor of {width_path}={width} ({divisors(width)})",
            f"width {width} is not divisible by {heads} heads",
        )


def _check_stage1_relations(config, prefix: str) -> None:
    for block in ("encoder", "decoder"):
        _check_heads(
            get(config, f"model.{block}.width"),
            get(config, f"model.{block}.num_heads"),
            f"{prefix}.model.{block}.num_heads",
            f"{prefix}.model.{block}.width",
        )
    image_size, patch = get(config, "image_size"), get(config, "model.patch_size")
    if image_size % patch:  # both are positive integers (the tables ran first)
        fail(
            f"{prefix}.model.patch_size",
            patch,
            f"a divisor of {prefix}.image_size={image_size} ({divisors(image_size)})",
            f"image_size {image_size} is not divisible by patch_size {patch}",
        )
    if _stylegan_on(config) and (image_size < 8 or image_size & (image_size - 1)):
        fail(
            f"{prefix}.image_size",
            image_size,
            f"a power of two >= 8 (8, 16, 32, ...), {prefix}.discriminator.kind='patchgan', "
            f"or {prefix}.loss.adversarial=0 (no GAN)",
            "the StyleGAN discriminator halves the image down to 4x4",
        )
    crop = get(config, "loss.perceptual_crop", 0)
    if crop and not MIN_IMAGE_SIZE <= crop <= image_size:
        fail(
            f"{prefix}.loss.perceptual_crop",
            crop,
            f"0 (the whole image) or a side in [{MIN_IMAGE_SIZE}, {prefix}.image_size="
            f"{image_size}]",
            f"LPIPS's VGG16 pools four times (at least {MIN_IMAGE_SIZE} pixels) and the window "
            "lies inside the image",
        )
    if _patchgan_on(config):
        layers = get(config, "discriminator.num_layers", 3)
        if patch_logits_size(image_size, layers) < 1:  # the module's own output size
            most = 0
            while patch_logits_size(image_size, most + 1) >= 1:
                most += 1
            fail(
                f"{prefix}.discriminator.num_layers",
                layers,
                f"at most {most} for {prefix}.image_size={image_size}",
                f"{layers} halvings leave no patch to judge",
            )
    if _cnn_on(config):
        _check_cnn_relations(config, prefix, patch)
    check_quantizer_relations(config, prefix)


def _check_cnn_relations(config, prefix: str, patch: int) -> None:
    if get(config, "model.remat", False):
        fail(
            f"{prefix}.model.remat",
            True,
            f"False with {prefix}.model.backbone='cnn'",
            "remat recomputes the ViT backbone's transformer blocks; the CNN has none",
        )
    channels = get(config, "model.cnn.channels")
    mult = tuple(get(config, "model.cnn.channel_mult"))
    groups = get(config, "model.cnn.norm_groups", 32)
    widths = sorted({channels * m for m in mult})
    bad = [w for w in widths if w % groups]
    if bad:
        fail(
            f"{prefix}.model.cnn.norm_groups",
            groups,
            f"a common divisor of the level widths {widths} ({divisors(math.gcd(*widths))})",
            f"GroupNorm cannot split width {bad[0]} into {groups} groups",
        )
    levels = len(mult)
    if 2 ** (levels - 1) != patch:
        needed = math.log2(patch)
        allowed = (
            f"{int(needed) + 1} levels (2x down between levels gives the patch_size {patch})"
            if needed == int(needed)
            else f"a power-of-two {prefix}.model.patch_size"
        )
        fail(
            f"{prefix}.model.cnn.channel_mult",
            mult,
            allowed,
            f"{levels} levels downsample by {2 ** (levels - 1)}, not by "
            f"{prefix}.model.patch_size={patch}",
        )


def _check_stage2_relations(config, prefix: str) -> None:
    model = get(config, "model", None)
    if model is None or not hasattr(model, "keys"):
        raise ConfigError(f"{prefix}.model is missing; allowed: a VIM model block")
    unknown = sorted(set(model.keys()) - set(VIM_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"{prefix}.model has unknown keys {unknown}; allowed: {', '.join(VIM_CONFIG_KEYS)}"
        )
    preset = get(config, "model.preset", None)
    sizes = dataclasses.asdict(VIM_PRESETS[preset]) if preset is not None else {}
    sizes.update({k: v for k, v in model.items() if v is not None})
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        if key not in sizes:
            raise ConfigError(
                f"{prefix}.model.{key} is missing; allowed: {POSITIVE.allowed()}, or set "
                f"{prefix}.model.preset (one of {', '.join(sorted(VIM_PRESETS))})"
            )
    _check_heads(
        sizes["width"],
        sizes["num_heads"],
        f"{prefix}.model.num_heads",
        f"{prefix}.model.width",
    )
    cfg_scale = get(config, "sampling.cfg_scale", 1.0)
    if cfg_scale != 1.0 and get(config, "class_dropout", 0.0) == 0.0:
        fail(
            f"{prefix}.sampling.cfg_scale",
            cfg_scale,
            f"1.0 while {prefix}.class_dropout=0 (guidance needs a trained null class: set "
            "class_dropout > 0, e.g. the configs' `cfg` variant)",
        )


def _check_mesh(config, prefix: str, num_devices: int | None) -> None:
    mesh = get(config, "mesh")
    path = f"{prefix}.mesh"
    if mesh is MISSING or mesh is None or not hasattr(mesh, "items"):
        raise ConfigError(
            f"{path} is missing; allowed: sizes of the axes {', '.join(MESH_AXES)} "
            "(one of them may be -1: the rest of the devices)"
        )
    sizes = dict(mesh.items())
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        fail(path, mesh, f"the axes {', '.join(MESH_AXES)}", f"unknown axes {unknown}")
    rest = [axis for axis in MESH_AXES if sizes.get(axis, 1) == -1]
    if len(rest) > 1:
        fail(
            path,
            mesh,
            "at most one axis -1 (the rest of the devices), the others positive",
            f"{len(rest)} axes ({', '.join(rest)}) are -1",
        )
    if num_devices is None:
        return
    fixed = math.prod(sizes.get(axis, 1) for axis in MESH_AXES if sizes.get(axis, 1) != -1)
    if rest and num_devices % fixed:
        fail(
            path,
            mesh,
            f"axes whose fixed sizes multiply to a divisor of {num_devices} (the device count)",
            f"the other axes multiply to {fixed}, which does not divide the {num_devices} "
            f"devices, so axis {rest[0]!r} cannot be -1",
        )
    if not rest and fixed != num_devices:
        fail(
            path,
            mesh,
            f"sizes that multiply to {num_devices}, or one axis -1 (the rest of the devices)",
            f"it multiplies to {fixed} but there are {num_devices} devices",
        )


def _check_dataset_relations(config, prefix: str) -> None:
    name = get(config, "dataset.name")
    crop_scale = get(config, "dataset.crop_scale", None)
    if crop_scale is not None and name not in IN_MEMORY_SOURCES:
        fail(
            f"{prefix}.dataset.crop_scale",
            crop_scale,
            f"None for dataset.name={name!r} (crop_scale applies to the in-memory sources "
            f"{', '.join(IN_MEMORY_SOURCES)})",
        )


# --- entry point ---------------------------------------------------------------------------


def validate(
    config,
    *,
    trainer: str | None = None,
    num_devices: int | None = None,
    prefix: str = "config",
) -> None:
    """Raises ConfigError (one line: key, value, what is allowed) on the first bad value.

    trainer: the rules of "vitvqgan", "vim" or "pipeline" (default: `config.trainer`).
    num_devices: also checks that `config.mesh` fits this many devices.
    prefix: how the config is named in messages ("config.vim" for a pipeline's VIM block).
    """
    trainer = trainer if trainer is not None else get(config, "trainer", "vitvqgan")
    if trainer not in TRAINERS:
        fail(f"{prefix}.trainer", trainer, OneOf(TRAINERS).allowed())
    apply(LOOP_RULES, config, prefix)
    _check_mesh(config, prefix, num_devices)
    _check_dataset_relations(config, prefix)
    if trainer == "vim":
        apply(STAGE2_RULES, config, prefix)
        _check_stage2_relations(config, prefix)
        return
    apply(STAGE1_RULES, config, prefix)
    _check_stage1_relations(config, prefix)
    if trainer == "pipeline":
        vim = get(config, "vim", None)
        if vim is None or not hasattr(vim, "items"):
            raise ConfigError(
                f"{prefix}.vim is missing; allowed: a stage-2 (VIM) config block, as in "
                "configs/demo.py"
            )
        check_vim_vocabulary(config, prefix)
        validate(vim, trainer="vim", num_devices=num_devices, prefix=f"{prefix}.vim")


def check(
    config: Any,
    *,
    trainer: str | None = None,
    num_devices: int | None = None,
    process_count: int | None = None,
    prefix: str = "config",
) -> Settings:
    """`config` checked against every rule, as frozen `Settings` (already checked settings
    are returned as they are: a rule runs once).

    trainer: the rules of "vitvqgan", "vim" or "pipeline" (default: `config.trainer`).
    num_devices: also checks that `config.mesh` fits this many devices, and with
    `process_count` that each batch size splits over the mesh's batch shards and the
    processes.
    """
    if isinstance(config, Settings) and config.checked:
        return config
    validate(config, trainer=trainer, num_devices=num_devices, prefix=prefix)
    if num_devices is not None and process_count is not None:
        _check_batches(config, num_devices, process_count, prefix)
        if (trainer or config.get("trainer")) == "pipeline":
            _check_batches(config.vim, num_devices, process_count, f"{prefix}.vim")
    return Settings(config, checked=True)


def _check_batches(config: Any, num_devices: int, process_count: int, prefix: str) -> None:
    data, fsdp, _ = parallel.mesh_shape(config.mesh, num_devices)
    for key in ("batch_size", "eval_batch_size"):
        try:
            parallel.check_batch(config[key], data, fsdp, process_count)
        except ConfigError as e:  # its message says config.batch_size: name the real key
            raise ConfigError(str(e).replace("config.batch_size", f"{prefix}.{key}")) from None
