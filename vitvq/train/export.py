"""Writing a bundle from training runs: a stage-1 workdir's checkpoint (and optionally a stage-2
run's), checked against each other. `python -m vitvq.export` is the command around it.

The generator's parameters (its EMA parameters when the run kept them), code-usage
statistics and the quantizer's other collections (an EMA codebook, SimVQ's basis), the model
config, image size, codebook size, class names where the dataset has them (as the run
recorded them at start in `data.json`: the dataset need not be at hand), and the training
step. Arrays are read whole from any sharding of the saved run; in a
multi-process run every process reads and process 0 writes while the others wait. The run's
workdir is opened read-only, so a run that is still training there is not disturbed. The
workdirs may be URLs (gs://bucket/run); the bundle may be too (written in place, bundle.json
last; see `vitvq.bundle.write_bundle`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from vitvq import bundle, paths
from vitvq import data as data_lib
from vitvq.errors import ConfigError
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.train import restore

logger = logging.getLogger(__name__)


def classes_of(workdir: str, config) -> dict:
    """{"num_classes", "names"} of a run's dataset: from what the run recorded at start
    (`workdir/data.json`); a run from before that record names them from the dataset, when
    it can still be read here."""
    record = restore.load_data_record(workdir)
    if record is not None:
        return {"num_classes": int(record["num_classes"]), "names": record["class_names"]}
    logger.warning(
        "%s has no data.json (a run from before vitvq recorded its data): naming the classes "
        "from its dataset",
        workdir,
    )
    try:
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
    on_part: Callable[[], None] | None = None,
):
    """Writes the bundle of `workdir`'s checkpoint `step` (default: newest); returns its path.

    `on_part()` is called after each part of the work: the tokenizer's checkpoint read, the
    VIM's (with `vim_workdir`), the bundle written and verified (a command's progress line).
    """
    on_part = on_part or (lambda: None)

    config = restore.load_workdir_config(workdir)
    if config.get("trainer") != "vitvqgan":
        raise ConfigError(
            f"--workdir={workdir} is a {config.get('trainer')!r} run; it must be a stage-1 "
            "(ViT-VQGAN, trainer 'vitvqgan') run"
        )
    generator = restore.read_generator(workdir, step)
    on_part()
    tokenizer = {
        "model": config.model.to_dict(),
        "image_size": int(config.image_size),
        "step": generator["step"],
        "source": paths.absolute(workdir),
        "training_config": config.to_dict(),
    }
    if vim_workdir:
        vim, vim_params, classes = _vim_export(vim_workdir, generator, workdir, config)
        on_part()
    else:
        vim, vim_params, classes = None, None, classes_of(workdir, config)
    path = None
    if jax.process_index() == 0:
        path = bundle.write_bundle(
            output,
            tokenizer=tokenizer,
            tokenizer_params=generator["params"],
            tokenizer_stats=generator["vq_stats"],
            tokenizer_state=generator["quantizer_state"],
            vim=vim,
            vim_params=vim_params,
            classes=classes,
            dtype=dtype,
            overwrite=overwrite,
        )
        # Loading it back checks the shapes against the model configs and the hashes.
        bundle.load_tokenizer_variables(path)
        if vim is not None:
            bundle.load_vim_variables(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vitvq.export")
    on_part()
    logger.info(
        "Wrote %s: step %d, %s parameters, %s.",
        output,
        generator["step"],
        "EMA" if generator["ema"] else "raw",
        dtype,
    )
    return path


def _is_dir(path: str) -> bool:
    """Whether `path` (local or URL) is a directory; False when it cannot be reached."""
    try:
        return paths.is_dir(path)
    except (ConfigError, OSError):
        return False


def _vim_export(vim_workdir: str, generator: dict, stage1_workdir: str, stage1_config):
    """(vim section, VIM params, classes) of a stage-2 run, checked against the tokenizer."""
    config = restore.load_workdir_config(vim_workdir)
    if config.get("trainer") != "vim":
        raise ConfigError(
            f"--vim_workdir={vim_workdir} is a {config.get('trainer')!r} run; it must be a "
            "stage-2 (VIM, trainer 'vim') run"
        )
    state, vim_step = restore.read_checkpoint(vim_workdir)
    tokenizer = build_vitvqgan(stage1_config.model.to_dict(), int(stage1_config.image_size))
    variables = {"params": generator["params"], **generator["quantizer_state"]}
    if generator["vq_stats"]:
        variables["vq_stats"] = generator["vq_stats"]
    codebook = restore.code_table(tokenizer, variables)
    trained_on = config.get("tokenizer_bundle")
    if trained_on and _is_dir(trained_on):
        if not np.array_equal(restore.tokenizer_codebook(trained_on), codebook):
            raise ConfigError(
                f"--vim_workdir={vim_workdir} was trained on the tokenizer {trained_on}, whose "
                f"codebook differs from --workdir's at this step: export the same tokenizer "
                "(its workdir and --step) that the VIM was trained on"
            )
    else:
        logger.warning(
            "cannot check that the VIM was trained on this tokenizer: %s is gone", trained_on
        )
    num_classes = int(config.dataset.get("num_classes", 0) or 0)
    vim = {
        "model": config.model.to_dict(),
        "step": int(vim_step),
        "vocab_size": int(codebook.shape[0]),
        "num_classes": num_classes,
        "source": paths.absolute(vim_workdir),
        "training_config": config.to_dict(),
    }
    if num_classes:
        classes = classes_of(vim_workdir, config)
    else:
        classes = classes_of(stage1_workdir, stage1_config)
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))
    return vim, params, classes
