r"""Will a training config fit on a TPU pod? Compile its train step for the pod, from here.

    python -m vitvq.aot --config=configs/vim_large.py --topology=v4:4x4x4 \
        [--config.mesh.fsdp=8] [--tokenizer_config=configs/vitvq_small.py] [--margin=0.9]

Needs libtpu (`pip install -e '.[tpu]'`), not a TPU. `jax.experimental.topologies` gives the
topology's compile-only devices, the mesh is built on them from `config.mesh`, and the config's
own train step (stage 1 with discriminator and LPIPS, by default in its heaviest phase, a
lazy-R1 step; or stage 2 with its frozen tokenizer) is lowered from abstract inputs for the
config's global batch and compiled by the TPU compiler; no array is allocated. Prints, per
chip, the compiled program's argument, output, temporary and code bytes against the chip's
HBM, whether that fits within `--margin` of it, the FLOPs per step and the sharding of the
largest state tensors. A step the compiler finds too big for the chip is reported with the
bytes the compiler says it needs.

v4 chips are compiled as one device per chip ("megacore", two TensorCores), as JAX runs them
on TPU VMs (libtpu does so for v5p by default): v4:4x4x4 is the paper's "128 TPUv4" slice,
v4-128, 64 chips. Stage 2 needs its tokenizer's stage-1 config: that of
`config.tokenizer_bundle` when it names an existing bundle, else `--tokenizer_config`
(default configs/vitvq_small.py, the paper's SS).

Exit status: 0 fits; 1 does not fit (the largest consumers are named); 2 bad arguments
(unknown topology, libtpu missing, bad config).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from vitvq import cli, console, paths, quiet
from vitvq.aot_report import Report, format_report, out_of_memory
from vitvq.errors import ConfigError, VitvqError
from vitvq.train import schedule

EXIT_DOES_NOT_FIT = 1
GIB = 2**30
# HBM of one device (= one chip) by `device_kind`: compile-only devices do not report it. The
# compiler's own out-of-memory messages say it may use 30.75 GiB on v4, 15.75 on v5e and
# 95.74 on v5p (sold as "95 GB").
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 96 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
}
# A step fits when it needs at most this share of the HBM: the compiler itself accepts up to
# ~98% (15.75 of 16 GiB on v5e, 30.75 of 32 on v4), which leaves a real run no headroom for
# fragmentation and the runtime's own buffers.
DEFAULT_MARGIN = 0.9
MEGACORE = ("v4",)  # generations compiled with chip_config_name="megacore"
_TOPOLOGY = re.compile(r"^(v[0-9][a-z]*):[0-9]+(x[0-9]+)+$")
_REPO = pathlib.Path(__file__).resolve().parents[1]
_HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
    """This tool's flags, in a private FlagValues (`main` can run several times a process)."""
    config_flags.DEFINE_config_file("config", None, "Training config FILE[:arg].", flag_values=fv)
    config_flags.DEFINE_config_file(
        "tokenizer_config",
        str(_REPO / "configs" / "vitvq_small.py"),
        "Stage 2: the stage-1 config of the frozen tokenizer, when config.tokenizer_bundle "
        "names no existing bundle (default configs/vitvq_small.py, the paper's SS).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "topology",
        None,
        "TPU topology, e.g. v4:4x4x4, v5e:2x2, v5p:4x4x8, v6e:8x16.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "margin", DEFAULT_MARGIN, "Share of the HBM a step may need.", 0.0, 1.0, flag_values=fv
    )
    flags.DEFINE_float("hbm_gib", None, "A chip's HBM (default: by chip kind).", flag_values=fv)
    flags.DEFINE_integer(
        "step", None, "Stage 1: the phase of this step (default: the heaviest).", flag_values=fv
    )
    flags.DEFINE_boolean("json", False, "Also print one JSON object, last.", flag_values=fv)
    return fv


# --- the topology --------------------------------------------------------------------------


@contextlib.contextmanager
def _libtpu_for_compiling() -> Iterator[None]:
    """Environment for libtpu to start as a compiler only (it reads it once, when the plugin
    starts): without its warnings that this is no TPU host, and without taking the
    machine-wide /tmp/libtpu_lockfile, which would fail any other process using libtpu at
    the same time (a second check, a test's subprocess). Variables already set are kept."""
    env = {
        "TPU_ACCELERATOR_TYPE": "v5litepod-1",  # any one-host type: compiling ignores it
        "TPU_WORKER_HOSTNAMES": "localhost",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }
    added = [name for name in env if name not in os.environ]
    os.environ.update({name: env[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def topology_devices(topology: str) -> list[Any]:
    """The compile-only devices of a TPU topology such as "v4:4x4x4"; ConfigError when the
    topology is unknown or libtpu is missing."""
    match = _TOPOLOGY.match(topology or "")
    if not match:
        raise ConfigError(
            f"--topology={topology!r} is not GENERATION:AxB[xC], e.g. v4:4x4x4, v5e:2x2, "
            "v5p:4x4x8 or v6e:8x16"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            "libtpu is not installed; compiling for a TPU topology needs it (a TPU does not): "
            "pip install -e '.[tpu]'"
        )
    # deferred: JAX after main() sets JAX_PLATFORMS; keeps --help and flag errors fast
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if match[1] in MEGACORE else {}
    try:
        with _libtpu_for_compiling():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    except Exception as err:  # libtpu's JaxRuntimeError (INVALID_ARGUMENT, NOT_FOUND)
        raise ConfigError(
            f"unknown TPU topology --topology={topology} ({cli.one_line(err)}); known "
            "generations: v4, v5e, v5p, v6e, e.g. v4:4x4x4, v5e:2x2, v5p:4x4x8, v6e:8x16"
        ) from None
    return list(desc.devices)


def hbm_bytes(device_kind: str, hbm_gib: float | None = None) -> int:
    if hbm_gib is not None:
        return int(hbm_gib * GIB)
    if device_kind not in HBM_BYTES:
        raise ConfigError(f"the HBM of a {device_kind!r} chip is not known: give --hbm_gib")
    return HBM_BYTES[device_kind]


# --- the check -----------------------------------------------------------------------------


def heaviest_step(config) -> int:
    """Stage 1's first step with every term on: logit-Laplace, LPIPS, the GAN and, when on,
    lazy R1."""
    loss = config.loss
    starts = schedule.loss_starts(loss, config.total_steps)
    step = max(1, *starts, schedule.logit_laplace_start(loss, config.total_steps))
    if loss.adversarial > 0 and loss.r1_gamma > 0:
        step = math.ceil(step / max(1, loss.r1_every)) * max(1, loss.r1_every)
    return step


def tokenizer_config_of(config, fallback) -> tuple[Any, str]:
    """(stage-1 config of a stage-2 config's tokenizer, where it came from): that of
    `config.tokenizer_bundle` when it exists, else `fallback`."""
    # deferred: JAX (bundle loads the models); keeps --help and flag errors fast
    from vitvq import bundle

    path = config.get("tokenizer_bundle")
    if not (path and paths.exists(paths.join(path, bundle.BUNDLE_JSON))):
        return fallback, "--tokenizer_config"
    section = bundle.read_manifest(path)["tokenizer"]
    model = {"model": section["model"], "image_size": int(section["image_size"])}
    return ml_collections.ConfigDict(model), f"the bundle {path}"


def check(
    config,
    topology: str,
    *,
    tokenizer_config=None,
    margin: float = DEFAULT_MARGIN,
    hbm_gib: float | None = None,
    step: int | None = None,
    name: str = "config",
) -> Report:
    """Compiles `config`'s train step for `topology` and reports its bytes per chip."""
    devices = topology_devices(topology)
    # deferred: JAX after main() sets JAX_PLATFORMS; keeps --help and flag errors fast
    from vitvq import config_check, memory, parallel

    hbm = hbm_bytes(devices[0].device_kind, hbm_gib)
    hosts = len({d.process_index for d in devices})
    # Every key once, the mesh and the batch sizes against the pod's chips and hosts too.
    config = config_check.check(
        config, trainer=config.trainer, num_devices=len(devices), process_count=hosts
    )
    if config.trainer not in ("vitvqgan", "vim"):
        raise ConfigError(f"config.trainer={config.trainer!r}: only training stages 1 and 2")
    mesh = parallel.make_mesh(config.mesh, devices)
    if config.trainer == "vim":
        tok_config, source = tokenizer_config_of(config, tokenizer_config)
        trainer = memory.build_trainer(config, mesh, tokenizer_config=tok_config)
        phase = f"stage 2, tokenizer from {source}"
    else:
        step = heaviest_step(config) if step is None else step
        trainer = memory.build_trainer(config, mesh)
        phase = f"stage 1, step {step}: {_stage1_terms(trainer, step)}"
    start, compiled, oom = time.perf_counter(), None, None
    try:
        with console.Elapsed(f"compiling the train step for {topology} ({len(devices)} chips)"):
            compiled = memory.step_memory(
                trainer, step=step or 1, fast=False, batch_size=config.batch_size
            )
    except Exception as err:  # the compiler's JaxRuntimeError
        oom = out_of_memory(err, time.perf_counter() - start)
        if oom is None:
            raise
    abstract, shardings = trainer.abstract_state()
    return Report(
        config=name,
        topology=topology,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        num_hosts=hosts,
        hbm_bytes=hbm,
        margin=margin,
        mesh=dict(mesh.shape),
        batch_size=config.batch_size,
        phase=phase,
        step=compiled,
        oom=oom,
        consumers=_consumers(trainer, abstract, shardings, compiled, oom),
        tensors=memory.largest_tensors(abstract, shardings),
    )


def _stage1_terms(trainer, step: int) -> str:
    # deferred: JAX after main() sets JAX_PLATFORMS; keeps --help and flag errors fast
    from vitvq.train.stage1_step import phase_settings

    s = phase_settings(trainer.settings, step)
    terms = {"LPIPS": s.perceptual_on, "GAN": s.gan_on, "lazy R1": s.r1_now}
    return ", ".join(f"{term} {'on' if on else 'off'}" for term, on in terms.items())


def _consumers(trainer, abstract, shardings, step, oom) -> tuple[tuple[str, int], ...]:
    """Bytes per chip by holder: each state field, the batch, the frozen inputs (LPIPS or
    the tokenizer), then the compiled step's temporaries, outputs not written in place of
    the donated state and code, or the rest of what the compiler said it needed."""
    # deferred: JAX after main() sets JAX_PLATFORMS; keeps --help and flag errors fast
    import jax

    from vitvq import memory, parallel

    parts = memory.state_parts(abstract, shardings)
    out = {f"state.{field}": per_chip for field, (_, per_chip) in parts.items()}
    image_size = getattr(trainer, "image_size", None) or trainer.config.image_size
    batch = memory.abstract_batch(trainer, trainer.config.batch_size, image_size)
    sharding = parallel.batch_sharding(trainer.mesh)
    out["batch"] = sum(memory.shard_nbytes(x, sharding) for x in batch.values())
    for what, attr in (("LPIPS (frozen)", "train_perceptual"), ("tokenizer", "tok_vars")):
        leaves = jax.tree_util.tree_leaves(getattr(trainer, attr, None))
        out[what] = sum(memory.nbytes(x) for x in leaves)
    if step is not None:
        out["temporaries (activations, gradients, ...)"] = step.temp_bytes
        out["outputs not in place of the state"] = step.output_bytes - step.alias_bytes
        out["program"] = step.generated_code_bytes
    else:
        out["temporaries (the compiler's total less the above)"] = oom.required_bytes - sum(
            out.values()
        )
    return tuple(sorted(((k, int(v)) for k, v in out.items() if v > 0), key=lambda kv: -kv[1]))


# --- the command line ----------------------------------------------------------------------


def _parse(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    """Flag errors print one `error:` line and exit with status 2."""
    if any(arg in _HELP_ARGS for arg in argv[1:]):
        print(__doc__.strip() + "\n\n" + fv.get_help())
        sys.exit(0)
    try:
        rest = fv(list(argv))
    except flags.Error as err:
        cli.exit_with(err)
    except (KeyError, AttributeError) as err:  # ml_collections: an override of a missing key
        key = str(err.args[0] if err.args else err).strip("'\"")
        cli.exit_with(f"unknown config key {key!r}: the config file has no such field")
    except (VitvqError, TypeError, ValueError, OSError) as err:
        cli.exit_with(f"bad config or override: {cli.one_line(err)}")
    if len(rest) > 1:
        cli.exit_with(f"unexpected arguments {rest[1:]} (flags are written --name=value)")
    if fv["config"].value is None or fv["topology"].value is None:
        cli.exit_with(
            "--config and --topology are required, e.g. --config=configs/vim_large.py "
            "--topology=v4:4x4x4"
        )


def _load(fv: flags.FlagValues, name: str):
    """A config-file flag's config (ml_collections defers the file's errors to first use)."""
    try:
        config = fv[name].value
        config.get("trainer")
        return config
    except (OSError, VitvqError, TypeError, ValueError, KeyError, AttributeError) as err:
        cli.exit_with(f"cannot load --{name}={fv[name].config_filename}: {cli.one_line(err)}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 fits, 1 does not fit, 2 (after one `error:` line) bad arguments."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # the host's backend: the TPU is only compiled for
    fv = define_flags(flags.FlagValues())
    _parse(fv, list(sys.argv if argv is None else argv))
    config = _load(fv, "config")
    tokenizer_config = _load(fv, "tokenizer_config") if config.trainer == "vim" else None
    quiet.startup()
    with cli.user_errors():
        report = check(
            config,
            fv["topology"].value,
            tokenizer_config=tokenizer_config,
            margin=fv["margin"].value,
            hbm_gib=fv["hbm_gib"].value,
            step=fv["step"].value,
            name=fv["config"].config_filename,
        )
    print(format_report(report))
    if fv["json"].value:
        print(json.dumps(report.to_json()))
    return 0 if report.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
