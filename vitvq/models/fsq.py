"""Finite Scalar Quantization (FSQ): a fixed grid instead of a learned codebook.

Reference: F. Mentzer, D. Minnen, E. Agustsson, M. Tschannen, "Finite Scalar Quantization:
VQ-VAE Made Simple", 2023 (arXiv:2309.15505).

Encoder features are projected down to `code_dim = len(levels)` dimensions; dimension i is
bounded to an interval holding `L_i = levels[i]` integers, rounded, and rescaled so that the
codes lie in [-1, 1]. The implicit codebook is the product grid of prod(levels) points.

Exact formula, per dimension with level count L (all in float32):

    half       = (L - 1) * (1 + 1e-3) / 2
    offset     = 0.5 if L is even else 0.0
    shift      = atanh(offset / half)
    bounded    = tanh(z + shift) * half - offset          # in (-half - offset, half - offset)
    rounded    = clip(round(bounded), -(L//2), (L-1)//2)  # integers, L of them
    half_width = L // 2
    code       = rounded / half_width                     # in [-1, 1]
    level      = rounded + half_width                     # integer in [0, L - 1]

The `1 + 1e-3` factor is the reference implementation's: with exactly half = (L - 1) / 2 an
even L = 2 would give atanh(1) = inf (every value bounded to 0); the factor keeps every level
reachable and changes nothing else. The clip only acts for L > 1001, where that widening
exceeds half a step. `round` is round-half-to-even (`jnp.round`); it only matters on exact
ties.

Gradients: the rounding is straight-through, so the output's gradient w.r.t. `bounded` is the
identity divided by half_width; w.r.t. the projected features it is
half * (1 - tanh(z + shift)^2) / half_width per dimension (diagonal).

Index: the mixed-radix number of the per-dimension levels with the FIRST dimension least
significant, index = sum_i level_i * basis_i, basis_i = prod(levels[:i]); `lookup` inverts it.

Codebook init: none (there is no codebook, nothing to initialize or restart). Losses: none;
`vq_loss`, `codebook_loss` and `commitment_loss` are 0.0 so the aux has the same keys as the
other quantizers'. `latents` are the bounded features scaled like the codes (bounded /
half_width), so `quantized - latents` is the rounding error (at most 0.5 / half_width).
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.models.quantizer import code_counts, code_projection, usage_statistics

Dtype = Any

BOUND_EPS = 1e-3  # the reference implementation's widening of the bound (see above)
MAX_CODES = 2**31 - 1  # indices are int32


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """`levels` as a tuple of ints; ValueError for an empty tuple, a level below 2 or more
    codes than an int32 index holds."""
    levels = tuple(levels)
    if not levels:
        raise ValueError("FSQ needs at least one level, got levels=()")
    for level in levels:
        if int(level) != level or level < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {level} in levels={levels}")
    levels = tuple(int(level) for level in levels)
    if math.prod(levels) > MAX_CODES:
        raise ValueError(
            f"FSQ levels={levels} give {math.prod(levels)} codes, more than int32 indices hold"
        )
    return levels


def _constants(levels: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-dimension constants of the formula above, float32 [D] (basis int32 [D])."""
    lv = np.asarray(levels, np.float64)
    half = (lv - 1.0) * (1.0 + BOUND_EPS) / 2.0
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    return {
        "half": half.astype(np.float32),
        "offset": offset.astype(np.float32),
        "shift": np.arctanh(offset / half).astype(np.float32),
        "half_width": (np.asarray(levels) // 2).astype(np.float32),
        "low": (-(np.asarray(levels) // 2)).astype(np.float32),
        "high": ((np.asarray(levels) - 1) // 2).astype(np.float32),
        "levels": np.asarray(levels, np.int32),
        "basis": np.cumprod((1, *levels[:-1])).astype(np.int32),
    }


def fsq_quantize(z: jax.Array, levels: Sequence[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z: [..., len(levels)] -> (codes in [-1, 1] with straight-through rounding,
    latents = bounded / half_width, indices int32 [...]); all float32."""
    c = _constants(check_levels(levels))
    z = z.astype(jnp.float32)
    bounded = jnp.tanh(z + c["shift"]) * c["half"] - c["offset"]
    integer = jnp.clip(jnp.round(bounded), c["low"], c["high"])
    rounded = bounded + jax.lax.stop_gradient(integer - bounded)
    codes = rounded / c["half_width"]
    level = (jax.lax.stop_gradient(integer) + c["half_width"]).astype(jnp.int32)
    indices = jnp.sum(level * c["basis"], axis=-1).astype(jnp.int32)
    return codes, bounded / c["half_width"], indices


def fsq_lookup(indices: jax.Array, levels: Sequence[int]) -> jax.Array:
    """indices (any shape, int) -> codes [..., len(levels)] float32 in [-1, 1]."""
    c = _constants(check_levels(levels))
    indices = jnp.asarray(indices).astype(jnp.int32)[..., None]
    level = (indices // c["basis"]) % c["levels"]
    return (level.astype(jnp.float32) - c["half_width"]) / c["half_width"]


class FSQuantizer(nn.Module):
    """Projects [B, T, width] to len(levels) dimensions and rounds each onto its grid."""

    levels: tuple[int, ...] = (8, 5, 5, 5)  # levels per dimension (7 + 3 bits: 1000 codes)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "levels", check_levels(self.levels))
        super().__post_init__()

    @property
    def code_dim(self) -> int:
        return len(self.levels)

    @property
    def num_codes(self) -> int:
        return math.prod(self.levels)

    def setup(self):
        self.project_down = code_projection(self.code_dim, self.dtype, self.param_dtype)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for `indices` (any shape) -> [..., code_dim] float32."""
        return fsq_lookup(indices, self.levels)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, T, width] -> (straight-through codes [B, T, code_dim] float32, aux)."""
        z = self.project_down(x).astype(jnp.float32)
        quantized, latents, indices = fsq_quantize(z, self.levels)
        zero = jnp.zeros((), jnp.float32)
        aux = {
            "indices": indices,
            "latents": latents,
            "vq_loss": zero,
            "codebook_loss": zero,
            "commitment_loss": zero,
            **usage_statistics(code_counts(indices, self.num_codes)),
        }
        return quantized, aux
