"""Stage-2 trainer: a VIM over the codes of a frozen tokenizer (`config.tokenizer_bundle`).

The tokenizer's encoder runs inside the jitted step on the augmented images (its weights are
an argument of the step, never part of the state). Restore order: the workdir's latest
checkpoint, else `config.init_from` (a bundle with a VIM, a stage-2 workdir or its checkpoints,
trained on the same tokenizer; its optimizer state and step start fresh), else a fresh init.
"""

import logging
import math
import os

import jax
import numpy as np

from vitvq import console, paths
from vitvq import data as data_lib
from vitvq.data.globalize import to_global
from vitvq.errors import ConfigError
from vitvq.pictures import image_grid, save_png
from vitvq.settings import Settings
from vitvq.train import curves, restore, runner
from vitvq.train.stage2_build import Stage2, load_frozen_tokenizer  # noqa: F401

logger = logging.getLogger(__name__)

# The console's progress line and eval lines (vitvq.console): (metric key, label, format).
PROGRESS_FIELDS = (("loss", "loss", ".4f"), ("accuracy", "accuracy", ".3f"))
EVAL_FIELDS = (
    ("loss", "loss", ".4f"),
    ("bits_per_token", "bits/token", ".3f"),
    ("accuracy", "accuracy", ".3f"),
)


def check_config(config, mesh=None) -> Settings:
    """`config` as checked settings: every key's value, the mesh against the devices and the
    batch sizes against the mesh and the processes (`vitvq.config_check.check`), then what needs
    the files and the data. Raises ConfigError (one line) on the first problem."""
    config = runner.checked(config, "vim", mesh)
    init_from = config.get("init_from")
    if init_from and not paths.exists(init_from):  # a local path or a URL (gs://...)
        raise ConfigError(f"config.init_from={init_from} does not exist")
    if not config.get("tokenizer_bundle"):
        raise ConfigError(
            "config.tokenizer_bundle is required: a stage-1 bundle (python -m vitvq.export)"
        )
    data_lib.dataset_info(config.dataset)
    return config


def _sample_labels(num_classes: int, per_class: int) -> np.ndarray | None:
    if not num_classes:
        return None
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def train_and_evaluate(config, workdir: str, *, summary: bool = True) -> dict[str, float]:
    """Trains a VIM as configured; returns the final evaluation metrics.

    `config`: a ConfigDict, or settings `check_config` (or the pipeline) already checked.
    `summary`: print them as the JSON line `{"final_eval": ...}` at the end (a command's
    last line; the pipeline prints one for all its stages)."""
    return runner.run(STAGE, config, workdir, summary=summary)


def _start(trainer: Stage2, config, shardings):
    """A run with no checkpoint: a fresh init, with `config.init_from`'s VIM if given."""
    state = trainer.create_state(config.seed)[0]
    if config.get("init_from"):
        codebook = restore.code_table(trainer.tokenizer, trainer.tok_vars)
        return restore.apply_vim_init_from(state, shardings, config.init_from, codebook)
    console.say(f"Started from a fresh init (seed {config.seed}).")
    return state


def _loop_parts(trainer: Stage2, config, workdir: str, writer):
    eval_fn = trainer.jit_eval_step()

    def evaluate(state) -> dict[str, float]:
        sums = {"ce_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
        batches = runner.eval_batches(
            config.dataset,
            image_size=trainer.image_size,
            batch_size=config.eval_batch_size,
            num_examples=config.eval_num_examples or None,
        )
        for host_batch in batches:
            out = jax.device_get(eval_fn(state, to_global(host_batch, trainer.mesh)))
            for k in sums:
                sums[k] += float(out[k])
        n = max(sums["tokens"], 1.0)
        loss = sums["ce_sum"] / n
        return {
            "loss": loss,
            "bits_per_token": loss / math.log(2.0),
            "accuracy": sums["correct_sum"] / n,
        }

    def write_images(state, step: int) -> None:
        labels = _sample_labels(trainer.num_classes, int(config.sampling.num_per_class))
        images = trainer.sample_images(state.params, labels, seed=config.seed + step)
        per_row = int(config.sampling.num_per_class) if labels is not None else 8
        rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
        grid = image_grid([r.astype(np.float32) / 255.0 for r in rows])
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "images", f"samples_{step:07d}.png"), grid)
        writer.write_images(step, {"samples": grid[None]})

    return evaluate, write_images


STAGE = runner.Stage(
    title="VIM",
    params_label="VIM",
    check=check_config,
    build=Stage2,
    image_size=lambda trainer: trainer.image_size,
    start=_start,
    loop_parts=_loop_parts,
    panels=curves.STAGE2_PANELS,
    progress_fields=PROGRESS_FIELDS,
    eval_fields=EVAL_FIELDS,
)
