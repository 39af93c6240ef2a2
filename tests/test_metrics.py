"""Tests of vitvq.evaluation: per-example metrics against NumPy / scikit-image, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from vitvq.errors import InputError
from vitvq.evaluation import (
    PSNR_MAX_DB,
    ReconstructionAccumulator,
    l1_error,
    l2_error,
    masked_code_counts,
    psnr,
    reconstruction_metrics,
    ssim,
)

ssim_jit = jax.jit(ssim)
psnr_jit = jax.jit(psnr)


def skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """scikit-image's Gaussian-window SSIM (Wang et al. 2004) in float64: the reference."""
    return structural_similarity(
        a.astype(np.float64),
        b.astype(np.float64),
        channel_axis=-1,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )


def photo_pairs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of three real photos, each paired with a noisy, a blurred and an exact copy."""
    rng = np.random.default_rng(size)
    clean, distorted = [], []
    for photo, (top, left) in (
        (skimage.data.astronaut(), (60, 180)),
        (skimage.data.chelsea(), (90, 150)),
        (skimage.data.coffee(), (120, 260)),
    ):
        crop = (photo[top : top + size, left : left + size] / 255.0).astype(np.float32)
        noisy = np.clip(crop + rng.normal(0.0, 0.1, crop.shape), 0.0, 1.0).astype(np.float32)
        blurred = gaussian_filter(crop, sigma=(1.0, 1.0, 0.0)).astype(np.float32)
        for other in (noisy, blurred, crop):
            clean.append(crop)
            distorted.append(other)
    return np.stack(clean), np.stack(distorted)


def test_psnr_and_errors_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0.0, 0.05, x.shape), 0.0, 1.0).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mse = ((x64 - y64) ** 2).reshape(4, -1).mean(-1)
    np.testing.assert_allclose(psnr_jit(x, y), 10 * np.log10(1.0 / mse), rtol=1e-5)
    np.testing.assert_allclose(psnr(x * 255, y * 255, 255.0), 10 * np.log10(1.0 / mse), rtol=1e-4)
    np.testing.assert_allclose(l2_error(x, y), mse, rtol=1e-5)
    l1 = np.abs(x64 - y64).reshape(4, -1).mean(-1)
    np.testing.assert_allclose(l1_error(x, y), l1, rtol=1e-5)
    assert psnr(x, y).dtype == jnp.float32 and psnr(x, y).shape == (4,)


def test_psnr_of_identical_images_is_finite_cap():
    x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(psnr_jit(x, x), [PSNR_MAX_DB, PSNR_MAX_DB], rtol=1e-5)
    np.testing.assert_array_equal(l1_error(x, x), [0.0, 0.0])


@pytest.mark.parametrize("size", [64, 32, 16])
def test_ssim_matches_skimage_on_real_photos(size):
    clean, distorted = photo_pairs(size)
    ours = np.asarray(ssim_jit(clean, distorted))
    reference = [skimage_ssim(a, b) for a, b in zip(clean, distorted, strict=True)]
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    # Exact copies (every third pair) score 1; noise and blur score clearly less.
    np.testing.assert_allclose(ours[2::3], 1.0, atol=1e-6)
    assert np.all(ours[0::3] < 0.9) and np.all(ours[1::3] < 0.999)


def test_metrics_are_per_example():
    clean, distorted = photo_pairs(32)
    # Astronaut vs its blurred copy; chelsea vs its noisy copy.
    x, y = clean[[1, 3]], distorted[[1, 3]]
    together = reconstruction_metrics(x, y)
    for name, values in together.items():
        alone = [float(reconstruction_metrics(x[i : i + 1], y[i : i + 1])[name][0]) for i in (0, 1)]
        np.testing.assert_allclose(values, alone, rtol=1e-5, err_msg=name)
    assert abs(float(together["ssim"][0]) - float(together["ssim"][1])) > 0.05


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(InputError, match="11x11"):
        ssim(jnp.zeros((1, 10, 16, 3)), jnp.zeros((1, 10, 16, 3)))
    with pytest.raises(InputError, match="same shape"):
        ssim(jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 1)))


def test_metrics_under_jit_with_batch_sharded_over_devices():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(jax.device_count(), 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0.0, 0.1, x.shape), 0.0, 1.0).astype(np.float32)
    step = jax.jit(reconstruction_metrics, out_shardings=sharding)
    out = step(jax.device_put(x, sharding), jax.device_put(y, sharding))
    reference = [skimage_ssim(a, b) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(out["ssim"], reference, atol=1e-4)


def test_masked_code_counts_ignores_padded_examples():
    indices = jnp.array(
        [[[0, 1], [1, 2]], [[3, 3], [3, 3]], [[2, 2], [0, 5]]], dtype=jnp.int32
    )  # [B=3, h=2, w=2]
    counts = jax.jit(masked_code_counts, static_argnums=2)(indices, jnp.array([1, 0, 1]), 6)
    np.testing.assert_array_equal(counts, [2, 2, 3, 0, 0, 1])
    bool_counts = masked_code_counts(indices, jnp.array([False, True, False]), 6)
    np.testing.assert_array_equal(bool_counts, [0, 0, 0, 4, 0, 0])
    with pytest.raises(InputError, match="mask"):
        masked_code_counts(indices, jnp.ones((2,)), 6)


def test_accumulator_masked_means_match_numpy():
    rng = np.random.default_rng(3)
    acc = ReconstructionAccumulator(codebook_size=8)
    all_values, all_masks = [], []
    for batch in range(3):
        values = {k: rng.normal(size=4) for k in ("psnr", "ssim", "lpips", "l1", "l2")}
        mask = np.array([1, 1, 1, 0]) if batch == 2 else np.ones(4)
        values["psnr"][3] = -1e6  # a padded example's garbage must not reach psnr_min
        acc.update(values, mask, np.ones(8))
        all_values.append(values)
        all_masks.append(mask)
    acc.update({k: np.full(4, 1e9) for k in all_values[0]}, np.zeros(4), np.zeros(8))
    result = acc.result()
    mask = np.concatenate(all_masks) > 0
    for name in ("psnr", "ssim", "lpips", "l1", "l2"):
        expected = np.concatenate([v[name] for v in all_values])[mask].mean()
        np.testing.assert_allclose(result[name], expected, rtol=1e-12, err_msg=name)
    psnr_all = np.concatenate([v["psnr"] for v in all_values])
    assert result["psnr_min"] == psnr_all[mask].min()
    assert acc.num_examples == 11
    assert result["batch_codebook_usage"] == 1.0  # the all-padded batch is not a batch


def test_accumulator_codebook_usage_over_set_and_per_batch():
    size = 8
    acc = ReconstructionAccumulator(codebook_size=size)
    # Batch 1 uses codes {0, 1} (the padded example's code 7 must not count); batch 2 uses
    # {1, 2, 3, 4}. Over the set: {0, 1, 2, 3, 4} = 5 of 8; per batch: mean(2/8, 4/8).
    batches = [
        (np.array([[0, 0], [1, 0], [7, 7]]), np.array([1, 1, 0])),
        (np.array([[1, 2], [3, 4], [4, 4]]), np.array([1, 1, 1])),
    ]
    for indices, mask in batches:
        counts = np.asarray(masked_code_counts(jnp.asarray(indices), jnp.asarray(mask), size))
        acc.update({"psnr": np.zeros(len(mask))}, mask, counts)
    result = acc.result()
    assert result["codes_used"] == 5
    assert result["codebook_usage"] == 5 / 8
    assert result["batch_codebook_usage"] == pytest.approx((2 / 8 + 4 / 8) / 2)
    tokens = np.array([0, 0, 1, 0, 1, 2, 3, 4, 4, 4])
    probs = np.bincount(tokens, minlength=size) / tokens.size
    probs = probs[probs > 0]
    assert result["perplexity"] == pytest.approx(np.exp(-np.sum(probs * np.log(probs))))
    np.testing.assert_array_equal(acc.code_counts, np.bincount(tokens, minlength=size))
    # An explicit per-batch figure (e.g. from 256-image batches) overrides the counts'.
    acc.update({"psnr": np.zeros(1)}, np.ones(1), np.zeros(size), batch_codes_used=8)
    assert acc.result()["batch_codebook_usage"] == pytest.approx((2 / 8 + 4 / 8 + 1) / 3)


def test_accumulator_rejects_mismatched_shapes():
    acc = ReconstructionAccumulator(codebook_size=4)
    with pytest.raises(InputError, match="one per code"):
        acc.update({"psnr": np.zeros(2)}, np.ones(2), np.zeros(5))
    with pytest.raises(InputError, match="one value per example"):
        acc.update({"psnr": np.zeros(3)}, np.ones(2), np.zeros(4))
