"""Do class-conditional samples show their class? A classifier trained on real images says.

`class_recognition(sampler, real_images, real_labels, per_class)` trains a multinomial
logistic regression on real labelled images (grayscale pixels at the bundle's resolution),
samples `per_class` images of every class from the VIM and reports the share that the
classifier assigns to the class they were conditioned on, overall and per class, next to
the classifier's accuracy on held-out real images (its ceiling).
"""

from __future__ import annotations

import numpy as np


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).mean(axis=-1).reshape(len(images), -1) / 255.0


def class_recognition(
    sampler,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    per_class: int = 20,
    seed: int = 0,
    **sampling,
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(_pixels(train_images), train_labels)
    out = {"real_top1": float(clf.score(_pixels(test_images), test_labels))}
    hits = []
    for c in range(sampler.num_classes):
        images = sampler.sample(per_class, class_labels=c, seed=seed + c, **sampling)
        rate = float(np.mean(clf.predict(_pixels(images)) == c))
        out[f"class_{c}"] = rate
        hits.append(rate)
    out["recognized"] = float(np.mean(hits))
    return out
