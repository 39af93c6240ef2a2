"""Bundles: trained models exported for downstream use (the file format and its readers).

A bundle is a directory:

    bundle.json              format, version, model configs, sizes, classes, steps, sha256s
    tokenizer.safetensors    the ViT-VQGAN's parameters ("params/..."), code usage
                             statistics ("vq_stats/..."; none for FSQ and LFQ) and the
                             quantizer's other collections: an EMA codebook ("vq_ema/...")
                             or SimVQ's fixed basis ("simvq_basis/...")
    vim.safetensors          the VIM's parameters ("params/...", stage 2; absent in a
                             tokenizer bundle)

Tensor names are the parameter paths joined by "/", e.g. "params/enc/block_0/attn/query_kernel".
bundle.json's tokenizer section records the quantizer (`quantizer`: its kind and settings, from
the model config's `model.quantizer` block) and `codebook_size`, the number of codes (FSQ's
prod(levels), LFQ's 2**bits). A bundle written before the quantizer kinds has neither the
block nor the record: its tokenizer is the paper's quantizer (kind "vq").
Nothing is pickled: the tensors are safetensors and everything else is JSON. Loading checks
the format version, each file's sha256, every tensor's presence and shape against the model
the config describes, and names what is wrong (BundleError). A bundle may be a local directory
or a URL (gs://bucket/bundle, read and written through `vitvq.paths`).

This module uses the models only (no TensorFlow, no training code). `vitvq.tokenizer` and
`vitvq.sampler` load bundles for inference:

    tok = vitvq.load_tokenizer("runs/demo/bundle")
    codes = tok.encode(images)     # uint8 [B, H, W, 3] -> int32 [B, H/p, W/p]
    images = tok.decode(codes)     # int32 [B, h, w]    -> uint8 [B, H, W, 3]
    sampler = vitvq.load_sampler("runs/demo/bundle")   # a bundle with a VIM
    images = sampler.sample(16, class_labels=3, temperature=1.0, top_k=0, top_p=1.0,
                            cfg_scale=1.0, seed=0)     # uint8 [16, H, W, 3]
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from vitvq import paths
from vitvq.errors import BundleError, ConfigError, InputError
from vitvq.models import tree as treeutil
from vitvq.models.quantizers import EXTRA_COLLECTIONS, quantizer_spec, spec_num_codes
from vitvq.models.vim import build_vim
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.version import __version__

FORMAT = "vitvq-bundle"
FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
TOKENIZER_FILE = "tokenizer.safetensors"
VIM_FILE = "vim.safetensors"
EXPORT_DTYPES = ("float32", "bfloat16")
_MAX_LISTED = 8  # problems shown in one error message


# --- parameter trees <-> flat tensor dicts -------------------------------------------------


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a/b": np.asarray(x)}; metadata boxes are stripped."""
    return {k: np.asarray(jax.device_get(v)) for k, v in treeutil.flatten(tree, prefix).items()}


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_tree`."""
    return treeutil.unflatten(flat)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with _path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _path(path: str | os.PathLike):
    """A local path as `pathlib.Path` (as given), a URL as `epath.Path` (gs://...)."""
    return paths.as_path(path) if paths.is_url(path) else pathlib.Path(path)


# --- writing -------------------------------------------------------------------------------


def _cast(flat: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype not in EXPORT_DTYPES:
        raise InputError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    target = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    # jnp.issubdtype: numpy's does not count bfloat16 as floating (it would stay bf16).
    return {
        k: (v.astype(target) if jnp.issubdtype(v.dtype, jnp.floating) else v)
        for k, v in flat.items()
    }


def write_bundle(
    output: str | os.PathLike,
    *,
    tokenizer: Mapping[str, Any],
    tokenizer_params: Mapping[str, Any],
    tokenizer_stats: Mapping[str, Any] | None = None,
    tokenizer_state: Mapping[str, Any] | None = None,
    vim: Mapping[str, Any] | None = None,
    vim_params: Mapping[str, Any] | None = None,
    classes: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> os.PathLike:
    """Writes a bundle directory atomically and returns its path (`pathlib.Path`, or an
    `epath.Path` for a URL).

    Args:
        tokenizer: the tokenizer's description: `model` (the config's model block as a
            dict), `image_size`, `step`, and optionally `source` (e.g. the workdir) and
            `training_config`.
        tokenizer_params: the ViT-VQGAN's parameter tree (EMA parameters when kept).
        tokenizer_stats: its `vq_stats` collection (code usage), kept for fine-tuning.
        tokenizer_state: the quantizer's other collections by name ({"vq_ema": ...} or
            {"simvq_basis": ...}; the codes of those kinds), kept in float32.
        vim, vim_params: the same for a VIM (stage 2); `vim["model"]` is its config.
        classes: {"num_classes": int, "names": list[str] | None}; None: unlabelled.
        dtype: "float32" or "bfloat16" for the floating-point tensors.
        overwrite: replace an existing bundle at `output` (otherwise an error).

    The files are written to a temporary directory next to `output` and renamed into place,
    so a crash never leaves a half-written bundle under the final name. An object store
    (`output` a URL such as gs://bucket/bundle) has no atomic rename: there the tensor files
    are uploaded in place and bundle.json last (an old bundle.json is deleted first), so a
    crash leaves a directory without bundle.json, which no loader accepts as a bundle.
    """
    url = paths.is_url(output)
    output = paths.as_path(output) if url else pathlib.Path(output).absolute()
    if output.exists() and not overwrite:
        raise BundleError(
            f"{output} already exists; choose another --output or pass --overwrite to replace it."
        )
    if (vim is None) != (vim_params is None):
        raise ValueError("vim and vim_params go together")
    flat_tok = _cast(flatten_tree({"params": tokenizer_params}), dtype)
    if tokenizer_stats:
        flat_tok.update(flatten_tree({"vq_stats": tokenizer_stats}))  # kept in float32
    if tokenizer_state:
        flat_tok.update(flatten_tree(dict(tokenizer_state)))  # kept in float32
    model_cfg = dict(tokenizer["model"])
    spec = quantizer_spec(model_cfg.get("quantizer"))
    image_size = int(tokenizer["image_size"])
    patch = int(model_cfg.get("patch_size", 8))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "vitvq_version": _version(),
        "classes": dict(classes) if classes else {"num_classes": 0, "names": None},
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "dtype": dtype,
            "model": model_cfg,
            "image_size": image_size,
            "patch_size": patch,
            "grid_size": image_size // patch,
            "codebook_size": spec_num_codes(spec, int(model_cfg.get("codebook_size", 8192))),
            "quantizer": dataclasses.asdict(spec),
            "step": int(tokenizer.get("step", 0)),
            "source": str(tokenizer.get("source", "")),
        },
        "vim": None,
        "training_configs": {"tokenizer": tokenizer.get("training_config")},
    }
    files = {TOKENIZER_FILE: flat_tok}
    if vim is not None:
        files[VIM_FILE] = _cast(flatten_tree({"params": vim_params}), dtype)
        manifest["vim"] = {
            "file": VIM_FILE,
            "dtype": dtype,
            "model": dict(vim["model"]),
            "vocab_size": int(vim.get("vocab_size", manifest["tokenizer"]["codebook_size"])),
            "num_classes": int(vim.get("num_classes", 0)),
            "step": int(vim.get("step", 0)),
            "source": str(vim.get("source", "")),
        }
        manifest["training_configs"]["vim"] = vim.get("training_config")

    if url:
        _write_in_place(output, files, manifest)
        return output

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        for name, flat in files.items():
            safetensors.numpy.save_file(flat, str(tmp / name), metadata={"format": FORMAT})
            section = "tokenizer" if name == TOKENIZER_FILE else "vim"
            manifest[section]["sha256"] = sha256_file(tmp / name)
        with open(tmp / BUNDLE_JSON, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        if output.exists():  # overwrite: move the old bundle aside only once the new one is done
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _manifest_text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"


def _write_in_place(output, files: Mapping[str, dict], manifest: dict[str, Any]) -> None:
    """Writes a bundle at a URL: each file in one upload, bundle.json last (the commit)."""
    (output / BUNDLE_JSON).unlink(missing_ok=True)  # an old bundle stops being one first
    output.mkdir(parents=True, exist_ok=True)
    for name, flat in files.items():
        data = safetensors.numpy.save(flat, metadata={"format": FORMAT})
        section = "tokenizer" if name == TOKENIZER_FILE else "vim"
        manifest[section]["sha256"] = hashlib.sha256(data).hexdigest()
        paths.write_bytes(output / name, data)
    if VIM_FILE not in files:  # an overwritten bundle's VIM would be stale
        (output / VIM_FILE).unlink(missing_ok=True)
    paths.write_text(output / BUNDLE_JSON, _manifest_text(manifest))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _version() -> str:

    return __version__


# --- reading -------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """bundle.json of the bundle at `path`, checked for format and version."""
    path = _path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist.")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory (a bundle is a directory).")
    manifest_path = path / BUNDLE_JSON
    if not manifest_path.is_file():
        raise BundleError(
            f"{manifest_path} is missing: {path} is not a vitvq bundle "
            "(make one with python -m vitvq.export)."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a vitvq bundle manifest (format != {FORMAT!r}).")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path} has format_version {version!r}; this vitvq reads version "
            f"{FORMAT_VERSION}. Re-export the bundle with this version, or use the vitvq "
            "version that wrote it."
        )
    for key in ("tokenizer", "classes"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{manifest_path} has no '{key}' section.")
    for key in ("file", "sha256", "model", "image_size"):
        if key not in manifest["tokenizer"]:
            raise BundleError(f"{manifest_path}: the tokenizer section has no '{key}'.")
    return manifest


def read_tensors(
    path: str | os.PathLike, section: Mapping[str, Any], *, verify: bool = True
) -> dict[str, np.ndarray]:
    """The tensors of one section's file, after checking its sha256 (BundleError if bad)."""
    file = _path(path) / section["file"]
    if not file.is_file():
        raise BundleError(f"{file} is missing from the bundle.")
    data = file.read_bytes() if paths.is_url(file) else None  # one download for both uses
    if verify:
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(file)
        if digest != section["sha256"]:
            raise BundleError(
                f"{file} is corrupt or was modified: its sha256 is {digest[:16]}..., "
                f"bundle.json expects {str(section['sha256'])[:16]}.... Re-export or re-copy it."
            )
    try:
        if data is not None:
            return safetensors.numpy.load(data)
        return safetensors.numpy.load_file(str(file))
    except Exception as err:  # truncated or garbage file: safetensors' own error types
        raise BundleError(f"{file} is not a readable safetensors file: {err}") from None


def check_tree(loaded: Mapping[str, np.ndarray], expected: Mapping[str, Any], what: str) -> None:
    """Raises BundleError naming missing, unexpected and mis-shaped tensors."""
    problems = []
    for name in sorted(expected.keys() | loaded.keys()):
        if name not in loaded:
            problems.append(f"{name}: missing (expected shape {tuple(expected[name].shape)})")
        elif name not in expected:
            problems.append(f"{name}: unexpected tensor of shape {tuple(loaded[name].shape)}")
        elif tuple(loaded[name].shape) != tuple(expected[name].shape):
            problems.append(
                f"{name}: shape {tuple(loaded[name].shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        raise BundleError(
            f"{what} does not match the model its bundle.json describes ({len(problems)} "
            f"problems): {shown}" + (f"; ... and {more} more" if more > 0 else "")
        )


def tokenizer_model(manifest: Mapping[str, Any], dtype: Any = jnp.float32):
    """The ViTVQGAN module the manifest describes."""

    section = manifest["tokenizer"]
    try:
        return build_vitvqgan(section["model"], int(section["image_size"]), dtype)
    except (ConfigError, TypeError, ValueError) as err:
        raise BundleError(f"bundle.json: the tokenizer's model config is invalid: {err}") from None


def load_tokenizer_variables(path: str | os.PathLike, *, verify: bool = True):
    """(manifest, model, {"params": ..., "vq_stats": ..., and the quantizer's other
    collections} as float32 numpy trees)."""
    manifest = read_manifest(path)
    model = tokenizer_model(manifest)
    tensors = read_tensors(path, manifest["tokenizer"], verify=verify)
    size = model.image_size
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    expected = flatten_tree_abstract({"params": abstract["params"]})
    stats_expected = flatten_tree_abstract({"vq_stats": abstract.get("vq_stats", {})})
    params_flat = {k: v for k, v in tensors.items() if k.startswith("params/")}
    check_tree(params_flat, expected, f"{_path(path) / manifest['tokenizer']['file']}")
    stats_flat = {k: v for k, v in tensors.items() if k.startswith("vq_stats/")}
    if stats_flat:
        check_tree(stats_flat, stats_expected, f"{manifest['tokenizer']['file']} (vq_stats)")
    else:
        stats_flat = {k: np.zeros(v.shape, np.float32) for k, v in stats_expected.items()}
    # An EMA codebook or SimVQ's basis: the codes themselves, so they must be there.
    extra = {c: abstract[c] for c in EXTRA_COLLECTIONS if c in abstract}
    extra_expected = flatten_tree_abstract(extra)
    extra_flat = {k: v for k, v in tensors.items() if k.split("/")[0] in EXTRA_COLLECTIONS}
    if extra_expected or extra_flat:
        what = f"{manifest['tokenizer']['file']} ({', '.join(sorted(extra) or EXTRA_COLLECTIONS)})"
        check_tree(extra_flat, extra_expected, what)
    variables = unflatten_tree(_cast({**params_flat, **stats_flat, **extra_flat}, "float32"))
    return manifest, model, variables


def flatten_tree_abstract(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Like `flatten_tree` for trees of ShapeDtypeStructs (no device transfer)."""
    return treeutil.flatten(tree, prefix)


# --- the VIM (stage 2) ---------------------------------------------------------------------


def vim_model(manifest: Mapping[str, Any], dtype: Any = jnp.float32):
    """The VIM module the manifest describes (checked against the tokenizer's codebook)."""

    section = manifest.get("vim")
    if not isinstance(section, Mapping):
        raise BundleError(
            "this bundle has no VIM (it is a tokenizer bundle): export one with "
            "python -m vitvq.export --workdir=STAGE1 --vim_workdir=STAGE2 --output=..."
        )
    tok = manifest["tokenizer"]
    vocab = int(section.get("vocab_size", tok["codebook_size"]))
    if vocab != int(tok["codebook_size"]):
        raise BundleError(
            f"bundle.json: the VIM predicts {vocab} codes but the tokenizer has "
            f"{tok['codebook_size']}; they were not trained together"
        )
    try:
        return build_vim(
            section["model"],
            vocab_size=vocab,
            grid_size=int(tok["grid_size"]),
            num_classes=int(section.get("num_classes", 0)),
            dtype=dtype,
        )
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        raise BundleError(f"bundle.json: the VIM's model config is invalid: {err}") from None


def load_vim_variables(path: str | os.PathLike, manifest=None, *, verify: bool = True):
    """(VIM module, {"params": float32 numpy tree}) of a bundle with a VIM."""
    manifest = manifest or read_manifest(path)
    model = vim_model(manifest)
    tensors = read_tensors(path, manifest["vim"], verify=verify)
    t = model.grid_size**2
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes else None
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32), labels)
    )
    expected = flatten_tree_abstract({"params": abstract["params"]})
    check_tree(tensors, expected, f"{_path(path) / manifest['vim']['file']}")
    return model, unflatten_tree(_cast(tensors, "float32"))
