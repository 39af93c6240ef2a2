"""The alternative quantizers (FSQ, LFQ, SimVQ, EMA VQ) and the rotation trick against
float64 NumPy references and hand-derived gradients."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from vitvq.models.fsq import FSQuantizer, fsq_lookup, fsq_quantize
from vitvq.models.lfq import LookupFreeQuantizer
from vitvq.models.rotation import quantizer_output, rotate_to
from vitvq.models.simvq import SimVQuantizer
from vitvq.models.vq_ema import EMAVectorQuantizer, assignment_statistics, ema_update

B, T, WIDTH = 2, 5, 8


def _x(seed=0, scale=1.0, shape=(B, T, WIDTH)):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(module, x):
    """Unboxed variables of every collection."""
    return nn.meta.unbox(jax.jit(module.init)(jax.random.key(1), x))


def _apply(module, variables, *args, **kwargs):
    """module.apply under jit (one compile instead of one per operation)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _jit_grad(f, argnums=0):
    return jax.jit(jax.grad(f, argnums=argnums))


def _z64(variables, x):
    """The projected features in float64: x @ kernel + bias."""
    dense = variables["params"]["project_down"]
    return np.asarray(x, np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(
        dense["bias"], np.float64
    )


def _with_identity_projection(variables, dim):
    """Variables whose project_down is the identity (width == code_dim): z = x."""
    params = dict(variables["params"])
    params["project_down"] = {
        "kernel": jnp.asarray(np.eye(dim, dtype=np.float32)),
        "bias": jnp.asarray(np.zeros((dim,), np.float32)),
    }
    return {**variables, "params": params}


def _usage_reference(indices, num_codes):
    counts = np.bincount(np.asarray(indices).reshape(-1), minlength=num_codes)
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    return {
        "codes_used": float((counts > 0).sum()),
        "codebook_usage": float((counts > 0).sum()) / num_codes,
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
    }


def _check_usage(aux, num_codes):
    for key, value in _usage_reference(aux["indices"], num_codes).items():
        np.testing.assert_allclose(float(aux[key]), value, rtol=1e-5, err_msg=key)


# --- every kind: the shared interface ---------------------------------------------------------


KINDS = {
    "fsq": lambda **kw: FSQuantizer(levels=(3, 4, 5, 2), **kw),
    "lfq": lambda **kw: LookupFreeQuantizer(bits=6, entropy_weight=0.1, entropy_groups=2, **kw),
    "simvq": lambda **kw: SimVQuantizer(codebook_size=13, code_dim=4, search_chunk_size=5, **kw),
    "ema": lambda **kw: EMAVectorQuantizer(codebook_size=13, code_dim=4, search_chunk_size=5, **kw),
}
AUX_KEYS = {
    "indices",
    "latents",
    "vq_loss",
    "codebook_loss",
    "commitment_loss",
    "codes_used",
    "codebook_usage",
    "perplexity",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_interface_under_jit_with_bfloat16_compute(kind):
    module = KINDS[kind](dtype=jnp.bfloat16)
    x = _x(3, 2.0)
    variables = _init(module, x)
    quantized, aux = jax.jit(module.apply)(variables, x)
    assert AUX_KEYS <= set(aux)
    assert quantized.shape == (B, T, module.code_dim) and quantized.dtype == jnp.float32
    assert aux["latents"].shape == (B, T, module.code_dim) and aux["latents"].dtype == jnp.float32
    assert aux["indices"].shape == (B, T) and aux["indices"].dtype == jnp.int32
    idx = np.asarray(aux["indices"])
    assert idx.min() >= 0 and idx.max() < module.num_codes
    looked_up = _apply(module, variables, idx, method=module.lookup)
    assert looked_up.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(looked_up), np.asarray(quantized), atol=1e-6)
    for key in ("vq_loss", "codebook_loss", "commitment_loss", "perplexity"):
        assert aux[key].dtype == jnp.float32 and np.isfinite(float(aux[key])), key
    _check_usage(aux, module.num_codes)


# --- FSQ ----------------------------------------------------------------------------------------

_fsq_quantize = jax.jit(fsq_quantize, static_argnums=1)
_fsq_lookup = jax.jit(fsq_lookup, static_argnums=1)


def _fsq_reference(z, levels):
    levels_arr = np.asarray(levels)
    half = (levels_arr - 1) * (1 + 1e-3) / 2
    offset = np.where(levels_arr % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half)
    bounded = np.tanh(z + shift) * half - offset
    half_width = levels_arr // 2
    rounded = np.clip(np.round(bounded), -half_width, (levels_arr - 1) // 2)
    basis = np.array([math.prod(levels[:i]) for i in range(len(levels))])
    indices = ((rounded + half_width) * basis).sum(-1).astype(np.int64)
    return rounded / half_width, bounded / half_width, indices


def test_fsq_forward_matches_numpy():
    levels = (3, 4, 5, 2)
    module = FSQuantizer(levels=levels)
    x = _x(0, 3.0)
    variables = _init(module, x)
    assert module.code_dim == 4 and module.num_codes == 120
    quantized, aux = _apply(module, variables, x)
    codes, latents, indices = _fsq_reference(_z64(variables, x), levels)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), indices)
    np.testing.assert_allclose(np.asarray(quantized), codes, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["latents"]), latents, atol=1e-5)
    for key in ("vq_loss", "codebook_loss", "commitment_loss"):
        assert float(aux[key]) == 0.0
    # Codes on the grid: per dimension exactly L values in [-1, 1].
    grid = np.asarray(_fsq_lookup(np.arange(120), levels))
    assert np.abs(grid).max() == 1.0
    assert [len(np.unique(grid[:, i])) for i in range(4)] == list(levels)
    assert len(np.unique(grid, axis=0)) == 120
    _check_usage(aux, 120)


def test_fsq_every_index_is_reached_and_lookup_inverts_it():
    levels = (3, 4, 5, 2)
    grid = np.asarray(_fsq_lookup(np.arange(120), levels), np.float64)  # [120, 4]
    # The pre-image of each grid point under the bound: tanh(z + shift) * half - offset = c * hw.
    lv = np.asarray(levels)
    half = (lv - 1) * (1 + 1e-3) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    z = np.arctanh((grid * (lv // 2) + offset) / half) - np.arctanh(offset / half)
    codes, _, indices = _fsq_quantize(jnp.asarray(z, jnp.float32), levels)
    np.testing.assert_array_equal(np.asarray(indices), np.arange(120))
    np.testing.assert_allclose(np.asarray(codes), grid, atol=1e-6)
    # The first dimension is the least significant digit.
    np.testing.assert_array_equal(
        np.asarray(_fsq_lookup(np.array([1]), levels))[0], [0, -1, -1, -1]
    )


def test_fsq_large_level_stays_in_range():
    # For L > 1001 the reference's widening exceeds half a step; the clip keeps L levels.
    _, _, indices = _fsq_quantize(np.array([[30.0], [-30.0], [0.0]]), (1003,))
    np.testing.assert_array_equal(np.asarray(indices), [1002, 0, 501])


def test_fsq_gradient_is_straight_through_the_rounding():
    levels = (5, 4)
    module = FSQuantizer(levels=levels)
    x = _x(1, 1.5, (1, 3, 2))
    variables = _with_identity_projection(_init(module, x), 2)
    w = np.random.default_rng(9).normal(size=(1, 3, 2))
    grad = _jit_grad(lambda x: jnp.sum(w * module.apply(variables, x)[0]))(x)
    # d code / d z = half * (1 - tanh(z + shift)^2) / half_width, diagonal.
    lv = np.asarray(levels)
    half = (lv - 1) * (1 + 1e-3) / 2
    shift = np.arctanh(np.where(lv % 2 == 0, 0.5, 0.0) / half)
    expected = w * half * (1 - np.tanh(np.asarray(x, np.float64) + shift) ** 2) / (lv // 2)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5)
    # W.r.t. the latents (bounded / half_width) it is the identity: codes - latents is flat.
    jac = jax.jit(jax.jacfwd(lambda z: jnp.subtract(*fsq_quantize(z, levels)[:2]).reshape(-1)))(x)
    np.testing.assert_allclose(np.asarray(jac), 0.0, atol=1e-6)


@pytest.mark.parametrize("levels, bad", [((4, 1), "1"), ((0,), "0"), ((), r"\(\)")])
def test_fsq_rejects_bad_levels(levels, bad):
    with pytest.raises(ValueError, match=bad):
        FSQuantizer(levels=levels)


# --- LFQ ----------------------------------------------------------------------------------------


def _sign_codes(bits):
    return np.array([[1.0 if (k >> j) & 1 else -1.0 for j in range(bits)] for k in range(2**bits)])


def _entropy(p, axis=-1):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _lfq_entropies_reference(z, groups, temperature):
    """Per group of bits, the softmax over its sub-codes of -||z_g - c||^2 / temperature;
    entropies summed over groups (groups=1: brute force over all 2**bits codes)."""
    z = z.reshape(-1, z.shape[-1])
    group_bits = z.shape[-1] // groups
    codes = _sign_codes(group_bits)
    per_token = batch = 0.0
    for g in range(groups):
        zg = z[:, g * group_bits : (g + 1) * group_bits]
        logits = -((zg[:, None, :] - codes[None]) ** 2).sum(-1) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        per_token += _entropy(p).mean()
        batch += _entropy(p.mean(axis=0))
    return per_token, batch


@pytest.mark.parametrize("groups, temperature", [(1, 1.0), (1, 0.05), (2, 0.5), (3, 1.0)])
def test_lfq_forward_and_entropy_match_numpy(groups, temperature):
    bits, ew, cw, gamma = 6, 0.3, 0.25, 0.7
    module = LookupFreeQuantizer(
        bits=bits,
        entropy_weight=ew,
        commitment_weight=cw,
        entropy_groups=groups,
        diversity_gamma=gamma,
        temperature=temperature,
    )
    x = _x(2, 0.5)
    variables = _init(module, x)
    quantized, aux = jax.jit(module.apply)(variables, x, 0.5)  # entropy_scale traced
    z = _z64(variables, x)
    q = np.where(z > 0, 1.0, -1.0)
    indices = ((z > 0) * 2 ** np.arange(bits)).sum(-1)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), indices)
    np.testing.assert_allclose(np.asarray(quantized), q, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["latents"]), z, atol=1e-5)
    commit = ((z - q) ** 2).sum(-1).mean()
    np.testing.assert_allclose(float(aux["commitment_loss"]), commit, rtol=1e-5)
    per_token, batch = _lfq_entropies_reference(z, groups, temperature)
    np.testing.assert_allclose(float(aux["per_token_entropy"]), per_token, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["batch_entropy"]), batch, rtol=1e-5)
    entropy_loss = per_token - gamma * batch
    np.testing.assert_allclose(float(aux["entropy_loss"]), entropy_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        float(aux["vq_loss"]), cw * commit + ew * 0.5 * entropy_loss, rtol=1e-4, atol=1e-5
    )
    assert float(aux["codebook_loss"]) == 0.0
    # The factorization: the per-token entropy is exact, the batch one an upper bound.
    full_per_token, full_batch = _lfq_entropies_reference(z, 1, temperature)
    np.testing.assert_allclose(per_token, full_per_token, rtol=1e-9, atol=1e-12)
    assert batch >= full_batch - 1e-9
    if groups == 3:
        assert batch > full_batch + 1e-3  # the approximation is not exact here
    _check_usage(aux, 64)


def test_lfq_bit_order_lookup_and_straight_through_gradient():
    bits = 4
    module = LookupFreeQuantizer(bits=bits, entropy_weight=0.0, commitment_weight=1.0)
    x = jnp.array([[[0.3, -0.2, -1.0, 2.0], [-0.5, 0.1, 0.2, -3.0]]])  # [1, 2, 4]
    variables = _with_identity_projection(_init(module, x), bits)
    quantized, aux = _apply(module, variables, x)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), [[1 + 8, 2 + 4]])  # LSB-first
    np.testing.assert_array_equal(
        np.asarray(_apply(module, variables, np.array([9, 6, 0, 15]), method=module.lookup)),
        [[1, -1, -1, 1], [-1, 1, 1, -1], [-1, -1, -1, -1], [1, 1, 1, 1]],
    )
    w = np.arange(1.0, 9.0).reshape(1, 2, 4)
    grad = _jit_grad(lambda x: jnp.sum(w * module.apply(variables, x)[0]))(x)
    np.testing.assert_allclose(np.asarray(grad), w, atol=1e-6)  # identity
    # vq_loss with entropy_weight 0 is the commitment: d/dz mean_t ||z - q||^2 = 2 (z - q) / N.
    grad = _jit_grad(lambda x: module.apply(variables, x)[1]["vq_loss"])(x)
    q = np.where(np.asarray(x) > 0, 1.0, -1.0)
    np.testing.assert_allclose(np.asarray(grad), 2 * (np.asarray(x) - q) / 2, rtol=1e-6)


def test_lfq_entropy_gradient_is_finite_at_low_temperature():
    module = LookupFreeQuantizer(bits=8, entropy_weight=1.0, entropy_groups=2)
    x = _x(4, 5.0)
    variables = _init(module, x)
    grads = _jit_grad(lambda p: module.apply({"params": p}, x)[1]["vq_loss"])(variables["params"])
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "kw, bad",
    [
        (dict(bits=19), "bits=19"),
        (dict(bits=0), "bits=0"),
        (dict(bits=6, entropy_groups=4), "entropy_groups=4"),
        (dict(bits=6, entropy_groups=0), "entropy_groups=0"),
        (dict(bits=6, temperature=0.0), "temperature=0.0"),
    ],
)
def test_lfq_rejects_bad_settings(kw, bad):
    with pytest.raises(ValueError, match=bad):
        LookupFreeQuantizer(entropy_weight=0.1, **kw)


# --- SimVQ --------------------------------------------------------------------------------------


def test_simvq_forward_losses_and_usage_match_numpy():
    module = SimVQuantizer(codebook_size=13, code_dim=4, beta=0.3, search_chunk_size=5)
    x = _x(5, 2.0)
    variables = _init(module, x)
    assert set(variables) == {"params", "simvq_basis", "vq_stats"}
    assert "codebook" not in variables["params"]  # the basis is no parameter
    np.testing.assert_array_equal(variables["params"]["codebook_map"], np.eye(4))
    # A non-trivial map W.
    w_map = np.eye(4) + 0.5 * np.random.default_rng(7).normal(size=(4, 4))
    params = {**variables["params"], "codebook_map": jnp.asarray(w_map, jnp.float32)}
    variables = {**variables, "params": params}
    (quantized, aux), mutated = _apply(module, variables, x, mutable=["vq_stats"])
    basis = np.asarray(variables["simvq_basis"]["codebook"], np.float64)
    codes = basis @ w_map
    z = _z64(variables, x)
    indices = ((z[..., None, :] - codes) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), indices)
    e = codes[indices]
    np.testing.assert_allclose(np.asarray(quantized), e, atol=1e-5)
    distance = ((z - e) ** 2).sum(-1).mean()
    np.testing.assert_allclose(float(aux["codebook_loss"]), distance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["commitment_loss"]), distance, rtol=1e-5)
    np.testing.assert_allclose(float(aux["vq_loss"]), 1.3 * distance, rtol=1e-5)
    counts = np.bincount(indices.reshape(-1), minlength=13)
    np.testing.assert_allclose(np.asarray(mutated["vq_stats"]["usage"]), 0.01 * counts, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(_apply(module, variables, np.arange(13), method=module.lookup)), codes, atol=1e-5
    )


def test_simvq_gradients_codebook_term_to_the_map_commitment_straight_through():
    module = SimVQuantizer(codebook_size=7, code_dim=3, beta=0.25, search_chunk_size=0)
    x = _x(6, 1.0, (1, 4, 3))
    variables = _with_identity_projection(_init(module, x), 3)
    basis = np.asarray(variables["simvq_basis"]["codebook"], np.float64)
    w_map = np.asarray(variables["params"]["codebook_map"], np.float64)
    z = np.asarray(x, np.float64)[0]
    k = np.asarray(_apply(module, variables, x)[1]["indices"])[0]

    def loss(params, x, key):
        return module.apply({**variables, "params": params}, x)[1][key]

    # codebook_loss = mean_t ||z_t - C_k W||^2: dW = -2/N sum_t C_k^T (z_t - C_k W).
    grads = _jit_grad(functools.partial(loss, key="codebook_loss"))(variables["params"], x)
    expected = -2 / 4 * basis[k].T @ (z - basis[k] @ w_map)
    np.testing.assert_allclose(np.asarray(grads["codebook_map"]), expected, rtol=1e-5, atol=1e-6)
    # The commitment term does not reach W; it reaches the encoder: 2 (z - e) / N.
    grads = _jit_grad(functools.partial(loss, key="commitment_loss"))(variables["params"], x)
    np.testing.assert_allclose(np.asarray(grads["codebook_map"]), 0.0)
    gx = _jit_grad(functools.partial(loss, key="commitment_loss"), 1)(variables["params"], x)
    np.testing.assert_allclose(np.asarray(gx)[0], 2 / 4 * (z - basis[k] @ w_map), rtol=1e-5)
    # The output is straight-through: identity w.r.t. z.
    w = np.random.default_rng(3).normal(size=(1, 4, 3))
    gx = _jit_grad(lambda x: jnp.sum(w * module.apply(variables, x)[0]))(x)
    np.testing.assert_allclose(np.asarray(gx), w, atol=1e-6)


# --- the rotation trick -------------------------------------------------------------------------


def _rotation_jacobian(z, e):
    u = z / np.linalg.norm(z)
    q = e / np.linalg.norm(e)
    r = (u + q) / np.linalg.norm(u + q)
    rot = np.eye(len(z)) - 2 * np.outer(r, r) + 2 * np.outer(q, u)
    return np.linalg.norm(e) / np.linalg.norm(z) * rot, rot, u, q


def test_rotation_forward_is_the_code():
    z = _x(7, 1.0, (4, 5, 3))
    e = _x(8, 2.0, (4, 5, 3))
    out = jax.jit(rotate_to)(z, e)
    np.testing.assert_allclose(np.asarray(out), np.asarray(e), rtol=1e-6, atol=1e-6)
    out = jax.jit(quantizer_output, static_argnums=2)(z, e, "rotation")
    np.testing.assert_allclose(np.asarray(out), np.asarray(e), rtol=1e-6, atol=1e-6)


def test_rotation_jacobian_matches_hand_derivation():
    z = np.array([0.5, -1.2, 2.0])
    e = np.array([-0.3, 0.4, 1.5])
    expected, rot, u, q = _rotation_jacobian(z, e)
    # The hand formula is a rotation taking u to q.
    np.testing.assert_allclose(rot @ u, q, atol=1e-12)
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    z32, e32 = jnp.asarray(z, jnp.float32), jnp.asarray(e, jnp.float32)
    jac, jac_e, jac_st = jax.jit(
        lambda z, e: (
            jax.jacfwd(rotate_to)(z, e),
            jax.jacfwd(rotate_to, argnums=1)(z, e),
            jax.jacfwd(quantizer_output)(z, e),
        )
    )(z32, e32)
    np.testing.assert_allclose(np.asarray(jac), expected, rtol=1e-5, atol=1e-6)
    # It is not the straight-through identity, and e gets no gradient.
    assert np.abs(expected - np.eye(3)).max() > 0.1
    np.testing.assert_allclose(np.asarray(jac_e), 0.0)
    np.testing.assert_allclose(np.asarray(jac_st), np.eye(3))


def test_rotation_guards_degenerate_norms():
    e = np.array([0.3, -0.4, 1.2], np.float32)
    both = jax.jit(jax.vmap(lambda z, e: (rotate_to(z, e), jax.jacfwd(rotate_to)(z, e))))
    # z = 0 (straight-through) and z opposite to e (the reflection taking u to q, scaled).
    out, jac = both(np.stack([np.zeros(3, np.float32), -2.0 * e]), np.stack([e, e]))
    out, jac = np.asarray(out), np.asarray(jac)
    np.testing.assert_allclose(out, np.stack([e, e]), atol=1e-6)
    np.testing.assert_allclose(jac[0], np.eye(3))
    u = -e / np.linalg.norm(e)
    assert np.isfinite(jac).all()
    np.testing.assert_allclose(jac[1], 0.5 * (np.eye(3) - 2 * np.outer(u, u)), atol=1e-5)
    z = jnp.asarray(-2.0 * e)
    with pytest.raises(ValueError, match="'rotate'"):
        quantizer_output(z, e, "rotate")


# --- EMA VQ -------------------------------------------------------------------------------------


def _normalize(a):
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-6)


def _ema_reference(state, z, l2, decay, epsilon):
    """Codes, losses and the next (cluster_size, embed_sum, codebook), float64."""
    codebook = np.asarray(state["codebook"], np.float64)
    num_codes = len(codebook)
    z = z.reshape(-1, z.shape[-1])
    if l2:
        z, search = _normalize(z), _normalize(codebook)
        indices = (z @ search.T).argmax(-1)
    else:
        search = codebook
        indices = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
    counts = np.bincount(indices, minlength=num_codes).astype(np.float64)
    sums = np.zeros_like(codebook)
    np.add.at(sums, indices, z)
    cluster_size = decay * np.asarray(state["cluster_size"], np.float64) + (1 - decay) * counts
    embed_sum = decay * np.asarray(state["embed_sum"], np.float64) + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + epsilon) / (n + num_codes * epsilon) * n
    return {
        "indices": indices,
        "e": search[indices],
        "commit": ((z - search[indices]) ** 2).sum(-1).mean(),
        "cluster_size": cluster_size,
        "embed_sum": embed_sum,
        "codebook": embed_sum / smoothed[:, None],
    }


def _ema_state(seed, num_codes, dim):
    rng = np.random.default_rng(seed)
    state = {
        "codebook": rng.normal(size=(num_codes, dim)),
        "embed_sum": rng.normal(size=(num_codes, dim)),
        "cluster_size": rng.uniform(0.0, 3.0, size=(num_codes,)),
    }
    return {key: jnp.asarray(value, jnp.float32) for key, value in state.items()}


@pytest.mark.parametrize("l2", [True, False])
def test_ema_forward_and_one_update_match_numpy(l2):
    decay, epsilon, beta = 0.9, 1e-2, 0.3
    module = EMAVectorQuantizer(
        codebook_size=11,
        code_dim=4,
        decay=decay,
        epsilon=epsilon,
        beta=beta,
        search_chunk_size=4,
        l2_normalize_codes=l2,
    )
    x = _x(9, 2.0)
    variables = _init(module, x)
    assert set(variables) == {"params", "vq_ema", "vq_stats"}
    assert set(variables["params"]) == {"project_down"}
    init_state = variables["vq_ema"]
    np.testing.assert_array_equal(init_state["embed_sum"], init_state["codebook"])
    np.testing.assert_array_equal(init_state["cluster_size"], np.ones(11))
    if l2:
        np.testing.assert_allclose(np.linalg.norm(init_state["codebook"], axis=-1), 1.0, rtol=1e-5)
    state = _ema_state(10, 11, 4)
    variables = {**variables, "vq_ema": state}
    (quantized, aux), mutated = _apply(module, variables, x, mutable=["vq_ema", "vq_stats"])
    ref = _ema_reference(state, _z64(variables, x), l2, decay, epsilon)
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), ref["indices"])
    np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 4), ref["e"], atol=1e-5)
    np.testing.assert_allclose(float(aux["commitment_loss"]), ref["commit"], rtol=1e-5)
    np.testing.assert_allclose(float(aux["codebook_loss"]), ref["commit"], rtol=1e-5)
    np.testing.assert_allclose(float(aux["vq_loss"]), beta * ref["commit"], rtol=1e-5)
    for key in ("cluster_size", "embed_sum", "codebook"):
        np.testing.assert_allclose(
            np.asarray(mutated["vq_ema"][key]), ref[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
    counts = np.bincount(ref["indices"], minlength=11)
    np.testing.assert_allclose(np.asarray(mutated["vq_stats"]["usage"]), 0.01 * counts, rtol=1e-6)
    # Without the collection mutable (evaluation) nothing moves, and the codes come from the
    # state before the update.
    quantized_eval, _ = _apply(module, variables, x)
    np.testing.assert_array_equal(np.asarray(quantized_eval), np.asarray(quantized))
    # No gradient reaches the codebook; the commitment reaches the encoder.
    grads = _jit_grad(lambda p: module.apply({**variables, "params": p}, x)[1]["vq_loss"])(
        variables["params"]
    )
    assert np.abs(np.asarray(grads["project_down"]["kernel"])).max() > 0


def test_ema_update_is_a_global_batch_statistic():
    module = EMAVectorQuantizer(codebook_size=11, code_dim=4, decay=0.8, search_chunk_size=4)
    x = _x(11, 1.0, (8, T, WIDTH))
    variables = {**_init(module, x), "vq_ema": _ema_state(12, 11, 4)}
    apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["vq_ema"]))
    (_, aux), full = apply(variables, x)

    # Two halves' sums, added, make the full batch's update.
    counts, sums = 0.0, 0.0
    for half in (x[:4], x[4:]):
        (_, half_aux), _ = apply(variables, half)
        c, s = jax.jit(assignment_statistics, static_argnums=2)(
            half_aux["latents"], half_aux["indices"], 11
        )
        counts, sums = counts + c, sums + s
    state = variables["vq_ema"]
    expected = jax.jit(ema_update, static_argnums=(4, 5))(
        state["cluster_size"], state["embed_sum"], counts, sums, 0.8, 1e-5
    )
    for key, value in zip(("cluster_size", "embed_sum", "codebook"), expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(full["vq_ema"][key]), np.asarray(value), rtol=1e-5, atol=1e-6
        )
    # A half alone is not the same update (the test can tell batches apart).
    (_, _), half_only = apply(variables, x[:4])
    assert not np.allclose(half_only["vq_ema"]["cluster_size"], full["vq_ema"]["cluster_size"])

    # The batch sharded over 8 devices under jit gives the same update.
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, None)))
    (_, sharded_aux), sharded_state = apply(variables, sharded)
    np.testing.assert_array_equal(np.asarray(sharded_aux["indices"]), np.asarray(aux["indices"]))
    for key in ("cluster_size", "embed_sum", "codebook"):
        np.testing.assert_allclose(
            np.asarray(sharded_state["vq_ema"][key]),
            np.asarray(full["vq_ema"][key]),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "kw, bad",
    [
        (dict(decay=0.0), "decay=0.0"),
        (dict(decay=1.0), "decay=1.0"),
        (dict(decay=1.5), "decay=1.5"),
        (dict(decay=-0.1), "decay=-0.1"),
        (dict(epsilon=0.0), "epsilon=0.0"),
    ],
)
def test_ema_rejects_bad_settings(kw, bad):
    with pytest.raises(ValueError, match=bad):
        EMAVectorQuantizer(codebook_size=4, code_dim=2, **kw)
