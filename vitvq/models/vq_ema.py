"""Vector quantizer whose codebook follows exponential moving averages instead of gradients.

References: A. van den Oord, O. Vinyals, K. Kavukcuoglu, "Neural Discrete Representation
Learning", 2017 (arXiv:1711.00937), appendix A.1; A. Razavi, A. van den Oord, O. Vinyals,
"Generating Diverse High-Fidelity Images with VQ-VAE-2", 2019 (arXiv:1906.00446). big_vision's
UViM trains its codebook the same way.

The search is `VectorQuantizer`'s: encoder features projected down to `code_dim`, with
`l2_normalize_codes` l2-normalized and matched to the l2-normalized codebook by cosine
similarity, without it matched to the raw codebook by Euclidean distance. The output is
straight-through, z + sg[e - z] (or the rotation trick with `gradient="rotation"`).

Codebook update (when the `vq_ema` collection is mutable and the module is not
initializing; the codes used in this call are the ones before the update). With z_n the
(normalized) latents of ALL the tokens passed in, k_n their codes, K codes:

    counts_k     = #{n : k_n = k}
    sums_k       = sum_{n : k_n = k} z_n
    cluster_size = decay * cluster_size + (1 - decay) * counts
    embed_sum    = decay * embed_sum + (1 - decay) * sums
    total        = sum_k cluster_size_k
    smoothed_k   = (cluster_size_k + epsilon) / (total + K * epsilon) * total   (Laplace)
    codebook_k   = embed_sum_k / smoothed_k

The counts and sums are sums over the whole batch in the call: under jit with a batch
sharded over devices they are global-batch statistics (XLA reduces the scatter-adds across
devices); a pmap-style per-device program would have to psum them itself.

Losses (squared distances summed over `code_dim`, averaged over tokens):

    commitment_loss = mean_t ||z_t - sg[e_t]||^2
    codebook_loss   = mean_t ||sg[z_t] - e_t||^2   (reported only: no gradient trains codes)
    vq_loss         = beta * commitment_loss

Variables:
  params/project_down      the usual Dense projection (the module's only parameter);
  vq_ema/codebook          [K, code_dim] float32, the codes (raw; the search normalizes them);
  vq_ema/embed_sum         [K, code_dim] float32, EMA of the per-code sums of latents;
  vq_ema/cluster_size      [K] float32, EMA of the per-code counts;
  vq_stats/usage           EMA of per-code usage counts, as `VectorQuantizer`'s.

Codebook init: random normal like `VectorQuantizer` (l2-normalized with
`l2_normalize_codes`, so the first averages are not dominated by the init's larger norm), with
embed_sum = codebook and cluster_size = 1: each code starts as if it had been assigned its
own initial vector once, so unused codes keep their direction while their statistics decay
(instead of embed_sum / ~epsilon blowing up, as with a zero cluster_size). k-means-compatible:
write the centers into vq_ema/codebook and vq_ema/embed_sum and ones into
vq_ema/cluster_size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitvq.models.quantizer import (
    code_counts,
    code_projection,
    l2_normalize,
    nearest_code,
    update_usage,
    usage_statistics,
)
from vitvq.models.rotation import quantizer_output

Dtype = Any

EMA_COLLECTION = "vq_ema"


def check_ema_settings(decay: float, epsilon: float) -> None:
    """ValueError naming the bad value: decay outside (0, 1), epsilon not positive."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA codebook decay must be in (0, 1), got decay={decay}")
    if not epsilon > 0.0:
        raise ValueError(f"EMA codebook epsilon must be positive, got epsilon={epsilon}")


def assignment_statistics(
    latents: jax.Array, indices: jax.Array, num_codes: int
) -> tuple[jax.Array, jax.Array]:
    """(counts [K], sums [K, D]) of latents [..., D] over their codes `indices` [...]:
    how many latents each code got and their sum (scatter-adds, float32)."""
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    idx = indices.reshape(-1)
    sums = jnp.zeros((num_codes, flat.shape[-1]), jnp.float32).at[idx].add(flat)
    return code_counts(idx, num_codes), sums


def ema_update(
    cluster_size: jax.Array,
    embed_sum: jax.Array,
    counts: jax.Array,
    sums: jax.Array,
    decay: float,
    epsilon: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA step -> (cluster_size, embed_sum, codebook), the formulas above."""
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    num_codes = cluster_size.shape[0]
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


class EMAVectorQuantizer(nn.Module):
    """Projects [B, T, width] to `code_dim` and looks up the nearest EMA-trained code."""

    codebook_size: int = 8192  # number of codes
    code_dim: int = 32  # lookup dimension
    decay: float = 0.99  # EMA decay of the codebook statistics, in (0, 1)
    epsilon: float = 1e-5  # Laplace smoothing of the cluster sizes
    beta: float = 0.25  # commitment weight
    search_chunk_size: int = 1024  # codes compared at once in the nearest-code search
    l2_normalize_codes: bool = True  # False: raw codes, Euclidean search
    usage_decay: float = 0.99  # EMA decay of per-code usage counts (for dead-code restart)
    gradient: str = "straight_through"  # or "rotation" (vitvq/models/rotation.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_ema_settings(self.decay, self.epsilon)
        super().__post_init__()

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def setup(self):
        self.project_down = code_projection(self.code_dim, self.dtype, self.param_dtype)
        shape = (self.codebook_size, self.code_dim)

        def initial_codebook():
            codes = jax.random.normal(self.make_rng("params"), shape, jnp.float32)
            return l2_normalize(codes) if self.l2_normalize_codes else codes

        self.codebook = self.variable(EMA_COLLECTION, "codebook", initial_codebook)
        self.embed_sum = self.variable(EMA_COLLECTION, "embed_sum", lambda: self.codebook.value)
        self.cluster_size = self.variable(
            EMA_COLLECTION, "cluster_size", lambda: jnp.ones((self.codebook_size,), jnp.float32)
        )
        self.usage = self.variable(
            "vq_stats", "usage", lambda: jnp.zeros((self.codebook_size,), jnp.float32)
        )

    def normalized_codebook(self) -> jax.Array:
        """The codebook as the search sees it: l2-normalized rows (or raw), float32."""
        codebook = jax.lax.stop_gradient(self.codebook.value.astype(jnp.float32))
        return l2_normalize(codebook) if self.l2_normalize_codes else codebook

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for `indices` (any shape) -> [..., code_dim] float32."""
        return jnp.take(self.normalized_codebook(), indices, axis=0)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, T, width] -> (straight-through codes [B, T, code_dim] float32, aux)."""
        z = self.project_down(x).astype(jnp.float32)  # [B, T, code_dim]
        if self.l2_normalize_codes:
            z = l2_normalize(z)
        codebook = self.normalized_codebook()
        flat = jax.lax.stop_gradient(z.reshape(-1, self.code_dim))
        indices = nearest_code(
            flat, codebook, self.search_chunk_size, euclidean=not self.l2_normalize_codes
        )
        e = jnp.take(codebook, indices, axis=0).reshape(z.shape)
        indices = indices.reshape(z.shape[:-1])  # [B, T]
        codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - e) ** 2, axis=-1))
        commit_loss = jnp.mean(jnp.sum((z - e) ** 2, axis=-1))
        quantized = quantizer_output(z, e, self.gradient)

        counts = code_counts(indices, self.codebook_size)
        if self.is_mutable_collection(EMA_COLLECTION) and not self.is_initializing():
            _, sums = assignment_statistics(flat, indices, self.codebook_size)
            cluster_size, embed_sum, new_codebook = ema_update(
                self.cluster_size.value,
                self.embed_sum.value,
                counts,
                sums,
                self.decay,
                self.epsilon,
            )
            self.cluster_size.value = cluster_size
            self.embed_sum.value = embed_sum
            self.codebook.value = new_codebook
        update_usage(self, counts)
        aux = {
            "indices": indices,
            "latents": z,
            "vq_loss": self.beta * commit_loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commit_loss,
            **usage_statistics(counts),
        }
        return quantized, aux
