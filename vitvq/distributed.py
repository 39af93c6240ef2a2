"""Starting JAX's distributed runtime for multi-process runs.

On TPU VMs and SLURM/GPU clusters `jax.distributed.initialize()` finds its settings itself.
Elsewhere (e.g. several local CPU processes) set VITVQ_COORDINATOR=host:port,
VITVQ_NUM_PROCESSES=N and VITVQ_PROCESS_ID=i (what `launch/local_pod.sh` does).
"""

import logging
import os

import jax

logger = logging.getLogger(__name__)


def initialize_if_configured() -> bool:
    """Calls `jax.distributed.initialize` when a multi-process run is configured."""
    coordinator = os.environ.get("VITVQ_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["VITVQ_NUM_PROCESSES"]),
            process_id=int(os.environ["VITVQ_PROCESS_ID"]),
        )
        return True
    if os.environ.get("VITVQ_DISTRIBUTED", "") == "1" or "TPU_WORKER_HOSTNAMES" in os.environ:
        jax.distributed.initialize()  # TPU VM pods and SLURM clusters: settings auto-detected
        return True
    return False


def log_topology() -> None:
    logger.info(
        "process %d of %d; %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
