"""Writing checkpoint steps: when a step is due, how many stay, and the write in the background.

A save is due every `save_every_steps` steps and at a preemption (or when forced); orbax
keeps the newest `max_to_keep` steps, deleting an old one only after the new one is
committed. `StepWriter.save` returns once the arrays are copied off the devices (so the
caller may donate or delete the state right after), and the files are written by background
threads; `wait()` blocks until they are committed, then has the step's digest record
written (`vitvq.checkpoint_ledger`). A write that fails for lack of space, quota or
permission raises `StorageError` naming the step and the checkpoints still intact; any other
error keeps its own exception and traceback.

`vitvq.checkpoint.Checkpointer` builds its orbax manager with `manager_options` and writes
through one `StepWriter`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from vitvq.checkpoint_ledger import StepLedger
from vitvq.errors import ConfigError, StorageError, VitvqError, caused_by


def manager_options(
    *, save_every_steps: int, max_to_keep: int | None, async_save: bool, read_only: bool
) -> ocp.CheckpointManagerOptions:
    """orbax's options for these settings; ConfigError for a bad interval or `max_to_keep`."""
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
    return ocp.CheckpointManagerOptions(
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


class PreemptionSync:
    """JAX's preemption sync point, counted in the steps of this launch.

    Once a notice arrives, JAX's runtime agrees on "one past the newest counter any process
    has reported", where a process that has not reported yet counts as 0. Given the global
    step, a resumed run preempted before its first step (during restore or a compile, which
    can take minutes) would agree on step 1 and never reach it: the run went on until the
    scheduler's SIGKILL. So the counter is the number of steps since this sync was first
    asked (1 after the first step of the launch), the same in every process. orbax's own
    checks (its save policy) ask through `reached` too, so that nothing else moves the
    counter.
    """

    def __init__(self):
        self._first_step: int | None = None  # the step before the first this launch trained

    def reached(self, step: int) -> bool:
        if self._first_step is None:
            self._first_step = step - 1
        try:
            return multihost_utils.reached_preemption_sync_point(step - self._first_step)
        except RuntimeError:  # a single process: JAX runs no preemption service
            return False


class StepWriter:
    """Starts saves on `manager` and waits for them, recording each committed step in
    `ledger`; failed writes become StorageError (see the module docstring)."""

    def __init__(self, directory: str, manager: ocp.CheckpointManager, ledger: StepLedger):
        self.directory = directory
        self._manager = manager
        self._ledger = ledger
        self._writing: int | None = None  # the step of the newest started save
        self._unrecorded: int | None = None  # a started save whose digests are not written yet

    def save(self, step: int, args: Any, *, force: bool) -> bool:
        """Starts saving `args` as step `step` if it is due and not saved yet; returns
        whether it started."""
        self._record_digests(block=False)  # the previous save, as soon as it has committed
        if step in self._manager.all_steps():
            return False
        # A failed earlier asynchronous save is reported under its own step (orbax would
        # wait for it before starting this one anyway).
        self.wait()
        self._writing = step
        with self._storage_errors():
            started = self._manager.save(step, args=args, force=force)
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
        self._ledger.record(step)

    def wait(self) -> None:
        """Blocks until every started save is committed and recorded."""
        with self._storage_errors():
            self._manager.wait_until_finished()
            self._record_digests(block=True)

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self.wait()
        with self._storage_errors():
            self._manager.close()

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
