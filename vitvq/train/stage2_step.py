"""The stage-2 (VIM) train and eval steps: pure functions, jitted by the trainer.

One step: augmented images -> the frozen tokenizer's encoder (inside the step; the tokens are
never precomputed) -> codes in raster order -> VIM with teacher forcing (class labels dropped
to the "null" class at `class_dropout`, for classifier-free guidance) -> next-token cross
entropy -> Adam update. A non-finite loss, gradient or update changes nothing but the step
counter and the count of consecutive non-finite steps.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vitvq.train.finite import all_finite, global_norm


@struct.dataclass
class Stage2State:
    """Everything a stage-2 run checkpoints. Keys are stored as raw uint32 key data."""

    step: jax.Array  # int32 []
    params: Any  # VIM parameters
    opt_state: Any
    nonfinite: jax.Array  # int32 [], consecutive skipped (non-finite) steps
    skipped: jax.Array  # int32 [], all skipped steps of the run (resumes included)
    rng: jax.Array  # uint32 [2]


@dataclasses.dataclass(frozen=True)
class Stage2Settings:
    num_classes: int = 0  # 0: unconditional
    class_dropout: float = 0.1  # rate at which labels become the null class (id num_classes)


def init_state(
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_tokens: int,
    num_classes: int,
    batch: int,
) -> Stage2State:
    """A fresh state (parameters logically annotated, i.e. boxed), initialized on a zero
    batch of `batch` code sequences of `num_tokens` (with labels when `num_classes`)."""
    tokens = jnp.zeros((batch, num_tokens), jnp.int32)
    labels = jnp.zeros((batch,), jnp.int32) if num_classes else None
    k_model, k_step = jax.random.split(rng)
    params = model.init({"params": k_model}, tokens, labels)["params"]
    return Stage2State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(k_step),
    )


def encode_tokens(tokenizer: nn.Module, tok_vars: Any, images: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> int32 tokens [B, T] in raster order (frozen)."""
    codes, _ = tokenizer.apply(tok_vars, images, method=tokenizer.encode)
    codes = jax.lax.stop_gradient(codes)
    return codes.reshape(codes.shape[0], -1).astype(jnp.int32)


def token_losses(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy (nats) and correctness, float32 [B, T] each."""
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    correct = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)
    return ce, correct


def train_step(
    state: Stage2State,
    batch: dict[str, jax.Array],
    tok_vars: Any,
    *,
    model: nn.Module,
    tokenizer: nn.Module,
    tx: optax.GradientTransformation,
    settings: Stage2Settings,
    lr_schedule: Any,
) -> tuple[Stage2State, dict[str, jax.Array]]:
    s = settings
    step = state.step
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    dropout_rng, class_rng = jax.random.split(rng)
    tokens = encode_tokens(tokenizer, tok_vars, batch["image"].astype(jnp.float32))
    labels = None
    if s.num_classes > 0:
        labels = batch["label"].astype(jnp.int32)
        if s.class_dropout > 0:
            drop = jax.random.bernoulli(class_rng, s.class_dropout, labels.shape)
            labels = jnp.where(drop, s.num_classes, labels)

    def loss_fn(params):
        logits = model.apply(
            {"params": params}, tokens, labels, train=True, rngs={"dropout": dropout_rng}
        )
        ce, correct = token_losses(logits, tokens)
        return jnp.mean(ce), jnp.mean(correct)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)

    def select(new, old):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = state.replace(
        step=step + 1,
        params=select(params, state.params),
        opt_state=select(opt_state, state.opt_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
        skipped=jnp.where(finite, state.skipped, state.skipped + 1).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "accuracy": accuracy,
        "grad_norm": global_norm(grads),
        "lr": lr_schedule(step),
        "nonfinite_steps": new_state.nonfinite,
        "skipped_steps": new_state.skipped,
    }
    return new_state, metrics


def eval_step(
    params: Any,
    batch: dict[str, jax.Array],
    tok_vars: Any,
    *,
    model: nn.Module,
    tokenizer: nn.Module,
    settings: Stage2Settings,
) -> dict[str, jax.Array]:
    """Sums over the real examples of one batch: cross entropy, correct tokens, tokens."""
    tokens = encode_tokens(tokenizer, tok_vars, batch["image"].astype(jnp.float32))
    labels = batch["label"].astype(jnp.int32) if settings.num_classes > 0 else None
    logits = model.apply({"params": params}, tokens, labels, train=False)
    ce, correct = token_losses(logits, tokens)
    mask = batch["mask"].astype(jnp.float32)[:, None]
    return {
        "ce_sum": jnp.sum(ce * mask),
        "correct_sum": jnp.sum(correct * mask),
        "tokens": jnp.sum(jnp.broadcast_to(mask, ce.shape)),
    }
