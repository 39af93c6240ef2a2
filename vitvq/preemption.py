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
"""

import contextlib
import logging
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
def sigterm_checkpoints(process_count: int):
    """Within the block, SIGTERM requests a checkpoint-and-exit (single process only).

    A no-op with several processes (JAX's runtime owns SIGTERM there), outside the main
    thread (Python allows handlers only there), and when an outer block already installed it.
    """
    global _installed
    in_main_thread = threading.current_thread() is threading.main_thread()
    if process_count != 1 or _installed or not in_main_thread:
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
