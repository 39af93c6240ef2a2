"""python -m vitvq.export --workdir=DIR [--vim_workdir=DIR2] --output=BUNDLE
                         [--dtype=float32|bfloat16] [--step=N] [--overwrite]

Writes a bundle (vitvq/bundle.py) from a stage-1 run's checkpoint: the generator's parameters
(its EMA parameters when the run kept them) and code-usage statistics, the model config, image
size, codebook size, class names where the dataset has them, and the training step. Arrays are
read whole from any sharding of the saved run; in a multi-process run every process reads and
process 0 writes while the others wait. The run's workdir is opened read-only, so a run that
is still training there is not disturbed.

A user error (missing workdir, no checkpoint, bad flag) prints one line and exits with 2.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

from vitvq import cli
from vitvq.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "The stage-1 (ViT-VQGAN) run's workdir.")
_VIM_WORKDIR = flags.DEFINE_string("vim_workdir", None, "A stage-2 (VIM) run's workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "The bundle directory to write.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Tensor dtype.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: newest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --output.")

logger = logging.getLogger(__name__)


def classes_of(config) -> dict:
    """{"num_classes", "names"} of the run's dataset, when it can still be read here."""
    try:
        from vitvq import data as data_lib

        info = data_lib.dataset_info(config.dataset)
        return {"num_classes": int(info["num_classes"]), "names": info.get("class_names")}
    except Exception as err:  # the dataset may live on another machine: not fatal
        count = int(config.dataset.get("num_classes", 0) or 0)
        logger.warning("class names unknown (dataset not readable here: %s)", err)
        return {"num_classes": count, "names": None}


def export(
    workdir: str,
    output: str,
    *,
    dtype: str = "float32",
    step: int | None = None,
    vim_workdir: str | None = None,
    overwrite: bool = False,
):
    """Writes the bundle of `workdir`'s checkpoint `step` (default: newest); returns its path."""
    import jax

    from vitvq import bundle
    from vitvq.train import restore

    config = restore.load_workdir_config(workdir)
    if config.get("trainer") != "vitvqgan":
        raise ConfigError(
            f"--workdir={workdir} is a {config.get('trainer')!r} run; it must be a stage-1 "
            "(ViT-VQGAN, trainer 'vitvqgan') run"
        )
    if vim_workdir:
        vim_config = restore.load_workdir_config(vim_workdir)
        raise ConfigError(
            f"--vim_workdir={vim_workdir} is a {vim_config.get('trainer')!r} run; this vitvq "
            "has no stage-2 (VIM) trainer to export yet"
        )
    generator = restore.read_generator(workdir, step)
    tokenizer = {
        "model": config.model.to_dict(),
        "image_size": int(config.image_size),
        "step": generator["step"],
        "source": os.path.abspath(workdir),
        "training_config": config.to_dict(),
    }
    path = None
    if jax.process_index() == 0:
        path = bundle.write_bundle(
            output,
            tokenizer=tokenizer,
            tokenizer_params=generator["params"],
            tokenizer_stats=generator["vq_stats"],
            classes=classes_of(config),
            dtype=dtype,
            overwrite=overwrite,
        )
        # Loading it back checks the shapes against the model config and the hashes.
        bundle.load_tokenizer_variables(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vitvq.export")
    logger.info(
        "Wrote %s: step %d, %s parameters, %s.",
        output,
        generator["step"],
        "EMA" if generator["ema"] else "raw",
        dtype,
    )
    return path


def main(argv):
    cli.no_extra_args(argv)
    for flag in ("workdir", "output"):
        if not flags.FLAGS[flag].value:
            cli.exit_with(f"--{flag} is required")
    logging.getLogger().setLevel(logging.INFO)
    with cli.user_errors():
        from vitvq import distributed

        distributed.initialize_if_configured()
        path = export(
            _WORKDIR.value,
            _OUTPUT.value,
            dtype=_DTYPE.value,
            step=_STEP.value,
            vim_workdir=_VIM_WORKDIR.value,
            overwrite=_OVERWRITE.value,
        )
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
