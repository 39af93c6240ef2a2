"""Stage-2 trainer: a VIM over the codes of a frozen tokenizer (`config.tokenizer_bundle`).

The tokenizer's encoder runs inside the jitted step on the augmented images (its weights are
an argument of the step, never part of the state). Restore order: the workdir's latest
checkpoint, else `config.init_from` (a bundle with a VIM, a stage-2 workdir or its checkpoints,
trained on the same tokenizer; its optimizer state and step start fresh), else a fresh init.
"""

import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from vitvq import bundle, config_check, parallel, paths, sampling
from vitvq import data as data_lib
from vitvq.data.globalize import to_global
from vitvq.errors import ConfigError
from vitvq.images import image_grid, save_png
from vitvq.models.vim import build_vim
from vitvq.train import common, loop, restore, stage2_step, writers
from vitvq.train.optim import make_adam
from vitvq.train.stage1 import compute_dtype
from vitvq.train.stage2_step import Stage2Settings, Stage2State, eval_step, train_step

logger = logging.getLogger(__name__)


def load_frozen_tokenizer(path: str):
    """(manifest, ViTVQGAN module, variables as numpy) of a bundle's tokenizer."""
    if not path:
        raise ConfigError(
            "config.tokenizer_bundle is required: a stage-1 bundle (python -m vitvq.export)"
        )
    return bundle.load_tokenizer_variables(path)


class Stage2:
    """The VIM, the frozen tokenizer and the jitted functions of one stage-2 run."""

    def __init__(self, config, mesh, tokenizer=None):
        self.config = config
        self.mesh = mesh
        self.rules = parallel.normalize_rules(config.axis_rules, mesh)
        manifest, self.tokenizer, tok_vars = tokenizer or load_frozen_tokenizer(
            config.tokenizer_bundle
        )
        self.manifest = manifest
        self.image_size = self.tokenizer.image_size
        if config.get("image_size") and int(config.image_size) != self.image_size:
            raise ConfigError(
                f"config.image_size={config.image_size} but the tokenizer bundle "
                f"{config.tokenizer_bundle} encodes {self.image_size}x{self.image_size} "
                "images: leave image_size unset or make it equal"
            )
        self.num_classes = int(config.dataset.get("num_classes", 0) or 0)
        if not 0.0 <= config.class_dropout < 1.0:
            raise ConfigError(f"class_dropout must be in [0, 1), got {config.class_dropout}")
        self.settings = Stage2Settings(
            num_classes=self.num_classes, class_dropout=float(config.class_dropout)
        )
        self.model = build_vim(
            config.model.to_dict(),
            vocab_size=self.tokenizer.codebook_size,
            grid_size=self.tokenizer.grid_size,
            num_classes=self.num_classes,
            dtype=compute_dtype(config),
        )
        self.tx, self.schedule = make_adam(config.optimizer, config.total_steps)
        self.tok_vars = jax.device_put(tok_vars, parallel.replicated(mesh))
        tok = self.tokenizer
        self._decode = jax.jit(  # codes -> uint8 images, for the sample grids
            lambda v, c: jnp.round(tok.apply(v, c, method=tok.decode) * 255.0).astype(jnp.uint8)
        )

    def init_state(self, rng: jax.Array) -> Stage2State:
        return stage2_step.init_state(
            rng,
            model=self.model,
            tx=self.tx,
            num_tokens=self.tokenizer.grid_size**2,
            num_classes=self.num_classes,
            batch=parallel.batch_ways(self.mesh),
        )

    def abstract_state(self):
        return common.abstract_state(self.init_state, self.mesh, self.rules)

    def create_state(self, seed: int):
        return common.create_state(self.init_state, self.mesh, self.rules, seed)

    def train_step_jit(self, shardings):
        """The step jitted (not yet compiled) with the state's shardings: `(state, batch,
        tokenizer variables) -> (state, metrics)`, the state donated. Call or lower it under
        `parallel.use_mesh(self.mesh, self.rules)`."""
        fn = functools.partial(
            train_step,
            model=self.model,
            tokenizer=self.tokenizer,
            tx=self.tx,
            settings=self.settings,
            lr_schedule=self.schedule,
        )
        replicated = parallel.replicated(self.mesh)
        return jax.jit(
            fn,
            in_shardings=(shardings, parallel.batch_sharding(self.mesh), replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )

    def jit_train_step(self, shardings):
        jitted = self.train_step_jit(shardings)

        def run(state, batch, step=None):
            del step
            with parallel.use_mesh(self.mesh, self.rules):
                return jitted(state, batch, self.tok_vars)

        return run

    def jit_eval_step(self):
        jitted = jax.jit(
            functools.partial(
                eval_step, model=self.model, tokenizer=self.tokenizer, settings=self.settings
            ),
            out_shardings=parallel.replicated(self.mesh),
        )

        def run(state, batch):
            with parallel.use_mesh(self.mesh, self.rules):
                return jitted(state.params, batch, self.tok_vars)

        return run

    def sample_images(self, params, labels, seed: int) -> np.ndarray:
        """uint8 [N, H, W, 3] samples with the config's sampling settings."""
        sc = self.config.sampling
        labels = None if labels is None else jnp.asarray(labels, jnp.int32)
        n = len(labels) if labels is not None else int(sc.num_samples)
        tokens = sampling.sample_tokens(
            self.model,
            params,
            jax.random.key(seed),
            batch_size=n,
            labels=labels,
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
            cfg_scale=sc.cfg_scale if labels is not None else 1.0,
        )
        g = self.tokenizer.grid_size
        codes = jax.device_put(jnp.asarray(tokens).reshape(n, g, g), parallel.replicated(self.mesh))
        return np.asarray(self._decode(self.tok_vars, codes))


def check_config(config, mesh) -> None:
    """What needs the mesh, the files and the data, checked before building anything
    (ConfigError on a problem); every key's value was checked by `config_check.validate`."""
    common.check_loop_config(config, mesh)
    init_from = config.get("init_from")
    if init_from and not paths.exists(init_from):  # a local path or a URL (gs://...)
        raise ConfigError(f"config.init_from={init_from} does not exist")
    if not config.get("tokenizer_bundle"):
        raise ConfigError(
            "config.tokenizer_bundle is required: a stage-1 bundle (python -m vitvq.export)"
        )
    data_lib.dataset_info(config.dataset)


def _sample_labels(num_classes: int, per_class: int) -> np.ndarray | None:
    if not num_classes:
        return None
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains a VIM as configured; returns the final evaluation metrics."""
    # The keys (the mesh against the devices too) before anything is built.
    config_check.validate(config, trainer="vim", num_devices=jax.device_count())
    mesh = parallel.make_mesh(config.mesh)
    check_config(config, mesh)
    trainer = Stage2(config, mesh)
    common.prepare_workdir(config, workdir)
    abstract, shardings = trainer.abstract_state()
    checkpointer = common.open_checkpointer(config, workdir)

    def start():
        state = trainer.create_state(config.seed)[0]
        if config.get("init_from"):
            codebook = np.asarray(
                jax.device_get(trainer.tok_vars["params"]["quantizer"]["codebook"])
            )
            return restore.apply_vim_init_from(state, shardings, config.init_from, codebook)
        logger.info("Started from a fresh init (seed %d).", config.seed)
        return state

    state = common.restore_or_start(checkpointer, abstract, start, workdir, config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    logger.info("VIM parameters: %.2fM; mesh %s", n_params / 1e6, dict(mesh.shape))
    writer = writers.create_writer(workdir)
    eval_fn = trainer.jit_eval_step()

    def evaluate(state) -> dict[str, float]:
        sums = {"ce_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
        for host_batch in common.eval_batches_from(config, trainer.image_size):
            out = jax.device_get(eval_fn(state, to_global(host_batch, mesh)))
            for k in sums:
                sums[k] += float(out[k])
        n = max(sums["tokens"], 1.0)
        loss = sums["ce_sum"] / n
        result = {
            "loss": loss,
            "bits_per_token": loss / math.log(2.0),
            "accuracy": sums["correct_sum"] / n,
        }
        logger.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        return result

    def write_images(state, step: int) -> None:
        labels = _sample_labels(trainer.num_classes, int(config.sampling.num_per_class))
        images = trainer.sample_images(state.params, labels, seed=config.seed + step)
        per_row = int(config.sampling.num_per_class) if labels is not None else 8
        rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
        grid = image_grid([r.astype(np.float32) / 255.0 for r in rows])
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "images", f"samples_{step:07d}.png"), grid)
        writer.write_images(step, {"samples": grid[None]})

    task = loop.Task(
        state=state,
        train_step=trainer.jit_train_step(shardings),
        train_batches=common.train_batches_from(config, trainer.image_size),
        mesh=mesh,
        evaluate=evaluate,
        write_images=write_images,
    )
    return common.run_loop(task, config, checkpointer, writer)
