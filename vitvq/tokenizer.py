"""The Tokenizer: a bundle's ViT-VQGAN for inference, images <-> codes on the local devices.

tok = vitvq.load_tokenizer("runs/demo/bundle")
codes = tok.encode(images)     # uint8 [B, H, W, 3] -> int32 [B, H/p, W/p]
images = tok.decode(codes)     # int32 [B, h, w]    -> uint8 [B, H, W, 3]
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vitvq.bundle import load_tokenizer_variables
from vitvq.errors import InputError
from vitvq.models.vitvqgan import check_indices


class Tokenizer:
    """A trained ViT-VQGAN for inference: images <-> codes on the local devices.

    `encode` and `decode` take any batch size: batches are padded to a bucket (the device
    count times a power of two, at most `max_batch`) and split into chunks beyond that, so
    only a few shapes are ever compiled. Work is split over all local devices (data
    parallel; the parameters are replicated).
    """

    def __init__(self, model, variables, manifest, *, devices=None, max_batch: int = 64):
        self.model = model
        self.manifest = manifest
        self._devices = list(devices or jax.local_devices())
        n = len(self._devices)
        self._mesh = jax.sharding.Mesh(np.array(self._devices), ("batch",))
        self._replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
        self._batched = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec("batch"))
        self.max_batch = max(n, -(-int(max_batch) // n) * n)
        self._variables = jax.device_put(variables, self._replicated)

        def encode(variables, images_uint8):
            x = images_uint8.astype(jnp.float32) / 255.0
            codes, _ = model.apply(variables, x, method=model.encode)
            return codes.astype(jnp.int32)

        def decode(variables, codes):
            images = model.apply(variables, codes, method=model.decode)
            return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)

        shardings = dict(
            in_shardings=(self._replicated, self._batched), out_shardings=self._batched
        )
        self._encode = jax.jit(encode, **shardings)
        self._decode = jax.jit(decode, **shardings)

    # --- properties ---
    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def grid_size(self) -> int:
        return int(self.model.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_size)

    @property
    def codebook_size(self) -> int:
        """How many codes there are (FSQ's prod(levels), LFQ's 2**bits)."""
        return int(self.model.num_codes)

    @property
    def quantizer_kind(self) -> str:
        return self.model.quantization.kind

    @property
    def step(self) -> int:
        return int(self.manifest["tokenizer"].get("step", 0))

    @property
    def num_classes(self) -> int:
        return int(self.manifest["classes"].get("num_classes", 0))

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest["classes"].get("names")

    @property
    def params(self):
        return self._variables["params"]

    @property
    def code_usage(self) -> np.ndarray | None:
        """The training run's EMA of per-code usage (tokens per step) at export time (None
        for FSQ and LFQ, which keep none)."""
        stats = self._variables.get("vq_stats")
        return np.asarray(stats["quantizer"]["usage"]) if stats else None

    # --- inference ---
    def _bucket(self, n: int) -> int:
        size = len(self._devices)
        while size < n and size < self.max_batch:
            size *= 2
        return min(size, self.max_batch)

    def _run(self, fn, x: np.ndarray, pad_value) -> np.ndarray:
        outputs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            size = self._bucket(len(chunk))
            if size > len(chunk):
                pad = np.full((size - len(chunk), *chunk.shape[1:]), pad_value, chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = fn(self._variables, jax.device_put(chunk, self._batched))
            outputs.append(np.asarray(jax.device_get(out))[: min(self.max_batch, len(x) - start)])
        return np.concatenate(outputs)

    def encode(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] (H = W = image_size) -> int32 codes [B, grid, grid].

        Float images in [0, 1] are accepted too (rounded to uint8 first, so encode(x) and
        encode of the same picture saved as 8-bit agree).
        """
        x = np.asarray(images)
        size = self.image_size
        if x.ndim != 4 or x.shape[1:] != (size, size, 3):
            raise InputError(
                f"images must be [batch, {size}, {size}, 3] for this tokenizer, got shape "
                f"{x.shape}; resize or crop them first (python -m vitvq.reconstruct does)."
            )
        if np.issubdtype(x.dtype, np.floating):
            if x.size and (np.nanmin(x) < 0.0 or np.nanmax(x) > 1.0 or np.isnan(x).any()):
                raise InputError("float images must be in [0, 1] (or pass uint8 in [0, 255])")
            x = np.round(x * 255.0).astype(np.uint8)
        elif x.dtype != np.uint8:
            raise InputError(f"images must be uint8 (or float in [0, 1]), got dtype {x.dtype}")
        if len(x) == 0:
            return np.zeros((0, self.grid_size, self.grid_size), np.int32)
        return self._run(self._encode, x, 0)

    def decode(self, codes) -> np.ndarray:
        """int32 codes [B, grid, grid] in [0, codebook_size) -> uint8 images [B, H, W, 3]."""
        c = np.asarray(codes)
        check_indices(c, self.grid_size, self.codebook_size)
        if len(c) == 0:
            return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return self._run(self._decode, c.astype(np.int32), 0)

    def reconstruct(self, images) -> np.ndarray:
        """decode(encode(images))."""
        return self.decode(self.encode(images))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(image_size={self.image_size}, grid_size={self.grid_size}, "
            f"codebook_size={self.codebook_size}, step={self.step})"
        )


def load_tokenizer(
    path: str | os.PathLike, *, devices=None, max_batch: int = 64, verify: bool = True
) -> Tokenizer:
    """Loads the tokenizer of the bundle at `path` onto the local devices (see `Tokenizer`).

    `verify` checks the tensor file's sha256 against bundle.json (reads the file twice).
    """
    manifest, model, variables = load_tokenizer_variables(path, verify=verify)
    return Tokenizer(model, variables, manifest, devices=devices, max_batch=max_batch)
