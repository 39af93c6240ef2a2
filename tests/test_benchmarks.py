"""Tests of the benchmark scripts in benchmarks/ (run as users run them; timings never asserted).

- `gpu_suite.sh --smoke` runs train_step.py (stage 1 and stage 2), sample.py and
  code_search.py on tiny presets with TensorFlow, ml_collections and clu blocked (as on a bare
  accelerator machine): every JSON has its keys with sane values, and the table is printed;
- the presets build the step the trainers compile: same state (structure, shapes, dtypes,
  shardings) and the same FLOPs as `Stage1`/`Stage2` for the same config, and the hand count
  is within a few tens of percent of XLA's count;
- input.py reads generated JPEGs through the folder and TFDS paths;
- `--config.KEY=VALUE` overrides are typed like the values they replace, on config files and
  on presets: the tiny preset runs with every quantizer kind, whose hand count matches XLA's;
- `bash -n` and shellcheck pass on gpu_suite.sh.
"""

import argparse
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: a bare accelerator machine lacks it")
sys.meta_path.insert(0, _Block())
"""


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(blocked_dir=None):
    """The environment of a benchmark subprocess: one CPU device (no fake devices)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if blocked_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked_dir), env.get("PYTHONPATH")]))
    return env


def _bench(script, *args, cwd, timeout=300):
    """`python benchmarks/SCRIPT.py ARGS` in `cwd` on one CPU device; the finished process."""
    return subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def _positive(result, *keys):
    for key in keys:
        value = result[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)


def test_gpu_suite_smoke_without_tf_ml_collections_clu(tmp_path):
    blocked = tmp_path / "site"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(BLOCKER)
    # The blocker works: the benchmarks really run without these modules.
    probe = subprocess.run(
        [sys.executable, "-c", "import ml_collections"],
        env=_env(blocked),
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "blocked" in probe.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_suite.sh"), "--smoke"],
        env={**_env(blocked), "OUT": str(out), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (out / "table.md").read_text()
    assert proc.stdout.rstrip().endswith(f"results: {out}")
    assert table.splitlines()[0].startswith("| benchmark |") and "failed" not in table

    for name, stage in (("stage1_ss", 1), ("vim_base", 2)):
        r = json.loads((out / f"{name}.json").read_text())
        assert r["stage"] == stage and r["platform"] == "cpu" and r["batch"] == 4
        _positive(
            r,
            "images_per_sec",
            "flops_per_step",
            "flops_per_step_hand",
            "achieved_flops_per_sec",
            "peak_flops_per_sec",
            "mfu",
            "peak_memory_bytes",
            "max_rss_bytes",
        )
        assert 0 < r["mfu"] < 1.5 and 0 < r["mfu_hand"] < 1.5
        assert r["flops_source"] == "cost_analysis"
        # XLA also counts elementwise work and the optimizer: a little above the hand count.
        assert 0.9 < r["flops_ratio_cost_to_hand"] < 1.5
        assert r["peak_matmul"] == "2048^3 float32" and math.isfinite(r["loss"])
        assert r["memory_analysis_bytes"]["peak_estimate"] == r["peak_memory_bytes"]

    s = json.loads((out / "sample_vim_base.json").read_text())
    _positive(s, "tokens_per_sec", "bandwidth_bytes_per_sec", "bytes_per_step")
    c = json.loads((out / "code_search.json").read_text())
    assert c["same_indices"]
    assert c["chunked"]["holds_full_matrix"] is False and c["unchunked"]["holds_full_matrix"]
    _positive(c, "chunked_ms", "unchunked_ms", "chunked_temp_bytes", "unchunked_temp_bytes")


def _trees_match(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding)


def _config(name, arg=None):
    """The ConfigDict of configs/NAME (what the trainers take)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_stage1_benchmark_builds_the_trainers_step():
    """With the GAN and the EMA on (LPIPS off: its weights load slowly), on 8 devices."""
    from vitvq import parallel
    from vitvq.train.stage1_build import Stage1

    ts = _load("train_step")
    config = _config("vitvq_small.py", "runlocal")
    config.loss.perceptual = 0.0
    config.eval_lpips = False
    config.ema_decay = 0.999
    # The benchmark times the steady-state step, compiled without the one-off k-means fit of
    # the first update (XLA's cost analysis would count that cond branch in every step);
    # the trainer's program is the same once the fit is off.
    config.codebook_init.kind = "normal"
    mesh = parallel.make_mesh(config.mesh)
    trainer = Stage1(config, mesh)
    abstract, shardings = trainer.abstract_state()
    build = ts.build_stage1(config.to_dict(), mesh, None)
    info = build[4]
    assert info["phase"] == {"perceptual_on": False, "gan_on": True, "r1_now": False}
    size = config.image_size
    batch = {
        "image": jax.ShapeDtypeStruct(
            (8, size, size, 3), jnp.float32, sharding=parallel.batch_sharding(mesh)
        )
    }
    init_state, step_fn, extra, hand, info = build
    ours, our_shardings = parallel.abstract_state(init_state, mesh, trainer.rules)
    _trees_match(abstract, ours)
    with parallel.use_mesh(mesh, trainer.rules):
        jitted = trainer.train_step_jit(shardings, info["phase_step"])
        theirs = jitted.lower(abstract, batch, trainer.train_perceptual)
        mine = ts.jit_step(step_fn, our_shardings, mesh).lower(ours, batch, extra)
    assert mine.cost_analysis()["flops"] == theirs.cost_analysis()["flops"]
    # Every key is honoured: the PatchGAN discriminator of the config, not a StyleGAN one.
    config.discriminator.kind = "patchgan"
    patch = Stage1(config, mesh)
    assert type(patch.disc).__name__ != type(trainer.disc).__name__
    init_state = ts.build_stage1(config.to_dict(), mesh, None)[0]
    _trees_match(patch.abstract_state()[0], parallel.abstract_state(init_state, mesh, None)[0])


def test_stage2_benchmark_builds_the_trainers_step():
    from vitvq import parallel
    from vitvq.models.vitvqgan import build_vitvqgan
    from vitvq.train.stage2_build import Stage2

    ts = _load("train_step")
    config = _config("vim_base.py", "runlocal")
    tcfg = _config("vitvq_small.py", "runlocal")
    tokenizer = build_vitvqgan(tcfg.model.to_dict(), tcfg.image_size)
    size = tokenizer.image_size
    tok_vars = parallel.unbox(
        tokenizer.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    mesh = parallel.make_mesh(config.mesh)
    trainer = Stage2(config, mesh, tokenizer=(None, tokenizer, tok_vars))
    abstract, shardings = trainer.abstract_state()
    build = ts.build_stage2(config.to_dict(), mesh, tokenizer=(tokenizer, tok_vars))
    sharding = parallel.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=sharding),
    }
    init_state, step_fn, extra, hand, info = build
    ours, our_shardings = parallel.abstract_state(init_state, mesh, trainer.rules)
    _trees_match(abstract, ours)
    with parallel.use_mesh(mesh, trainer.rules):
        theirs = trainer.train_step_jit(shardings).lower(abstract, batch, trainer.tok_vars)
        mine = ts.jit_step(step_fn, our_shardings, mesh).lower(ours, batch, extra)
    assert mine.cost_analysis()["flops"] == theirs.cost_analysis()["flops"]
    assert info["num_classes"] == 10 and info["tokens_per_image"] == tokenizer.grid_size**2


def test_config_overrides_are_typed():
    ts = _load("train_step")
    cfg = ts.load_config_file(
        str(REPO / "configs" / "photos.py"),
        [
            "--config.batch_size=4",
            "--config.optimizer.lr=0.01",
            "--config.dtype=bfloat16",
            "--config.model.encoder.depth=2",
            "--config.dataset.crop_scale=(0.5, 1.0)",
            "--config.mesh.data=1",
        ],
    )
    assert cfg["batch_size"] == 4 and cfg["optimizer"]["lr"] == 0.01
    assert cfg["dtype"] == "bfloat16" and cfg["model"]["encoder"]["depth"] == 2
    assert tuple(cfg["dataset"]["crop_scale"]) == (0.5, 1.0) and cfg["mesh"]["data"] == 1
    with pytest.raises(SystemExit, match="unknown config key"):
        ts.load_config_file(str(REPO / "configs" / "photos.py"), ["--config.nope=1"])


def test_hand_count_of_a_transformer_block_matches_xla():
    """The transformer formula against XLA's count of one block's forward (no elementwise
    work to speak of: within 5%)."""
    from vitvq.models.layers import TransformerBlock

    ts = _load("train_step")
    b, t, d, m = 2, 64, 128, 512
    block = TransformerBlock(num_heads=4, mlp_dim=m)
    x = jnp.zeros((b, t, d))
    params = block.init(jax.random.key(0), x)
    flops = jax.jit(block.apply).lower(params, x).cost_analysis()["flops"]
    hand = ts.transformer_flops(b, t, d, 1, m)
    assert 1.0 <= flops / hand < 1.05


# model.quantizer overrides of the tiny preset: every kind the model has.
QUANTIZER_KINDS = {
    "vq_ema": ["--config.model.quantizer.update=ema"],
    "vq_rotation": ["--config.model.quantizer.gradient=rotation"],
    "simvq": ["--config.model.quantizer.kind=simvq"],
    "fsq": ["--config.model.quantizer.kind=fsq", "--config.model.quantizer.levels=(4, 4, 3)"],
    "lfq": ["--config.model.quantizer.kind=lfq", "--config.model.quantizer.bits=6"],
}


@pytest.mark.parametrize("name", sorted(QUANTIZER_KINDS))
def test_stage1_benchmark_runs_every_quantizer_kind(name):
    """`--preset=tiny --config.model.quantizer.KEY=...` as the command line gives them, one
    step on the 8 devices (the paper's kind runs in the smoke test): the trainer's step for
    that quantizer, its hand count by kind."""
    ts = _load("train_step")
    argv = ["--preset=tiny", "--batch=8", "--steps=1", "--warmup=0", "--peak_size=128"]
    cfg, args, label = ts.parse_args([*argv, *QUANTIZER_KINDS[name]])
    assert label == " ".join(["preset tiny", *QUANTIZER_KINDS[name]])
    assert ts.PRESETS["tiny"]["model"]["quantizer"]["kind"] == "vq"  # the preset is unchanged
    r = ts.run(cfg, args, label)
    assert r["what"] == label and r["devices"] == 8 and math.isfinite(r["loss"])
    assert r["flops_source"] == "cost_analysis" and 0.9 < r["flops_ratio_cost_to_hand"] < 1.5
    # 16 tokens of 8 images: the code search of 512 codes x 16 dimensions, LFQ's entropy over
    # 2 groups of 2**3 sub-codes of 3 bits; FSQ searches nothing.
    quantizer = {"fsq": 0, "lfq": 2 * 2 * 128 * 6 * 8}.get(name, 128 * 2 * 512 * 16)
    if name == "simvq":
        quantizer += 2 * 2 * 512 * 16 * 16  # its codebook, basis @ map, and the map's gradient
    assert r["hand_gflops_by_part"]["quantizer"] == round(quantizer / 1e9, 3)


@pytest.mark.parametrize(
    "quantizer",
    [{}, {"kind": "simvq"}, {"kind": "fsq"}, {"kind": "lfq", "bits": 12, "entropy_groups": 1}],
    ids=["vq", "simvq", "fsq", "lfq"],
)
def test_hand_count_of_each_quantizer_matches_xla(quantizer):
    """The quantizer's hand count (with its projection down to the codes) against XLA's count
    of its forward for 64 images of 16 tokens (lowered, not compiled). XLA also counts the
    distances' norms, the softmax and the usage counts: at most ~1.5x the matmuls."""
    from vitvq.models.vitvqgan import build_vitvqgan

    ts = _load("train_step")
    model_cfg = json.loads(json.dumps(ts.PRESETS["tiny"]["model"]))
    model_cfg["quantizer"].update(quantizer)
    model = build_vitvqgan(model_cfg, 32)
    b, t = 64, model.grid_size**2
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    x = jnp.zeros((b, t, model.encoder.width))
    quantize = lambda v, x: model.apply(v, x, method=lambda m, x: m.quantizer(x), mutable=True)
    lowered = jax.jit(quantize).lower(variables, x)  # the model's quantizer alone
    parts = ts.quantizer_parts(model, b)
    hand = sum(parts.values()) + 2 * b * t * model.encoder.width * model.codes_dim
    assert 1.0 <= lowered.cost_analysis()["flops"] / hand < 1.6, parts


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_suite_shellcheck():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")], check=True)
    subprocess.run(["shellcheck", str(BENCH / "gpu_suite.sh")], check=True)


def test_gpu_suite_bad_option():
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_suite.sh"), "--nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown option '--nope'" in proc.stderr


def test_input_benchmark_folder_and_tfds(tmp_path):
    proc = _bench(
        "input",
        "--images=12",
        "--width=80",
        "--height=64",
        "--size=32",
        "--batch=4",
        "--batches=2",
        "--warmup=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = _last_json(proc.stdout)
    for path in ("folder", "tfds"):
        _positive(r[path], "images_per_sec", "images_per_sec_per_core")
    _positive(r, "images_per_sec_per_core", "cores", "mean_jpeg_bytes")
    assert r["images_per_sec_per_core"] == min(
        r["folder"]["images_per_sec_per_core"], r["tfds"]["images_per_sec_per_core"]
    )


def test_input_benchmark_corrupt_files_are_skipped_and_timed(tmp_path):
    """A tenth of 40 JPEGs broken (one of each kind): all four found in the first epoch."""
    proc = _bench(
        "input",
        "--images=40",
        "--corrupt=0.1",
        "--paths=folder",
        "--batch=8",
        "--batches=2",
        "--epoch_timing",
        "--width=64",
        "--height=64",
        "--size=32",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = _last_json(proc.stdout)
    assert r["corrupt_fraction"] == 0.1 and r["corrupt_files"] == 4 and r["skipped_images"] == 4
    # 39 training files (one held out): one pass is 5 batches of 8.
    assert r["folder"]["epoch_batches"] == 5
    _positive(r["folder"], "first_epoch_images_per_sec", "first_epoch_seconds", "images_per_sec")
    # The sniff finds three kinds; the JPEG with a second SOF marker only TensorFlow finds.
    assert proc.stderr.count("Skipping unreadable image") == 4
    assert "TensorFlow cannot decode it" in proc.stderr


def test_input_benchmark_corrupt_needs_the_folder_path(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "input.py"), "--corrupt=0.1", "--paths=folder,tfds"],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--corrupt needs --paths=folder" in proc.stderr


def test_sigterm_benchmark_100m_preset_is_about_100m_parameters():
    """The `100m` preset's overrides give a valid config of ~100M generator parameters
    (the run itself takes minutes on a CPU)."""
    from vitvq import config_check
    from vitvq.models.vitvqgan import build_vitvqgan

    sigterm = _load("sigterm")
    config_file, overrides, _, _ = sigterm.PRESETS["100m"]
    path, _, arg = config_file.partition(":")
    config = _load("train_step").load_config_file(f"{REPO / path}:{arg}", overrides)
    config_check.validate(config, num_devices=1)
    assert not config["loss"]["perceptual"]
    assert config["checkpoint_every_steps"] >= config["total_steps"] // 2
    size = config["image_size"]
    model = build_vitvqgan(config["model"], size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert 95e6 < count < 110e6, count


def test_matmul_shapes_bound_is_consistent(tmp_path):
    """Tiny shapes: every product has a positive rate, and the bound adds up its products."""
    proc = _bench(
        "matmul_shapes",
        "--width=32",
        "--mlp=64",
        "--heads=2",
        "--tokens=16",
        "--batch=4",
        "--depth=1",
        "--codebook=64",
        "--code_dim=8",
        "--peak_size=256",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = _last_json(proc.stdout)
    assert len(r["products"]) == 8
    for row in r["products"]:
        assert row["gflop_per_sec"] > 0 and row["calls_per_step"] >= 1
    n = 4 * 16
    # Forward and backward products of one block in each of the two stacks, the code search.
    expected = 2 * (6 * 2 * n * 32 * 32 * 2 + 6 * 2 * n * 32 * 64) + 6 * 2 * (
        2 * 4 * 2 * 16 * 16 * 16
    )
    expected += 2 * n * 64 * 8
    assert r["product_flops_per_step"] == expected
    assert 0 < r["bound_mfu"] and r["bound_seconds"] > 0


def test_photos_config_variants():
    """configs/photos.py: the L2-only default (FSQ, no restart), the paper's full loss and
    quantizer with LPIPS from 40% of the run and the GAN in its last 10%, and steps=N, which
    moves their starts and the end of the restart window with the schedule."""
    from vitvq.train import schedule

    l2, full = _config("photos.py"), _config("photos.py", "full,steps=1500")
    assert (l2.loss.perceptual, l2.loss.adversarial, l2.loss.logit_laplace) == (0.0, 0.0, 0.0)
    assert l2.model.output == "raw" and l2.codebook_restart.every_steps == 0
    assert l2.model.quantizer.kind == "fsq" and l2.model.quantizer.levels == (8, 8, 8, 5, 5, 5)
    assert full.model.quantizer.kind == "vq" and full.codebook_restart.every_steps == 50
    assert (full.loss.l2, full.loss.logit_laplace, full.loss.perceptual) == (1.0, 0.1, 0.1)
    assert full.loss.adversarial == 0.1 and full.model.output == "sigmoid"
    assert full.total_steps == 1500 and schedule.loss_starts(full.loss, 1500) == (600, 1350)
    assert full.codebook_restart.stop_step == 1350 and full.codebook_init.kind == "kmeans"
    default_full = _config("photos.py", "full")
    assert schedule.loss_starts(default_full.loss, default_full.total_steps) == (640, 1440)
    for bad in ("fulll", "full,steps=0", "steps=x"):
        with pytest.raises(ValueError, match="configs/photos.py takes"):
            _config("photos.py", bad)


def test_side_by_side_picture(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(images.astype(int) + rng.integers(-20, 21, images.shape), 0, 255)
    for name, recon in (("a", images), ("b", noisy.astype(np.uint8))):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "held_out.npz", images=images, recon=recon)
    out = tmp_path / "pic" / "x.png"
    args = ["A=" + str(tmp_path / "a"), "B=" + str(tmp_path / "b"), "--count=5", "--scale=3"]
    proc = _bench("side_by_side", *args, f"--out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    r = _last_json(proc.stdout)
    assert r["crops"] == [0, 5, 10, 14, 19]
    picks = r["crops"]
    mse = np.mean((images[picks].astype(float) - noisy[picks]) ** 2, axis=(1, 2, 3))
    assert r["psnr_shown"]["B"] == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), abs=1e-3)
    assert r["psnr_shown"]["A"] > 90  # identical images
    pic = np.asarray(Image.open(out))
    assert pic.shape == (3 * 48, 110 + 5 * 48, 3)
    # Row 1 (the originals), column 2 is crop 5 upscaled 3x.
    assert np.array_equal(pic[0:48:3, 110 + 48 : 110 + 96 : 3], images[5])

    (tmp_path / "c").mkdir()
    np.savez(tmp_path / "c" / "held_out.npz", images=images[:10], recon=images[:10])
    for runs, message in (
        (["A=" + str(tmp_path / "a"), "C=" + str(tmp_path / "c")], "different held-out set"),
        (["A=" + str(tmp_path / "nowhere")], "does not exist"),
        ([str(tmp_path / "a")], "is not LABEL=DIR"),
    ):
        proc = _bench("side_by_side", *runs, f"--out={out}", cwd=tmp_path)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_checkpoint_digest_benchmark_runs(tmp_path):
    proc = _bench("checkpoint_digests", "--params=20000", f"--dir={tmp_path / 'd'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = _last_json(proc.stdout)
    assert result["params"] >= 20000 and result["checkpoint_bytes"] > 20000  # compressed
    _positive(result, "record_seconds", "check_seconds", "restore_seconds")
    assert not (tmp_path / "d").exists()  # it cleans up after itself


def _quantizer_row(q, name, per_batch, *, codes=8192, psnr=23.0, restart=False):
    """A made-up row of benchmarks/quantizers.py: 30 batches of 1,024 tokens, each using the
    codes start..start+per_batch-1 (start moving by per_batch: disjoint until they wrap)."""
    batches = [
        (k * per_batch + np.arange(1024) % per_batch).reshape(16, 8, 8) % codes for k in range(30)
    ]
    return {
        "row": name,
        "label": q.ROWS[name][0],
        "scale": dict(q.SCALE),
        "num_codes": codes,
        "latent_dim": 32,
        "restart": restart,
        "usage": q.usage(batches, codes),
        "held_out": {"codes_used": 100.0, "psnr": psnr, "lpips": 0.2},
        "eff_rank": 2.5,
        "img_per_s": 12.0,
    }


def test_quantizer_study_counts_codes_and_flags_the_default_bar():
    """benchmarks/quantizers.py's pure parts: distinct codes per batch and over the last 30
    batches (ceiling min(codes, 30,720)), the default bar and the table (no training)."""
    q = _load("quantizers")
    full = _quantizer_row(q, "fsq-8k", 1024, codes=8000)["usage"]
    assert full["tokens"] == 30 * 1024 and full["batch_ceiling"] == 1024
    assert full["mean_distinct_per_batch"] == 1024 and full["distinct_per_batch"] == [1024] * 30
    assert full["distinct"] == full["ceiling"] == 8000  # fewer codes than tokens: every code
    big = _quantizer_row(q, "lfq-64k", 1024, codes=65536)["usage"]
    assert big["distinct"] == big["ceiling"] == 30 * 1024  # more codes than tokens
    few = _quantizer_row(q, "paper", 3)["usage"]
    assert (few["mean_distinct_per_batch"], few["distinct"], few["ceiling"]) == (3, 90, 8192)
    same = q.usage([np.zeros((16, 8, 8), np.int32) + (k % 2) for k in range(30)], 8192)
    assert (same["mean_distinct_per_batch"], same["distinct"]) == (1, 2)

    rows = [
        _quantizer_row(q, "lfq-64k", 1024, codes=65536),
        _quantizer_row(q, "vq-ema-8k", 512, psnr=22.69),  # exactly at both bars
        _quantizer_row(q, "simvq-8k", 511),
        _quantizer_row(q, "fsq-8k", 900, codes=8000, psnr=22.68),
        _quantizer_row(q, "defaults", 771, restart=True),
        _quantizer_row(q, "paper", 3, psnr=16.38),
    ]
    flags = {r["row"]: q.passes(r) for r in rows}
    assert flags["lfq-64k"] == (True, "") and flags["vq-ema-8k"] == (True, "")
    assert flags["simvq-8k"] == (False, "usage < 512")
    assert flags["fsq-8k"] == (False, "PSNR < 22.69")
    assert flags["defaults"] == (False, "restart")
    assert flags["paper"] == (False, "usage < 512, PSNR < 22.69")

    text = q.table(rows)
    assert "30 x 1,024 = 30,720 tokens" in text
    assert "(here 8,000, 8,192, 30,720: 65,536 codes give at most 30,720)" in text
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    names = [line.split(" | ")[0][2:] for line in body[1:]]
    assert names == ["paper", "defaults", "vq-ema-8k", "simvq-8k", "fsq-8k", "lfq-64k"]
    cells = {name: line.split(" | ") for name, line in zip(names, body[1:], strict=True)}
    assert cells["lfq-64k"][2:5] == ["65,536", "30,720 / 30,720 (100%)", "1,024 / 1,024"]
    assert cells["paper"][3] == "90 / 8,192 (1%)" and cells["paper"][-1] == (
        "fail: usage < 512, PSNR < 22.69 |"
    )
    assert cells["defaults"][-1] == "fail: restart |" and cells["vq-ema-8k"][-1] == "pass |"
    assert "Not run: vq-kmeans, vq-kmeans-ema-8k, vq-kmeans-rotation-8k, vq-ema-64k," in text
    assert "different scales" not in text
    rows[0]["scale"] = {**rows[0]["scale"], "steps": 90}
    assert "Rows at different scales" in q.table(rows)


def test_quantizer_study_rows_are_valid_configs():
    """Every row of benchmarks/quantizers.py passes the config check at the study's scale and
    has the codes its name says (FSQ 8,000 / 64,000; the others 8,192 / 65,536)."""
    q, collapse = _load("quantizers"), _load("collapse")
    from vitvq.models.quantizers import quantizer_spec, spec_num_codes
    from vitvq.train.stage1 import check_config

    for name in q.ROWS:
        study = argparse.Namespace(preset="SS", set=q.overrides(name), **dict(q.SCALE))
        config = collapse.study_config(study)
        check_config(config)
        spec = quantizer_spec(config.model.quantizer.to_dict())
        codes = spec_num_codes(spec, config.model.codebook_size)
        expected = {"8k": 8192, "64k": 65536}.get(name.rsplit("-", 1)[-1], 8192)
        assert codes == (expected // 1024 * 1000 if spec.kind == "fsq" else expected), name
        restart = config.codebook_restart.every_steps > 0
        assert restart == (name == "defaults"), name
        init = config.codebook_init.kind
        kmeans = name == "defaults" or name.startswith("vq-kmeans")
        assert init == ("kmeans" if kmeans else "normal"), name
        assert config.loss.perceptual == config.loss.adversarial == 0.0 and config.eval_lpips
    with pytest.raises(SystemExit, match="unknown config key 'model.quantizer.levelz'"):
        collapse.apply_override(config, "model.quantizer.levelz=(8, 8)")  # a typo is refused
