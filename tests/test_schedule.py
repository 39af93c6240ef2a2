"""When the loss terms and the warmup start (vitvq.train.schedule), and that the trainer's
step settings and the memory check's heaviest step follow them. The in-process run of
tests/test_train_stage1.py shows a term joining at its fraction in a real run, resumed
across the start included."""

import math

import ml_collections
import pytest

from vitvq import aot
from vitvq.train import schedule
from vitvq.train.optim import make_adam, make_optimizer
from vitvq.train.stage1_build import step_settings
from vitvq.train.stage1_step import phase_settings


def _loss(**overrides):
    loss = ml_collections.ConfigDict(
        dict(
            perceptual_start_step=0,
            disc_start_step=0,
            perceptual_start_fraction=0.0,
            disc_start_fraction=0.0,
        )
    )
    loss.update(overrides)
    return loss


@pytest.mark.parametrize(
    "overrides, total, want",
    [
        ({}, 1000, (0, 0)),
        ({"perceptual_start_step": 70, "disc_start_step": 300}, 1000, (70, 300)),
        ({"perceptual_start_fraction": 0.5, "disc_start_fraction": 0.2}, 1000, (500, 200)),
        # rounded up: a term never starts before its fraction of the run
        ({"disc_start_fraction": 0.2}, 151, (0, 31)),
        # a paper-length run
        ({"disc_start_fraction": 0.2}, 500_000, (0, 100_000)),
        # a step, where set, wins over the fraction (a command-line override of the step)
        ({"disc_start_step": 5000, "disc_start_fraction": 0.2}, 500_000, (0, 5000)),
        ({"perceptual_start_step": 7, "perceptual_start_fraction": 0.9}, 10, (7, 0)),
    ],
)
def test_loss_starts(overrides, total, want):
    assert schedule.loss_starts(_loss(**overrides), total) == want


def test_configs_saved_before_the_fractions_start_at_their_steps():
    loss = ml_collections.ConfigDict(dict(perceptual_start_step=5, disc_start_step=9))
    assert schedule.loss_starts(loss, 100) == (5, 9)


def _opt(warmup, share=None):
    o = ml_collections.ConfigDict(
        dict(lr=1e-4, end_lr=5e-5, warmup_steps=warmup, b1=0.9, b2=0.99, weight_decay=0.0)
    )
    if share is not None:
        o.max_warmup_fraction = share
    return o


@pytest.mark.parametrize(
    "warmup, share, total, want",
    [
        (50_000, None, 500_000, 50_000),  # the paper's run keeps the paper's warmup
        (50_000, None, 150, 15),  # a short run gets the same share, not the whole run
        (50_000, 0.0, 150, 150),  # no cap: clamped to the run, as before the cap
        (200, None, 2000, 200),  # a warmup under the cap is left alone
        (200, None, 700, 70),
        (1, None, 4, 1),  # never below one step where a warmup was asked for
        (0, None, 4, 0),
        (100, 0.5, 150, 75),
    ],
)
def test_warmup_is_at_most_its_share_of_the_run(warmup, share, total, want):
    assert schedule.warmup_steps(_opt(warmup, share), total) == want


def test_both_optimizers_warm_up_over_the_capped_warmup():
    """The learning rate peaks at the capped warmup's end, in both stages' schedules."""
    _, cosine = make_optimizer(_opt(50_000), 150)
    assert float(cosine(0)) == 0.0
    assert float(cosine(15)) == pytest.approx(1e-4)
    assert float(cosine(7)) == pytest.approx(1e-4 * 7 / 15)
    assert float(cosine(150)) == pytest.approx(5e-5)
    stage2 = _opt(50_000)
    stage2.decay_start_step = 100
    _, constant = make_adam(stage2, 150)
    assert float(constant(13)) == pytest.approx(1e-4 * 14 / 15)
    assert float(constant(15)) == pytest.approx(1e-4)
    assert float(constant(99)) == pytest.approx(1e-4)


def _stage1_config(total, **loss):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import common

    c = common.stage1()
    c.total_steps = total
    c.loss.update(loss)
    return c


def test_the_trainers_phases_switch_at_the_fractions():
    config = _stage1_config(100, perceptual_start_fraction=0.3, disc_start_fraction=0.55)
    settings = step_settings(config)
    assert (settings.perceptual_start_step, settings.disc_start_step) == (30, 55)
    on = [(s, phase_settings(settings, s)) for s in (0, 29, 30, 54, 55, 99)]
    assert [(s, p.perceptual_on, p.gan_on) for s, p in on] == [
        (0, False, False),
        (29, False, False),
        (30, True, False),
        (54, True, False),
        (55, True, True),
        (99, True, True),
    ]


def test_logit_laplace_starts_at_its_step_or_fraction():
    config = _stage1_config(100, logit_laplace_start_fraction=0.75)
    settings = step_settings(config)
    assert settings.logit_laplace_start_step == 75
    assert [phase_settings(settings, s).logit_laplace_on for s in (0, 74, 75, 99)] == [
        False,
        False,
        True,
        True,
    ]
    config.loss.logit_laplace_start_step = 10  # a step given wins over the fraction
    assert step_settings(config).logit_laplace_start_step == 10
    assert aot.heaviest_step(_stage1_config(1000, logit_laplace_start_fraction=0.9)) == 912
    # Configs saved before the keys existed: from the first step; a zero weight is never on.
    for key in ("logit_laplace_start_step", "logit_laplace_start_fraction"):
        del config.loss[key]
    assert phase_settings(step_settings(config), 0).logit_laplace_on
    config.loss.logit_laplace = 0.0
    assert not phase_settings(step_settings(config), 50).logit_laplace_on


def test_the_memory_check_compiles_the_step_with_every_term_on():
    config = _stage1_config(1000, disc_start_fraction=0.25)
    step = aot.heaviest_step(config)
    assert step >= 250 and step % config.loss.r1_every == 0
    assert step == math.ceil(250 / config.loss.r1_every) * config.loss.r1_every


def _paper_config(name: str, arg=None):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"schedule_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_the_paper_scale_tokenizers_share_one_schedule():
    """SS, BB and SL (configs/vitvq_{small,base,large}.py) start LPIPS and the GAN at the
    same points, warm up alike (at the paper's length and at a short one) and weigh the GAN
    adaptively."""
    schedules = {}
    for name in ("vitvq_small", "vitvq_base", "vitvq_large"):
        config = _paper_config(name)
        schedules[name] = [
            (
                schedule.loss_starts(config.loss, total),
                schedule.warmup_steps(config.optimizer, total),
                schedule.warmup_steps(config.disc_optimizer, total),
            )
            for total in (500_000, 150)
        ] + [config.loss.adaptive_gan_weight]
    assert len({tuple(v) for v in schedules.values()}) == 1, schedules
    at_paper_length, short, adaptive = schedules["vitvq_small"]
    assert adaptive is True
    assert at_paper_length == ((0, 250_000), 50_000, 50_000)  # the paper's 50k warmup
    assert short == ((0, 75), 15, 15)


def test_lpips_sees_one_window_of_both_images_drawn_from_the_steps_key():
    """`loss.perceptual_crop`: the step hands LPIPS a window of that side of the reconstruction
    and of the image, drawn from the state's key and step (a resumed run draws the same), a
    new one each step; 0 hands it the whole images."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitvq import parallel
    from vitvq.train.stage1_build import Stage1

    def fake_lpips(recon, images):
        # Sizes in the thousands and hundreds, the window's mean brightness below 1.
        size = 1000.0 * recon.shape[1] + 100.0 * images.shape[2]
        return size + jnp.mean(images, axis=(1, 2, 3))

    steps = {}

    def lpips_term(crop, state, batch):
        if crop not in steps:  # one trainer and one compiled step per window size
            config = _paper_config("vitvq_small", "runlocal")
            config.loss.update(adversarial=0.0, perceptual_crop=crop)
            trainer = Stage1(config, parallel.make_mesh(config.mesh))
            fn = jax.jit(lambda st, b, t=trainer: t.step_fn(0)(st, b, fake_lpips))
            steps[crop] = (trainer, fn)
        trainer, fn = steps[crop]
        state = state or trainer.create_state(0)[0]
        return state, float(fn(state, batch)[1]["loss/perceptual"])

    images = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    batch = {"image": jnp.asarray(images)}
    state, whole = lpips_term(0, None, batch)
    assert whole == pytest.approx(1000 * 32 + 100 * 32 + images.mean(), abs=1e-5)
    _, windowed = lpips_term(16, state, batch)
    assert 1000 * 16 + 100 * 16 < windowed < 1000 * 16 + 100 * 16 + 1  # both images cropped
    assert windowed - (1000 * 16 + 100 * 16) != pytest.approx(images.mean(), abs=1e-6)
    assert lpips_term(16, state, batch)[1] == windowed  # the same state: the same windows
    later = state.replace(step=state.step + 1)
    assert lpips_term(16, later, batch)[1] != windowed  # the next step: new windows
