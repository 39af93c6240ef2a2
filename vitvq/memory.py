"""How many bytes each device holds for a sharded training run, without allocating it.

The trainers' state is found with `jax.eval_shape`, its shardings come from the config's
logical axis rules, and the state-creation function (and, when asked, the train step) is
compiled, never run, for the mesh: the compiled executable's memory analysis gives the bytes
per device. The shardings alone give the same figure for the state (`shard_shape` of every
leaf), an independent check. A mesh of fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) answers for a pod's mesh of the same
shape, as far as the state goes; the step's temporary bytes are those of XLA:CPU. A mesh of a
TPU topology's compile-only devices (`vitvq.aot`) gives the TPU compiler's figures instead.

    trainer = memory.build_trainer(config, mesh)       # Stage1 or Stage2, nothing allocated
    report = memory.state_memory(trainer)              # params + optimizer state per device
    step = memory.step_memory(trainer, batch_per_shard=1)   # the compiled train step
    step = memory.step_memory(trainer, batch_size=256)      # ... for a global batch
"""

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from vitvq import config_check, parallel
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.train.stage1_build import Stage1
from vitvq.train.stage2_build import Stage2

# XLA counts the output tuple's table of buffer pointers in the output size: 8 bytes a leaf.
POINTER_BYTES = 8
# `fast` compiles use `parallel.fast_compile_options`: buffer assignment, and with it the
# memory analysis, is done before code generation and does not change without LLVM's
# optimizations (checked on a 2-block VIM-Large step: identical figures), while compiling
# takes ~40% less time.


@dataclasses.dataclass(frozen=True)
class StateMemory:
    """Bytes of a training state: one whole copy, and what one device holds."""

    unsharded_bytes: int  # every leaf once (what one device holds with no sharding)
    per_device_bytes: int  # compiled state creation: output bytes per device
    shard_bytes: int  # the same from the shardings (sum of each leaf's shard), per device
    num_leaves: int  # arrays in the state (XLA adds POINTER_BYTES each to the output size)
    parts: dict[str, tuple[int, int]]  # state field -> (unsharded, per-device) bytes
    replicated: tuple[tuple[str, int], ...]  # leaves split over no mesh axis: (path, bytes)
    init: str  # the function compiled: "model" or "zeros" (see `state_memory`)
    compile_s: float  # seconds to lower and compile the state creation (wall)
    compile_cpu_s: float  # the same in CPU seconds of this process (all threads)

    @property
    def ratio(self) -> float:
        """Per-device bytes over unsharded bytes (1 = fully replicated)."""
        return self.per_device_bytes / self.unsharded_bytes


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """The compiled train step's memory analysis, bytes per device."""

    argument_bytes: int  # state + batch + frozen inputs
    output_bytes: int  # new state + metrics
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int  # everything else live during the step (activations, gradients, ...)
    batch_size: int  # global batch the step was compiled for
    compile_s: float  # seconds to lower and compile the step (wall)
    compile_cpu_s: float  # the same in CPU seconds of this process (all threads)
    generated_code_bytes: int = 0  # the compiled program itself
    flops: float = 0.0  # per device and step, from the compiler's cost analysis (0: none)
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)  # executable

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to them + temporaries: what the step needs."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Leaves of a state of one dtype, shape and sharding (see `largest_tensors`)."""

    path: str  # the first such leaf
    count: int  # leaves like it (e.g. a parameter and its two Adam moments)
    dtype: str
    shape: tuple[int, ...]
    spec: str  # the PartitionSpec
    shard_shape: tuple[int, ...]
    shard_bytes: int  # one leaf's bytes per device


def nbytes(x: Any) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def shard_nbytes(x: Any, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of `x` under `sharding` (dims split evenly)."""
    return math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def mesh_axes_of(sharding: NamedSharding) -> set[str]:
    """The mesh axes (of size > 1) a sharding splits anything over."""
    named = set()
    for entry in sharding.spec:
        if entry is None:
            continue
        named.update((entry,) if isinstance(entry, str) else entry)
    return {a for a in named if sharding.mesh.shape[a] > 1}


def replicated_leaves(abstract: Any, shardings: Any) -> tuple[tuple[str, int], ...]:
    """(path, bytes) of the leaves no mesh axis of size > 1 splits, largest first."""
    out = []
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(abstract),
        jax.tree_util.tree_leaves(shardings),
        strict=True,
    ):
        if not mesh_axes_of(s):
            out.append((jax.tree_util.keystr(path), nbytes(x)))
    return tuple(sorted(out, key=lambda item: (-item[1], item[0])))


def largest_tensors(abstract: Any, shardings: Any, top: int = 6) -> tuple[Tensor, ...]:
    """The `top` largest tensors of a state per device (leaves of one dtype, shape and
    sharding counted together), with their shardings."""
    groups: dict[tuple, Tensor] = {}
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    for (path, x), s in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True):
        key = (str(x.dtype), tuple(x.shape), str(s.spec))
        if key in groups:
            groups[key] = dataclasses.replace(groups[key], count=groups[key].count + 1)
        else:
            shard = tuple(s.shard_shape(x.shape))
            groups[key] = Tensor(jax.tree_util.keystr(path), 1, *key, shard, shard_nbytes(x, s))
    ranked = sorted(groups.values(), key=lambda t: (-t.shard_bytes * t.count, t.path))
    return tuple(ranked[:top])


def state_parts(abstract: Any, shardings: Any) -> dict[str, tuple[int, int]]:
    """Top-level field of the state -> (unsharded bytes, per-device bytes)."""
    fields = (
        {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
        if dataclasses.is_dataclass(abstract)
        else dict(abstract)
    )
    out = {}
    for name, sub in fields.items():
        sub_shardings = (
            getattr(shardings, name) if dataclasses.is_dataclass(shardings) else shardings[name]
        )
        leaves = jax.tree_util.tree_leaves(sub)
        out[name] = (
            sum(nbytes(x) for x in leaves),
            sum(
                shard_nbytes(x, s)
                for x, s in zip(leaves, jax.tree_util.tree_leaves(sub_shardings), strict=True)
            ),
        )
    return out


def _compile(jitted, *args, mesh, fast: bool) -> tuple[Any, float, float]:
    """(compiled executable, wall seconds, CPU seconds) of lowering and compiling."""
    wall, cpu = time.perf_counter(), time.process_time()
    options = parallel.fast_compile_options(mesh) if fast else None
    compiled = jitted.lower(*args).compile(compiler_options=options)
    return compiled, time.perf_counter() - wall, time.process_time() - cpu


def state_memory(trainer, init: str = "model", fast: bool = True) -> StateMemory:
    """Compiles a creation of `trainer`'s state for its mesh (nothing of model size is
    allocated) and returns the bytes per device from the memory analysis, with the checks.

    `init="model"` compiles the trainer's own `init_state` (initializers and all);
    `init="zeros"` compiles a function returning zeros of the same shapes, dtypes and
    shardings: the same output bytes, compiled in a fraction of the time. `fast` compiles
    with `parallel.CPU_FAST_COMPILE` on CPU.
    """
    mesh, rules = trainer.mesh, trainer.rules
    abstract, shardings = trainer.abstract_state()
    if init == "model":
        fn = lambda key: parallel.unbox(trainer.init_state(key))
    elif init == "zeros":
        fn = lambda key: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    else:
        raise ValueError(f"init must be 'model' or 'zeros', got {init!r}")
    with parallel.use_mesh(mesh, rules):
        jitted = jax.jit(fn, out_shardings=shardings)
        compiled, wall_s, cpu_s = _compile(jitted, jax.random.key(0), mesh=mesh, fast=fast)
    analysis = compiled.memory_analysis()
    leaves = jax.tree_util.tree_leaves(abstract)
    return StateMemory(
        unsharded_bytes=sum(nbytes(x) for x in leaves),
        per_device_bytes=int(analysis.output_size_in_bytes),
        shard_bytes=sum(
            shard_nbytes(x, s)
            for x, s in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True)
        ),
        num_leaves=len(leaves),
        parts=state_parts(abstract, shardings),
        replicated=replicated_leaves(abstract, shardings),
        init=init,
        compile_s=wall_s,
        compile_cpu_s=cpu_s,
    )


def abstract_batch(trainer, batch_size: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch as ShapeDtypeStructs sharded like the real ones."""
    sharding = parallel.batch_sharding(trainer.mesh)
    return {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.float32, sharding=sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }


def step_memory(
    trainer,
    batch_per_shard: int = 1,
    step: int = 1,
    fast: bool = True,
    batch_size: int | None = None,
) -> StepMemory:
    """Compiles `trainer`'s train step for a global batch of `batch_per_shard` examples per
    batch shard (data x fsdp), or of `batch_size` examples when given, from abstract inputs
    and returns its memory analysis, its FLOPs and the compiled executable.

    Stage 1 compiles the phase of `step` (the default, 1, is an ordinary step: LPIPS and GAN
    on, no lazy R1). `fast` compiles with `parallel.CPU_FAST_COMPILE` on CPU (never for other
    platforms).
    """
    mesh = trainer.mesh
    abstract, shardings = trainer.abstract_state()
    if batch_size is None:
        batch_size = batch_per_shard * parallel.batch_ways(mesh)
    replicated = parallel.replicated(mesh)
    if isinstance(trainer, Stage1):
        jitted = trainer.train_step_jit(shardings, step)
        frozen = _abstract(trainer.train_perceptual, replicated)
        image_size = trainer.config.image_size
    else:
        jitted = trainer.train_step_jit(shardings)
        frozen = _abstract(trainer.tok_vars, replicated)
        image_size = trainer.image_size
    batch = abstract_batch(trainer, batch_size, image_size)
    with parallel.use_mesh(mesh, trainer.rules):
        compiled, wall_s, cpu_s = _compile(jitted, abstract, batch, frozen, mesh=mesh, fast=fast)
    analysis = compiled.memory_analysis()
    return StepMemory(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        batch_size=batch_size,
        compile_s=wall_s,
        compile_cpu_s=cpu_s,
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
        flops=_flops(compiled),
        compiled=compiled,
    )


def _flops(compiled) -> float:
    """FLOPs of one run of `compiled` on one device (0.0 when the compiler gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _abstract(tree: Any, sharding: NamedSharding) -> Any:
    """ShapeDtypeStructs with `sharding` for the array leaves of `tree` (None stays None)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


# --- trainers without data, bundles or weights ----------------------------------------------


def abstract_tokenizer(stage1_config):
    """(manifest, ViTVQGAN module, abstract variables) of a tokenizer configured like
    `stage1_config`, in the form `Stage2(..., tokenizer=...)` takes; nothing is allocated."""
    model = build_vitvqgan(stage1_config.model.to_dict(), stage1_config.image_size, jnp.float32)
    size = model.image_size
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    variables = parallel.unbox(dict(boxed))  # params, vq_stats, the quantizer's collections
    return {}, model, variables


def build_trainer(config, mesh, tokenizer_config=None, perceptual: bool = True):
    """The trainer `config.trainer` names, on `mesh`, allocating nothing of model size.

    Stage 2 needs the stage-1 config of its tokenizer (`tokenizer_config`, e.g.
    configs/vitvq_small.py's) instead of a bundle. `perceptual=False` leaves out the LPIPS
    network (not part of the state; only the stage-1 train step needs it).
    """
    config = config_check.check(config)  # already checked settings pass as they are
    if config.trainer == "vim":
        if tokenizer_config is None:
            raise ValueError("a stage-2 config needs tokenizer_config (a stage-1 config)")
        manifest, model, variables = abstract_tokenizer(tokenizer_config)
        trainer = Stage2(config, mesh, tokenizer=(manifest, model, {}))
        # The frozen tokenizer's variables stay abstract: only `step_memory` reads them.
        trainer.tok_vars = variables
        return trainer
    if perceptual:
        return Stage1(config, mesh)
    return Stage1(config.replace("loss.perceptual", 0.0, eval_lpips=False), mesh)
