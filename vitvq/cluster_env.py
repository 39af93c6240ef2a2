"""Where a run's processes learn about each other: flags and environment -> settings.

`resolve()` reads the flags a command got and the environment, and says how this process
joins a run (a `DistributedSettings`); the first that applies wins:

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

Otherwise the run is one process. Inconsistent settings (a process id out of range, a count
without a coordinator, ...) are a `DistributedError`, one line for the user. Starting the
runtime is vitvq.distributed's job; nothing here touches JAX's devices.
"""

import dataclasses
import os

from vitvq.errors import VitvqError

DEFAULT_HEARTBEAT_TIMEOUT = 30  # seconds

ENV_COORDINATOR = "VITVQ_COORDINATOR"
ENV_NUM_PROCESSES = "VITVQ_NUM_PROCESSES"
ENV_PROCESS_ID = "VITVQ_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "VITVQ_HEARTBEAT_TIMEOUT"
ENV_DISTRIBUTED = "VITVQ_DISTRIBUTED"


class DistributedError(VitvqError):
    """Inconsistent multi-process settings, or the processes could not find each other."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
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
) -> DistributedSettings:
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
            return DistributedSettings("single", heartbeat_timeout=timeout)
        return DistributedSettings("explicit", coordinator, count, pid, timeout)
    if count is not None and count > 1:
        raise DistributedError(
            f"{count_source}={count} needs the coordinator's address too: --coordinator="
            f"HOST:PORT or {ENV_COORDINATOR} (process 0's address and a free port)"
        )
    if count == 1:
        return DistributedSettings("single", heartbeat_timeout=timeout)

    switch = environ.get(ENV_DISTRIBUTED, "").strip()
    if switch not in ("", "0", "1"):
        raise DistributedError(f"{ENV_DISTRIBUTED}={switch!r} must be 0 or 1")
    if switch == "0":
        return DistributedSettings("single", heartbeat_timeout=timeout)
    if _slurm_tasks(environ) > 1:
        return DistributedSettings("slurm", heartbeat_timeout=timeout)
    if on_tpu_vm is None:
        on_tpu_vm = _on_cloud_tpu_vm()
    if on_tpu_vm:
        return DistributedSettings("tpu", heartbeat_timeout=timeout)
    if switch == "1":
        return DistributedSettings("auto", heartbeat_timeout=timeout)
    return DistributedSettings("single", heartbeat_timeout=timeout)
