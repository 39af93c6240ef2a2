"""Reading trained weights back: a run's checkpoints for export, and `config.init_from`.

- `load_workdir_config(workdir)`: the config a run saved as `workdir/config.json`.
- `load_data_record(workdir)`: what it recorded about its data (`workdir/data.json`), or None
  for a run from before the record.
- `read_generator(path, step=None)`: the stage-1 generator's parameters (EMA when kept) and
  code-usage statistics from a workdir, its `checkpoints/` directory, one step directory of
  it, or a bundle.
- `apply_init_from(state, shardings, path)`: a fresh train state with those weights loaded
  (the restore order: the workdir's latest checkpoint, else `init_from`, else a fresh init).

Other runs' checkpoints are opened read-only: a run still training in that workdir is never
disturbed. Every path may be local or a URL (gs://bucket/run; see `vitvq.paths`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from vitvq import bundle, paths
from vitvq.checkpoint import Checkpointer
from vitvq.errors import ConfigError, DataError
from vitvq.models.quantizers import EXTRA_COLLECTIONS

logger = logging.getLogger(__name__)


def load_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a training run wrote to `workdir/config.json`."""
    path = paths.as_path(workdir) / "config.json"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {workdir} is not a vitvq training workdir (python -m "
            "vitvq.main writes config.json there at start)."
        )
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable config: {err}") from None


def load_data_record(workdir: str | os.PathLike) -> dict | None:
    """What a run recorded about its data at start (`workdir/data.json`: class count and
    names, split sizes, image size), or None when the workdir predates the record."""
    path = paths.as_path(workdir) / "data.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["num_classes"]), record["class_names"], int(record["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path} is not a readable data record ({err}); it is rewritten when the run "
            "resumes, or delete it to name the classes from the dataset"
        ) from None
    return record


def _checkpoint_location(path: epath.Path) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step or None for the newest) for a workdir/checkpoints/step."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and path.is_dir() and path.parent.is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise DataError(
        f"{path} is neither a bundle (no bundle.json) nor a vitvq workdir, checkpoints "
        "directory or checkpoint step directory."
    )


def read_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
    """(the saved state as a dict of arrays on one local device, its step)."""
    directory, found_step = _checkpoint_location(paths.as_path(path))
    step = found_step if step is None else step
    ckpt = Checkpointer(directory, save_every_steps=1, read_only=True)
    try:
        return ckpt.restore_as_saved(step)
    finally:
        ckpt.close()


def read_generator(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The stage-1 generator's weights from a bundle or a checkpoint.

    Returns {"params", "vq_stats", "quantizer_state" (the quantizer's other collections by
    name, {} for the paper's), "step", "ema": bool, "kind": "bundle" | "checkpoint"}; the
    trees are numpy. EMA parameters are taken when the run kept them.
    """
    path = paths.as_path(path)
    if (path / bundle.BUNDLE_JSON).is_file():
        if step is not None:
            raise ConfigError("a step cannot be chosen when reading a bundle")
        manifest, _, variables = bundle.load_tokenizer_variables(path)
        return {
            "params": variables["params"],
            "vq_stats": variables.get("vq_stats", {}),
            "quantizer_state": {c: variables[c] for c in EXTRA_COLLECTIONS if c in variables},
            "step": int(manifest["tokenizer"].get("step", 0)),
            "ema": False,
            "kind": "bundle",
        }
    state, step = read_checkpoint(path, step)
    ema = state.get("ema_params") or {}
    host = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))  # noqa: E731
    return {
        "params": host(ema if ema else state["params"]),
        "vq_stats": host(state.get("vq_stats") or {}),
        "quantizer_state": host(state.get("quantizer_state") or {}),
        "step": int(step),
        "ema": bool(ema),
        "kind": "checkpoint",
    }


def apply_init_from(state, shardings, path: str) -> Any:
    """`state` (fresh) with the generator weights at `path` loaded onto its shardings.

    Parameters of the new model that the source lacks keep their fresh values (logged);
    tensors the new model lacks are ignored (logged); a shape mismatch is a ConfigError. The
    optimizer state and step stay fresh; EMA parameters start at the loaded weights.
    """
    source = read_generator(path)
    loaded = bundle.flatten_tree(source["params"])
    merge = _param_merger(state.params, loaded, path)

    params = merge(state.params, loaded, shardings.params)
    updates = {"params": params}
    if jax.tree_util.tree_leaves(state.ema_params):
        updates["ema_params"] = merge(state.ema_params, loaded, shardings.ema_params)
    stats = bundle.flatten_tree(source["vq_stats"]) if source["vq_stats"] else {}
    if stats and jax.tree_util.tree_leaves(state.vq_stats):
        updates["vq_stats"] = merge(state.vq_stats, stats, shardings.vq_stats)
    qstate = bundle.flatten_tree(source["quantizer_state"]) if source["quantizer_state"] else {}
    if qstate and jax.tree_util.tree_leaves(state.quantizer_state):
        merge_state = _param_merger(state.quantizer_state, qstate, path)
        updates["quantizer_state"] = merge_state(
            state.quantizer_state, qstate, shardings.quantizer_state
        )
    logger.info(
        "Initialized from %s %s (step %d%s).",
        source["kind"],
        path,
        source["step"],
        ", EMA parameters" if source["ema"] else "",
    )
    return state.replace(**updates)


def _param_merger(params, loaded: dict[str, np.ndarray], path: str):
    """`merge(fresh_tree, flat_source, shard_tree)` after checking `loaded` (flat) against the
    shapes of `params`: a mismatch is a ConfigError; missing and unused tensors are logged."""
    current = bundle.flatten_tree_abstract(jax.tree_util.tree_map(np.shape, params))
    mismatched = [
        f"{k}: {tuple(loaded[k].shape)} in {path}, {tuple(current[k])} in this model"
        for k in sorted(loaded.keys() & current.keys())
        if tuple(loaded[k].shape) != tuple(current[k])
    ]
    if mismatched:
        raise ConfigError(
            f"config.init_from={path} does not fit this model ({len(mismatched)} shape "
            f"mismatches): {'; '.join(mismatched[:6])}. Use the model config of the run that "
            "wrote it."
        )
    missing = sorted(current.keys() - loaded.keys())
    unused = sorted(loaded.keys() - current.keys())
    if missing:
        logger.warning("init_from: %d parameters keep their fresh init: %s", len(missing), missing)
    if unused:
        logger.warning("init_from: %d tensors of %s are not used: %s", len(unused), path, unused)

    def merge(fresh_tree, flat_source, shard_tree):
        flat_fresh = bundle.flatten_tree_abstract(fresh_tree)
        flat_shard = bundle.flatten_tree_abstract(shard_tree)
        out = {}
        for name, fresh in flat_fresh.items():
            if name in flat_source:
                value = np.asarray(flat_source[name]).astype(fresh.dtype)
                out[name] = jax.device_put(value, flat_shard[name])
            else:
                out[name] = fresh
        return bundle.unflatten_tree(out)

    return merge


def code_table(model, variables) -> np.ndarray:
    """`model.code_table` ([num_codes, codes_dim]) for `variables`, computed from host copies
    (every caller gets the same bits for the same tokenizer, wherever its arrays live)."""
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    return np.asarray(model.apply(variables, method=model.code_table))


def tokenizer_codebook(path: str | os.PathLike) -> np.ndarray:
    """The code table [codes, code_dim] of the tokenizer in the bundle at `path` (its
    vocabulary, whatever the quantizer kind: `ViTVQGAN.code_table`)."""
    _, model, variables = bundle.load_tokenizer_variables(path)
    return code_table(model, variables)


def read_vim(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """A VIM's weights from a bundle with a VIM, a stage-2 workdir or a checkpoint directory.

    Returns {"params", "codebook" (of the tokenizer it was trained on, or None when that is
    unknown), "tokenizer" (where that codebook came from), "step", "kind"}; trees are numpy.
    """
    path = paths.as_path(path)
    if (path / bundle.BUNDLE_JSON).is_file():
        manifest = bundle.read_manifest(path)
        if not isinstance(manifest.get("vim"), dict):
            raise ConfigError(
                f"config.init_from={path} is a tokenizer bundle without a VIM; give a bundle "
                "exported with --vim_workdir, a stage-2 workdir or its checkpoints directory"
            )
        _, variables = bundle.load_vim_variables(path, manifest)
        return {
            "params": variables["params"],
            "codebook": tokenizer_codebook(path),
            "tokenizer": str(path),
            "step": int(manifest["vim"].get("step", 0)),
            "kind": "bundle",
        }
    codebook, tokenizer = None, None
    if (path / "config.json").is_file():  # a workdir: which run was it?
        config = load_workdir_config(path)
        if config.get("trainer") != "vim":
            raise ConfigError(
                f"config.init_from={path} is a {config.get('trainer')!r} run; a VIM starts from "
                "a stage-2 (trainer 'vim') workdir, its checkpoints or a bundle with a VIM"
            )
        tokenizer = config.get("tokenizer_bundle")
        if tokenizer and paths.exists(tokenizer):
            codebook = tokenizer_codebook(tokenizer)
    state, found = read_checkpoint(path, step)
    if "opt_state" not in state or "vq_stats" in state:
        raise ConfigError(f"config.init_from={path} holds no stage-2 (VIM) checkpoint")
    host = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))  # noqa: E731
    return {
        "params": host(state["params"]),
        "codebook": codebook,
        "tokenizer": tokenizer,
        "step": int(found),
        "kind": "checkpoint",
    }


def apply_vim_init_from(state, shardings, path: str, codebook: np.ndarray) -> Any:
    """`state` (a fresh stage-2 state) with the VIM weights at `path` on its shardings.

    The source must have been trained on a tokenizer with this `codebook` (its codes are what
    the VIM predicts): another codebook is a ConfigError. Shapes are checked as for stage 1;
    the optimizer state and step stay fresh.
    """
    source = read_vim(path)
    if source["codebook"] is None:
        logger.warning(
            "init_from: cannot check that %s was trained on this tokenizer (%s is unknown or gone)",
            path,
            source["tokenizer"],
        )
    elif not np.array_equal(source["codebook"], codebook):  # False for other shapes too
        raise ConfigError(
            f"config.init_from={path} was trained on the tokenizer {source['tokenizer']}, "
            f"whose codebook ({source['codebook'].shape[0]} codes) differs from that of "
            f"config.tokenizer_bundle ({codebook.shape[0]} codes): a VIM predicts its own "
            "tokenizer's codes; train on that tokenizer bundle"
        )
    loaded = bundle.flatten_tree(source["params"])
    merge = _param_merger(state.params, loaded, path)
    params = merge(state.params, loaded, shardings.params)
    logger.info("Initialized the VIM from %s %s (step %d).", source["kind"], path, source["step"])
    return state.replace(params=params)
