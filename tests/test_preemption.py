"""A preemption notice at any moment, and a run that outlives its console (in-process parts).

The real signals to real processes: tests/test_multiprocess.py (SIGTERM to a pod's whole
process group while it starts) and tests/test_faults.py (SIGTERM to a training process).
"""

import io
import os
import signal
import sys

import pytest

from vitvq import lost_console, peer_watchdog, preemption


def test_sigterm_at_start_up_is_recorded_and_kept_by_the_loops_block():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.recorded_from_start():
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
        assert preemption.requested()
        # The training loop's own block (single process) keeps what start-up recorded.
        with preemption.sigterm_checkpoints(1):
            assert preemption.requested()
        assert preemption.requested()
    assert signal.getsignal(signal.SIGTERM) is before
    assert not preemption.requested()


def test_a_recorded_sigterm_is_handed_to_the_runtime_that_took_sigterm_over():
    got = []
    with preemption.recorded_from_start():
        os.kill(os.getpid(), signal.SIGTERM)
        # JAX's distributed runtime installs its own handler when it starts.
        signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
        preemption.hand_over_to_jax()
        assert got == [signal.SIGTERM]
        assert not preemption.requested()  # only the runtime's agreed step stops the loop
        preemption.hand_over_to_jax()  # nothing recorded: nothing sent
        assert got == [signal.SIGTERM]


def test_a_closed_console_is_silenced_not_fatal(monkeypatch):
    read, write = os.pipe()
    os.close(read)  # the reader is gone (a pipe's `tee` killed by the same SIGTERM)
    stream = io.TextIOWrapper(io.FileIO(write, "w"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(BrokenPipeError):  # what a run met before
        print("a progress line")
    with lost_console.outlived():
        print("a progress line")
        print("the final metrics", flush=True)
        sys.stdout.flush()
        assert sys.stdout.isatty() is False  # the rest of the stream's interface stays
    assert sys.stdout is stream
    # The descriptor now points at /dev/null: later writes (C++ logs, the last flush) too.
    assert os.path.samefile(f"/proc/self/fd/{write}", os.devnull)
    stream.close()


def test_a_broken_pipe_of_this_process_is_no_peer_failure(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not peer_watchdog.is_peer_failure(BrokenPipeError(32, "Broken pipe"))
    assert not peer_watchdog.is_peer_failure(ConnectionResetError(104, "Connection reset by peer"))
    # The collectives' errors still are.
    assert peer_watchdog.is_peer_failure(RuntimeError("Gloo: Connection closed by peer"))
    assert peer_watchdog.is_peer_failure(RuntimeError("write: Broken pipe (gloo)"))
