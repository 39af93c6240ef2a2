"""Accumulates reconstruction metrics and codebook usage over an evaluation set.

The jitted eval step computes per-example metrics ([B] arrays from
`vitvq.evaluation.metrics`, plus e.g. LPIPS) and per-code counts over the batch's real
examples (`masked_code_counts`). The host feeds them, with the batch's padding mask, to a
`ReconstructionAccumulator`; padded examples (mask 0), which exist so every host runs the
same number of batches, count nowhere.

Codebook usage is reported two ways:
  codebook_usage        share of the codebook used at least once over the whole eval set;
  batch_codebook_usage  share used within one batch, averaged over batches. This is the
                        ViT-VQGAN paper's definition, whose batches are 256 test images; the
                        figure grows with the batch size, so compare it only at equal batch
                        sizes (a short, padded last batch pulls it down slightly).
"""

import jax
import jax.numpy as jnp
import numpy as np

from vitvq.errors import InputError


def masked_code_counts(indices: jax.Array, mask: jax.Array, codebook_size: int) -> jax.Array:
    """How many tokens of the real examples pick each code: [codebook_size] float32.

    indices: [B, ...] code indices (e.g. [B, h, w] or [B, tokens]); mask: [B], 1 (or True)
    for real examples and 0 for padding. Each token adds its example's mask value to its
    code's count (a weighted scatter-add; no one-hot is built), so padded examples add 0.
    """
    if mask.ndim != 1 or mask.shape[0] != indices.shape[0]:
        raise InputError(
            f"mask must have shape [batch] = [{indices.shape[0]}], got {tuple(mask.shape)}"
        )
    weights = jnp.broadcast_to(
        mask.astype(jnp.float32).reshape((-1,) + (1,) * (indices.ndim - 1)), indices.shape
    )
    counts = jnp.zeros((codebook_size,), jnp.float32)
    return counts.at[indices.reshape(-1)].add(weights.reshape(-1))


class ReconstructionAccumulator:
    """Host-side running sums of per-example metrics and code counts over an eval set.

    Usage:
        acc = ReconstructionAccumulator(codebook_size)
        for each eval batch:
            acc.update({"psnr": psnr_b, "ssim": ssim_b, ...}, mask_b, counts_b)
        acc.result()  # {"psnr": ..., "psnr_min": ..., "codebook_usage": ..., ...}

    Sums are kept in float64 so long eval sets lose no precision.
    """

    def __init__(self, codebook_size: int):
        if codebook_size <= 0:
            raise InputError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._psnr_min = np.inf
        self._code_counts = np.zeros((self.codebook_size,), np.float64)
        self._batch_usage_sum = 0.0
        self._num_batches = 0

    def update(
        self,
        per_example: dict[str, np.ndarray],
        mask: np.ndarray,
        code_counts: np.ndarray,
        batch_codes_used: float | None = None,
    ) -> None:
        """Adds one batch.

        per_example: metric name -> [B] values; mask: [B], nonzero for real examples;
        code_counts: [codebook_size] token counts over the real examples only (see
        `masked_code_counts`); batch_codes_used: number of distinct codes used in this
        batch, by default `(code_counts > 0).sum()`. A batch with no real example changes
        nothing, not even the number of batches behind `batch_codebook_usage`.
        """
        mask = np.asarray(mask).astype(np.float64).reshape(-1)
        weight = mask > 0
        code_counts = np.asarray(code_counts, np.float64).reshape(-1)
        if code_counts.shape[0] != self.codebook_size:
            raise InputError(
                f"code_counts must have {self.codebook_size} entries (one per code), got "
                f"{code_counts.shape[0]}"
            )
        for name, values in per_example.items():
            values = np.asarray(values, np.float64).reshape(-1)
            if values.shape != mask.shape:
                raise InputError(
                    f"metric {name!r} has {values.shape[0]} values but the mask has "
                    f"{mask.shape[0]}: pass one value per example"
                )
        if not weight.any():
            return
        for name, values in per_example.items():
            values = np.asarray(values, np.float64).reshape(-1)[weight]
            self._sums[name] = self._sums.get(name, 0.0) + float(values.sum())
            self._counts[name] = self._counts.get(name, 0.0) + float(values.size)
            if name == "psnr":
                self._psnr_min = min(self._psnr_min, float(values.min()))
        self._code_counts += code_counts
        if batch_codes_used is None:
            batch_codes_used = float(np.count_nonzero(code_counts))
        self._batch_usage_sum += float(batch_codes_used) / self.codebook_size
        self._num_batches += 1

    def result(self) -> dict[str, float]:
        """Masked means of every metric seen, `psnr_min` and the codebook statistics.

        Keys: each per-example metric name (mean over real examples), `psnr_min` (if psnr
        was given), `codes_used`, `codebook_usage` (share of codes used over the whole set),
        `perplexity` (exp of the entropy of the set's code distribution) and
        `batch_codebook_usage` (mean per-batch share; NaN before any real example).
        """
        out = {name: self._sums[name] / self._counts[name] for name in self._sums}
        if np.isfinite(self._psnr_min):
            out["psnr_min"] = self._psnr_min
        counts = self._code_counts
        used = int(np.count_nonzero(counts))
        total = counts.sum()
        probs = counts[counts > 0] / total if total > 0 else np.zeros((0,))
        out["codes_used"] = float(used)
        out["codebook_usage"] = used / self.codebook_size
        out["perplexity"] = float(np.exp(-np.sum(probs * np.log(probs))))
        out["batch_codebook_usage"] = (
            self._batch_usage_sum / self._num_batches if self._num_batches else float("nan")
        )
        return out

    @property
    def num_examples(self) -> int:
        """Number of real (unmasked) examples seen so far, by the most-reported metric."""
        return int(max(self._counts.values(), default=0))

    @property
    def code_counts(self) -> np.ndarray:
        """Token counts per code over the whole set so far: [codebook_size] float64."""
        return self._code_counts.copy()
