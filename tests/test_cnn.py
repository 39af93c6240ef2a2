"""Tests for the convolutional VQGAN encoder/decoder and the PatchGAN discriminator."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from vitvq import losses
from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.cnn import (
    CNNDecoder,
    CNNEncoder,
    CNNSpec,
    grid_to_tokens,
    group_norm,
    tokens_to_grid,
    upsample_nearest,
    validate_cnn_spec,
)
from vitvq.models.discriminator import (
    DISCRIMINATOR_KINDS,
    Discriminator,
    PatchDiscriminator,
    build_discriminator,
    discriminator_from_config,
    patch_discriminator_channels,
    patch_logits_size,
)
from vitvq.models.vit import patchify

# Widths 16, 16, 32, 64 over four levels: the default layout (8x downsampling), small.
SMALL = CNNSpec(channels=16, channel_mult=(1, 1, 2, 4), num_res_blocks=1, norm_groups=4)
# Two levels (2x downsampling), for tests that only need the wiring.
TINY = CNNSpec(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
SMALL_DISC = dict(base_channels=8, max_channels=32)


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


def _key(seed: int = 0) -> jax.Array:
    """rbg rather than threefry: a threefry init compiles seconds longer on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


def _fast_init(module: nn.Module, *args, seed: int = 0):
    """`module.init(key, *args)` with the structure and logical boxes of the real init (traced
    abstractly) and values drawn on the host: kernels N(0, 1 / fan_in), biases zero, norm
    scales one. Compiling a real init takes seconds on CPU; parameter values do not matter
    to these tests beyond being reasonable."""
    abstract = jax.eval_shape(module.init, _key(), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        values = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _images(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(size=(batch, size, size, 3)), jnp.float32)


@functools.cache
def _init_pair(spec: CNNSpec, image_size: int):
    """(encoder, decoder, encoder variables, decoder variables) for `image_size` images.

    The parameters do not depend on the image size: they are made once per spec and shared.
    """
    return (CNNEncoder(spec, image_size), CNNDecoder(spec, image_size), *_init_vars(spec))


@functools.cache
def _init_vars(spec: CNNSpec):
    size = spec.downsample
    images, tokens = jnp.zeros((1, size, size, 3)), jnp.zeros((1, 1, spec.width))
    return _fast_init(CNNEncoder(spec, size), images), _fast_init(CNNDecoder(spec, size), tokens)


# ---------------------------------------------------------------------------------------------
# CNN encoder / decoder.


def test_default_spec_256_shapes_and_parameter_counts():
    spec = CNNSpec()
    assert (spec.downsample, spec.width) == (8, 512)
    validate_cnn_spec(spec, 256, 8)
    enc, dec = CNNEncoder(spec, 256), CNNDecoder(spec, 256)
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    enc_vars = jax.eval_shape(enc.init, jax.random.key(0), images)
    tokens = jax.eval_shape(enc.apply, enc_vars, images)
    assert tokens.shape == (2, 32 * 32, 512)
    dec_vars = jax.eval_shape(dec.init, jax.random.key(0), tokens)
    out = jax.eval_shape(dec.apply, dec_vars, tokens)
    assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32
    n_enc, n_dec = _count(enc_vars) / 1e6, _count(dec_vars) / 1e6
    print(
        f"CNN channels=128 channel_mult=(1, 1, 2, 4): encoder {n_enc:.1f}M, decoder "
        f"{n_dec:.1f}M (taming's f16 VQGAN: ~29M + ~42M)"
    )
    assert 10 < n_enc < n_dec < 60
    # Every sharded (named) dimension splits over an FSDP axis of up to 8 devices.
    for spec_tree, variables in ((nn.get_partition_spec(enc_vars), enc_vars),) + (
        (nn.get_partition_spec(dec_vars), dec_vars),
    ):
        _check_named_dims(spec_tree, variables, divisor=8)


def test_small_spec_256_round_trip_shapes_and_values():
    enc, dec, enc_vars, dec_vars = _init_pair(SMALL, 256)
    images = _images(1, 256)

    @jax.jit
    def run(images):
        tokens = enc.apply(enc_vars, images)
        return tokens, dec.apply(dec_vars, tokens)

    tokens, out = run(images)
    assert tokens.shape == (1, 1024, SMALL.width)
    assert out.shape == (1, 256, 256, 3) and out.dtype == jnp.float32
    assert np.all(np.isfinite(tokens)) and np.all(np.isfinite(out))
    assert float(jnp.std(tokens)) > 1e-3 and float(jnp.std(out)) > 1e-3


def test_dropout_in_training_mode():
    spec = dataclasses.replace(TINY, dropout=0.5)
    enc, dec, enc_vars, dec_vars = _init_pair(spec, 16)
    images = _images(1, 16)

    @jax.jit
    def run(rng):
        rngs = {"dropout": rng}
        tokens = enc.apply(enc_vars, images, deterministic=False, rngs=rngs)
        return dec.apply(dec_vars, tokens, deterministic=False, rngs=rngs)

    a, b = run(_key(1)), run(_key(2))
    assert a.shape == (1, 16, 16, 3) and np.all(np.isfinite(a)) and np.any(a != b)


def test_grid_to_tokens_is_the_vit_patch_order():
    x = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
    # The CNN's token t summarizes the 8x8 patch at (t // 4, t % 4), as the ViT's patch t.
    pooled = x.reshape(2, 4, 8, 4, 8, 3).mean(axis=(2, 4))  # [2, 4, 4, 3]
    vit_patches = patchify(x, 8).reshape(2, 16, 64, 3).mean(axis=2)
    np.testing.assert_array_equal(grid_to_tokens(pooled), vit_patches)
    np.testing.assert_array_equal(grid_to_tokens(x), patchify(x, 1))
    np.testing.assert_array_equal(tokens_to_grid(grid_to_tokens(x), 32), x)


def test_upsample_nearest():
    x = jnp.arange(2 * 2 * 3 * 2, dtype=jnp.float32).reshape(2, 2, 3, 2)
    y = upsample_nearest(x)
    assert y.shape == (2, 4, 6, 2)
    np.testing.assert_array_equal(y, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def test_encoder_and_decoder_use_raster_order():
    """The encoder's tokens are its last conv's output grid flattened row-major, and the
    decoder's first conv sees the tokens laid back out the same way."""
    enc, dec, enc_vars, dec_vars = _init_pair(TINY, 16)
    images = _images(2, 16)
    capture = dict(capture_intermediates=True)
    tokens, state = jax.jit(functools.partial(enc.apply, **capture))(enc_vars, images)
    grid = state["intermediates"]["conv_out"]["__call__"][0]  # [2, 8, 8, width]
    assert grid.shape == (2, 8, 8, TINY.width)
    np.testing.assert_array_equal(tokens, patchify(grid, 1))

    _, state = jax.jit(functools.partial(dec.apply, **capture))(dec_vars, tokens)
    got = state["intermediates"]["conv_in"]["__call__"][0]
    conv = nn.Conv(TINY.width, (3, 3), padding="SAME")
    conv_params = {"params": nn.meta.unbox(dec_vars["params"]["conv_in"])}
    want = conv.apply(conv_params, np.asarray(tokens).reshape(2, 8, 8, TINY.width))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_group_norm_is_float32_for_bfloat16_inputs():
    x = jnp.asarray(100.0 + np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
    norm = group_norm(4, jnp.float32, "norm")
    variables = _fast_init(norm, x)
    apply = jax.jit(norm.apply)
    got = apply(variables, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32
    want = apply(variables, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
    enc, dec, enc_vars, dec_vars = _init_pair(SMALL, 32)
    images = _images(2, 32, seed=1)

    def run(dtype):
        e, d = enc.clone(dtype=dtype), dec.clone(dtype=dtype)

        @jax.jit
        def f(images):
            tokens = e.apply(enc_vars, images)
            return tokens, d.apply(dec_vars, tokens.astype(jnp.float32))

        return f(images)

    want_tokens, want_out = run(jnp.float32)
    got_tokens, got_out = run(jnp.bfloat16)
    assert got_tokens.dtype == jnp.bfloat16 and got_out.dtype == jnp.float32
    for got, want in ((got_tokens, want_tokens), (got_out, want_out)):
        got = np.asarray(got, np.float32)
        assert np.all(np.isfinite(got))
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(got, want, atol=0.05 * scale)
        # Closer than the tolerance on average: bf16 rounds, it does not diverge.
        assert np.mean(np.abs(got - want)) < 0.01 * scale


def _check_named_dims(spec_tree, variables, divisor: int) -> None:
    """Every named dimension of every parameter has a size divisible by `divisor`."""
    specs = jax.tree_util.tree_leaves(spec_tree, is_leaf=lambda s: isinstance(s, PartitionSpec))
    shapes = jax.tree_util.tree_leaves(nn.meta.unbox(variables))
    assert len(specs) == len(shapes)
    for spec, array in zip(specs, shapes, strict=True):
        assert len(spec) == array.ndim
        for name, size in zip(spec, array.shape, strict=True):
            assert name is None or size % divisor == 0, (spec, array.shape)


def test_parameters_carry_logical_axes():
    _, _, enc_vars, dec_vars = _init_pair(SMALL, 64)
    for variables in (enc_vars, dec_vars):
        boxes = jax.tree_util.tree_leaves(
            variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
        )
        assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
        _check_named_dims(nn.get_partition_spec(variables), variables, divisor=2)
    enc = nn.get_partition_spec(enc_vars)["params"]
    dec = nn.get_partition_spec(dec_vars)["params"]
    conv = PartitionSpec(None, None, axes.CONV_IN, axes.CONV_OUT)
    assert enc["conv_in"]["kernel"] == PartitionSpec(None, None, None, axes.CONV_OUT)
    assert enc["down_0_block_0"]["conv1"]["kernel"] == conv
    assert enc["down_2_block_0"]["shortcut"]["kernel"] == conv  # 16 -> 32 channels
    assert "shortcut" not in enc["down_1_block_0"]  # 16 -> 16
    assert enc["down_0_downsample"]["kernel"] == conv
    assert enc["down_0_block_0"]["norm1"]["scale"] == PartitionSpec(axes.CONV_OUT)
    assert enc["mid"]["attn"]["query"]["kernel"] == PartitionSpec(axes.CONV_IN, axes.CONV_OUT)
    assert enc["conv_out"]["bias"] == PartitionSpec(axes.CONV_OUT)
    assert dec["up_1_upsample"]["kernel"] == conv
    assert dec["conv_out"]["kernel"] == PartitionSpec(None, None, axes.CONV_IN, None)
    assert dec["conv_out"]["bias"] == PartitionSpec(None)


def test_sharded_init_and_apply_on_a_mesh():
    """Channels mapped to a mesh axis of size 2 split evenly; results match unsharded ones."""
    spec = TINY
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    rules = (("batch", "data"), ("conv_out", "fsdp"), ("conv_in", None), ("length", None))

    class Pair(nn.Module):
        @nn.compact
        def __call__(self, images):
            return CNNDecoder(spec, 16, name="dec")(CNNEncoder(spec, 16, name="enc")(images))

    model, images = Pair(), _images(4, 16)
    init = lambda rng: model.init(rng, images)  # noqa: E731
    abstract = jax.eval_shape(init, _key())
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(init, out_shardings=shardings)(_key())
        out = jax.jit(model.apply)(variables, images)
    kernel = variables["params"]["enc"]["down_0_block_0"]["conv1"]["kernel"].value
    assert kernel.sharding.spec == PartitionSpec(None, None, None, "fsdp")
    unsharded = jax.jit(model.apply)(jax.device_get(variables), images)
    np.testing.assert_allclose(out, unsharded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spec, image_size, patch_size, match",
    [
        (CNNSpec(norm_groups=24), 256, 8, "norm_groups=24 must divide every width, but not 128"),
        (CNNSpec(channels=48), 256, 8, "norm_groups=32 must divide every width, but not 48"),
        (CNNSpec(channel_mult=(1, 2)), 256, 8, r"len\(channel_mult\) = log2\(8\) \+ 1 = 4"),
        (CNNSpec(), 256, 16, "downsampling factor of 2\\*\\*3 = 8, but patch_size is 16"),
        (CNNSpec(), 256, 6, "power-of-two patch_size"),
        (CNNSpec(), 100, 8, "image_size 100 must be a positive multiple of .* 8"),
        (CNNSpec(channels=0), 256, 8, "channels must be a positive integer, got 0"),
        (CNNSpec(num_res_blocks=-1), 256, 8, "num_res_blocks must be a positive integer, got -1"),
        (CNNSpec(channel_mult=()), 256, 8, r"channel_mult must be a non-empty .*got \(\)"),
        (CNNSpec(channel_mult=(1, 0)), 256, 2, r"got \(1, 0\)"),
        (CNNSpec(dropout=1.0), 256, 8, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_validate_cnn_spec_errors(spec, image_size, patch_size, match):
    with pytest.raises(ConfigError, match=match):
        validate_cnn_spec(spec, image_size, patch_size)


def test_bad_inputs_raise():
    enc, dec, enc_vars, dec_vars = _init_pair(SMALL, 64)
    with pytest.raises(InputError, match="32x32 but the model was built for 64x64"):
        jax.eval_shape(enc.apply, enc_vars, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(InputError, match=r"\[batch, 64, 64\].*got shape \(1, 64, 32\)"):
        jax.eval_shape(dec.apply, dec_vars, jnp.zeros((1, 64, 32)))
    with pytest.raises(ConfigError, match="norm_groups"):
        CNNEncoder(CNNSpec(norm_groups=3), 64).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator.


@functools.cache
def _init_patch(**kwargs):
    """A PatchDiscriminator and its variables (they do not depend on the image size)."""
    model = PatchDiscriminator(**{**SMALL_DISC, **kwargs})
    variables = _fast_init(model, jnp.zeros((1, 24, 24, 3)))
    return model, variables


def test_patch_discriminator_sizes():
    assert patch_discriminator_channels() == (64, 128, 256, 512)
    assert patch_discriminator_channels(8, 3, 16) == (8, 16, 16, 16)
    assert patch_discriminator_channels(64, 5, 1024) == (64, 128, 256, 512, 512, 512)
    assert patch_logits_size(256) == 30 and patch_logits_size(64) == 6
    assert patch_logits_size(24) == 1 and patch_logits_size(23) == 0
    assert patch_logits_size(256, num_layers=4) == 14
    with pytest.raises(ConfigError, match="base_channels must be >= 1, got 0"):
        patch_discriminator_channels(0)


@pytest.mark.parametrize("image_size, batch, grid", [(256, 1, 30), (64, 3, 6), (24, 2, 1)])
def test_patch_logits_shape_and_dtype(image_size, batch, grid):
    model, variables = _init_patch()
    logits = jax.jit(model.apply)(variables, _images(batch, image_size))
    assert logits.shape == (batch, grid, grid) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0


def test_patch_logits_of_an_image_ignore_the_rest_of_the_batch():
    model, variables = _init_patch()
    images = _images(3, 64)
    apply = jax.jit(model.apply)
    diff = np.abs(apply(variables, images.at[0].set(1.0 - images[0])) - apply(variables, images))
    assert np.all(diff[0].max() > 0)
    np.testing.assert_allclose(diff[1:], 0.0, atol=1e-6)


def test_patch_discriminator_bfloat16_gives_float32_logits():
    model, variables = _init_patch()
    images = _images(2, 64)
    want = jax.jit(model.apply)(variables, images)
    got = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, images)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 + 0.05 * float(jnp.max(jnp.abs(want))))


def test_losses_and_gradients_on_patch_logits():
    model, variables = _init_patch()
    real, fake = _images(2, 32, seed=1), _images(2, 32, seed=2)

    def disc_loss(params, real, fake):
        apply = lambda x: model.apply({"params": params}, x)  # noqa: E731
        real_logits, fake_logits = apply(real), apply(fake)
        terms = {
            f"{name}_{kind}": fn(kind)
            for kind in ("non_saturating", "hinge")
            for name, fn in (
                ("d", lambda k: losses.discriminator_loss(real_logits, fake_logits, k)),
                ("g", lambda k: losses.generator_adversarial_loss(fake_logits, k)),
            )
        }
        terms["lecam"] = losses.lecam_penalty(real_logits, fake_logits, 0.1, -0.1)
        terms["ema"] = losses.update_lecam_ema(jnp.zeros(()), real_logits)
        terms["r1"] = losses.r1_penalty(apply, real)
        total = terms["d_non_saturating"] + terms["d_hinge"] + terms["lecam"] + terms["r1"]
        return total, terms

    grad_fn = jax.jit(jax.grad(disc_loss, argnums=(0, 1), has_aux=True))
    (g_params, g_real), terms = grad_fn(variables["params"], real, fake)
    for name, value in terms.items():
        assert value.shape == () and np.isfinite(value), (name, value)
    assert float(terms["r1"]) > 0
    leaves = jax.tree_util.tree_leaves(g_params)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert all(np.any(leaf != 0) for leaf in leaves)  # every layer learns
    assert np.all(np.isfinite(g_real)) and np.any(g_real != 0)


def test_patch_discriminator_parameter_axes():
    _, variables = _init_patch()
    boxes = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
    )
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["conv_0"]["kernel"] == PartitionSpec(None, None, None, axes.CONV_OUT)
    assert specs["conv_1"]["kernel"] == PartitionSpec(None, None, axes.CONV_IN, axes.CONV_OUT)
    assert "bias" not in specs["conv_1"]  # the norm's bias replaces it
    assert specs["norm_1"]["scale"] == PartitionSpec(axes.CONV_OUT)
    assert specs["logit"]["kernel"] == PartitionSpec(None, None, axes.CONV_IN, None)
    _check_named_dims(nn.get_partition_spec(variables), variables, divisor=2)


def test_patch_discriminator_rejects_small_or_bad_images():
    model, variables = _init_patch()
    with pytest.raises(InputError, match="at least 24x24, got 16x16"):
        model.apply(variables, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(InputError, match=r"got shape \(1, 32, 32, 1\)"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)))


def test_build_discriminator_kinds():
    assert DISCRIMINATOR_KINDS == ("stylegan", "patchgan")
    d = build_discriminator("stylegan", 64, 8, 32, jnp.bfloat16)
    assert isinstance(d, Discriminator)
    assert (d.image_size, d.base_channels, d.max_channels, d.dtype) == (64, 8, 32, jnp.bfloat16)
    p = build_discriminator("patchgan", 64, 8, 32, num_layers=2)
    assert isinstance(p, PatchDiscriminator)
    assert (p.base_channels, p.max_channels, p.num_layers) == (8, 32, 2)
    with pytest.raises(ConfigError, match="unknown discriminator.kind 'bogus'.*stylegan, patchgan"):
        build_discriminator("bogus", 64)
    with pytest.raises(ConfigError, match="needs image_size >= 24, got 16"):
        build_discriminator("patchgan", 16)
    with pytest.raises(InputError, match="got 48"):
        build_discriminator("stylegan", 48)

    cfg = dict(kind="patchgan", base_channels=8, max_channels=16, num_layers=3)
    assert discriminator_from_config(cfg, 64) == PatchDiscriminator(8, 3, 16)
    assert isinstance(discriminator_from_config(dict(base_channels=8), 64), Discriminator)
    with pytest.raises(ConfigError, match=r"unknown keys \['layers'\]"):
        discriminator_from_config(dict(kind="patchgan", layers=3), 64)
