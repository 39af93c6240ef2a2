"""The linear probe of a bundle's VIM on a dataset, resumable: what `python -m vitvq.probe`
runs, for an API user too.

    result = probe_bundle("runs/demo/bundle", {"name": "digits"}, workdir="runs/probe")
    result["top1"], result["block"], result["weight_decay"]

Images are read, tokenized and featurized one batch at a time (`linear_probe.VimFeatures`),
and never all held: only the features ([N, width] float32) are kept. With a workdir every
batch's features are written there as it is done (atomically, `FeatureCache`), so a run that
is stopped at any point resumes where it was, reusing them; a workdir that holds another
probe's features (another bundle, block, dataset or batch size) is refused. The classifier
is `linear_probe.softmax_probe`.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np

from vitvq import console
from vitvq import data as data_lib
from vitvq.bundle import read_manifest
from vitvq.errors import InputError
from vitvq.evaluation import linear_probe
from vitvq.sampler import load_sampler


class FeatureCache:
    """Per-batch feature files under `workdir/probe_features/`, described by meta.json."""

    def __init__(self, workdir: str | None, meta: dict):
        self.root = None if workdir is None else os.path.join(workdir, "probe_features")
        if self.root is None:
            return
        os.makedirs(self.root, exist_ok=True)
        meta_path = os.path.join(self.root, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                saved = json.load(f)
            if saved != meta:
                diff = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
                raise InputError(
                    f"--workdir={workdir} holds the features of another probe (it differs in "
                    f"{', '.join(diff)}): use another --workdir, or delete {self.root}"
                )
        else:
            _write_atomic(meta_path, json.dumps(meta, indent=1).encode())

    def _file(self, split: str, batch: int) -> str:
        return os.path.join(self.root, f"{split}_{batch:07d}.npz")

    def done(self, split: str) -> int:
        """The number of leading batches of `split` whose features are saved."""
        count = 0
        while self.root is not None and os.path.exists(self._file(split, count)):
            count += 1
        return count

    def load(self, split: str, count: int):
        for batch in range(count):
            with np.load(self._file(split, batch)) as data:
                yield data["features"], data["labels"]

    def save(self, split: str, batch: int, features, labels) -> None:
        if self.root is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels)
        _write_atomic(self._file(split, batch), buffer.getvalue())


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def split_features(features, dataset: dict, split: str, cache: FeatureCache, **options):
    """(features [N, width], labels [N]) of one split, batch by batch, resuming from the
    cache."""
    batch_size, stream = options["batch_size"], options.get("stream", sys.stderr)
    done = cache.done(split)
    feats, labels = [], []
    for f, y in cache.load(split, done):
        feats.append(f)
        labels.append(y)
    info = data_lib.dataset_info(dataset)
    total = info["num_train" if split == "train" else "num_eval"]
    limit = options.get(f"num_{split}")
    if limit is not None:
        total = min(total, int(limit))
    num_batches = math.ceil(total / batch_size)
    if done:
        print(f"{split}: reusing the features of {done} of {num_batches} batches", file=stream)
    batches = data_lib.eval_batches(
        dataset,
        image_size=features.image_size,
        global_batch_size=batch_size,
        num_examples=limit,
        split=split,
        start_batch=done,
    )
    # On a terminal: batches done, rate and ETA; elsewhere quiet (the cache says where it is).
    progress = console.Progress(f"{split} features, batch", num_batches, start=done, stream=stream)
    try:
        for index, batch in enumerate(batches, start=done):
            keep = batch["mask"] > 0
            images = np.round(batch["image"][keep] * 255.0).astype(np.uint8)
            f, y = features(images), batch["label"][keep].astype(np.int32)
            cache.save(split, index, f, y)
            feats.append(f)
            labels.append(y)
            progress.update(index + 1)
    finally:
        progress.close()
    if not feats:
        return np.zeros((0, features.width), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(feats), np.concatenate(labels)


@data_lib.sources_kept()  # a folder is listed once, not once per split and size
def probe_bundle(bundle_path: str, dataset: dict, *, block=None, workdir=None, **options) -> dict:
    """The linear probe of `bundle_path`'s VIM on `dataset` (a dataset config block as a
    dict): top-1 on its evaluation split and how it was reached (`softmax_probe`'s result,
    with `block` and `depth`). `workdir`: where the features are cached (a stopped run
    resumes). `options`: batch_size (64), num_train, num_eval (the first N of each split),
    stream (where progress goes; stderr). Raises InputError on a bad option or an
    unlabelled dataset."""

    options.setdefault("batch_size", 64)
    batch_size = options["batch_size"]
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"--batch_size must be a positive integer, got {batch_size!r}")
    for key in ("num_train", "num_eval"):
        if options.get(key) is not None and int(options[key]) < 1:
            raise InputError(f"--{key} must be >= 1, got {options[key]}")
    info = data_lib.dataset_info(dataset)
    if not info["num_classes"]:
        raise InputError(
            f"the linear probe needs class labels, and the {dataset['name']!r} dataset has none "
            "(a folder dataset needs one subfolder per class)"
        )
    sampler = load_sampler(bundle_path)
    depth = sampler.model.transformer.depth
    block = linear_probe.probe_block(depth) if block is None else block
    features = linear_probe.VimFeatures(sampler, block)
    manifest = read_manifest(bundle_path)
    meta = {
        "bundle": os.path.abspath(os.fspath(bundle_path)),
        "sha256": [manifest["tokenizer"].get("sha256"), manifest["vim"].get("sha256")],
        "block": features.block,
        "dataset": {k: v for k, v in sorted(dataset.items())},
        "batch_size": int(batch_size),
        "num_train": options.get("num_train"),
        "num_eval": options.get("num_eval"),
    }
    cache = FeatureCache(workdir, meta)
    train_x, train_y = split_features(features, dataset, "train", cache, **options)
    test_x, test_y = split_features(features, dataset, "eval", cache, **options)
    result = linear_probe.softmax_probe(
        train_x, train_y, test_x, test_y, num_classes=info["num_classes"]
    )
    result["block"] = features.block
    result["depth"] = depth
    return result
