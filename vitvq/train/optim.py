"""Optimizers and learning-rate schedules from the `optimizer` config blocks."""

import jax
import optax

from vitvq.errors import ConfigError


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


def _is_codebook(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "codebook" for k in path)


def make_optimizer(ocfg, total_steps: int) -> tuple[optax.GradientTransformation, object]:
    """AdamW (decoupled weight decay, scaled by the learning rate as in optax) + schedule.

    Returns (transformation, schedule). `codebook_lr_multiplier` scales the codebook's updates.
    """
    for key in ("lr", "end_lr", "warmup_steps", "b1", "b2", "weight_decay"):
        if key not in ocfg:
            raise ConfigError(f"optimizer config is missing {key!r}")
    if ocfg.lr <= 0:
        raise ConfigError(f"optimizer lr must be positive, got {ocfg.lr}")
    schedule = warmup_cosine(ocfg.lr, ocfg.end_lr, ocfg.warmup_steps, total_steps)
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
