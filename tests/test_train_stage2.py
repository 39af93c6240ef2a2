"""Stage 2: the VIM step (sharded equals single-device), the trainer end to end, export of a
tokenizer + VIM bundle, `vitvq.load_sampler`, `python -m vitvq.sample`, the linear probe.

The tokenizer is a tiny fresh-init ViT-VQGAN (tests/bundle_helpers.py): stage 2 only needs
its codes, not good ones.
"""

import copy
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from bundle_helpers import make_tokenizer_bundle
from cli_helpers import run_module
from PIL import Image

import vitvq
from vitvq import bundle, parallel
from vitvq import data as data_lib
from vitvq.data.globalize import to_global
from vitvq.errors import BundleError, ConfigError, InputError
from vitvq.export import export
from vitvq.train import restore, stage1, stage2

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def tok_workdir(tmp_path_factory):
    """A tiny stage-1 run (2 steps) and its bundle: the tokenizer stage 2 trains on."""
    workdir = tmp_path_factory.mktemp("tok")
    config = load_config("vitvq_small", "runlocal")
    config.loss.perceptual = 0.0
    config.loss.adversarial = 0.0
    config.eval_lpips = False
    config.update(total_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
    config.update(image_every_steps=2, log_every_steps=2)
    stage1.train_and_evaluate(config, str(workdir))
    out = export(str(workdir), str(workdir / "bundle"))
    return workdir, out


def make_config(tok_bundle, **overrides):
    config = load_config("vim_base", "runlocal")
    if tok_bundle is not None:
        config.tokenizer_bundle = str(tok_bundle)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.update(overrides)
    return config


def test_step_on_8_devices_matches_1_device(tok_workdir):
    _, tok_bundle = tok_workdir
    config = make_config(tok_bundle)
    tok = stage2.load_frozen_tokenizer(str(tok_bundle))
    batch = next(data_lib.train_batches(config.dataset, image_size=32, global_batch_size=8, seed=0))
    results = []
    for mesh in (
        parallel.make_mesh(config.mesh),
        parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]),
    ):
        trainer = stage2.Stage2(config, mesh, tokenizer=tok)
        state, shardings = trainer.create_state(0)
        step = trainer.jit_train_step(shardings)
        state, metrics = step(state, to_global(batch, mesh))
        results.append(jax.tree_util.tree_map(np.asarray, jax.device_get((state, metrics))))
    (state8, m8), (state1, m1) = results
    assert np.isfinite(m8["loss"]) and m8["loss"] > 0
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["accuracy"], m1["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(m8["bits_per_token"], m8["loss"] / np.log(2), rtol=1e-6)
    leaves8, leaves1 = (jax.tree_util.tree_leaves(s.params) for s in (state8, state1))
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    # Adam's first update is about lr * g / |g| = +-1e-3 per element, whatever |g|: for the
    # few parameters whose gradient is at float-noise level (~1e-9) the summation order of
    # the sharded step changes it by up to ~5e-5, 5% of a real update.
    for a, b in zip(leaves8, leaves1, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_uncond_variant_trains_without_labels(tok_workdir):
    """configs/vim_base.py:uncond builds an unconditional VIM: no class slot, and a step's
    loss does not depend on the labels the data carries."""
    _, tok_bundle = tok_workdir
    config = load_config("vim_base", "uncond,runlocal")
    config.tokenizer_bundle = str(tok_bundle)
    tok = stage2.load_frozen_tokenizer(str(tok_bundle))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = stage2.Stage2(config, mesh, tokenizer=tok)
    assert not trainer.model.conditional and trainer.num_classes == 0
    batch = next(data_lib.train_batches(config.dataset, image_size=32, global_batch_size=8, seed=0))
    step, losses = None, []
    for labels in (batch["label"], (batch["label"] + 3) % 10):
        state, shardings = trainer.create_state(0)  # the step donates the state
        step = step or trainer.jit_train_step(shardings)
        _, metrics = step(state, to_global({**batch, "label": labels}, mesh))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses[0]) and losses[0] == losses[1]


def test_nonfinite_step_changes_nothing_but_the_counters(tok_workdir):
    """Stage 2's guard (global norms, as stage 1's): a NaN in one parameter makes the loss
    and gradients non-finite; the step then keeps every parameter and optimizer value and
    counts the step as skipped; the next finite step resets the consecutive count."""
    _, tok_bundle = tok_workdir
    config = make_config(tok_bundle)
    tok = stage2.load_frozen_tokenizer(str(tok_bundle))
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = stage2.Stage2(config, mesh, tokenizer=tok)
    batch = next(data_lib.train_batches(config.dataset, image_size=32, global_batch_size=8, seed=0))
    state, shardings = trainer.create_state(0)
    step = trainer.jit_train_step(shardings)
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    poisoned = [np.array(x) for x in leaves]
    poisoned[0].flat[0] = np.nan
    bad = state.replace(params=jax.tree_util.tree_unflatten(treedef, poisoned))
    bad = jax.device_put(bad, shardings)
    before = jax.tree_util.tree_map(np.asarray, jax.device_get((bad.params, bad.opt_state)))
    after, metrics = step(bad, to_global(batch, mesh))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite_steps"]) == 1 and int(metrics["skipped_steps"]) == 1
    assert int(after.step) == 1
    now = jax.tree_util.tree_map(np.asarray, jax.device_get((after.params, after.opt_state)))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(now), strict=True):
        np.testing.assert_array_equal(a, b)  # NaN compares equal to NaN here
    # A finite state again: the consecutive count resets, the skipped count stays.
    clean = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    fixed = after.replace(params=jax.device_put(clean, shardings.params))
    _, metrics = step(fixed, to_global(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert int(metrics["nonfinite_steps"]) == 0 and int(metrics["skipped_steps"]) == 1


@pytest.fixture(scope="module")
def vim_run(tok_workdir, tmp_path_factory):
    _, tok_bundle = tok_workdir
    workdir = tmp_path_factory.mktemp("vim")
    config = make_config(tok_bundle)
    result = stage2.train_and_evaluate(config, str(workdir))
    return config, workdir, result


def test_stage2_end_to_end(vim_run):
    config, workdir, result = vim_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["step"] == config.total_steps and "train/loss" in r]
    assert len(final) == 1
    for key in ("train/loss", "train/bits_per_token", "train/accuracy", "train/lr"):
        assert np.isfinite(final[0][key]), key
    assert {"loss", "bits_per_token", "accuracy"} <= set(result)
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    png = workdir / "images" / f"samples_{config.total_steps:07d}.png"
    with Image.open(png) as image:  # 10 class rows of 2 samples, 32x32 each, 2-pixel gaps
        assert image.size == (2 * 32 + 2, 10 * 34 - 2)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["trainer"] == "vim"


def test_export_tokenizer_and_vim_and_sample(tok_workdir, vim_run, tmp_path):
    tok_dir, _ = tok_workdir
    config, vim_dir, _ = vim_run
    out = export(str(tok_dir), str(tmp_path / "both"), vim_workdir=str(vim_dir))
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["vim"]["num_classes"] == 10 and manifest["vim"]["vocab_size"] == 64
    assert manifest["classes"]["names"] == [str(i) for i in range(10)]
    sampler = vitvq.load_sampler(out)
    images = sampler.sample(4, class_labels=[0, 1, 2, 3], seed=3)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, sampler.sample(4, class_labels=[0, 1, 2, 3], seed=3))
    # Split over 8 devices (8 samples) or run on one: the same samples.
    one = vitvq.load_sampler(out, devices=jax.devices()[:1])
    np.testing.assert_array_equal(
        sampler.sample_codes(8, class_labels=list(range(8)), seed=1),
        one.sample_codes(8, class_labels=list(range(8)), seed=1),
    )
    codes = sampler.sample_codes(4, class_labels=5, top_k=1, seed=0)
    np.testing.assert_array_equal(codes, sampler.sample_codes(4, class_labels=5, top_k=1, seed=9))
    with pytest.raises(InputError, match="class labels must be in"):
        sampler.sample(2, class_labels=[0, 10])
    with pytest.raises(InputError, match="num_samples"):
        sampler.sample(0)
    # A tokenizer bundle has no VIM.
    with pytest.raises(BundleError, match="no VIM"):
        vitvq.load_sampler(tok_dir / "bundle")
    # A VIM trained on another tokenizer is refused at export.
    other, _ = make_tokenizer_bundle(tmp_path / "other", seed=5)
    mismatched = vim_dir / "config.json"
    saved = mismatched.read_text()
    try:
        data = json.loads(saved)
        data["tokenizer_bundle"] = str(other)
        mismatched.write_text(json.dumps(data))
        with pytest.raises(ConfigError, match="codebook differs"):
            export(str(tok_dir), str(tmp_path / "bad"), vim_workdir=str(vim_dir))
    finally:
        mismatched.write_text(saved)


def _sample_cli(*args):
    return run_module("vitvq.sample", *args, timeout=300)


def test_sample_cli(tok_workdir, vim_run, tmp_path):
    tok_dir, _ = tok_workdir
    _, vim_dir, _ = vim_run
    out = export(str(tok_dir), str(tmp_path / "b"), vim_workdir=str(vim_dir))
    png = tmp_path / "grid.png"
    proc = _sample_cli(f"--bundle={out}", "--num_samples=3", f"--output={png}", "--top_k=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(png) as image:
        width, height = image.size  # one row per class, named in a margin on the left
        assert height == 10 * 34 - 2 and 3 * 34 - 2 + 8 <= width <= 3 * 34 - 2 + 40
    for bad, message in (
        ("--temperature=-1", "temperature"),
        ("--top_p=0", "top_p"),
        ("--class_label=12", "class"),
        ("--class_label=x", "--class_label"),
        ("--num_samples=0", "num_samples"),
        ("--acceptance_rate=1.5", "acceptance_rate must be in (0, 1]"),
    ):
        proc = _sample_cli(f"--bundle={out}", f"--output={tmp_path}/x.png", bad)
        assert proc.returncode == 2, (bad, proc.stderr[-1000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last, (bad, last)
        assert "Traceback" not in proc.stderr


def test_stage2_config_errors(tok_workdir, tmp_path):
    _, tok_bundle = tok_workdir
    mesh = parallel.make_mesh(make_config(tok_bundle).mesh)
    with pytest.raises(ConfigError, match="tokenizer_bundle is required"):
        stage2.check_config(make_config(None), mesh)
    config = make_config(tok_bundle, image_size=64)
    with pytest.raises(ConfigError, match="image_size=64"):
        stage2.Stage2(config, mesh)
    with pytest.raises(BundleError, match="does not exist"):
        stage2.Stage2(make_config(tmp_path / "nope"), mesh)


def test_linear_probe_runs_and_compares_with_pixels(tok_workdir, vim_run, tmp_path):
    from vitvq.data import sources
    from vitvq.evaluation import linear_probe

    tok_dir, _ = tok_workdir
    _, vim_dir, _ = vim_run
    out = export(str(tok_dir), str(tmp_path / "b"), vim_workdir=str(vim_dir))
    sampler = vitvq.load_sampler(out)
    digits = sources.load_digits(32)
    train_x = np.stack(digits.train.images[:200])
    test_x = np.stack(digits.eval.images[:100])
    train_y, test_y = digits.train.labels[:200], digits.eval.labels[:100]
    vim = linear_probe.vim_probe(sampler, train_x, train_y, test_x, test_y, block=1)
    pixels = linear_probe.pixel_probe(train_x, train_y, test_x, test_y)
    assert 0.0 <= vim["top1"] <= 1.0 and vim["num_test"] == 100
    assert pixels["top1"] > 0.7  # raw pixels already separate digits well
    feats = linear_probe.vim_features(sampler, test_x[:5], block=2)
    assert feats.shape == (5, 32) and np.all(np.isfinite(feats))


def test_probe_block_is_the_papers_for_its_sizes():
    from vitvq.evaluation import linear_probe
    from vitvq.models.vim import VIM_PRESETS

    assert linear_probe.probe_block(VIM_PRESETS["base"].depth) == 10
    assert linear_probe.probe_block(VIM_PRESETS["large"].depth) == 15
    assert [linear_probe.probe_block(d) for d in (1, 2, 4, 8)] == [1, 1, 2, 4]


def _photo_folder(folder):
    from vitvq.data import sources

    folder.mkdir()
    photo = sources.load_photo("astronaut")
    for k in range(8):
        Image.fromarray(photo[40 * k : 40 * k + 96, 40 * k : 40 * k + 96]).save(folder / f"{k}.png")
    return folder


def test_vim_continues_from_a_workdir_on_a_folder_dataset_and_resumes(vim_run, tmp_path):
    """init_from a stage-2 workdir, training on another (unlabelled) folder dataset: the
    shared weights start as the source's, the class embedding it no longer needs is left
    out; a rerun of the same command resumes from its own checkpoint, not from init_from."""
    from vitvq.checkpoint import Checkpointer

    config, vim_dir, _ = vim_run
    source, _ = restore.read_checkpoint(vim_dir)
    ft = copy.deepcopy(config)
    ft.init_from = str(vim_dir)
    ft.dataset.update(name="folder", path=str(_photo_folder(tmp_path / "imgs")), num_classes=0)
    ft.optimizer.update(lr=1e-12, end_lr=1e-12)  # the first step barely moves the weights
    ft.update(total_steps=1, checkpoint_every_steps=1, eval_every_steps=1, image_every_steps=1)
    ft.update(eval_num_examples=0)
    workdir = tmp_path / "ft"
    stage2.train_and_evaluate(ft, str(workdir))
    trainer = stage2.Stage2(ft, parallel.make_mesh(ft.mesh))
    assert not trainer.model.conditional
    abstract, _ = trainer.abstract_state()
    with Checkpointer(workdir / "checkpoints", save_every_steps=1) as ckpt:
        new = ckpt.restore(abstract, 1)
    got = bundle.flatten_tree(jax.device_get(new.params))
    want = bundle.flatten_tree(jax.device_get(source["params"]))
    # Unconditional now: a fresh start embedding replaces the class embedding.
    assert set(got) - set(want) == {"start_embedding"}
    assert set(want) - set(got) == {"class_embedding"}
    for k in set(got) & set(want):
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)
    # Resume: 2 steps now; the run continues from its step-1 checkpoint.
    ft.update(total_steps=2)
    stage2.train_and_evaluate(ft, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # step 1 not redone


def test_vim_init_from_errors(tok_workdir, vim_run, tmp_path):
    """Refused before any compile: another tokenizer's VIM, a tokenizer-only bundle, a stage-1
    workdir, a missing path."""
    tok_dir, tok_bundle = tok_workdir
    config, vim_dir, _ = vim_run
    other, _ = make_tokenizer_bundle(tmp_path / "other_tok", seed=5)
    cases = (
        (str(other), str(vim_dir), "codebook"),
        (str(tok_bundle), str(tok_bundle), "without a VIM"),
        (str(tok_bundle), str(tok_dir), "'vitvqgan' run"),
        (str(tok_bundle), str(tmp_path / "nope"), "does not exist"),
    )
    for i, (tokenizer, init_from, message) in enumerate(cases):
        bad = copy.deepcopy(config)
        bad.update(tokenizer_bundle=tokenizer, init_from=init_from)
        with pytest.raises(ConfigError, match=message):
            stage2.train_and_evaluate(bad, str(tmp_path / f"w{i}"))
        assert not (tmp_path / f"w{i}" / "checkpoints").exists() or not any(
            (tmp_path / f"w{i}" / "checkpoints").iterdir()
        )
