"""Classifier-based rejection sampling: draw more candidates than asked for, keep the best.

For a target class c asked for n times at acceptance rate r, `ceil(n / r)` candidates
conditioned on c are drawn; a classifier scores each by the log-probability it gives class c
(log-softmax of its logits), and the n best are kept, best first. This is how the ViT-VQGAN
paper reports its best class-conditional ImageNet figures (acceptance rate 0.5, a classifier
scoring the samples).

A classifier is any callable `classifier(images) -> logits`: uint8 images [B, H, W, 3] in,
[B, C] logits (unnormalized log-probabilities) out. When its C classes are not the bundle's
classes in the bundle's order, `class_map[k]` names the classifier's output for the bundle's
class k. `inception_classifier` turns the FID InceptionV3 (ImageNet logits) into one.

Everything here is NumPy except what the callables run; candidates are drawn in fixed-size
batches with one random key per batch, so the result is a function of the seed, the labels,
the rate and the batch size.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from vitvq.errors import InputError

DEFAULT_CANDIDATE_BATCH = 64


def check_rate(acceptance_rate) -> float:
    """The acceptance rate as a float in (0, 1], or `InputError`."""
    try:
        rate = float(acceptance_rate)
    except (TypeError, ValueError):
        rate = math.nan
    if isinstance(acceptance_rate, bool) or not 0.0 < rate <= 1.0:
        raise InputError(
            f"acceptance_rate must be in (0, 1] (1 keeps every sample; the paper uses 0.5), "
            f"got {acceptance_rate!r}"
        )
    return rate


def candidate_labels(labels: np.ndarray, rate: float) -> np.ndarray:
    """The candidates' target classes: ceil(n_c / rate) of each class c, grouped by class."""
    classes, counts = np.unique(labels, return_counts=True)
    # A hair under 1 / rate so that 0.5 asks for exactly 2n, not 2n + 1 from rounding.
    per_class = [math.ceil(n / rate - 1e-9) for n in counts]
    return np.repeat(classes, per_class).astype(labels.dtype)


def keep_best(scores: np.ndarray, cand_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices into the candidates, one per entry of `labels`: for every class, the
    requested positions (in order) get that class's best candidates (best first; ties go to
    the earlier candidate)."""
    picked = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        wanted = np.flatnonzero(labels == c)
        pool = np.flatnonzero(cand_labels == c)
        order = pool[np.argsort(-scores[pool], kind="stable")]
        picked[wanted] = order[: len(wanted)]
    return picked


def target_scores(
    logits, targets: np.ndarray, num_classes: int, class_map: np.ndarray | None
) -> np.ndarray:
    """float64 [B]: log-softmax of the classifier's logits at each candidate's target class."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] != len(targets):
        raise InputError(
            f"the classifier must return logits of shape [{len(targets)}, num_classes] for "
            f"{len(targets)} images, got shape {logits.shape}"
        )
    columns = check_class_map(logits.shape[1], num_classes, class_map)
    if not np.isfinite(logits).all():
        raise InputError("the classifier returned non-finite logits")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return log_probs[np.arange(len(targets)), columns[targets]]


def check_class_map(
    classifier_classes: int, num_classes: int, class_map: np.ndarray | None
) -> np.ndarray:
    """The classifier's output index of each of the bundle's classes ([num_classes] ints)."""
    if class_map is None:
        if classifier_classes != num_classes:
            raise InputError(
                f"the classifier scores {classifier_classes} classes but the bundle's VIM has "
                f"{num_classes}: give a class map (the classifier's output index of each of "
                "the bundle's classes; --classifier_classes on the command line)"
            )
        return np.arange(num_classes)
    class_map = np.asarray(class_map)
    if (
        class_map.shape != (num_classes,)
        or not np.issubdtype(class_map.dtype, np.integer)
        or class_map.min() < 0
        or class_map.max() >= classifier_classes
    ):
        raise InputError(
            f"the class map must hold {num_classes} integers (one per class of the bundle) in "
            f"[0, {classifier_classes - 1}] (the classifier's outputs), got shape "
            f"{class_map.shape} and dtype {class_map.dtype}"
        )
    return class_map.astype(np.int64)


def rejection_sample(
    draw: Callable[[np.ndarray, int], np.ndarray],
    decode: Callable[[np.ndarray], np.ndarray],
    classifier: Callable,
    labels: np.ndarray,
    *,
    acceptance_rate: float,
    num_classes: int,
    class_map=None,
    batch_size: int = DEFAULT_CANDIDATE_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes of the kept samples [N, ...], their scores [N]) for the targets `labels` [N].

    `draw(batch_labels, batch_index)` returns the codes of one batch of candidates;
    `decode(codes)` their uint8 images, which the classifier scores.
    """
    rate = check_rate(acceptance_rate)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"the candidate batch size must be a positive integer, got {batch_size!r}")
    cands = candidate_labels(labels, rate)
    codes, scores = [], []
    for index, start in enumerate(range(0, len(cands), int(batch_size))):
        batch = cands[start : start + int(batch_size)]
        batch_codes = np.asarray(draw(batch, index))
        codes.append(batch_codes)
        scores.append(target_scores(classifier(decode(batch_codes)), batch, num_classes, class_map))
    codes, scores = np.concatenate(codes), np.concatenate(scores)
    picked = keep_best(scores, cands, labels)
    return codes[picked], scores[picked]


# --------------------------------------------------------------------------------------------
# Classifiers from files (the command line).


def read_class_map(path: str | os.PathLike, class_names: Sequence[str] | None) -> np.ndarray:
    """A class map from a file: a JSON list of ints (the classifier's output index of each of
    the bundle's classes), or a label map in protobuf text form with entries
    `target_class: N target_class_string: "WNID"` (the one shipped with the 2015 Inception
    graph), matched against the bundle's class names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"class map file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value, np.int64)
    pairs = re.findall(r'target_class:\s*(\d+)\s+target_class_string:\s*"([^"]+)"', text)
    if not pairs:
        raise InputError(
            f"{path} is neither a JSON list of integers nor a label map with "
            '`target_class: N target_class_string: "NAME"` entries'
        )
    if not class_names:
        raise InputError(f"{path} maps class names, but the bundle does not record its class names")
    index = {name: int(n) for n, name in pairs}
    missing = [name for name in class_names if name not in index]
    if missing:
        raise InputError(
            f"{path} has no entry for {len(missing)} of the bundle's classes, e.g. {missing[:3]}"
        )
    return np.asarray([index[name] for name in class_names], np.int64)


def inception_classifier(weights: str | os.PathLike, batch_size: int = 32) -> Callable:
    """The FID InceptionV3 (weights converted by scripts/convert_inception_weights.py) as a
    classifier: uint8 images -> its 1008 ImageNet logits. `BundleError` for a bad file."""
    # deferred: JAX and SciPy (the FID InceptionV3), only with --classifier; this module is
    # NumPy only and vitvq.sampler imports it
    from vitvq.evaluation.fid import load_inception
    from vitvq.models.inception import FID_NUM_CLASSES

    features = load_inception(weights)

    def classify(images: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(features(images[i : i + batch_size])["logits"])
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    classify.num_classes = FID_NUM_CLASSES  # known before any image is scored
    return classify
