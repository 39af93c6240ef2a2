"""The Sampler: a bundle's VIM with its tokenizer, for class-conditional or unconditional
image samples (and rejection sampling, `vitvq.rejection`).

    sampler = vitvq.load_sampler("runs/demo/bundle")   # a bundle with a VIM
    images = sampler.sample(16, class_labels=3, temperature=1.0, top_k=0, top_p=1.0,
                            cfg_scale=1.0, seed=0)     # uint8 [16, H, W, 3]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vitvq import console, rejection, sampling
from vitvq.bundle import load_tokenizer_variables, load_vim_variables
from vitvq.errors import InputError
from vitvq.pictures import image_grid, label_rows
from vitvq.tokenizer import Tokenizer


class Sampler:
    """A trained VIM with its tokenizer: class-conditional or unconditional image samples."""

    def __init__(self, tokenizer: Tokenizer, model, variables, manifest):
        self.tokenizer = tokenizer
        self.model = model
        self.manifest = manifest
        self._params = jax.device_put(variables["params"], tokenizer._replicated)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest["classes"].get("names")

    @property
    def image_size(self) -> int:
        return self.tokenizer.image_size

    def _labels(self, num_samples: int, class_labels) -> np.ndarray | None:
        if class_labels is None:
            if self.num_classes:  # the null class: unconditional samples of a guided model
                return np.full((num_samples,), self.num_classes, np.int32)
            return None
        if not self.num_classes:
            raise InputError("class_labels were given but this VIM is unconditional")
        labels = np.asarray(class_labels)
        if labels.ndim == 0:
            labels = np.full((num_samples,), int(labels), np.int64)
        if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"class_labels must be one int or {num_samples} ints, got {class_labels!r}"
            )
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise InputError(
                f"class labels must be in [0, {self.num_classes - 1}], got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        return labels.astype(np.int32)

    def sample_codes(
        self,
        num_samples: int,
        class_labels=None,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        seed: int = 0,
        prefix=None,
        acceptance_rate: float = 1.0,
        classifier=None,
        class_map=None,
        candidate_batch: int = 64,
    ) -> np.ndarray:
        """int32 codes [N, grid, grid]; `prefix` [N, P] fixes the first P codes (completion).

        With `acceptance_rate` r < 1, classifier-based rejection (`vitvq.rejection`): for each
        class asked for n times, ceil(n / r) candidates are drawn in batches of
        `candidate_batch`, `classifier(uint8 images [B, H, W, 3]) -> logits [B, C]` scores
        each by the log-probability of its class, and the n best are kept, best first.
        `class_map[k]` is the classifier's output for the bundle's class k when C differs.
        """
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
            raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
        num_samples = int(num_samples)
        labels = self._labels(num_samples, class_labels)
        if labels is not None and np.all(labels == self.num_classes):
            cfg_scale = 1.0  # nothing to guide towards
        knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        rate = rejection.check_rate(acceptance_rate)
        if rate == 1.0 and classifier is None:
            return self._draw(labels, num_samples, jax.random.key(int(seed)), prefix, knobs)
        if classifier is None:
            raise InputError("acceptance_rate < 1 needs a classifier to score the candidates")
        if labels is None or np.any(labels == self.num_classes):
            raise InputError(
                "rejection sampling keeps the samples a classifier finds most like their "
                "class: give class_labels (of a class-conditional VIM)"
            )
        if prefix is not None:
            raise InputError("rejection sampling does not take a prefix")
        if getattr(classifier, "num_classes", None) is not None:  # refuse before drawing
            rejection.check_class_map(classifier.num_classes, self.num_classes, class_map)
        key = jax.random.key(int(seed))

        def draw(batch, index):  # the first batch is what a plain draw of that batch gives
            batch_key = key if index == 0 else jax.random.fold_in(key, index)
            return self._draw(batch, len(batch), batch_key, None, knobs)

        codes, _ = rejection.rejection_sample(
            draw,
            self.tokenizer.decode,
            classifier,
            labels,
            acceptance_rate=rate,
            num_classes=self.num_classes,
            class_map=class_map,
            batch_size=candidate_batch,
        )
        return codes

    def _draw(self, labels, num_samples: int, key, prefix, knobs) -> np.ndarray:
        tokens = sampling.sample_tokens(
            self.model,
            self._params,
            key,
            batch_size=num_samples,
            labels=None if labels is None else jnp.asarray(labels),
            prefix=None if prefix is None else jnp.asarray(prefix, jnp.int32),
            # Split over the local devices when the batch divides evenly; the samples are the
            # same either way (a function of the key, num_samples and labels only).
            mesh=self.tokenizer._mesh if num_samples % len(self.tokenizer._devices) == 0 else None,
            **knobs,
        )
        g = self.tokenizer.grid_size
        return np.asarray(tokens).reshape(num_samples, g, g).astype(np.int32)

    def sample(
        self,
        num_samples: int,
        class_labels=None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        seed: int = 0,
        **rejection,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3]. `class_labels`: None (unconditional; for a conditional
        VIM, its null class), one int, or N ints. Same seed, same samples. `rejection`:
        `acceptance_rate`, `classifier`, `class_map`, `candidate_batch` (see `sample_codes`)."""
        codes = self.sample_codes(
            num_samples,
            class_labels,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            cfg_scale=cfg_scale,
            seed=seed,
            **rejection,
        )
        return self.tokenizer.decode(codes)


def load_sampler(path: str | os.PathLike, *, devices=None, verify: bool = True) -> Sampler:
    """The VIM and tokenizer of the bundle at `path` (see `Sampler`)."""
    manifest, model, variables = load_tokenizer_variables(path, verify=verify)
    tokenizer = Tokenizer(model, variables, manifest, devices=devices)
    vim, vim_variables = load_vim_variables(path, manifest, verify=verify)
    return Sampler(tokenizer, vim, vim_variables, manifest)


def sample_grid(sampler, *, num_samples, labels, seed, stream=sys.stderr, **knobs):
    """uint8 grid: one row per label (conditional, each row named by its class on the left)
    or rows of 8 (unconditional)."""
    if num_samples < 1:
        raise InputError(f"--num_samples must be >= 1, got {num_samples}")
    if sampler.num_classes and labels is None:
        labels = list(range(sampler.num_classes))
    rows = []
    if labels is None:
        images = sampler.sample(num_samples, None, seed=seed, **knobs)
        print(f"sampled {num_samples} images", file=stream)
        rows = [images[i : i + 8] for i in range(0, num_samples, 8)]
        columns = 8
    else:
        progress = console.Progress("sampling classes", len(labels), stream=stream)
        try:
            for i, label in enumerate(labels):
                rows.append(sampler.sample(num_samples, label, seed=seed + i, **knobs))
                progress.update(i + 1)
        finally:
            progress.close()
        columns = num_samples
    if len(rows) > 1 and len(rows[-1]) < len(rows[0]):  # pad the last unconditional row
        pad = np.ones((len(rows[0]) - len(rows[-1]), *rows[-1].shape[1:]), np.uint8) * 255
        rows[-1] = np.concatenate([rows[-1], pad])
    grid = image_grid([r.astype(np.float32) / 255.0 for r in rows], max_columns=columns)
    if labels is None:
        return grid
    names = sampler.class_names or []
    row_labels = [names[label] if label < len(names) else str(label) for label in labels]
    return label_rows(grid, row_labels, sampler.image_size)
