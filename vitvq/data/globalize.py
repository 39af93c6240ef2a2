"""Host batches -> global arrays: the one place input crosses from numpy to the mesh.

Each process loads `batch_size / process_count` examples; `to_global` stitches the
per-process batches into `jax.Array`s whose leading dimension is the global batch, split over
the mesh's ("data", "fsdp") axes.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vitvq import parallel
from vitvq.errors import InputError


def to_global(host_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's batch (numpy arrays, leading dim = local batch) as global arrays.

    Every process calls this with its own equal-sized share, in the same order; the result's
    leading dimension is `local batch * process_count`, sharded by `parallel.batch_sharding`.
    Nested dicts are converted leaf by leaf.
    """
    sharding = parallel.batch_sharding(mesh)
    ways = parallel.batch_ways(mesh)
    processes = jax.process_count()

    def one(path, value):
        value = np.asarray(value)
        name = jax.tree_util.keystr(path)
        if value.ndim == 0:
            raise InputError(f"batch entry {name} is a scalar; every entry needs a batch dim.")
        global_size = value.shape[0] * processes
        if global_size % ways:
            raise InputError(
                f"batch entry {name} has a local batch of {value.shape[0]} (global "
                f"{global_size} over {processes} processes), not divisible by the {ways} "
                "batch shards of the mesh; choose a batch_size divisible by data * fsdp."
            )
        return jax.make_array_from_process_local_data(sharding, value)

    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in jax.tree_util.tree_leaves(host_batch)}
    if len(sizes) > 1:
        raise InputError(f"batch entries have different leading sizes {sorted(sizes, key=str)}.")
    return jax.tree_util.tree_map_with_path(one, dict(host_batch))


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a global array as numpy, on every process (the reverse of `to_global`).

    A batch-sharded array of a multi-process run lives partly on other hosts: it is gathered
    (a collective: every process must call this, in the same order). Arrays that are on this
    process whole or fully replicated are copied without communication.
    """
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
