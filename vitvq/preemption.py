"""SIGTERM in a single-process run: finish the step in flight, checkpoint, exit 0.

Schedulers announce preemption with SIGTERM and follow with SIGKILL after a grace period
(SLURM's KillWait, 30 s by default; Cloud TPU maintenance events). In a multi-process run
JAX's distributed runtime catches SIGTERM and agrees on a step with every process; the loop
asks it through `Checkpointer.reached_preemption`. A single process has no such service, so
this module's handler records the signal and `Checkpointer.reached_preemption` reports it:
the loop saves a checkpoint after the step in flight and returns, and the entry point exits
with status 0. A restart with the same command resumes from exactly that step.

The handler is installed only in the main thread of a single-process run, and the previous
handler is put back when the `sigterm_checkpoints` block ends. A second SIGTERM while the
checkpoint is being written is recorded like the first (the write is not interrupted).

A notice can come at any moment, also while the command starts (imports, flag parsing, the
processes meeting): `vitvq.main` records SIGTERM from its first line (`recorded_from_start`)
instead of dying by it. In a single-process run that record is the notice the loop sees
(before its first step it exits 0 with one line: nothing was trained, nothing to save). In a
multi-process run JAX's runtime takes SIGTERM over when it starts; a notice recorded before
that is handed to it (`hand_over_to_jax`), so the processes agree on a step as for any later
notice.
"""

import contextlib
import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

_requested = threading.Event()
_installed = False


_stopped_at: list[int] = []  # the step at which the last training loop stopped for preemption


def requested() -> bool:
    """Whether a SIGTERM arrived since the handler was installed."""
    return _requested.is_set()


def note_stopped(step: int | None) -> None:
    """The loop records where it stopped for a preemption (None: it has not)."""
    _stopped_at[:] = [] if step is None else [int(step)]


def stopped_at() -> int | None:
    """The step at which the last training loop of this process stopped for a preemption
    (any process count), else None; a multi-stage run (the pipeline) stops there too."""
    return _stopped_at[0] if _stopped_at else None


def _on_sigterm(signum, frame):
    del frame
    if not _requested.is_set():
        logger.warning(
            "Received %s: checkpointing after the current step, then exiting.",
            signal.Signals(signum).name,
        )
    _requested.set()


@contextlib.contextmanager
def _handler_installed():
    """Installs `_on_sigterm` for the block, unless an outer block did or this is not the main
    thread (Python allows handlers only there); a new record starts empty."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _installed = False


@contextlib.contextmanager
def recorded_from_start():
    """Within the block (a command's whole run), SIGTERM is recorded, not fatal; the previous
    handler comes back at the end, and the record is cleared. Within an outer block, or
    outside the main thread, a no-op. The `sigterm_checkpoints` blocks inside keep the
    record."""
    with _handler_installed():
        try:
            yield
        finally:
            _requested.clear()


def hand_over_to_jax() -> None:
    """Call right after JAX's distributed runtime started (it handles SIGTERM from then on:
    its preemption service makes every process agree on a step). A SIGTERM recorded before
    goes to it: this process signals itself once more. The record is cleared, so that only
    JAX's agreed step stops this process's loop."""
    if _requested.is_set():
        _requested.clear()
        logger.warning("The SIGTERM of the start-up goes to JAX's preemption service.")
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def sigterm_checkpoints(process_count: int):
    """Within the block, SIGTERM requests a checkpoint-and-exit (single process only).

    A no-op with several processes (JAX's runtime owns SIGTERM there), outside the main
    thread (Python allows handlers only there), and when an outer block already installed it.
    """
    if process_count != 1:
        yield
        return
    with _handler_installed():
        yield
