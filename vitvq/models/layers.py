"""Transformer building blocks shared by the ViT encoder/decoder and VIM.

Every parameter carries logical axis names (`vitvq.models.axes`); activations are
constrained to (batch, length, embed) at block boundaries. Parameters are stored in
`param_dtype`, matmuls run in `dtype`, LayerNorm and softmax in float32.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.models import axes

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


def partitioned(init, names: Sequence[str | None]):
    """An initializer whose parameter is annotated with logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, tuple(names))


def conv2d(
    features: int,
    kernel_size: int,
    *,
    in_axis: str | None,
    out_axis: str | None,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    kernel_init,
    strides: int = 1,
    padding: Any = "SAME",
    use_bias: bool = True,
) -> nn.Conv:
    """A square 2D conv whose kernel is named (None, None, in_axis, out_axis) and bias
    (out_axis,)."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, (axes.NONE, axes.NONE, in_axis, out_axis)),
        bias_init=partitioned(nn.initializers.zeros, (out_axis,)),
        name=name,
    )


def dense(
    features: int,
    in_axis: str | None,
    out_axis: str | None,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
    use_bias: bool = True,
    kernel_init=default_kernel_init,
) -> nn.Dense:
    """A Dense layer whose kernel is named (in_axis, out_axis) and bias (out_axis,)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, (in_axis, out_axis)),
        bias_init=partitioned(nn.initializers.zeros, (out_axis,)),
        name=name,
    )


def layer_norm(name: str | None = None, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm computed in float32 with named scale and bias."""
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, (axes.EMBED,)),
        bias_init=partitioned(nn.initializers.zeros, (axes.EMBED,)),
        name=name,
    )


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding, [height * width, dim] in raster order.

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x) (as in MAE/big_vision).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    omega = np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)
    omega = 1.0 / temperature**omega
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], axis=1).astype(np.float32)


class Attention(nn.Module):
    """Multi-head self-attention through `jax.nn.dot_product_attention`."""

    num_heads: int
    dropout: float = 0.0
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def param(name, shape, names):
            # Created at its final rank (not flattened and reshaped as DenseGeneral does), so
            # the logical names apply to the real dimensions under a mesh.
            init = partitioned(default_kernel_init, names)
            return self.param(name, init, shape, self.param_dtype)

        def bias(name, shape, names):
            return self.param(
                name, partitioned(nn.initializers.zeros, names), shape, self.param_dtype
            )

        x = x.astype(self.dtype)
        qkv_names = (axes.EMBED, axes.HEADS, axes.KV)
        q, k, v = (
            jnp.einsum(
                "bld,dhk->blhk",
                x,
                param(f"{n}_kernel", (width, self.num_heads, head_dim), qkv_names).astype(
                    self.dtype
                ),
            )
            + bias(f"{n}_bias", (self.num_heads, head_dim), (axes.HEADS, axes.KV)).astype(
                self.dtype
            )
            for n in ("query", "key", "value")
        )  # [batch, length, heads, kv]
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        kernel = param(
            "out_kernel", (self.num_heads, head_dim, width), (axes.HEADS, axes.KV, axes.EMBED)
        )
        out = jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))
        out = out + bias("out_bias", (width,), (axes.EMBED,)).astype(self.dtype)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class MlpBlock(nn.Module):
    """Two Dense layers with GELU in between."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.mlp_dim, axes.EMBED, axes.MLP, name="fc1", **kw)(x)
        h = nn.gelu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = dense(width, axes.MLP, axes.EMBED, name="fc2", **kw)(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)); x + mlp(ln(x))."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm("ln_attn", self.param_dtype)(x).astype(self.dtype)
        x = x + Attention(self.num_heads, self.dropout, self.causal, name="attn", **kw)(
            h, deterministic
        )
        h = layer_norm("ln_mlp", self.param_dtype)(x).astype(self.dtype)
        x = x + MlpBlock(self.mlp_dim, self.dropout, name="mlp", **kw)(h, deterministic)
        return constrain(x, (axes.BATCH, axes.LENGTH, axes.EMBED))


class TanhHead(nn.Module):
    """The paper's output head: Dense -> tanh -> Dense."""

    hidden_dim: int
    out_dim: int
    out_axis: str | None = axes.EMBED
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden_dim, axes.EMBED, axes.MLP, name="fc1", **kw)(x)
        h = jnp.tanh(h)
        return dense(self.out_dim, axes.MLP, self.out_axis, name="fc2", **kw)(h)
