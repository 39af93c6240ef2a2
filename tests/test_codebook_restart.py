"""Dead-code restart inside the real stage-1 train step revives a collapsed codebook."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import vitvq_small  # noqa: E402
from vitvq import data as data_lib  # noqa: E402
from vitvq import parallel  # noqa: E402
from vitvq.data.globalize import to_global  # noqa: E402
from vitvq.train.stage1 import Stage1  # noqa: E402


def test_restart_step_revives_unused_codes_of_a_collapsed_codebook():
    config = vitvq_small.get_config("runlocal")
    config.loss.perceptual = 0.0
    config.loss.adversarial = 0.0
    config.eval_lpips = False
    config.codebook_init.kind = "normal"  # keep the collapsed codebook set below (step 0)
    config.codebook_restart.every_steps = 1
    config.codebook_restart.start_step = 0
    config.codebook_restart.threshold = 0.5
    mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = Stage1(config, mesh)
    state, shardings = trainer.create_state(0)
    # Collapse: every code is the same vector except code 0, which all tokens pick; code 0
    # has been used, the others never.
    k, d = trainer.model.codebook_size, trainer.model.code_dim
    codebook = jnp.tile(jnp.eye(d)[:1], (k, 1)) * -1.0
    codebook = codebook.at[0].set(1.0 / np.sqrt(d))
    usage = jnp.zeros((k,)).at[0].set(100.0)
    state = state.replace(
        params={**state.params, "quantizer": {**state.params["quantizer"], "codebook": codebook}},
        vq_stats={"quantizer": {"usage": usage}},
    )
    batch = next(data_lib.train_batches(config.dataset, image_size=32, global_batch_size=8, seed=0))
    batch = to_global(batch, mesh)

    def used_codes(state):
        variables = {"params": state.params, "vq_stats": state.vq_stats}
        model = trainer.model
        codes, _ = model.apply(variables, batch["image"], method=model.encode)
        return np.unique(np.asarray(codes))

    assert len(used_codes(state)) <= 2  # collapsed
    before = np.asarray(state.params["quantizer"]["codebook"]).copy()
    state, metrics = trainer.jit_train_step(shardings)(state, batch, 0)
    after = np.asarray(state.params["quantizer"]["codebook"])
    restarted = int(metrics["vq/restarted_codes"])
    # Every code but the (at most two) codes the batch used was dead.
    assert restarted >= k - 2
    # Exactly the dead codes jumped; the used ones moved by at most an optimizer update.
    moved = np.abs(after - before).max(axis=1) > 0.05
    assert moved.sum() == restarted
    assert not moved[0]
    # The batch now spreads over many codes, and the restarted usage is above the threshold.
    assert len(used_codes(state)) >= 8
    new_usage = np.asarray(state.vq_stats["quantizer"]["usage"])
    assert np.all(new_usage[1:] >= config.codebook_restart.threshold)
