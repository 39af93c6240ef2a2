"""Factorized, l2-normalized vector quantizer (ViT-VQGAN section 3.2).

Encoder features are projected down to `code_dim`, l2-normalized, and matched to the
l2-normalized codebook by the highest dot product (= cosine similarity = nearest neighbour
on the unit sphere). The search walks the codebook in chunks so the full
[tokens x codebook] similarity matrix is never held at once. All quantizer math runs in
float32 whatever the compute dtype.

`l2_normalize_codes=False` is the paper's ablation without normalization (Table 4, "without
l2-norm codes"): the projected encoder outputs and the codebook are used as they are and the
nearest code is the one at the smallest Euclidean distance, argmax_k (z . e_k - |e_k|^2 / 2).

The VQ loss is  mean_t ||sg[z_t] - e_t||^2 + beta * mean_t ||z_t - sg[e_t]||^2  with squared
distances summed over `code_dim` and averaged over tokens; gradients reach the encoder
straight through (z + sg[e - z]), or with `gradient="rotation"` through the rotation trick
(vitvq/models/rotation.py).

Usage statistics: an exponential moving average of how many tokens pick each code per step
lives in the `vq_stats` collection (updated when that collection is mutable, i.e. in
training). `restart_dead_codes` uses it to move unused codes onto recent encoder outputs.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitvq.models import axes
from vitvq.models.layers import dense, partitioned
from vitvq.models.rotation import quantizer_output

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """x / max(||x||, eps) along `axis`, in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_code(
    z: jax.Array, codebook: jax.Array, chunk_size: int, euclidean: bool = False
) -> jax.Array:
    """Index of the codebook row with the highest dot product with each row of z, or with
    `euclidean` the row at the smallest Euclidean distance (the highest z . e - |e|^2 / 2;
    the same for unit rows).

    z: [N, D]; codebook: [K, D]. Ties go to the lowest index (as `argmax`). Only
    [chunk_size, N] similarities exist at a time.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    num_codes = codebook.shape[0]
    # Per-code offset of the score: -|e|^2 / 2 for the Euclidean nearest code, else 0.
    bias = (
        -0.5 * jnp.sum(codebook * codebook, axis=-1)
        if euclidean
        else jnp.zeros((num_codes,), jnp.float32)
    )
    if chunk_size <= 0 or chunk_size >= num_codes:
        return jnp.argmax(z @ codebook.T + bias, axis=-1).astype(jnp.int32)
    num_chunks = -(-num_codes // chunk_size)
    pad = num_chunks * chunk_size - num_codes
    chunks = jnp.pad(codebook, ((0, pad), (0, 0))).reshape(num_chunks, chunk_size, -1)
    biases = jnp.pad(bias, (0, pad)).reshape(num_chunks, chunk_size)
    offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

    # Similarities are laid out [chunk_size, N] and reduced over the codes axis with a max and
    # an index min: on XLA:CPU this vectorizes over the tokens and ran 4-7x faster than an
    # argmax over the last axis of [N, chunk_size] (BENCHMARKS.md).
    def step(carry, chunk_and_offset):
        best_sim, best_idx = carry
        chunk, chunk_bias, offset = chunk_and_offset
        sims = chunk @ z.T + chunk_bias[:, None]  # [chunk_size, N]
        row = jax.lax.broadcasted_iota(jnp.int32, sims.shape, 0)
        sims = jnp.where(offset + row < num_codes, sims, -jnp.inf)
        local_sim = jnp.max(sims, axis=0)
        # The lowest row reaching the maximum: ties go to the lowest index, as argmax.
        local_idx = jnp.min(jnp.where(sims >= local_sim[None, :], row, chunk_size), axis=0)
        better = local_sim > best_sim  # strict: earlier chunks win ties
        return (
            jnp.where(better, local_sim, best_sim),
            jnp.where(better, local_idx + offset, best_idx),
        ), None

    init = (jnp.full(z.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(z.shape[:1], jnp.int32))
    (_, best_idx), _ = jax.lax.scan(step, init, (chunks, biases, offsets))
    return best_idx


def code_counts(indices: jax.Array, codebook_size: int) -> jax.Array:
    """How many times each code is used: [codebook_size] float32 (scatter-add, no one-hot)."""
    flat = indices.reshape(-1)
    return jnp.zeros((codebook_size,), jnp.float32).at[flat].add(1.0)


def code_projection(code_dim: int, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
    """The linear map from the encoder's width down to the lookup dimension that every
    quantizer kind starts with (its parameters: `project_down/{kernel,bias}`)."""
    return dense(
        code_dim,
        axes.EMBED,
        axes.CODE_DIM,
        dtype=dtype,
        param_dtype=param_dtype,
        name="project_down",
    )


def nearest_and_losses(
    z: jax.Array, codebook: jax.Array, chunk_size: int, *, euclidean: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """z [B, T, D] float32, codebook [K, D] -> (indices int32 [B, T], their codes e [B, T, D],
    the codebook loss mean ||sg[z] - e||^2, the commitment loss mean ||z - sg[e]||^2). The
    search sees neither side's gradient; the codebook loss reaches the codebook through e."""
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
    indices = nearest_code(flat, jax.lax.stop_gradient(codebook), chunk_size, euclidean=euclidean)
    indices = indices.reshape(z.shape[:-1])
    e = jnp.take(codebook, indices, axis=0)
    codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - e) ** 2, axis=-1))
    commit_loss = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(e)) ** 2, axis=-1))
    return indices, e, codebook_loss, commit_loss


def update_usage(module: nn.Module, counts: jax.Array) -> None:
    """Folds one step's per-code counts into `module.usage` (the `vq_stats` EMA the dead-code
    restart reads), in training only (the collection mutable, not initializing)."""
    if module.is_mutable_collection("vq_stats") and not module.is_initializing():
        decay = module.usage_decay
        module.usage.value = decay * module.usage.value + (1 - decay) * counts


def usage_statistics(counts: jax.Array) -> dict[str, jax.Array]:
    """Codes used, their share of the codebook, and the perplexity of the code distribution."""
    total = jnp.maximum(jnp.sum(counts), 1.0)
    probs = counts / total
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0))
    used = jnp.sum(counts > 0).astype(jnp.float32)
    return {
        "codes_used": used,
        "codebook_usage": used / counts.shape[0],
        "perplexity": jnp.exp(entropy),
    }


class VectorQuantizer(nn.Module):
    """Projects [B, T, width] to `code_dim`, normalizes and looks up the nearest code."""

    codebook_size: int = 8192  # number of codes
    code_dim: int = 32  # lookup dimension
    beta: float = 0.25  # commitment weight
    search_chunk_size: int = 1024  # codes compared at once in the nearest-code search
    usage_decay: float = 0.99  # EMA decay of per-code usage counts (for dead-code restart)
    l2_normalize_codes: bool = True  # False: raw codes, Euclidean search (paper's ablation)
    gradient: str = "straight_through"  # or "rotation" (vitvq/models/rotation.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def setup(self):
        self.project_down = code_projection(self.code_dim, self.dtype, self.param_dtype)
        # The paper initializes the codebook from a normal distribution.
        self.codebook = self.param(
            "codebook",
            partitioned(nn.initializers.normal(1.0), (axes.CODEBOOK, axes.CODE_DIM)),
            (self.codebook_size, self.code_dim),
            self.param_dtype,
        )
        self.usage = self.variable(
            "vq_stats", "usage", lambda: jnp.zeros((self.codebook_size,), jnp.float32)
        )

    def normalized_codebook(self) -> jax.Array:
        """The codebook as the search sees it: l2-normalized rows (or raw, float32)."""
        if self.l2_normalize_codes:
            return l2_normalize(self.codebook)
        return self.codebook.astype(jnp.float32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Normalized codes for `indices` (any shape) -> [..., code_dim] float32."""
        return jnp.take(self.normalized_codebook(), indices, axis=0)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, T, width] -> (codes [B, T, code_dim] float32 with the gradient of
        `gradient`, aux)."""
        z = self.project_down(x).astype(jnp.float32)  # [B, T, code_dim]
        if self.l2_normalize_codes:
            z = l2_normalize(z)
        codebook = self.normalized_codebook()  # [K, code_dim]
        indices, e, codebook_loss, commit_loss = nearest_and_losses(
            z, codebook, self.search_chunk_size, euclidean=not self.l2_normalize_codes
        )
        quantized = quantizer_output(z, e, self.gradient)

        counts = code_counts(indices, self.codebook_size)
        update_usage(self, counts)
        aux = {
            "indices": indices,
            "latents": z,  # (normalized) encoder outputs, for dead-code restart
            "vq_loss": codebook_loss + self.beta * commit_loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commit_loss,
            **usage_statistics(counts),
        }
        return quantized, aux


def restart_dead_codes(
    codebook: jax.Array,
    usage: jax.Array,
    latents: jax.Array,
    rng: jax.Array,
    threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Moves every code whose usage EMA is below `threshold` onto a recent encoder output.

    codebook: [K, D] raw codebook parameter; usage: [K] usage EMA (tokens per step);
    latents: [..., D] recent normalized encoder outputs (e.g. the current batch's).
    Returns (new codebook, new usage, number of restarted codes). Restarted codes get a usage
    of `threshold` * 2 so they are not restarted again before they had a chance to be used.
    Codes at or above the threshold are returned bit-for-bit unchanged.
    """
    latents = latents.reshape(-1, latents.shape[-1]).astype(codebook.dtype)
    dead = usage < threshold
    picks = jax.random.randint(rng, (codebook.shape[0],), 0, latents.shape[0])
    new_codebook = jnp.where(dead[:, None], latents[picks], codebook)
    new_usage = jnp.where(dead, 2.0 * threshold, usage)
    return new_codebook, new_usage, jnp.sum(dead)
