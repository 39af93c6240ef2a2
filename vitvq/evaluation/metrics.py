"""Per-example image reconstruction metrics, in pure jnp, for use inside a jitted eval step.

Every function takes two batches of images `x, y` of shape [B, H, W, C] (NHWC, values in
[0, data_range]) and returns one float32 value per example, shape [B], so that padded
examples can be masked out on the host (see `vitvq.evaluation.reconstruction`).

Clipping reconstructions to the valid range (e.g. `jnp.clip(recon, 0.0, 1.0)`) is the
caller's job: these functions measure exactly the arrays they are given.

SSIM follows Wang et al. 2004 as implemented by scikit-image, and matches
`skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1.0,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` per example.
"""

import jax
import jax.numpy as jnp

from vitvq.errors import InputError

# PSNR of a perfect reconstruction would be infinite; flooring the MSE at this fraction of
# data_range**2 caps it at 100 dB so that averages stay finite.
PSNR_MAX_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_MAX_DB / 10.0)

# SSIM constants of Wang et al. 2004 (and scikit-image's defaults with gaussian_weights=True).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius in sigmas, as scipy.ndimage: 11 taps for sigma 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array, min_ndim: int = 2) -> None:
    if x.shape != y.shape:
        raise InputError(f"images must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim < min_ndim:
        raise InputError(f"expected a batch of images [B, ...], got shape {x.shape}")


def _per_example_mean(v: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(v.reshape(v.shape[0], -1), axis=-1)


def l1_error(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example mean absolute error: [B, ...] x 2 -> [B] float32."""
    _check_pair(x, y)
    return _per_example_mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def l2_error(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example mean squared error (MSE): [B, ...] x 2 -> [B] float32."""
    _check_pair(x, y)
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    return _per_example_mean(diff * diff)


def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-example peak signal-to-noise ratio in dB: [B, ...] x 2 -> [B] float32.

    PSNR = 10 log10(data_range^2 / MSE) with the MSE of each example over all its pixels and
    channels. Identical images give `PSNR_MAX_DB` (100 dB) instead of infinity. Clip the
    inputs to [0, data_range] first if they may leave it.
    """
    mse = l2_error(x, y)
    peak = float(data_range) ** 2
    mse = jnp.maximum(mse, peak * _MSE_FLOOR)
    return 10.0 * jnp.log10(peak / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> jax.Array:
    """Normalized 1-d Gaussian taps, radius int(truncate * sigma + 0.5) as scipy.ndimage."""
    radius = int(truncate * sigma + 0.5)
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / jnp.sum(taps)


def _depthwise_blur(maps: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable Gaussian filter of each channel of [B, H, W, C], 'valid' (no padding).

    The output is [B, H - 2r, W - 2r, C]: exactly the pixels scikit-image keeps after it
    crops the filter radius from every border, so its boundary mode never matters.
    """
    channels = maps.shape[-1]
    win = taps.shape[0]
    dims = ("NHWC", "HWIO", "NHWC")
    # Depthwise: one filter per channel (feature_group_count = channels), kernel HWIO with I=1.
    kernel_h = jnp.broadcast_to(taps.reshape(win, 1, 1, 1), (win, 1, 1, channels))
    kernel_w = jnp.broadcast_to(taps.reshape(1, win, 1, 1), (1, win, 1, channels))
    for kernel in (kernel_h, kernel_w):
        maps = jax.lax.conv_general_dilated(
            maps,
            kernel,
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=dims,
            feature_group_count=channels,
            # Keep full float32 on accelerators (default precision may use bf16 / tf32 passes).
            precision=jax.lax.Precision.HIGHEST,
        )
    return maps


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-example mean structural similarity: [B, H, W, C] x 2 -> [B] float32.

    Gaussian window (sigma 1.5, 11 taps), K1 = 0.01, K2 = 0.03, population covariances; the
    SSIM map is averaged over the pixels at least the window radius (5) away from every
    border and over channels, as scikit-image does. H and W must be at least 11 (the window
    size), like scikit-image; 16x16 images keep a 6x6 map per channel.
    """
    _check_pair(x, y, min_ndim=4)
    if x.ndim != 4:
        raise InputError(f"ssim expects NHWC images [B, H, W, C], got shape {x.shape}")
    taps = gaussian_window()
    win = taps.shape[0]
    if min(x.shape[1], x.shape[2]) < win:
        raise InputError(
            f"ssim needs images at least {win}x{win} (the Gaussian window), got "
            f"{x.shape[1]}x{x.shape[2]}"
        )
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    # Second moments are taken about each image's per-channel mean: variances are shift
    # invariant, and centring avoids float32 cancellation in E[x^2] - E[x]^2.
    x_mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    y_mean = jnp.mean(y, axis=(1, 2), keepdims=True)
    xc = x - x_mean
    yc = y - y_mean
    stacked = jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=-1)
    blurred = _depthwise_blur(stacked, taps)
    mu_xc, mu_yc, e_xx, e_yy, e_xy = jnp.split(blurred, 5, axis=-1)
    var_x = e_xx - mu_xc * mu_xc
    var_y = e_yy - mu_yc * mu_yc
    cov_xy = e_xy - mu_xc * mu_yc
    mu_x = mu_xc + x_mean
    mu_y = mu_yc + y_mean

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    ssim_map = numerator / denominator  # [B, H - 10, W - 10, C]
    return _per_example_mean(ssim_map)


def reconstruction_metrics(
    images: jax.Array, reconstructions: jax.Array, data_range: float = 1.0
) -> dict[str, jax.Array]:
    """psnr, ssim, l1 and l2 of each example ([B] float32 each) for NHWC image batches.

    Clips `reconstructions` to [0, data_range] first, since that is what would be shown.
    """
    reconstructions = jnp.clip(reconstructions.astype(jnp.float32), 0.0, data_range)
    return {
        "psnr": psnr(images, reconstructions, data_range),
        "ssim": ssim(images, reconstructions, data_range),
        "l1": l1_error(images, reconstructions),
        "l2": l2_error(images, reconstructions),
    }


__all__ = [
    "PSNR_MAX_DB",
    "gaussian_window",
    "l1_error",
    "l2_error",
    "psnr",
    "reconstruction_metrics",
    "ssim",
]
