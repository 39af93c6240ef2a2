"""Tiny bundles for tests (fresh-init weights; no training)."""

import jax
import jax.numpy as jnp

from vitvq import bundle
from vitvq.models.vitvqgan import build_vitvqgan

TINY_MODEL = {
    "patch_size": 8,
    "encoder": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
    "decoder": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
    "codebook_size": 64,
    "code_dim": 8,
}


def tiny_variables(image_size: int = 32, seed: int = 0, model_cfg=None):
    model = build_vitvqgan(model_cfg or TINY_MODEL, image_size, jnp.float32)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(seed), x)
    return model, bundle.unflatten_tree(bundle.flatten_tree(variables))


def make_tokenizer_bundle(path, image_size: int = 32, seed: int = 0, dtype="float32", **kw):
    """Writes a bundle of a freshly initialized tiny tokenizer; returns (path, variables)."""
    model, variables = tiny_variables(image_size, seed)
    out = bundle.write_bundle(
        path,
        tokenizer={"model": TINY_MODEL, "image_size": image_size, "step": 7},
        tokenizer_params=variables["params"],
        tokenizer_stats=variables["vq_stats"],
        dtype=dtype,
        **kw,
    )
    return out, variables
