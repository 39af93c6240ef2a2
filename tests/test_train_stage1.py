"""Tests of the stage-1 training program (vitvq.train.stage1 and the shared loop).

- one step on a data x fsdp x tensor mesh of 8 fake devices equals the same step on 1 device,
  with the big matrices really split;
- `train_and_evaluate` end to end on digits, a folder of PNGs and (mocked) TFDS imagenet2012:
  checkpoints at the configured steps, metrics.jsonl at the log steps, eval metrics, images,
  config.json;
- a run preempted part-way and resumed ends bit-identical to an uninterrupted one;
- non-finite steps are skipped, and the run stops after `max_consecutive_nonfinite` of them
  with the last good checkpoint intact.

All runs share one config: runlocal with the discriminator on a data 2 x fsdp 2 x tensor 2
mesh, without LPIPS and R1 (their compiles dominate CPU test time; the full runlocal config,
both included, runs through the CLI in test_main.py). So all runs use the same compiled
programs, kept in a persistent compilation cache that lives as long as this module.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from vitvq import data as data_lib
from vitvq import parallel
from vitvq.checkpoint import Checkpointer
from vitvq.data import records, screen, sources
from vitvq.data.globalize import to_global
from vitvq.train import loop, stage1

REPO = pathlib.Path(__file__).resolve().parents[1]

TOTAL = 6
DISC_START = 3  # the straight and preempted runs' discriminator joins at this step
# Checkpoints every 2 steps, train metrics every 3, evaluation every 4, images every 4; the
# final step always gets all of them.
INTERVALS = dict(
    total_steps=TOTAL,
    checkpoint_every_steps=2,
    keep_checkpoints=5,
    log_every_steps=3,
    eval_every_steps=4,
    image_every_steps=4,
)


def make_config(**overrides):
    """configs/vitvq_small.py:runlocal on a 2x2x2 mesh, GAN on, LPIPS and R1 off, INTERVALS."""
    spec = importlib.util.spec_from_file_location(
        "vitvq_small_config", REPO / "configs" / "vitvq_small.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.loss.perceptual = 0.0
    config.eval_lpips = False
    config.mesh.update(data=2, fsdp=2, tensor=2)
    # No lazy R1: its double backward doubles compile time, and a step with and one without
    # it are two compiled phases. The CLI test runs both phases of the runlocal config.
    config.loss.r1_gamma = 0.0
    for opt in (config.optimizer, config.disc_optimizer):
        opt.warmup_steps = 0  # warmup starts at lr 0: a first step would change nothing
    config.update(INTERVALS)
    config.update(overrides)
    return config


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b, **tolerance):
    """Same structure; leaves equal (bitwise without tolerances, else assert_allclose)."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(host(a))
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(host(b))
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        name = jax.tree_util.keystr(path)
        if tolerance:
            np.testing.assert_allclose(x, y, err_msg=name, **tolerance)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def read_metrics(workdir) -> list[dict]:
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def steps_with(rows, prefix: str) -> list[int]:
    return sorted({r["step"] for r in rows if any(k.startswith(prefix) for k in r)})


def rows_at(rows, step: int) -> dict:
    """The train metrics logged at `step` (one row)."""
    found = [r for r in rows if r["step"] == step and "train/loss/total" in r]
    assert len(found) == 1, step
    return found[0]


def disc_updates(state) -> int:
    """How many updates the discriminator's optimizer has applied."""
    counts = [
        int(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(host(state.disc_opt_state))
        if jax.tree_util.keystr(path).endswith(".count")
    ]
    assert counts and len(set(counts)) == 1, counts
    return counts[0]


def restore(config, workdir, step):
    """Checkpoint `step` of `workdir`, restored onto the mesh `config` describes."""
    trainer = stage1.Stage1(config, parallel.make_mesh(config.mesh))
    abstract, _ = trainer.abstract_state()
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", save_every_steps=1) as ckpt:
        return ckpt.restore(abstract, step)


def checkpoint_steps(workdir) -> list[int]:
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", save_every_steps=1) as ckpt:
        return ckpt.all_steps()


def check_run_outputs(workdir, result, *, total_steps):
    """What every finished run leaves: config, checkpoints, losses, eval metrics, images."""
    workdir = pathlib.Path(workdir)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["total_steps"] == total_steps and saved["trainer"] == "vitvqgan"
    assert total_steps in checkpoint_steps(workdir)
    rows = read_metrics(workdir)
    final = [r for r in rows if r["step"] == total_steps and "train/loss/total" in r]
    assert len(final) == 1
    for key in (
        "train/loss/total",
        "train/loss/l2",
        "train/loss/vq",
        "train/loss/adversarial",
        "train/disc/loss",
        "train/grad_norm",
    ):
        assert np.isfinite(final[0][key]), key
    assert final[0]["train/nonfinite_steps"] == 0
    evals = [r for r in rows if r["step"] == total_steps and "eval/psnr" in r]
    assert len(evals) == 1 and np.isfinite(evals[0]["eval/psnr"])
    assert 0 < evals[0]["eval/codebook_usage"] <= 1
    assert result["psnr"] == pytest.approx(evals[0]["eval/psnr"])
    png = workdir / "images" / f"reconstructions_{total_steps:07d}.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size[1] == 2 * 32 + 2  # originals over reconstructions
    assert list(workdir.glob("events.out.tfevents.*"))


class BatchTap:
    """Wraps data_lib.train_batches: records each step's images, NaN images from a step on."""

    def __init__(self, real):
        self.real = real
        self.seen: dict[int, np.ndarray] = {}
        self.nan_from: int | None = None

    def reset(self, nan_from=None):
        self.seen.clear()
        self.nan_from = nan_from

    def __call__(self, *args, start_step=0, **kwargs):
        for step, batch in enumerate(self.real(*args, start_step=start_step, **kwargs), start_step):
            if self.nan_from is not None and step >= self.nan_from:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            self.seen[step] = batch["image"].copy()
            yield batch


@pytest.fixture(scope="module")
def tap():
    batch_tap = BatchTap(data_lib.train_batches)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_lib, "train_batches", batch_tap)
        yield batch_tap


# --- one step: sharded equals single-device ----------------------------------------------


@pytest.fixture(scope="module")
def step_setup():
    """The step of make_config() on its 2x2x2 mesh and on 1 device, from one initial state."""
    config = make_config()
    layouts = {}
    for name, mesh in (
        ("sharded", parallel.make_mesh(config.mesh)),
        ("single", parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])),
    ):
        trainer = stage1.Stage1(config, mesh)
        _, shardings = trainer.abstract_state()
        layouts[name] = (trainer, shardings, trainer.jit_train_step(shardings))
    state0 = host(layouts["sharded"][0].create_state(config.seed)[0])
    batch = next(
        data_lib.train_batches(
            config.dataset, image_size=config.image_size, global_batch_size=8, seed=0
        )
    )
    return config, layouts, state0, batch


def test_sharded_step_matches_single_device(step_setup):
    _, layouts, state0, batch = step_setup
    results = {}
    for name, (trainer, shardings, train_step) in layouts.items():
        state = jax.device_put(state0, shardings)
        new_state, metrics = train_step(state, to_global(batch, trainer.mesh))
        results[name] = (new_state, host(metrics))

    sharded, single = results["sharded"][0], results["single"][0]
    kernel = sharded.params["enc"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]  # [32, 64]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 32)}
    attn = sharded.params["dec"]["transformer"]["block_0"]["attn"]["query_kernel"]  # [32, 2, 16]
    assert {s.data.shape for s in attn.addressable_shards} == {(16, 1, 16)}
    mu = sharded.opt_state[0][0].mu["enc"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec  # optimizer states split like the params

    m_sharded, m_single = results["sharded"][1], results["single"][1]
    assert m_single["lr"] > 0 and m_single["nonfinite_steps"] == 0
    assert {"loss/adversarial", "disc/loss", "disc/real_logits"} <= set(m_single)
    assert set(m_sharded) == set(m_single)
    for key in m_single:
        np.testing.assert_allclose(m_sharded[key], m_single[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert int(single.step) == int(sharded.step) == 1
    # Adam's first moments are 0.1 x the gradients: this compares the gradients themselves.
    assert_trees_equal(sharded.opt_state, single.opt_state, rtol=1e-4, atol=1e-7)
    assert_trees_equal(sharded.disc_opt_state, single.disc_opt_state, rtol=1e-4, atol=1e-7)
    for part in ("disc_params", "vq_stats"):
        assert_trees_equal(getattr(sharded, part), getattr(single, part), rtol=1e-4, atol=1e-5)
    # The first step fitted the codebook by k-means (10 Lloyd iterations over latents that
    # differ by float rounding): the same codes to 1e-3, every other parameter to 1e-5.
    codebooks = [np.asarray(x.params["quantizer"]["codebook"]) for x in (sharded, single)]
    np.testing.assert_allclose(*codebooks, atol=2e-3)
    unfitted = lambda x: {
        **x.params,
        "quantizer": {"project_down": x.params["quantizer"]["project_down"]},
    }  # noqa: E731
    assert_trees_equal(unfitted(sharded), unfitted(single), rtol=1e-4, atol=1e-5)
    fitted_moved = np.abs(codebooks[1] - np.asarray(state0.params["quantizer"]["codebook"]))
    assert fitted_moved.max() > 0.1  # the k-means init replaced the random codebook
    moved = jax.tree_util.tree_map(
        lambda a, b: np.abs(a - b).max(), host(single.params), state0.params
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step did update the params


def test_nonfinite_batch_skips_the_update(step_setup):
    _, layouts, state0, batch = step_setup
    trainer, shardings, train_step = layouts["single"]
    nan_batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state = jax.device_put(state0, shardings)
    for expected in (1, 2):
        state, metrics = train_step(state, to_global(nan_batch, trainer.mesh))
        assert int(metrics["nonfinite_steps"]) == expected
        assert int(state.nonfinite) == expected and int(state.step) == expected
    before = host(state)
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "vq_stats", "rng"):
        assert_trees_equal(getattr(before, part), getattr(state0, part))
    state, metrics = train_step(state, to_global(batch, trainer.mesh))  # a good step resets
    assert int(state.nonfinite) == 0 and int(metrics["nonfinite_steps"]) == 0
    assert int(state.opt_state[0][0].count) == 1


def with_leaf(tree, path: str, value: float):
    """`tree` with the leaf at `path` (a jax.tree_util.keystr) filled with `value`."""
    paths = []

    def one(key_path, leaf):
        if jax.tree_util.keystr(key_path) != path:
            return leaf
        paths.append(path)
        return np.full_like(leaf, value)

    tree = jax.tree_util.tree_map_with_path(one, tree)
    assert paths, path
    return tree


@pytest.mark.parametrize(
    "path",
    [
        ".opt_state[0][0].mu['dec']['head']['fc2']['bias']",
        ".disc_opt_state[0][0].mu['logit']['bias']",
    ],
    ids=["generator", "discriminator"],
)
def test_overflowing_update_is_skipped(step_setup, path):
    # A first moment near the float32 maximum makes Adam's bias-corrected update overflow
    # (as a huge learning rate would) while the loss and the gradients stay finite.
    _, layouts, state0, batch = step_setup
    trainer, shardings, train_step = layouts["single"]
    start = with_leaf(state0, path, 3e38)
    state, metrics = train_step(jax.device_put(start, shardings), to_global(batch, trainer.mesh))
    metrics = host(metrics)
    assert np.isfinite(metrics["loss/total"]) and np.isfinite(metrics["disc/loss"])
    assert np.isfinite(metrics["grad_norm"]) and np.isfinite(metrics["disc/grad_norm"])
    assert int(state.nonfinite) == 1 and int(state.step) == 1
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "vq_stats"):
        assert_trees_equal(getattr(state, part), getattr(start, part))


# --- end to end, resume, preemption -------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tap):
    """An uninterrupted digits run of TOTAL steps: (config, workdir, result, batches seen).
    The discriminator joins half-way (DISC_START), where the preempted run resumes, with the
    adaptive GAN weight."""
    config = make_config()
    config.loss.disc_start_fraction = DISC_START / TOTAL
    config.loss.adaptive_gan_weight = True
    workdir = tmp_path_factory.mktemp("straight")
    tap.reset()
    result = stage1.train_and_evaluate(config, str(workdir))
    return config, workdir, result, dict(tap.seen)


def test_digits_end_to_end_at_configured_intervals(straight_run):
    config, workdir, result, _ = straight_run
    check_run_outputs(workdir, result, total_steps=TOTAL)
    assert checkpoint_steps(workdir) == [2, 4, 6]
    rows = read_metrics(workdir)
    assert steps_with(rows, "train/") == [3, 6]
    assert steps_with(rows, "eval/") == [4, 6]
    assert sorted(p.name for p in (workdir / "images").glob("*.png")) == [
        "reconstructions_0000004.png",
        "reconstructions_0000006.png",
    ]
    final = restore(config, workdir, TOTAL)
    assert int(final.step) == TOTAL and int(final.opt_state[0][0].count) == TOTAL
    # The discriminator joined at DISC_START (a fraction of total_steps): untouched before,
    # updated at every step from there on.
    fresh = stage1.Stage1(config, parallel.make_mesh(config.mesh)).create_state(config.seed)[0]
    assert_trees_equal(restore(config, workdir, 2).disc_params, fresh.disc_params)
    assert disc_updates(final) == TOTAL - DISC_START
    assert "train/disc/loss" not in rows_at(rows, DISC_START)  # the row of step index 2
    # The adaptive weight's scale, logged once the GAN is on (tests/test_adaptive_gan_weight.py
    # checks its value).
    assert rows_at(rows, TOTAL)["train/loss/adaptive_gan_scale"] > 0
    kernel = final.params["dec"]["transformer"]["block_0"]["mlp"]["fc2"]["kernel"]  # [64, 32]
    assert kernel.sharding.spec == P("tensor", "fsdp")  # restored onto the sharded layout
    assert jax.tree_util.tree_leaves(final.disc_params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host(final.params)))


def test_preempted_run_resumes_to_identical_state(straight_run, tap, tmp_path):
    config, straight_dir, straight_result, straight_batches = straight_run
    workdir = tmp_path / "resumed"

    # Preemption notice at step 3 (not a checkpoint interval): checkpoint 3, then return.
    tap.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 3)
        assert stage1.train_and_evaluate(config, str(workdir)) == {}
    assert checkpoint_steps(workdir) == [2, 3]
    assert max(tap.seen) == 2  # batches of steps 0, 1, 2 were used, no more
    assert max(r["step"] for r in read_metrics(workdir)) == 3
    assert not (workdir / "images").exists()

    at_3 = restore(config, workdir, 3)
    assert int(at_3.step) == 3 and int(at_3.nonfinite) == 0
    assert int(at_3.opt_state[0][0].count) == 3
    assert DISC_START == 3 and disc_updates(at_3) == 0  # the resumed run starts the GAN
    straight_2 = restore(config, straight_dir, 2)
    np.testing.assert_array_equal(host(at_3.rng), host(straight_2.rng))
    assert_trees_equal(restore(config, workdir, 2), straight_2)

    # Resume: the same call again continues from step 3 with the batches of steps 3, 4, 5.
    tap.reset()
    result = stage1.train_and_evaluate(config, str(workdir))
    assert sorted(tap.seen) == [3, 4, 5]
    for step in (3, 4, 5):
        np.testing.assert_array_equal(tap.seen[step], straight_batches[step])
    assert_trees_equal(restore(config, workdir, TOTAL), restore(config, straight_dir, TOTAL))
    assert result == straight_result
    resumed_rows = {(r["step"], k): v for r in read_metrics(workdir) for k, v in r.items()}
    for row in read_metrics(straight_dir):
        for key, value in row.items():
            if key.startswith(("train/loss", "train/grad_norm", "eval/")):
                assert resumed_rows[(row["step"], key)] == value, (row["step"], key)


def test_finished_workdir_only_evaluates(straight_run, tap):
    config, workdir, result, _ = straight_run
    tap.reset()
    assert stage1.train_and_evaluate(config, str(workdir)) == result
    assert not tap.seen  # no training batch was read
    assert checkpoint_steps(workdir) == [2, 4, 6]


@pytest.fixture
def image_folder(tmp_path):
    """Real PNG crops of two bundled photos, one class subfolder each."""
    root = tmp_path / "images"
    for name in ("chelsea", "coffee"):
        photo = sources.load_photo(name)
        (root / name).mkdir(parents=True)
        for k in range(6):
            crop = photo[30 * k : 30 * k + 48, 40 * k : 40 * k + 40]
            Image.fromarray(crop).save(root / name / f"{k}.png")
    return root


def test_folder_end_to_end(image_folder, tmp_path, monkeypatch):
    # Two unreadable training files (vitvq.data.screen): skipped, counted, training goes on.
    (image_folder / "chelsea" / "broken.jpg").write_bytes(b"")
    (image_folder / "coffee" / "notes.png").write_text("not an image")
    screen.forget_unreadable()
    config = make_config()
    config.dataset.update(name="folder", path=str(image_folder), num_classes=2)
    scans = []  # the folder is listed once for the whole run, evaluations included
    real_scan = records._scan
    monkeypatch.setattr(records, "_scan", lambda *a: scans.append(a[0]) or real_scan(*a))
    result = stage1.train_and_evaluate(config, str(tmp_path / "run"))
    assert scans == [str(image_folder)]
    check_run_outputs(tmp_path / "run", result, total_steps=TOTAL)
    assert sorted(pathlib.Path(p).name for p in screen.unreadable_records()) == [
        "broken.jpg",
        "notes.png",
    ]
    final = [r for r in read_metrics(tmp_path / "run") if "data/skipped_images" in r][-1]
    assert final["step"] == TOTAL and final["data/skipped_images"] == 2


def test_tfds_imagenet_end_to_end(tmp_path):
    import tensorflow_datasets as tfds

    config = make_config()
    config.dataset.update(name="tfds", tfds_name="imagenet2012", num_classes=1000)
    with tfds.testing.mock_data(num_examples=16):
        result = stage1.train_and_evaluate(config, str(tmp_path / "run"))
    check_run_outputs(tmp_path / "run", result, total_steps=TOTAL)


# --- non-finite losses stop the run -------------------------------------------------------


def test_nan_batches_stop_the_run_keeping_the_last_good_checkpoint(tap, tmp_path):
    # Steps 1-2 are good; from step 3 the images are NaN, so updates are skipped; the second
    # skipped step in a row stops the run (it notices one step late: metrics are fetched late).
    config = make_config(max_consecutive_nonfinite=2)
    workdir = tmp_path / "run"
    tap.reset(nan_from=2)
    try:
        with pytest.raises(loop.TrainingStopped, match="stopped at step 4: 2 consecutive"):
            stage1.train_and_evaluate(config, str(workdir))
    finally:
        tap.reset()
    assert checkpoint_steps(workdir) == [2, 4]
    good = restore(config, workdir, 2)
    latest = restore(config, workdir, 4)  # readable, finite, and the last good parameters
    assert int(latest.step) == 4 and int(latest.nonfinite) == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host(latest)))
    for part in ("params", "opt_state", "disc_params", "disc_opt_state", "vq_stats", "rng"):
        assert_trees_equal(getattr(latest, part), getattr(good, part))
    (row,) = [r for r in read_metrics(workdir) if "train/nonfinite_steps" in r]
    assert row["step"] == 3 and row["train/nonfinite_steps"] == 1
    assert row["train/skipped_steps"] == 1 and int(latest.skipped) == 2
    assert row["train/loss/total"] == "nan"


def test_loop_stops_on_nonfinite_and_returns_on_preemption_without_a_device(tmp_path):
    """The loop's bookkeeping with a stand-in step: message, log steps, preemption exit."""

    class State:
        def __init__(self, step, nonfinite):
            self.step, self.nonfinite = np.int32(step), nonfinite

    def step_fn(state, batch, step):
        assert step == int(state.step)
        bad = bool(np.isnan(np.asarray(batch["image"])).any())
        nonfinite = state.nonfinite + 1 if bad else 0
        new = State(int(state.step) + 1, nonfinite)
        return new, {"loss": np.float32(np.nan if bad else 1.0), "nonfinite_steps": nonfinite}

    def batches(bad_from):
        def make(start):
            step = start
            while True:
                value = np.nan if step >= bad_from else 0.0
                yield {"image": np.full((8, 1), value, np.float32)}
                step += 1

        return make

    class FakeCheckpointer:
        def __init__(self, preempt_at=None):
            self.saved, self.preempt_at = [], preempt_at

        def save(self, step, state, force=False):
            self.saved.append(step)

        def reached_preemption(self, step):
            return step == self.preempt_at

        def wait(self):
            pass

    class Writer:
        def __init__(self):
            self.rows = []

        def write_scalars(self, step, scalars):
            self.rows.append((step, sorted(scalars)))

        def flush(self):
            pass

    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    settings = loop.LoopSettings(
        total_steps=10,
        log_every_steps=4,
        eval_every_steps=100,
        image_every_steps=100,
        checkpoint_every_steps=3,
        max_consecutive_nonfinite=2,
    )
    ckpt, writer = FakeCheckpointer(), Writer()
    loop.run(loop.Task(State(0, 0), step_fn, batches(10**9), mesh), settings, ckpt, writer)
    assert ckpt.saved == [3, 6, 9, 10]
    assert [s for s, keys in writer.rows if "train/loss" in keys] == [4, 8, 10]

    ckpt = FakeCheckpointer(preempt_at=5)
    loop.run(loop.Task(State(0, 0), step_fn, batches(10**9), mesh), settings, ckpt, Writer())
    assert ckpt.saved == [3, 5]

    ckpt = FakeCheckpointer()
    with pytest.raises(loop.TrainingStopped, match="stopped at step 7"):
        loop.run(loop.Task(State(0, 0), step_fn, batches(5), mesh), settings, ckpt, Writer())
    assert ckpt.saved == [3, 6]
