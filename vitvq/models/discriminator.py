"""Discriminators: StyleGAN2-style residual (`Discriminator`) and PatchGAN (`PatchDiscriminator`).

`build_discriminator` picks one by `kind` (`DISCRIMINATOR_KINDS`), `discriminator_from_config`
from a config block. Both take NHWC images in [0, 1]; the StyleGAN2 one returns one float32
logit per image [batch], the PatchGAN one a grid of float32 logits per image [batch, h, w].
The losses in `vitvq.losses` average over every logit, so they take either.

The StyleGAN2-style discriminator (Karras et al. 2020) is sized from the image size: a
from-RGB 1x1 conv, then one residual block per halving of the resolution down to 4x4
(3x3 conv, blur, strided 3x3 conv; skip: blur, strided 1x1 conv; sum / sqrt(2)), a minibatch
standard-deviation feature, a 3x3 conv, and two dense layers down to one logit per image.

Departures from StyleGAN2, on purpose: no equalized learning rate (He-style initialization
instead, since the optimizer is Adam with one learning rate per network), and minibatch-stddev
groups are consecutive images (see `minibatch_stddev`). Convolutions run in `dtype`; the
minibatch statistics and the final logit in float32.
"""

import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.cnn import group_norm
from vitvq.models.layers import constrain, conv2d, partitioned

Dtype = Any

DISCRIMINATOR_KINDS = ("stylegan", "patchgan")

_LRELU_SLOPE = 0.2
# He initialization for layers followed by a leaky ReLU, LeCun for linear ones.
_lrelu_init = nn.initializers.variance_scaling(
    2.0 / (1.0 + _LRELU_SLOPE**2), "fan_in", "truncated_normal"
)
_linear_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def discriminator_channels(
    image_size: int,
    base_channels: int = 64,
    max_channels: int = 512,
    channel_multiplier: int = 1,
) -> tuple[int, ...]:
    """Widths of the discriminator at each resolution, from `image_size` down to 4.

    Entry i is the width at resolution image_size / 2**i: base_channels * channel_multiplier,
    doubled at each halving, capped at max_channels. There is one residual block per
    consecutive pair, so len(result) - 1 blocks.

    Raises:
      InputError: if image_size is not 4 * 2**k with k >= 1 (8, 16, 32, ...).
    """
    integral = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    size = int(image_size) if integral else 0
    while size > 4 and size % 2 == 0:
        size //= 2
    if not integral or image_size < 8 or size != 4:
        raise InputError(
            f"discriminator image_size must halve down to exactly 4 (a power of two >= 8: 8, 16, "
            f"32, ...), got {image_size!r}"
        )
    if base_channels < 1 or max_channels < 1 or channel_multiplier < 1:
        raise ConfigError(
            "discriminator widths must be positive, got base_channels="
            f"{base_channels}, max_channels={max_channels}, channel_multiplier={channel_multiplier}"
        )
    num_levels = int(math.log2(int(image_size) // 4)) + 1
    width = base_channels * channel_multiplier
    return tuple(min(width * 2**i, max_channels) for i in range(num_levels))


def _stddev_group_size(batch: int, group_size: int) -> int:
    """The largest divisor of `batch` that is at most `group_size`."""
    for g in range(min(group_size, batch), 0, -1):
        if batch % g == 0:
            return g
    return 1


def minibatch_stddev(x: jax.Array, group_size: int, num_features: int) -> jax.Array:
    """Appends StyleGAN's minibatch standard-deviation features: [B,H,W,C] -> [B,H,W,C+F].

    The batch is split into groups of G consecutive images, G = the largest divisor of the
    batch size that is <= group_size (so any batch size works: a prime batch larger than the
    group size gets G = 1 and the feature carries no information, and batch 1 likewise).
    Consecutive rather than strided groups (StyleGAN2 uses strided ones) keep each group on one
    device when the batch is sharded and the per-device batch is a multiple of G. Channels are
    split into F groups; each feature is the standard deviation over the group's images,
    averaged over pixels and the channels of its group. Computed in float32.
    """
    batch, height, width, channels = x.shape
    if channels % num_features:
        raise ConfigError(
            f"mbstd_num_features={num_features} must divide the discriminator's final width "
            f"{channels}"
        )
    g = _stddev_group_size(batch, group_size)
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(stat_dtype).reshape(
        batch // g, g, height, width, num_features, channels // num_features
    )
    std = jnp.sqrt(jnp.var(y, axis=1) + 1e-8)  # [batch / g, height, width, features, c / f]
    std = jnp.mean(std, axis=(1, 2, 4))  # [batch / g, features]
    std = jnp.repeat(std, g, axis=0)  # [batch, features]
    std = jnp.broadcast_to(std[:, None, None, :], (batch, height, width, num_features))
    return jnp.concatenate([x, std.astype(x.dtype)], axis=-1)


def blur(x: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """Depthwise [1,3,3,1] binomial blur of NHWC `x` (anti-aliasing before a strided conv).

    `padding` (before, after) is applied to both spatial dims; the output is
    H + before + after - 3 high. The filter is separable, so it is two 1D passes of shifted
    slices (a depthwise convolution computes the same but is slow on XLA:CPU, its gradient
    and the R1 double gradient even more so).
    """
    taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0
    x = jnp.pad(x, ((0, 0), padding, padding, (0, 0)))
    for axis in (1, 2):
        n = x.shape[axis] - len(taps) + 1
        x = sum(float(t) * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i, t in enumerate(taps))
    return x


def _conv(features: int, kernel_size: int, *, kernel_init=_lrelu_init, **kwargs) -> nn.Conv:
    """`layers.conv2d`, He-initialized for a leaky ReLU unless told otherwise."""
    return conv2d(features, kernel_size, kernel_init=kernel_init, **kwargs)


class DownBlock(nn.Module):
    """Residual block that halves the resolution: [B,H,W,Cin] -> [B,H/2,W/2,out_channels]."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_channels = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(in_channels, 3, in_axis=axes.CONV_IN, out_axis=axes.CONV_OUT, name="conv1", **kw)(
            x
        )
        h = nn.leaky_relu(h, _LRELU_SLOPE)
        # Blur padded by 2 then a 3x3 VALID conv of stride 2: H -> H + 1 -> H / 2, centred as
        # in StyleGAN2 (total padding (4 - 2) + (3 - 1) = 4 split evenly).
        h = blur(h, (2, 2))
        h = _conv(
            self.out_channels,
            3,
            in_axis=axes.CONV_IN,
            out_axis=axes.CONV_OUT,
            strides=2,
            padding="VALID",
            name="conv2",
            **kw,
        )(h)
        h = nn.leaky_relu(h, _LRELU_SLOPE)
        # Skip: blur padded by 1 then a 1x1 conv of stride 2: H -> H - 1 -> H / 2.
        s = blur(x, (1, 1))
        s = _conv(
            self.out_channels,
            1,
            in_axis=axes.CONV_IN,
            out_axis=axes.CONV_OUT,
            strides=2,
            padding="VALID",
            use_bias=False,
            kernel_init=_linear_init,
            name="skip",
            **kw,
        )(s)
        # Dividing by sqrt(2) keeps the variance of the sum that of each branch.
        return (h + s) * jnp.asarray(1.0 / math.sqrt(2.0), h.dtype)


class Discriminator(nn.Module):
    """StyleGAN2-style residual discriminator: NHWC images in [0, 1] -> float32 logits [batch]."""

    image_size: int  # square input resolution: 8, 16, 32, ... (halves down to 4)
    base_channels: int = 64  # width at full resolution; doubles with each halving
    max_channels: int = 512  # cap on the width
    channel_multiplier: int = 1  # scales every width (before the cap)
    mbstd_group_size: int = 4  # images per minibatch-stddev group (at most)
    mbstd_num_features: int = 1  # minibatch-stddev features appended
    dtype: Dtype = jnp.float32  # compute dtype of the convolutions
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        channels = discriminator_channels(
            self.image_size, self.base_channels, self.max_channels, self.channel_multiplier
        )
        self._check_images(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)

        x = images.astype(self.dtype) * 2 - 1  # [0, 1] -> [-1, 1]
        x = constrain(x, (axes.BATCH, axes.NONE, axes.NONE, axes.NONE))
        # Odd-sized channel dims (RGB in, stddev-augmented in, the single logit out) are left
        # unnamed: a sharding rule for conv_in / conv_out could not split them evenly.
        x = _conv(channels[0], 1, in_axis=axes.NONE, out_axis=axes.CONV_OUT, name="from_rgb", **kw)(
            x
        )
        x = nn.leaky_relu(x, _LRELU_SLOPE)
        for i, width in enumerate(channels[1:]):
            x = DownBlock(width, name=f"block{i}", **kw)(x)
            x = constrain(x, (axes.BATCH, axes.NONE, axes.NONE, axes.CONV_OUT))

        # [batch, 4, 4, channels[-1]]
        x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_features)
        x = _conv(
            channels[-1], 3, in_axis=axes.NONE, out_axis=axes.CONV_OUT, name="final_conv", **kw
        )(x)
        x = nn.leaky_relu(x, _LRELU_SLOPE)
        x = x.reshape(x.shape[0], -1)  # [batch, 4 * 4 * channels[-1]]
        x = nn.Dense(
            channels[-1],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(_lrelu_init, (axes.CONV_IN, axes.CONV_OUT)),
            bias_init=partitioned(nn.initializers.zeros, (axes.CONV_OUT,)),
            name="final_dense",
        )(x)
        x = nn.leaky_relu(x, _LRELU_SLOPE)
        logits = nn.Dense(
            1,
            dtype=stat_dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(_linear_init, (axes.CONV_IN, axes.NONE)),
            bias_init=partitioned(nn.initializers.zeros, (axes.NONE,)),
            name="logit",
        )(x.astype(stat_dtype))
        return logits[:, 0]  # [batch]

    def _check_images(self, images: jax.Array) -> None:
        shape = tuple(images.shape)
        expected = f"[batch, {self.image_size}, {self.image_size}, 3]"
        if len(shape) != 4:
            raise InputError(
                f"discriminator expects NHWC images {expected}, got rank {len(shape)} shape {shape}"
            )
        if shape[-1] != 3:
            raise InputError(
                f"discriminator expects 3 (RGB) channels {expected}, got {shape[-1]} in {shape}"
            )
        if shape[1:3] != (self.image_size, self.image_size):
            raise InputError(
                f"discriminator built for image_size={self.image_size} expects {expected}, "
                f"got {shape[1]}x{shape[2]} images (shape {shape})"
            )
        if shape[0] < 1:
            raise InputError(f"discriminator got an empty batch, shape {shape}")


# ---------------------------------------------------------------------------------------------
# PatchGAN (pix2pix / taming-transformers' NLayerDiscriminator).


def patch_discriminator_channels(
    base_channels: int = 64, num_layers: int = 3, max_channels: int = 512
) -> tuple[int, ...]:
    """Widths of the PatchGAN's num_layers + 1 hidden convs: base_channels * min(2**n, 8) for
    n = 0..num_layers (pix2pix), each capped at max_channels."""
    for name, value in (
        ("base_channels", base_channels),
        ("max_channels", max_channels),
        ("num_layers", num_layers),
    ):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"patchgan discriminator {name} must be >= 1, got {value!r}")
    return tuple(min(base_channels * min(2**n, 8), max_channels) for n in range(num_layers + 1))


def patch_logits_size(size: int, num_layers: int = 3) -> int:
    """Side of the PatchGAN's logit grid for `size`-pixel images (may be <= 0: too small).

    Every conv is 4x4 with padding 1: each of the num_layers stride-2 convs maps s to
    floor(s / 2), each of the two stride-1 convs s to s - 1. 256 -> 30, 64 -> 6 (num_layers 3).
    """
    for _ in range(num_layers):
        size //= 2
    return size - 2


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017; taming-transformers' NLayerDiscriminator):
    NHWC images in [0, 1] -> float32 logits [batch, h, w], one per overlapping patch.

    conv4x4/2 (base) + leaky ReLU 0.2; for n in 1..num_layers-1: conv4x4/2 to
    base * min(2**n, 8), norm, leaky ReLU; conv4x4/1 to base * min(2**num_layers, 8), norm,
    leaky ReLU; conv4x4/1 to one logit. Every conv pads by 1 as pix2pix, so h = w =
    `patch_logits_size(size, num_layers)`: 30x30 for 256x256 images (receptive field 70x70
    with num_layers 3), 6x6 for 64x64. Widths are capped at max_channels.

    Departures, on purpose: GroupNorm (per image: gcd(norm_groups, width) groups, statistics
    in float32) instead of taming's BatchNorm, so there are no running statistics in the
    train state, an image's logits never depend on the rest of the batch (which keeps the R1
    penalty a per-image gradient and a sharded batch equivalent to an unsharded one), and
    train and eval behave the same; He initialization as the StyleGAN2 discriminator above
    instead of pix2pix's N(0, 0.02). Convolutions run in `dtype`, the final one in float32.
    """

    base_channels: int = 64
    num_layers: int = 3  # stride-2 convs; logit grid floor(size / 2**num_layers) - 2
    max_channels: int = 512  # cap on every width (pix2pix's own cap is base_channels * 8)
    norm_groups: int = 32  # GroupNorm groups (at most; gcd with each width)
    dtype: Dtype = jnp.float32  # compute dtype of the convolutions
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        channels = patch_discriminator_channels(
            self.base_channels, self.num_layers, self.max_channels
        )
        self._check_images(images)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
        pad = ((1, 1), (1, 1))

        x = images.astype(self.dtype) * 2 - 1  # [0, 1] -> [-1, 1]
        x = constrain(x, (axes.BATCH, axes.NONE, axes.NONE, axes.NONE))
        # Odd-sized channel dims (RGB in, the single logit out) are left unnamed.
        x = _conv(
            channels[0],
            4,
            in_axis=axes.NONE,
            out_axis=axes.CONV_OUT,
            strides=2,
            padding=pad,
            name="conv_0",
            **kw,
        )(x)
        x = nn.leaky_relu(x, _LRELU_SLOPE)
        for n, width in enumerate(channels[1:], start=1):
            # Stride 2 up to num_layers - 1, then stride 1. The norm's bias replaces the conv's.
            x = _conv(
                width,
                4,
                in_axis=axes.CONV_IN,
                out_axis=axes.CONV_OUT,
                strides=2 if n < self.num_layers else 1,
                padding=pad,
                use_bias=False,
                name=f"conv_{n}",
                **kw,
            )(x)
            x = group_norm(math.gcd(self.norm_groups, width), self.param_dtype, f"norm_{n}")(x)
            x = nn.leaky_relu(x, _LRELU_SLOPE).astype(self.dtype)
            x = constrain(x, (axes.BATCH, axes.NONE, axes.NONE, axes.NONE))
        logits = _conv(
            1,
            4,
            in_axis=axes.CONV_IN,
            out_axis=axes.NONE,
            padding=pad,
            kernel_init=_linear_init,
            dtype=stat_dtype,
            param_dtype=self.param_dtype,
            name="logit",
        )(x.astype(stat_dtype))
        return logits[..., 0]  # [batch, h, w]

    def _check_images(self, images: jax.Array) -> None:
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise InputError(
                f"patchgan discriminator expects NHWC RGB images [batch, height, width, 3], "
                f"got shape {shape}"
            )
        if min(patch_logits_size(side, self.num_layers) for side in shape[1:3]) < 1:
            need = 3 * 2**self.num_layers
            raise InputError(
                f"patchgan discriminator with num_layers={self.num_layers} needs images of at "
                f"least {need}x{need}, got {shape[1]}x{shape[2]} (shape {shape})"
            )
        if shape[0] < 1:
            raise InputError(f"patchgan discriminator got an empty batch, shape {shape}")


def build_discriminator(
    kind: str,
    image_size: int,
    base_channels: int = 64,
    max_channels: int = 512,
    dtype: Dtype = jnp.float32,
    *,
    num_layers: int = 3,
    param_dtype: Dtype = jnp.float32,
) -> nn.Module:
    """The discriminator of `kind` ("stylegan" or "patchgan") for `image_size` images.

    `num_layers` applies to the PatchGAN only. Raises ConfigError on an unknown kind or
    widths, and on images too small for the PatchGAN; InputError on an image size the
    StyleGAN2 discriminator cannot take (as `discriminator_channels`).
    """
    if kind == "stylegan":
        discriminator_channels(image_size, base_channels, max_channels)  # validates
        return Discriminator(
            image_size=image_size,
            base_channels=base_channels,
            max_channels=max_channels,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    if kind == "patchgan":
        patch_discriminator_channels(base_channels, num_layers, max_channels)  # validates
        integral = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
        if not integral or patch_logits_size(image_size, num_layers) < 1:
            need = 3 * 2**num_layers
            raise ConfigError(
                f"patchgan discriminator with num_layers={num_layers} needs image_size >= "
                f"{need}, got {image_size!r}"
            )
        return PatchDiscriminator(
            base_channels=base_channels,
            num_layers=num_layers,
            max_channels=max_channels,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    raise ConfigError(
        f"unknown discriminator.kind {kind!r}; expected one of {', '.join(DISCRIMINATOR_KINDS)}"
    )


DISCRIMINATOR_CONFIG_KEYS = ("kind", "base_channels", "max_channels", "num_layers")


def discriminator_from_config(
    cfg: Mapping[str, Any], image_size: int, dtype: Dtype = jnp.float32
) -> nn.Module:
    """`build_discriminator` from a `discriminator` config block (a dict).

    Missing keys take `build_discriminator`'s defaults; a block without `kind` (written before
    there was a choice) is the StyleGAN2 discriminator. Raises ConfigError on unknown keys.
    """
    unknown = sorted(set(cfg) - set(DISCRIMINATOR_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"discriminator config has unknown keys {unknown}; "
            f"expected {', '.join(DISCRIMINATOR_CONFIG_KEYS)}"
        )
    fields = dict(cfg)
    kind = fields.pop("kind", "stylegan")
    num_layers = fields.pop("num_layers", 3)
    return build_discriminator(kind, image_size, dtype=dtype, num_layers=num_layers, **fields)
