"""Stage-1 losses: pixel, logit-Laplace, codebook entropy, adversarial, discriminator penalties.

Pure functions of arrays (no Flax modules). Every loss upcasts its inputs to at least float32
before doing any math, so a bfloat16 model still gets float32 losses; float64 inputs (used by
the tests under `jax.enable_x64`) stay float64. Each loss returns a scalar.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vitvq.errors import ConfigError

GAN_LOSS_KINDS = ("non_saturating", "hinge")


def _float(x) -> jax.Array:
    """`x` as an array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error over all values."""
    return jnp.mean(jnp.square(_float(x) - _float(y)))


def paired_random_crops(
    rng: jax.Array, images: tuple[jax.Array, ...], size: int
) -> tuple[jax.Array, ...]:
    """The same random `size` x `size` window of each example in every array of `images`
    (all [batch, height, width, channels] of one shape): one window per example, uniform over
    the positions that fit. Differentiable with respect to the arrays."""
    batch, height, width, channels = images[0].shape
    if not 0 < size <= min(height, width):
        raise ConfigError(f"crop size {size} must be in [1, {min(height, width)}]")
    k_top, k_left = jax.random.split(rng)
    tops = jax.random.randint(k_top, (batch,), 0, height - size + 1)
    lefts = jax.random.randint(k_left, (batch,), 0, width - size + 1)

    def crop(x, top, left):
        return jax.lax.dynamic_slice(x, (top, left, 0), (size, size, channels))

    return tuple(jax.vmap(crop)(x, tops, lefts) for x in images)


# ---------------------------------------------------------------------------------------------
# Logit-Laplace (DALL-E, Ramesh et al. 2021).


def _check_eps(eps) -> None:
    # Only a Python number can be checked here; a traced eps is the caller's business.
    if isinstance(eps, int | float) and not 0.0 <= eps < 0.5:
        raise ConfigError(f"logit-laplace eps must be in [0, 0.5), got {eps}")


def squash(x: jax.Array, eps: float = 0.1) -> jax.Array:
    """Maps [0, 1] into [eps, 1 - eps]: (1 - 2 eps) x + eps, so that logit(x) is finite."""
    _check_eps(eps)
    return (1.0 - 2.0 * eps) * _float(x) + eps


def unsquash(y: jax.Array, eps: float = 0.1) -> jax.Array:
    """The inverse of `squash`: (y - eps) / (1 - 2 eps)."""
    _check_eps(eps)
    return (_float(y) - eps) / (1.0 - 2.0 * eps)


def logit_laplace_nll(
    targets: jax.Array,
    mu: jax.Array,
    log_scale: jax.Array | float = 0.0,
    eps: float = 0.1,
) -> jax.Array:
    """Logit-Laplace negative log-likelihood of `targets` (DALL-E), mean over all values.

    Targets x in [0, 1] are squashed to x' = (1 - 2 eps) x + eps; `mu` is the decoder's
    location in logit space and b = exp(log_scale) the scale. Per value:

        nll = log(2 b) + log(x' (1 - x')) + |logit(x') - mu| / b

    (the Laplace density of logit(x') plus the log-Jacobian of the logit transform, so this is
    an exact likelihood of x' on (0, 1)).

    Scale: ViT-VQGAN does not say whether b is predicted (DALL-E predicts ln b per pixel
    channel). We fix it by default (log_scale = 0, b = 1): the loss is then an L1 loss in logit
    space plus a constant, which keeps the decoder a single output head. A model that predicts
    the scale passes its prediction as an array broadcastable to `mu`.

    Args:
      targets: pixel values in [0, 1], any shape.
      mu: predicted locations in logit space, same shape as `targets`.
      log_scale: ln b, a scalar or an array broadcastable to `mu`.
      eps: squashing margin (0.1 in DALL-E and ViT-VQGAN).
    """
    x = squash(targets, eps)
    mu = _float(mu)
    log_scale = _float(log_scale)
    # log(x') and log1p(-x') rather than log(x' / (1 - x')) to stay accurate near the edges.
    log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
    nll = (
        jnp.log(2.0)
        + log_scale
        + log_x
        + log_1mx
        + jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_scale)
    )
    return jnp.mean(nll)


# ---------------------------------------------------------------------------------------------
# Codebook entropy (an optional usage regularizer; not in the ViT-VQGAN paper).


def codebook_entropy_loss(
    latents: jax.Array, codebook: jax.Array, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_t H(p_t) - H(mean_t p_t), with p_t = softmax(<z_t, e_k> / temperature).

    latents: [..., D] l2-normalized encoder outputs; codebook: [K, D] l2-normalized codes.
    Minimizing it makes each token's soft assignment sharp (first term) and the batch's
    average assignment spread over the whole codebook (second term), which pulls encoder
    outputs into unused cells and codes towards unserved latents (the entropy penalty of
    MaskGIT/MAGVIT-style tokenizers). Entropies are in nats. The [tokens, K] soft assignments
    are held whole: memory grows with tokens per device x K.
    """
    if not temperature > 0:
        raise ConfigError(f"loss.entropy_temperature must be > 0, got {temperature}")
    z = _float(latents).reshape(-1, latents.shape[-1])
    logits = (z @ _float(codebook).T) / temperature  # [N, K]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    token_entropy = -jnp.mean(jnp.sum(p * log_p, axis=-1))
    mean_p = jnp.mean(p, axis=0)
    batch_entropy = -jnp.sum(mean_p * jnp.log(jnp.maximum(mean_p, 1e-30)))
    parts = {"token_entropy": token_entropy, "batch_entropy": batch_entropy}
    return token_entropy - batch_entropy, parts


# ---------------------------------------------------------------------------------------------
# Adversarial losses.


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ConfigError(
            f"unknown GAN loss kind {kind!r}; expected one of {', '.join(GAN_LOSS_KINDS)}"
        )


def discriminator_loss(
    real_logits: jax.Array, fake_logits: jax.Array, kind: str = "non_saturating"
) -> jax.Array:
    """The discriminator's loss on real and generated logits.

    non_saturating: mean(softplus(-real)) + mean(softplus(fake)), i.e. the logistic loss.
    hinge: mean(relu(1 - real)) + mean(relu(1 + fake)).
    """
    _check_kind(kind)
    real, fake = _float(real_logits), _float(fake_logits)
    if kind == "hinge":
        return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def generator_adversarial_loss(fake_logits: jax.Array, kind: str = "non_saturating") -> jax.Array:
    """The generator's adversarial loss on the discriminator's logits of its outputs.

    non_saturating: mean(softplus(-fake)) = -mean(log sigmoid(fake)).
    hinge: -mean(fake) (the usual hinge-GAN generator loss).
    """
    _check_kind(kind)
    fake = _float(fake_logits)
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


# ---------------------------------------------------------------------------------------------
# Discriminator regularizers.


def r1_penalty(
    disc_apply_fn: Callable[[jax.Array], jax.Array], real_images: jax.Array
) -> jax.Array:
    """R1 gradient penalty (Mescheder et al. 2018): mean over the batch of ||dD(x)/dx||^2.

    The gradient is that of the sum of the logits with respect to the images, as in
    StyleGAN2; with a minibatch-stddev layer it therefore includes the (small) influence of
    each image on the other logits of its group. The squared norm is summed over the pixels
    of each image. The caller scales it by gamma / 2 (and by the interval when it is applied
    lazily every N steps). Differentiable with respect to the discriminator's parameters
    when `disc_apply_fn` closes over them.

    Args:
      disc_apply_fn: images [batch, ...] -> logits [batch].
      real_images: [batch, height, width, channels].
    """
    images = _float(real_images)
    grads = jax.grad(lambda x: jnp.sum(_float(disc_apply_fn(x))))(images)
    grads = _float(grads)
    per_image = jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1)
    return jnp.mean(per_image)


def lecam_penalty(
    real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array, ema_fake: jax.Array
) -> jax.Array:
    """LeCam regularizer (Tseng et al. 2021) for the discriminator.

    mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2), where ema_real / ema_fake
    are running means of the discriminator's real / fake logits (`update_lecam_ema`). It pulls
    real logits down towards the fake anchor and fake logits up towards the real one, which
    keeps the discriminator from becoming over-confident on small data. The anchors carry no
    gradient.
    """
    real, fake = _float(real_logits), _float(fake_logits)
    ema_real = jax.lax.stop_gradient(_float(ema_real))
    ema_fake = jax.lax.stop_gradient(_float(ema_fake))
    return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(
        jnp.square(jax.nn.relu(ema_real - fake))
    )


def update_lecam_ema(ema: jax.Array, value: jax.Array, decay: float = 0.99) -> jax.Array:
    """decay * ema + (1 - decay) * mean(value); `value` may be a batch of logits."""
    value = jax.lax.stop_gradient(jnp.mean(_float(value)))
    return decay * _float(ema) + (1.0 - decay) * value
