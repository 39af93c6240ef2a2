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

Damage after the commit (a truncated or bit-flipped file, a partial copy between buckets)
is caught by a digest record of every committed step: `restore_latest` sets a damaged or
unrecorded step aside and resumes from the newest intact one (`vitvq.checkpoint_ledger`).

Asynchronous saves: `save` returns once the arrays are copied off the devices (so the
caller may donate or delete the state right after), and the files are written by background
threads. `wait()` or `close()` (also on leaving a `with` block) blocks until they are done
(`vitvq.checkpoint_writer`).

The `Checkpointer` opens the orbax manager and composes the parts, each in its own module:
`checkpoint_writer` (when a step is due, how many stay, the background write and its
failures), `checkpoint_ledger` (which steps are intact) and `checkpoint_reader` (a step read
back into the train state's layout, or as saved).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from vitvq import paths, preemption
from vitvq.checkpoint_ledger import StepLedger
from vitvq.checkpoint_reader import ITEM, StepReader
from vitvq.checkpoint_writer import PreemptionSync, StepWriter, manager_options
from vitvq.errors import ConfigError, DataError


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
        options = manager_options(
            save_every_steps=save_every_steps,
            max_to_keep=max_to_keep,
            async_save=async_save,
            read_only=read_only,
        )
        # orbax needs an absolute local path (the default workdir, runs/<config>, is
        # relative); a URL (gs://bucket/run/checkpoints) is passed on as it is.
        self.directory = paths.absolute(directory)
        self.save_every_steps = save_every_steps
        self.read_only = read_only
        _check_gcs_support(self.directory)
        if read_only and not paths.is_dir(self.directory):
            raise DataError(f"There is no checkpoint directory {self.directory}.")
        # Registering the item's handler up front lets a fresh manager read metadata of
        # existing steps before it has saved or restored anything.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(ITEM, ocp.args.StandardSave)
        registry.add(ITEM, ocp.args.StandardRestore)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )
        self._sync = PreemptionSync()
        self._manager.reached_preemption = self._sync.reached  # see PreemptionSync
        self._ledger = StepLedger(self.directory, self._manager)
        self._writer = StepWriter(self.directory, self._manager, self._ledger)
        self._reader = StepReader(self.directory, self._manager)

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
        return preemption.requested() or self._sync.reached(step)

    def damage(self, step: int) -> str | None:
        """What is wrong with checkpoint `step`, or None when it is intact (or unrecorded in
        a directory where no step has a record)."""
        return self._ledger.damage(step)

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
        args = ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)})
        return self._writer.save(int(step), args, force=force)

    def wait(self) -> None:
        """Blocks until every started save is committed; a failed write (disk full, no
        permission) raises StorageError naming the step and the checkpoints still intact."""
        self._writer.wait()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._writer.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- restoring -----------------------------------------------------------------------

    def restore_latest(
        self, abstract_state: Any, *, restart_from_scratch: bool = False
    ) -> tuple[Any, int] | None:
        """`(state, step)` from the newest intact checkpoint, or None when there is none
        (auto-resume). Damaged steps are set aside (see `vitvq.checkpoint_ledger`); when
        every step is damaged, DataError, or None with `restart_from_scratch`."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            return None
        intact = self._ledger.newest_intact(steps, restart_from_scratch=restart_from_scratch)
        if intact is None:
            return None
        return self.restore(abstract_state, intact), intact

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores checkpoint `step` (default: the newest) into `abstract_state`'s layout.

        `abstract_state` has the train state's structure with `jax.ShapeDtypeStruct` leaves
        whose `.sharding` says where each array goes (e.g. `jax.eval_shape` of the init
        function plus `vitvq.parallel.logical_shardings`), or real arrays whose shardings are
        used. The mesh may differ from the one that saved the checkpoint (other device
        count or shape). Raises DataError when the step does not exist or the checkpoint's
        structure or shapes differ from `abstract_state`.
        """
        return self._reader.restore(self._resolve_step(step), abstract_state)

    def restore_as_saved(self, step: int | None = None, device: Any = None) -> tuple[Any, int]:
        """`(tree, step)`: checkpoint `step` (default: the newest) with the structure it was
        saved with, every array whole on one device (default: the first local device).

        For reading parts of another run's state (export, `init_from`) without building its
        train state: dataclasses come back as dicts, optimizer tuples as lists. DataError when
        the step is damaged, naming the intact ones.
        """
        step = self._resolve_step(step)
        self._ledger.check_intact(step)
        return self._reader.restore_as_saved(step, device), step

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
