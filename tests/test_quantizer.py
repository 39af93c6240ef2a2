"""The factorized l2-normalized quantizer against brute force and hand-made cases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitvq.models.quantizer import (
    VectorQuantizer,
    code_counts,
    l2_normalize,
    nearest_code,
    restart_dead_codes,
    usage_statistics,
)


def _init(q, x):
    variables = q.init(jax.random.key(0), x)
    return {"params": nn.meta.unbox(variables["params"]), "vq_stats": variables["vq_stats"]}


def test_codes_and_latents_have_unit_norm():
    q = VectorQuantizer(codebook_size=37, code_dim=8, search_chunk_size=16)
    x = jax.random.normal(jax.random.key(1), (3, 10, 24))
    variables = _init(q, x)
    quantized, aux = q.apply(variables, x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["latents"]), axis=-1), 1.0, atol=1e-5)
    codes = q.apply(variables, method=q.normalized_codebook)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(codes), axis=-1), 1.0, atol=1e-5)
    # The forward value of the straight-through output is the chosen code itself.
    chosen = np.asarray(codes)[np.asarray(aux["indices"])]
    np.testing.assert_allclose(np.asarray(quantized), chosen, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 100, 1000])
def test_nearest_code_matches_brute_force_cosine(chunk):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 16))
    codebook = rng.normal(size=(100, 16)) * rng.uniform(0.1, 3.0, size=(100, 1))
    # Brute force in float64: argmax of cosine similarity.
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    cn = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    expected = np.argmax(zn @ cn.T, axis=1)
    got = nearest_code(l2_normalize(jnp.asarray(z)), l2_normalize(jnp.asarray(codebook)), chunk)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("chunk", [0, 7, 64, 1000])
def test_euclidean_nearest_code_matches_brute_force_distance(chunk):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 8)) * 2.0
    # Codes of very different norms: the cosine and the Euclidean nearest code disagree.
    codebook = rng.normal(size=(90, 8)) * rng.uniform(0.05, 4.0, size=(90, 1))
    d2 = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # float64 brute force
    expected = np.argmin(d2, axis=1)
    cosine = np.argmax(
        (z / np.linalg.norm(z, axis=1, keepdims=True))
        @ (codebook / np.linalg.norm(codebook, axis=1, keepdims=True)).T,
        axis=1,
    )
    assert (cosine != expected).mean() > 0.1  # the test tells the two searches apart
    got = nearest_code(jnp.asarray(z), jnp.asarray(codebook), chunk, euclidean=True)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_quantizer_without_l2_normalization_keeps_raw_codes():
    q = VectorQuantizer(
        codebook_size=37, code_dim=8, search_chunk_size=16, l2_normalize_codes=False
    )
    x = 3.0 * jax.random.normal(jax.random.key(1), (3, 10, 24))
    variables = _init(q, x)
    quantized, aux = q.apply(variables, x)
    latents = np.asarray(aux["latents"], np.float64)
    assert np.abs(np.linalg.norm(latents, axis=-1) - 1.0).max() > 0.1  # not normalized
    codebook = np.asarray(variables["params"]["codebook"], np.float64)
    d2 = ((latents[..., None, :] - codebook) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.argmin(d2, axis=-1))
    # The forward value is the raw chosen code; the loss is the squared distance to it.
    np.testing.assert_allclose(
        np.asarray(quantized), codebook[np.asarray(aux["indices"])], atol=1e-5
    )
    np.testing.assert_allclose(float(aux["codebook_loss"]), d2.min(-1).mean(), rtol=1e-4)


def test_nearest_code_ties_go_to_lowest_index_across_chunks():
    codebook = jnp.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    z = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
    for chunk in (0, 1, 2, 3):
        np.testing.assert_array_equal(np.asarray(nearest_code(z, codebook, chunk)), [1, 0])


def test_nearest_code_never_builds_the_whole_similarity_matrix():
    z = jnp.zeros((300, 8))
    codebook = jnp.zeros((4096, 8))
    hlo = jax.jit(lambda a, b: nearest_code(a, b, 256)).lower(z, codebook).as_text()
    assert "300x4096" not in hlo and "4096x300" not in hlo
    assert "256x300" in hlo  # one chunk's similarities, [chunk, tokens]


def test_straight_through_gradient_reaches_the_encoder_input():
    q = VectorQuantizer(codebook_size=16, code_dim=4)
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    variables = _init(q, x)
    target = jax.random.normal(jax.random.key(3), (2, 5, 4))

    def decoder_loss(x):
        quantized, _ = q.apply(variables, x)
        return jnp.sum((quantized - target) ** 2)

    grad = jax.grad(decoder_loss)(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad).sum()) > 1e-3

    def param_grads(params):
        quantized, aux = q.apply({"params": params, "vq_stats": variables["vq_stats"]}, x)
        return jnp.sum((quantized - target) ** 2)

    grads = jax.grad(param_grads)(variables["params"])
    # The decoder loss alone trains the projection (straight through) but not the codebook.
    assert float(jnp.abs(grads["project_down"]["kernel"]).sum()) > 1e-3
    assert float(jnp.abs(grads["codebook"]).sum()) == 0.0


def test_vq_loss_formula_and_codebook_gradient():
    q = VectorQuantizer(codebook_size=8, code_dim=4, beta=0.25)
    x = jax.random.normal(jax.random.key(4), (2, 6, 8))
    variables = _init(q, x)
    _, aux = q.apply(variables, x)
    z = np.asarray(aux["latents"], np.float64)
    codes = np.asarray(q.apply(variables, method=q.normalized_codebook), np.float64)
    e = codes[np.asarray(aux["indices"])]
    dist = np.mean(np.sum((z - e) ** 2, axis=-1))
    np.testing.assert_allclose(float(aux["vq_loss"]), 1.25 * dist, rtol=1e-5)

    def vq_loss(params):
        _, aux = q.apply({"params": params, "vq_stats": variables["vq_stats"]}, x)
        return aux["vq_loss"]

    grads = jax.grad(vq_loss)(variables["params"])
    used = np.unique(np.asarray(aux["indices"]))
    row_grad = np.abs(np.asarray(grads["codebook"])).sum(axis=1)
    assert np.all(row_grad[used] > 0)
    unused = np.setdiff1d(np.arange(8), used)
    assert np.all(row_grad[unused] == 0)


def test_usage_and_perplexity_on_hand_made_cases():
    # Four codes used equally out of eight: perplexity 4, half the codebook.
    counts = code_counts(jnp.asarray([[0, 1], [2, 3], [0, 1], [2, 3]]), 8)
    np.testing.assert_array_equal(np.asarray(counts), [2, 2, 2, 2, 0, 0, 0, 0])
    stats = usage_statistics(counts)
    assert float(stats["codes_used"]) == 4
    assert float(stats["codebook_usage"]) == 0.5
    np.testing.assert_allclose(float(stats["perplexity"]), 4.0, rtol=1e-6)
    # One code only: perplexity 1.
    stats = usage_statistics(code_counts(jnp.full((3, 5), 6), 8))
    assert float(stats["codes_used"]) == 1
    np.testing.assert_allclose(float(stats["perplexity"]), 1.0, rtol=1e-6)
    # Skewed: p = (3/4, 1/4) -> exp(H).
    stats = usage_statistics(code_counts(jnp.asarray([1, 1, 1, 5]), 8))
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(float(stats["perplexity"]), np.exp(h), rtol=1e-6)


def test_usage_ema_updates_only_when_mutable():
    q = VectorQuantizer(codebook_size=8, code_dim=4, usage_decay=0.5)
    x = jax.random.normal(jax.random.key(5), (1, 4, 8))
    variables = _init(q, x)
    np.testing.assert_array_equal(np.asarray(variables["vq_stats"]["usage"]), 0)
    (_, aux), state = q.apply(variables, x, mutable=["vq_stats"])
    counts = np.bincount(np.asarray(aux["indices"]).ravel(), minlength=8)
    np.testing.assert_allclose(np.asarray(state["vq_stats"]["usage"]), 0.5 * counts)


def test_dead_code_restart_moves_only_unused_codes():
    rng = np.random.default_rng(1)
    codebook = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    usage = jnp.asarray([5.0, 0.0, 2.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.5, 0.0], jnp.float32)
    latents = l2_normalize(jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32))
    new, new_usage, n = restart_dead_codes(codebook, usage, latents, jax.random.key(0), 0.1)
    dead = np.asarray(usage) < 0.1
    assert int(n) == dead.sum() == 5
    np.testing.assert_array_equal(np.asarray(new)[~dead], np.asarray(codebook)[~dead])
    flat = np.asarray(latents).reshape(-1, 4)
    for row in np.asarray(new)[dead]:
        assert np.min(np.abs(flat - row).sum(axis=1)) < 1e-6  # a recent encoder output
    assert np.all(np.asarray(new_usage)[dead] >= 0.1)
    np.testing.assert_array_equal(np.asarray(new_usage)[~dead], np.asarray(usage)[~dead])
