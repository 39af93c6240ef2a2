"""k-means codebook initialization (vitvq/models/kmeans.py) against float64 NumPy, on
separated clusters, with fewer latents than codes, and sharded over 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from vitvq.models.kmeans import kmeans_codebook, kmeans_plus_plus, lloyd_step


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(num: int, per: int, dim: int, seed: int = 0, noise: float = 0.02):
    """`num` random unit centers and `per` unit points around each: ([num*per, dim], centers)."""
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(num, dim)))
    points = np.repeat(centers, per, axis=0) + noise * rng.normal(size=(num * per, dim))
    return unit(points).astype(np.float32), centers


def test_kmeans_plus_plus_picks_distinct_rows_of_the_data():
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    centers = np.asarray(kmeans_plus_plus(jnp.asarray(x), 50, jax.random.key(0)))
    rows = {tuple(r) for r in x}
    assert all(tuple(c) in rows for c in centers)
    assert len({tuple(c) for c in centers}) == 50


@pytest.mark.parametrize("spherical", [True, False])
def test_lloyd_step_matches_float64_numpy(spherical):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) + np.eye(8)[0] * 3.0  # around +e0
    centers = rng.normal(size=(40, 8))
    centers[-3:] -= np.eye(8)[0] * 30.0  # far from every point: no member
    if spherical:
        x, centers = unit(x), unit(centers)
    got = np.asarray(
        lloyd_step(jnp.asarray(x, jnp.float32), jnp.asarray(centers, jnp.float32), spherical, 16)
    )
    # Brute force in float64: nearest center by cosine (spherical) or Euclidean distance.
    if spherical:
        assign = np.argmax(x @ centers.T, axis=1)
    else:
        assign = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    want = centers.copy()
    for k in range(len(centers)):
        members = x[assign == k]
        if len(members):
            want[k] = unit(members.mean(0)) if spherical else members.mean(0)
    assert (np.bincount(assign, minlength=40)[-3:] == 0).all()  # empty centers stay put
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_finds_every_separated_cluster_and_is_deterministic():
    x, centers = clusters(16, 40, 32)
    fit = lambda key: np.asarray(kmeans_codebook(jnp.asarray(x), 16, key, iterations=5))  # noqa: E731
    codes = fit(jax.random.key(3))
    np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-5)
    # Every true center has a code within a few degrees, and every code serves one center.
    similarity = centers @ codes.T
    assert similarity.max(axis=1).min() > 0.99
    assert len(set(similarity.argmax(axis=0))) == 16
    np.testing.assert_array_equal(codes, fit(jax.random.key(3)))
    assert not np.array_equal(codes, fit(jax.random.key(4)))


def test_fewer_latents_than_codes_gives_distinct_codes_near_the_latents():
    x, _ = clusters(4, 10, 16, seed=5, noise=0.3)  # 40 latents, 128 codes
    codes = np.asarray(kmeans_codebook(jnp.asarray(x), 128, jax.random.key(0)))
    assert codes.shape == (128, 16)
    np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-5)
    gaps = np.linalg.norm(codes[:, None] - codes[None], axis=-1) + np.eye(128) * 9
    assert gaps.min() > 1e-3  # no two codes coincide
    # Each latent has a code on it, and the extra codes lie near the latents too.
    assert (x @ codes.T).max(axis=1).min() > 0.999
    assert (codes @ x.T).max(axis=1).min() > 0.9


def test_euclidean_codes_are_not_normalized():
    x, _ = clusters(8, 20, 8, seed=6)
    x = 3.0 * x
    codes = np.asarray(kmeans_codebook(jnp.asarray(x), 8, jax.random.key(0), spherical=False))
    np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 3.0, rtol=0.01)


def test_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() == 8
    x, _ = clusters(32, 16, 32, seed=7, noise=0.05)  # 512 latents, 64 codes (two per cluster)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))
    fit = jax.jit(lambda z: kmeans_codebook(z, 64, jax.random.key(1), chunk_size=16))
    on_one = np.asarray(fit(jax.device_put(x, jax.devices()[0])))
    on_eight = fit(sharded)
    assert len(on_eight.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(on_eight), on_one, atol=1e-5)
