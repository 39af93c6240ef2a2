"""Starting JAX's distributed runtime for multi-process runs.

`initialize_if_configured()` resolves how this process joins a run (flags, VITVQ_*
variables, SLURM, Cloud TPU VMs: see vitvq.cluster_env), and when the run has more than one
process starts JAX's runtime with the project's timeouts and the peer watchdog
(vitvq.peer_watchdog: a dead process stops the others with one line and status 3).
`log_topology()` says which process this is and which devices it sees.

Several processes on CPU use gloo collectives, and JAX's persistent compilation cache is
switched off for them (see `_no_compilation_cache_on_cpu`).
"""

import logging

from vitvq import cluster_env, console, peer_watchdog
from vitvq.cluster_env import DistributedError, DistributedSettings

logger = logging.getLogger(__name__)

INITIALIZATION_TIMEOUT = 300  # seconds for every process to reach the coordinator
# Seconds a finished process waits for the others at JAX's shutdown barrier (JAX: 300).
SHUTDOWN_TIMEOUT = 60

_state = {"settings": None}


def _initialize_jax(settings: DistributedSettings) -> None:
    # deferred: JAX; keeps `vitvq.main --help` fast (main imports this module)
    import jax

    # Collectives between processes on CPU (local pods, CPU tests); other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=INITIALIZATION_TIMEOUT,
        # JAX's own detection is the backstop (its reaction is abort()): well after ours.
        heartbeat_timeout_seconds=peer_watchdog.jax_heartbeat_timeout(settings.heartbeat_timeout),
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
    Call before anything touches a JAX device; call `peer_watchdog.finish()` when the work
    is done."""
    settings = cluster_env.resolve(coordinator, num_processes, process_id, heartbeat_timeout)
    _state["settings"] = settings
    if settings.mode == "single":
        return False
    _initialize_jax(settings)
    peer_watchdog.start(settings)
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
