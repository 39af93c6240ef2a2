"""The training loop shared by both stages.

A stage hands over a `Task`: its sharded state, its jitted step, its batches as a function of
the start step, and its evaluation and image hooks. The loop owns the rest: global batches,
metrics fetched one step late (the host never waits on the device), console progress,
`metrics.jsonl` and TensorBoard, periodic evaluation and images, checkpoints at intervals,
on preemption and at the end, and the stop on consecutive non-finite steps.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from clu import periodic_actions

from vitvq import console, preemption
from vitvq.data import screen
from vitvq.data.globalize import to_global
from vitvq.errors import VitvqError

logger = logging.getLogger(__name__)


class TrainingStopped(VitvqError):
    """The run stopped itself (non-finite losses); the last checkpoint is kept as it was."""


@dataclasses.dataclass
class Task:
    """What a stage hands the loop."""

    state: Any  # sharded train state; `state.step` is where training starts
    # (state, batch, step) -> (state, metrics); jitted, donates the state; `step` is the
    # Python int of state.step, so the stage can pick a step compiled for that phase.
    train_step: Callable[[Any, dict, int], tuple[Any, dict]]
    train_batches: Callable[[int], Iterator[dict]]  # start step -> host batches (numpy)
    mesh: jax.sharding.Mesh
    evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> eval metrics
    write_images: Callable[[Any, int], None] | None = None  # (state, step) -> PNG/summaries
    # The console (process 0): the progress line's title and the training metrics it shows,
    # and the evaluation metrics of each eval line ((key, label, format) each).
    title: str = "train"
    after_eval: Callable[[int], None] | None = None  # step -> e.g. redraw curves.png
    progress_fields: tuple[console.Field, ...] = ()
    eval_fields: tuple[console.Field, ...] = ()


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    log_every_steps: int
    eval_every_steps: int
    image_every_steps: int
    checkpoint_every_steps: int
    max_consecutive_nonfinite: int

    @classmethod
    def from_config(cls, config) -> "LoopSettings":
        return cls(
            total_steps=config.total_steps,
            log_every_steps=config.log_every_steps,
            eval_every_steps=config.eval_every_steps,
            image_every_steps=config.get("image_every_steps", config.eval_every_steps),
            checkpoint_every_steps=config.checkpoint_every_steps,
            max_consecutive_nonfinite=config.get("max_consecutive_nonfinite", 10),
        )


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def run(task: Task, settings: LoopSettings, checkpointer, writer) -> dict[str, float]:
    """Trains from `task.state.step` to `settings.total_steps`; returns the last eval metrics.

    Raises TrainingStopped after `max_consecutive_nonfinite` skipped steps in a row; returns
    early (after a checkpoint) when a preemption notice (or, in a single process, SIGTERM:
    `vitvq.preemption`) arrives.
    """
    preemption.note_stopped(None)
    with preemption.sigterm_checkpoints(jax.process_count()):
        return _run(task, settings, checkpointer, writer)


def _run(task: Task, settings: LoopSettings, checkpointer, writer) -> dict[str, float]:
    state = task.state
    step = int(jax.device_get(state.step))
    total = settings.total_steps
    final_eval: dict[str, float] = {}
    lead = jax.process_index() == 0

    def show_eval(at: int, metrics: dict[str, float]) -> None:
        logger.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if lead:
            console.say(f"{task.title} " + console.eval_line(at, metrics, task.eval_fields))
        if task.after_eval is not None:
            task.after_eval(at)

    if step >= total:
        if lead:
            console.say(f"{task.title}: step {step} already reached total_steps={total}")
        if task.evaluate is not None:
            final_eval = task.evaluate(state)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in final_eval.items()})
            show_eval(step, final_eval)
        return final_eval

    progress = (
        console.Progress(task.title, total, start=step, fields=task.progress_fields)
        if lead
        else console.Silent()
    )
    try:
        return _train(task, step, settings, checkpointer, writer, progress, show_eval)
    finally:
        progress.close()


def _train(task, step, settings, checkpointer, writer, progress, show_eval) -> dict[str, float]:
    """Trains from `step` (the Python int of `task.state.step`) to total_steps."""
    state = task.state
    total = settings.total_steps
    final_eval: dict[str, float] = {}

    report = periodic_actions.ReportProgress(
        num_train_steps=total, writer=writer, every_steps=max(1, settings.log_every_steps)
    )
    batches = task.train_batches(step)
    pending: tuple[int, dict] | None = None
    first_step_time = None

    def finish(done_step: int, metrics: dict) -> None:
        """Handles the metrics of an earlier step (fetched one step late)."""
        nonfinite = int(jax.device_get(metrics["nonfinite_steps"]))
        if nonfinite:
            logger.warning("Step %d: non-finite loss or gradient; update skipped.", done_step)
        if nonfinite >= settings.max_consecutive_nonfinite:
            raise TrainingStopped(
                f"stopped at step {done_step}: {nonfinite} consecutive steps had non-finite "
                f"losses or gradients (limit max_consecutive_nonfinite="
                f"{settings.max_consecutive_nonfinite}); the last checkpoint was not overwritten "
                "with this state. Lower the learning rate or check the data."
            )
        if _due(done_step, settings.log_every_steps) or done_step == total:
            values = jax.device_get(metrics)
            scalars = {f"train/{k}": np.asarray(v) for k, v in values.items()}
            scalars["data/skipped_images"] = screen.skipped_images()  # unreadable files
            writer.write_scalars(done_step, scalars)
            progress.update(done_step, {k: float(np.mean(v)) for k, v in values.items()})

    if preemption.requested():  # during startup: the state is the saved one (or a fresh init)
        logger.warning("Preemption notice before step %d: exiting without training.", step)
        preemption.note_stopped(step)
        return final_eval
    while step < total:
        batch = to_global(next(batches), task.mesh)
        state, metrics = task.train_step(state, batch, step)
        step += 1
        if first_step_time is None:
            first_step_time = time.time()
        if pending is not None:
            finish(*pending)
        pending = (step, metrics)
        report(step)
        progress.update(step)

        if _due(step, settings.checkpoint_every_steps):
            checkpointer.save(step, state)
        if checkpointer.reached_preemption(step):
            finish(*pending)
            checkpointer.save(step, state, force=True)
            checkpointer.wait()
            logger.warning("Preemption notice at step %d: checkpoint written, exiting.", step)
            preemption.note_stopped(step)
            return final_eval
        if task.evaluate is not None and (_due(step, settings.eval_every_steps) or step == total):
            final_eval = task.evaluate(state)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in final_eval.items()})
            show_eval(step, final_eval)
        if task.write_images is not None and (
            _due(step, settings.image_every_steps) or step == total
        ):
            task.write_images(state, step)

    finish(*pending)
    checkpointer.save(step, state, force=True)
    checkpointer.wait()
    writer.flush()
    return final_eval
