"""Plumbing both trainers share: config checks of the loop, sharded state creation, the
workdir, checkpoint restore and the training batches.
"""

import json
import logging
from collections.abc import Callable
from typing import Any

import jax

from vitvq import data as data_lib
from vitvq import distributed, parallel, paths
from vitvq.checkpoint import Checkpointer
from vitvq.errors import ConfigError

logger = logging.getLogger(__name__)


def check_loop_config(config, mesh) -> None:
    """Batches that divide over the mesh, a non-negative step count, positive intervals."""
    for key in ("batch_size", "eval_batch_size"):
        try:
            parallel.validate_batch(config[key], mesh, jax.process_count())
        except ConfigError as e:  # its message says config.batch_size: name the real key
            raise ConfigError(str(e).replace("config.batch_size", f"config.{key}")) from None
    if config.total_steps < 0:
        raise ConfigError(f"total_steps must be >= 0, got {config.total_steps}")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if config[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {config[key]}")


def prepare_workdir(config, workdir: str) -> None:
    """Creates the workdir (a local path or a URL such as gs://bucket/run); process 0 writes
    the resolved config to `config.json` (atomically: a resumed run never leaves it torn).

    A workdir that cannot be created or written is a ConfigError, before anything compiles.
    """
    try:
        paths.makedirs(workdir)
        if jax.process_index() == 0:
            text = config.to_json_best_effort(indent=2)
            paths.write_text(paths.join(workdir, "config.json"), text)
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise ConfigError(
            f"cannot write to the workdir {paths.absolute(workdir)} ({reason}): choose a "
            "writable --workdir"
        ) from e


def open_checkpointer(config, workdir: str) -> Checkpointer:
    return Checkpointer(
        paths.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_every_steps=config.checkpoint_every_steps,
    )


def restore_or_start(
    checkpointer: Checkpointer, abstract, start: Callable[[], Any], workdir: str, config
):
    """The workdir's newest intact checkpoint, else `start()` (a fresh or initialized state);
    when every checkpoint is damaged, an error unless `config.restart_from_scratch`."""
    restored = checkpointer.restore_latest(
        abstract, restart_from_scratch=bool(config.get("restart_from_scratch", False))
    )
    if restored is None:
        return start()
    state, step = restored
    logger.info("Resumed from the checkpoint of step %d in %s.", step, workdir)
    return state


def train_batches_from(config, image_size: int) -> Callable[[int], Any]:
    """start step -> this process's training batches of the configured dataset."""

    def batches(start_step: int):
        return data_lib.train_batches(
            config.dataset,
            image_size=image_size,
            global_batch_size=config.batch_size,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    return batches


def eval_batches_from(config, image_size: int):
    """This process's batches of one pass over the configured eval split."""
    return data_lib.eval_batches(
        config.dataset,
        image_size=image_size,
        global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_examples=config.eval_num_examples or None,
    )


def run_loop(task, config, checkpointer: Checkpointer, writer) -> dict[str, float]:
    """Runs the shared loop, closes the checkpointer and writer, prints the final eval."""
    # deferred: TensorFlow and clu (the training loop); this module alone stays TF-free
    from vitvq.train import loop

    try:
        result = loop.run(task, loop.LoopSettings.from_config(config), checkpointer, writer)
    except Exception as e:
        # Another process is gone: exit now; closing would wait for it at a barrier.
        distributed.exit_if_peer_failure(e)
        raise
    finally:
        checkpointer.close()
        writer.close()
    if result:
        print(json.dumps({"final_eval": result}, sort_keys=True))
    return result
