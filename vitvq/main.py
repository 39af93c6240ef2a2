"""Entry point of both training stages.

    python -m vitvq.main --config=configs/vitvq_base.py --workdir=DIR

Parses flags, starts JAX's distributed runtime when more than one process is configured,
logs the topology and hands (config, workdir) to the trainer that `config.trainer` names.
A user error (bad config, missing data) prints one line and exits with status 2.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vitvq import distributed
from vitvq.errors import ConfigError, VitvqError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and images go (default: runs/<config name>)."
)


def _trainers():
    # Imported here so that `--help` and flag errors stay fast.
    from vitvq.train import stage1

    return {"vitvqgan": stage1.train_and_evaluate}


def default_workdir(config_arg: str) -> str:
    """runs/<config file name without .py and variant>."""
    name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
    return os.path.join("runs", name)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drops the INFO chatter of orbax (several lines per save) from the console."""
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv):
    """absl flag parsing whose errors are one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (VitvqError, KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown override keys and bad values.
        print(f"error: bad config or override: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config=configs/demo.py", file=sys.stderr)
        sys.exit(2)
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    try:
        distributed.initialize_if_configured()
        distributed.log_topology()
        trainers = _trainers()
        if config.trainer not in trainers:
            raise ConfigError(
                f"unknown config.trainer {config.trainer!r}; expected one of {sorted(trainers)}"
            )
        trainers[config.trainer](config, workdir)
    except VitvqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
