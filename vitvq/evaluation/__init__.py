"""Evaluation: reconstruction metrics and codebook usage (FID and linear probe to come)."""

from vitvq.evaluation.metrics import (
    PSNR_MAX_DB,
    gaussian_window,
    l1_error,
    l2_error,
    psnr,
    reconstruction_metrics,
    ssim,
)
from vitvq.evaluation.reconstruction import ReconstructionAccumulator, masked_code_counts

__all__ = [
    "PSNR_MAX_DB",
    "ReconstructionAccumulator",
    "gaussian_window",
    "l1_error",
    "l2_error",
    "masked_code_counts",
    "psnr",
    "reconstruction_metrics",
    "ssim",
]
