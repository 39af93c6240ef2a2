"""Lookup-free quantization (LFQ): each code dimension is one bit, the code is its sign.

Reference: L. Yu et al., "Language Model Beats Diffusion -- Tokenizer is Key to Visual
Generation" (MAGVIT-v2), 2023 (arXiv:2310.05737), section 3.1.

Encoder features are projected down to `code_dim = bits` dimensions z; the code is
q = sign(z) in {-1, +1}^bits (z = 0 gives -1), with straight-through gradients
(z + sg[q - z]). The implicit codebook is {-1, +1}^bits, 2**bits codes.

Index bit order: LSB-first. Dimension i is bit i of the index, set where q_i > 0:
index = sum_i [q_i > 0] * 2**i. `lookup` inverts it (bit i -> +1 if set, else -1).

Losses (squared distances summed over the code dimensions and averaged over tokens, as in
`VectorQuantizer`):

    commitment_loss = mean_t ||z_t - sg[q_t]||^2
    entropy_loss    = per_token_entropy - diversity_gamma * batch_entropy
    vq_loss         = commitment_weight * commitment_loss
                      + entropy_weight * entropy_scale * entropy_loss
    codebook_loss   = 0.0 (there is no codebook to learn)

`entropy_scale` is an optional (traceable) call argument, 1.0 by default: the trainer anneals
the entropy weight through it without recompiling.

The entropies (in nats) are those of the soft assignment of a token to the codes,
p(c | z) = softmax_c(-||z - c||^2 / temperature): `per_token_entropy` is the mean over tokens
of H(p(. | z_t)) (minimized: confident assignments), `batch_entropy` is H(mean_t p(. | z_t))
over all the tokens passed in (maximized: all codes in use). Since ||c||^2 = bits for every
code, -||z - c||^2 / temperature = 2 z . c / temperature + (terms constant in c), which is what
is computed.

Factorization over `entropy_groups` (G): holding 2**bits probabilities per token is not
affordable for large `bits`, so the bits are split into G consecutive groups of bits / G
(group g holds dimensions g * bits/G ... (g + 1) * bits/G - 1) and each group has its own
distribution over its 2**(bits/G) sub-codes, p_g(s | z) = softmax_s(-||z_g - s||^2 / T).
Entropies are summed over groups:

    per_token_entropy = sum_g mean_t H(p_g(. | z_t))
    batch_entropy     = sum_g H(mean_t p_g(. | z_t))

The per-token term is exact for any G: -||z - c||^2 is a sum over dimensions, so p(c | z) is
a product over groups and its entropy is the sum of theirs. The batch term is an
approximation: the sum of the groups' marginal entropies is an upper bound of the entropy of
the joint batch-averaged distribution (equal when the groups are independent across the batch),
so with G > 1 the loss cannot see codes that are unused only through a correlation between
groups. G = 1 is exact; memory is [tokens, G, 2**(bits/G)] float32.

Codebook init: none (no codebook, nothing to initialize or restart). `temperature` (0.01) is
the reference implementations' inverse temperature of 100.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.models.quantizer import code_counts, code_projection, usage_statistics

Dtype = Any

MAX_BITS = 18  # 262144 codes: MAGVIT-v2's largest vocabulary


def check_lfq_settings(bits: int, entropy_groups: int, temperature: float) -> None:
    """ValueError naming the bad value: bits outside [1, 18], groups that do not divide bits,
    a temperature that is not positive."""
    if int(bits) != bits or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"LFQ bits must be an integer in [1, {MAX_BITS}], got bits={bits}")
    if int(entropy_groups) != entropy_groups or entropy_groups < 1 or bits % entropy_groups:
        raise ValueError(
            f"LFQ entropy_groups={entropy_groups} must be a positive divisor of bits={bits}"
        )
    if not temperature > 0:
        raise ValueError(f"LFQ temperature must be positive, got temperature={temperature}")


def sign_codes(bits: int) -> np.ndarray:
    """All 2**bits codes in index order: [2**bits, bits] float32 of +-1, LSB-first."""
    index = np.arange(2**bits)[:, None]
    return np.where((index >> np.arange(bits)) & 1, 1.0, -1.0).astype(np.float32)


def lfq_indices(q: jax.Array) -> jax.Array:
    """+-1 codes [..., bits] -> int32 indices [...] (bit i set where q_i > 0)."""
    bits = q.shape[-1]
    weights = jnp.asarray(2 ** np.arange(bits), jnp.int32)
    return jnp.sum(jnp.where(q > 0, weights, 0), axis=-1).astype(jnp.int32)


def lfq_lookup(indices: jax.Array, bits: int) -> jax.Array:
    """indices (any shape) -> +-1 codes [..., bits] float32."""
    indices = jnp.asarray(indices).astype(jnp.int32)[..., None]
    set_bits = (indices >> jnp.arange(bits, dtype=jnp.int32)) & 1
    return jnp.where(set_bits > 0, 1.0, -1.0).astype(jnp.float32)


def lfq_entropies(z: jax.Array, groups: int, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(per_token_entropy, batch_entropy) of z [..., bits], factorized over `groups`."""
    bits = z.shape[-1]
    group_bits = bits // groups
    z = z.astype(jnp.float32).reshape(-1, groups, group_bits)  # [N, G, bits / G]
    sub_codes = jnp.asarray(sign_codes(group_bits))  # [S, bits / G]
    logits = 2.0 * jnp.einsum("ngd,sd->ngs", z, sub_codes) / temperature
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    per_token = jnp.mean(jnp.sum(-jnp.sum(p * log_p, axis=-1), axis=-1))
    avg = jnp.mean(p, axis=0)  # [G, S]
    safe = jnp.where(avg > 0, avg, 1.0)
    batch = -jnp.sum(jnp.where(avg > 0, avg * jnp.log(safe), 0.0))
    return per_token, batch


class LookupFreeQuantizer(nn.Module):
    """Projects [B, T, width] to `bits` dimensions and keeps their signs."""

    bits: int  # code dimensions; 2**bits codes
    entropy_weight: float  # weight of the entropy loss (times the call's entropy_scale)
    commitment_weight: float = 0.25
    entropy_groups: int = 1  # groups of bits the entropy factorizes over (see above)
    diversity_gamma: float = 1.0  # weight of the batch entropy inside the entropy loss
    temperature: float = 0.01  # of the soft assignment in the entropy loss
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_lfq_settings(self.bits, self.entropy_groups, self.temperature)
        super().__post_init__()

    @property
    def code_dim(self) -> int:
        return self.bits

    @property
    def num_codes(self) -> int:
        return 2**self.bits

    def setup(self):
        self.project_down = code_projection(self.code_dim, self.dtype, self.param_dtype)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for `indices` (any shape) -> [..., bits] float32 of +-1."""
        return lfq_lookup(indices, self.bits)

    def __call__(
        self, x: jax.Array, entropy_scale: float | jax.Array = 1.0
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, T, width] -> (straight-through codes [B, T, bits] float32, aux)."""
        z = self.project_down(x).astype(jnp.float32)  # [B, T, bits]
        q = jnp.where(z > 0, 1.0, -1.0).astype(jnp.float32)
        indices = lfq_indices(q)
        quantized = z + jax.lax.stop_gradient(q - z)
        commit_loss = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(q)) ** 2, axis=-1))
        per_token, batch = lfq_entropies(z, self.entropy_groups, self.temperature)
        entropy_loss = per_token - self.diversity_gamma * batch
        scale = jnp.asarray(entropy_scale, jnp.float32)
        vq_loss = self.commitment_weight * commit_loss + self.entropy_weight * scale * entropy_loss
        aux = {
            "indices": indices,
            "latents": z,
            "vq_loss": vq_loss,
            "codebook_loss": jnp.zeros((), jnp.float32),
            "commitment_loss": commit_loss,
            "entropy_loss": entropy_loss,
            "per_token_entropy": per_token,
            "batch_entropy": batch,
            **usage_statistics(code_counts(indices, self.num_codes)),
        }
        return quantized, aux
