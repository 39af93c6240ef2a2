"""A quiet start-up: notices of JAX, TensorFlow, libtpu and orbax known to be harmless stay off
the console; warnings and errors still reach it.

- **libtpu without a TPU.** With libtpu installed (the `tpu` and `test` extras), JAX probes for
  a TPU when it starts: libtpu prints hostname and accelerator-type errors and JAX logs that
  no TPU was found, before the command's first line. When no TPU chip is on this machine's
  PCI bus, no GPU is present and neither the user nor the environment chose a platform, JAX
  is told to use the CPU (`jax_platforms="cpu"`) and the probe never runs. A TPU VM has its
  chips on the bus, so nothing changes there; `JAX_PLATFORMS` and `JAX_FORCE_TPU_INIT`,
  when set, are always obeyed.
- **TensorFlow's INFO notices**: `TF_CPP_MIN_LOG_LEVEL=1` unless set, which keeps
  TensorFlow's warnings and errors; the notices its import prints regardless (oneDNN, absl's
  "before InitializeLog") are dropped by `vitvq.tf_notices`.
- **orbax's INFO lines and its read-only warnings** (several per checkpoint read or save):
  `OrbaxFilter` on the console's log handlers.

`startup()` applies all three and sets the console's level: the libraries' warnings and
errors, and their INFO lines (clu's metric lines, the topology, ...) only with absl's
`--verbosity=1`; every command calls it first. What a command has to say goes through
`vitvq.console`, at any verbosity.
"""

import importlib.util
import logging
import os
from collections.abc import Mapping

from absl import flags

from vitvq import tf_notices

# Variables by which a user (or a TPU VM image) chooses JAX's platform: obeyed, never replaced.
# (TPU_LIBRARY_PATH is no such choice: importing libtpu sets it on any machine.)
PLATFORM_CHOICES = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_FORCE_TPU_INIT")
# orbax warnings that only say a checkpoint is read, not written (export, evaluate, init_from).
ORBAX_HARMLESS = ("read_only", "read-only", "readonly", "read only")


def platforms_to_use(
    environ: Mapping[str, str], *, tpu_chips: int, gpu_present: bool, libtpu_installed: bool
) -> str | None:
    """The `jax_platforms` value that skips a pointless TPU probe, or None to leave JAX's own
    choice: "cpu" only when libtpu is installed but no TPU chip and no GPU is present and no
    platform was chosen."""
    if any(environ.get(name) for name in PLATFORM_CHOICES):
        return None
    if not libtpu_installed or tpu_chips > 0 or gpu_present:
        return None
    return "cpu"


def _tpu_chips() -> int:
    # deferred: JAX (the commands import this module first); keeps --help and flag errors fast
    # jax._src: no public API counts the TPU chips without starting the TPU backend, which
    # is the probe this module avoids; this reads the PCI bus, as JAX's own TPU set-up does.
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def _gpu_present() -> bool:
    # deferred: JAX, as above
    # jax._src: as above, the NVIDIA check JAX itself makes before starting CUDA. An AMD GPU
    # shows as /dev/kfd.
    from jax._src import hardware_utils

    return hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")


def quiet_platform_probe() -> str | None:
    """Sets `jax_platforms` when `platforms_to_use` says so; returns what it set (or None).
    Call it before JAX starts a backend (before the first `jax.devices()`)."""
    chosen = platforms_to_use(
        os.environ,
        tpu_chips=_tpu_chips(),
        gpu_present=_gpu_present(),
        libtpu_installed=importlib.util.find_spec("libtpu") is not None,
    )
    if chosen is not None:
        # deferred: JAX, as above
        import jax

        jax.config.update("jax_platforms", chosen)
    return chosen


class OrbaxFilter(logging.Filter):
    """Keeps orbax's INFO lines and read-only warnings off a handler; its other warnings and
    its errors pass, as does every other library's record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage().lower()
        return not any(word in message for word in ORBAX_HARMLESS)


def verbosity_given() -> bool:
    """Whether absl's `--verbosity` was given, at 1 or more."""

    try:
        return bool(flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1)
    except (KeyError, flags.Error):
        return False


def startup(verbose: bool | None = None) -> None:
    """The three quietings above and the console's log level (INFO when `verbose`, default:
    `--verbosity` >= 1; else WARNING), for a command that is about to start JAX."""
    verbose = verbosity_given() if verbose is None else verbose
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if not verbose:
        tf_notices.quiet_tensorflow_import()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OrbaxFilter) for f in handler.filters):
            handler.addFilter(OrbaxFilter())
    quiet_platform_probe()
