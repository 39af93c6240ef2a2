"""Codebook initialization from encoder outputs: k-means++ seeding, then Lloyd iterations.

Why (BENCHMARKS.md, "Codebook collapse"): a freshly initialized ViT encoder maps real image
patches into a narrow cone of the code space (effective rank ~5-10 of 32 dimensions), so a
codebook drawn from a normal distribution has only a few hundred of its 8192 codes near any
latent. The VQ loss then dominates the first steps and the encoder collapses onto a handful of
codes. Codes placed on the encoder's own outputs start where the latents are.

Everything is jit-able and runs on sharded latents (the search is `nearest_code`'s chunked
one; sums and counts are scatter-adds that XLA reduces across devices). With
`spherical=True` (l2-normalized codes) centers are renormalized after each update, i.e.
spherical k-means; otherwise plain Euclidean k-means.

When there are fewer latents N than codes K (small batches on one machine; a pod's first batch
has far more), the first N codes are the latents in k-means++ order and the other K - N are
latents drawn at random plus Gaussian noise of a tenth of the latents' spread per dimension,
so that no two codes coincide.
"""

import jax
import jax.numpy as jnp

from vitvq.models.quantizer import l2_normalize, nearest_code

# config.codebook_init.kind: "kmeans" (this module, the default) or "normal" (the paper's).
CODEBOOK_INITS = ("kmeans", "normal")
JITTER = 0.1  # noise of the extra codes (N < K), relative to the latents' per-dimension std


def kmeans_plus_plus(x: jax.Array, num: int, rng: jax.Array) -> jax.Array:
    """`num` rows of x [N, D] chosen by k-means++ (D^2 sampling); num <= N."""
    keys = jax.random.split(rng, num)
    first = jax.random.randint(keys[0], (), 0, x.shape[0])
    centers = jnp.zeros((num, x.shape[1]), x.dtype).at[0].set(x[first])
    dist2 = jnp.sum((x - x[first]) ** 2, axis=-1)

    def body(i, carry):
        centers, dist2 = carry
        # Gumbel-max sampling proportional to dist2; rows already chosen (dist2 = 0) only
        # come back when every row is at distance 0 (duplicated latents).
        logits = jnp.log(jnp.maximum(dist2, 1e-30))
        pick = jax.random.categorical(keys[i], logits)
        center = x[pick]
        dist2 = jnp.minimum(dist2, jnp.sum((x - center) ** 2, axis=-1))
        return centers.at[i].set(center), dist2

    centers, _ = jax.lax.fori_loop(1, num, body, (centers, dist2))
    return centers


def lloyd_step(x: jax.Array, centers: jax.Array, spherical: bool, chunk_size: int) -> jax.Array:
    """One k-means update: every center moves to the mean of the rows nearest to it (and
    back onto the sphere when `spherical`); a center no row picked stays where it is."""
    idx = nearest_code(x, centers, chunk_size, euclidean=not spherical)
    sums = jnp.zeros_like(centers).at[idx].add(x)
    counts = jnp.zeros((centers.shape[0],), x.dtype).at[idx].add(1.0)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
        means = l2_normalize(means)
    return jnp.where(counts[:, None] > 0, means, centers)


def kmeans_codebook(
    latents: jax.Array,
    num_codes: int,
    rng: jax.Array,
    *,
    iterations: int = 10,
    spherical: bool = True,
    chunk_size: int = 1024,
) -> jax.Array:
    """A [num_codes, D] float32 codebook fitted to `latents` [..., D] (see the module doc).

    With `spherical`, the latents are expected unit-norm (the quantizer's normalized
    outputs) and so are the returned codes.
    """
    x = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    n = x.shape[0]
    k_seed, k_pick, k_noise = jax.random.split(rng, 3)
    seeded = min(n, num_codes)
    centers = kmeans_plus_plus(x, seeded, k_seed)
    if seeded < num_codes:
        extra = num_codes - seeded
        picks = jax.random.randint(k_pick, (extra,), 0, n)
        scale = JITTER * jnp.sqrt(jnp.mean(jnp.var(x, axis=0)))
        noise = scale * jax.random.normal(k_noise, (extra, x.shape[1]), jnp.float32)
        centers = jnp.concatenate([centers, x[picks] + noise], axis=0)
    if spherical:
        centers = l2_normalize(centers)
    # One traced copy of the step, not `iterations`: the fit is compiled into every train step.
    return jax.lax.fori_loop(
        0, iterations, lambda _, c: lloyd_step(x, c, spherical, chunk_size), centers
    )
