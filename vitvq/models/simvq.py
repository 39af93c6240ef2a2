"""SimVQ: a frozen random codebook reparameterized by one learned linear map.

Reference: Y. Zhu, B. Li, Y. Xin, L. Xu, "Addressing Representation Collapse in Vector
Quantized Models with One Linear Layer" (SimVQ), 2024 (arXiv:2411.02038).

Plain VQ updates only the codes that are picked, so unpicked codes never move and the
codebook collapses onto a few. SimVQ keeps a random basis C [K, D] fixed and learns a map
W [D, D]: the effective codes are E = C W, and every gradient step on W moves all of them.

Encoder features are projected down to `code_dim` dimensions z (no normalization) and matched
to the nearest effective code by Euclidean distance (`nearest_code(..., euclidean=True)`).
Losses, as in `VectorQuantizer` (squared distances summed over `code_dim`, averaged over
tokens):

    codebook_loss   = mean_t ||sg[z_t] - e_t||^2      (moves W; C is not trained)
    commitment_loss = mean_t ||z_t - sg[e_t]||^2      (moves the encoder)
    vq_loss         = codebook_loss + beta * commitment_loss

and the output is straight-through, z + sg[e - z] (or the rotation trick with
`gradient="rotation"`).

Variables:
  params/project_down   the usual Dense projection;
  params/codebook_map   W [code_dim, code_dim], initialized to the identity (E = C at first);
  simvq_basis/codebook  C [codebook_size, code_dim] float32, drawn once at init from
                        N(0, 1/code_dim) (the reference's std code_dim**-0.5) with the "params"
                        rng; a collection of its own so no optimizer ever sees it. Apply
                        passes it in, read-only; it is never updated.
  vq_stats/usage        EMA of per-code usage counts, as `VectorQuantizer`'s.

Codebook init: random normal (the frozen basis). k-means could be written into
simvq_basis/codebook with W = I, but nothing does that today.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitvq.models import axes
from vitvq.models.layers import partitioned
from vitvq.models.quantizer import (
    code_counts,
    code_projection,
    nearest_and_losses,
    update_usage,
    usage_statistics,
)
from vitvq.models.rotation import quantizer_output

Dtype = Any

BASIS_COLLECTION = "simvq_basis"


def identity_init(key, shape, dtype=jnp.float32):
    """The identity matrix (square `shape`); `key` is unused."""
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class SimVQuantizer(nn.Module):
    """Projects [B, T, width] to `code_dim` and looks up the nearest code of C W."""

    codebook_size: int = 8192  # number of codes
    code_dim: int = 32  # lookup dimension
    beta: float = 0.25  # commitment weight
    search_chunk_size: int = 1024  # codes compared at once in the nearest-code search
    usage_decay: float = 0.99  # EMA decay of per-code usage counts
    gradient: str = "straight_through"  # or "rotation" (vitvq/models/rotation.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def setup(self):
        self.project_down = code_projection(self.code_dim, self.dtype, self.param_dtype)
        shape = (self.codebook_size, self.code_dim)
        self.basis = self.variable(
            BASIS_COLLECTION,
            "codebook",
            lambda: (
                jax.random.normal(self.make_rng("params"), shape, jnp.float32) * self.code_dim**-0.5
            ),
        )
        self.codebook_map = self.param(
            "codebook_map",
            partitioned(identity_init, (axes.NONE, axes.CODE_DIM)),
            (self.code_dim, self.code_dim),
            self.param_dtype,
        )
        self.usage = self.variable(
            "vq_stats", "usage", lambda: jnp.zeros((self.codebook_size,), jnp.float32)
        )

    def effective_codebook(self) -> jax.Array:
        """E = C W: [codebook_size, code_dim] float32 (gradient to W only)."""
        basis = jax.lax.stop_gradient(self.basis.value.astype(jnp.float32))
        return basis @ self.codebook_map.astype(jnp.float32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Effective codes for `indices` (any shape) -> [..., code_dim] float32."""
        return jnp.take(self.effective_codebook(), indices, axis=0)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, T, width] -> (straight-through codes [B, T, code_dim] float32, aux)."""
        z = self.project_down(x).astype(jnp.float32)  # [B, T, code_dim]
        codebook = self.effective_codebook()
        indices, e, codebook_loss, commit_loss = nearest_and_losses(
            z, codebook, self.search_chunk_size, euclidean=True
        )
        quantized = quantizer_output(z, e, self.gradient)

        counts = code_counts(indices, self.codebook_size)
        update_usage(self, counts)
        aux = {
            "indices": indices,
            "latents": z,
            "vq_loss": codebook_loss + self.beta * commit_loss,
            "codebook_loss": codebook_loss,
            "commitment_loss": commit_loss,
            **usage_statistics(counts),
        }
        return quantized, aux
