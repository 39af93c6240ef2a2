"""Batched autoregressive sampling from a VIM with its KV cache, in one jitted function.

The class token (or start slot) and any given prefix are prefilled into the cache in one pass;
then one `jax.lax.fori_loop` feeds each sampled code back, one slot per step, never
recomputing the prefix. Per position the logits go through, in this order:

1. classifier-free guidance (conditional model, cfg_scale != 1): the conditional and the
   null-class streams run side by side in one cache (interleaved along the batch, so a
   batch-sharded pair stays on one device) and combine as uncond + s * (cond - uncond);
2. temperature (0 means greedy: the argmax of the guided logits; top-k/top-p are then moot);
3. top-k (0: off), keeping exactly k codes, ties broken towards the lower code id;
4. top-p (1: off), keeping the smallest set of most probable codes whose probability
   reaches p (at least one; ties broken towards the lower code id);
5. `jax.random.categorical` with `fold_in(rng, position)`, so a seed gives the same samples
   whatever the mesh (threefry is partitionable) and the batch layout.
"""

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vitvq.errors import InputError
from vitvq.models.vim import VIM, check_labels

# Sequences longer than this decode with a KV cache in blocks of this many slots, each
# step reading only the filled blocks (0: one fixed-length cache, read whole at every step).
# BENCHMARKS.md ("What limits the stage-1 step and the sampler") has the measurements.
CACHE_BLOCK = 256
# Mesh axes the batch is split over, the first of these that the mesh has.
_BATCH_AXES_BY_PREFERENCE = (("data", "fsdp"), ("batch",))


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits of the last axis (exactly k; ties go to the lower index)
    and sets the others to -inf. k == 0 or k >= vocab: unchanged."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    _, idx = jax.lax.top_k(logits, k)  # [..., k]
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, True, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter over the last axis: keeps the smallest set of most probable entries whose
    total probability reaches p (at least the most probable one; ties go to the lower index)
    and sets the others to -inf. p >= 1: unchanged."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1, descending=True, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    # Probability of the entries ranked above each one.
    mass = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(mass[..., :1]), mass[..., :-1]], axis=-1)
    keep_sorted = mass_before < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def guide(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond); exactly `cond` at scale 1."""
    if isinstance(scale, int | float) and scale == 1:
        return cond
    return uncond + scale * (cond - uncond)


def filter_and_sample(
    rng: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Temperature, top-k, top-p, then a categorical draw: logits [B, V] -> int32 [B]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    logits = apply_top_p(apply_top_k(logits, top_k), top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def batch_axes_of(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ("data", "fsdp") of the project's mesh, else
    "batch", else every axis of the mesh."""
    for names in _BATCH_AXES_BY_PREFERENCE:
        present = tuple(a for a in names if a in mesh.axis_names)
        if present:
            return present
    return tuple(mesh.axis_names)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "temperature",
        "top_k",
        "top_p",
        "cfg_scale",
        "sharding",
        "block_size",
    ),
)
def _sample(
    params,
    rng,
    labels,
    prefix,
    *,
    model,
    temperature,
    top_k,
    top_p,
    cfg_scale,
    sharding,
    block_size=0,
):
    """labels int32 [B] (zeros when unconditional), prefix int32 [B, P] with P < T ->
    int32 [B, T]."""
    b, p = prefix.shape
    t_total = model.seq_len
    guided = model.conditional and cfg_scale != 1
    streams = 2 if guided else 1

    def constrain(x):
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def widen(x):  # [B, ...] -> [streams * B, ...], the streams of one example adjacent
        return x if streams == 1 else jnp.repeat(x, streams, axis=0)

    def step(cache, inputs, block=None):
        logits, cache = model.apply(
            {"params": params}, cache, inputs, block, method=model.decode_step
        )
        if logits.ndim == 3:
            logits = logits[:, -1]
        if guided:
            pair = logits.reshape(b, 2, -1)
            logits = guide(pair[:, 0], pair[:, 1], cfg_scale)
        return logits, cache

    def sample(pos, logits):
        return filter_and_sample(jax.random.fold_in(rng, pos), logits, temperature, top_k, top_p)

    first = labels
    if guided:  # [cond_0, null, cond_1, null, ...]
        null = jnp.full_like(labels, model.null_class)
        first = jnp.stack([labels, null], axis=1).reshape(-1)
    cache = model.init_cache(streams * b)
    cache["layers"] = jax.tree_util.tree_map(constrain, cache["layers"])
    # Prefill slots 0..P: the label and the prefix codes; the last slot predicts x_P.
    inputs = jnp.concatenate([constrain(first)[:, None], widen(prefix)], axis=1)
    logits, cache = step(cache, inputs)
    code = sample(p, logits)
    tokens = constrain(jnp.zeros((b, t_total), jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, prefix, 0, axis=1)
    tokens = tokens.at[:, p].set(code)

    def body(pos, carry, block=None):
        cache, tokens, code = carry
        logits, cache = step(cache, widen(code), block)  # slot `pos` predicts x_pos
        code = sample(pos, logits)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, code[:, None], pos, axis=1)
        return cache, constrain(tokens), code

    if not block_size or t_total <= block_size or t_total % block_size:
        _, tokens, _ = jax.lax.fori_loop(p + 1, t_total, body, (cache, tokens, code))
        return tokens
    # A blocked cache: the steps of block k read blocks 0..k only, not the empty rest.
    carry = (VIM.split_cache(cache, block_size), tokens, code)
    start = p + 1
    while start < t_total:
        block = start // block_size
        end = (block + 1) * block_size
        carry = jax.lax.fori_loop(start, end, functools.partial(body, block=block), carry)
        start = end
    return carry[1]


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _validate(model, batch_size, labels, temperature, top_k, top_p, cfg_scale, prefix) -> None:
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise InputError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if not isinstance(top_k, int | np.integer) or not 0 <= top_k <= model.vocab_size:
        raise InputError(
            f"top_k must be an integer in [0, {model.vocab_size}] (0 = off), got {top_k!r}"
        )
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not _is_number(cfg_scale) or not 0 <= cfg_scale < math.inf:
        raise InputError(f"cfg_scale must be a finite number >= 0 (1 = off), got {cfg_scale!r}")
    if not model.conditional and cfg_scale != 1:
        raise InputError(
            f"cfg_scale must be 1 for an unconditional model (num_classes=0), got {cfg_scale}"
        )
    check_labels(labels, batch_size, model.num_classes)
    if prefix is not None:
        shape = tuple(prefix.shape)
        if len(shape) != 2 or shape[0] != batch_size or shape[1] > model.seq_len:
            raise InputError(
                f"prefix must be [batch_size, P] = [{batch_size}, P] with P in "
                f"[0, {model.seq_len}], got shape {shape}"
            )
        if not jnp.issubdtype(prefix.dtype, jnp.integer):
            raise InputError(f"prefix must be integer codes, got dtype {prefix.dtype}")
        if not isinstance(prefix, jax.core.Tracer) and prefix.size:
            values = np.asarray(prefix)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= model.vocab_size:
                raise InputError(
                    f"prefix codes must be in [0, {model.vocab_size - 1}], got values in "
                    f"[{lo}, {hi}]"
                )


def sample_tokens(
    model: VIM,
    params: Mapping[str, Any],
    rng: jax.Array,
    *,
    batch_size: int,
    labels: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    prefix: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Samples `batch_size` code sequences: int32 [batch_size, T] in raster order.

    params: the VIM's "params" collection (boxed or not; a {"params": ...} dict also works).
    labels: int [batch_size] for a class-conditional model, in [0, num_classes] (num_classes,
      the null class, samples unconditionally); None for an unconditional model.
    temperature >= 0 (0: greedy), top_k in [0, vocab] (0: off), top_p in (0, 1] (1: off),
      cfg_scale >= 0 (1: off; conditional models only). See the module docstring for the
      order they apply in.
    prefix: int [batch_size, P], P <= T: the first P codes (e.g. the top rows of a real image
      to complete); they are prefilled into the cache and returned unchanged.
    mesh: split the batch over this mesh's batch axes (`batch_axes_of`); params are
      replicated. batch_size must divide evenly.
    Raises InputError on out-of-range arguments.
    """
    _validate(model, batch_size, labels, temperature, top_k, top_p, cfg_scale, prefix)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    params = nn.meta.unbox(params)
    labels = jnp.zeros((batch_size,), jnp.int32) if labels is None else labels
    labels = jnp.asarray(labels, jnp.int32)
    prefix = jnp.zeros((batch_size, 0), jnp.int32) if prefix is None else prefix
    prefix = jnp.asarray(prefix, jnp.int32)
    sharding = None
    if mesh is not None:
        names = batch_axes_of(mesh)
        ways = math.prod(mesh.shape[a] for a in names)
        if batch_size % ways:
            raise InputError(
                f"batch_size {batch_size} is not divisible by the {ways} batch shards of the "
                f"mesh (axes {names})"
            )
        # Auto axes (as the project's meshes have; jax.make_mesh defaults to Explicit), so
        # that XLA propagates the batch sharding from the constrained cache and inputs.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
        sharding = NamedSharding(mesh, PartitionSpec(names))
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        labels, prefix = jax.device_put((labels, prefix), sharding)
        rng = jax.device_put(rng, NamedSharding(mesh, PartitionSpec()))
    if prefix.shape[1] == model.seq_len:
        return prefix
    return _sample(
        params,
        rng,
        labels,
        prefix,
        model=model,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        cfg_scale=float(cfg_scale),
        sharding=sharding,
        block_size=CACHE_BLOCK,
    )
