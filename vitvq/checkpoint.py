"""Checkpoints of the train state: a thin wrapper around an orbax `CheckpointManager`.

Both stages' training loops use one `Checkpointer` on `workdir/checkpoints`:

    every = config.checkpoint_every_steps
    with Checkpointer(workdir / "checkpoints", save_every_steps=every) as ckpt:
        resumed = ckpt.restore_latest(abstract_state)   # abstract: eval_shape + shardings
        ...
        for step in ...:
            state, metrics = train_step(state, batch)
            ckpt.save(step, state)                       # only every `save_every_steps`
            if ckpt.reached_preemption(step):
                ckpt.save(step, state, force=True)
                break
        ckpt.save(final_step, state, force=True)
    # leaving the block waits for the last asynchronous write

Restore order (the trainer implements it): the latest checkpoint in the
workdir (`restore_latest`), else `config.init_from`, else a fresh init.

What a state may hold: a pytree (e.g. a `flax.struct.dataclass`) of `jax.Array`s of any
dtype (float32, bfloat16, int32, uint32, ...), scalars, nested dicts/tuples, and `None` or
`{}` for absent parts (e.g. `ema_params` when EMA is off); those round-trip as long as the
abstract state has them in the same places. PRNG keys are stored as raw key data
(`jax.random.key_data`, uint32 [2]) by our trainers, so checkpoints stay plain arrays; typed
keys also work with this orbax version. No pickle is involved: orbax writes array data with
TensorStore (OCDBT/zarr) and the tree structure as JSON.

Durability: orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` only once every file is written (the rename is the commit), and deletes old steps
only after the new one is committed. A crash or `kill -9` mid-write therefore leaves the
previous checkpoint intact; the unfinished directory is never listed as a step and is removed
when the next `Checkpointer` opens the directory. On GCS (`gs://bucket/run`; rename is not
atomic there) orbax writes the step directory in place and commits it by writing
`commit_success.txt` last; a step without that file is likewise never listed. orbax lists and
deletes steps on GCS through the google-cloud-storage package (`pip install 'vitvq[gcs]'`).

Damage after the commit (a truncated or bit-flipped file after a storage incident, a partial
copy between buckets) is caught by a record of every file's size and sha256 that process 0
writes into the step directory once the step is committed (`vitvq.digests`; written within a
step of the commit, checked on every restore). `restore_latest` skips a damaged or unrecorded
step, moves it aside to `<checkpoints>/../damaged_checkpoints/<step>` (nothing is deleted) and
resumes from the newest intact one, saying so in one line. When no intact checkpoint is left
it raises `DataError` rather than start from scratch, unless `restart_from_scratch=True`. A
directory in which no step has a record (written before records existed) is restored as
before, with a warning that it is unverified.

Asynchronous saves: `save` returns once the arrays are copied off the devices (so the
caller may donate or delete the state right after), and the files are written by background
threads. `wait()` or `close()` (also on leaving a `with` block) blocks until they are done.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from vitvq import digests, paths, preemption
from vitvq.errors import ConfigError, DataError, StorageError, VitvqError, caused_by

logger = logging.getLogger(__name__)

ITEM = "state"  # the name of the one item each checkpoint step holds
_MAX_LISTED = 10  # mismatching paths shown in an error message


class Checkpointer:
    """Saves and restores train states under one directory, keeping the last few steps.

    Args:
        directory: where step directories go (the trainer passes `workdir/checkpoints`);
            created if missing.
        max_to_keep: how many of the newest checkpoints to keep; None keeps all.
        save_every_steps: `save(step, ...)` writes only when `step` is a multiple of this
            (or at a preemption, or when forced).
        async_save: write in background threads (`save` returns after the device-to-host
            copy); False blocks until the checkpoint is committed.
        read_only: open for reading only (export, fine-tuning from another run's
            checkpoints): creates nothing, never deletes the unfinished writes of a run that
            may still be training there, and refuses to save.

    All processes of a multi-host run must make the same calls in the same order (orbax
    synchronizes them); only the primary process writes shared files.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_every_steps: int,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if isinstance(save_every_steps, bool) or not isinstance(save_every_steps, int):
            raise ConfigError(
                f"config.checkpoint_every_steps must be an integer, got {save_every_steps!r}."
            )
        if save_every_steps <= 0:
            raise ConfigError(
                f"config.checkpoint_every_steps must be positive, got {save_every_steps}."
            )
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ConfigError(
                f"max_to_keep must be a positive integer or None (keep all), got {max_to_keep!r}."
            )
        # orbax needs an absolute local path (the default workdir, runs/<config>, is
        # relative); a URL (gs://bucket/run/checkpoints) is passed on as it is.
        self.directory = paths.absolute(directory)
        self.save_every_steps = save_every_steps
        self.read_only = read_only
        self._writing: int | None = None  # the step of the newest started save
        self._unrecorded: int | None = None  # a started save whose digests are not written yet
        self._first_step: int | None = None  # the step before the first this launch trained
        _check_gcs_support(self.directory)
        if read_only and not paths.is_dir(self.directory):
            raise DataError(f"There is no checkpoint directory {self.directory}.")
        options = ocp.CheckpointManagerOptions(
            # Save on the interval and at preemption only: orbax's default policy would also
            # save the first step it sees, whatever the interval.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            # Remove what a crashed write left behind (never when reading another run's).
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        # Registering the item's handler up front lets a fresh manager read metadata of
        # existing steps before it has saved or restored anything.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(ITEM, ocp.args.StandardSave)
        registry.add(ITEM, ocp.args.StandardRestore)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._manager.reached_preemption = self._reached_sync_point  # see there

    # --- queries -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first (an asynchronous save counts once it has started)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is no checkpoint.

        Unfinished writes of earlier runs are never counted; this run's asynchronous save
        counts as soon as `save` returns (`restore` waits for it to commit).
        """
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """True once every process has seen the preemption notice (multi-host safe).

        Call it every step with the same `step` on all processes; when it returns True,
        save with `force=True`, `wait()` and exit. In a single-process run a SIGTERM caught
        by `vitvq.preemption` counts as the notice.
        """
        return preemption.requested() or self._reached_sync_point(step)

    def _reached_sync_point(self, step: int) -> bool:
        """JAX's preemption sync point, counted in the steps of this launch.

        Once a notice arrives, JAX's runtime agrees on "one past the newest counter any
        process has reported", where a process that has not reported yet counts as 0. Given
        the global step, a resumed run preempted before its first step (during restore or a
        compile, which can take minutes) would agree on step 1 and never reach it: the run
        went on until the scheduler's SIGKILL. So the counter is the number of steps since
        this Checkpointer first asked (1 after the first step of the launch), the same in
        every process. orbax's own checks (its save policy) ask through here too, so that
        nothing else moves the counter.
        """
        if self._first_step is None:
            self._first_step = step - 1
        try:
            return multihost_utils.reached_preemption_sync_point(step - self._first_step)
        except RuntimeError:  # a single process: JAX runs no preemption service
            return False

    # --- saving --------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` as checkpoint `step` if it is due; returns whether it started a save.

        A save is due when `step` is a multiple of `save_every_steps`, at a preemption, or
        always with `force=True` (e.g. the final step). A step that is already saved is
        skipped (returns False). With `async_save` the write finishes in the background;
        `state` may be donated or deleted as soon as this returns.
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer on {self.directory} is read-only")
        step = int(step)
        self._record_digests(block=False)  # the previous save, as soon as it has committed
        if step in self._manager.all_steps():
            return False
        # A failed earlier asynchronous save is reported under its own step (orbax would
        # wait for it before starting this one anyway).
        self.wait()
        self._writing = step
        with self._storage_errors():
            started = self._manager.save(
                step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}), force=force
            )
        if started:
            self._unrecorded = step
        return started

    def _record_digests(self, block: bool) -> None:
        """Writes the digest record of the last started save once it is committed (process 0;
        without `block`, only if the background write has already finished)."""
        if self._unrecorded is None:
            return
        if not block and self._manager.is_saving_in_progress():
            return
        step, self._unrecorded = self._unrecorded, None
        if jax.process_index() == 0 and step in self._manager.all_steps():
            digests.write(self._step_dir(step))

    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(step))

    def wait(self) -> None:
        """Blocks until every started save is committed; a failed write (disk full, no
        permission) raises StorageError naming the step and the checkpoints still intact."""
        with self._storage_errors():
            self._manager.wait_until_finished()
            self._record_digests(block=True)

    @contextlib.contextmanager
    def _storage_errors(self):
        try:
            yield
        except VitvqError:
            raise
        except Exception as e:  # orbax and tensorstore raise many types for one failed write
            if not _is_storage_failure(e):
                raise
            written = sorted(s for s in self._manager.all_steps() if s != self._writing)
            reason = _storage_reason(e)
            raise StorageError(
                f"cannot write the checkpoint of step {self._writing} to {self.directory}: "
                f"{reason}. The checkpoints already there (steps {written}) are intact; free "
                "space or fix permissions and restart with the same command to resume."
            ) from e

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self.wait()
        with self._storage_errors():
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- restoring -----------------------------------------------------------------------

    def restore_latest(
        self, abstract_state: Any, *, restart_from_scratch: bool = False
    ) -> tuple[Any, int] | None:
        """`(state, step)` from the newest intact checkpoint, or None when there is none
        (auto-resume). Damaged steps are set aside (see the module docstring); when every
        step is damaged, DataError, or None with `restart_from_scratch`."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            return None
        if not any(digests.has_record(self._step_dir(s)) for s in steps):
            logger.warning(
                "The checkpoints in %s have no digest records (written by an older vitvq): "
                "restoring step %d unverified.",
                self.directory,
                steps[-1],
            )
            return self.restore(abstract_state, steps[-1]), steps[-1]
        damaged, intact = {}, None
        for step in reversed(steps):
            problem = digests.check(self._step_dir(step))
            if problem is None:
                intact = step
                break
            damaged[step] = problem
        described = "; ".join(f"step {s}: {why}" for s, why in damaged.items())
        if intact is None and not restart_from_scratch:
            raise DataError(
                f"every checkpoint in {self.directory} is damaged ({described}). Nothing was "
                "changed; to start this run again from step 0, moving them aside, pass "
                "--config.restart_from_scratch=True"
            )
        if damaged:
            aside = self._set_aside(sorted(damaged))
            for step, why in damaged.items():
                logger.warning(
                    "Checkpoint step %d in %s is damaged: %s.", step, self.directory, why
                )
            logger.warning(
                "Moved the damaged checkpoints %s to %s; %s.",
                sorted(damaged),
                aside,
                f"resuming from step {intact}, the newest intact checkpoint"
                if intact is not None
                else "starting from scratch (restart_from_scratch=True)",
            )
        if intact is None:
            return None
        return self.restore(abstract_state, intact), intact

    def _set_aside(self, steps: list[int]) -> str:
        """Moves the step directories to `damaged_checkpoints/` beside the checkpoints
        directory (process 0, the others wait); returns where they went."""
        aside = paths.join(os.path.dirname(self.directory.rstrip("/")), "damaged_checkpoints")
        if jax.process_index() == 0:
            paths.makedirs(aside)
            for step in steps:
                target = paths.as_path(paths.join(aside, str(step)))
                if target.exists():  # set aside before: keep both
                    target = paths.as_path(
                        paths.join(aside, f"{step}.{len(list(target.parent.iterdir()))}")
                    )
                paths.as_path(self._step_dir(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vitvq_damaged_checkpoints_set_aside")
        self._manager.reload()
        return aside

    def damage(self, step: int) -> str | None:
        """What is wrong with checkpoint `step`, or None when it is intact (or unrecorded in
        a directory where no step has a record)."""
        steps = self.all_steps()
        if not any(digests.has_record(self._step_dir(s)) for s in steps):
            return None
        return digests.check(self._step_dir(step))

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores checkpoint `step` (default: the newest) into `abstract_state`'s layout.

        `abstract_state` has the train state's structure with `jax.ShapeDtypeStruct` leaves
        whose `.sharding` says where each array goes (e.g. `jax.eval_shape` of the init
        function plus `vitvq.parallel.logical_shardings`), or real arrays whose shardings are
        used. The mesh may differ from the one that saved the checkpoint (other device
        count or shape). Raises DataError when the step does not exist or the checkpoint's
        structure or shapes differ from `abstract_state`.
        """
        step = self._resolve_step(step)
        target = _restore_target(abstract_state)
        self._check_matches(step, target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(target)})
            )
        except Exception as err:  # orbax/TensorStore errors: name the checkpoint instead
            raise DataError(
                f"Could not read checkpoint step {step} in {self.directory}: {err}"
            ) from err
        return restored[ITEM]

    def _resolve_step(self, step: int | None) -> int:
        """`step`, or the newest when None; DataError when there is no such checkpoint."""
        self.wait()  # a step still being written in the background is not readable yet
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise DataError(f"There is no checkpoint to restore in {self.directory}.")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise DataError(
                f"There is no checkpoint for step {step} in {self.directory}; the available "
                f"steps are {steps or 'none'}."
            )
        return step

    def restore_as_saved(self, step: int | None = None, device: Any = None) -> tuple[Any, int]:
        """`(tree, step)`: checkpoint `step` (default: the newest) with the structure it was
        saved with, every array whole on one device (default: the first local device).

        For reading parts of another run's state (export, `init_from`) without building its
        train state: dataclasses come back as dicts, optimizer tuples as lists.
        """
        step = self._resolve_step(step)
        problem = self.damage(step)
        if problem is not None:
            intact = [s for s in self.all_steps() if self.damage(s) is None]
            offer = f"choose an intact one: steps {intact}" if intact else "none is intact"
            raise DataError(
                f"checkpoint step {step} in {self.directory} is damaged: {problem}; {offer} "
                "(export: --step=N)"
            )
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
        target = jax.tree_util.tree_map(leaf, tree, is_leaf=is_leaf)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(target)})
            )
        except Exception as err:
            raise DataError(
                f"Could not read checkpoint step {step} in {self.directory}: {err}"
            ) from err
        return restored[ITEM], step

    def _check_matches(self, step: int, target: Any) -> None:
        """Raises DataError naming every path whose presence or shape differs on disk."""
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
        saved = _saved_shapes_and_dtypes(getattr(metadata, "tree", metadata))
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


_CAUSES = (  # the part of a long message worth showing, most specific first
    "no space left",
    "file too large",
    "disk quota",
    "permission denied",
    "read-only file system",
    "resource_exhausted",
    "permission_denied",
)


# What tensorstore and cloud storage clients say when a write fails for lack of space,
# quota or permission (they do not always raise OSError).
_STORAGE_FAILURES = ("error writing", "failed writing", "failed to write", *_CAUSES)


def _is_storage_failure(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a failed write to storage,
    not a bug that must keep its traceback."""
    return caused_by(
        error,
        lambda e: isinstance(e, OSError) or any(s in str(e).lower() for s in _STORAGE_FAILURES),
    )


def _storage_reason(error: BaseException) -> str:
    """A failed write's cause in at most a few hundred characters: tensorstore's messages
    embed whole JSON specs, with the OS error somewhere in the middle."""
    text = " ".join(str(error).split())
    if len(text) <= 400:
        return text
    low = text.lower()
    for cause in _CAUSES:
        at = low.find(cause)
        if at >= 0:
            return f"{text[:120]} ... {text[max(0, at - 100) : at + len(cause) + 40]} ..."
    return f"{text[:150]} ... {text[-200:]}"


def _check_gcs_support(directory: str) -> None:
    """ConfigError up front when orbax could not list or delete checkpoints on GCS.

    To list the steps of a gs:// directory and to delete one (older than the last
    `max_to_keep`, or unfinished), orbax first asks google-cloud-storage whether the bucket
    has a hierarchical namespace; without that package it fails with a bare ImportError, or
    at the first deletion, hours into a run.
    """
    if not directory.startswith("gs://"):
        return
    try:
        # deferred: google-cloud-storage, the optional [gcs] extra, only for gs:// checkpoints
        import google.cloud.storage  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"Checkpoints on GCS ({directory}) need the google-cloud-storage package, which "
            "orbax uses to list and delete checkpoints there: pip install 'vitvq[gcs]' (or "
            "pip install google-cloud-storage)."
        ) from None


# --- pytree helpers ----------------------------------------------------------------------


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
