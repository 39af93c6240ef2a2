"""Every quantizer kind (config `model.quantizer`, vitvq/models/quantizers.py) through the
stage-1 trainer: the tiny runlocal config trains 4 steps in process, a run preempted at step
2 resumes to a state bit-identical to the uninterrupted run's, and the exported bundle's
tokenizer encodes and decodes as the training state's model does.

Kinds: the paper's VQ, VQ with an EMA codebook, VQ with the rotation trick, SimVQ, FSQ and
LFQ (with its entropy weight annealed over the run). The runs train without LPIPS or the
discriminator, on a data 2 x fsdp 2 x tensor 2 mesh of the 8 fake devices. Each kind's step
on 2 and 8 devices equals its step on 1 device to 1e-6 (a smaller config, 3 steps).
"""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitvq
from vitvq import bundle, parallel
from vitvq.checkpoint import Checkpointer
from vitvq.data.globalize import to_global
from vitvq.errors import BundleError
from vitvq.export import export
from vitvq.train import stage1
from vitvq.train.stage1_step import model_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 4

KINDS = {
    "vq": {},
    "vq_ema": {"update": "ema", "ema_decay": 0.9},
    "vq_rotation": {"gradient": "rotation"},
    "simvq": {"kind": "simvq"},
    "fsq": {"kind": "fsq", "levels": (4, 4, 3)},
    "lfq": {"kind": "lfq", "bits": 6, "entropy_groups": 2, "entropy_anneal_steps": 2},
}
NUM_CODES = {"fsq": 48, "lfq": 64}  # the others: runlocal's codebook_size, 64


def make_config(changes):
    spec = importlib.util.spec_from_file_location("small", REPO / "configs" / "vitvq_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.loss.perceptual = 0.0
    config.loss.adversarial = 0.0
    config.eval_lpips = False
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.optimizer.warmup_steps = 0
    config.update(
        total_steps=TOTAL,
        checkpoint_every_steps=2,
        keep_checkpoints=None,
        log_every_steps=2,
        eval_every_steps=TOTAL,
        image_every_steps=TOTAL,
    )
    config.model.quantizer.update(changes)
    # The k-means init (step 0) and the dead-code restart (step 2, early) both run.
    config.codebook_restart.update(every_steps=2, start_step=2)
    return config


LR = 1e-4  # tiny_config's: Adam moves a parameter by at most ~LR a step


def tiny_config(changes):
    """make_config's at its smallest: 16x16 images (4 tokens), 16 wide, 16 codes of 4
    dimensions; the codebook drawn at random and no dead-code restart (k-means and the
    restart pick codes by distances that differ in the last bits between layouts)."""
    config = make_config(changes)
    config.image_size = 16
    for block in (config.model.encoder, config.model.decoder):
        block.update(width=16, mlp_dim=32)
    config.model.update(codebook_size=16, code_dim=4)
    config.codebook_init.kind = "normal"
    config.codebook_restart.every_steps = 0
    config.loss.adversarial = 0.0
    config.optimizer.lr = LR
    return config


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(host(a))
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(host(b))
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def restore(config, workdir, step):
    trainer = stage1.Stage1(config, parallel.make_mesh(config.mesh))
    abstract, _ = trainer.abstract_state()
    with Checkpointer(pathlib.Path(workdir) / "checkpoints", save_every_steps=1) as ckpt:
        return ckpt.restore(abstract, step), trainer


def digits(n=5):
    from vitvq.data import sources

    return np.stack(sources.load_digits(32).eval.images[:n])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_kind_trains_resumes_exactly_and_exports(name, tmp_path):
    config = make_config(KINDS[name])
    straight = tmp_path / "straight"
    stage1.train_and_evaluate(config, str(straight))
    final, trainer = restore(config, straight, TOTAL)
    model = trainer.model
    kind = model.quantization.kind
    assert model.num_codes == NUM_CODES.get(kind, 64)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host(final.params)))

    # The quantizer's collections travel in the state (and the paper's quantizer has none).
    fresh = trainer.create_state(config.seed)[0]
    collections = set(final.quantizer_state)
    expected = {"vq_ema": {"vq_ema"}, "simvq": {"simvq_basis"}}.get(name, set())
    assert collections == expected
    if name == "vq_ema":  # the codebook followed its batches (k-means, then EMA updates)
        codes = host(final.quantizer_state["vq_ema"]["quantizer"])
        assert not np.array_equal(
            codes["codebook"], host(fresh.quantizer_state["vq_ema"]["quantizer"]["codebook"])
        )
        assert "codebook" not in host(final.params)["quantizer"]
    if name == "simvq":  # the basis is fixed
        assert_trees_equal(final.quantizer_state, fresh.quantizer_state)
    assert bool(final.vq_stats) == (kind in ("vq", "simvq"))

    # Preempted at step 2 (a checkpoint step), resumed to TOTAL: bit-identical.
    resumed = tmp_path / "resumed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "reached_preemption", lambda self, step: step == 2)
        assert stage1.train_and_evaluate(config, str(resumed)) == {}
    with Checkpointer(resumed / "checkpoints", save_every_steps=1) as ckpt:
        assert ckpt.all_steps() == [2]
    stage1.train_and_evaluate(config, str(resumed))
    assert_trees_equal(restore(config, resumed, TOTAL)[0], final)

    # The bundle records the quantizer; its tokenizer encodes and decodes as the state does.
    out = tmp_path / "bundle"
    export(str(straight), str(out))
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["tokenizer"]["quantizer"]["kind"] == kind
    assert manifest["tokenizer"]["codebook_size"] == model.num_codes
    tok = vitvq.load_tokenizer(out, devices=jax.devices()[:1], max_batch=8)
    assert tok.quantizer_kind == kind and tok.codebook_size == model.num_codes
    images = digits(5)
    codes = tok.encode(images)
    assert codes.shape == (5, 4, 4) and 0 <= codes.min() and codes.max() < model.num_codes
    variables = jax.device_put(
        host({"params": final.params, **model_collections(final.vq_stats, final.quantizer_state)}),
        jax.devices()[0],
    )
    x = jnp.asarray(np.concatenate([images, np.zeros((3, 32, 32, 3), np.uint8)]), jnp.float32)
    ref_codes, _ = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(
        variables, x / 255.0
    )
    np.testing.assert_array_equal(codes, np.asarray(ref_codes)[:5])
    decoded = tok.decode(codes)
    assert decoded.shape == (5, 32, 32, 3) and decoded.dtype == np.uint8
    ref = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))(variables, ref_codes)
    ref = np.asarray(jnp.round(ref * 255.0).astype(jnp.uint8))[:5]
    assert np.abs(decoded.astype(int) - ref.astype(int)).max() <= 1
    with pytest.raises(vitvq.InputError, match=rf"\[0, {model.num_codes - 1}\]"):
        tok.decode(np.full((1, 4, 4), model.num_codes, np.int32))


def test_lfq_entropy_weight_anneals_linearly_to_one():
    from vitvq.models.quantizers import QuantizerSpec, entropy_scale

    spec = QuantizerSpec(kind="lfq", entropy_anneal_steps=4, entropy_anneal_factor=3.0)
    scales = [float(entropy_scale(jnp.int32(s), spec)) for s in (0, 1, 2, 4, 100)]
    np.testing.assert_allclose(scales, [3.0, 2.5, 2.0, 1.0, 1.0])
    assert float(entropy_scale(7, QuantizerSpec(kind="lfq"))) == 1.0  # no annealing
    assert float(entropy_scale(0, QuantizerSpec(entropy_anneal_steps=4))) == 1.0  # not LFQ


def test_bundle_with_an_unknown_kind_names_what_is_supported(tmp_path):
    manifest = {
        "format": bundle.FORMAT,
        "format_version": bundle.FORMAT_VERSION,
        "classes": {"num_classes": 0, "names": None},
        "tokenizer": {
            "file": bundle.TOKENIZER_FILE,
            "sha256": "0" * 64,
            "model": {**make_config({}).model.to_dict(), "quantizer": {"kind": "rvq"}},
            "image_size": 32,
        },
    }
    with pytest.raises(BundleError) as info:
        bundle.tokenizer_model(manifest)
    message = str(info.value)
    assert "\n" not in message
    assert "model.quantizer.kind='rvq'" in message
    assert "supported: vq, simvq, fsq, lfq" in message


def test_a_checkpoint_from_before_the_quantizer_state_restores_as_vq(tmp_path):
    """A default (kind "vq") state has the arrays it always had: a checkpoint written before
    `quantizer_state` existed restores into today's state, with an empty quantizer state."""
    config = make_config({})
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = stage1.Stage1(config, mesh)
    state, _ = trainer.create_state(config.seed)
    assert state.quantizer_state == {}
    old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    del old["quantizer_state"]
    with Checkpointer(tmp_path / "checkpoints", save_every_steps=1) as ckpt:
        ckpt.save(1, old, force=True)
    abstract, _ = trainer.abstract_state()
    with Checkpointer(tmp_path / "checkpoints", save_every_steps=1) as ckpt:
        restored = ckpt.restore(abstract, 1)
    assert restored.quantizer_state == {}
    assert_trees_equal(restored, state)


@pytest.mark.parametrize("name", ["simvq", "fsq", "lfq"])
def test_codebook_init_and_restart_are_ignored_without_a_codebook_of_kind_vq(name, caplog):
    """On by default, so that switching only the kind trains: ignored, said once at INFO."""
    config = make_config(KINDS[name])
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with caplog.at_level("INFO", logger="vitvq.train.stage1_build"):
        trainer = stage1.Stage1(config, mesh)
    said = [r.getMessage() for r in caplog.records if "do not apply" in r.getMessage()]
    assert said == [
        f"model.quantizer.kind={KINDS[name]['kind']!r}: codebook_init.kind='kmeans' and the "
        "dead-code restart (every 2 steps) do not apply; ignored"
    ]
    assert (trainer.settings.codebook_init, trainer.settings.restart_every) == ("normal", 0)


def test_an_ema_codebook_is_frozen_with_trainable_decoder():
    config = make_config(KINDS["vq_ema"])
    config.trainable = "decoder"
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    assert stage1.Stage1(config, mesh).settings.codebook_ema_on is False
    config.trainable = "all"
    settings = stage1.Stage1(config, mesh).settings
    assert settings.codebook_ema_on and settings.codebook_init == "kmeans"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsq", "lfq"])
def test_a_vim_trains_on_a_codebook_free_tokenizer_and_samples(name, tmp_path):
    """Stage 2 predicts indices into the tokenizer's code table (FSQ's grid, LFQ's signs):
    its vocabulary is their code count; export checks the VIM against that table."""
    from vitvq.train import stage2

    config = make_config(KINDS[name])
    config.update(total_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
    config.update(image_every_steps=2, log_every_steps=2)
    tok_dir = tmp_path / "tok"
    stage1.train_and_evaluate(config, str(tok_dir))
    tok_bundle = export(str(tok_dir), str(tok_dir / "bundle"))
    spec = importlib.util.spec_from_file_location("vim", REPO / "configs" / "vim_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vim_config = module.get_config("runlocal")
    vim_config.tokenizer_bundle = str(tok_bundle)
    vim_config.mesh.update(data=2, fsdp=2, tensor=2)
    vim_config.update(total_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
    vim_config.update(image_every_steps=2, log_every_steps=2)
    vim_dir = tmp_path / "vim"
    result = stage2.train_and_evaluate(vim_config, str(vim_dir))
    assert np.isfinite(result["loss"])
    out = export(str(tok_dir), str(tmp_path / "both"), vim_workdir=str(vim_dir))
    manifest = json.loads((out / "bundle.json").read_text())
    vocab = manifest["vim"]["vocab_size"]
    assert vocab == manifest["tokenizer"]["codebook_size"] == NUM_CODES[name]
    sampler = vitvq.load_sampler(out, devices=jax.devices()[:1])
    codes = sampler.sample_codes(2, class_labels=[0, 1], seed=0)
    assert codes.shape == (2, 4, 4) and 0 <= codes.min() and codes.max() < NUM_CODES[name]
    assert sampler.sample(2, class_labels=[0, 1], seed=0).shape == (2, 32, 32, 3)


# Meshes of 2 and 8 devices against 1: the batch split over data (and fsdp), the widths over
# fsdp and tensor.
LAYOUTS = {2: {"data": 2}, 8: {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_kind_trains_the_same_on_1_2_and_8_devices(name):
    """Three steps of the stage-1 trainer's step from one initial state on the same batches:
    on 2 and 8 devices, params, vq_stats, the quantizer state (the EMA codebook's statistics
    are sums over the global batch) and the gradients (Adam's first moments) equal 1 device's
    to 1e-6, leaf by leaf. Two exceptions, both rounding that an exact computation would not
    have: the attention key biases, whose gradient is zero but for rounding that Adam scales
    up to +-LR a step (checked to move at most that), and LFQ's gradients, to 1e-4 relative:
    its entropy's softmax multiplies the latents by 200 (temperature 0.01), and their
    rounding with them (a batch entropy of one shard instead of the batch would be off by
    far more)."""
    config = tiny_config(KINDS[name])
    rng = np.random.default_rng(0)
    batches = [{"image": rng.random((8, 16, 16, 3), dtype=np.float32)} for _ in range(3)]
    states = {}
    for devices in (1, *LAYOUTS):
        mesh = parallel.make_mesh(LAYOUTS.get(devices, {"data": 1}), jax.devices()[:devices])
        trainer = stage1.Stage1(config, mesh)
        _, shardings = trainer.abstract_state()
        if devices == 1:
            state0 = host(trainer.create_state(config.seed)[0])
        state = jax.device_put(state0, shardings)
        train_step = trainer.jit_train_step(shardings)
        for step, batch in enumerate(batches):
            state, metrics = train_step(state, to_global(batch, mesh), step)
            assert int(host(metrics)["nonfinite_steps"]) == 0
        states[devices] = host(state)
    single = states[1]
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), single.params, state0.params)
    assert max(jax.tree_util.tree_leaves(moved)) > LR  # the steps did train
    assert set(single.quantizer_state) == {"vq_ema": {"vq_ema"}, "simvq": {"simvq_basis"}}.get(
        name, set()
    )
    assert bool(single.vq_stats) == (name not in ("fsq", "lfq"))
    gradients = dict(rtol=1e-4 if name == "lfq" else 1e-6, atol=1e-6)
    for devices in LAYOUTS:
        for part in ("params", "vq_stats", "quantizer_state", "opt_state"):
            a, b = getattr(states[devices], part), getattr(single, part)
            leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
            assert tree_a == jax.tree_util.tree_structure(b)
            for (path, x), y in zip(leaves_a, jax.tree_util.tree_leaves(b), strict=True):
                where = jax.tree_util.keystr(path)
                what = f"{devices} devices: {part}{where}"
                if part == "opt_state" and ".mu" not in where:
                    continue
                if "key_bias" in where:
                    if part == "params":
                        assert np.abs(x - y).max() <= 2 * len(batches) * LR, what
                    continue
                tolerance = gradients if part == "opt_state" else dict(rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(x, y, err_msg=what, **tolerance)
