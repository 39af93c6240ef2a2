"""Linear probe (the paper's "understanding" result): frozen features -> softmax classifier.

Features: `VimFeatures(sampler, block)` encodes uint8 images with the tokenizer, runs the VIM
up to `block` (1-based) with the null class in the class slot (so a class-conditional VIM
never sees the label), and averages the block's output over the tokens; batches are split
over the local devices. `probe_block(depth)` is the block the paper probes for its two VIM
sizes, else the middle one.

Classifier: `softmax_probe` standardizes the features (training mean and deviation), holds out
a tenth of the training examples, trains one multinomial logistic regression (optax Adam,
cosine schedule, L2 penalty; by default about 2,000 steps, 10 to 100 epochs) per
weight-decay candidate on the rest, keeps the candidate with
the best held-out top-1, retrains with it on all training examples and reports top-1 on the
test examples. `vim_probe` and `pixel_probe` apply it to VIM features and to raw pixels (the
baseline).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitvq.errors import InputError

# The paper's probed block (1-based) by VIM depth: 10 of VIM-Base's 24, 15 of VIM-Large's 36.
PAPER_PROBE_BLOCKS = {24: 10, 36: 15}
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT_FRACTION = 0.1


def probe_block(depth: int) -> int:
    """The block whose token-averaged output the probe reads, for a VIM of `depth` blocks."""
    return PAPER_PROBE_BLOCKS.get(depth, max(1, depth // 2))


def check_block(block: int, depth: int) -> int:
    if isinstance(block, bool) or int(block) != block or not 1 <= block <= depth:
        raise InputError(f"the probe block must be in [1, {depth}] for this VIM, got {block!r}")
    return int(block)


class VimFeatures:
    """`features(uint8 images [B, H, W, 3]) -> float32 [B, width]`: token-averaged output of
    VIM block `block`, computed over the tokenizer's local devices."""

    def __init__(self, sampler, block: int):
        model = sampler.model
        self.block = check_block(block, model.transformer.depth)
        self.width = int(model.transformer.width)
        self.image_size = int(sampler.image_size)
        self._tokenizer = sampler.tokenizer
        self._params = sampler._params
        self._devices = len(sampler.tokenizer._devices)
        batched = sampler.tokenizer._batched

        def pooled(params, tokens):
            labels = None
            if model.conditional:
                labels = jnp.full((tokens.shape[0],), model.null_class, jnp.int32)
            feats = model.apply(
                {"params": params}, tokens, labels, block=block, method=model.features
            )
            return jnp.mean(feats.astype(jnp.float32), axis=1)

        self._pooled = jax.jit(
            pooled,
            in_shardings=(sampler.tokenizer._replicated, batched),
            out_shardings=batched,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        codes = self._tokenizer.encode(images).reshape(n, -1)
        padded = -(-n // self._devices) * self._devices
        if padded > n:
            codes = np.concatenate([codes, np.zeros((padded - n, codes.shape[1]), codes.dtype)])
        out = self._pooled(self._params, jax.device_put(codes, self._tokenizer._batched))
        return np.asarray(jax.device_get(out))[:n]


def vim_features(sampler, images_uint8: np.ndarray, block: int, batch_size: int = 64):
    """Token-averaged output of VIM block `block` for each image: float32 [N, width]."""
    features = VimFeatures(sampler, block)
    return np.concatenate(
        [
            features(images_uint8[i : i + batch_size])
            for i in range(0, len(images_uint8), batch_size)
        ]
    )


@functools.lru_cache(maxsize=8)
def _epoch_fn(lr: float, total_steps: int):
    """(optimizer, jitted epoch): one compile per schedule, whatever the weight decay."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, total_steps))

    @jax.jit
    def epoch(params, state, x, y, rows, mask, weight_decay):
        def step(carry, batch):
            params, state = carry
            rows, mb = batch

            def loss(p):
                logits = x[rows] @ p["w"] + p["b"]
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[rows])
                return jnp.sum(ce * mb) / jnp.sum(mb) + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

            updates, state = opt.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), (rows, mask))
        return params, state

    return opt, epoch


def _train_softmax(x, y, num_classes: int, weight_decay: float, *, epochs, batch_size, lr, seed):
    """(W [D, C], b [C]) of a softmax regression on standardized features x [N, D]: Adam on
    minibatches, one jitted scan per epoch over the features held on the device."""
    n, d = x.shape
    batch = min(batch_size, n)
    per_epoch = math.ceil(n / batch)
    if epochs is None:  # about 2,000 steps, between 10 and 100 epochs
        epochs = max(10, min(100, math.ceil(2000 / per_epoch)))
    opt, epoch = _epoch_fn(float(lr), epochs * per_epoch)
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}
    state = opt.init(params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    wd = jnp.float32(weight_decay)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        # Every step the same shape: the last batch is padded and masked out of the loss.
        order = np.zeros(per_epoch * batch, np.int32)
        order[:n] = rng.permutation(n)
        mask = (np.arange(per_epoch * batch) < n).astype(np.float32)
        rows, mask = order.reshape(per_epoch, batch), mask.reshape(per_epoch, batch)
        params, state = epoch(params, state, x, y, rows, mask, wd)
    return jax.device_get(params)


def _top1(params, x, y) -> float:
    logits = x @ np.asarray(params["w"], np.float32) + np.asarray(params["b"], np.float32)
    return float(np.mean(np.argmax(logits, axis=1) == y)) if len(y) else math.nan


def softmax_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    num_classes: int | None = None,
    weight_decays=WEIGHT_DECAYS,
    epochs: int | None = None,
    batch_size: int = 1024,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict:
    """Top-1 on the test examples of a softmax classifier whose L2 weight decay is chosen on
    a held-out tenth of the training examples (see the module docstring)."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
    if len(train_y) < 2 or len(test_y) < 1:
        raise InputError(
            f"the probe needs at least 2 training and 1 test examples, got {len(train_y)} and "
            f"{len(test_y)}"
        )
    num_classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    scale = lambda x: ((x - mean) / np.maximum(std, 1e-6)).astype(np.float32)  # noqa: E731
    train_x, test_x = scale(train_x), scale(test_x)
    order = np.random.default_rng(seed).permutation(len(train_y))
    num_val = max(1, int(round(HELD_OUT_FRACTION * len(train_y))))
    fit, val = order[num_val:], order[:num_val]
    knobs = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    table = {}
    for wd in weight_decays:
        params = _train_softmax(train_x[fit], train_y[fit], num_classes, float(wd), **knobs)
        table[float(wd)] = _top1(params, train_x[val], train_y[val])
    best = max(table, key=lambda wd: (table[wd], -list(table).index(wd)))  # first of the best
    params = _train_softmax(train_x, train_y, num_classes, best, **knobs)
    return {
        "top1": _top1(params, test_x, test_y),
        "train_top1": _top1(params, train_x, train_y),
        "held_out_top1": table[best],
        "weight_decay": best,
        "held_out_by_weight_decay": table,
        "num_train": len(train_y),
        "num_test": len(test_y),
    }


def vim_probe(sampler, train_images, train_labels, test_images, test_labels, block: int):
    features = VimFeatures(sampler, block)
    batches = lambda x: np.concatenate([features(x[i : i + 64]) for i in range(0, len(x), 64)])  # noqa: E731
    return softmax_probe(
        batches(np.asarray(train_images)),
        train_labels,
        batches(np.asarray(test_images)),
        test_labels,
    )


def pixel_probe(train_images, train_labels, test_images, test_labels):
    flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255.0  # noqa: E731
    return softmax_probe(flat(train_images), train_labels, flat(test_images), test_labels)
