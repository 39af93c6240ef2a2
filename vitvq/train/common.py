"""Plumbing both trainers share: the workdir, checkpoint restore, the training and eval
batches and the loop's run. Everything here reads checked settings (`vitvq.settings`).
"""

import json
import logging
from collections.abc import Callable
from typing import Any

import jax

from vitvq import config_check, console, paths, peer_watchdog
from vitvq import data as data_lib
from vitvq.checkpoint import Checkpointer
from vitvq.errors import ConfigError
from vitvq.settings import Settings
from vitvq.train import curves

logger = logging.getLogger(__name__)

DATA_RECORD = "data.json"  # a workdir's record of its data (`data_record`)


def checked(config, trainer: str, mesh=None) -> Settings:
    """`config` checked once (`vitvq.config_check.check`: every key, the mesh against the
    devices, the batch sizes against the mesh and the processes); settings already checked
    pass as they are."""
    num_devices = mesh.devices.size if mesh is not None else jax.device_count()
    return config_check.check(
        config, trainer=trainer, num_devices=num_devices, process_count=jax.process_count()
    )


def data_record(config, info: dict, image_size: int) -> dict:
    """What a workdir records about its data (`data.json`): export reads it instead of the
    dataset, which may not be at hand where a run is exported. `info`: `dataset_info`'s."""
    return {
        "dataset": str(config.dataset.get("name", "")),
        "num_classes": int(info["num_classes"]),
        "class_names": list(info["class_names"]) if info.get("class_names") else None,
        "num_train": int(info["num_train"]),
        "num_eval": int(info["num_eval"]),
        "image_size": int(image_size),
    }


def prepare_workdir(config, workdir: str, data: dict | None = None) -> None:
    """Creates the workdir (a local path or a URL such as gs://bucket/run); process 0 writes
    the resolved config to `config.json` and, given `data` (`data_record`'s), `data.json`
    (each atomically: a resumed run never leaves them torn).

    A workdir that cannot be created or written is a ConfigError, before anything compiles.
    """
    try:
        paths.makedirs(workdir)
        if jax.process_index() == 0:
            text = Settings(config).to_json(indent=2)
            paths.write_text(paths.join(workdir, "config.json"), text)
            if data is not None:
                text = json.dumps(data, indent=2, sort_keys=True)
                paths.write_text(paths.join(workdir, DATA_RECORD), text)
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise ConfigError(
            f"cannot write to the workdir {paths.absolute(workdir)} ({reason}): choose a "
            "writable --workdir"
        ) from e


def say_size(title: str, num_params: int, mesh) -> None:
    """The console's first line of a stage (process 0): its size and where it runs."""
    if jax.process_index() == 0:
        platform = mesh.devices.flat[0].platform
        console.say(
            f"{title}: {num_params / 1e6:.2f}M parameters on {mesh.size} {platform} "
            f"device(s), mesh {dict(mesh.shape)}"
        )


def curves_writer(workdir: str, panels, title: str) -> Callable[[int], None]:
    """`after_eval(step)` for the loop: process 0 redraws `workdir`/curves.png."""

    def after_eval(step: int) -> None:
        if jax.process_index() == 0:
            curves.write_curves(workdir, panels, f"{title} ({workdir}), step {step}")

    return after_eval


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
    console.say(f"Resumed from the checkpoint of step {step} in {workdir}.")
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


def run_loop(
    task, config, checkpointer: Checkpointer, writer, *, summary: bool = True
) -> dict[str, float]:
    """Runs the shared loop, closes the checkpointer and writer; prints the final eval as a
    JSON line when `summary` (the loop has shown it as a readable line already)."""
    # deferred: TensorFlow and clu (the training loop); this module alone stays TF-free
    from vitvq.train import loop

    try:
        result = loop.run(task, loop.LoopSettings.from_config(config), checkpointer, writer)
    except Exception as e:
        # Another process is gone: exit now; closing would wait for it at a barrier.
        peer_watchdog.exit_if_peer_failure(e)
        raise
    finally:
        checkpointer.close()
        writer.close()
    if result and summary:
        print(json.dumps({"final_eval": result}, sort_keys=True))
    return result
