"""Convolutional VQGAN encoder and decoder (Esser et al. 2021, taming-transformers).

The original VQGAN backbone, an alternative to the ViT encoder/decoder with the same
interface: the encoder maps images [B, H, W, 3] in [0, 1] to token features [B, T, width] in
raster order (row-major over the grid, as `vit.patchify` orders patches) and the decoder maps
[B, T, width] back to float32 per-pixel outputs [B, H, W, out_channels]. The quantizer between
them is the same as for the ViT.

Encoder: conv_in -> per level `num_res_blocks` ResBlocks, a stride-2 conv between levels ->
mid (ResBlock, AttnBlock, ResBlock) -> GroupNorm -> swish -> conv to `width`. Decoder: conv_in
-> mid -> per level in reverse `num_res_blocks + 1` ResBlocks, nearest-neighbour x2 upsampling
and a conv between levels -> GroupNorm -> swish -> conv to `out_channels`.

Departures from taming, on purpose: self-attention only in the mid blocks (taming's f16 model
also attends at 16x16 inside the levels); no `quant_conv` / `post_quant_conv` (the quantizer
projects to its code dimension itself, and the model's `project_up` maps codes back);
initialization is LeCun-normal (PyTorch's default conv initialization has a third of its
variance). GroupNorm always runs in float32 (its statistics and its normalization: bf16
statistics of wide, large-mean activations are a precision trap), the convolutions in
`dtype`, parameters are stored in `param_dtype`, attention's softmax in float32.
"""

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.layers import constrain, conv2d, dense, partitioned
from vitvq.models.vit import check_images

Dtype = Any

_conv_init = nn.initializers.lecun_normal()
# Activations between blocks: batch sharded, spatial dims and channels whole.
_ACTIVATION_AXES = (axes.BATCH, axes.NONE, axes.NONE, axes.NONE)


@dataclasses.dataclass(frozen=True)
class CNNSpec:
    """Size of a convolutional VQGAN encoder/decoder (taming-transformers' ddconfig)."""

    channels: int = 128  # base width ("ch"); level i has channels * channel_mult[i]
    # One resolution level per entry, halved between consecutive levels: the downsampling
    # factor is 2**(len - 1), 8 by default (256x256 images -> 32x32 tokens, as 8x8 patches).
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 2  # ResBlocks per level (the decoder has one more per level)
    attention: bool = True  # the mid blocks' single self-attention at the lowest resolution
    norm_groups: int = 32  # GroupNorm groups; must divide every level's width
    dropout: float = 0.0  # inside each ResBlock, between its two convs

    @property
    def downsample(self) -> int:
        """Image pixels per token along each side: 2**(levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def width(self) -> int:
        """Channels of the encoder's token features and the decoder's input."""
        return self.channels * self.channel_mult[-1]

    @property
    def level_widths(self) -> tuple[int, ...]:
        """Width of each level, highest resolution first."""
        return tuple(self.channels * m for m in self.channel_mult)


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def validate_cnn_spec(spec: CNNSpec, image_size: int, patch_size: int) -> None:
    """Raises ConfigError unless `spec` builds a tokenizer of `patch_size` pixels per token
    for `image_size` x `image_size` images, naming the bad value."""
    for name in ("channels", "num_res_blocks", "norm_groups"):
        value = getattr(spec, name)
        if not _positive_int(value):
            raise ConfigError(f"cnn.{name} must be a positive integer, got {value!r}")
    mult = tuple(spec.channel_mult)
    if not mult or not all(_positive_int(m) for m in mult):
        raise ConfigError(
            f"cnn.channel_mult must be a non-empty sequence of positive integers, got {mult!r}"
        )
    if not (isinstance(spec.dropout, numbers.Real) and 0.0 <= spec.dropout < 1.0):
        raise ConfigError(f"cnn.dropout must be in [0, 1), got {spec.dropout!r}")
    # conv_in's output (channels) is normalized too: it is the first ResBlock's input.
    for width in sorted({spec.channels, *spec.level_widths}):
        if width % spec.norm_groups:
            raise ConfigError(
                f"cnn.norm_groups={spec.norm_groups} must divide every width, but not {width} "
                f"(channels={spec.channels} x channel_mult={mult})"
            )
    if not _positive_int(patch_size):
        raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
    if spec.downsample != patch_size:
        levels = math.log2(patch_size)
        need = (
            f"len(channel_mult) = log2({patch_size}) + 1 = {int(levels) + 1}"
            if levels.is_integer()
            else "a power-of-two patch_size (the CNN halves the resolution per level)"
        )
        raise ConfigError(
            f"cnn.channel_mult={mult} has {len(mult)} levels, a downsampling factor of "
            f"2**{len(mult) - 1} = {spec.downsample}, but patch_size is {patch_size}; "
            f"the CNN backbone needs {need}"
        )
    if not _positive_int(image_size) or image_size % spec.downsample:
        raise ConfigError(
            f"image_size {image_size!r} must be a positive multiple of the CNN's downsampling "
            f"factor {spec.downsample}"
        )


def grid_to_tokens(x: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, h*w, C] in raster order (row-major: token t is at (t // w, t % w))."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def tokens_to_grid(x: jax.Array, grid: int) -> jax.Array:
    """[B, grid*grid, C] -> [B, grid, grid, C]; the inverse of `grid_to_tokens`."""
    return x.reshape(x.shape[0], grid, grid, x.shape[-1])


def _conv(
    features: int,
    kernel_size: int,
    *,
    in_axis: str | None = axes.CONV_IN,
    out_axis: str | None = axes.CONV_OUT,
    **kwargs,
) -> nn.Conv:
    """`layers.conv2d` with the CNN's initialization; channels named conv_in -> conv_out."""
    return conv2d(
        features, kernel_size, in_axis=in_axis, out_axis=out_axis, kernel_init=_conv_init, **kwargs
    )


def group_norm(groups: int, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    """GroupNorm computed entirely in float32 (returns float32) with named scale and bias.

    Two-pass variance (E[(x - mean)^2], not E[x^2] - mean^2): activations after residual sums
    can have a mean large against their spread.
    """
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-6,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones, (axes.CONV_OUT,)),
        bias_init=partitioned(nn.initializers.zeros, (axes.CONV_OUT,)),
        name=name,
    )


class ResBlock(nn.Module):
    """x + conv(drop(swish(norm(conv(swish(norm(x))))))), with a 1x1 conv on x when the
    width changes: [B, H, W, Cin] -> [B, H, W, out_channels]."""

    out_channels: int
    norm_groups: int = 32
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, _ACTIVATION_AXES)
        h = group_norm(self.norm_groups, self.param_dtype, "norm1")(x)
        h = _conv(self.out_channels, 3, name="conv1", **kw)(nn.swish(h).astype(self.dtype))
        h = group_norm(self.norm_groups, self.param_dtype, "norm2")(h)
        h = nn.Dropout(self.dropout)(nn.swish(h), deterministic=deterministic)
        h = _conv(self.out_channels, 3, name="conv2", **kw)(h.astype(self.dtype))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="shortcut", **kw)(x.astype(self.dtype))
        return constrain(x.astype(self.dtype) + h, _ACTIVATION_AXES)


class AttnBlock(nn.Module):
    """x + proj(attention(norm(x))): single-head self-attention over all H*W positions."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, _ACTIVATION_AXES)
        h = group_norm(self.norm_groups, self.param_dtype, "norm")(x).astype(self.dtype)
        h = h.reshape(b, height * width, 1, channels)  # [batch, length, heads=1, channels]
        # 1x1 convs are Dense layers over the channels. The key has no bias (taming's has):
        # q . (k + b) shifts every logit of a query alike, so softmax ignores it and its
        # gradient is zero up to rounding, which Adam would scale into lr-sized random steps.
        q, k, v = (
            dense(
                channels,
                axes.CONV_IN,
                axes.CONV_OUT,
                name=n,
                kernel_init=_conv_init,
                use_bias=n != "key",
                **kw,
            )(h)
            for n in ("query", "key", "value")
        )
        # Scale 1/sqrt(channels); logits and softmax in float32 (see jax.nn's implementation).
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, height, width, channels)
        h = dense(channels, axes.CONV_IN, axes.CONV_OUT, name="proj", kernel_init=_conv_init, **kw)(
            h
        )
        return constrain(x.astype(self.dtype) + h, _ACTIVATION_AXES)


class MidBlock(nn.Module):
    """ResBlock, AttnBlock (when enabled), ResBlock at the lowest resolution."""

    spec: CNNSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.spec
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResBlock(s.width, s.norm_groups, s.dropout, name="block_1", **kw)(x, deterministic)
        if s.attention:
            x = AttnBlock(s.norm_groups, name="attn", **kw)(x)
        return ResBlock(s.width, s.norm_groups, s.dropout, name="block_2", **kw)(x, deterministic)


class CNNEncoder(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> token features [B, (H/f)*(W/f), spec.width] in raster
    order, f = spec.downsample. Features are in `dtype`."""

    spec: CNNSpec
    image_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.spec
        validate_cnn_spec(s, self.image_size, s.downsample)
        check_images(images, self.image_size, s.downsample)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x = images.astype(self.dtype) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        x = constrain(x, _ACTIVATION_AXES)
        # RGB input: an odd-sized dim, left unnamed (no sharding rule could split it evenly).
        x = _conv(s.channels, 3, in_axis=axes.NONE, name="conv_in", **kw)(x)
        for level, width in enumerate(s.level_widths):
            for i in range(s.num_res_blocks):
                x = ResBlock(width, s.norm_groups, s.dropout, name=f"down_{level}_block_{i}", **kw)(
                    x, deterministic
                )
            if level != len(s.level_widths) - 1:
                # taming's Downsample: pad one row/column after (bottom/right), 3x3 VALID conv
                # of stride 2: H -> H + 1 -> H / 2.
                x = _conv(
                    width,
                    3,
                    strides=2,
                    padding=((0, 1), (0, 1)),
                    name=f"down_{level}_downsample",
                    **kw,
                )(x)
                x = constrain(x, _ACTIVATION_AXES)
        x = MidBlock(s, name="mid", **kw)(x, deterministic)
        x = nn.swish(group_norm(s.norm_groups, self.param_dtype, "norm_out")(x))
        x = _conv(s.width, 3, name="conv_out", **kw)(x.astype(self.dtype))
        return constrain(grid_to_tokens(x), (axes.BATCH, axes.LENGTH, axes.NONE))


class CNNDecoder(nn.Module):
    """Token features [B, grid*grid, spec.width] (raster order) -> float32 per-pixel outputs
    [B, H, W, out_channels], grid = image_size / spec.downsample.

    The output is unconstrained (raw), like `ViTDecoder`'s: the caller turns it into an image.
    """

    spec: CNNSpec
    image_size: int
    out_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.spec
        validate_cnn_spec(s, self.image_size, s.downsample)
        grid = self.image_size // s.downsample
        shape = tuple(x.shape)
        if len(shape) != 3 or shape[1:] != (grid * grid, s.width):
            raise InputError(
                f"CNN decoder expects tokens [batch, {grid * grid}, {s.width}] "
                f"({grid}x{grid} grid, width {s.width}), got shape {shape}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x = constrain(tokens_to_grid(x.astype(self.dtype), grid), _ACTIVATION_AXES)
        x = _conv(s.width, 3, name="conv_in", **kw)(x)
        x = MidBlock(s, name="mid", **kw)(x, deterministic)
        for level in reversed(range(len(s.level_widths))):
            width = s.level_widths[level]
            for i in range(s.num_res_blocks + 1):
                x = ResBlock(width, s.norm_groups, s.dropout, name=f"up_{level}_block_{i}", **kw)(
                    x, deterministic
                )
            if level != 0:
                x = _conv(width, 3, name=f"up_{level}_upsample", **kw)(upsample_nearest(x))
                x = constrain(x, _ACTIVATION_AXES)
        x = nn.swish(group_norm(s.norm_groups, self.param_dtype, "norm_out")(x))
        # The output conv runs in float32 (few channels, so cheap); its odd-sized output dim
        # is left unnamed.
        return _conv(
            self.out_channels,
            3,
            out_axis=axes.NONE,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="conv_out",
        )(x.astype(jnp.float32))


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of NHWC `x`: [B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
