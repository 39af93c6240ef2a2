"""The device mesh, logical axis rules and the shardings of state and batches.

One mesh with axes ("data", "fsdp", "tensor") is built from `config.mesh` (one axis may be
-1, meaning the rest of the devices). Parameters and activations carry logical axis names
(`vitvq.models.axes`); the config's `axis_rules` map those names to mesh axes. State
shardings are derived once: `jax.eval_shape` of the init function -> logical names ->
`NamedSharding`s -> `jax.jit(init, out_shardings=...)` (`create_sharded`).

All mesh axes are `AxisType.Auto`: XLA propagates shardings between the annotated
boundaries, and `nn.with_logical_constraint` inside models resolves through `use_mesh`.
"""

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vitvq.errors import ConfigError
from vitvq.models import axes

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # mesh axes the leading batch dimension is split over

# A logical name -> None (replicated), one mesh axis, or several mesh axes.
MeshAxes = str | tuple[str, ...] | None
AxisRules = tuple[tuple[str, MeshAxes], ...]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Sizes of the ("data", "fsdp", "tensor") axes for `num_devices` devices.

    `mesh_config` maps axis names to sizes (a dict or ConfigDict); a missing axis has size 1
    and at most one axis may be -1, which takes all the devices the others leave.
    """
    sizes = dict(mesh_config.items())
    shown = f"config.mesh {sizes}"
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(
            f"{shown} has unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}."
        )
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"{shown}: axis {name!r} must be an integer, got {size!r}.")
        if size == 0 or size < -1:
            raise ConfigError(
                f"{shown}: axis {name!r} has size {size}; sizes must be positive or -1 (the rest)."
            )
    shape = [sizes.get(name, 1) for name in MESH_AXES]
    rest = [name for name, size in zip(MESH_AXES, shape, strict=True) if size == -1]
    if len(rest) > 1:
        raise ConfigError(f"{shown} sets {len(rest)} axes {rest} to -1; at most one may be -1.")
    fixed = math.prod(size for size in shape if size != -1)
    if rest:
        if num_devices % fixed:
            raise ConfigError(
                f"{shown}: the other axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices, so axis {rest[0]!r} cannot be -1."
            )
        shape[MESH_AXES.index(rest[0])] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"{shown} multiplies to {fixed} but there are {num_devices} devices; make the "
            "sizes multiply to the device count or set one axis to -1."
        )
    return tuple(shape)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all devices, all hosts).

    `jax.make_mesh` orders devices for the physical topology (TPU rings and slices); with
    devices listed process by process, "data" is the outermost axis and spans hosts while
    "tensor" stays within a host.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    # jax.make_mesh defaults to Explicit axes; the Linen logical-constraint path wants Auto.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def default_axis_rules() -> AxisRules:
    """Logical axis name -> mesh axes: data+FSDP on the batch, FSDP on width (and on conv
    output channels), TP on the rest."""
    return (
        (axes.BATCH, BATCH_AXES),
        (axes.EMBED, "fsdp"),
        (axes.MLP, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.VOCAB, "tensor"),
        (axes.KV, None),
        (axes.LENGTH, None),
        (axes.CODEBOOK, None),
        (axes.CODE_DIM, None),
        (axes.PATCH, None),
        (axes.CLASSES, None),
        (axes.CONV_IN, None),
        # FSDP shards the discriminator too (24M parameters at 256x256): whole on every
        # device, it kept ViT-VQGAN SL at 0.158 of its state per device under fsdp=8 (0.127
        # with it sharded). Activations keep channels whole: their batch takes fsdp first.
        (axes.CONV_OUT, "fsdp"),
    )


def normalize_rules(rules: Any, mesh: Mesh | None = None) -> AxisRules:
    """Rules as a tuple of (name, None | axis | tuple of axes) pairs.

    Accepts a sequence of pairs (tuples or lists, as a config holds them) or a mapping. With
    a `mesh`, every mesh axis a rule names must be one of the mesh's axes.
    """
    if rules is None:
        return default_axis_rules()
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ConfigError(
                f"config.axis_rules entry {pair!r} is not a (logical name, mesh axes) pair."
            )
        name, target = pair
        if target is not None and not isinstance(target, str):
            target = tuple(target)
            if not all(isinstance(axis, str) for axis in target):
                raise ConfigError(f"config.axis_rules entry {pair!r} names a non-string axis.")
        if mesh is not None:
            named = (target,) if isinstance(target, str) else target or ()
            unknown = [axis for axis in named if axis not in mesh.axis_names]
            if unknown:
                raise ConfigError(
                    f"config.axis_rules maps {name!r} to mesh axes {unknown} that are not in "
                    f"the mesh {tuple(mesh.axis_names)}."
                )
        out.append((name, target))
    return tuple(out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, what: str) -> PartitionSpec:
    """`spec` with every dimension the mesh axes do not divide evenly replicated instead."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, (size, entry) in enumerate(zip(shape, entries, strict=True)):
        if entry is None or entry is PartitionSpec.UNCONSTRAINED:
            fitted.append(None)
            continue
        named = (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[axis] for axis in named)
        if size % ways:
            logger.debug(
                "Replicating dim %d (size %d) of %s: not divisible by mesh axes %s (%d ways).",
                dim,
                size,
                what,
                named,
                ways,
            )
            fitted.append(None)
        else:
            fitted.append(entry)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Any = None) -> Any:
    """A `NamedSharding` for every leaf of `abstract_tree`, with boxes unboxed.

    `abstract_tree` is typically `jax.eval_shape` of an init function: leaves are
    `nn.LogicallyPartitioned` boxes (logical names, mapped through `rules`), `nn.Partitioned`
    boxes (mesh axis names) or plain shapes (replicated). Optimizer states that mirror a
    boxed parameter tree get the parameters' shardings. A dimension the mesh axes do not
    divide evenly is replicated (logged at debug). The result has the structure of
    `nn.meta.unbox(abstract_tree)`.
    """
    rules = normalize_rules(rules, mesh)

    def one(path, leaf):
        what = jax.tree_util.keystr(path)
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
        elif isinstance(leaf, meta.Partitioned):
            spec = PartitionSpec(*leaf.names)
        else:  # a plain leaf or another kind of box: replicated
            return NamedSharding(mesh, PartitionSpec())
        shape = getattr(leaf.value, "shape", ())
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh, what))

    return jax.tree_util.tree_map_with_path(
        one, abstract_tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata)
    )


def unbox(tree: Any) -> Any:
    """Strips metadata boxes without adding sharding constraints (out_shardings set them)."""

    def one(x):
        if isinstance(x, meta.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if isinstance(x, meta.AxisMetadata) else x

    return jax.tree_util.tree_map(one, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


# XLA:CPU code generation without LLVM's expensive optimizations: for programs that run once
# (`create_sharded`'s init) or only to be measured (vitvq.memory), compiling is what costs.
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_compile_options(mesh: Mesh) -> dict[str, Any] | None:
    """`compiler_options` for a program compiled for `mesh` where compiling costs more than
    running: `CPU_FAST_COMPILE` on a CPU mesh, None (the defaults) on any other. The platform
    is the mesh's, not the default backend's (vitvq.aot compiles for a TPU topology's devices
    from a CPU-only process)."""
    return CPU_FAST_COMPILE if mesh.devices.flat[0].platform == "cpu" else None


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Any, *args) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` so that its outputs are created already sharded.

    `jax.eval_shape` finds the (boxed) output structure, `logical_shardings` turns it into
    shardings, and `init_fn` is jitted with those `out_shardings`, under the mesh and the
    logical rules. Returns `(state, shardings)`: the state is unboxed (plain `jax.Array`s)
    and `shardings` has the same structure (use it as the train step's in/out shardings).
    `args` are traced (e.g. an rng key); pass static values by closing over them.
    """
    rules = normalize_rules(rules, mesh)
    with use_mesh(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)
        jitted = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)
        # The init runs once and is all random-number generation: without LLVM's
        # optimizations XLA:CPU compiles it ~3x faster (8.7 s -> 2.5 s for the runlocal
        # ViT-VQGAN) and runs it in milliseconds all the same.
        compiled = jitted.lower(*args).compile(compiler_options=fast_compile_options(mesh))
        state = compiled(*args)
    return state, shardings


def is_compile_only(mesh: Mesh) -> bool:
    """Whether `mesh` is made of devices no process here can run on (a TPU topology's
    compile-only devices, `jax.experimental.topologies`): nothing can be put on them."""
    return not set(mesh.devices.flat) <= set(jax.devices())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over data and FSDP, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def batch_ways(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data * fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def validate_batch(global_batch_size: int, mesh: Mesh, process_count: int | None = None) -> None:
    """Raises ConfigError unless the global batch splits evenly over devices and processes."""
    if process_count is None:
        process_count = jax.process_count()
    check_batch(global_batch_size, mesh.shape["data"], mesh.shape["fsdp"], process_count)


def check_batch(global_batch_size: int, data: int, fsdp: int, process_count: int) -> None:
    """`validate_batch` for a mesh of `data` x `fsdp` batch shards, given by its sizes."""
    ways = data * fsdp
    if global_batch_size <= 0:
        raise ConfigError(f"config.batch_size must be positive, got {global_batch_size}.")
    if global_batch_size % ways:
        raise ConfigError(
            f"config.batch_size {global_batch_size} is not divisible by the {ways} batch shards "
            f"of the mesh (data {data} x fsdp {fsdp})."
        )
    if global_batch_size % process_count:
        raise ConfigError(
            f"config.batch_size {global_batch_size} is not divisible by the {process_count} "
            "processes; each process loads an equal share."
        )


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Any = None) -> Iterator[Mesh]:
    """Makes `mesh` and the logical `rules` current (outside `jax.jit` only).

    Inside, `nn.with_logical_constraint` in models resolves logical names to this mesh's
    axes, and bare `PartitionSpec`s refer to it. `jax.set_mesh` replaces the deprecated
    `with mesh:`.
    """
    rules = normalize_rules(rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def abstract_state(init_state: Callable[[jax.Array], Any], mesh, rules):
    """(abstract state with shardings, shardings) of `init_state`, allocating nothing."""
    boxed = jax.eval_shape(init_state, jax.random.key(0))
    shardings = logical_shardings(boxed, mesh, rules)
    unboxed = unbox(boxed)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
    )
    return abstract, shardings


def create_state(init_state: Callable[[jax.Array], Any], mesh, rules, seed: int):
    """(state, shardings): `init_state(key(seed))` created directly on its shardings."""
    with use_mesh(mesh, rules):
        return create_sharded(init_state, mesh, rules, jax.random.key(seed))
