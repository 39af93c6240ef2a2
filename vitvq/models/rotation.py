"""The rotation trick: a gradient estimator through vector quantization.

Reference: C. Fifty, R. G. Junkins, D. Duan, A. Iyengar, J. W. Liu, E. Amid, S. Thrun, C. Ré,
"Restructuring Vector Quantization with the Rotation Trick", 2024 (arXiv:2410.06424).

Straight-through (z + sg[e - z]) hands the decoder's gradient to the encoder output z
unchanged. The rotation trick instead writes the code e as a rotation and rescaling of z,
with the rotation and the scale treated as constants:

    u = z / ||z||,  q = e / ||e||,  r = (u + q) / ||u + q||
    R = I - 2 r r^T + 2 q u^T            (the rotation taking u to q in their plane)
    out = sg[||e|| / ||z||] * sg[R] z = (||e|| / ||z||) (z - 2 r (r . z) + 2 q (u . z))

so the forward value is e and d out / d z = (||e|| / ||z||) R: the gradient w.r.t. z is the
gradient w.r.t. e rotated back by R^T and rescaled. `rotate_to` adds sg[e - out] to the result
so the forward value is e up to one rounding of the addition, not up to the rounding of the
whole rotation. No gradient reaches e through it (as with straight-through); codebooks learn
from their own loss terms.

Near-zero norms: norms are floored at `eps`. Where ||z|| < eps the rotation is undefined
and the gradient falls back to straight-through (identity). Where ||e|| is ~0, the scale is
~0 and so is the gradient (the limit of the formula). Where z points away from e
(||u + q|| <= eps) r is set to 0 and R = I + 2 q u^T = I - 2 u u^T, the reflection taking u
to -u = q (the rotation is not unique there; a fixed choice rather than one picked by
rounding noise).

Codebook init and losses: none; this is a gradient estimator for a quantizer that has them.
A quantizer picks it with `gradient="rotation"` instead of `"straight_through"`
(`quantizer_output`).
"""

import jax
import jax.numpy as jnp

GRADIENTS = ("straight_through", "rotation")


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def rotate_to(z: jax.Array, e: jax.Array, eps: float = 1e-6) -> jax.Array:
    """z, e: [..., D] -> forward value e, gradient to z through the rotation trick
    (float32). e gets no gradient."""
    z = z.astype(jnp.float32)
    e = jax.lax.stop_gradient(e.astype(jnp.float32))
    sz = jax.lax.stop_gradient(z)
    z_norm = _norm(sz)
    e_norm = _norm(e)
    degenerate = z_norm < eps
    u = sz / jnp.maximum(z_norm, eps)
    q = e / jnp.maximum(e_norm, eps)
    w = u + q
    w_norm = _norm(w)
    r = jnp.where(w_norm > eps, w / jnp.maximum(w_norm, eps), 0.0)
    scale = e_norm / jnp.maximum(z_norm, eps)
    # R z with R, the scale, u, q and r all constants: linear in z.
    rz = z - 2.0 * r * jnp.sum(r * z, axis=-1, keepdims=True)
    rz = rz + 2.0 * q * jnp.sum(u * z, axis=-1, keepdims=True)
    rotated = jnp.where(degenerate, z, scale * rz)
    return rotated + jax.lax.stop_gradient(e - rotated)


def straight_through(z: jax.Array, e: jax.Array) -> jax.Array:
    """z + sg[e - z] in float32: forward value e, identity gradient to z, none to e."""
    z = z.astype(jnp.float32)
    return z + jax.lax.stop_gradient(e.astype(jnp.float32) - z)


def quantizer_output(z: jax.Array, e: jax.Array, gradient: str = "straight_through") -> jax.Array:
    """The quantizer's output: e forward, gradient to z by `gradient` ("straight_through" or
    "rotation"); ValueError for any other name."""
    if gradient == "straight_through":
        return straight_through(z, e)
    if gradient == "rotation":
        return rotate_to(z, e)
    raise ValueError(f"quantizer gradient must be one of {GRADIENTS}, got gradient={gradient!r}")
