"""Linear probe (the paper's "understanding" result): frozen features -> softmax classifier.

`vim_probe(sampler_or_parts, train_images, train_labels, test_images, test_labels, block)`
encodes images with the tokenizer, runs the VIM up to `block` (1-based) with the null class
in the class slot (so a class-conditional VIM never sees the label), averages the block's
output over the tokens, and fits a multinomial logistic regression on standardized features.
`pixel_probe` fits the same classifier on raw pixels, the baseline to compare with.
`probe_block(depth)` is the block the paper probes for its two VIM sizes, else the middle one.
"""

from __future__ import annotations

import numpy as np

# The paper's probed block (1-based) by VIM depth: 10 of VIM-Base's 24, 15 of VIM-Large's 36.
PAPER_PROBE_BLOCKS = {24: 10, 36: 15}


def probe_block(depth: int) -> int:
    """The block whose token-averaged output the probe reads, for a VIM of `depth` blocks."""
    return PAPER_PROBE_BLOCKS.get(depth, max(1, depth // 2))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    c: float = 1.0,
    max_iter: int = 2000,
) -> dict[str, float]:
    """Top-1 accuracy of a softmax classifier on standardized features (train and test)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(scaler.transform(train_x), train_y)
    return {
        "top1": float(clf.score(scaler.transform(test_x), test_y)),
        "train_top1": float(clf.score(scaler.transform(train_x), train_y)),
        "num_train": float(len(train_y)),
        "num_test": float(len(test_y)),
    }


def vim_features(sampler, images_uint8: np.ndarray, block: int, batch_size: int = 64):
    """Token-averaged output of VIM block `block` for each image: float [N, width]."""
    import jax
    import jax.numpy as jnp

    model = sampler.model
    params = sampler._params

    @jax.jit
    def pooled(params, tokens, labels):
        feats = model.apply({"params": params}, tokens, labels, block=block, method=model.features)
        return jnp.mean(feats.astype(jnp.float32), axis=1)

    out = []
    for i in range(0, len(images_uint8), batch_size):
        codes = sampler.tokenizer.encode(images_uint8[i : i + batch_size])
        tokens = jnp.asarray(codes.reshape(len(codes), -1))
        labels = jnp.full((len(codes),), model.null_class, jnp.int32) if model.conditional else None
        out.append(np.asarray(pooled(params, tokens, labels)))
    return np.concatenate(out)


def vim_probe(sampler, train_images, train_labels, test_images, test_labels, block: int):
    return fit_probe(
        vim_features(sampler, train_images, block),
        np.asarray(train_labels),
        vim_features(sampler, test_images, block),
        np.asarray(test_labels),
    )


def pixel_probe(train_images, train_labels, test_images, test_labels):
    flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255.0  # noqa: E731
    return fit_probe(
        flat(train_images), np.asarray(train_labels), flat(test_images), np.asarray(test_labels)
    )
