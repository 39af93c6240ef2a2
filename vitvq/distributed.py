"""Starting JAX's distributed runtime for multi-process runs, and stopping when a peer dies.

Where a run's processes learn about each other (the first that applies wins):

1. Explicit settings: `python -m vitvq.main --coordinator=HOST:PORT --num_processes=N
   --process_id=I`, or the environment variables VITVQ_COORDINATOR, VITVQ_NUM_PROCESSES and
   VITVQ_PROCESS_ID (what `launch/local_pod.sh` sets). Flags win over the environment.
   HOST:PORT is where process 0 runs the coordinator; every process passes the same one.
2. SLURM: `SLURM_JOB_ID` is set and `SLURM_NTASKS` > 1 (one task per process, `srun`):
   `jax.distributed.initialize()` reads the coordinator, count and id from SLURM's variables.
3. Cloud TPU VMs (libtpu with TPU chips): `jax.distributed.initialize()` asks the TPU
   metadata server about the other hosts.
4. VITVQ_DISTRIBUTED=1: `jax.distributed.initialize()` with JAX's own detection (Open MPI,
   Kubernetes, ...). VITVQ_DISTRIBUTED=0 switches 2-4 off (one process per machine).

Otherwise the run is one process. Several processes on CPU use gloo collectives, and JAX's
persistent compilation cache is switched off for them (see `_no_compilation_cache_on_cpu`).

A process that dies (killed, crashed, its host gone) stops the others within a bounded time,
each printing one line `error: multi-process run stopped: WHAT, so process I of N stops too
(CAUSE) ...` and exiting with status `PEER_FAILURE_EXIT_CODE`, without the clean-up that
would wait for the dead process (the last committed checkpoint stays; rerunning all
processes resumes from it):
- a watchdog thread in every process beats in JAX's key-value store (on process 0) and reads
  the others' beats; a process silent for `heartbeat_timeout` seconds (flag
  `--heartbeat_timeout`, env VITVQ_HEARTBEAT_TIMEOUT, default `DEFAULT_HEARTBEAT_TIMEOUT`)
  is named as stopped ("process 1 stopped");
- when process 0 (the coordinator) dies, the others notice at once ("lost contact with the
  coordinator (process 0 at HOST:PORT)");
- a collective that fails because a peer is gone (gloo/NCCL errors) ends the training loop
  through `exit_if_peer_failure`, which waits for the watchdog to name the process.

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
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time

from vitvq import console
from vitvq.errors import VitvqError, caused_by

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT = 30  # seconds
INITIALIZATION_TIMEOUT = 300  # seconds for every process to reach the coordinator
# Seconds a finished process waits for the others at JAX's shutdown barrier (JAX: 300).
SHUTDOWN_TIMEOUT = 60
# A survivor of a dead peer exits with this status (2 is a user error, 1 a crash).
PEER_FAILURE_EXIT_CODE = 3
# Seconds by which JAX's own report of a silent process comes after the watchdog's.
JAX_HEARTBEAT_MARGIN = 30

ENV_COORDINATOR = "VITVQ_COORDINATOR"
ENV_NUM_PROCESSES = "VITVQ_NUM_PROCESSES"
ENV_PROCESS_ID = "VITVQ_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "VITVQ_HEARTBEAT_TIMEOUT"
ENV_DISTRIBUTED = "VITVQ_DISTRIBUTED"


class DistributedError(VitvqError):
    """Inconsistent multi-process settings, or the processes could not find each other."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a run.

    mode: "single" (no distributed runtime), "explicit" (coordinator, count and id given),
    "slurm", "tpu" or "auto" (`jax.distributed.initialize()` detects the rest).
    """

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT

    def source(self) -> str:
        """Where the run's layout came from, for the start-up log line."""
        if self.mode == "explicit":
            return f"coordinator {self.coordinator}"
        return {"single": "one process", "slurm": "SLURM", "tpu": "Cloud TPU VM"}.get(
            self.mode, "detected by JAX"
        )

    def describe(self) -> str:
        if self.mode == "explicit":
            return (
                f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator}"
            )
        return {"single": "one process", "slurm": "SLURM", "tpu": "Cloud TPU VM"}.get(
            self.mode, "detected by JAX"
        )


def _int_setting(value, flag: str, env: str, environ) -> tuple[int | None, str]:
    """(value as int or None, where it came from) of a flag, else its environment variable."""
    source = f"--{flag}"
    if value is None and environ.get(env, "").strip():
        value, source = environ[env].strip(), env
    if value is None:
        return None, source
    try:
        return int(value), source
    except (TypeError, ValueError):
        raise DistributedError(f"{source}={value!r} is not an integer") from None


def _check_coordinator(coordinator: str, source: str) -> str:
    host, sep, port = coordinator.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"{source}={coordinator!r} is not HOST:PORT (the address of process 0 and a free "
            "port, the same on every process), e.g. 10.0.0.1:1234"
        )
    return coordinator.strip()


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM with TPU chips (what JAX itself found when it was imported)."""
    try:
        # jax._src: no public API says whether JAX found a Cloud TPU VM (jax 0.10).
        # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _slurm_tasks(environ) -> int:
    if not environ.get("SLURM_JOB_ID"):
        return 0
    try:
        return int(environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 0


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int | None = None,
    environ=None,
    on_tpu_vm: bool | None = None,
) -> Settings:
    """The settings from flags (arguments) and the environment; DistributedError when they
    are inconsistent (e.g. a process id out of range, a count without a coordinator)."""
    environ = os.environ if environ is None else environ
    timeout, timeout_source = _int_setting(
        heartbeat_timeout, "heartbeat_timeout", ENV_HEARTBEAT_TIMEOUT, environ
    )
    if timeout is None:
        timeout = DEFAULT_HEARTBEAT_TIMEOUT
    if timeout < 1:
        raise DistributedError(f"{timeout_source}={timeout} must be at least 1 (seconds)")

    coord_source = "--coordinator"
    if not coordinator and environ.get(ENV_COORDINATOR, "").strip():
        coordinator, coord_source = environ[ENV_COORDINATOR], ENV_COORDINATOR
    count, count_source = _int_setting(num_processes, "num_processes", ENV_NUM_PROCESSES, environ)
    pid, pid_source = _int_setting(process_id, "process_id", ENV_PROCESS_ID, environ)

    if count is not None and count < 1:
        raise DistributedError(f"{count_source}={count} must be at least 1")
    if pid is not None and count is None:
        raise DistributedError(
            f"{pid_source}={pid} needs the number of processes too (--num_processes or "
            f"{ENV_NUM_PROCESSES})"
        )
    if pid is not None and not 0 <= pid < count:
        raise DistributedError(
            f"{pid_source}={pid} is not in [0, {count}): process ids run from 0 to "
            f"{count_source} - 1 = {count - 1}"
        )
    if coordinator:
        coordinator = _check_coordinator(coordinator, coord_source)
        missing = [
            name
            for name, value, env in (
                ("--num_processes", count, ENV_NUM_PROCESSES),
                ("--process_id", pid, ENV_PROCESS_ID),
            )
            if value is None
        ]
        if missing:
            raise DistributedError(
                f"{coord_source}={coordinator} needs {' and '.join(missing)} as well (or "
                f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}): every process passes the same "
                "coordinator and count and its own id"
            )
        if count == 1:
            return Settings("single", heartbeat_timeout=timeout)
        return Settings("explicit", coordinator, count, pid, timeout)
    if count is not None and count > 1:
        raise DistributedError(
            f"{count_source}={count} needs the coordinator's address too: --coordinator="
            f"HOST:PORT or {ENV_COORDINATOR} (process 0's address and a free port)"
        )
    if count == 1:
        return Settings("single", heartbeat_timeout=timeout)

    switch = environ.get(ENV_DISTRIBUTED, "").strip()
    if switch not in ("", "0", "1"):
        raise DistributedError(f"{ENV_DISTRIBUTED}={switch!r} must be 0 or 1")
    if switch == "0":
        return Settings("single", heartbeat_timeout=timeout)
    if _slurm_tasks(environ) > 1:
        return Settings("slurm", heartbeat_timeout=timeout)
    if on_tpu_vm is None:
        on_tpu_vm = _on_cloud_tpu_vm()
    if on_tpu_vm:
        return Settings("tpu", heartbeat_timeout=timeout)
    if switch == "1":
        return Settings("auto", heartbeat_timeout=timeout)
    return Settings("single", heartbeat_timeout=timeout)


# --- failure of a peer ----------------------------------------------------------------------

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


def _coordinator_address(settings: Settings | None) -> str | None:
    if settings is not None and settings.coordinator:
        return settings.coordinator
    # jax._src: no public API gives the coordinator address JAX was started with (jax 0.10).
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "coordinator_address", None)


def _coordinator_gone(settings: Settings | None) -> bool:
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


def _start_watchdog(settings: Settings) -> None:
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


def _initialize_jax(settings: Settings) -> None:
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    # Collectives between processes on CPU (local pods, CPU tests); other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=INITIALIZATION_TIMEOUT,
        # JAX's own detection is the backstop (its reaction is abort()): well after ours.
        heartbeat_timeout_seconds=jax_heartbeat_timeout(settings.heartbeat_timeout),
        shutdown_timeout_seconds=max(SHUTDOWN_TIMEOUT, settings.heartbeat_timeout),
    )
    if settings.mode == "explicit":
        kwargs.update(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise DistributedError(
            f"could not start the multi-process run ({settings.describe()}): {reason}"
        ) from e
    _no_compilation_cache_on_cpu()


def _no_compilation_cache_on_cpu() -> None:
    """Switches JAX's persistent compilation cache off for multi-process CPU runs.

    JAX writes cache entries from process 0 only and the processes' cache keys differ, so in
    a rerun process 0 loads its programs while the others compile theirs; gloo gives
    processes 30 s to meet at the first collective of a device group, and a compile longer
    than that fails the run ("Gloo context initialization failed: DEADLINE_EXCEEDED").
    """
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        if jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache:
            logger.warning(
                "Persistent compilation cache (%s) off for this multi-process CPU run: "
                "its entries are per process and written by process 0 only, which would put "
                "the processes out of step at their first collective.",
                jax.config.jax_compilation_cache_dir,
            )
            jax.config.update("jax_enable_compilation_cache", False)


def initialize_if_configured(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int | None = None,
) -> bool:
    """Starts JAX's distributed runtime when a multi-process run is configured (see the
    module docstring) and the watchdog of the other processes; returns whether it did.
    Call before anything touches a JAX device; call `finish()` when the work is done."""
    settings = resolve(coordinator, num_processes, process_id, heartbeat_timeout)
    _state["settings"] = settings
    if settings.mode == "single":
        return False
    _initialize_jax(settings)
    _start_watchdog(settings)
    return True


def log_topology() -> None:
    """One line per process: its id, the device counts, the platform."""
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    settings = _state["settings"]
    devices = jax.local_devices()
    line = (
        f"process {jax.process_index()} of {jax.process_count()} "
        f"({settings.source() if settings else 'one process'}); {len(devices)} local / "
        f"{jax.device_count()} global devices ({devices[0].platform}); local device ids "
        f"{[d.id for d in devices]}"
    )
    if jax.process_count() > 1:  # on the console: which process is which, on every host
        console.say(line)
    else:  # one process: the stage's first line says where it runs
        logger.info("%s", line)
