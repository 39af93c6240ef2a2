"""Tests of vitvq.checkpoint on 8 fake CPU devices: round trips across meshes, pruning, the
save interval, error messages, and that a killed asynchronous save loses nothing."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import PartitionSpec as P

from vitvq import parallel
from vitvq.checkpoint import Checkpointer
from vitvq.errors import ConfigError, DataError
from vitvq.models import axes
from vitvq.models.layers import dense

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBED, HIDDEN, BATCH = 8, 16, 4
RULES = parallel.default_axis_rules()


@struct.dataclass
class TrainState:
    """A train state shaped like the trainers' (raw key data, optional EMA, mixed dtypes)."""

    step: jax.Array  # int32 []
    params: Any
    opt_state: Any
    ema_params: Any  # None: EMA off
    stats: Any  # bfloat16, uint32 and an empty dict
    rng: jax.Array  # uint32 [2] raw key data


class Toy(nn.Module):
    """embed -> mlp -> embed, every parameter annotated with logical axes."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        h = nn.gelu(dense(HIDDEN, axes.EMBED, axes.MLP, name="fc1", **kw)(x))
        return dense(EMBED, axes.MLP, axes.EMBED, name="fc2", **kw)(h)


TX = optax.adam(1e-2)


def _init(rng):
    params = Toy().init(rng, jnp.zeros((BATCH, EMBED)))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=TX.init(params),
        ema_params=None,
        stats={
            "usage": jnp.linspace(0.0, 1.0, 5, dtype=jnp.bfloat16),
            "seen": jnp.arange(3, dtype=jnp.uint32) * 1_000_000_007,
            "empty": {},
        },
        rng=jax.random.key_data(jax.random.key(7)),
    )


def _train_step(state):
    """One Adam step, so the optimizer moments and count are non-trivial."""
    x = jax.random.normal(jax.random.wrap_key_data(state.rng), (BATCH, EMBED))
    grads = jax.grad(lambda p: jnp.mean((Toy().apply({"params": p}, x) - 1.0) ** 2))(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
    )


def _abstract(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A state trained one step on a {data:2, fsdp:2, tensor:2} mesh, saved as step 1."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state, shardings = parallel.create_sharded(_init, mesh, RULES, jax.random.key(0))
    state = jax.jit(_train_step, out_shardings=shardings)(state)
    # The mesh really splits the parameters (embed over fsdp, mlp over tensor).
    assert state.params["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.opt_state[0].mu["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        assert ckpt.save(1, state)
    return directory, state, shardings


def test_restore_onto_same_shardings(saved):
    directory, state, shardings = saved
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        assert ckpt.latest_step() == 1
        restored, step = ckpt.restore_latest(_abstract(state, shardings))
    assert step == 1
    assert isinstance(restored, TrainState) and restored.ema_params is None
    assert restored.stats["empty"] == {}
    _assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert got.sharding == want


@pytest.mark.parametrize("mesh_config", [{"data": 1}, {"fsdp": 4, "tensor": 2}])
def test_restore_onto_other_meshes(saved, mesh_config):
    directory, state, _ = saved
    devices = jax.devices()[: 1 if mesh_config == {"data": 1} else 8]
    mesh = parallel.make_mesh(mesh_config, devices)
    shardings = parallel.logical_shardings(jax.eval_shape(_init, jax.random.key(0)), mesh, RULES)
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        restored = ckpt.restore(_abstract(state, shardings), step=1)
    _assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert got.sharding == want
        assert got.sharding.mesh.devices.size == len(devices)


def _small_state(value=0.0):
    return {"params": {"w": jnp.full((4, 8), value), "b": jnp.zeros(8)}, "step": jnp.int32(0)}


def _abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _step_dirs(directory):
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def test_interval_force_and_keep_last_n(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_every_steps=5, async_save=False) as ckpt:
        assert not ckpt.save(3, _small_state())  # off the interval, even as the first save
        assert ckpt.latest_step() is None
        assert ckpt.save(5, _small_state(5.0))
        assert not ckpt.save(5, _small_state(), force=True)  # already saved: skipped
        assert not ckpt.save(6, _small_state())
        assert ckpt.save(7, _small_state(7.0), force=True)  # e.g. preemption or the last step
        assert not ckpt.reached_preemption(8)
        assert ckpt.save(10, _small_state(10.0))
        assert ckpt.all_steps() == [7, 10]
    assert _step_dirs(tmp_path) == [7, 10]
    with Checkpointer(tmp_path, max_to_keep=2, save_every_steps=5) as ckpt:
        restored = ckpt.restore(_abstract_of(_small_state()), step=7)
    np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 8), 7.0))


def test_preemption_sync_counts_the_steps_of_this_launch(tmp_path, monkeypatch):
    """JAX's preemption sync agrees on "one past the newest counter reported" (0 before the
    first report): the counters are the steps since the launch's first, in orbax's own checks
    (its save policy) too, so that a resumed pod preempted during start-up stops after its
    first step instead of never."""
    from jax.experimental import multihost_utils

    asked = []
    sync_point = 1  # the notice came before any report: every process had reported 0

    def reached(counter):
        asked.append(counter)
        return counter == sync_point

    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached)
    # A run resumed at step 8: the loop asks after its first step, 9, and again after 10.
    with Checkpointer(tmp_path, save_every_steps=2, async_save=False) as ckpt:
        assert ckpt.reached_preemption(9)  # the agreed point: checkpoint and stop here
        assert ckpt.save(9, _small_state(9.0), force=True)
        assert not ckpt.reached_preemption(10)
        assert ckpt.save(10, _small_state(10.0))
    # orbax's save asked too (more calls than the loop's two), in the same numbering.
    assert len(asked) > 2 and asked[0] == 1 and asked[-1] == 2, asked
    assert set(asked) == {1, 2}, asked


def test_missing_step_and_empty_directory(tmp_path):
    abstract = _abstract_of(_small_state())
    with Checkpointer(tmp_path / "ckpt", save_every_steps=5) as ckpt:
        assert ckpt.restore_latest(abstract) is None
        with pytest.raises(DataError, match="no checkpoint to restore"):
            ckpt.restore(abstract)
        ckpt.save(5, _small_state())
        ckpt.save(10, _small_state())
        with pytest.raises(DataError) as info:
            ckpt.restore(abstract, step=7)
    message = str(info.value)
    assert "step 7" in message and str(tmp_path / "ckpt") in message and "[5, 10]" in message


def test_mismatching_structure_names_paths_and_shapes(tmp_path):
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, _small_state())
        other = {"params": {"w": jnp.zeros((4, 9)), "extra": jnp.zeros(2)}, "step": jnp.int32(0)}
        with pytest.raises(DataError) as info:
            ckpt.restore(_abstract_of(other))
    message = str(info.value)
    assert "params/w" in message and "(4, 8)" in message and "(4, 9)" in message
    assert "params/extra: missing from the checkpoint" in message
    assert "params/b: in the checkpoint" in message
    assert str(tmp_path) in message


def test_latest_step_ignores_an_unfinished_write(tmp_path):
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, _small_state(1.0))
    # What a write killed before its commit (the final rename) leaves behind.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    (partial / "state.orbax-checkpoint-tmp").mkdir(parents=True)
    (partial / "_CHECKPOINT_METADATA").write_text("{")
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.latest_step() == 1
        restored, step = ckpt.restore_latest(_abstract_of(_small_state()))
        assert step == 1
        np.testing.assert_array_equal(restored["params"]["w"], np.ones((4, 8)))
        assert ckpt.save(2, _small_state(2.0))  # the resumed run writes step 2 again
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(_abstract_of(_small_state()))
    np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 8), 2.0))
    assert not partial.exists()


def test_async_save_survives_donation_and_a_fresh_checkpointer_sees_it(tmp_path):
    state = _small_state(3.0)
    expected = jax.tree.map(np.asarray, state)
    abstract = _abstract_of(state)
    ckpt = Checkpointer(tmp_path, save_every_steps=3, async_save=True)
    assert ckpt.save(3, state)
    for leaf in jax.tree.leaves(state):  # the train step donates the state right after
        leaf.delete()
    ckpt.wait()
    ckpt.close()
    with Checkpointer(tmp_path, save_every_steps=3) as fresh:
        assert fresh.latest_step() == 3
        restored = fresh.restore(abstract)
    _assert_bitwise_equal(restored, expected)


def test_typed_keys_round_trip(tmp_path):
    state = {"key": jax.random.key(3), "keys": jax.random.split(jax.random.key(4), 3)}
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(1, state)
        restored = ckpt.restore(_abstract_of(state))
    for name in state:
        assert jax.dtypes.issubdtype(restored[name].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(
            jax.random.key_data(restored[name]), jax.random.key_data(state[name])
        )


def test_bad_settings_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        Checkpointer(tmp_path, save_every_steps=0)
    with pytest.raises(ConfigError, match="max_to_keep"):
        Checkpointer(tmp_path, save_every_steps=1, max_to_keep=0)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    import jax, jax.numpy as jnp
    from vitvq.checkpoint import Checkpointer

    directory, size = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    ckpt = Checkpointer(directory, save_every_steps=1, async_save=True)
    ckpt.save(1, {"w": jnp.full((size,), 1.0)})
    ckpt.wait()
    # Random data compresses slowly, which keeps the write going for a while.
    big = {"w": jax.random.normal(jax.random.key(0), (size,))}
    jax.block_until_ready(big)
    assert ckpt.save(2, big)
    partial = directory / "2.orbax-checkpoint-tmp"
    while not (directory / "2").exists():
        if partial.exists() and any(p.is_file() and "/d/" in str(p) for p in partial.rglob("*")):
            os.kill(os.getpid(), signal.SIGKILL)  # array data half written, not committed
    sys.exit(3)  # the write finished before it could be killed
    """
)


def test_kill_during_async_save_keeps_the_last_checkpoint(tmp_path):
    size = 32 * 1024 * 1024  # 128 MB of float32
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    directory = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(directory), str(size)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (directory / "2.orbax-checkpoint-tmp").exists()  # killed before the commit
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (size,),
            jnp.float32,
            sharding=parallel.replicated(parallel.make_mesh({"data": 1}, jax.devices()[:1])),
        )
    }
    with Checkpointer(directory, save_every_steps=1) as ckpt:
        assert ckpt.all_steps() == [1]
        restored, step = ckpt.restore_latest(abstract)
    assert step == 1
    w = np.asarray(restored["w"])
    assert w.shape == (size,) and np.all(w == 1.0)


def test_checkpoint_of_another_layout_raises_data_error(tmp_path):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path) as manager:  # a default-item checkpoint, not ours
        manager.save(1, args=ocp.args.StandardSave(_small_state()))
    with Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        with pytest.raises(DataError, match="has no 'state' item"):
            ckpt.restore(_abstract_of(_small_state()))


def test_only_storage_failures_become_storage_errors():
    from vitvq.checkpoint_writer import _is_storage_failure

    tensorstore = ValueError(
        'OUT_OF_RANGE: Error writing "params.w/0" in OCDBT database at local file "/x/": '
        "Failed to write 349472 bytes to file 5: File too large [os_error_code='27']"
    )
    assert _is_storage_failure(tensorstore)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("save finalize thread failed") from e
    except RuntimeError as wrapped:
        assert _is_storage_failure(wrapped)
    # A long message keeps its cause, wherever it is.
    from vitvq.checkpoint_writer import _storage_reason

    long = ValueError("Error opening zarr driver: " + "x" * 300 + " File too large " + "y" * 500)
    reason = _storage_reason(long)
    assert "File too large" in reason and len(reason) < 400
    # A bug keeps its own exception and traceback.
    assert not _is_storage_failure(ValueError("cannot broadcast shapes (3,) and (4,)"))
    assert not _is_storage_failure(TypeError("unhashable type: 'dict'"))
