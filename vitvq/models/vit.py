"""ViT encoder and decoder on non-overlapping patches (ViT-VQGAN, Yu et al. 2022).

Encoder: patches -> linear embedding + position embedding -> pre-LN blocks -> LayerNorm ->
the paper's two-layer tanh head. Decoder: the inverse, ending in a tanh head that maps each
token to the pixels of its patch.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitvq.errors import InputError
from vitvq.models import axes
from vitvq.models.layers import (
    TanhHead,
    TransformerBlock,
    constrain,
    dense,
    layer_norm,
    partitioned,
    sincos_2d,
)

Dtype = Any

POSEMB_KINDS = ("sincos", "learn")


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Size of one transformer stack (docs/paper.md table 2)."""

    width: int  # model width (embedding size)
    depth: int  # number of blocks
    num_heads: int  # attention heads
    mlp_dim: int  # hidden width of each block's MLP
    dropout: float = 0.0  # dropout on attention and MLP outputs


def check_images(images: jax.Array, image_size: int, patch_size: int) -> None:
    """Raises InputError unless `images` is [batch, image_size, image_size, 3]."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(f"images must be [batch, height, width, 3] (NHWC RGB), got shape {shape}")
    if shape[1] != image_size or shape[2] != image_size:
        raise InputError(
            f"images are {shape[1]}x{shape[2]} but the model was built for "
            f"{image_size}x{image_size}"
        )
    if image_size % patch_size:
        raise InputError(f"image size {image_size} is not divisible by patch size {patch_size}")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in raster order."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, grid: int, patch_size: int, channels: int) -> jax.Array:
    """[B, grid*grid, p*p*C] -> [B, grid*p, grid*p, C]; inverse of `patchify`."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(b, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, channels)


class PositionEmbedding(nn.Module):
    """Adds a fixed 2D sin-cos or a learned position embedding to [B, grid*grid, width]."""

    grid: int
    kind: str = "sincos"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if self.kind == "sincos":
            pos = jnp.asarray(sincos_2d(self.grid, self.grid, width))
        elif self.kind == "learn":
            pos = self.param(
                "pos_embedding",
                partitioned(nn.initializers.normal(0.02), (axes.LENGTH, axes.EMBED)),
                (self.grid * self.grid, width),
                self.param_dtype,
            )
        else:
            raise InputError(f"unknown position embedding {self.kind!r}; expected {POSEMB_KINDS}")
        return x + pos.astype(x.dtype)[None]


class Transformer(nn.Module):
    """A stack of pre-LN blocks followed by a final LayerNorm.

    `remat`: each block keeps only its input for the backward pass and recomputes the rest
    (activation memory of one block instead of all, for ~1/3 more FLOPs); same parameters.
    """

    spec: TransformerSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.spec
        # `deterministic` (argument 2, counting the module) selects Python branches: static.
        block = nn.remat(TransformerBlock, static_argnums=(2,)) if self.remat else TransformerBlock
        for i in range(s.depth):
            x = block(
                s.num_heads,
                s.mlp_dim,
                s.dropout,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{i}",
            )(x, deterministic)
        return layer_norm("ln_final", self.param_dtype)(x).astype(self.dtype)


class ViTEncoder(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> token features [B, (H/p)*(W/p), width]."""

    spec: TransformerSpec
    image_size: int
    patch_size: int = 8
    posemb: str = "sincos"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each transformer block in the backward pass

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        check_images(images, self.image_size, self.patch_size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = patchify(images.astype(self.dtype) * 2.0 - 1.0, self.patch_size)
        x = dense(self.spec.width, axes.PATCH, axes.EMBED, name="patch_embedding", **kw)(x)
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        x = PositionEmbedding(self.image_size // self.patch_size, self.posemb, self.param_dtype)(x)
        x = Transformer(self.spec, remat=self.remat, name="transformer", **kw)(x, deterministic)
        return TanhHead(self.spec.mlp_dim, self.spec.width, name="head", **kw)(x)


class ViTDecoder(nn.Module):
    """Token features [B, grid*grid, width] -> per-pixel outputs [B, H, W, out_channels].

    The output is unconstrained (raw); the caller turns it into an image (sigmoid for the
    logit-laplace parametrization, identity for the Parti-style raw output).
    """

    spec: TransformerSpec
    image_size: int
    patch_size: int = 8
    out_channels: int = 3
    posemb: str = "sincos"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each transformer block in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = self.image_size // self.patch_size
        x = constrain(x.astype(self.dtype), (axes.BATCH, axes.LENGTH, axes.EMBED))
        x = PositionEmbedding(grid, self.posemb, self.param_dtype)(x)
        x = Transformer(self.spec, remat=self.remat, name="transformer", **kw)(x, deterministic)
        pixels = self.patch_size * self.patch_size * self.out_channels
        x = TanhHead(self.spec.mlp_dim, pixels, out_axis=axes.PATCH, name="head", **kw)(x)
        return unpatchify(x.astype(jnp.float32), grid, self.patch_size, self.out_channels)
