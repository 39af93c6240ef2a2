"""Reading a checkpoint step back: into the train state's layout, or as it was saved.

Before orbax reads a step into a train state, the step's saved tree is compared with the
state's: a path missing on either side or a shape that differs is a `DataError` naming every
difference (the model or optimizer settings differ from the run that wrote it); a dtype that
differs is cast on load, with a warning. A step read as it was saved (export, `init_from`)
comes back with its own structure, every array whole on one device. A field of the state
(a dataclass) that a step does not have is read as the state's own value when that is empty
(no arrays): a part added to the state after the step was written, such as
`Stage1State.quantizer_state` of the paper's quantizer ({}), so older steps still restore.
Each step holds one item, `ITEM`, whose tree orbax stores as JSON and whose arrays it stores
with TensorStore.

`vitvq.checkpoint.Checkpointer` reads through one `StepReader` on its orbax manager, after
choosing the step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitvq.errors import DataError

logger = logging.getLogger(__name__)

ITEM = "state"  # the name of the one item each checkpoint step holds
_MAX_LISTED = 10  # mismatching paths shown in an error message


class StepReader:
    """Reads the steps in `directory` through `manager`; the step must exist and be
    committed (the caller resolves and waits for it)."""

    def __init__(self, directory: str, manager: ocp.CheckpointManager):
        self.directory = directory
        self._manager = manager

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Checkpoint `step` in `abstract_state`'s layout (see `Checkpointer.restore`)."""
        target = _restore_target(abstract_state)
        saved = self._check_matches(step, target)
        absent = _absent_empty_fields(target, saved)
        if not absent:
            return self._read(step, target)
        # Fields added to the state after this step was written, empty here: read the rest
        # (orbax wants the saved structure) and keep the state's empty values for them.
        rest = {
            f.name: getattr(target, f.name)
            for f in dataclasses.fields(target)
            if f.name not in absent
        }
        return dataclasses.replace(target, **self._read(step, rest))

    def restore_as_saved(self, step: int, device: Any = None) -> Any:
        """Checkpoint `step` with the structure it was saved with, every array whole on
        `device` (default: the first local device)."""
        try:
            items = self._manager.item_metadata(step)
            tree = getattr(items[ITEM], "tree", items[ITEM])
        except Exception as err:
            raise DataError(
                f"Checkpoint step {step} in {self.directory} is unreadable (no valid metadata): "
                f"{err}"
            ) from err
        sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])

        def leaf(x):
            if isinstance(x, ocp.metadata.ScalarMetadata) or not hasattr(x, "shape"):
                return jax.ShapeDtypeStruct(
                    (), np.dtype(getattr(x, "dtype", np.int64)), sharding=sharding
                )
            return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype), sharding=sharding)

        is_leaf = lambda x: hasattr(x, "shape") or isinstance(x, ocp.metadata.ScalarMetadata)  # noqa: E731
        return self._read(step, jax.tree_util.tree_map(leaf, tree, is_leaf=is_leaf))

    def _read(self, step: int, target: Any) -> Any:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(target)})
            )
        except Exception as err:  # orbax/TensorStore errors: name the checkpoint instead
            raise DataError(
                f"Could not read checkpoint step {step} in {self.directory}: {err}"
            ) from err
        return restored[ITEM]

    def _check_matches(self, step: int, target: Any) -> Any:
        """Raises DataError naming every path whose presence or shape differs on disk;
        returns the saved tree's metadata."""
        try:
            items = self._manager.item_metadata(step)
            metadata = items[ITEM] if items is not None and ITEM in items else None
        except Exception as err:
            raise DataError(
                f"Checkpoint step {step} in {self.directory} is unreadable (no valid metadata): "
                f"{err}"
            ) from err
        if metadata is None:
            raise DataError(
                f"Checkpoint step {step} in {self.directory} has no '{ITEM}' item; it was not "
                "written by vitvq.checkpoint."
            )
        saved_tree = getattr(metadata, "tree", metadata)
        saved = _saved_shapes_and_dtypes(saved_tree)
        wanted = {path: (_stored_shape(leaf), leaf.dtype) for path, leaf in _flat(target)}
        problems, casts = [], []
        for path in sorted(saved.keys() | wanted.keys()):
            if path not in saved:
                problems.append(f"{path}: missing from the checkpoint (state {wanted[path][0]})")
            elif path not in wanted:
                problems.append(f"{path}: in the checkpoint {saved[path][0]} but not in the state")
            elif saved[path][0] != wanted[path][0]:
                problems.append(
                    f"{path}: checkpoint shape {saved[path][0]} != state shape {wanted[path][0]}"
                )
            elif saved[path][1] is not None and not _is_key(wanted[path][1]):
                if saved[path][1] != wanted[path][1]:
                    casts.append(f"{path} {saved[path][1]} -> {wanted[path][1]}")
        if casts:  # e.g. a changed param_dtype: orbax casts on load, which may be intended
            logger.warning(
                "Restoring step %d casts %d arrays: %s", step, len(casts), ", ".join(casts[:5])
            )
        if problems:
            shown = "\n  ".join(problems[:_MAX_LISTED])
            more = len(problems) - _MAX_LISTED
            shown += f"\n  ... and {more} more" if more > 0 else ""
            raise DataError(
                f"Checkpoint step {step} in {self.directory} does not match the train state "
                f"({len(problems)} differences):\n  {shown}\nThe model or optimizer settings "
                "differ from the run that wrote it: use its config or a fresh workdir."
            )
        return saved_tree


# --- pytree helpers ----------------------------------------------------------------------


def _absent_empty_fields(target: Any, saved_tree: Any) -> list[str]:
    """The fields of a dataclass `target` that the saved tree lacks and that hold no arrays."""
    if not dataclasses.is_dataclass(target) or not isinstance(saved_tree, Mapping):
        return []
    return [
        f.name
        for f in dataclasses.fields(target)
        if f.name not in saved_tree and not jax.tree_util.tree_leaves(getattr(target, f.name))
    ]


def _key_name(entry: Any) -> str:
    """One key-path entry as text: dict keys, attribute names and indices alike."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_text(path: Iterable[Any]) -> str:
    # Orbax's metadata turns dataclass fields and named tuples into dicts and lists, so
    # paths are compared by their names, e.g. "opt_state/0/mu/dense/kernel".
    return "/".join(_key_name(entry) for entry in path) or "<root>"


def _flat(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_text(path), leaf) for path, leaf in leaves]


def _saved_shapes_and_dtypes(metadata_tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Path -> (stored shape, dtype) of each saved leaf; dtype None for Python scalars."""
    out = {}
    for path, leaf in _flat(metadata_tree):
        shape = tuple(getattr(leaf, "shape", None) or ())
        scalar = isinstance(leaf, ocp.metadata.ScalarMetadata) or not hasattr(leaf, "dtype")
        out[path] = (shape, None if scalar else np.dtype(leaf.dtype))
    return out


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_shape(leaf: jax.ShapeDtypeStruct) -> tuple[int, ...]:
    """The shape orbax stores for a leaf (typed keys are stored as their raw key data)."""
    if _is_key(leaf.dtype):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)


def _restore_target(abstract_state: Any) -> Any:
    """`abstract_state` with every leaf a `ShapeDtypeStruct` that carries a sharding."""

    def one(path, leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(
                f"abstract_state leaf {_path_text(path)} ({type(leaf).__name__}) has no "
                "sharding; give every leaf one (jax.ShapeDtypeStruct(..., sharding=...)) so "
                "arrays are restored onto devices."
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, abstract_state)
