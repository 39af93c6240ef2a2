"""Tests of vitvq.parallel and vitvq.data.globalize on 8 fake CPU devices."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from vitvq import parallel
from vitvq.data.globalize import to_global
from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.layers import constrain, dense

ROOT = pathlib.Path(__file__).resolve().parents[1]
F32 = jnp.float32
EMBED, HIDDEN, ODD, BATCH = 4, 8, 3, 8


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


class Toy(nn.Module):
    """Two annotated Dense layers (embed -> mlp -> embed) and one whose mlp width is odd."""

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=F32, param_dtype=F32)
        x = constrain(x, (axes.BATCH, axes.EMBED))
        h = nn.gelu(dense(HIDDEN, axes.EMBED, axes.MLP, name="fc1", **kw)(x))
        h = constrain(h, (axes.BATCH, axes.MLP))
        y = dense(x.shape[-1], axes.MLP, axes.EMBED, name="fc2", **kw)(h)
        z = dense(ODD, axes.EMBED, axes.MLP, name="odd", **kw)(x)  # ODD % tensor != 0
        return y, z


def _inputs():
    x = np.random.default_rng(0).normal(size=(BATCH, EMBED)).astype(np.float32)
    return jnp.asarray(x)


def _loss(params, x):
    y, z = Toy().apply({"params": params}, x)
    return jnp.mean((y - 1.0) ** 2) + jnp.mean(z**2)


# --- mesh shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": 1, "fsdp": 4, "tensor": -1}, (1, 4, 2)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"fsdp": -1}, (1, 8, 1)),
        (ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1}), (4, 2, 1)),
    ],
)
def test_mesh_shape(config, expected):
    assert parallel.mesh_shape(config, 8) == expected


@pytest.mark.parametrize(
    "config, numbers",
    [
        ({"data": 3, "fsdp": 2, "tensor": 1}, ["6", "8"]),  # wrong product
        ({"data": -1, "fsdp": -1, "tensor": 1}, ["-1", "2 axes"]),
        ({"data": 3, "fsdp": -1, "tensor": 1}, ["3", "8"]),  # -1 does not divide
        ({"data": 0, "fsdp": -1, "tensor": 1}, ["'data'", "0"]),
        ({"data": -2, "fsdp": 4, "tensor": 1}, ["'data'", "-2"]),
        ({"data": 2, "model": 4}, ["'model'"]),
        ({"data": 2.0, "fsdp": 4, "tensor": 1}, ["'data'", "2.0"]),
    ],
)
def test_bad_mesh_config(config, numbers):
    with pytest.raises(ConfigError) as info:
        parallel.mesh_shape(config, 8)
    for number in numbers:
        assert number in str(info.value)


def test_make_mesh():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert mesh.axis_names == parallel.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    small = parallel.make_mesh({"data": -1}, devices=jax.devices()[:4])
    assert dict(small.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="4 devices"):
        parallel.make_mesh({"data": 8}, devices=jax.devices()[:4])


# --- rules ---------------------------------------------------------------------------------


def test_rules_from_config_lists(mesh):
    rules = parallel.default_axis_rules()
    assert dict(rules)[axes.BATCH] == ("data", "fsdp")
    assert dict(rules)[axes.EMBED] == "fsdp"
    assert all(dict(rules)[name] == "tensor" for name in (axes.MLP, axes.HEADS, axes.VOCAB))
    as_config = [[name, list(t) if isinstance(t, tuple) else t] for name, t in rules]
    assert parallel.normalize_rules(as_config, mesh) == rules
    with pytest.raises(ConfigError, match="'model'"):
        parallel.normalize_rules([("embed", "model")], mesh)
    with pytest.raises(ConfigError, match="pair"):
        parallel.normalize_rules(["embed"], mesh)


def test_non_divisible_dims_are_replicated(mesh, caplog):
    tree = {
        "w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 8), F32), (axes.EMBED, axes.MLP)),
        "m": nn.Partitioned(jax.ShapeDtypeStruct((4, 5), F32), ("fsdp", "tensor")),
        "b": jax.ShapeDtypeStruct((5,), F32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    with caplog.at_level(logging.DEBUG, logger="vitvq.parallel"):
        shardings = parallel.logical_shardings(tree, mesh, parallel.default_axis_rules())
    assert shardings["w"].spec == P(None, "tensor")
    assert shardings["m"].spec == P("fsdp", None)
    assert shardings["b"].spec == P()
    assert shardings["step"].spec == P()
    assert "['w']" in caplog.text and "['m']" in caplog.text


def test_use_mesh_resolves_activation_constraints(mesh):
    x = jnp.zeros((BATCH, EMBED))
    f = jax.jit(lambda x: constrain(x * 2, (axes.BATCH, axes.EMBED)))
    with parallel.use_mesh(mesh, parallel.default_axis_rules()):
        out = f(x)
    # embed would take fsdp, which batch already uses: embed stays replicated.
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    assert f(x).sharding.is_fully_replicated  # no mesh, no rules: a no-op


# --- sharded state -------------------------------------------------------------------------


def _create(mesh):
    tx = optax.adam(1e-3)

    def init(rng):
        params = Toy().init(rng, jnp.zeros((BATCH, EMBED)))["params"]
        return {"params": params, "opt_state": tx.init(params)}

    return parallel.create_sharded(init, mesh, parallel.default_axis_rules(), jax.random.key(0))


def test_create_sharded_follows_rules(mesh):
    state, shardings = _create(mesh)
    params = state["params"]
    assert not any(
        isinstance(x, nn.meta.AxisMetadata)
        for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )
    expected = {
        ("fc1", "kernel"): (P("fsdp", "tensor"), (EMBED // 2, HIDDEN // 2)),
        ("fc1", "bias"): (P("tensor"), (HIDDEN // 2,)),
        ("fc2", "kernel"): (P("tensor", "fsdp"), (HIDDEN // 2, EMBED // 2)),
        ("fc2", "bias"): (P("fsdp"), (EMBED // 2,)),
        ("odd", "kernel"): (P("fsdp", None), (EMBED // 2, ODD)),
        ("odd", "bias"): (P(None), (ODD,)),
    }
    for (layer, name), (spec, shard_shape) in expected.items():
        array = params[layer][name]
        assert isinstance(array, jax.Array)
        assert array.sharding.spec == spec, (layer, name)
        assert shardings["params"][layer][name].spec == spec
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}
        assert len(array.addressable_shards) == 8


def test_adam_state_mirrors_params(mesh):
    state, shardings = _create(mesh)
    adam = state["opt_state"][0]
    param_specs = jax.tree_util.tree_map(lambda a: a.sharding.spec, state["params"])
    for moment in (adam.mu, adam.nu):
        assert jax.tree_util.tree_map(lambda a: a.sharding.spec, moment) == param_specs
    assert adam.count.sharding.spec == P()
    assert shardings["opt_state"][0].mu == shardings["params"]


def test_sharded_step_matches_single_device(mesh):
    state, shardings = _create(mesh)
    params, x = state["params"], _inputs()

    single = jax.device_put(jax.tree_util.tree_map(np.asarray, params), jax.devices()[0])
    loss_1, grads_1 = jax.jit(jax.value_and_grad(_loss))(single, x)

    step = jax.jit(
        jax.value_and_grad(_loss),
        in_shardings=(shardings["params"], parallel.batch_sharding(mesh)),
        out_shardings=(parallel.replicated(mesh), shardings["params"]),
    )
    with parallel.use_mesh(mesh, parallel.default_axis_rules()):
        loss_n, grads_n = step(params, x)
    assert grads_n["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_n, grads_1
    )


# --- batches -------------------------------------------------------------------------------


def test_validate_batch(mesh):
    parallel.validate_batch(8, mesh, process_count=2)
    with pytest.raises(ConfigError, match="6.*4 batch shards"):
        parallel.validate_batch(6, mesh, process_count=1)
    with pytest.raises(ConfigError, match="12.*8 processes"):
        parallel.validate_batch(12, mesh, process_count=8)
    with pytest.raises(ConfigError, match="positive"):
        parallel.validate_batch(0, mesh, process_count=1)


def test_to_global(mesh):
    images = np.arange(BATCH * 2 * 2 * 3, dtype=np.float32).reshape(BATCH, 2, 2, 3)
    labels = np.arange(BATCH, dtype=np.int32)
    batch = to_global({"image": images, "label": labels}, mesh)
    for name, host in (("image", images), ("label", labels)):
        array = batch[name]
        assert isinstance(array, jax.Array)
        assert isinstance(array.sharding, NamedSharding)
        assert array.sharding.is_equivalent_to(parallel.batch_sharding(mesh), host.ndim)
        assert array.sharding.spec == P(("data", "fsdp"))
        assert {s.data.shape[0] for s in array.addressable_shards} == {BATCH // 4}
        np.testing.assert_array_equal(np.asarray(array), host)
    with pytest.raises(InputError, match="6.*4 batch shards"):
        to_global({"image": images[:6]}, mesh)
    with pytest.raises(InputError, match="different leading sizes"):
        to_global({"image": images, "label": labels[:4]}, mesh)


# --- two processes -------------------------------------------------------------------------

_WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
import jax.numpy as jnp
import numpy as np
from vitvq import parallel
from vitvq.data.globalize import to_global

mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
parallel.validate_batch(8, mesh)
pid = jax.process_index()
local = np.arange(4 * pid, 4 * pid + 4, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
x = to_global({"x": local}, mesh)["x"]
rows = jax.jit(lambda a: a[:, 0], out_shardings=parallel.replicated(mesh))(x)
result = {
    "pid": pid,
    "mesh_processes": [d.process_index for d in mesh.devices.flat],
    "shape": list(x.shape),
    "rows": np.asarray(rows).tolist(),
}
with open(sys.argv[3], "w") as f:  # a file: the runtime's own output may share stdout
    json.dump(result, f)
"""


def test_to_global_two_processes(tmp_path):
    """Two local CPU processes (4 devices each) form one 8-device pod."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(i), address, str(tmp_path / f"{i}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
        results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for result in results:
        assert result["mesh_processes"] == [0] * 4 + [1] * 4  # data spans the two hosts
        assert result["shape"] == [8, 3]
        assert result["rows"] == list(range(8))
