"""Evaluation: reconstruction metrics, codebook usage, FID/IS (fid.py) and a tokenizer's
evaluation over a dataset (tokenizer_eval.py; CLI: python -m vitvq.evaluate)."""

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
