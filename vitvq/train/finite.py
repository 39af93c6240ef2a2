"""The non-finite guard both training steps share: global norms and a finiteness test."""

import jax
import jax.numpy as jnp
import optax


def global_norm(tree) -> jax.Array:
    """The l2 norm over every value of `tree` (0 for an empty tree)."""
    return optax.global_norm(tree) if jax.tree_util.tree_leaves(tree) else jnp.zeros(())


def all_finite(tree) -> jax.Array:
    """Whether every value of `tree` is finite, read from its global norm: a NaN or an
    infinity anywhere makes the norm non-finite (so does a value beyond ~1e19, whose square
    overflows float32: no sane parameter or gradient gets there).

    Not `all(isfinite(leaf))` per leaf: that boolean reduction over the convolutional
    backbone's ~360 leaves took XLA:CPU 150 s to compile against 10 s (BENCHMARKS.md), and
    the steps compute the norms for their metrics anyway (XLA computes them once).
    """
    return jnp.isfinite(global_norm(tree))
