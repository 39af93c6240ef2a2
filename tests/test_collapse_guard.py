"""The default stage-1 recipe does not collapse its codebook; the paper's random init does.

A small-scale version of `benchmarks/collapse.py train`: configs/vitvq_small.py shrunk to a
tiny model on 32x32 crops of the bundled photos, trained for 60 steps by the trainer's own
step (256 tokens per batch, 256 codes). Measured when this test was written: the defaults
(k-means codebook init and dead-code restart) used 68 codes per batch over the last 10
steps, the k-means init alone 28, the paper's normal init without restart 8 (3 by the end).
The bar, a fifth of min(tokens per batch, codebook size), sits between: a change that makes
the default recipe collapse fails the first assertion; the paper's recipe failing the same
bar shows the check can fail.
"""

import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common, vitvq_small  # noqa: E402
from vitvq import parallel  # noqa: E402
from vitvq.data.globalize import to_global  # noqa: E402
from vitvq.train import runner  # noqa: E402
from vitvq.train.stage1 import Stage1  # noqa: E402

STEPS = 60


def codes_per_batch(**overrides) -> list[int]:
    config = vitvq_small.get_config("runlocal")
    config.dataset = common.dataset("photos", crop_scale=(0.2, 1.0))
    config.batch_size = 16  # 16 x 16 = 256 tokens per batch, 256 codes
    config.model.codebook_size = 256
    config.total_steps = STEPS
    config.loss.perceptual = 0.0
    config.loss.adversarial = 0.0
    config.eval_lpips = False
    config.optimizer.warmup_steps = 6
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = Stage1(config, mesh)
    state, shardings = trainer.create_state(config.seed)
    step_fn = trainer.jit_train_step(shardings)
    batches = runner.train_batches(
        config.dataset, image_size=config.image_size, batch_size=config.batch_size, seed=config.seed
    )(0)
    used = []
    for step in range(STEPS):
        state, metrics = step_fn(state, to_global(next(batches), mesh), step)
        used.append(int(metrics["vq/codes_used"]))
    return used


def test_default_recipe_keeps_its_codes_where_the_papers_init_collapses():
    bar = 0.2 * 256  # a fifth of min(tokens per batch, codebook size)
    default = codes_per_batch()
    assert np.mean(default[-10:]) >= bar, default
    # No decline over the second half (beyond the noise of one batch).
    assert np.mean(default[-10:]) >= 0.8 * np.mean(default[STEPS // 2 : STEPS // 2 + 10]), default
    paper = codes_per_batch(**{"codebook_init.kind": "normal", "codebook_restart.every_steps": 0})
    assert np.mean(paper[-10:]) < bar, paper
