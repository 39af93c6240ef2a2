"""Workdirs and bundles at URLs (gs://bucket/run on TPU pods), tested on stand-ins for GCS.

There is no GCS here: `remote_fs` routes `ram://` through the code paths gs:// takes (epath's
tf.io.gfile backend; orbax's GCS handling). What cannot run here: the GCS transport itself
(TensorStore's gcs driver, tf.io.gfile's GCS client) and orbax's google-cloud-storage calls.
"""

import importlib.util
import io
import json
import os
import pathlib
import types

import jax
import numpy as np
import pytest
import remote_fs
from PIL import Image

from vitvq import bundle, paths
from vitvq.checkpoint import Checkpointer
from vitvq.errors import BundleError, ConfigError
from vitvq.pictures import save_png
from vitvq.train import restore, runner, stage1, writers

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(tmp_path) -> str:
    """A `ram://` bucket of this test alone (TensorFlow's RAM filesystem lives as long as the
    process)."""
    return f"ram://{tmp_path.name}"


# --- the path helper ---------------------------------------------------------------------


def test_urls_stay_as_given_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
    assert paths.absolute("gs://bucket/run/") == "gs://bucket/run/"
    assert paths.absolute("runs/demo") == str(tmp_path / "runs" / "demo")
    assert paths.absolute(pathlib.Path("runs")) == str(tmp_path / "runs")
    assert paths.absolute("/abs/x") == "/abs/x"
    assert paths.is_url("gs://b/x") and not paths.is_url("runs/gs:/b")
    assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert paths.join("runs/demo", "config.json") == str(tmp_path / "runs/demo/config.json")
    assert os.fspath(paths.as_path("gs://bucket/run")) == "gs://bucket/run"


def test_unknown_url_scheme_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nope:// are not supported"):
        paths.as_path("nope://bucket/run")
    with pytest.raises(ConfigError, match="not supported"):
        runner.prepare_workdir(_config(), "nope://bucket/run")
    assert not list(tmp_path.iterdir())  # no local "nope:" directory


def test_local_writes_replace_whole_files_with_usual_permissions(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "config.json"
    paths.write_text(target, "old")
    paths.write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["config.json"]  # no temporary file left behind
    with monkeypatch.context() as m:  # a crash before the rename keeps the old file whole

        def crash(*args):
            raise OSError("disk full")

        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            paths.write_text(target, "torn")
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["config.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600
    paths.append_text(tmp_path / "new" / "rows.jsonl", "a\n")
    paths.append_text(tmp_path / "new" / "rows.jsonl", "b\n")
    assert (tmp_path / "new" / "rows.jsonl").read_text() == "a\nb\n"


def test_checkpointer_passes_gcs_urls_to_orbax_unchanged(monkeypatch):
    import orbax.checkpoint as ocp

    from vitvq import checkpoint

    if not _has_gcs_client():  # then a gs:// checkpoint directory is refused up front
        with pytest.raises(ConfigError, match="google-cloud-storage"):
            Checkpointer("gs://bucket/run/checkpoints", save_every_steps=1)
    seen = []
    monkeypatch.setattr(checkpoint, "_check_gcs_support", lambda directory: None)

    def manager(directory, **kw):
        seen.append(directory)
        return types.SimpleNamespace()  # the Checkpointer routes its preemption checks here

    monkeypatch.setattr(ocp, "CheckpointManager", manager)
    ckpt = Checkpointer("gs://bucket/run/checkpoints", save_every_steps=1)
    assert ckpt.directory == "gs://bucket/run/checkpoints"
    assert seen == ["gs://bucket/run/checkpoints"]
    Checkpointer("relative/checkpoints", save_every_steps=1)
    assert seen[-1] == os.path.abspath("relative/checkpoints")


def _has_gcs_client() -> bool:
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        return False
    return True


# --- workdir files on TensorFlow's RAM filesystem (tf.io.gfile, as for gs://) --------------


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("small", REPO / "configs" / "vitvq_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.update(overrides)
    return config


def _ram_read(url: str, mode: str = "r"):
    import tensorflow as tf

    with tf.io.gfile.GFile(url, mode) as f:
        return f.read()


def test_workdir_files_on_a_url(tmp_path, monkeypatch, bucket):
    """config.json, metrics.jsonl, PNGs and TensorBoard events at a URL, through tf.io.gfile."""
    RUN = f"{bucket}/run"
    remote_fs.tf_ram(monkeypatch)
    monkeypatch.chdir(tmp_path)
    config = _config()
    runner.prepare_workdir(config, RUN)
    runner.prepare_workdir(config, RUN)  # a resumed run writes it again: replaced, not appended
    assert json.loads(_ram_read(f"{RUN}/config.json"))["total_steps"] == config.total_steps
    assert restore.load_workdir_config(RUN).total_steps == config.total_steps

    writer = writers.create_writer(RUN)
    writer.write_scalars(2, {"train/loss": 1.5})
    writer.write_scalars(4, {"train/loss": np.float32(0.5), "eval/psnr": float("nan")})
    writer.flush()
    writer.close()
    rows = [json.loads(line) for line in _ram_read(f"{RUN}/metrics.jsonl").splitlines()]
    assert rows == [
        {"step": 2, "train/loss": 1.5},
        {"step": 4, "train/loss": 0.5, "eval/psnr": "nan"},
    ]
    tree = remote_fs.ram_tree(RUN)
    assert any(name.startswith("events.out.tfevents.") for name in tree[RUN])

    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    save_png(f"{RUN}/images/a.png", np.zeros_like(image))
    save_png(f"{RUN}/images/a.png", image)
    with Image.open(io.BytesIO(_ram_read(f"{RUN}/images/a.png", "rb"))) as png:
        np.testing.assert_array_equal(np.asarray(png), image)
    assert remote_fs.ram_tree(f"{RUN}/images") == {f"{RUN}/images": ["a.png"]}
    assert not list(tmp_path.iterdir())  # nothing went to a local "ram:" directory


def test_bundle_at_a_url(tmp_path, monkeypatch, bucket):
    """A bundle written to and read from a URL: in place, bundle.json last, hashes checked."""
    from bundle_helpers import TINY_MODEL, tiny_variables

    remote_fs.tf_ram(monkeypatch)
    monkeypatch.chdir(tmp_path)
    url = f"{bucket}/bundles/tok"
    _, variables = tiny_variables()

    def write(params, **kw):
        return bundle.write_bundle(
            url,
            tokenizer={"model": TINY_MODEL, "image_size": 32, "step": 7},
            tokenizer_params=params,
            tokenizer_stats=variables["vq_stats"],
            **kw,
        )

    assert os.fspath(write(variables["params"])) == url
    assert sorted(remote_fs.ram_tree(url)[url]) == [bundle.BUNDLE_JSON, bundle.TOKENIZER_FILE]
    manifest, _, loaded = bundle.load_tokenizer_variables(url)
    assert manifest["tokenizer"]["step"] == 7
    codebook = variables["params"]["quantizer"]["codebook"]
    np.testing.assert_array_equal(loaded["params"]["quantizer"]["codebook"], codebook)
    assert restore.read_generator(url)["kind"] == "bundle"
    with pytest.raises(BundleError, match="already exists"):
        write(variables["params"])
    write(jax.tree_util.tree_map(lambda x: np.asarray(x) + 1, variables["params"]), overwrite=True)
    _, _, again = bundle.load_tokenizer_variables(url)
    np.testing.assert_allclose(again["params"]["quantizer"]["codebook"], np.asarray(codebook) + 1)
    paths.write_bytes(f"{url}/{bundle.TOKENIZER_FILE}", b"damaged")
    with pytest.raises(BundleError, match="corrupt"):
        bundle.load_tokenizer_variables(url)
    assert not list(tmp_path.iterdir())


# --- a whole run: train, resume, read back, export -----------------------------------------


def test_train_resume_and_export_from_a_url_workdir(tmp_path, monkeypatch, capsys, bucket):
    """Stage 1 with --workdir=ram://bucket/run (orbax in its GCS mode), then a resume."""
    RUN = f"{bucket}/run"
    store = tmp_path / "store"
    remote_fs.mirrored_remote(monkeypatch, store)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = _config(
        total_steps=2,
        log_every_steps=1,
        eval_every_steps=2,
        image_every_steps=2,
        checkpoint_every_steps=1,
        keep_checkpoints=1,  # step 1 is deleted once step 2 is saved: orbax's GCS rmtree
        eval_num_examples=8,
    )
    # What makes compiles slow and is not under test here: LPIPS and the GAN.
    config.loss.perceptual = 0.0
    config.eval_lpips = False
    config.loss.adversarial = 0.0
    stage1.train_and_evaluate(config, RUN)
    local_run = store / tmp_path.name / "run"
    assert json.loads((local_run / "config.json").read_text())["total_steps"] == 2
    with Checkpointer(f"{RUN}/checkpoints", save_every_steps=1, read_only=True) as ckpt:
        assert ckpt.all_steps() == [2]
    # orbax's GCS protocol: committed by a marker file, never renamed from a temporary name
    assert (local_run / "checkpoints" / "2" / "commit_success.txt").exists()

    with config.unlocked():
        config.total_steps = 3
    capsys.readouterr()
    stage1.train_and_evaluate(config, RUN)
    assert "Resumed from the checkpoint of step 2" in capsys.readouterr().out  # the console
    rows = [json.loads(line) for line in paths.read_text(f"{RUN}/metrics.jsonl").splitlines()]
    trained = [r["step"] for r in rows if "train/loss/total" in r]
    assert trained == [1, 2, 3]  # the resumed run continued at step 3, appending
    assert all(np.isfinite(r["train/loss/total"]) for r in rows if "train/loss/total" in r)
    assert (local_run / "images" / "reconstructions_0000002.png").exists()
    events = remote_fs.ram_tree(RUN)[RUN]  # clu's TensorBoard writer: tf.io.gfile itself
    assert sum(name.startswith("events.out.tfevents.") for name in events) == 2

    generator = restore.read_generator(RUN)
    assert generator["kind"] == "checkpoint" and generator["step"] == 3
    from vitvq.export import export

    export(RUN, f"{bucket}/bundle")
    assert bundle.read_manifest(f"{bucket}/bundle")["tokenizer"]["source"] == RUN
    assert not list(cwd.iterdir())  # nothing went to a local "ram:" directory
    assert jax.process_count() == 1
