"""python -m vitvq.aot: the runlocal steps compiled for a TPU topology (v5e:2x2, 4 chips of
16 GiB) by libtpu on this CPU machine, without a TPU and without allocating the state."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from inprocess_cli import run_module_main

from vitvq import aot, aot_report, memory, parallel
from vitvq.errors import ConfigError

try:
    import libtpu  # noqa: F401
except ImportError:
    pytest.skip(
        "libtpu cannot be imported, so there is no TPU compiler to compile for a topology "
        "(pip install -e '.[tpu]')",
        allow_module_level=True,
    )

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPOLOGY = "v5e:2x2"
V5E_HBM = 16 * 2**30
STAGE1 = "configs/vitvq_small.py:runlocal"
STAGE2 = "configs/vim_base.py:runlocal"
TOKENIZER = "configs/vitvq_small.py:runlocal"  # stage 2's (its runlocal needs a digits bundle)


def run_aot(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "vitvq.aot", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def load_config(spec: str):
    """`get_config(arg)` of a FILE[:arg] config spec, as --config reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def specs(shardings) -> list[tuple]:
    """Each leaf's PartitionSpec as a tuple padded to no trailing None."""
    out = []
    for s in jax.tree_util.tree_leaves(shardings):
        spec = list(s.spec)
        while spec and spec[-1] is None:
            spec.pop()
        out.append(tuple(spec))
    return out


def assert_sharded_like_the_cpu_run(report, config, tokenizer_config=None):
    """The compiled TPU program takes and returns the state with the shardings the same
    config gives on a CPU mesh of the same shape: the rules are the config's, whatever the
    platform."""
    cpu_mesh = parallel.make_mesh(config.mesh, jax.devices()[:4])
    cpu_trainer = memory.build_trainer(config, cpu_mesh, tokenizer_config, perceptual=False)
    _, cpu_shardings = cpu_trainer.abstract_state()
    compiled = report.step.compiled
    state_in, state_out = compiled.input_shardings[0][0], compiled.output_shardings[0]
    assert specs(state_in.params) == specs(cpu_shardings.params)
    assert specs(state_in) == specs(cpu_shardings) == specs(state_out)
    return {axis for spec in specs(cpu_shardings.params) for axis in spec}


# model.quantizer blocks of each kind (the runlocal codebook: 64 codes of 8 dimensions).
QUANTIZERS = {
    "vq": {},
    "vq_ema": {"update": "ema"},
    "vq_rotation": {"gradient": "rotation"},
    "simvq": {"kind": "simvq"},
    "fsq": {"kind": "fsq", "levels": (4, 4, 3)},
    "lfq": {"kind": "lfq", "bits": 6},
}
# The collections besides params each kind keeps in the train state.
EXPECTED_STATE = {"vq_ema": {"vq_ema"}, "simvq": {"simvq_basis"}}


@pytest.mark.parametrize("kind", ["vq", "lfq"])
def test_stage1_step_compiles_for_a_tpu_topology_sharded_like_the_cpu_run(kind):
    """The paper's quantizer and LFQ (no codebook: no vq_stats); the other kinds are lowered
    for the topology below (compiling each would take as long again)."""
    config = load_config(STAGE1)
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.model.quantizer.update(QUANTIZERS[kind])
    # Step 1 is an ordinary step (LPIPS and GAN on); the CLI's default, a lazy-R1 step, takes
    # ~30% longer to compile. Compiling this one takes ~30 s on 2 cores.
    report = aot.check(config, TOPOLOGY, step=1, name=STAGE1)

    assert report.device_kind == "TPU v5 lite" and report.num_devices == 4
    assert report.phase.endswith("LPIPS on, GAN on, lazy R1 off")
    step = report.step
    assert step.argument_bytes > 0 and step.temp_bytes > 0 and step.flops > 0
    assert 0 < report.total_bytes < V5E_HBM and report.fits
    # The LPIPS weights (frozen, replicated) are an argument of the step.
    assert dict(report.consumers)["LPIPS (frozen)"] > 50e6
    assert "fsdp" in assert_sharded_like_the_cpu_run(report, config)
    consumers = dict(report.consumers)
    assert ("state.vq_stats" in consumers) == (kind == "vq")  # LFQ has no usage statistics
    assert "state.quantizer_state" not in consumers  # neither keeps a quantizer state


@pytest.mark.parametrize("kind", ["vq_ema", "vq_rotation", "simvq", "fsq"])
def test_every_quantizer_kind_lowers_for_a_tpu_topology(kind):
    """The step of each other kind is built on the topology's compile-only devices and lowered
    from the abstract state (no compile): its state carries the kind's collections, sharded
    on the TPU mesh like on a CPU mesh of the same shape."""
    config = load_config(STAGE1)
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.model.quantizer.update(QUANTIZERS[kind])
    mesh = parallel.make_mesh(config.mesh, aot.topology_devices(TOPOLOGY))
    trainer = memory.build_trainer(config, mesh, perceptual=False)
    abstract, shardings = trainer.abstract_state()
    assert set(abstract.quantizer_state) == EXPECTED_STATE.get(kind, set())
    assert bool(abstract.vq_stats) == (kind != "fsq")
    batch = memory.abstract_batch(trainer, config.batch_size, config.image_size)
    with parallel.use_mesh(mesh, trainer.rules):
        jitted = trainer.train_step_jit(shardings, 1)
        lowered = jitted.lower(abstract, batch, trainer.train_perceptual)
    assert "tpu" in {d.platform for d in mesh.devices.flat}
    assert lowered.as_text()  # traced and lowered for the TPU mesh
    cpu_mesh = parallel.make_mesh(config.mesh, jax.devices()[:4])
    cpu = memory.build_trainer(config, cpu_mesh, perceptual=False)
    assert specs(shardings) == specs(cpu.abstract_state()[1])


def test_stage2_step_compiles_for_a_tpu_topology_sharded_like_the_cpu_run():
    config, tokenizer_config = load_config(STAGE2), load_config(TOKENIZER)
    config.mesh.update(data=1, fsdp=2, tensor=2)
    report = aot.check(config, TOPOLOGY, tokenizer_config=tokenizer_config, name=STAGE2)

    assert report.phase == "stage 2, tokenizer from --tokenizer_config"
    step = report.step
    assert step.argument_bytes > 0 and step.temp_bytes > 0 and step.flops > 0
    assert 0 < report.total_bytes < V5E_HBM and report.fits
    assert {"fsdp", "tensor"} <= assert_sharded_like_the_cpu_run(report, config, tokenizer_config)


def test_stage2_fits_and_an_oversized_vim_does_not():
    common = [f"--topology={TOPOLOGY}", f"--tokenizer_config={TOKENIZER}"]
    fits = run_aot(f"--config={STAGE2}", *common, "--json")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    result = json.loads(fits.stdout.strip().splitlines()[-1])
    assert result["fits"] and 0 < result["total_bytes"] < V5E_HBM
    assert result["flops"] > 0 and result["phase"].startswith("stage 2")
    assert "\nfits: " in fits.stdout and "largest state tensors" in fits.stdout
    assert "TPU_" not in fits.stderr, fits.stderr  # libtpu's warnings about the host kept quiet

    # A 2-block VIM 8192 wide has 1.6e9 parameters: under pure data parallelism every chip
    # holds them and their two Adam moments, ~19 GiB of 16.
    big = run_aot(
        f"--config={STAGE2}",
        *common,
        "--config.model.width=8192",
        "--config.model.mlp_dim=32768",
    )
    assert big.returncode == aot.EXIT_DOES_NOT_FIT, big.stdout + big.stderr
    out = big.stdout
    assert "DOES NOT FIT" in out and "largest consumers per chip:" in out
    consumers = out.split("largest consumers per chip:")[1]
    assert "state.opt_state" in consumers and "state.params" in consumers
    assert "--config.mesh.fsdp" in out
    # The state is the problem (temporaries 12 GiB, state 18 GiB): no advice to remat.
    assert "--config.model.remat" not in out


def test_remat_is_suggested_when_activations_dominate():
    """Remat comes first in the advice when the temporaries outgrow the state (no compile: the
    report of the compiler's refusal of VIM-Base at batch 1024 on v4)."""
    gib = 2**30
    oom = aot_report.OutOfMemory("RESOURCE_EXHAUSTED: ...", int(57.86 * gib), int(30.75 * gib), 95)
    report = aot_report.Report(
        config="configs/vim_base.py",
        topology="v4:4x4x4",
        device_kind="TPU v4",
        num_devices=64,
        num_hosts=16,
        hbm_bytes=32 * gib,
        margin=0.9,
        mesh={"data": 64, "fsdp": 1, "tensor": 1},
        batch_size=1024,
        phase="stage 2",
        step=None,
        oom=oom,
        consumers=(
            ("temporaries (the compiler's total less the above)", 50 * gib),
            ("state.opt_state", 5 * gib),
        ),
        tensors=(),
    )
    assert not report.fits and report.total_bytes == oom.required_bytes
    text = aot_report.format_report(report)
    advice = text.splitlines()[-1]
    assert (
        advice.startswith("to fit: recompute each block") and "--config.model.remat=True" in advice
    )
    assert "needs 57.86 GiB" in text and "DOES NOT FIT" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topology=v9:2x2"], "unknown TPU topology --topology=v9:2x2"),
        (["--topology=v4"], "is not GENERATION:AxB[xC]"),
        (["--topology=v5e:2x2", "--no_such_flag=1"], "no_such_flag"),
        (["--topology=v5e:2x2", "--config.no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(capfd, args, message):
    # `python -m vitvq.aot` in this process (tests/inprocess_cli.py), as run_aot runs it
    argv, env = [f"--config={STAGE1}", *args], {"TF_CPP_MIN_LOG_LEVEL": "2"}
    result = run_module_main(capfd, "vitvq.aot", argv, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(
        aot.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices(TOPOLOGY)
