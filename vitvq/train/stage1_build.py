"""The stage-1 builder: from checked settings (`vitvq.config_check.check`) and a mesh, the
ViT-VQGAN, its discriminator, the optimizers, `init_state`, the train step of each phase and
the eval step.

Pure: it reads no data, writes nothing and imports no TensorFlow, clu, input or writer code,
so the trainer (`vitvq.train.stage1`), the memory and ahead-of-time reports (`vitvq.memory`,
`vitvq.aot`) and the step benchmark all build the same program from it.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import optax

from vitvq import parallel
from vitvq import settings as settings_lib
from vitvq.models.discriminator import discriminator_from_config
from vitvq.models.perceptual import lpips_fn
from vitvq.models.quantizers import is_ema
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.train import schedule, stage1_step
from vitvq.train.optim import make_optimizer
from vitvq.train.stage1_step import (
    Stage1Settings,
    Stage1State,
    eval_step,
    model_collections,
    phase_settings,
    train_step,
)

logger = logging.getLogger(__name__)

# trainable='decoder' (vitvq.settings.TRAINABLE): the generator's top-level modules it freezes.
FROZEN_FOR_DECODER = ("enc", "quantizer")


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


def step_settings(config) -> Stage1Settings:
    """The static settings of the train step, from checked settings."""
    loss, restart = config.loss, config.codebook_restart
    perceptual_start, disc_start = schedule.loss_starts(loss, config.total_steps)
    return Stage1Settings(
        l2=loss.l2,
        logit_laplace=loss.logit_laplace,
        perceptual=loss.perceptual,
        adversarial=loss.adversarial,
        vq=loss.vq,
        # Absent from configs saved before the entropy term existed: off.
        entropy=loss.get("entropy", 0.0),
        entropy_temperature=loss.get("entropy_temperature", 0.01),
        perceptual_start_step=perceptual_start,
        logit_laplace_start_step=schedule.logit_laplace_start(loss, config.total_steps),
        # Absent from configs saved before it existed: the whole image.
        perceptual_crop=int(loss.get("perceptual_crop", 0)),
        disc_start_step=disc_start,
        gan_loss=loss.gan_loss,
        r1_gamma=loss.r1_gamma,
        r1_every=loss.r1_every,
        lecam=loss.lecam,
        lecam_decay=loss.lecam_decay,
        # Absent from configs saved before it existed: off.
        adaptive_gan_weight=bool(loss.get("adaptive_gan_weight", False)),
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
        """`config`: settings from `vitvq.config_check.check`. A ConfigDict or a plain dict is
        frozen as it is: the builder checks nothing (check first)."""
        config = settings_lib.frozen(config)
        self.config = config
        self.mesh = mesh
        self.rules = parallel.normalize_rules(config.axis_rules, mesh)
        dtype = getattr(jnp, config.dtype)  # one of vitvq.settings.DTYPES (checked)
        self.model = build_vitvqgan(config.model.to_dict(), config.image_size, dtype)
        self.settings = step_settings(config)
        self.trainable = config.get("trainable", "all")
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
        self._quantizer_settings()
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

    def _quantizer_settings(self) -> None:
        """The k-means init and the dead-code restart rewrite a codebook of kind "vq" (its
        parameter, or with update="ema" its EMA codes); the other kinds ignore them (on by
        default, so that switching only the kind trains): FSQ and LFQ have no codebook, and
        SimVQ's codes are a fixed random basis times a learned map, which its paper keeps
        from collapsing without either. An EMA codebook is frozen with trainable="decoder"."""
        spec = self.model.quantization
        if spec.kind != "vq":
            s = self.settings
            if s.codebook_init != "normal" or s.restart_every > 0:
                logger.info(
                    "model.quantizer.kind=%r: codebook_init.kind=%r and the dead-code restart "
                    "(every %d steps) do not apply; ignored",
                    spec.kind,
                    s.codebook_init,
                    s.restart_every,
                )
            self.settings = dataclasses.replace(s, codebook_init="normal", restart_every=0)
        if is_ema(spec) and self.trainable == "decoder":
            logger.info("trainable='decoder': the EMA codebook is frozen")
            self.settings = dataclasses.replace(self.settings, codebook_ema_on=False)

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
        return parallel.abstract_state(self.init_state, self.mesh, self.rules)

    def create_state(self, seed: int):
        return parallel.create_state(self.init_state, self.mesh, self.rules, seed)

    # --- jitted functions ----------------------------------------------------------------

    def step_fn(self, step: int, **overrides):
        """The train step of `step`'s phase, not jitted: `(state, batch, perceptual) ->
        (state, metrics)`. `overrides` replace fields of its settings (the step benchmark
        times the steady state with `codebook_init="normal"`)."""
        settings = dataclasses.replace(phase_settings(self.settings, step), **overrides)
        return functools.partial(
            train_step,
            model=self.model,
            disc=self.disc,
            tx=self.tx,
            disc_tx=self.disc_tx,
            settings=settings,
            lr_schedule=self.schedule,
        )

    def train_step_jit(self, shardings, step: int):
        """The step of `step`'s phase, jitted (not yet compiled) with the state's shardings:
        `(state, batch, perceptual) -> (state, metrics)`, the state donated. Call or lower it
        under `parallel.use_mesh(self.mesh, self.rules)`."""
        step_fn = self.step_fn(step)
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
            collections = model_collections(state.vq_stats, state.quantizer_state)
            with parallel.use_mesh(self.mesh, self.rules):
                return jitted(params, collections, batch, self.perceptual)

        return run
