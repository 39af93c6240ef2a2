"""Tests of the entry point `python -m vitvq.main`, run as users run it.

- the full runlocal config (GAN, LPIPS, evaluation, images) trains end to end into the
  default workdir, runs/<config name>, relative to the current directory (a subprocess);
- user mistakes (bad overrides, impossible meshes, unknown data, bad flags) end with one
  `error:` line on stderr, no traceback, exit status 2, and nothing written: they are caught
  before anything is built or compiled. One of them runs as a subprocess; the others run the
  module's entry point in this process, as `python -m` would (tests/inprocess_cli.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from inprocess_cli import run_module_main

from vitvq import main as vitvq_main

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "vitvq_small.py")


def command(args, *, devices=1):
    """(argv, env) of `python -m vitvq.main ARGS` on `devices` fake CPU devices."""
    env = dict(os.environ)
    env.update(
        # Unoptimized code generation: these runs are a few steps, compiling is what costs.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return [sys.executable, "-m", "vitvq.main", *args], env


def run_main(args, *, cwd, devices=1, timeout=300):
    argv, env = command(args, devices=devices)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_default_workdir():
    assert vitvq_main.default_workdir("configs/vitvq_small.py:runlocal") == os.path.join(
        "runs", "vitvq_small"
    )
    assert vitvq_main.default_workdir("/abs/demo.py") == os.path.join("runs", "demo")
    # Variants of settings (the ablation rows) each get a directory of their own.
    rows = {
        vitvq_main.default_workdir(f"configs/ablations.py:row={row},scale=small")
        for row in ("cnn", "patchgan", "code_dim_8")
    }
    assert len(rows) == 3
    assert os.path.join("runs", "ablations", "row-cnn_scale-small") in rows


# (case id, extra arguments, the device count the message needs (None: any, the same line
# on 1 device as on this process's 8), what the one error line must say)
BAD_INVOCATIONS = [
    ("batch_not_divisible", ["--config.batch_size=3"], 8, ["batch_size 3", "not divisible"]),
    ("mesh_product", ["--config.mesh.data=3"], 8, ["config.mesh", "multiplies to 3", "8 devices"]),
    ("eval_batch_not_divisible", ["--config.eval_batch_size=4"], 8, ["eval_batch_size 4"]),
    ("unknown_dataset", ["--config.dataset.name=nope"], None, ["dataset.name='nope'", "digits"]),
    ("missing_folder", ["--config.dataset.name=folder"], None, ["dataset.path"]),
    ("patch_size", ["--config.model.patch_size=5"], None, ["patch_size 5", "image_size 32"]),
    ("unknown_key", ["--config.nope=1"], None, ["unknown config key 'nope'", "--config.nope"]),
    ("unknown_nested_key", ["--config.model.nope=1"], None, ["'nope'", "--config.model.nope"]),
    ("bad_value", ["--config.total_steps=abc"], None, ["--config.total_steps=abc", "int"]),
    ("unknown_trainer", ["--config.trainer=nope"], None, ["config.trainer 'nope'"]),
    ("unknown_variant", [f"--config={CONFIG}:bogus"], None, ["unknown config variant 'bogus'"]),
    ("missing_config", ["--config=configs/nope.py"], None, ["configs/nope.py", "No such file"]),
    ("no_config", None, None, ["--config is required"]),
    ("positional_argument", ["extra"], None, ["unexpected arguments", "extra"]),
    # vitvq/config_check.py: the one line names the full key, the value and what is allowed.
    ("negative_lr", ["--config.optimizer.lr=-0.001"], None, ["config.optimizer.lr=-0.001", "> 0"]),
    (
        "heads_not_dividing_width",
        ["--config.model.encoder.num_heads=3"],
        None,
        ["config.model.encoder.num_heads=3", "divisor of config.model.encoder.width=32"],
    ),
    (
        "codebook_size_1",
        ["--config.model.codebook_size=1"],
        None,
        ["config.model.codebook_size=1", "an integer >= 2"],
    ),
    (
        "dropout_out_of_range",
        ["--config.model.decoder.dropout=1.5"],
        None,
        ["config.model.decoder.dropout=1.5", "a number in [0, 1)"],
    ),
    (
        "unknown_dtype",
        ["--config.dtype=float64"],
        None,
        ["config.dtype='float64'", "'bfloat16', 'float16', 'float32'"],
    ),
    (
        "keep_checkpoints_0",
        ["--config.keep_checkpoints=0"],
        None,
        ["config.keep_checkpoints=0", ">= 1"],
    ),
    (
        "two_rest_axes",
        ["--config.mesh.data=-1", "--config.mesh.fsdp=-1"],
        8,
        ["config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1}", "at most one axis -1"],
    ),
    (
        "crop_scale_out_of_range",
        ["--config.dataset.crop_scale=(0.0,1.0)"],
        None,
        ["config.dataset.crop_scale=(0.0, 1.0)", "0 < lo <= hi <= 1"],
    ),
    (
        "image_size_not_power_of_two",  # divisible by the patch, but the discriminator halves it
        ["--config.image_size=48"],
        None,
        ["config.image_size=48", "a power of two >= 8", "config.loss.adversarial=0"],
    ),
    (
        "vim_top_p",
        [f"--config={REPO / 'configs' / 'vim_base.py'}:runlocal", "--config.sampling.top_p=0"],
        None,
        ["config.sampling.top_p=0.0", "a number in (0, 1]"],
    ),
    (
        "pipeline_vim_heads",
        [f"--config={REPO / 'configs' / 'demo.py'}", "--config.vim.model.num_heads=3"],
        None,
        ["config.vim.model.num_heads=3", "divisor of config.vim.model.width=128"],
    ),
]


# The one case that runs as a real `python -m vitvq.main` process (on 8 devices): the
# process itself exits with status 2 and prints the one line, no traceback.
SUBPROCESS_CASE = "mesh_product"


def bad_args(workdir, extra):
    args = [f"--workdir={workdir}"]
    if extra is not None:
        has_config = any(a.startswith("--config=") for a in extra)
        args += ([] if has_config else [f"--config={CONFIG}:runlocal"]) + extra
    return args


@pytest.mark.parametrize(
    "name, extra, devices, expected", BAD_INVOCATIONS, ids=[c[0] for c in BAD_INVOCATIONS]
)
def test_user_error_is_one_line_and_exit_2(capfd, tmp_path, name, extra, devices, expected):
    workdir = tmp_path / name
    if name == SUBPROCESS_CASE:
        proc = run_main(bad_args(workdir, extra), cwd=REPO, devices=devices or 1)
    else:  # in this process: tests/conftest.py's 8 CPU devices
        assert devices in (None, jax.device_count()), "needs a subprocess with its devices"
        proc = run_module_main(capfd, "vitvq.main", bad_args(workdir, extra), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert not workdir.exists()  # stopped before writing (or compiling) anything


def test_cli_trains_runlocal_end_to_end(tmp_path):
    proc = run_main([f"--config={CONFIG}:runlocal"], cwd=tmp_path, timeout=600)  # no --workdir
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    workdir = tmp_path / "runs" / "vitvq_small"  # the default workdir, relative to cwd
    config = json.loads((workdir / "config.json").read_text())
    total = config["total_steps"]
    assert config["loss"]["adversarial"] > 0 and config["loss"]["perceptual"] > 0

    final = json.loads(proc.stdout.strip().splitlines()[-1])["final_eval"]
    assert {"psnr", "ssim", "lpips", "codebook_usage", "codes_used"} <= set(final)

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train/loss/total" in r}
    every = config["log_every_steps"]
    assert sorted(train) == list(range(every, total + 1, every))
    for key in (
        "train/loss/l2",
        "train/loss/vq",
        "train/loss/logit_laplace",
        "train/loss/perceptual",
        "train/loss/adversarial",
        "train/disc/loss",
        "train/grad_norm",
        "train/param_norm",
        "train/update_norm",
        "train/vq/codebook_usage",
    ):
        assert isinstance(train[total][key], float), key
    assert train[total]["train/nonfinite_steps"] == 0
    (evaluation,) = [r for r in rows if "eval/lpips" in r]
    assert evaluation["step"] == total and evaluation["eval/psnr"] == final["psnr"]

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    every = config["checkpoint_every_steps"]
    assert steps == list(range(every, total + 1, every))
    assert (workdir / "images" / f"reconstructions_{total:07d}.png").stat().st_size > 0
    assert list(workdir.glob("events.out.tfevents.*"))
