"""Do class-conditional samples show their class? A classifier trained on real images says.

`class_recognition(sampler, real_images, real_labels, per_class)` trains a multinomial
logistic regression on real labelled images (grayscale pixels at the bundle's resolution),
samples `per_class` images of every class from the VIM and reports the share that the
classifier assigns to the class they were conditioned on, overall and per class, next to
the classifier's accuracy on held-out real images (its ceiling).

With `acceptance_rate` below 1 it also samples with classifier-based rejection
(`vitvq.rejection`) and reports the same share for the kept samples. The classifier that
rejects is not the one that judges: it sees the images area-downsampled to 8x8 and is trained
on every other real training image, so the judge's figure is not its own selection read back.
"""

from __future__ import annotations

import numpy as np


def _pixels(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, np.float32).mean(axis=-1).reshape(len(images), -1) / 255.0


def _pixels_8x8(images: np.ndarray) -> np.ndarray:
    grey = np.asarray(images, np.float32).mean(axis=-1) / 255.0
    n, h, w = grey.shape
    return grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def class_recognition(
    sampler,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    per_class: int = 20,
    seed: int = 0,
    acceptance_rate: float = 1.0,
    **sampling,
) -> dict[str, float]:
    # deferred: scikit-learn, only for the digits pipeline's sample check
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000).fit(_pixels(train_images), train_labels)
    out = {"real_top1": float(clf.score(_pixels(test_images), test_labels))}
    rejecter = None
    if acceptance_rate < 1.0:
        rejecter = LogisticRegression(max_iter=2000).fit(
            _pixels_8x8(train_images[::2]), train_labels[::2]
        )
        out["rejecter_real_top1"] = float(rejecter.score(_pixels_8x8(test_images), test_labels))

        def reject_logits(images):
            return rejecter.predict_log_proba(_pixels_8x8(images))

    hits, kept_hits = [], []
    for c in range(sampler.num_classes):
        images = sampler.sample(per_class, class_labels=c, seed=seed + c, **sampling)
        rate = float(np.mean(clf.predict(_pixels(images)) == c))
        out[f"class_{c}"] = rate
        hits.append(rate)
        if rejecter is not None:
            kept = sampler.sample(
                per_class,
                class_labels=c,
                seed=seed + c,
                acceptance_rate=acceptance_rate,
                classifier=reject_logits,
                **sampling,
            )
            kept_hits.append(float(np.mean(clf.predict(_pixels(kept)) == c)))
    out["recognized"] = float(np.mean(hits))
    if rejecter is not None:
        out["recognized_with_rejection"] = float(np.mean(kept_hits))
        out["acceptance_rate"] = float(acceptance_rate)
    return out
