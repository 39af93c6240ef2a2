"""Tests of vitvq/config_check.py, in process (seconds): every shipped config passes; each
mistake in a table raises a one-line ConfigError naming the key, the value and what is allowed.
tests/test_main.py runs a few of the same mistakes through the CLI (exit status 2).
"""

import importlib.util
import math
import pathlib

import ml_collections
import pytest

from vitvq import config_check
from vitvq.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every config file under configs/ and its variants (`--config=configs/X.py:VARIANT`).
SHIPPED = {
    "ablations": (None, "runlocal", "row=cnn", "row=patchgan,scale=small", "row=no_l2norm,small"),
    "demo": (None,),
    "photos": (None, "full", "l2,steps=6000", "full,steps=1500"),
    "vim_base": (None, "runlocal", "cfg", "uncond", "uncond,runlocal", "cfg,runlocal"),
    "vim_large": (None, "runlocal", "cfg", "uncond"),
    "vitvq_base": (None, "runlocal"),
    "vitvq_large": (None, "runlocal"),
    "vitvq_small": (None, "runlocal"),
}
SHIPPED_CASES = [(name, arg) for name, args in SHIPPED.items() for arg in args]


def load(name: str, arg=None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_the_table_lists_every_config_file_and_variant():
    files = {p.stem for p in (REPO / "configs").glob("*.py")} - {"common", "__init__"}
    assert files == set(SHIPPED)
    for name, args in SHIPPED.items():
        if "runlocal" not in args:  # a variant the table misses would load
            with pytest.raises(ValueError, match="unknown config variant"):
                load(name, "runlocal")


@pytest.mark.parametrize("name, arg", SHIPPED_CASES, ids=[f"{n}:{a}" for n, a in SHIPPED_CASES])
@pytest.mark.parametrize("num_devices", [None, 1, 8])
def test_shipped_configs_pass(name, arg, num_devices):
    config = load(name, arg)
    config_check.validate(config, num_devices=num_devices)
    # The trainers pass their stage explicitly (pipeline: the top level is a stage-1 config).
    trainer = {"pipeline": "vitvqgan"}.get(config.trainer, config.trainer)
    config_check.validate(config, trainer=trainer)


def test_every_rule_names_a_key_of_a_shipped_config():
    """A rule whose key no config has would never run: catches a misspelt key in a table."""
    keys = set()
    for name, arg in SHIPPED_CASES:
        flat = load(name, arg).to_dict()
        stack = [("", flat)]
        while stack:
            prefix, node = stack.pop()
            for k, v in node.items():
                keys.add(prefix + k)
                if isinstance(v, dict):
                    stack.append((f"{prefix}{k}.", v))
    rules = config_check.LOOP_RULES + config_check.STAGE1_RULES + config_check.STAGE2_RULES
    optional_only = {  # keys the trainers read with a default, set by no shipped config
        "dataset.eval_fraction",
        "discriminator.channel_multiplier",
        "model.preset",
    }
    missing = {r.key for r in rules} - keys - optional_only
    assert not missing
    assert {r.key for r in rules} & keys  # the walk above found keys at all


def stage1():
    return load("vitvq_small", "runlocal")


def stage2():
    return load("vim_base", "runlocal")


def pipeline():
    return load("demo")


_DELETE = object()


def replaced(config, key: str, value):
    """`config` with `key` (re)set to `value` of any type, as a config file could set it, or
    removed (`_DELETE`)."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.unlocked():
        if last in node:
            del node[last]
        if value is not _DELETE:
            node[last] = value
    return config


# (case id, config, {key: value} overrides (typed, as --config.KEY=VALUE), a key to replace
# with any value or delete (None: none), what the message must contain)
BAD = [
    ("seed_negative", stage1, {"seed": -1}, None, ["config.seed=-1", "[0, 4294967295]"]),
    ("seed_float", stage1, {}, ("seed", 1.5), ["config.seed=1.5", "an integer in [0, "]),
    ("total_steps", stage1, {"total_steps": -1}, None, ["config.total_steps=-1", ">= 0"]),
    ("batch_size", stage1, {"batch_size": 0}, None, ["config.batch_size=0", "an integer >= 1"]),
    ("eval_batch_size", stage1, {"eval_batch_size": -8}, None, ["config.eval_batch_size=-8"]),
    ("log_every", stage1, {"log_every_steps": 0}, None, ["config.log_every_steps=0", ">= 1"]),
    ("eval_examples", stage1, {"eval_num_examples": -1}, None, ["config.eval_num_examples=-1"]),
    ("keep_checkpoints", stage1, {"keep_checkpoints": 0}, None, ["keep_checkpoints=0", "None"]),
    ("nonfinite", stage1, {"max_consecutive_nonfinite": 0}, None, ["max_consecutive_nonfinite"]),
    ("dtype", stage1, {"dtype": "float64"}, None, ["config.dtype='float64'", "'float16'"]),
    ("trainable", stage1, {"trainable": "encoder"}, None, ["trainable='encoder'", "'decoder'"]),
    ("trainer", stage1, {"trainer": "gan"}, None, ["config.trainer='gan'", "'pipeline'"]),
    ("mesh_zero", stage1, {"mesh.tensor": 0}, None, ["config.mesh.tensor=0", "or -1"]),
    (
        "mesh_two_rest",
        stage1,
        {"mesh.data": -1, "mesh.fsdp": -1},
        None,
        ["config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1}", "at most one axis -1"],
    ),
    ("image_size", stage1, {"image_size": 0}, None, ["config.image_size=0", ">= 1"]),
    (
        "image_size_gan",
        stage1,
        {"image_size": 48},
        None,
        ["config.image_size=48", "a power of two >= 8", "config.loss.adversarial=0"],
    ),
    (
        "patch_divides_image",
        stage1,
        {"model.patch_size": 5},
        None,
        ["config.model.patch_size=5", "image_size 32 is not divisible by patch_size 5", "16, 32"],
    ),
    (
        "image_size_gan_suggests_patchgan",
        stage1,
        {"image_size": 48},
        None,
        ["config.discriminator.kind='patchgan'"],
    ),
    ("backbone", stage1, {"model.backbone": "resnet"}, None, ["backbone='resnet'", "'cnn'"]),
    (
        "cnn_groups",
        stage1,
        {"model.backbone": "cnn", "model.cnn.norm_groups": 3},
        None,
        ["config.model.cnn.norm_groups=3", "cannot split width 8 into 3 groups", "(1, 2, 4, 8)"],
    ),
    (
        "cnn_levels",
        stage1,
        {"model.backbone": "cnn", "model.cnn.channel_mult": (1, 2)},
        None,
        ["config.model.cnn.channel_mult=(1, 2)", "downsample by 2", "4 levels"],
    ),
    (
        "cnn_mult",
        stage1,
        {"model.backbone": "cnn", "model.cnn.channel_mult": (1, 0, 2, 2)},
        None,
        ["config.model.cnn.channel_mult=(1, 0, 2, 2)", "integers >= 1"],
    ),
    (
        "cnn_remat",
        stage1,
        {"model.backbone": "cnn", "model.remat": True},
        None,
        ["config.model.remat=True", "False with config.model.backbone='cnn'"],
    ),
    (
        "disc_kind",
        stage1,
        {"discriminator.kind": "biggan"},
        None,
        ["config.discriminator.kind='biggan'", "'patchgan'"],
    ),
    (
        "patchgan_layers",
        stage1,
        {"discriminator.kind": "patchgan", "discriminator.num_layers": 4},
        None,
        ["config.discriminator.num_layers=4", "at most 3 for config.image_size=32"],
    ),
    ("codebook_size", stage1, {"model.codebook_size": 1}, None, ["codebook_size=1", ">= 2"]),
    ("code_dim", stage1, {"model.code_dim": 0}, None, ["config.model.code_dim=0", ">= 1"]),
    (
        "heads_divide_width",
        stage1,
        {"model.encoder.num_heads": 3},
        None,
        ["config.model.encoder.num_heads=3", "a divisor of config.model.encoder.width=32"],
    ),
    ("width", stage1, {"model.decoder.width": 0}, None, ["config.model.decoder.width=0"]),
    ("depth", stage1, {"model.encoder.depth": -1}, None, ["config.model.encoder.depth=-1"]),
    (
        "dropout",
        stage1,
        {"model.decoder.dropout": 1.5},
        None,
        ["config.model.decoder.dropout=1.5", "a number in [0, 1)"],
    ),
    ("output", stage1, {"model.output": "tanh"}, None, ["output='tanh'", "'sigmoid', 'raw'"]),
    ("posemb", stage1, {"model.posemb": "rope"}, None, ["posemb='rope'", "'sincos', 'learn'"]),
    ("eps", stage1, {"model.logit_laplace_eps": 0.5}, None, ["logit_laplace_eps=0.5", "[0, 0.5)"]),
    ("loss_weight", stage1, {"loss.perceptual": -0.1}, None, ["loss.perceptual=-0.1", ">= 0"]),
    (
        "gan_loss",
        stage1,
        {"loss.gan_loss": "wasserstein"},
        None,
        ["config.loss.gan_loss='wasserstein'", "'non_saturating', 'hinge'"],
    ),
    ("r1_every", stage1, {"loss.r1_every": 0}, None, ["config.loss.r1_every=0", ">= 1"]),
    ("lecam_decay", stage1, {"loss.lecam_decay": 1.0}, None, ["lecam_decay=1.0", "[0, 1)"]),
    ("lr_negative", stage1, {"optimizer.lr": -1e-3}, None, ["optimizer.lr=-0.001", "> 0"]),
    ("lr_nan", stage1, {"optimizer.lr": math.nan}, None, ["optimizer.lr=nan", "finite"]),
    ("lr_inf", stage1, {"disc_optimizer.lr": math.inf}, None, ["disc_optimizer.lr=inf"]),
    ("end_lr", stage1, {"optimizer.end_lr": -1.0}, None, ["optimizer.end_lr=-1.0", ">= 0"]),
    ("warmup", stage1, {"optimizer.warmup_steps": -1}, None, ["warmup_steps=-1", ">= 0"]),
    (
        "warmup_share",
        stage1,
        {"optimizer.max_warmup_fraction": 1.5},
        None,
        ["config.optimizer.max_warmup_fraction=1.5", "[0, 1]"],
    ),
    (
        "start_fraction",
        stage1,
        {"loss.disc_start_fraction": 1.0},
        None,
        ["config.loss.disc_start_fraction=1.0", "[0, 1)"],
    ),
    ("lpips_crop", stage1, {"loss.perceptual_crop": -1}, None, ["perceptual_crop=-1", ">= 0"]),
    (
        "lpips_crop_small",
        stage1,
        {"loss.perceptual_crop": 8},
        None,
        ["config.loss.perceptual_crop=8", "[16, config.image_size=32]", "pools four times"],
    ),
    (
        "lpips_crop_large",
        stage1,
        {"loss.perceptual_crop": 48},
        None,
        ["config.loss.perceptual_crop=48", "[16, config.image_size=32]"],
    ),
    ("b1", stage1, {"optimizer.b1": 1.0}, None, ["config.optimizer.b1=1.0", "[0, 1)"]),
    ("b2", stage1, {"disc_optimizer.b2": -0.1}, None, ["disc_optimizer.b2=-0.1", "[0, 1)"]),
    ("weight_decay", stage1, {"optimizer.weight_decay": -1e-4}, None, ["weight_decay=-0.0001"]),
    ("grad_clip", stage1, {"optimizer.grad_clip_norm": -1.0}, None, ["grad_clip_norm=-1.0"]),
    ("ema_decay", stage1, {"ema_decay": 1.0}, None, ["config.ema_decay=1.0", "[0, 1)"]),
    (
        "restart_threshold",
        stage1,
        {"codebook_restart.every_steps": 50, "codebook_restart.threshold": 0.0},
        None,
        ["config.codebook_restart.threshold=0.0", "> 0"],
    ),
    ("restart_stop", stage1, {"codebook_restart.stop_step": -2}, None, ["stop_step=-2", "never"]),
    (
        "dataset_name",
        stage1,
        {"dataset.name": "nope"},
        None,
        ["config.dataset.name='nope'", "'digits', 'photos', 'folder', 'tfds', 'synthetic'"],
    ),
    ("num_classes", stage1, {"dataset.num_classes": -1}, None, ["dataset.num_classes=-1"]),
    (
        "folder_without_path",
        stage1,
        {"dataset.name": "folder"},
        None,
        ["config.dataset.path=None", "required when dataset.name='folder'", "directory"],
    ),
    (
        "crop_scale_range",
        stage1,
        {"dataset.crop_scale": (0.5, 0.2)},
        None,
        ["config.dataset.crop_scale=(0.5, 0.2)", "0 < lo <= hi <= 1"],
    ),
    (
        "crop_scale_source",
        stage1,
        {"dataset.name": "tfds", "dataset.crop_scale": (0.5, 1.0)},
        None,
        ["config.dataset.crop_scale=(0.5, 1.0)", "None for dataset.name='tfds'"],
    ),
    ("missing_key", stage1, {}, ("total_steps", _DELETE), ["config.total_steps is missing"]),
    (
        "quantizer_kind",
        stage1,
        {"model.quantizer.kind": "rq"},
        None,
        ["config.model.quantizer.kind='rq'", "one of 'vq', 'simvq', 'fsq', 'lfq'"],
    ),
    (
        "quantizer_unknown_key",
        stage1,
        {},
        ("model.quantizer.codes", 8),
        ["config.model.quantizer has unknown keys ['codes']", "kind, update"],
    ),
    (
        "vq_update",
        stage1,
        {"model.quantizer.update": "kmeans"},
        None,
        ["config.model.quantizer.update='kmeans'", "'gradient', 'ema'", "kind is 'vq'"],
    ),
    (
        "ema_decay_one",
        stage1,
        {"model.quantizer.update": "ema", "model.quantizer.ema_decay": 1.0},
        None,
        ["config.model.quantizer.ema_decay=1.0", "a number in (0, 1)", "update='ema'"],
    ),
    (
        "ema_decay_zero",
        stage1,
        {"model.quantizer.update": "ema", "model.quantizer.ema_decay": 0.0},
        None,
        ["config.model.quantizer.ema_decay=0.0", "(0, 1)"],
    ),
    (
        "ema_epsilon",
        stage1,
        {"model.quantizer.update": "ema", "model.quantizer.ema_epsilon": 0.0},
        None,
        ["config.model.quantizer.ema_epsilon=0.0", "> 0"],
    ),
    (
        "ema_decay_without_ema",
        stage1,
        {"model.quantizer.ema_decay": 0.9},
        None,
        [
            "config.model.quantizer.ema_decay=0.9",
            "kind='vq' with update='gradient' does not read it",
            "its default 0.99 (unused)",
            "update='ema'",
        ],
    ),
    (
        "quantizer_gradient",
        stage1,
        {"model.quantizer.gradient": "gumbel"},
        None,
        ["config.model.quantizer.gradient='gumbel'", "'straight_through', 'rotation'"],
    ),
    (
        "fsq_level_below_2",
        stage1,
        {"model.quantizer.kind": "fsq", "model.quantizer.levels": (8, 1, 5)},
        None,
        ["config.model.quantizer.levels=(8, 1, 5)", "integers >= 2", "kind is 'fsq'"],
    ),
    (
        "fsq_too_many_codes",
        stage1,
        {"model.quantizer.kind": "fsq", "model.quantizer.levels": (1024,) * 4},
        None,
        ["config.model.quantizer.levels=(1024, 1024, 1024, 1024)", "at most 2147483647"],
    ),
    (
        "levels_with_vq",
        stage1,
        {"model.quantizer.levels": (4, 4)},
        None,
        [
            "config.model.quantizer.levels=(4, 4)",
            "kind='vq' with update='gradient' does not read it",
            "config.model.quantizer.kind='fsq'",
        ],
    ),
    (
        "ema_with_fsq",
        stage1,
        {"model.quantizer.kind": "fsq", "model.quantizer.update": "ema"},
        None,
        [
            "config.model.quantizer.update='ema'",
            "config.model.quantizer.kind='fsq' does not read it",
            "config.model.quantizer.kind='vq'",
        ],
    ),
    (
        "rotation_with_lfq",
        stage1,
        {"model.quantizer.kind": "lfq", "model.quantizer.gradient": "rotation"},
        None,
        ["config.model.quantizer.gradient='rotation'", "kind in ['vq', 'simvq']"],
    ),
    (
        "lfq_bits",
        stage1,
        {"model.quantizer.kind": "lfq", "model.quantizer.bits": 19},
        None,
        ["config.model.quantizer.bits=19", "an integer in [1, 18]"],
    ),
    (
        "lfq_groups_divide_bits",
        stage1,
        {"model.quantizer.kind": "lfq", "model.quantizer.entropy_groups": 3},
        None,
        [
            "config.model.quantizer.entropy_groups=3",
            "a divisor of config.model.quantizer.bits=14 (1, 2, 7, 14)",
        ],
    ),
    (
        "lfq_anneal_steps",
        stage1,
        {"model.quantizer.kind": "lfq", "model.quantizer.entropy_anneal_steps": -5},
        None,
        ["config.model.quantizer.entropy_anneal_steps=-5", ">= 0"],
    ),
    (
        "l2norm_with_simvq",
        stage1,
        {"model.quantizer.kind": "simvq", "model.l2_normalize_codes": False},
        None,
        ["config.model.l2_normalize_codes=False", "True with config.model.quantizer.kind='simvq'"],
    ),
    (
        "codebook_entropy_with_lfq",
        stage1,
        {"model.quantizer.kind": "lfq", "loss.entropy": 0.1},
        None,
        ["config.loss.entropy=0.1", "0 with config.model.quantizer.kind='lfq'", "entropy_weight"],
    ),
    ("class_dropout", stage2, {"class_dropout": 1.0}, None, ["config.class_dropout=1.0", "[0, 1)"]),
    ("vim_end_lr", stage2, {"optimizer.end_lr": 0.0}, None, ["config.optimizer.end_lr=0.0", "> 0"]),
    ("vim_decay_start", stage2, {"optimizer.decay_start_step": -1}, None, ["decay_start_step"]),
    ("temperature", stage2, {"sampling.temperature": -1.0}, None, ["temperature=-1.0", "greedy"]),
    ("top_k", stage2, {"sampling.top_k": -1}, None, ["config.sampling.top_k=-1", ">= 0"]),
    ("top_p", stage2, {"sampling.top_p": 0.0}, None, ["config.sampling.top_p=0.0", "(0, 1]"]),
    ("cfg_scale", stage2, {"sampling.cfg_scale": -1.0}, None, ["cfg_scale=-1.0", ">= 0"]),
    (
        "cfg_without_label_dropout",
        stage2,
        {"sampling.cfg_scale": 2.0},
        None,
        ["config.sampling.cfg_scale=2.0", "class_dropout=0", "class_dropout > 0"],
    ),
    ("per_class", stage2, {"sampling.num_per_class": 0}, None, ["num_per_class=0", ">= 1"]),
    (
        "vim_heads",
        stage2,
        {"model.num_heads": 3},
        None,
        ["config.model.num_heads=3", "a divisor of config.model.width=32"],
    ),
    ("vim_image_size", stage2, {}, ("image_size", 0), ["config.image_size=0", "or None"]),
    ("vim_preset", stage2, {}, ("model.preset", "huge"), ["model.preset='huge'", "'large'"]),
    (
        "pipeline_vim",
        pipeline,
        {"vim.model.dropout": 1.0},
        None,
        ["config.vim.model.dropout=1.0", "[0, 1)"],
    ),
    ("pipeline_no_vim", pipeline, {}, ("vim", _DELETE), ["config.vim is missing"]),
    (
        "pipeline_vocabulary",
        pipeline,
        {"model.codebook_size": 2**18 + 1},
        None,
        ["config.model.codebook_size=262145", "gives 262145 codes", "at most 262144 codes"],
    ),
    (
        "pipeline_fsq_vocabulary",
        pipeline,
        {"model.quantizer.kind": "fsq", "model.quantizer.levels": (8,) * 7},
        None,
        ["config.model.quantizer.levels=(8, 8, 8, 8, 8, 8, 8)", "2097152 codes", "262144"],
    ),
]


@pytest.mark.parametrize(
    "make, overrides, replace, expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_mistake_names_key_and_allowed_values(make, overrides, replace, expected):
    config = make()
    config.update_from_flattened_dict(overrides)
    if replace is not None:
        replaced(config, *replace)
    with pytest.raises(ConfigError) as info:
        config_check.validate(config, num_devices=8)
    message = str(info.value)
    assert "\n" not in message
    assert "allowed: " in message, message
    for text in expected:
        assert text in message, message


def test_at_least_15_distinct_mistakes():
    assert len({c[0] for c in BAD}) == len(BAD) >= 15


@pytest.mark.parametrize(
    "mesh, devices, expected",
    [
        ({"data": 3}, 8, ["config.mesh={'data': 3, 'fsdp': 1, 'tensor': 1}", "multiplies to 3"]),
        ({"data": -1, "fsdp": 3}, 8, ["does not divide the 8 devices", "'data' cannot be -1"]),
        ({"data": 2, "fsdp": 2, "tensor": 1}, 8, ["multiplies to 4 but there are 8 devices"]),
    ],
)
def test_mesh_against_device_count(mesh, devices, expected):
    config = stage1()
    config.mesh.update(mesh)
    config_check.validate(config)  # without a device count only the values are checked
    with pytest.raises(ConfigError) as info:
        config_check.validate(config, num_devices=devices)
    for text in expected:
        assert text in str(info.value), str(info.value)
    config_check.validate(config, num_devices=math.prod(config.mesh.get(a, 1) for a in mesh))


def test_absent_optional_and_unknown_keys_pass():
    config = stage1()
    for key in (
        "max_consecutive_nonfinite",
        "image_every_steps",
        "loss.entropy",
        "loss.entropy_temperature",
        "optimizer.codebook_lr_multiplier",
        "optimizer.grad_clip_norm",
        "dataset.crop_scale",
        "init_from",
    ):
        replaced(config, key, _DELETE)
    with config.unlocked():
        config.eval_lpips = False  # read with a default
        config.some_future_key = 1  # not read by this version: ignored here
    config_check.validate(config, num_devices=8)


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "simvq"},
        {"kind": "fsq"},
        {"kind": "lfq"},
        {"update": "ema"},
        {"gradient": "rotation"},
        {"kind": "simvq", "gradient": "rotation"},
        {"kind": "fsq", "levels": (7, 5, 5, 5, 5)},
        {"kind": "lfq", "bits": 18, "entropy_groups": 3, "entropy_anneal_steps": 1000},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_switching_the_quantizer_kind_alone_passes(changes):
    """Each kind's keys are read only with it; the default keys of the other kinds, the
    codebook init and the dead-code restart (on by default) do not stand in the way."""
    for make in (stage1, pipeline):
        config = make()
        config.model.quantizer.update(changes)
        config_check.validate(config, num_devices=8)


def test_a_config_saved_before_the_quantizer_block_passes_as_vq():
    config = stage1()
    replaced(config, "model.quantizer", _DELETE)
    config_check.validate(config, num_devices=8)
    assert config_check.check(config).model.get("quantizer") is None


def test_conditional_rules_apply_only_when_their_feature_is_on():
    config = stage1()
    config.loss.update(adversarial=0.0, r1_gamma=0.0, r1_every=0)  # no GAN, no R1: any size
    config.image_size = 48
    config.codebook_restart.update(every_steps=0, threshold=0.0)  # no restart: no threshold
    config_check.validate(config)


def test_vim_sizes_may_come_from_a_preset():
    config = stage2()
    with config.model.unlocked():
        for key in ("width", "depth", "num_heads", "mlp_dim"):
            del config.model[key]
        config.model.preset = "small"
    config_check.validate(config)
    del config.model["preset"]
    with pytest.raises(ConfigError, match="config.model.width is missing.*preset"):
        config_check.validate(config)


def test_vim_configs_are_the_papers_and_their_variants_differ_in_one_thing():
    for name in ("vim_base", "vim_large"):
        paper, cfg, uncond = load(name), load(name, "cfg"), load(name, "uncond")
        assert paper.class_dropout == 0.0 and paper.dataset.num_classes == 1000
        assert cfg.class_dropout == 0.1 and cfg.dataset.num_classes == 1000
        assert uncond.class_dropout == 0.0 and uncond.dataset.num_classes == 0
        for variant in (cfg, uncond):
            assert variant.model == paper.model and variant.optimizer == paper.optimizer
        with pytest.raises(ValueError, match="exclude each other"):
            load(name, "cfg,uncond")
    small = load("vim_base", "uncond,runlocal")
    assert small.dataset.name == "digits" and small.dataset.num_classes == 0


def test_the_vims_largest_vocabulary_is_checked_where_a_tokenizer_meets_a_vim():
    """2**18 codes at most (docs/codebook.md): a pipeline's stage-1 config at the limit passes
    and a stage-1 config alone may exceed it; a VIM built on more (stage 2's builder, a
    bundle's VIM) is refused in one line naming the count and the limit."""
    import jax

    from vitvq import bundle, parallel
    from vitvq.errors import BundleError
    from vitvq.models.vim import MAX_VOCAB
    from vitvq.models.vitvqgan import build_vitvqgan
    from vitvq.train.stage2_build import Stage2

    assert MAX_VOCAB == 2**18
    config = pipeline()
    config.model.codebook_size = MAX_VOCAB
    config_check.validate(config, num_devices=8)
    config = stage1()
    config.model.codebook_size = MAX_VOCAB + 1
    config_check.validate(config, num_devices=8)  # a tokenizer alone: no VIM to feed

    vim_config = stage2()
    vim_config.tokenizer_bundle = "/bundles/tok"
    settings = config_check.check(vim_config)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tok_model = config.model.to_dict()
    for codes in (MAX_VOCAB, MAX_VOCAB + 1):
        tokenizer = build_vitvqgan({**tok_model, "codebook_size": codes}, config.image_size)
        if codes == MAX_VOCAB:
            assert Stage2(settings, mesh, tokenizer=({}, tokenizer, {})).model.vocab_size == codes
            continue
        with pytest.raises(ConfigError) as info:
            Stage2(settings, mesh, tokenizer=({}, tokenizer, {}))
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("the tokenizer bundle /bundles/tok has 262145 codes")
        assert "largest VIM vocabulary, 262144" in message

    manifest = {
        "tokenizer": {"codebook_size": MAX_VOCAB + 1, "grid_size": 4},
        "vim": {"model": vim_config.model.to_dict(), "vocab_size": MAX_VOCAB + 1},
    }
    with pytest.raises(BundleError) as info:
        bundle.vim_model(manifest)
    message = str(info.value)
    assert "\n" not in message and "vocab_size=262145" in message
    assert "has 262145 codes" in message and "largest VIM vocabulary, 262144" in message
