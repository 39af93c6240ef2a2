"""The stage-2 builder: from checked settings (`vitvq.config_check.check`), a mesh and a frozen
tokenizer, the VIM, its optimizer, `init_state`, the train and eval steps and the sampler of
the image grids.

Pure: it reads no training data, writes nothing and imports no TensorFlow, clu, input or
writer code (the tokenizer is read from its bundle when not given).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitvq import bundle, parallel, sampling
from vitvq import settings as settings_lib
from vitvq.errors import ConfigError
from vitvq.models.vim import build_vim, check_vocab_size
from vitvq.train import stage2_step
from vitvq.train.optim import make_adam
from vitvq.train.stage2_step import Stage2Settings, Stage2State, eval_step, train_step


def load_frozen_tokenizer(path: str):
    """(manifest, ViTVQGAN module, variables as numpy) of a bundle's tokenizer."""
    return bundle.load_tokenizer_variables(path)


class Stage2:
    """The VIM, the frozen tokenizer and the jitted functions of one stage-2 run."""

    def __init__(self, config, mesh, tokenizer=None):
        """`config`: settings from `vitvq.config_check.check` (a ConfigDict or a plain dict is
        frozen as it is: the builder checks nothing). `tokenizer`: (manifest, module,
        variables), else read from `config.tokenizer_bundle`."""
        config = settings_lib.frozen(config)
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
        path = config.get("tokenizer_bundle")
        check_vocab_size(
            self.tokenizer.num_codes, f"the tokenizer bundle {path}" if path else "the tokenizer"
        )
        self.num_classes = int(config.dataset.get("num_classes", 0) or 0)
        self.settings = Stage2Settings(
            num_classes=self.num_classes, class_dropout=float(config.class_dropout)
        )
        self.model = build_vim(
            config.model.to_dict(),
            vocab_size=self.tokenizer.num_codes,
            grid_size=self.tokenizer.grid_size,
            num_classes=self.num_classes,
            dtype=getattr(jnp, config.dtype),  # one of vitvq.settings.DTYPES (checked)
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
        return parallel.abstract_state(self.init_state, self.mesh, self.rules)

    def create_state(self, seed: int):
        return parallel.create_state(self.init_state, self.mesh, self.rules, seed)

    def step_fn(self):
        """The train step, not jitted: `(state, batch, tokenizer variables) -> (state,
        metrics)`."""
        return functools.partial(
            train_step,
            model=self.model,
            tokenizer=self.tokenizer,
            tx=self.tx,
            settings=self.settings,
            lr_schedule=self.schedule,
        )

    def train_step_jit(self, shardings):
        """The step jitted (not yet compiled) with the state's shardings: `(state, batch,
        tokenizer variables) -> (state, metrics)`, the state donated. Call or lower it under
        `parallel.use_mesh(self.mesh, self.rules)`."""
        fn = self.step_fn()
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
