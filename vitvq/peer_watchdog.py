"""A multi-process run stops when one of its processes dies.

A process that dies (killed, crashed, its host gone) stops the others within a bounded time,
each printing one line `error: multi-process run stopped: WHAT, so process I of N stops too
(CAUSE) ...` and exiting with status `PEER_FAILURE_EXIT_CODE`, without the clean-up that
would wait for the dead process (the last committed checkpoint stays; rerunning all
processes resumes from it):
- a watchdog thread in every process (`start`, right after JAX's distributed runtime
  started) beats in JAX's key-value store (on process 0) and reads the others' beats; a
  process silent for `heartbeat_timeout` seconds (flag `--heartbeat_timeout`, env
  VITVQ_HEARTBEAT_TIMEOUT, default `cluster_env.DEFAULT_HEARTBEAT_TIMEOUT`) is named as
  stopped ("process 1 stopped");
- when process 0 (the coordinator) dies, the others notice at once ("lost contact with the
  coordinator (process 0 at HOST:PORT)");
- a collective that fails because a peer is gone (gloo/NCCL errors) ends the training loop
  through `exit_if_peer_failure`, which waits for the watchdog to name the process.
A process whose work ended normally calls `finish()`: the others stop watching it.

JAX's distributed runtime reacts to the same failures on its own, from a C++ thread: its
coordination service reports a task whose heartbeats stopped (to every other task), and a
task that loses the coordinator notices at once; either way the task logs "Terminating
process because the JAX distributed service detected fatal errors" (LOG(FATAL)) and calls
abort(). jaxlib offers no working way to replace that reaction from Python (a Python
`missed_heartbeat_callback` dies with std::bad_cast in jaxlib 0.10; `jax_enable_recoverability`
silences reports of dead workers only, and drops the shutdown barrier that keeps process 0's
coordinator up until the others finish), so a run keeps its one-line error and status 3 in
two ways:
- JAX's heartbeat timeout is `jax_heartbeat_timeout(heartbeat_timeout)`: the service may
  report a task half its timeout after the task's death (the task beats every half timeout),
  so this keeps JAX's report `JAX_HEARTBEAT_MARGIN` seconds behind the watchdog's;
- while the watchdog runs, a SIGABRT handler turns JAX's abort into the same `_stop` when it
  follows a peer failure (the coordinator refuses connections, or the watchdog has not heard
  from a process, or it does within its timeout: gloo aborts at once on a message cut off by
  a peer's death): JAX's lines come first, then the project's line and status 3. Any other
  abort ends the process as before, after that wait.
"""

import atexit
import ctypes
import os
import signal
import socket
import sys
import threading
import time

from vitvq.cluster_env import DistributedSettings
from vitvq.errors import caused_by

# A survivor of a dead peer exits with this status (2 is a user error, 1 a crash).
PEER_FAILURE_EXIT_CODE = 3
# Seconds by which JAX's own report of a silent process comes after the watchdog's.
JAX_HEARTBEAT_MARGIN = 30

_state = {"settings": None, "watchdog": None, "abort_handler": None}
_exit_lock = threading.Lock()
# What a collective or the runtime says when another process is gone (lower case).
_PEER_FAILURE_MARKERS = (
    "gloo",
    "nccl",
    "connection closed",
    "connection reset",
    "broken pipe",
    "socket closed",
    "coordination service",
    "heartbeat",
    "barrier timed out",
    "task died",
)
_ALIVE_PREFIX = "vitvq/alive/"  # key-value store: process id -> beat counter, or "done"
_DONE = "done"
_WAKE_PREFIX = "vitvq/wake/"  # process id -> set when its coordinator watch should end


def _coordinator_address(settings: DistributedSettings | None) -> str | None:
    if settings is not None and settings.coordinator:
        return settings.coordinator
    # jax._src: no public API gives the coordinator address JAX was started with (jax 0.10).
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "coordinator_address", None)


def _coordinator_gone(settings: DistributedSettings | None) -> bool:
    """True when process 0's coordinator refuses connections (a few tries within ~0.2 s: a
    killed process's sockets close one by one)."""
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    address = _coordinator_address(settings)
    if not address or jax.process_index() == 0:
        return False
    host, _, port = address.rpartition(":")
    for attempt in range(3):
        if attempt:
            time.sleep(0.05)
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
                pass
        except (OSError, ValueError):
            return True
    return False


def _stop(what: str, cause: str) -> None:
    """Prints `error: multi-process run stopped: WHAT ...` and ends the process at once.

    No clean-up: closing the checkpointer or JAX's shutdown barrier would wait for the dead
    process. The last committed checkpoint is kept (an unfinished one is discarded at the
    next start). The first caller wins; a second one (another thread) waits for the exit.
    """
    _exit_lock.acquire()
    try:
        # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
        import jax

        me = f"process {jax.process_index()} of {jax.process_count()}"
        cause = " ".join(cause.split())
        cause = cause if len(cause) <= 300 else cause[:297] + "..."
        message = (
            f"multi-process run stopped: {what}, so {me} stops too ({cause}). The other "
            "processes' logs say why; rerun all processes to resume from the last checkpoint."
        )
        sys.stdout.flush()
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(PEER_FAILURE_EXIT_CODE)


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says another process of this run is gone."""
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    if jax.process_count() <= 1:
        return False
    # Python's own OSErrors (BrokenPipeError, ConnectionResetError, ...) come from this
    # process's files, pipes and sockets (a closed console, remote storage), never from the
    # collectives or JAX's runtime, whose errors are JaxRuntimeError.
    return caused_by(
        error,
        lambda e: (
            isinstance(e, Exception)
            and not isinstance(e, OSError)
            and any(m in str(e).lower() for m in _PEER_FAILURE_MARKERS)
        ),
    )


def exit_if_peer_failure(error: BaseException) -> None:
    """Ends this process with one `error:` line and status `PEER_FAILURE_EXIT_CODE` when
    `error` says another process is gone; returns otherwise.

    The line names the dead process when the watchdog finds it (within its timeout: the
    collective that failed knows only a socket), else it says the coordinator is gone, or
    that some process is.
    """
    if not is_peer_failure(error):
        return
    settings = _state["settings"]
    cause = f"{type(error).__name__}: {error}"
    if _coordinator_gone(settings):
        address = _coordinator_address(settings)
        _stop(f"lost contact with the coordinator (process 0 at {address})", cause)
    watchdog = _state["watchdog"]
    if watchdog is not None and watchdog.is_alive():
        watchdog.await_verdict()
        what = "a collective with the other processes failed although they are alive"
    else:
        what = "a collective with the other processes failed (one may have stopped)"
    if "gloo context initialization failed" in cause.lower():
        # XLA gives gloo 30 s for the processes to meet at the first collective of a group.
        what += ": they reached it more than 30 s apart (uneven compile times on a loaded machine?)"
    _stop(what, cause)


class _Watchdog(threading.Thread):
    """Beats in JAX's key-value store and watches the others' beats.

    Every `timeout / 5` seconds this process bumps its counter under `vitvq/alive/<id>` and
    reads everyone's. A process whose counter has not moved for `timeout` seconds (and that
    has not finished) is dead: `_stop` names it. A key-value call that fails means the
    coordinator is gone; on processes other than 0 a second thread waits on the coordinator
    to notice that at once. Threads, so they work while the main thread waits in a
    collective with the dead process (JAX releases the GIL there).
    """

    def __init__(self, client, process_id: int, num_processes: int, timeout: float):
        super().__init__(name="vitvq-peer-watchdog", daemon=True)
        self._client = client
        self._id = process_id
        self._count = num_processes
        self.timeout = float(timeout)
        self.period = max(0.2, self.timeout / 5)
        self._halt = threading.Event()
        self._listener: threading.Thread | None = None
        self._watching_since = time.monotonic()
        self._seen: dict[int, str] = {}  # peer -> its last value seen
        self._changed: dict[int, float] = {}  # peer -> when that value was first seen

    def await_verdict(self) -> None:
        """Waits as long as the watchdog needs to call a peer dead (its timeout and two beats);
        if one is, the watchdog ends the process and this never returns."""
        self.join(self.timeout + 2 * self.period)

    def silent(self, longer_than: float) -> list[int]:
        """The unfinished peers not heard from for more than `longer_than` seconds."""
        now = time.monotonic()
        return [
            peer
            for peer in range(self._count)
            if peer != self._id
            and self._seen.get(peer) != _DONE
            and now - self._changed.get(peer, self._watching_since) > longer_than
        ]

    def stop_for(self, dead: list[int], silence: float) -> None:
        """`_stop` naming the silent processes `dead`."""
        _stop(
            f"process{'es' if len(dead) > 1 else ''} {', '.join(map(str, dead))} stopped",
            f"no sign of life for {silence:g} s",
        )

    def run(self) -> None:
        self._watching_since = time.monotonic()
        beat = 0
        while not self._halt.wait(self.period):
            beat += 1
            try:
                self._client.key_value_set(
                    f"{_ALIVE_PREFIX}{self._id}", str(beat), allow_overwrite=True
                )
                entries = self._client.key_value_dir_get(_ALIVE_PREFIX)
            except Exception as e:  # noqa: BLE001 - any failure here means no coordinator
                if self._halt.is_set():
                    return
                address = _coordinator_address(_state["settings"])
                _stop(f"lost contact with the coordinator (process 0 at {address})", str(e))
            now = time.monotonic()
            for key, value in entries:
                try:
                    peer = int(key.rsplit("/", 1)[-1])
                except ValueError:
                    continue
                if self._seen.get(peer) != value:
                    self._seen[peer], self._changed[peer] = value, now
            dead = self.silent(self.timeout)
            if dead and not self._halt.is_set():
                self.stop_for(dead, self.timeout)

    def start(self) -> None:
        super().start()
        if self._id != 0:
            self._listener = threading.Thread(
                target=self._listen, name="vitvq-coordinator-watch", daemon=True
            )
            self._listener.start()

    def _listen(self) -> None:
        """Waits on a key only `halt` sets: the wait fails the moment process 0 is gone, as
        fast as JAX's own error polling (whose abort `_on_abort` catches when it comes first)."""
        while not self._halt.is_set():
            try:
                self._client.blocking_key_value_get(f"{_WAKE_PREFIX}{self._id}", 600_000)
            except Exception as e:  # noqa: BLE001
                text = str(e)
                if self._halt.is_set():
                    return
                if "DEADLINE_EXCEEDED" in text or "timed out" in text:
                    continue  # nothing happened for 10 minutes: wait again
                address = _coordinator_address(_state["settings"])
                _stop(f"lost contact with the coordinator (process 0 at {address})", text)

    def halt(self, finished: bool) -> None:
        """Stops watching; `finished`: tell the others this process ended normally.

        Waits for both threads: a thread still inside a runtime call when the interpreter
        shuts down would abort the process.
        """
        self._halt.set()
        _release_aborts()
        me = threading.current_thread()
        if self.is_alive() and self is not me:
            self.join(timeout=10)  # its last beat must not land after "done"
        try:
            if finished:
                self._client.key_value_set(
                    f"{_ALIVE_PREFIX}{self._id}", _DONE, allow_overwrite=True
                )
            if self._listener is not None:
                self._client.key_value_set(f"{_WAKE_PREFIX}{self._id}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone already
            pass
        if self._listener is not None and self._listener.is_alive() and self._listener is not me:
            self._listener.join(timeout=10)


# void (*)(int): a signal handler as C sees it.
_SIGNAL_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _libc_signal():
    """libc's `signal(2)`, or None where ctypes cannot reach it."""
    try:
        install = ctypes.CDLL(None).signal
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
        return None
    install.restype = ctypes.c_void_p
    install.argtypes = (ctypes.c_int, ctypes.c_void_p)
    return install


def _stop_after_abort() -> None:
    """`_stop` when the abort in progress follows a peer failure; returns otherwise."""
    settings = _state["settings"]
    if _coordinator_gone(settings):
        _stop(
            f"lost contact with the coordinator (process 0 at {_coordinator_address(settings)})",
            "JAX's distributed runtime lost its connection to the coordination service",
        )
    watchdog = _state["watchdog"]
    if watchdog is None:
        return
    # JAX reports a silent process `JAX_HEARTBEAT_MARGIN` s after the watchdog would: by then
    # the watchdog has missed its beats for longer than its timeout.
    _stop_for_silent(watchdog)
    # An abort that comes at once, before any process is silent for long: gloo's own
    # consistency check on a half-received message from a peer killed mid-collective
    # (`gloo::EnforceNotMet ... Received data size doesn't match`). Give the watchdog its
    # timeout to name the peer (it ends the process itself); any other abort goes on after.
    if watchdog.is_alive():
        watchdog.await_verdict()
        _stop_for_silent(watchdog)


def _stop_for_silent(watchdog) -> None:
    """`_stop` naming the processes silent for the watchdog's timeout, or (where this machine
    starved the watchdog) for more than two beats; returns when none is."""
    for longer_than in (watchdog.timeout, 2 * watchdog.period):
        dead = watchdog.silent(longer_than)
        if dead:
            watchdog.stop_for(dead, longer_than)


def _on_abort(signum: int) -> None:
    """SIGABRT while the watchdog runs: JAX's LOG(FATAL) on a dead peer becomes `_stop`.

    Runs in the thread that called abort() (JAX's error-polling thread), holding the
    interpreter lock; returning lets abort() end the process as it would have.
    """
    del signum
    try:
        _stop_after_abort()
    except Exception:  # noqa: BLE001 - never hide the abort behind an error of this handler
        pass
    _release_aborts()


def _catch_aborts() -> None:
    """Installs `_on_abort` for SIGABRT (until `_release_aborts`)."""
    install = _libc_signal()
    if install is None or _state["abort_handler"] is not None:
        return
    handler = _SIGNAL_HANDLER(_on_abort)
    previous = install(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p).value)
    if previous == ctypes.c_void_p(-1).value:  # SIG_ERR
        return
    _state["abort_handler"] = (install, handler, previous)


def _release_aborts() -> None:
    """Puts back the SIGABRT handler that `_catch_aborts` replaced."""
    installed = _state["abort_handler"]
    if installed is not None:
        install, handler, previous = installed
        install(signal.SIGABRT, previous)
        _state["abort_handler"] = None
        # Kept alive: a thread may still be running it.
        _state.setdefault("released_abort_handlers", []).append(handler)


def finish() -> None:
    """Call when this process's work ended normally: the others stop watching it."""
    watchdog = _state["watchdog"]
    if watchdog is not None:
        watchdog.halt(finished=True)
        _state["watchdog"] = None


def _halt_watchdog_at_exit() -> None:
    # Runs before JAX's own shutdown (atexit is last in, first out). Without `finish()`
    # (an error), the others see this process stop beating and stop themselves.
    watchdog = _state["watchdog"]
    if watchdog is not None:
        watchdog.halt(finished=False)
        _state["watchdog"] = None


def start(settings: DistributedSettings) -> None:
    """Starts watching the other processes of the run that JAX's distributed runtime just
    joined (nothing to watch in a run of one process); call `finish()` when the work is done."""
    _state["settings"] = settings
    # jax._src: no public API gives the distributed runtime's key-value store client (jax 0.10).
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, "client", None)
    if client is None or jax.process_count() <= 1:
        return
    watchdog = _Watchdog(
        client, jax.process_index(), jax.process_count(), settings.heartbeat_timeout
    )
    _state["watchdog"] = watchdog
    atexit.register(_halt_watchdog_at_exit)
    # A watchdog that found a dead peer needs the interpreter lock to say so before JAX's
    # abort prints its lines (on a lost coordinator): let a waiting thread in sooner than 5 ms.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
    _catch_aborts()
    watchdog.start()


def jax_heartbeat_timeout(heartbeat_timeout: int) -> int:
    """JAX's heartbeat timeout for a run whose watchdog uses `heartbeat_timeout`.

    A JAX task beats every half timeout and the service reports one whose last beat is older
    than the timeout, so a report can come half a timeout after the task died (measured: 9 s
    after a SIGKILL with a 15 s timeout). Twice (ours + margin) keeps that report at least
    `JAX_HEARTBEAT_MARGIN` s behind the watchdog's.
    """
    return 2 * (heartbeat_timeout + JAX_HEARTBEAT_MARGIN)
