"""Optimizers and learning-rate schedules from the `optimizer` blocks of checked settings
(`vitvq.settings`: every key and range was checked there).

Stage 1: AdamW with warmup + cosine decay (`make_optimizer`). Stage 2 (VIM): Adam with
warmup to a constant rate, then exponential decay (`make_adam`). Both warm up over
`vitvq.train.schedule.warmup_steps` (at most a tenth of the run by default).
"""

import jax
import jax.numpy as jnp
import optax

from vitvq.train.schedule import warmup_steps as capped_warmup


def warmup_cosine(lr: float, end_lr: float, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 to `lr`, then cosine decay to `end_lr` at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end_lr,
    )


def warmup_exponential(
    lr: float, end_lr: float, warmup_steps: int, decay_start_step: int, total_steps: int
):
    """VIM's schedule (docs/paper.md): linear warmup from 0 to a constant `lr` over
    `warmup_steps`, then, from `decay_start_step`, exponential decay reaching `end_lr` at
    `total_steps`."""
    warmup_steps = max(0, int(warmup_steps))
    start = max(warmup_steps, int(decay_start_step))
    span = max(1, int(total_steps) - start)
    ratio = end_lr / lr

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
        decayed = lr * ratio ** jnp.clip((step - start) / span, 0.0, 1.0)
        return jnp.where(step < warmup_steps, warm, jnp.where(step < start, lr, decayed))

    return schedule


def make_adam(ocfg, total_steps: int) -> tuple[optax.GradientTransformation, object]:
    """Adam (decoupled weight decay when `weight_decay` > 0) with `warmup_exponential`."""
    schedule = warmup_exponential(
        ocfg.lr, ocfg.end_lr, capped_warmup(ocfg, total_steps), ocfg.decay_start_step, total_steps
    )
    parts = []
    if ocfg.get("grad_clip_norm", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(ocfg.grad_clip_norm))
    parts.append(
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.get("weight_decay", 0.0))
    )
    return optax.chain(*parts), schedule


def _is_codebook(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "codebook" for k in path)


def make_optimizer(ocfg, total_steps: int) -> tuple[optax.GradientTransformation, object]:
    """AdamW (decoupled weight decay, scaled by the learning rate as in optax) + schedule.

    Returns (transformation, schedule). `codebook_lr_multiplier` scales the codebook's updates.
    """
    schedule = warmup_cosine(ocfg.lr, ocfg.end_lr, capped_warmup(ocfg, total_steps), total_steps)
    parts = []
    if ocfg.get("grad_clip_norm", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(ocfg.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay))
    multiplier = ocfg.get("codebook_lr_multiplier", 1.0)
    if multiplier != 1.0:
        parts.append(
            optax.masked(
                optax.scale(multiplier),
                lambda params: jax.tree_util.tree_map_with_path(
                    lambda path, _: _is_codebook(path), params
                ),
            )
        )
    return optax.chain(*parts), schedule
