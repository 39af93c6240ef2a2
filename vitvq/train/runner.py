"""The one skeleton both trainers run: `run(stage, config, workdir)`.

A training run of either stage goes: the config checked once (every key, the mesh against
the devices, the batch sizes against the mesh and the processes), the mesh, the stage's
builder, the workdir (`config.json`, `data.json`), the checkpointer, the workdir's newest
intact checkpoint or else the stage's start, the size line, the metric writer, the loop, and
the final metrics as a JSON line. A stage supplies only what differs, as a `Stage`: its
check, its builder, how it starts, its evaluation and images, its console fields and curves
(vitvq/train/stage1.py, stage2.py).

The helpers take the values they use, not the settings: `open_checkpointer` the workdir, the
interval and the keep count; `train_batches` and `eval_batches` the dataset block and the
batch size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vitvq import config_check, console, parallel, paths, peer_watchdog
from vitvq import data as data_lib
from vitvq.checkpoint import Checkpointer
from vitvq.errors import ConfigError
from vitvq.settings import Settings
from vitvq.train import curves

logger = logging.getLogger(__name__)

DATA_RECORD = "data.json"  # a workdir's record of its data (`data_record`)


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one stage brings to `run`; everything else is the same for both.

    `check(config, mesh=None)` -> checked settings (ConfigError on the first bad key);
    `build(settings, mesh)` -> the stage's builder (models, optimizers, jitted steps, with
    `abstract_state()`, `jit_train_step(shardings)` and `mesh`);
    `image_size(builder)` -> the size of the images it trains on;
    `start(builder, settings, shardings)` -> the state of a run with no checkpoint (a fresh
    init or `init_from`), saying which in one line;
    `loop_parts(builder, settings, workdir, writer)` -> (evaluate(state) -> metrics,
    write_images(state, step)).
    """

    title: str  # the console's name of the stage: "tokenizer", "VIM"
    params_label: str  # the parameter count's log line: "generator", "VIM"
    check: Callable[..., Settings]
    build: Callable[[Settings, Any], Any]
    image_size: Callable[[Any], int]
    start: Callable[[Any, Settings, Any], Any]
    loop_parts: Callable[[Any, Settings, str, Any], tuple[Callable, Callable]]
    panels: tuple  # curves.png's panels (vitvq.train.curves)
    progress_fields: tuple  # the progress line's (metric, label, format)
    eval_fields: tuple  # the eval line's


def run(stage: Stage, config, workdir: str, *, summary: bool = True) -> dict[str, float]:
    """Trains `stage` as `config` says in `workdir`; returns the final evaluation metrics,
    printed as the JSON line `{"final_eval": ...}` at the end when `summary`.

    `config`: a ConfigDict, or settings already checked (by the stage's check or the
    pipeline's); past the check it is frozen. A folder or tfds dataset is opened (a folder
    listed) once for the whole run, not again for each evaluation."""
    with data_lib.sources_kept():
        return _run(stage, stage.check(config), workdir, summary=summary)


def _run(stage: Stage, config, workdir: str, *, summary: bool) -> dict[str, float]:
    # deferred: TensorFlow and clu (the training loop and its writers)
    from vitvq.train import loop, writers

    mesh = parallel.make_mesh(config.mesh)
    trainer = stage.build(config, mesh)
    image_size = int(stage.image_size(trainer))
    info = data_lib.dataset_info(config.dataset)
    prepare_workdir(config, workdir, data_record(config, info, image_size))
    abstract, shardings = trainer.abstract_state()
    checkpointer = open_checkpointer(
        workdir, every=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    state = restore_or_start(
        checkpointer,
        abstract,
        lambda: stage.start(trainer, config, shardings),
        workdir,
        restart_from_scratch=bool(config.get("restart_from_scratch", False)),
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    logger.info(
        "%s parameters: %.2fM; mesh %s", stage.params_label, n_params / 1e6, dict(mesh.shape)
    )
    _say_size(stage.title, n_params, mesh)
    writer = writers.create_writer(workdir)
    evaluate, write_images = stage.loop_parts(trainer, config, workdir, writer)
    task = loop.Task(
        state=state,
        train_step=trainer.jit_train_step(shardings),
        train_batches=train_batches(
            config.dataset, image_size=image_size, batch_size=config.batch_size, seed=config.seed
        ),
        mesh=mesh,
        evaluate=evaluate,
        write_images=write_images,
        title=stage.title,
        after_eval=_curves_writer(workdir, stage.panels, stage.title),
        progress_fields=stage.progress_fields,
        eval_fields=stage.eval_fields,
    )
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


# --- the plumbing ---------------------------------------------------------------------------


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


def open_checkpointer(workdir: str, *, every: int, keep: int) -> Checkpointer:
    """The checkpointer of `workdir`/checkpoints: a save every `every` steps, `keep` kept."""
    return Checkpointer(
        paths.join(workdir, "checkpoints"), max_to_keep=keep, save_every_steps=every
    )


def restore_or_start(
    checkpointer: Checkpointer,
    abstract,
    start: Callable[[], Any],
    workdir: str,
    *,
    restart_from_scratch: bool = False,
):
    """The workdir's newest intact checkpoint, else `start()` (a fresh or initialized state);
    when every checkpoint is damaged, an error unless `restart_from_scratch`."""
    restored = checkpointer.restore_latest(abstract, restart_from_scratch=restart_from_scratch)
    if restored is None:
        return start()
    state, step = restored
    console.say(f"Resumed from the checkpoint of step {step} in {workdir}.")
    return state


def train_batches(dataset, *, image_size: int, batch_size: int, seed: int) -> Callable[[int], Any]:
    """start step -> this process's training batches of `dataset` (the config's block):
    `batch_size` images in all processes together."""

    def batches(start_step: int):
        return data_lib.train_batches(
            dataset,
            image_size=image_size,
            global_batch_size=batch_size,
            seed=seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    return batches


def eval_batches(dataset, *, image_size: int, batch_size: int, num_examples: int | None):
    """This process's batches of one pass over `dataset`'s eval split (`num_examples` of it,
    None: all), `batch_size` images in all processes together."""
    return data_lib.eval_batches(
        dataset,
        image_size=image_size,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_examples=num_examples,
    )


def _say_size(title: str, num_params: int, mesh) -> None:
    """The console's first line of a stage (process 0): its size and where it runs."""
    if jax.process_index() == 0:
        platform = mesh.devices.flat[0].platform
        console.say(
            f"{title}: {num_params / 1e6:.2f}M parameters on {mesh.size} {platform} "
            f"device(s), mesh {dict(mesh.shape)}"
        )


def _curves_writer(workdir: str, panels, title: str) -> Callable[[int], None]:
    """`after_eval(step)` for the loop: process 0 redraws `workdir`/curves.png."""

    def after_eval(step: int) -> None:
        if jax.process_index() == 0:
            curves.write_curves(workdir, panels, f"{title} ({workdir}), step {step}")

    return after_eval
