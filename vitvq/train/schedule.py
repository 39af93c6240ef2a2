"""When each part of a run starts: the loss terms that switch on later, and the warmup.

The paper trains 500k steps with a 50k-step warmup and says nothing of when LPIPS and the
discriminator join. Both are set here in a way that transfers across run lengths:

- A term starts at `loss.<term>_start_step` when that is set (> 0), else at
  `loss.<term>_start_fraction` of `total_steps` (rounded up). A fraction keeps its meaning
  when a recipe tuned on a 2,000-step CPU run goes to a 500k-step pod run; a step given on
  the command line (`--config.loss.disc_start_step=5000`) still means that step.
- The warmup is at most `optimizer.max_warmup_fraction` of the run (default 0.1, the paper's
  50k of 500k): a paper-length run keeps the paper's warmup, and a shorter run gets the same
  share instead of a warmup clamped to the whole run (whose rate then climbs to its peak at
  the last step). 0 switches the cap off: the warmup is then only clamped to `total_steps`.
"""

import math

# The paper's warmup share: 50k of 500k steps.
MAX_WARMUP_FRACTION = 0.1


def start_step(step: int, fraction: float, total_steps: int) -> int:
    """The first step of a term: `step` when > 0, else `fraction` of `total_steps` rounded
    up."""
    if int(step) > 0:
        return int(step)
    # rounded first: 0.55 * 100 is 55.000000000000014 in floating point
    return math.ceil(round(float(fraction) * int(total_steps), 6))


def loss_starts(loss, total_steps: int) -> tuple[int, int]:
    """(first LPIPS step, first discriminator step) of a stage-1 `loss` block. Configs saved
    before the fractions existed have none: 0."""
    return (
        start_step(
            loss.perceptual_start_step, loss.get("perceptual_start_fraction", 0.0), total_steps
        ),
        start_step(loss.disc_start_step, loss.get("disc_start_fraction", 0.0), total_steps),
    )


def logit_laplace_start(loss, total_steps: int) -> int:
    """The first logit-Laplace step of a stage-1 `loss` block (configs saved before its start
    keys existed: 0, from the first step)."""
    return start_step(
        loss.get("logit_laplace_start_step", 0),
        loss.get("logit_laplace_start_fraction", 0.0),
        total_steps,
    )


def warmup_steps(ocfg, total_steps: int) -> int:
    """The warmup of an `optimizer` block over a run of `total_steps`: `warmup_steps`, at most
    `max_warmup_fraction` of the run (never below one step where a warmup was asked for) and
    never past its end."""
    asked = max(0, int(ocfg.warmup_steps))
    fraction = float(ocfg.get("max_warmup_fraction", MAX_WARMUP_FRACTION))
    if fraction > 0 and asked > 0:
        asked = min(asked, max(1, round(fraction * int(total_steps))))
    return min(asked, int(total_steps))
