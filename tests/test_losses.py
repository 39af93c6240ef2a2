"""Tests for vitvq.losses: formulas against independent NumPy code and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitvq import losses
from vitvq.errors import ConfigError


def _numpy_logit_laplace(targets, mu, log_scale, eps):
    """The DALL-E formula written out independently, in float64."""
    x = (1 - 2 * eps) * np.asarray(targets, np.float64) + eps
    b = np.exp(np.asarray(log_scale, np.float64))
    mu = np.asarray(mu, np.float64)
    nll = np.log(2 * b) + np.log(x * (1 - x)) + np.abs(np.log(x / (1 - x)) - mu) / b
    return np.mean(nll)


def _random_inputs(shape=(2, 8, 8, 3), seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    targets[0, 0, 0] = [0.0, 1.0, 0.5]  # the edges of [0, 1] must stay finite
    mu = rng.normal(0.0, 2.0, shape).astype(np.float32)
    return targets, mu


def _l1(x, y):
    return jnp.mean(jnp.abs(x - y))


def test_l2_values():
    x = jnp.array([0.0, 1.0, 3.0])
    y = jnp.array([1.0, 1.0, 1.0])
    assert float(losses.l2_loss(x, y)) == pytest.approx(5.0 / 3.0)
    assert losses.l2_loss(x.astype(jnp.bfloat16), y).dtype == jnp.float32


def test_squash_roundtrip():
    x = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(losses.unsquash(losses.squash(x, 0.1), 0.1), x, atol=1e-6)
    assert float(losses.squash(0.0)) == pytest.approx(0.1)
    assert float(losses.squash(1.0)) == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="0.7"):
        losses.squash(x, 0.7)


@pytest.mark.parametrize("eps", [0.1, 0.05])
def test_logit_laplace_matches_numpy_fixed_scale(eps):
    targets, mu = _random_inputs()
    for log_scale in (0.0, -0.7, 1.3):
        got = losses.logit_laplace_nll(targets, mu, log_scale, eps)
        want = _numpy_logit_laplace(targets, mu, log_scale, eps)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), want, rtol=2e-6)


def test_logit_laplace_matches_numpy_array_scale():
    targets, mu = _random_inputs(seed=1)
    log_scale = np.random.default_rng(2).normal(0.0, 0.5, targets.shape).astype(np.float32)
    got = losses.logit_laplace_nll(targets, mu, log_scale)
    np.testing.assert_allclose(
        float(got), _numpy_logit_laplace(targets, mu, log_scale, 0.1), rtol=2e-6
    )
    # A per-channel scale broadcasts.
    per_channel = np.array([-0.5, 0.0, 0.5], np.float32)
    got = losses.logit_laplace_nll(targets, mu, per_channel)
    np.testing.assert_allclose(
        float(got), _numpy_logit_laplace(targets, mu, per_channel, 0.1), rtol=2e-6
    )


def test_logit_laplace_minimized_at_logit_of_squashed_target():
    targets, _ = _random_inputs(seed=3)
    # logit(x') computed with the same float32 ops as the loss, so |logit(x') - mu| is exactly 0.
    x = losses.squash(targets)
    best = jnp.log(x) - jnp.log1p(-x)
    np.testing.assert_allclose(best, np.log(x / (1 - x)), rtol=1e-5, atol=1e-6)
    loss = lambda mu: losses.logit_laplace_nll(targets, mu)
    at_best = float(loss(best))
    # |.| has a kink at the minimum (jax.grad picks the subgradient +1 there), so check that 0 is
    # the symmetric derivative: the gradients just either side cancel, and each points back at
    # `best` with magnitude 1 / N per value (b = 1).
    grad = jax.grad(loss)
    above, below = np.asarray(grad(best + 1e-3)), np.asarray(grad(best - 1e-3))
    np.testing.assert_allclose(above + below, 0.0, atol=1e-9)
    np.testing.assert_allclose(above, 1.0 / best.size, rtol=1e-6)
    direction = jax.random.normal(jax.random.key(1), best.shape)
    central = (float(loss(best + 1e-2 * direction)) - float(loss(best - 1e-2 * direction))) / 2e-2
    assert abs(central) < 1e-3
    for delta in (0.3, -0.3, 1.0, -2.0):
        moved = float(loss(best + delta))
        # With b = 1 the loss grows exactly by |delta|.
        assert moved > at_best
        np.testing.assert_allclose(moved - at_best, abs(delta), rtol=1e-4)
    # Random locations are worse.
    noise = jax.random.normal(jax.random.key(0), best.shape) * 0.1
    assert float(loss(best + noise)) > at_best


def _pixels(mu, eps: float = 0.1):
    """The image a logit-Laplace output stands for: clip((sigmoid(mu) - eps) / (1 - 2 eps))."""
    return jnp.clip(losses.unsquash(jax.nn.sigmoid(mu), eps), 0.0, 1.0)


def test_logit_laplace_is_not_l1():
    targets, mu = _random_inputs(seed=4)
    nll = float(losses.logit_laplace_nll(targets, mu))
    l1_raw = float(_l1(targets, mu))
    l1_pixels = float(_l1(targets, _pixels(mu)))
    assert abs(nll - l1_raw) > 0.1
    assert abs(nll - l1_pixels) > 0.1
    # Nor the same up to a constant: the gradients in mu differ from those of L1 in pixels.
    g_nll = jax.grad(lambda m: losses.logit_laplace_nll(targets, m))(jnp.asarray(mu))
    g_l1 = jax.grad(lambda m: _l1(targets, _pixels(m)))(jnp.asarray(mu))
    assert not np.allclose(g_nll, g_l1, rtol=0.1, atol=1e-6)


def test_logit_laplace_pixels_invert_the_squash():
    mu = jnp.array([-50.0, 0.0, 50.0, math.log(0.1 / 0.9), math.log(0.9 / 0.1)])
    np.testing.assert_allclose(_pixels(mu), [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-6)
    # The mean of the logit of a squashed target recovers the target.
    x = jnp.linspace(0.0, 1.0, 11)
    s = losses.squash(x)
    np.testing.assert_allclose(_pixels(jnp.log(s / (1 - s))), x, atol=1e-6)


def test_adversarial_losses_hand_computed():
    real = jnp.array([1.0, -1.0])
    fake = jnp.array([0.5, -2.0])
    sp = lambda v: math.log1p(math.exp(v))  # softplus
    want_d = (sp(-1.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-2.0)) / 2
    got = losses.discriminator_loss(real, fake, "non_saturating")
    assert float(got) == pytest.approx(want_d, rel=1e-6)
    # hinge: relu(1 - real) = [0, 2] -> 1; relu(1 + fake) = [1.5, 0] -> 0.75.
    assert float(losses.discriminator_loss(real, fake, "hinge")) == pytest.approx(1.75)
    want_g = (sp(-0.5) + sp(2.0)) / 2
    got = losses.generator_adversarial_loss(fake, "non_saturating")
    assert float(got) == pytest.approx(want_g, rel=1e-6)
    assert float(losses.generator_adversarial_loss(fake, "hinge")) == pytest.approx(0.75)
    assert losses.discriminator_loss(real.astype(jnp.bfloat16), fake).dtype == jnp.float32


@pytest.mark.parametrize("call", ["disc", "gen"])
def test_unknown_gan_kind_raises(call):
    with pytest.raises(ConfigError, match="wasserstein.*non_saturating.*hinge"):
        if call == "disc":
            losses.discriminator_loss(jnp.zeros(2), jnp.zeros(2), "wasserstein")
        else:
            losses.generator_adversarial_loss(jnp.zeros(2), "wasserstein")


def test_r1_penalty_analytic():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
    w = jax.random.normal(jax.random.key(1), (4, 4, 3))
    # Linear D: the gradient is w for every image.
    linear = lambda imgs: jnp.sum(imgs * w, axis=(1, 2, 3))
    np.testing.assert_allclose(losses.r1_penalty(linear, x), jnp.sum(w**2), rtol=1e-5)
    # Quadratic D: the gradient is 2x, so the penalty is the batch mean of 4 ||x_i||^2.
    quad = lambda imgs: jnp.sum(imgs**2, axis=(1, 2, 3))
    want = jnp.mean(4 * jnp.sum(x**2, axis=(1, 2, 3)))
    np.testing.assert_allclose(losses.r1_penalty(quad, x), want, rtol=1e-5)


def test_lecam_hand_computed():
    real = jnp.array([2.0, 0.0])
    fake = jnp.array([-1.0, 1.0])
    # relu(real - 0.5) = [1.5, 0] -> mean sq 1.125; relu(1 - fake) = [2, 0] -> mean sq 2.
    got = losses.lecam_penalty(real, fake, ema_real=1.0, ema_fake=0.5)
    assert float(got) == pytest.approx(3.125)
    # The anchors carry no gradient; the logits do.
    g_ema = jax.grad(lambda e: losses.lecam_penalty(real, fake, e, 0.5))(1.0)
    assert float(g_ema) == 0.0
    g_real = jax.grad(lambda r: losses.lecam_penalty(r, fake, 1.0, 0.5))(real)
    np.testing.assert_allclose(g_real, [1.5, 0.0])  # d/dr mean(relu(r - 0.5)^2) = (r - 0.5)


def test_update_lecam_ema():
    assert float(losses.update_lecam_ema(1.0, jnp.array([2.0, 4.0]), decay=0.9)) == pytest.approx(
        1.2
    )
    assert float(losses.update_lecam_ema(0.0, 5.0)) == pytest.approx(0.05)


def _numpy_entropy_loss(z, codebook, temperature):
    """mean token entropy - entropy of the mean assignment, float64, written out."""
    logits = np.asarray(z, np.float64) @ np.asarray(codebook, np.float64).T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    token = -np.mean(np.sum(p * np.log(p), axis=1))
    mean_p = p.mean(axis=0)
    batch = -np.sum(mean_p * np.log(mean_p))
    return token - batch, token, batch


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_codebook_entropy_loss_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    z, codebook = _unit_rows(rng, 24, 8).reshape(2, 12, 8), _unit_rows(rng, 16, 8)
    value, parts = losses.codebook_entropy_loss(jnp.asarray(z), jnp.asarray(codebook), temperature)
    want, token, batch = _numpy_entropy_loss(z.reshape(-1, 8), codebook, temperature)
    np.testing.assert_allclose(float(value), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(parts["token_entropy"]), token, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(parts["batch_entropy"]), batch, rtol=1e-4, atol=1e-5)


def test_codebook_entropy_loss_prefers_spread_sharp_assignments():
    # Tokens sitting on 8 distinct codes beat the same tokens all sitting on one code.
    rng = np.random.default_rng(1)
    codebook = _unit_rows(rng, 8, 16)
    spread = np.repeat(codebook, 2, axis=0)
    collapsed = np.repeat(codebook[:1], 16, axis=0)
    loss = lambda z: float(losses.codebook_entropy_loss(z, codebook, 0.01)[0])  # noqa: E731
    assert loss(spread) < loss(collapsed) - 1.0
    # Sharp and spread over all 8 codes: token entropy ~0, batch entropy ~log 8.
    np.testing.assert_allclose(loss(spread), -math.log(8), atol=1e-3)


def test_codebook_entropy_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    z, codebook = _unit_rows(rng, 6, 4), _unit_rows(rng, 5, 4)
    grad = np.asarray(jax.grad(lambda z: losses.codebook_entropy_loss(z, codebook, 0.3)[0])(z))
    h, numeric = 1e-6, np.zeros_like(grad, dtype=np.float64)
    for idx in np.ndindex(*z.shape):
        up, down = z.astype(np.float64), z.astype(np.float64)
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (
            _numpy_entropy_loss(up, codebook, 0.3)[0] - _numpy_entropy_loss(down, codebook, 0.3)[0]
        ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_codebook_entropy_loss_rejects_bad_temperature():
    with pytest.raises(ConfigError, match="entropy_temperature"):
        losses.codebook_entropy_loss(jnp.ones((2, 4)), jnp.ones((3, 4)), 0.0)


# ---------------------------------------------------------------------------------------------
# Paired random crops (LPIPS on a window: `loss.perceptual_crop`).


def _window_of(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `small` equals a window of `big` (brute force)."""
    size = small.shape[0]
    return [
        (t, l)
        for t in range(big.shape[0] - size + 1)
        for l in range(big.shape[1] - size + 1)  # noqa: E741
        if np.array_equal(big[t : t + size, l : l + size], small)
    ]


def test_paired_random_crops_take_one_window_per_example_from_every_array():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 9, 7, 3)).astype(np.float32)
    y = (2.0 * x + rng.normal(size=x.shape)).astype(np.float32)
    crop = jax.jit(losses.paired_random_crops, static_argnums=2)
    seen = set()
    for seed in range(40):
        cx, cy = (np.asarray(a) for a in crop(jax.random.key(seed), (x, y), 4))
        assert cx.shape == cy.shape == (6, 4, 4, 3)
        for i in range(len(x)):
            (where,) = _window_of(x[i], cx[i])
            assert _window_of(y[i], cy[i]) == [where]  # the same window of both arrays
            seen.add(where)
    # Every position that fits is drawn (40 keys x 6 examples = 240 draws over 24 positions)
    # and none that does not.
    assert seen == {(t, l) for t in range(6) for l in range(4)}  # noqa: E741
    again = crop(jax.random.key(3), (x, y), 4)
    np.testing.assert_array_equal(again[0], crop(jax.random.key(3), (x, y), 4)[0])


def test_paired_random_crops_pass_gradients_to_the_window_only():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 2)), jnp.float32)
    w = jnp.arange(5 * 5 * 2, dtype=jnp.float32).reshape(5, 5, 2)
    key = jax.random.key(7)

    def weighted_window(a):
        return jnp.sum(losses.paired_random_crops(key, (a,), 5)[0] * w)

    grad = np.asarray(jax.grad(weighted_window)(x))
    (cx,) = losses.paired_random_crops(key, (x,), 5)
    for i in range(3):
        ((top, left),) = _window_of(np.asarray(x[i]), np.asarray(cx[i]))
        want = np.zeros((8, 8, 2), np.float32)
        want[top : top + 5, left : left + 5] = w
        np.testing.assert_array_equal(grad[i], want)


@pytest.mark.parametrize("size", [0, 9])
def test_paired_random_crops_refuse_windows_that_do_not_fit(size):
    with pytest.raises(ConfigError, match=f"crop size {size} must be in"):
        losses.paired_random_crops(jax.random.key(0), (jnp.zeros((1, 8, 8, 3)),), size)
