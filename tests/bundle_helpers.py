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


TINY_VIM = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}


def make_vim_bundle(path, num_classes: int = 10, seed: int = 0):
    """A bundle with a fresh-init tiny tokenizer (32x32, 64 codes, 4x4 grid) and a fresh-init
    tiny VIM (2 blocks; class-conditional when num_classes > 0)."""
    from vitvq.models.vim import build_vim

    _, tok = tiny_variables(32, seed=seed)
    vim = build_vim(TINY_VIM, vocab_size=64, grid_size=4, num_classes=num_classes)
    labels = jnp.zeros((1,), jnp.int32) if num_classes else None
    params = vim.init(jax.random.key(seed + 1), jnp.zeros((1, 16), jnp.int32), labels)
    return bundle.write_bundle(
        path,
        tokenizer={"model": TINY_MODEL, "image_size": 32, "step": 0},
        tokenizer_params=tok["params"],
        tokenizer_stats=tok["vq_stats"],
        vim={"model": TINY_VIM, "step": 0, "vocab_size": 64, "num_classes": num_classes},
        vim_params=jax.device_get(params["params"]),
        classes={"num_classes": num_classes, "names": [str(i) for i in range(num_classes)]},
    )
