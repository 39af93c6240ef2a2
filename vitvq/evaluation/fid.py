"""Frechet Inception Distance and Inception Score, with InceptionV3 weights the user supplies.

The network is the FID InceptionV3 (`vitvq.models.inception`); its weights are never
downloaded: the user converts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` once with
`scripts/convert_inception_weights.py` and passes the resulting safetensors file. Without a
file, callers skip FID/IS and print `FID_WEIGHTS_HELP`; nothing is estimated some other way.

    features = load_inception("inception_fid.safetensors")
    real, fake = FeatureStats(), FeatureStats()
    for batch in ...: real.update(features(batch)["pool"])   # uint8 or [0, 1] NHWC images
    fid = frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)

All statistics are float64 NumPy/SciPy.
"""

import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import scipy.linalg
import scipy.special

from vitvq import errors
from vitvq.models import inception

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
_CONVERT_HOWTO = (
    f"download pytorch-fid's FID Inception weights ({FID_WEIGHTS_URL}) and convert them with "
    "`python scripts/convert_inception_weights.py "
    "--input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.safetensors`"
)
FID_WEIGHTS_HELP = (
    "FID/IS skipped: no InceptionV3 weights given. Pass --inception_weights=FILE, where FILE "
    f"is the safetensors file of the FID InceptionV3; to make it, {_CONVERT_HOWTO}."
)

# --------------------------------------------------------------------------------------------
# Statistics.


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # singular inputs warn; the caller checks the result
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(matrix)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). When the product is
    singular (sqrtm gives non-finite values), `eps * I` is added to both covariances and the
    root recomputed. A negligible imaginary part of the root is dropped; a large one raises
    `InputError` (the covariances are not positive semi-definite).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise errors.InputError(
            f"frechet_distance needs two means of shape [D] and covariances of shape [D, D]; "
            f"got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}."
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise errors.InputError("frechet_distance got non-finite means or covariances.")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise errors.InputError(
                "frechet_distance: the matrix square root of sigma1 @ sigma2 is not finite even "
                f"after adding {eps} * I to both covariances."
            )
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise errors.InputError(
                f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary part of {imag:.3g}; "
                "the covariances are not positive semi-definite."
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming float64 mean and covariance of [N, D] features, over batches of any size.

    Keeps the count, the mean and the sum of centered outer products, merging each batch in
    (Chan et al.'s pairwise update), which is exact and avoids the cancellation of
    E[x x^T] - mu mu^T. `covariance` is the unbiased (ddof=1) estimate, as np.cov.
    """

    def __init__(self):
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> "FeatureStats":
        """Adds a [N, D] batch (any array type); returns self."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or (self._mean is not None and x.shape[1] != self._mean.shape[0]):
            expected = "[N, D]" if self._mean is None else f"[N, {self._mean.shape[0]}]"
            raise errors.InputError(
                f"FeatureStats.update needs {expected} features, got {x.shape}."
            )
        if x.shape[0] == 0:
            return self
        mean = x.mean(axis=0)
        centered = x - mean
        self._merge(x.shape[0], mean, centered.T @ centered)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds another accumulator's features (e.g. from another host); returns self."""
        if other.count:
            self._merge(other.count, other._mean, other._scatter)
        return self

    def _merge(self, n: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if self._mean is None:
            self.count, self._mean, self._scatter = n, mean.copy(), scatter.copy()
            return
        if mean.shape != self._mean.shape:
            raise errors.InputError(
                f"FeatureStats: cannot merge {mean.shape[0]}-d features into "
                f"{self._mean.shape[0]}-d ones."
            )
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise errors.InputError("FeatureStats has no features yet.")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise errors.InputError(
                f"FeatureStats needs at least 2 features for a covariance, has {self.count}."
            )
        return self._scatter / (self.count - 1)


def fid_from_features(features_a, features_b) -> float:
    """Frechet distance between the Gaussians fitted to two [N, D] feature sets."""
    a, b = FeatureStats().update(features_a), FeatureStats().update(features_b)
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def inception_score(
    logits_or_probs, splits: int = 10, from_logits: bool | None = None
) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` chunks) of [N, K] class logits or probabilities.

    IS = exp(E_x KL(p(y|x) || p(y))), p(y) the chunk's mean prediction, in float64. With
    `from_logits=None` the input counts as probabilities when it is non-negative and its rows
    sum to 1, else as logits (softmax applied).
    """
    x = np.asarray(logits_or_probs, np.float64)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise errors.InputError(
            f"inception_score needs [N, K] predictions with N >= splits >= 1; got shape "
            f"{x.shape} and splits={splits}."
        )
    if from_logits is None:
        from_logits = not (x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))
    probs = scipy.special.softmax(x, axis=1) if from_logits else x / x.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# The network.


@jax.jit
def _apply_inception(params, images: jax.Array) -> dict[str, jax.Array]:
    return inception.InceptionV3().apply({"params": params}, images)


def load_inception_params(path: str | os.PathLike) -> inception.Params:
    """The nested float32 params of the FID InceptionV3 from a converted safetensors file.

    Raises `BundleError` when the file is missing (saying how to make it), unreadable, or
    lacks/misshapes tensors (naming the first few with their expected shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise errors.BundleError(
            f"InceptionV3 weights file {path} does not exist: {_CONVERT_HOWTO}."
        )
    try:
        flat = safetensors.numpy.load_file(path)
    except Exception as e:  # safetensors raises its own error types
        raise errors.BundleError(
            f"cannot read the InceptionV3 weights {path} as safetensors ({e}); expected the "
            f"output of scripts/convert_inception_weights.py: {_CONVERT_HOWTO}."
        ) from e
    inception.check_param_shapes(
        {k: v.shape for k, v in flat.items()}, inception.flax_param_shapes(), path
    )
    bad = [k for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise errors.BundleError(
            f"{path}: InceptionV3 weights must be floating point; {bad[0]} is {flat[bad[0]].dtype}."
        )
    return inception.unflatten_params({k: v.astype(np.float32) for k, v in flat.items()})


def load_inception(path: str | os.PathLike) -> Callable[..., dict[str, jax.Array]]:
    """A jitted `features(images)` of the FID InceptionV3 with the weights in `path`.

    `images`: [B, H, W, 3] uint8, or floats in [0, 1]; any H, W (resized to 299x299 bilinearly
    and scaled to [-1, 1] inside). Returns {"pool": [B, 2048], "logits": [B, 1008]} float32.
    Raises `BundleError` for a missing or wrong weights file (see `load_inception_params`).
    """
    params = jax.device_put(load_inception_params(path))

    def features(images) -> dict[str, jax.Array]:
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise errors.InputError(
                f"Inception features need [B, H, W, 3] images, got {images.shape}."
            )
        if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
            raise errors.InputError(
                f"Inception features need uint8 or float [0, 1] images, got {images.dtype}."
            )
        return _apply_inception(params, images)

    return features
