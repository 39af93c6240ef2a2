"""FSDP shards VIM-Large and ViT-VQGAN SL: per-device state bytes from compiled memory
analysis on 8 fake devices, without allocating either model (vitvq.memory).

The state creation compiled here returns zeros of the state's shapes, dtypes and shardings
(`init="zeros"`: seconds to compile; the model's own initializers take minutes for both
models on 2 cores and give the same output bytes, see benchmarks/fsdp_memory.py).
"""

import importlib.util
import pathlib

import jax
import pytest

from vitvq import memory, parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {  # name -> (config file, its tokenizer's config file for stage 2)
    "vim_large": ("configs/vim_large.py", "configs/vitvq_small.py"),
    "vitvq_sl": ("configs/vitvq_large.py", None),
}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def load_config(path):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def state_memory(name, fsdp):
    config_file, tokenizer_file = MODELS[name]
    tokenizer_config = load_config(tokenizer_file) if tokenizer_file else None
    mesh = parallel.make_mesh(dict(data=8 // fsdp, fsdp=fsdp, tensor=1))
    trainer = memory.build_trainer(
        load_config(config_file), mesh, tokenizer_config, perceptual=False
    )
    return trainer, memory.state_memory(trainer, init="zeros")


def compiled_matches_shards(m):
    """XLA's output size is the shards' bytes plus a pointer table of 8 bytes per leaf."""
    return (
        m.shard_bytes <= m.per_device_bytes <= m.shard_bytes + memory.POINTER_BYTES * m.num_leaves
    )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fsdp8_holds_an_eighth_of_the_state(name):
    _, whole = state_memory(name, fsdp=1)
    trainer, sharded = state_memory(name, fsdp=8)
    # fsdp=1 (data=8): every device holds the whole state, per the compiler and the shapes.
    assert whole.shard_bytes == whole.unsharded_bytes
    assert compiled_matches_shards(whole)
    assert sharded.unsharded_bytes == whole.unsharded_bytes
    # fsdp=8: the compiler's per-device output agrees with the shards of the shardings ...
    assert compiled_matches_shards(sharded)
    # ... and is at most a seventh of the whole (params + optimizer state + the rest).
    assert sharded.per_device_bytes * 7 <= sharded.unsharded_bytes, sharded.replicated[:5]
    params, opt = sharded.parts["params"], sharded.parts["opt_state"]
    assert params[1] * 7 <= params[0] and opt[1] * 7 <= opt[0]
    # Adam keeps two moments per parameter: the optimizer state is twice the parameters.
    assert opt[0] >= 2 * params[0]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(trainer.abstract_state()[0].params))
    assert params[0] == 4 * n_params  # float32
    assert n_params > (1.6e9 if name == "vim_large" else 6e8)


def test_step_memory_of_a_tiny_vim_counts_the_donated_state():
    """The compiled step's arguments hold the state's shards (donated: aliased to the new
    state), the batch and the frozen tokenizer (less its decoder, which encoding never uses:
    jit drops unused inputs); temporaries are counted separately."""
    mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
    config = load_config("configs/vim_base.py")
    tokenizer_config = load_config("configs/vitvq_small.py")
    config.model.update(width=64, depth=2, num_heads=2, mlp_dim=128)
    tokenizer_config.image_size = 32
    tokenizer_config.model.encoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    tokenizer_config.model.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    config.dtype = "float32"
    trainer = memory.build_trainer(config, mesh, tokenizer_config)
    state = memory.state_memory(trainer, init="zeros")
    assert compiled_matches_shards(state) and state.ratio < 0.3
    step = memory.step_memory(trainer, batch_per_shard=2)
    assert step.batch_size == 16
    tok_bytes = sum(memory.nbytes(x) for x in jax.tree_util.tree_leaves(trainer.tok_vars))
    batch_bytes = 16 * 32 * 32 * 3 * 4 // 8 + 16 * 4 // 8  # images and labels, per device
    assert state.shard_bytes + batch_bytes < step.argument_bytes
    assert step.argument_bytes <= state.shard_bytes + batch_bytes + tok_bytes
    assert step.alias_bytes == state.shard_bytes
    assert step.temp_bytes > 0 and step.peak_bytes > step.argument_bytes
