"""Export to bundles, the Tokenizer, and fine-tuning from a bundle or checkpoint.

One tiny stage-1 run (digits, EMA on) trains on a data 2 x fsdp 2 x tensor 2 mesh of 8 fake
devices; the tests export it and compare the bundle's tokenizer with the training state's
model, on 1 device and on 8.
"""

import importlib.util
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitvq
from vitvq import bundle, parallel
from vitvq.checkpoint import Checkpointer
from vitvq.errors import BundleError, ConfigError, DataError
from vitvq.export import export
from vitvq.train import stage1

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3


def make_config(**overrides):
    spec = importlib.util.spec_from_file_location("small", REPO / "configs" / "vitvq_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.loss.perceptual = 0.0
    config.loss.adversarial = 0.0  # no discriminator: the export tests need the generator
    config.eval_lpips = False
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.ema_decay = 0.5  # EMA on, and far from the raw params after a few steps
    config.optimizer.warmup_steps = 0
    config.update(
        total_steps=STEPS,
        checkpoint_every_steps=STEPS,
        log_every_steps=STEPS,
        eval_every_steps=STEPS,
        image_every_steps=STEPS,
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir, the final state restored on the training mesh)."""
    workdir = tmp_path_factory.mktemp("run")
    config = make_config()
    stage1.train_and_evaluate(config, str(workdir))
    trainer = stage1.Stage1(config, parallel.make_mesh(config.mesh))
    abstract, _ = trainer.abstract_state()
    with Checkpointer(workdir / "checkpoints", save_every_steps=1) as ckpt:
        state = ckpt.restore(abstract, STEPS)
    return config, workdir, state, trainer.model


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, workdir, _, _ = trained
    out = tmp_path_factory.mktemp("bundles") / "tok"
    export(str(workdir), str(out))
    return out


def digits(n=11):
    from vitvq.data import sources

    return np.stack(sources.load_digits(32).eval.images[:n])


def reference(model, state, images_uint8, batch: int = 16):
    """Codes and uint8 images from the training state's EMA params, on one device.

    Computed on a zero-padded batch of `batch` images, the shape the tokenizer pads 11 images
    to, so that the same XLA program shape gives bit-identical results.
    """
    n = len(images_uint8)
    images_uint8 = np.concatenate([images_uint8, np.zeros((batch - n, 32, 32, 3), np.uint8)])
    params = jax.device_put(jax.device_get(state.ema_params), jax.devices()[0])
    stats = jax.device_put(jax.device_get(state.vq_stats), jax.devices()[0])
    variables = {"params": params, "vq_stats": stats}
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode)[0])
    codes = encode(variables, x)
    out = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))(variables, codes)
    images = np.asarray(jnp.round(out * 255.0).astype(jnp.uint8))
    return np.asarray(codes)[:n], images[:n]


def test_bundle_has_ema_params_config_and_hashes(trained, exported):
    config, workdir, state, _ = trained
    manifest = json.loads((exported / "bundle.json").read_text())
    assert manifest["format"] == "vitvq-bundle" and manifest["format_version"] == 1
    tok = manifest["tokenizer"]
    assert tok["step"] == STEPS and tok["image_size"] == 32 and tok["grid_size"] == 4
    assert tok["codebook_size"] == config.model.codebook_size
    assert tok["model"] == json.loads(json.dumps(config.model.to_dict()))  # tuples: lists
    assert manifest["classes"] == {"num_classes": 10, "names": [str(i) for i in range(10)]}
    assert tok["sha256"] == bundle.sha256_file(exported / "tokenizer.safetensors")
    from safetensors.numpy import load_file

    tensors = load_file(str(exported / "tokenizer.safetensors"))
    ema = bundle.flatten_tree({"params": jax.device_get(state.ema_params)})
    raw = bundle.flatten_tree({"params": jax.device_get(state.params)})
    assert set(ema) <= set(tensors)
    for name, value in ema.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)  # EMA really differs
    np.testing.assert_array_equal(
        tensors["vq_stats/quantizer/usage"], jax.device_get(state.vq_stats["quantizer"]["usage"])
    )


@pytest.mark.parametrize("num_devices", [1, 8])
def test_tokenizer_matches_the_training_state(trained, exported, num_devices):
    """Written from a state sharded on 8 devices; loads and runs on 1 device and on 8."""
    _, _, state, model = trained
    tok = vitvq.load_tokenizer(exported, devices=jax.devices()[:num_devices])
    assert (tok.image_size, tok.grid_size, tok.codebook_size) == (32, 4, 64)
    images = digits(11)  # not a multiple of 8: padded internally
    codes_ref, images_ref = reference(model, state, images)
    codes = tok.encode(images)
    assert codes.dtype == np.int32 and codes.shape == (11, 4, 4)
    np.testing.assert_array_equal(codes, codes_ref)
    decoded = tok.decode(codes)
    assert decoded.dtype == np.uint8 and decoded.shape == (11, 32, 32, 3)
    np.testing.assert_array_equal(decoded, images_ref)
    # Any batch size, including 1 and more than max_batch.
    np.testing.assert_array_equal(tok.encode(images[:1]), codes_ref[:1])
    small = vitvq.load_tokenizer(exported, devices=jax.devices()[:num_devices], max_batch=8)
    np.testing.assert_array_equal(small.encode(images), codes_ref)


def test_bfloat16_export_decodes_within_tolerance(trained, exported, tmp_path):
    _, workdir, _, _ = trained
    out = export(str(workdir), str(tmp_path / "bf16"), dtype="bfloat16")
    assert os.path.getsize(out / "tokenizer.safetensors") < 0.6 * os.path.getsize(
        exported / "tokenizer.safetensors"
    )
    full, half = vitvq.load_tokenizer(exported), vitvq.load_tokenizer(out)
    # Loaded for float32 compute whatever the file's dtype.
    assert {x.dtype for x in jax.tree_util.tree_leaves(half.params)} == {np.dtype(np.float32)}
    images = digits(16)
    codes = full.encode(images)
    assert np.mean(half.encode(images) == codes) >= 0.9
    diff = np.abs(full.decode(codes).astype(int) - half.decode(codes).astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 16


def test_export_of_an_earlier_step_and_refusal_to_overwrite(trained, exported, tmp_path):
    _, workdir, _, _ = trained
    with pytest.raises(BundleError, match="already exists"):
        export(str(workdir), str(exported))
    with pytest.raises(DataError, match="no checkpoint for step 1"):
        export(str(workdir), str(tmp_path / "b"), step=1)
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="config.json is missing"):
        export(str(tmp_path), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="must be a stage-2"):
        export(str(workdir), str(tmp_path / "d"), vim_workdir=str(workdir))


# --- broken bundles ------------------------------------------------------------------------


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bundle_from_before_the_quantizer_kinds_loads_as_vq(exported, tmp_path):
    """bundle.json records the quantizer (kind and settings); a bundle written before it
    existed (no model.quantizer block, no record) is the paper's quantizer."""
    manifest = json.loads((exported / "bundle.json").read_text())
    assert manifest["tokenizer"]["quantizer"]["kind"] == "vq"
    assert manifest["tokenizer"]["model"]["quantizer"]["kind"] == "vq"
    old = _copy(exported, tmp_path / "old")
    del manifest["tokenizer"]["quantizer"], manifest["tokenizer"]["model"]["quantizer"]
    (old / "bundle.json").write_text(json.dumps(manifest))
    tok, new = vitvq.load_tokenizer(old), vitvq.load_tokenizer(exported)
    assert tok.quantizer_kind == "vq" and tok.codebook_size == new.codebook_size
    images = digits(8)
    np.testing.assert_array_equal(tok.encode(images), new.encode(images))


def test_export_needs_only_the_workdir_to_name_the_classes(trained, tmp_path, monkeypatch, caplog):
    """Training records its data (data.json) at start; export reads that, not the dataset. A
    workdir from before the record still exports, naming the classes from the dataset, and
    says so in one line."""
    import shutil

    from vitvq import data as data_lib

    _, workdir, _, _ = trained
    digit_names = [str(i) for i in range(10)]
    record = json.loads((workdir / "data.json").read_text())
    assert record == {
        "dataset": "digits",
        "num_classes": 10,
        "class_names": digit_names,
        "num_train": record["num_train"],
        "num_eval": record["num_eval"],
        "image_size": 32,
    }
    assert record["num_train"] > 0 and record["num_eval"] > 0

    def unreadable(_dataset):  # the data is on another machine
        raise AssertionError("export read the dataset")

    with monkeypatch.context() as patched:
        patched.setattr(data_lib, "dataset_info", unreadable)
        export(str(workdir), str(tmp_path / "recorded"))
    manifest = json.loads((tmp_path / "recorded" / "bundle.json").read_text())
    assert manifest["classes"] == {"num_classes": 10, "names": digit_names}

    older = tmp_path / "older"
    shutil.copytree(workdir, older)
    (older / "data.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING"):
        export(str(older), str(tmp_path / "from_dataset"))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [m for m in said if "data.json" in m] == [
        f"{older} has no data.json (a run from before vitvq recorded its data): naming the "
        "classes from its dataset"
    ], said
    manifest = json.loads((tmp_path / "from_dataset" / "bundle.json").read_text())
    assert manifest["classes"] == {"num_classes": 10, "names": digit_names}

    (older / "data.json").write_text("{not json")
    with pytest.raises(DataError, match="data.json is not a readable data record"):
        export(str(older), str(tmp_path / "damaged"))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_json", "bundle.json is missing"),
        ("bad_json", "not valid JSON"),
        ("version", "format_version 99"),
        ("missing_tensors", "tokenizer.safetensors is missing"),
        ("flipped_byte", "sha256"),
        ("truncated", "sha256"),
        ("truncated_unverified", "not a readable safetensors"),
        ("wrong_shape", "does not match the model"),
    ],
)
def test_broken_bundles_name_the_file_and_problem(exported, tmp_path, damage, match):
    b = _copy(exported, tmp_path / "b")
    tensors = b / "tokenizer.safetensors"
    manifest = json.loads((b / "bundle.json").read_text())
    verify = True
    if damage == "missing_json":
        (b / "bundle.json").unlink()
    elif damage == "bad_json":
        (b / "bundle.json").write_text("{not json")
    elif damage == "version":
        manifest["format_version"] = 99
        (b / "bundle.json").write_text(json.dumps(manifest))
    elif damage == "missing_tensors":
        tensors.unlink()
    elif damage == "flipped_byte":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage.startswith("truncated"):
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
        verify = damage == "truncated"
    elif damage == "wrong_shape":
        manifest["tokenizer"]["model"]["codebook_size"] = 32
        (b / "bundle.json").write_text(json.dumps(manifest))
        verify = False
    with pytest.raises(BundleError, match=match) as err:
        vitvq.load_tokenizer(b, verify=verify)
    assert str(b) in str(err.value)


def test_export_cli_errors_exit_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "vitvq.export", f"--workdir={tmp_path}", f"--output={tmp_path}/b"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "config.json is missing" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_no_pickle_in_export_load_and_checkpoints(trained, tmp_path, monkeypatch):
    _, workdir, _, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "Pickler", refuse)
    out = export(str(workdir), str(tmp_path / "b"))
    vitvq.load_tokenizer(out).encode(digits(2))
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(4)}
    with Checkpointer(tmp_path / "ckpt", save_every_steps=1) as ckpt:  # checkpoints too
        ckpt.save(1, state)
        ckpt.wait()
        restored = ckpt.restore(jax.tree_util.tree_map(lambda x: x, state), 1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    header = (out / "tokenizer.safetensors").read_bytes()[8:200]
    assert header.startswith(b"{")  # safetensors: JSON header + raw little-endian data


def test_importable_and_usable_without_tensorflow(exported):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, vitvq
tok = vitvq.load_tokenizer({str(exported)!r})
codes = tok.encode(np.zeros((3, 32, 32, 3), np.uint8))
print(tok.decode(codes).shape, 'tensorflow' in sys.modules)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(3, 32, 32, 3) False"


# --- fine-tuning ---------------------------------------------------------------------------


def test_decoder_finetuning_freezes_encoder_and_codebook(exported, tmp_path):
    config = make_config(init_from=str(exported), trainable="decoder")
    config.codebook_restart.every_steps = 1  # would rewrite the codebook if not disabled
    config.ema_decay = 0.0
    workdir = tmp_path / "ft"
    stage1.train_and_evaluate(config, str(workdir))
    before = bundle.load_tokenizer_variables(exported)[2]["params"]
    out = export(str(workdir), str(tmp_path / "ft_bundle"))
    after = bundle.load_tokenizer_variables(out)[2]["params"]
    flat_before, flat_after = bundle.flatten_tree(before), bundle.flatten_tree(after)
    frozen = [k for k in flat_before if k.split("/")[0] in ("enc", "quantizer")]
    trained_keys = [k for k in flat_before if k.split("/")[0] in ("dec", "project_up")]
    assert frozen and trained_keys
    for k in frozen:
        np.testing.assert_array_equal(flat_after[k], flat_before[k], err_msg=k)
    assert all(not np.array_equal(flat_after[k], flat_before[k]) for k in trained_keys)


def test_continue_from_a_checkpoint_on_a_folder_dataset(trained, tmp_path):
    """init_from a workdir's checkpoint (EMA params) and a new dataset: weights carried over."""
    from PIL import Image

    from vitvq.data import sources

    _, workdir, state, _ = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = sources.load_photo("astronaut")
    for k in range(8):
        Image.fromarray(photo[40 * k : 40 * k + 96, 40 * k : 40 * k + 96]).save(folder / f"{k}.png")
    config = make_config(init_from=str(workdir), total_steps=1)
    config.dataset.update(name="folder", path=str(folder), num_classes=0)
    config.optimizer.lr = 1e-12  # one step barely moves the weights
    config.optimizer.end_lr = 1e-12
    config.update(checkpoint_every_steps=1, log_every_steps=1, eval_every_steps=1)
    config.update(image_every_steps=1, eval_batch_size=8, eval_num_examples=0)
    ft_dir = tmp_path / "ft2"
    stage1.train_and_evaluate(config, str(ft_dir))
    trainer = stage1.Stage1(config, parallel.make_mesh(config.mesh))
    abstract, _ = trainer.abstract_state()
    with Checkpointer(ft_dir / "checkpoints", save_every_steps=1) as ckpt:
        new = ckpt.restore(abstract, 1)
    a = bundle.flatten_tree(jax.device_get(new.params))
    b = bundle.flatten_tree(jax.device_get(state.ema_params))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_init_from_errors(trained, tmp_path):
    _, workdir, _, _ = trained
    mesh = parallel.make_mesh(make_config().mesh)
    with pytest.raises(ConfigError, match="does not exist"):
        stage1.check_config(make_config(init_from=str(tmp_path / "nope")), mesh)
    with pytest.raises(ConfigError, match="trainable"):
        stage1.check_config(make_config(trainable="encoder"), mesh)
    bigger = make_config(init_from=str(workdir))
    bigger.model.code_dim = 16
    with pytest.raises(ConfigError, match="shape mismatches"):
        stage1.train_and_evaluate(bigger, str(tmp_path / "w"))
