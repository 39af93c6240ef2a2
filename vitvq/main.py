"""Entry point of both training stages.

    python -m vitvq.main --config=configs/vitvq_base.py --workdir=DIR

Parses flags, starts JAX's distributed runtime when more than one process is configured
(`--coordinator/--num_processes/--process_id` or VITVQ_* variables, SLURM, Cloud TPU VMs: see
vitvq/cluster_env.py), logs the topology and hands (config, workdir) to the trainer that
`config.trainer` names. A user error (bad config, missing data, inconsistent multi-process
settings) prints one line and exits with status 2; a process whose peer died prints one line
and exits with status 3 (`peer_watchdog.PEER_FAILURE_EXIT_CODE`).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vitvq import cluster_env, distributed, lost_console, peer_watchdog, preemption, quiet
from vitvq.errors import ConfigError, VitvqError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go (default: runs/<config name>)."
)
# Multi-process runs (vitvq/cluster_env.py); TPU VMs and SLURM need none of these.
_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    f"HOST:PORT of process 0's coordinator, the same on every process of a multi-process "
    f"run (env {cluster_env.ENV_COORDINATOR}).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Processes in the run (env {cluster_env.ENV_NUM_PROCESSES})."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    f"This process's id, 0 .. num_processes - 1 (env {cluster_env.ENV_PROCESS_ID}).",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout",
    None,
    f"Seconds without a heartbeat after which a process counts as dead and the others stop "
    f"(default {cluster_env.DEFAULT_HEARTBEAT_TIMEOUT}; env {cluster_env.ENV_HEARTBEAT_TIMEOUT}).",
)


def _trainers():
    # deferred: TensorFlow, clu and JAX (the trainers); keeps --help and flag errors fast
    from vitvq.train import pipeline, stage1, stage2

    return {
        "vitvqgan": stage1.train_and_evaluate,
        "vim": stage2.train_and_evaluate,
        "pipeline": pipeline.train_and_evaluate,
    }


def default_workdir(config_arg: str) -> str:
    """runs/<config file name without .py>, e.g. runs/vitvq_small for any variant word such
    as `:runlocal`; a variant of settings (`configs/ablations.py:row=cnn,scale=small`) gets
    a directory of its own, runs/ablations/row-cnn_scale-small, so that rows do not resume
    each other's checkpoints."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if "=" in variant:
        settings = [part.strip().replace("=", "-") for part in variant.split(",") if part.strip()]
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in "_".join(settings))
        return os.path.join("runs", name, safe)
    return os.path.join("runs", name)


def _one_line(error: BaseException) -> str:
    """An error message on one line; one that embeds a traceback keeps its first and last line.

    ml_collections reports an exception raised in a config file's `get_config` (e.g. an
    unknown variant) and a config file it cannot load as several lines with a traceback.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1:
        return f"{lines[0]} {lines[-1]}"
    return lines[0] if lines else type(error).__name__


def _exit_with(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_key(error: LookupError | AttributeError, argv) -> str:
    """ml_collections raises KeyError/AttributeError("'key'") for an override of a missing key."""
    key = str(error.args[0] if error.args else error).strip("'\"")
    overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    named = [arg for arg in overrides if key in arg[len("--config.") :].split(".")]
    if not named:  # not an override's key (e.g. raised inside a config file)
        return f"bad config or override: {_one_line(error)}"
    return f"unknown config key {key!r} in {', '.join(named)}: the config file has no such field"


def _parse_flags(argv):
    """absl flag parsing whose errors are one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with(_one_line(e))
    except (KeyError, AttributeError) as e:
        _exit_with(_unknown_key(e, argv))
    except (VitvqError, TypeError, ValueError, OSError) as e:
        # ml_collections raises these for bad override values and unreadable config files.
        _exit_with(f"bad config or override: {_one_line(e)}")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    config = _CONFIG.value
    if config is None:
        _exit_with("--config is required, e.g. --config=configs/demo.py")
    try:
        config.get("trainer")
    except OSError as e:  # ml_collections defers "cannot load the config file" to first use
        reason = str(e).strip().splitlines()[-1].strip()  # e.g. "[Errno 2] No such file ..."
        _exit_with(f"cannot load --config={flags.FLAGS['config'].config_filename}: {reason}")
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    # The console shows progress lines (vitvq.console) and warnings; --verbosity=1 (absl's
    # flag) brings back the libraries' INFO log lines (clu's metric lines, orbax, ...).
    quiet.startup()
    try:
        if distributed.initialize_if_configured(
            coordinator=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
        ):
            preemption.hand_over_to_jax()  # JAX's runtime owns SIGTERM from here on
        distributed.log_topology()
        # deferred: JAX and the model modules; keeps --help and flag errors fast
        import jax

        from vitvq import config_check

        if config.trainer not in config_check.TRAINERS:
            raise ConfigError(
                f"unknown config.trainer {config.trainer!r}; expected one of "
                f"{sorted(config_check.TRAINERS)}"
            )
        # Every value, once, before the trainers (and TensorFlow) are even imported; the
        # trainers read these frozen settings and check nothing again.
        config = config_check.check(
            config,
            trainer=config.trainer,
            num_devices=jax.device_count(),
            process_count=jax.process_count(),
        )
        trainers = _trainers()

        # SIGTERM from here on: checkpoint after the step in flight and exit 0.
        with preemption.sigterm_checkpoints(jax.process_count()):
            trainers[config.trainer](config, workdir)
        peer_watchdog.finish()  # the other processes stop watching this one
    except VitvqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        peer_watchdog.exit_if_peer_failure(e)  # one line and exit status 3 when a peer is gone
        raise


if __name__ == "__main__":
    # A preemption notice (SIGTERM) at any moment, from the first: see vitvq.preemption.
    # A closed console (a pipe's reader gone) does not end the run: see vitvq.lost_console.
    with preemption.recorded_from_start(), lost_console.outlived():
        app.run(main, flags_parser=_parse_flags)
