"""The CNN (taming VQGAN) backbone in the trainer and bundles, and the rows of
configs/ablations.py at the runlocal scale. Every row's config is checked at every scale.

What trains where:

- through `python -m vitvq.main` (one subprocess each): the rows with their own code paths,
  bb (the ViT baseline), cnn (the convolutional backbone; its run is also exported), no_l2norm
  (raw codes, Euclidean search) and patchgan (the other discriminator);
- in the pytest process (two steps of the trainer, then an eval step): the rows that differ
  from those only in a size, ss, sl and code_dim_4/32/256; rows whose programs coincide share
  one compiled program;
- not trained: code_dim_8/16/64/128 (a lookup dimension between the ones trained).

The CNN modules' own shapes, layouts and norms are tested in tests/test_cnn.py.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vitvq
from vitvq import bundle, config_check, parallel
from vitvq.data import sources
from vitvq.data.globalize import to_global
from vitvq.export import export
from vitvq.models.discriminator import Discriminator, PatchDiscriminator
from vitvq.models.vitvqgan import build_vitvqgan
from vitvq.train import restore, stage1
from vitvq.train.stage1_step import phase_settings

REPO = pathlib.Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "configs" / "ablations.py"


def load_ablations():
    spec = importlib.util.spec_from_file_location("ablations_config", ABLATIONS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablations = load_ablations()


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


# --- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ablations.SCALES)
@pytest.mark.parametrize("row", ablations.ROWS)
def test_every_row_and_scale_is_a_valid_config_that_differs_in_its_one_thing(row, scale):
    config = ablations.get_config(f"row={row},scale={scale}")
    config_check.validate(config, num_devices=1)
    base = ablations.get_config(f"row=bb,scale={scale}")
    model, base_model = config.model.to_dict(), base.model.to_dict()
    differs = {
        "cnn": ("backbone", "cnn"),
        "no_l2norm": ("l2_normalize_codes", False),
        "patchgan": None,
        **{f"code_dim_{d}": ("code_dim", d) for d in ablations.CODE_DIMS},
    }.get(row)
    if differs is not None:
        key, value = differs
        assert model.pop(key) == value
        base_model.pop(key)
    if row in ("ss", "sl"):
        model.pop("encoder"), model.pop("decoder")
        base_model.pop("encoder"), base_model.pop("decoder")
        if scale != "runlocal":
            assert config.model.encoder.width < base.model.encoder.width
    assert model == base_model
    assert config.discriminator.kind == ("patchgan" if row == "patchgan" else "stylegan")
    # Apart from the row's own setting, the config is the baseline's.
    for key in ("image_size", "batch_size", "total_steps", "dataset", "loss", "optimizer"):
        assert config[key] == base[key], key


def test_paper_scale_rows_are_the_papers_setup():
    bb = ablations.get_config()
    assert bb == ablations.get_config("row=bb")
    assert (bb.image_size, bb.batch_size, bb.total_steps) == (256, 256, 500_000)
    assert (bb.model.encoder.width, bb.model.decoder.depth, bb.model.code_dim) == (768, 12, 32)
    sl = ablations.get_config("row=sl")
    assert (sl.model.encoder.width, sl.model.decoder.width, sl.model.decoder.depth) == (
        512,
        1280,
        32,
    )


@pytest.mark.parametrize(
    "arg, match",
    [
        ("row=cnnn", "unknown ablation row 'cnnn'; expected one of bb, ss, sl, cnn"),
        ("row=cnn,scale=huge", "unknown scale 'huge'; expected one of paper, small, runlocal"),
        ("rows=cnn", "unknown argument 'rows=cnn'"),
    ],
)
def test_bad_rows_and_scales_name_the_choices(arg, match):
    with pytest.raises(ValueError, match=match):
        ablations.get_config(arg)


# --- the CNN backbone ----------------------------------------------------------------------


def test_cnn_tokenizer_maps_256_images_to_32x32_codes_and_back():
    """The paper-scale `cnn` row's model (taming's f8 layout), traced without allocation."""
    config = ablations.get_config("row=cnn")
    model = build_vitvqgan(config.model.to_dict(), config.image_size, jnp.float32)
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    codes, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=model.encode), variables, images
    )
    assert (codes.shape, codes.dtype) == ((2, 32, 32), jnp.int32)
    decoded = jax.eval_shape(lambda v, c: model.apply(v, c, method=model.decode), variables, codes)
    assert (decoded.shape, decoded.dtype) == ((2, 256, 256, 3), jnp.float32)
    params = variables["params"]
    assert {"enc", "dec", "quantizer", "project_up"} <= set(params)
    assert "conv_in" in params["enc"] and "transformer" not in params["enc"]
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert 40e6 < n < 80e6, n  # taming's f8 VQGAN encoder + decoder: tens of millions


def cnn_step_config():
    """The runlocal `cnn` row with the PatchGAN (both new modules in one step), no R1."""
    config = ablations.get_config("row=cnn,scale=runlocal")
    config.discriminator.kind = "patchgan"
    config.loss.r1_gamma = 0.0  # a lazy-R1 step is a second compiled phase
    for opt in (config.optimizer, config.disc_optimizer):
        opt.warmup_steps = 0  # warmup starts at lr 0: a first step would change nothing
    return config


def test_cnn_step_on_8_devices_equals_1_device():
    config = cnn_step_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    results, trainers = {}, {}
    state0 = batch = None
    for name, mesh in (
        ("sharded", parallel.make_mesh(config.mesh)),
        ("single", parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])),
    ):
        trainer = stage1.Stage1(config, mesh)
        _, shardings = trainer.abstract_state()
        if state0 is None:
            state0 = host(trainer.create_state(config.seed)[0])
            digits = sources.load_digits(config.image_size).train.images[:8]
            batch = {
                "image": np.stack(digits).astype(np.float32) / 255.0,
                "label": np.zeros((8,), np.int32),
            }
        step = trainer.jit_train_step(shardings)
        state = jax.device_put(state0, shardings)
        results[name] = step(state, to_global(batch, trainer.mesh), 0)
        trainers[name] = trainer

    (sharded, m_sharded), (single, m_single) = results["sharded"], results["single"]
    # Conv kernels (3, 3, in, out) split their output channels over FSDP (conv_out -> fsdp).
    kernel = sharded.params["enc"]["down_1_block_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape[-1] for s in kernel.addressable_shards} == {kernel.shape[-1] // 2}
    disc_kernel = sharded.disc_params["conv_1"]["kernel"]
    assert disc_kernel.sharding.spec[-1] == "fsdp"

    m_sharded, m_single = host(m_sharded), host(m_single)
    assert {"loss/adversarial", "disc/loss", "disc/real_logits"} <= set(m_single)
    for key in m_single:
        np.testing.assert_allclose(m_sharded[key], m_single[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # The gradients (Adam's first moments are 0.1 x the gradients) agree tightly. Adam's
    # first update is lr * g / (|g| + eps) ~ lr * sign(g): an element whose gradient is within
    # rounding of zero moves by a rounding-dependent part of lr (seen: 3e-4 on 1 of 2304
    # elements), so the parameters are compared to within 2 lr.
    lr = config.optimizer.lr
    for part, atol in (
        ("opt_state", 1e-7),
        ("disc_opt_state", 1e-7),
        ("vq_stats", 1e-5),
        ("params", 2 * lr),
        ("disc_params", 2 * config.disc_optimizer.lr),
    ):
        a, b = host(getattr(sharded, part)), host(getattr(single, part))
        for (path, x), y in zip(
            jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
        ):
            np.testing.assert_allclose(
                x, y, rtol=1e-4, atol=atol, err_msg=part + jax.tree_util.keystr(path)
            )
    moved = jax.tree_util.tree_map(
        lambda a, b: np.abs(a - b).max(), host(single.params), state0.params
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step did update the params


# --- the rows that differ only in a size: two steps in this process ----------------------

# The rows of configs/ablations.py that share the CLI rows' code paths and differ from bb only
# in a size: the transformers' (ss, sl) or the lookup dimension (code_dim_N). At the runlocal
# scale ss and sl build bb's model (the scale replaces every S/B/L transformer by one width-32
# block; their paper and small sizes are checked above), so they share one program.
IN_PROCESS_ROWS = ("ss", "sl", "code_dim_4", "code_dim_32", "code_dim_256")


class RowProgram:
    """The trainer of one runlocal config on one device, its train step compiled once, its
    fresh state (on the host: the step donates its input state) and a batch of digits."""

    def __init__(self, config):
        mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
        # The checked settings the CLI trains from (`train_and_evaluate`).
        self.trainer = trainer = stage1.Stage1(stage1.check_config(config, mesh), mesh)
        _, self.shardings = trainer.abstract_state()
        self.state0 = host(trainer.create_state(config.seed)[0])
        n = config.batch_size
        digits = sources.load_digits(config.image_size)
        self.batch = to_global(
            {
                "image": np.stack(digits.train.images[:n]).astype(np.float32) / 255.0,
                "label": np.zeros((n,), np.int32),
            },
            mesh,
        )
        self.eval_batch = to_global(
            {
                "image": np.stack(digits.eval.images[:n]).astype(np.float32) / 255.0,
                "label": np.zeros((n,), np.int32),
                "mask": np.ones((n,), np.float32),
            },
            mesh,
        )
        # The runlocal scale has no R1 penalty (`loss.r1_gamma` 0: a lazy-R1 step would be a
        # second compiled phase) and no LPIPS, so steps 0 and 1 are one phase of training: the
        # one program `jit_train_step` would compile for both (the test asserts it), compiled
        # here ahead without LLVM's expensive optimizations, as the CLI rows' processes
        # compile (their XLA_FLAGS): ~2x faster, and two steps of a tiny model need no more.
        with parallel.use_mesh(mesh, trainer.rules):
            self.train_step = (
                trainer.train_step_jit(self.shardings, 0)
                .lower(self.fresh_state(), self.batch, trainer.train_perceptual)
                .compile(compiler_options=parallel.fast_compile_options(mesh))
            )
        self.eval_step = trainer.jit_eval_step()

    def fresh_state(self):
        return jax.device_put(self.state0, self.shardings)

    def train(self, steps: int):
        """(state, per-step metrics on the host) after `steps` steps from the fresh state."""
        state, metrics = self.fresh_state(), []
        with parallel.use_mesh(self.trainer.mesh, self.trainer.rules):
            for _ in range(steps):
                state, m = self.train_step(state, self.batch, self.trainer.train_perceptual)
                metrics.append(host(m))
        return state, metrics


@pytest.fixture(scope="module")
def row_programs():
    """A RowProgram per distinct runlocal config, built when a row first needs it: rows whose
    configs coincide (ss, sl) share the trainer and its compiled step."""
    programs = {}

    def program(config):
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if key not in programs:
            programs[key] = RowProgram(config)
        return programs[key]

    return program


@pytest.mark.parametrize("row", IN_PROCESS_ROWS)
def test_row_takes_two_finite_steps_in_process(row, row_programs):
    """The row's runlocal config, as the CLI trains it, built in this process: the model has
    the row's sizes, two train steps (the runlocal run's total_steps) have finite losses and
    move the parameters, and an eval step of the result reconstructs with finite PSNR."""
    config = ablations.get_config(f"row={row},scale=runlocal")
    assert config.total_steps == 2
    program = row_programs(config)
    trainer, params0 = program.trainer, program.state0.params

    # The row's own setting is in the built model and its parameters.
    model, expected = trainer.model, config.model
    assert (model.backbone, model.l2_normalize_codes) == ("vit", expected.l2_normalize_codes)
    for name, spec, want in (
        ("enc", model.encoder, expected.encoder),
        ("dec", model.decoder, expected.decoder),
    ):
        sizes = (want.width, want.depth, want.num_heads, want.mlp_dim)
        assert (spec.width, spec.depth, spec.num_heads, spec.mlp_dim) == sizes, name
        blocks = [k for k in params0[name]["transformer"] if k.startswith("block_")]
        assert len(blocks) == want.depth, name
        assert params0[name]["transformer"]["ln_final"]["scale"].shape == (want.width,), name
        mlp = params0[name]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"]
        assert mlp.shape == (want.width, want.mlp_dim), name
    assert model.code_dim == expected.code_dim
    if row.startswith("code_dim_"):
        assert model.code_dim == int(row.removeprefix("code_dim_"))
    quantizer = params0["quantizer"]
    assert quantizer["codebook"].shape == (expected.codebook_size, expected.code_dim)
    assert quantizer["project_down"]["kernel"].shape == (expected.encoder.width, expected.code_dim)
    assert params0["project_up"]["kernel"].shape[0] == expected.code_dim
    kinds = {"stylegan": Discriminator, "patchgan": PatchDiscriminator}
    assert type(trainer.disc) is kinds[config.discriminator.kind]

    # Both steps run the one compiled program (see RowProgram).
    assert phase_settings(trainer.settings, 0) == phase_settings(trainer.settings, 1)
    state, metrics = program.train(2)
    losses = [m["loss/total"] for m in metrics]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert (int(state.step), int(state.skipped)) == (2, 0)  # both updates applied
    # The config's warmup is 1 step (lr 0 at step 0, as in the CLI run), so the second step's
    # update moves every part; the first step already set the codebook by k-means, so the
    # quantizer's projection stands for the quantizer.
    params = host(state.params)
    for part in (("enc",), ("dec",), ("quantizer", "project_down"), ("project_up",)):
        after, before = params, params0
        for key in part:
            after, before = after[key], before[key]
        moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), after, before)
        assert max(jax.tree_util.tree_leaves(moved)) > 1e-4, part

    # The run's final evaluation, on one eval batch of the trained state.
    out = host(program.eval_step(state, program.eval_batch))
    assert np.isfinite(out["per_example"]["psnr"]).all() and out["batch_codes_used"] >= 1


# --- every row through the CLI -------------------------------------------------------------


def row_command(row: str, workdir: pathlib.Path):
    """(argv, env) of `python -m vitvq.main` training `row` at the runlocal scale. The
    environment is the test process's (the suite's compilation cache settings included)."""
    env = dict(os.environ)
    env.update(
        # Two steps each: unoptimized code generation compiles ~2x faster.
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    argv = [
        sys.executable,
        "-m",
        "vitvq.main",
        f"--config={ABLATIONS}:row={row},scale=runlocal",
        f"--workdir={workdir}",
    ]
    return argv, env


# Rows run through the CLI, one `python -m vitvq.main` process each (~1 minute, mostly
# compiling): one per distinct code path, the ViT baseline, the CNN backbone, raw
# (not l2-normalized) codes and the PatchGAN discriminator. The rows that differ from bb only
# in a size (ss, sl, code_dim_4/32/256) train in this process instead
# (test_row_takes_two_finite_steps_in_process below); code_dim_8/16/64/128 are not trained
# (their configs are checked above; each would add a compile).
CLI_ROWS = ("bb", "cnn", "no_l2norm", "patchgan")


@pytest.fixture(scope="module")
def row_runs(tmp_path_factory):
    """Each of CLI_ROWS trained by its own `python -m vitvq.main` process, two at a time (each
    process mostly compiles, on one core): row -> (CompletedProcess-like, workdir)."""
    root = tmp_path_factory.mktemp("rows")
    pending, running, done = list(CLI_ROWS), {}, {}
    while pending or running:
        while pending and len(running) < 2:
            row = pending.pop(0)
            argv, env = row_command(row, root / row)
            running[row] = subprocess.Popen(
                argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for row, proc in list(running.items()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                done[row] = (
                    subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                    root / row,
                )
                del running[row]
        time.sleep(0.2)
    return done


@pytest.mark.parametrize("row", CLI_ROWS)
def test_row_trains_through_the_cli(row, row_runs):
    result, workdir = row_runs[row]
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])["final_eval"]
    assert np.isfinite(final["psnr"]) and final["codes_used"] >= 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss/total"] for r in rows if "train/loss/total" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    config = restore.load_workdir_config(str(workdir))
    expected = ablations.get_config(f"row={row},scale=runlocal")
    assert config.model.to_dict() == json.loads(json.dumps(expected.model.to_dict()))
    assert config.discriminator.kind == expected.discriminator.kind


def test_cnn_bundle_round_trip(row_runs, tmp_path):
    """The cnn row's run exported and loaded: the bundle records the backbone, and the
    Tokenizer's codes and images are the training model's on the exported parameters."""
    result, workdir = row_runs["cnn"]
    assert result.returncode == 0, result.stderr[-3000:]
    out = export(str(workdir), str(tmp_path / "tok"))
    manifest = json.loads((pathlib.Path(out) / bundle.BUNDLE_JSON).read_text())
    section = manifest["tokenizer"]
    assert section["model"]["backbone"] == "cnn"
    assert section["model"]["cnn"]["channel_mult"] == [1, 1, 2, 2]

    tok = vitvq.load_tokenizer(out, devices=jax.devices()[:1])
    assert (tok.image_size, tok.grid_size, tok.codebook_size) == (32, 4, 64)
    images = np.stack(sources.load_digits(32).eval.images[:8])
    codes = tok.encode(images)
    assert codes.shape == (8, 4, 4) and codes.dtype == np.int32
    decoded = tok.decode(codes)
    assert decoded.shape == (8, 32, 32, 3) and decoded.dtype == np.uint8

    # Reference: the model built from the run's own config on the bundle's arrays.
    config = restore.load_workdir_config(str(workdir))
    model = build_vitvqgan(config.model.to_dict(), config.image_size, jnp.float32)
    generator = restore.read_generator(str(workdir), None)
    variables = {"params": generator["params"], "vq_stats": generator["vq_stats"]}
    x = jnp.asarray(images, jnp.float32) / 255.0
    ref_codes = jax.jit(lambda v, x: model.apply(v, x, method=model.encode)[0])(variables, x)
    np.testing.assert_array_equal(codes, np.asarray(ref_codes))
    ref = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))(variables, ref_codes)
    ref_images = np.asarray(jnp.round(ref * 255.0).astype(jnp.uint8))
    assert np.abs(decoded.astype(int) - ref_images.astype(int)).max() <= 1
