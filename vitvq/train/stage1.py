"""Stage-1 trainer: builds the ViT-VQGAN, its discriminator and optimizers from the config,
creates the state sharded on the mesh, and hands it to the shared loop.

Restore order (also in docs/config.md): the workdir's latest checkpoint, else the weights of
`config.init_from` (a bundle or another run's checkpoint) on a fresh state, else a fresh init.
`config.trainable = "decoder"` freezes the encoder and codebook (Parti's decoder fine-tuning).
"""

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitvq import config_check, losses, parallel, paths
from vitvq import data as data_lib
from vitvq.data.globalize import to_global, to_host
from vitvq.errors import ConfigError
from vitvq.evaluation import fid as fid_lib
from vitvq.evaluation.reconstruction import ReconstructionAccumulator
from vitvq.evaluation.tokenizer_eval import FeatureAccumulator
from vitvq.images import image_grid, save_png
from vitvq.models.discriminator import discriminator_from_config
from vitvq.models.perceptual import lpips_fn
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.train import common, loop, restore, stage1_step, writers
from vitvq.train.optim import make_optimizer
from vitvq.train.stage1_step import (
    Stage1Settings,
    Stage1State,
    eval_step,
    phase_settings,
    train_step,
)

logger = logging.getLogger(__name__)

# config.dtype: the compute dtype (the names are vitvq/config_check.py's).
DTYPES = {name: getattr(jnp, name) for name in config_check.DTYPES}
# config.trainable: which generator parameters train. "decoder": the encoder and the quantizer
# (its projection and codebook) are frozen, the code projection up and the decoder train.
TRAINABLE = config_check.TRAINABLE
FROZEN_FOR_DECODER = ("enc", "quantizer")


def trainable_mode(config) -> str:
    mode = config.get("trainable", "all")
    if mode not in TRAINABLE:
        raise ConfigError(f"unknown config.trainable {mode!r}; expected one of {TRAINABLE}")
    return mode


def freeze(tx: optax.GradientTransformation, frozen: tuple[str, ...]):
    """`tx` whose updates of the top-level modules in `frozen` are zero: they never change.

    The optimizer state keeps its usual structure (the moments of frozen parameters stay
    zero), so the state is sharded, checkpointed and restored like any other.
    """

    def mask(params):
        return {
            name: jax.tree_util.tree_map(lambda _, n=name: n in frozen, sub)
            for name, sub in params.items()
        }

    return optax.chain(tx, optax.masked(optax.set_to_zero(), mask))


def compute_dtype(config) -> Any:
    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {config.dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[config.dtype]


def settings_from_config(config) -> Stage1Settings:
    loss, restart = config.loss, config.codebook_restart
    if restart.every_steps > 0 and restart.threshold <= 0:
        raise ConfigError(f"codebook_restart.threshold must be > 0, got {restart.threshold}")
    if loss.get("entropy", 0.0) < 0 or loss.get("entropy_temperature", 0.01) <= 0:
        raise ConfigError(
            "loss.entropy must be >= 0 and loss.entropy_temperature > 0, got "
            f"{loss.get('entropy')} and {loss.get('entropy_temperature')}"
        )
    if loss.r1_gamma > 0 and loss.r1_every < 1:
        raise ConfigError(f"loss.r1_every must be >= 1, got {loss.r1_every}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    return Stage1Settings(
        l2=loss.l2,
        logit_laplace=loss.logit_laplace,
        perceptual=loss.perceptual,
        adversarial=loss.adversarial,
        vq=loss.vq,
        # Absent from configs saved before the entropy term existed: off.
        entropy=loss.get("entropy", 0.0),
        entropy_temperature=loss.get("entropy_temperature", 0.01),
        perceptual_start_step=loss.perceptual_start_step,
        disc_start_step=loss.disc_start_step,
        gan_loss=loss.gan_loss,
        r1_gamma=loss.r1_gamma,
        r1_every=loss.r1_every,
        lecam=loss.lecam,
        lecam_decay=loss.lecam_decay,
        ema_decay=config.ema_decay,
        restart_every=restart.every_steps,
        restart_threshold=restart.threshold,
        restart_start=restart.start_step,
        restart_stop=restart.stop_step,
        # Absent from configs saved before the k-means init existed: the paper's random init.
        codebook_init=config.get("codebook_init", {}).get("kind", "normal"),
        kmeans_iterations=config.get("codebook_init", {}).get("iterations", 10),
    )


class Stage1:
    """The models, optimizers and jitted functions of one stage-1 run."""

    def __init__(self, config, mesh):
        self.config = config
        self.mesh = mesh
        self.rules = parallel.normalize_rules(config.axis_rules, mesh)
        dtype = compute_dtype(config)
        self.model = build_vitvqgan(config.model.to_dict(), config.image_size, dtype)
        self.settings = settings_from_config(config)
        self.trainable = trainable_mode(config)
        if self.trainable == "decoder" and self.settings.restart_every > 0:
            # A restart rewrites codebook rows: it would change the frozen codebook.
            logger.info("trainable='decoder': dead-code restart is off (the codebook is frozen)")
            self.settings = dataclasses.replace(self.settings, restart_every=0)
        if self.settings.codebook_init != "normal" and (
            self.trainable == "decoder" or config.get("init_from")
        ):
            # The codebook comes from `init_from` (or is frozen): fitting it would replace it.
            logger.info("codebook_init: off (the codebook comes from init_from or is frozen)")
            self.settings = dataclasses.replace(self.settings, codebook_init="normal")
        if self.settings.gan_loss not in losses.GAN_LOSS_KINDS:
            raise ConfigError(
                f"unknown loss.gan_loss {self.settings.gan_loss!r}; "
                f"expected one of {losses.GAN_LOSS_KINDS}"
            )
        self.use_gan = config.loss.adversarial > 0
        self.disc = (
            discriminator_from_config(config.discriminator.to_dict(), config.image_size, dtype)
            if self.use_gan
            else None
        )
        self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)
        if self.trainable == "decoder":
            self.tx = freeze(self.tx, FROZEN_FOR_DECODER)
        self.disc_tx = (
            make_optimizer(config.disc_optimizer, config.total_steps)[0] if self.use_gan else None
        )
        # LPIPS weights are frozen inputs of the jitted functions, never part of the state.
        # On a TPU topology's compile-only devices (vitvq.aot) they stay on the host: a step
        # is only lowered and compiled there, from their shapes.
        needs_lpips = config.loss.perceptual > 0 or config.get("eval_lpips", True)
        self.perceptual = lpips_fn(dtype) if needs_lpips else None
        if needs_lpips and not parallel.is_compile_only(mesh):
            self.perceptual = jax.device_put(self.perceptual, parallel.replicated(mesh))
        self.train_perceptual = self.perceptual if config.loss.perceptual > 0 else None

    # --- state ---------------------------------------------------------------------------

    def init_state(self, rng: jax.Array) -> Stage1State:
        """A fresh state with logically annotated (boxed) parameters."""
        return stage1_step.init_state(
            rng,
            model=self.model,
            disc=self.disc,
            tx=self.tx,
            disc_tx=self.disc_tx,
            ema=self.settings.ema_decay > 0,
            image_size=self.config.image_size,
            batch=parallel.batch_ways(self.mesh),
        )

    def abstract_state(self):
        """(abstract state with shardings, shardings) without allocating anything."""
        return common.abstract_state(self.init_state, self.mesh, self.rules)

    def create_state(self, seed: int):
        return common.create_state(self.init_state, self.mesh, self.rules, seed)

    # --- jitted functions ----------------------------------------------------------------

    def train_step_jit(self, shardings, step: int):
        """The step of `step`'s phase, jitted (not yet compiled) with the state's shardings:
        `(state, batch, perceptual) -> (state, metrics)`, the state donated. Call or lower it
        under `parallel.use_mesh(self.mesh, self.rules)`."""
        step_fn = functools.partial(
            train_step,
            model=self.model,
            disc=self.disc,
            tx=self.tx,
            disc_tx=self.disc_tx,
            settings=phase_settings(self.settings, step),
            lr_schedule=self.schedule,
        )
        replicated = parallel.replicated(self.mesh)
        return jax.jit(
            step_fn,
            in_shardings=(shardings, parallel.batch_sharding(self.mesh), replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )

    def jit_train_step(self, shardings):
        """`run(state, batch, step=None)`: the step compiled for `step`'s phase of training.

        Phases (LPIPS on or off, GAN on or off, lazy-R1 step or not) are compiled once each,
        when first needed. `step` is the Python int of `state.step` (read from the device
        when not given).
        """
        compiled = {}

        def run(state, batch, step: int | None = None):
            if step is None:
                step = int(jax.device_get(state.step))
            settings = phase_settings(self.settings, step)
            if settings not in compiled:
                compiled[settings] = self.train_step_jit(shardings, step)
            with parallel.use_mesh(self.mesh, self.rules):
                return compiled[settings](state, batch, self.train_perceptual)

        return run

    def jit_eval_step(self):
        jitted = jax.jit(
            functools.partial(eval_step, model=self.model),
            out_shardings=parallel.replicated(self.mesh),
        )

        def run(state, batch):
            params = state.ema_params if self.settings.ema_decay > 0 else state.params
            with parallel.use_mesh(self.mesh, self.rules):
                return jitted(params, state.vq_stats, batch, self.perceptual)

        return run


def make_evaluator(trainer: Stage1, config):
    """`evaluate(state)`: reconstruction metrics and codebook usage over the eval split, and
    FID/IS of the reconstructions when `config.inception_weights` names a weights file."""
    eval_fn = trainer.jit_eval_step()
    inception = None
    if config.get("inception_weights"):
        inception = fid_lib.load_inception(config.inception_weights)

    def evaluate(state) -> dict[str, float]:
        acc = ReconstructionAccumulator(trainer.model.codebook_size)
        features = FeatureAccumulator(inception) if inception is not None else None
        for host_batch in common.eval_batches_from(config, config.image_size):
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
        logger.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        return result

    return evaluate, eval_fn


def make_image_writer(trainer: Stage1, config, workdir: str, writer, eval_fn):
    def write_images(state, step: int) -> None:
        host_batch = next(iter(common.eval_batches_from(config, config.image_size)))
        batch = to_global(host_batch, trainer.mesh)
        recon = to_host(eval_fn(state, batch)["reconstruction"])
        images = to_host(batch["image"])  # gathered from all processes
        grid = image_grid([images, recon])
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "images", f"reconstructions_{step:07d}.png"), grid)
        writer.write_images(step, {"reconstructions": grid[None]})

    return write_images


def check_config(config, mesh) -> None:
    """What needs the mesh, the files and the data, checked before building anything
    (ConfigError on a problem); every key's value was checked by `config_check.validate`."""
    common.check_loop_config(config, mesh)
    trainable_mode(config)
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


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains a ViT-VQGAN as configured; returns the final evaluation metrics."""
    # The keys (the mesh against the devices too) before anything is built.
    config_check.validate(config, trainer="vitvqgan", num_devices=jax.device_count())
    mesh = parallel.make_mesh(config.mesh)
    check_config(config, mesh)
    trainer = Stage1(config, mesh)
    common.prepare_workdir(config, workdir)
    abstract, shardings = trainer.abstract_state()
    checkpointer = common.open_checkpointer(config, workdir)

    def start():
        state, _ = trainer.create_state(config.seed)
        if config.get("init_from"):
            return restore.apply_init_from(state, shardings, config.init_from)
        logger.info("Started from a fresh init (seed %d).", config.seed)
        return state

    state = common.restore_or_start(checkpointer, abstract, start, workdir, config)

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    logger.info("generator parameters: %.2fM; mesh %s", n_params / 1e6, dict(mesh.shape))
    writer = writers.create_writer(workdir)
    writer.write_hparams(_flat_hparams(config))

    evaluate, eval_fn = make_evaluator(trainer, config)

    task = loop.Task(
        state=state,
        train_step=trainer.jit_train_step(shardings),
        train_batches=common.train_batches_from(config, config.image_size),
        mesh=mesh,
        evaluate=evaluate,
        write_images=make_image_writer(trainer, config, workdir, writer, eval_fn),
    )
    return common.run_loop(task, config, checkpointer, writer)


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
