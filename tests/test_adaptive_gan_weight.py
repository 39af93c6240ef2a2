"""The adaptive GAN weight (`loss.adaptive_gan_weight`): the adversarial term is scaled by the
ratio of the reconstruction terms' gradient norm to its own, both at the decoder's output
logits, checked against a hand derivation with a linear discriminator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitvq.train.stage1_step import Stage1Settings, _adaptive_gan_scale


class LinearDisc(nn.Module):
    """logit_i = sum(w * x_i): its non-saturating loss has an analytic input gradient."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), x.shape[1:])
        return jnp.sum(x * w, axis=(1, 2, 3))


class RawOutput:
    output = "raw"
    logit_laplace_eps = 0.1


@pytest.mark.parametrize("l2_weight", [1.0, 3.0])
def test_scale_is_the_ratio_of_gradient_norms(l2_weight):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    images = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    disc = LinearDisc()
    params = disc.init(jax.random.key(1), jnp.asarray(images))["params"]
    settings = Stage1Settings(l2=l2_weight, logit_laplace=0.0, perceptual=0.0, adversarial=0.1)

    def scale_of(z):
        return _adaptive_gan_scale(
            z,
            jnp.asarray(images),
            None,
            model=RawOutput(),
            disc=disc,
            disc_params=params,
            settings=settings,
        )

    scale = scale_of(jnp.asarray(logits))
    # float64 by hand: l2 = mean((z - x)^2) -> 2 (z - x) / N; non-saturating
    # mean(softplus(-w.z_i)) -> -sigmoid(-w.z_i) w / B for each image i.
    z, x = logits.astype(np.float64), images.astype(np.float64)
    w = np.asarray(params["w"], np.float64)
    g_rec = l2_weight * 2.0 * (z - x) / z.size
    fake = np.sum(z * w, axis=(1, 2, 3))
    sig = 1.0 / (1.0 + np.exp(fake))  # sigmoid(-fake)
    g_adv = -(sig[:, None, None, None] * w[None]) / z.shape[0]
    want = np.linalg.norm(g_rec) / (np.linalg.norm(g_adv) + 1e-4)
    assert float(scale) == pytest.approx(want, rel=1e-4)
    # No gradient flows through the scale.
    grad = jax.grad(scale_of)(jnp.asarray(logits))
    assert not np.any(np.asarray(grad))
