"""Tests for the StyleGAN2-style discriminator and the R1 penalty on it."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from vitvq import losses
from vitvq.errors import InputError
from vitvq.models import axes
from vitvq.models.discriminator import (
    Discriminator,
    blur,
    discriminator_channels,
    minibatch_stddev,
)

SMALL = dict(base_channels=8, max_channels=32)


@functools.cache
def _init(image_size: int, **kwargs):
    model = Discriminator(image_size, **{**SMALL, **kwargs})
    # Jitted: an eager init dispatches (and compiles) every op one by one, which is slow.
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    return model, variables


def _images(batch, size, seed=0, dtype=jnp.float32):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), dtype)


def test_discriminator_channels():
    assert discriminator_channels(256) == (64, 128, 256, 512, 512, 512, 512)
    assert discriminator_channels(8, 16, 512) == (16, 32)
    assert discriminator_channels(32, 8, 32, channel_multiplier=2) == (16, 32, 32, 32)


@pytest.mark.parametrize("image_size", [32, 64])
def test_logits_shape_and_dtype(image_size):
    model, variables = _init(image_size)
    apply = jax.jit(model.apply)
    for batch in (1, 3, 4):
        logits = apply(variables, _images(batch, image_size))
        assert logits.shape == (batch,)
        assert logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))


def test_bfloat16_compute_gives_float32_logits():
    model, variables = _init(32)
    images = _images(4, 32)
    want = jax.jit(model.apply)(variables, images)
    got = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, images)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=0.05 + 0.05 * float(jnp.max(jnp.abs(want))))


def test_gradients_finite():
    model, variables = _init(32)
    images = _images(3, 32)

    def loss(params, x):
        logits = model.apply({"params": params}, x)
        return losses.discriminator_loss(logits, -logits)

    g_params, g_images = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], images)
    leaves = jax.tree_util.tree_leaves(g_params)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(np.any(leaf != 0) for leaf in leaves)
    assert np.all(np.isfinite(g_images)) and np.any(g_images != 0)


def test_parameters_carry_logical_axes():
    _, variables = _init(32)
    boxes = jax.tree_util.tree_leaves(
        variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
    )
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    specs = nn.get_partition_spec(variables)["params"]
    conv_axes = (axes.NONE, axes.NONE, axes.CONV_IN, axes.CONV_OUT)
    assert specs["block0"]["conv1"]["kernel"] == PartitionSpec(*conv_axes)
    assert specs["block1"]["skip"]["kernel"] == PartitionSpec(*conv_axes)
    assert specs["block0"]["conv2"]["bias"] == PartitionSpec(axes.CONV_OUT)
    assert specs["final_dense"]["kernel"] == PartitionSpec(axes.CONV_IN, axes.CONV_OUT)
    for path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    ):
        assert isinstance(spec, PartitionSpec), path


def test_sharded_init_and_apply_on_a_mesh():
    """Channel names mapped to a mesh axis of size 2 must split every named dimension evenly."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    rules = (("batch", "data"), ("conv_out", "tensor"), ("conv_in", None))
    model = Discriminator(16, **SMALL)
    images = _images(8, 16)
    init = lambda rng: model.init(rng, images)
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        logits = jax.jit(model.apply)(variables, images)
    kernel = variables["params"]["block0"]["conv2"]["kernel"].value
    assert kernel.sharding.spec == PartitionSpec(None, None, None, "tensor")
    unsharded = jax.jit(model.apply)(jax.device_get(variables), images)
    np.testing.assert_allclose(logits, unsharded, rtol=1e-4)


@pytest.mark.parametrize(
    "size, match", [(24, "24"), (4, "got 4"), (48, "48"), (32.0, "32.0"), (0, "got 0")]
)
def test_bad_image_size_raises(size, match):
    with pytest.raises(InputError, match=match):
        Discriminator(size, **SMALL).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((32, 32, 3), r"rank 3 shape \(32, 32, 3\)"),
        ((2, 32, 32, 1), "got 1"),
        ((2, 16, 16, 3), "image_size=32.*got 16x16"),
        ((2, 32, 16, 3), "got 32x16"),
    ],
)
def test_bad_images_raise(shape, match):
    model, variables = _init(32)
    with pytest.raises(InputError, match=match):
        model.apply(variables, jnp.zeros(shape))


def test_minibatch_stddev_matches_numpy_with_consecutive_groups():
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 8)).astype(np.float32)
    got = np.asarray(minibatch_stddev(jnp.asarray(x), group_size=4, num_features=2))
    assert got.shape == (6, 4, 4, 10)
    np.testing.assert_array_equal(got[..., :8], x)
    # Batch 6 with group size 4: the largest divisor is 3, groups {0,1,2} and {3,4,5}.
    for start in (0, 3):
        group = x[start : start + 3].astype(np.float64)
        for f in range(2):
            chans = group[..., 4 * f : 4 * (f + 1)]
            want = np.mean(np.sqrt(np.var(chans, axis=0) + 1e-8))
            np.testing.assert_allclose(got[start : start + 3, ..., 8 + f], want, rtol=1e-5)
    # A batch of 1 (or a prime batch above the group size) has groups of one: std = sqrt(1e-8).
    for batch in (1, 5):
        out = minibatch_stddev(jnp.asarray(x[:batch]), group_size=4, num_features=1)
        np.testing.assert_allclose(out[..., -1], 1e-4, rtol=1e-5)


def test_stddev_groups_couple_only_their_own_images():
    model, variables = _init(16, mbstd_group_size=2)
    images = _images(4, 16)
    changed = images.at[0].set(1.0 - images[0])
    apply = jax.jit(model.apply)
    diff = np.abs(apply(variables, changed) - apply(variables, images))
    assert diff[0] > 0 and diff[1] > 0  # image 0 and its group partner
    np.testing.assert_array_equal(diff[2:], 0.0)


def test_blur_is_normalized_and_sizes():
    x = jnp.ones((1, 8, 8, 5))
    y = blur(x, (2, 2))
    assert y.shape == (1, 9, 9, 5)
    np.testing.assert_allclose(y[:, 2:-2, 2:-2], 1.0, rtol=1e-6)  # away from the zero padding
    assert blur(x, (1, 1)).shape == (1, 7, 7, 5)


def test_r1_penalty_matches_finite_differences():
    with jax.enable_x64(True):
        size, batch = 8, 2
        model = Discriminator(
            size,
            base_channels=4,
            max_channels=8,
            mbstd_group_size=2,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float64)
        variables = jax.jit(model.init)(jax.random.key(0), images)
        d = lambda x: model.apply(variables, x)
        penalty = float(losses.r1_penalty(d, images))

        # Central differences of sum(D(x)) along every input value, all in one vmapped batch.
        h = 1e-5
        eye = jnp.eye(images.size, dtype=jnp.float64).reshape((-1,) + images.shape)
        total = jax.jit(jax.vmap(lambda x: jnp.sum(d(x))))
        grad_fd = (total(images + h * eye) - total(images - h * eye)) / (2 * h)
        grad_fd = grad_fd.reshape(batch, -1)
        want = float(np.mean(np.sum(np.square(grad_fd), axis=1)))
    assert penalty > 0
    np.testing.assert_allclose(penalty, want, rtol=1e-6)
