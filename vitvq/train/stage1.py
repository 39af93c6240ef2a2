"""Stage-1 trainer: builds the ViT-VQGAN, its discriminator and optimizers from the config,
creates the state sharded on the mesh, and hands it to the shared loop.

Restore order (also in docs/config.md): the workdir's latest checkpoint, else the weights of
`config.init_from` (a bundle or another run's checkpoint) on a fresh state, else a fresh init.
`config.trainable = "decoder"` freezes the encoder and codebook (Parti's decoder fine-tuning).
"""

import logging
import os
from typing import Any

import jax
import numpy as np

from vitvq import console, paths
from vitvq import data as data_lib
from vitvq.data.globalize import to_global, to_host
from vitvq.errors import ConfigError
from vitvq.evaluation import fid as fid_lib
from vitvq.evaluation.reconstruction import ReconstructionAccumulator
from vitvq.evaluation.tokenizer_eval import FeatureAccumulator
from vitvq.pictures import image_grid, save_png
from vitvq.settings import Settings
from vitvq.train import curves, restore, runner
from vitvq.train.stage1_build import (  # noqa: F401  (Stage1 and its helpers, re-exported)
    FROZEN_FOR_DECODER,
    Stage1,
    freeze,
    step_settings,
)

logger = logging.getLogger(__name__)

# The console's progress line and eval lines (vitvq.console): (metric key, label, format).
PROGRESS_FIELDS = (
    ("loss/total", "loss", ".4f"),
    ("loss/l2", "L2", ".4f"),
    ("vq/codes_used", "codes", ".0f"),
    ("vq/perplexity", "perplexity", ".0f"),
)
EVAL_FIELDS = (
    ("psnr", "PSNR", ".2f"),
    ("ssim", "SSIM", ".3f"),
    ("lpips", "LPIPS", ".3f"),
    ("codebook_usage", "usage", ".1%"),
    ("fid", "FID", ".2f"),
)


def _eval_batches(config):
    return runner.eval_batches(
        config.dataset,
        image_size=config.image_size,
        batch_size=config.eval_batch_size,
        num_examples=config.eval_num_examples or None,
    )


def make_evaluator(trainer: Stage1, config):
    """`evaluate(state)`: reconstruction metrics and codebook usage over the eval split, and
    FID/IS of the reconstructions when `config.inception_weights` names a weights file."""
    eval_fn = trainer.jit_eval_step()
    inception = None
    if config.get("inception_weights"):
        inception = fid_lib.load_inception(config.inception_weights)

    def evaluate(state) -> dict[str, float]:
        acc = ReconstructionAccumulator(trainer.model.num_codes)
        features = FeatureAccumulator(inception) if inception is not None else None
        for host_batch in _eval_batches(config):
            batch = to_global(host_batch, trainer.mesh)
            out = eval_fn(state, batch)
            recon = out.pop("reconstruction")
            out = jax.device_get(out)
            acc.update(out["per_example"], out["mask"], out["code_counts"], out["batch_codes_used"])
            if features is not None:
                real = np.asarray(out["mask"]) > 0
                images = to_host(batch["image"])[real]  # gathered from all processes
                recon = to_host(recon)[real]
                features.update(
                    np.round(images * 255.0).astype(np.uint8),
                    np.round(recon * 255.0).astype(np.uint8),
                )
        result = acc.result()
        if features is not None:
            result.update(features.result())
        return result

    return evaluate, eval_fn


def make_image_writer(trainer: Stage1, config, workdir: str, writer, eval_fn):
    def write_images(state, step: int) -> None:
        host_batch = next(iter(_eval_batches(config)))
        batch = to_global(host_batch, trainer.mesh)
        recon = to_host(eval_fn(state, batch)["reconstruction"])
        images = to_host(batch["image"])  # gathered from all processes
        grid = image_grid([images, recon])
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "images", f"reconstructions_{step:07d}.png"), grid)
        writer.write_images(step, {"reconstructions": grid[None]})

    return write_images


def check_config(config, mesh=None) -> Settings:
    """`config` as checked settings: every key's value, the mesh against the devices and the
    batch sizes against the mesh and the processes (`vitvq.config_check.check`), then what needs
    the files and the data. Raises ConfigError (one line) on the first problem."""
    config = runner.checked(config, "vitvqgan", mesh)
    init_from = config.get("init_from")
    if init_from and not paths.exists(init_from):  # a local path or a URL (gs://...)
        raise ConfigError(f"config.init_from={init_from} does not exist")
    weights = config.get("inception_weights")
    if weights and not os.path.isfile(weights):  # read when evaluating: fail before training
        raise ConfigError(
            f"config.inception_weights={weights} does not exist; allowed: None (no FID) or the "
            "safetensors file of scripts/convert_inception_weights.py"
        )
    info = data_lib.dataset_info(config.dataset)  # unknown or missing datasets fail here
    logger.info("dataset: %s", info)
    return config


def train_and_evaluate(config, workdir: str, *, summary: bool = True) -> dict[str, float]:
    """Trains a ViT-VQGAN as configured; returns the final evaluation metrics.

    `config`: a ConfigDict, or settings `check_config` (or the pipeline) already checked.
    `summary`: print them as the JSON line `{"final_eval": ...}` at the end (a command's
    last line; the pipeline prints one for all its stages)."""
    return runner.run(STAGE, config, workdir, summary=summary)


def _start(trainer: Stage1, config, shardings):
    """A run with no checkpoint: a fresh init, with `config.init_from`'s weights if given."""
    state, _ = trainer.create_state(config.seed)
    if config.get("init_from"):
        return restore.apply_init_from(state, shardings, config.init_from)
    console.say(f"Started from a fresh init (seed {config.seed}).")
    return state


def _loop_parts(trainer: Stage1, config, workdir: str, writer):
    writer.write_hparams(_flat_hparams(config))
    evaluate, eval_fn = make_evaluator(trainer, config)
    return evaluate, make_image_writer(trainer, config, workdir, writer, eval_fn)


def _flat_hparams(config) -> dict[str, Any]:
    out = {}

    def visit(prefix, value):
        if hasattr(value, "items"):
            for k, v in value.items():
                visit(f"{prefix}{k}.", v)
        elif isinstance(value, bool | int | float | str):
            out[prefix[:-1]] = value
        else:
            out[prefix[:-1]] = str(value)

    visit("", config.to_dict())
    return out


STAGE = runner.Stage(
    title="tokenizer",
    params_label="generator",
    check=check_config,
    build=Stage1,
    image_size=lambda trainer: trainer.config.image_size,
    start=_start,
    loop_parts=_loop_parts,
    panels=curves.STAGE1_PANELS,
    progress_fields=PROGRESS_FIELDS,
    eval_fields=EVAL_FIELDS,
)
