"""What each term of the paper's loss buys on held-back photos, and at what cost per step.

    python benchmarks/loss_branches.py [--steps=1700] [--base=1300] [--branch=100]
        [--lpips_images=16] [--[no]gan] [--config=configs/photos.py:full] [--config.KEY=VALUE ...]

One run of the stage-1 trainer's step on the selection split of
`benchmarks/quality_photos.py` (`photo_sets.py`: the training photos less `SELECT_PHOTOS`,
measured on the 190 multi-scale crops of those two), branched so that every branch starts
from the same weights:

1. L2 alone (with the variant's output and quantizer) for `--base` steps, the learning rate
   following the schedule of a `--steps` run;
2. from there, `2 * --branch` more steps of L2 alone (what the time would buy without the
   other terms);
3. from the same state, logit-Laplace and LPIPS on for `--branch` steps, then `--branch`
   more; once for each entry of `--lpips_images`, LPIPS taken over that many images of each
   batch (the first k: an unbiased estimate of the whole batch's mean at k/B of the cost);
4. with `--gan`, from the end of the first LPIPS branch's first half, `--branch` steps with
   the GAN as well, once with the adaptive weight and once with the paper's fixed weight.

Each measurement prints one JSON line: PSNR (uint8, as quality_photos) and LPIPS on the
held-back crops, and the branch's seconds per step (compilation included); the last line
holds them all. The LPIPS, logit-Laplace and GAN starts of the config are replaced by the
branch points; every other key (quantizer, output, discriminator, weights) is the config's.
"""

import copy
import functools
import json
import pathlib
import sys
import time
from typing import Any

from absl import app, flags
from flax import struct
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "photos.py") + ":full")
_STEPS = flags.DEFINE_integer("steps", 1700, "the run length the learning rate follows")
_BASE = flags.DEFINE_integer("base", 1300, "L2-only steps before the branches")
_BRANCH = flags.DEFINE_integer("branch", 100, "steps per branch")
_LPIPS_IMAGES = flags.DEFINE_list(
    "lpips_images", ["16"], "one LPIPS branch per entry: LPIPS over that many images of a batch"
)
_GAN = flags.DEFINE_bool("gan", True, "branch the GAN (both weights) off the first LPIPS branch")


@struct.dataclass
class FirstImages:
    """LPIPS over the first `k` images of each batch (the batch is shuffled: an unbiased
    estimate of the whole batch's mean)."""

    lpips: Any
    k: int = struct.field(pytree_node=False)

    def __call__(self, images_0, images_1):
        return self.lpips(images_0[: self.k], images_1[: self.k])


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import photo_sets as qp

    from vitvq import data as data_lib
    from vitvq import parallel
    from vitvq.data.globalize import to_global
    from vitvq.models.perceptual import lpips_fn
    from vitvq.train.stage1 import Stage1
    from vitvq.train.stage1_step import model_collections

    base, branch = _BASE.value, _BRANCH.value
    if not (0 < base and 0 < branch and base + 2 * branch <= _STEPS.value):
        raise app.UsageError("need 0 < --base, 0 < --branch and --base + 2 * --branch <= --steps")
    config = _CONFIG.value
    try:
        subsets = [int(k) for k in _LPIPS_IMAGES.value]
    except ValueError:
        subsets = []
    if not subsets or not all(0 < k <= config.batch_size for k in subsets):
        raise app.UsageError(
            f"--lpips_images takes image counts from 1 to the batch size {config.batch_size}, "
            f"e.g. 4,16; got {','.join(_LPIPS_IMAGES.value)!r}"
        )
    qp.use_selection_split()
    mesh = parallel.make_mesh(config.mesh)
    never = 10**9

    def trainer(**loss):
        c = copy.deepcopy(_CONFIG.value)
        c.total_steps = _STEPS.value
        c.codebook_restart.stop_step = c.total_steps * 9 // 10
        c.loss.update(
            perceptual_start_step=base, logit_laplace_start_step=base, disc_start_step=never
        )
        c.loss.update(loss)
        return Stage1(c, mesh)

    l2_only = trainer(perceptual_start_step=never, logit_laplace_start_step=never)
    plain = trainer()
    gan = {
        "adaptive GAN": trainer(disc_start_step=base + branch, adaptive_gan_weight=True),
        "fixed GAN": trainer(disc_start_step=base + branch, adaptive_gan_weight=False),
    }
    state, shardings = l2_only.create_state(config.seed)
    steps = {t: t.jit_train_step(shardings) for t in (l2_only, plain, *gan.values())}
    batches = data_lib.train_batches(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
    )
    held = qp.held_out_images(config.image_size)
    lpips, model = lpips_fn(), plain.model
    # One compilation for every measurement: the weights are an argument.
    reconstruct = jax.jit(lambda variables, images: (model.apply(variables, images)[0],))
    score = jax.jit(lambda recon, images: (lpips(recon, images),))
    rows = []

    def measure(state, name, seconds_per_step):
        variables = {
            "params": state.params,
            **model_collections(state.vq_stats, state.quantizer_state),
        }
        (recon,) = qp.apply_in_chunks(functools.partial(reconstruct, variables), held)
        recon = qp.to_uint8(recon)
        (lp,) = qp.apply_in_chunks(score, recon, held)
        row = {
            "branch": name,
            "step": int(state.step),
            "psnr": round(float(qp.psnr_uint8(held, recon).mean()), 3),
            "lpips": round(float(lp.mean()), 4),
            "seconds_per_step": round(seconds_per_step, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def train(state, t, n):
        start = time.time()
        for _ in range(n):
            state, _ = steps[t](state, to_global(next(batches), mesh), int(state.step))
        jax.block_until_ready(state)
        return state, (time.time() - start) / n

    def fork(state):  # the step donates its state: branch from a copy
        return jax.tree_util.tree_map(jnp.copy, state)

    state, sec = train(state, l2_only, base)
    measure(state, "L2", sec)
    at_base = fork(state)
    l2_more = fork(at_base)
    for _ in range(2):
        l2_more, sec = train(l2_more, l2_only, branch)
        measure(l2_more, "L2", sec)
    whole = plain.train_perceptual

    def lpips_over(k):
        return whole if k == config.batch_size else FirstImages(whole, k)

    at_branch = None
    for k in subsets:
        plain.train_perceptual = lpips_over(k)  # a new argument type: a fresh compilation
        name = "L2 + logit-Laplace + LPIPS" + ("" if k == config.batch_size else f" on {k} images")
        lpips_state = fork(at_base)
        for _ in range(2):
            lpips_state, sec = train(lpips_state, plain, branch)
            measure(lpips_state, name, sec)
            if at_branch is None:  # the GAN branches start halfway through the first
                at_branch = fork(lpips_state)
    for name, t in gan.items() if _GAN.value else ():
        t.train_perceptual = lpips_over(subsets[0])
        gan_state, sec = train(fork(at_branch), t, branch)
        measure(gan_state, f"L2 + logit-Laplace + LPIPS, then {name}", sec)
    print(
        json.dumps(
            {"command": " ".join(["benchmarks/loss_branches.py", *sys.argv[1:]]), "rows": rows}
        )
    )


if __name__ == "__main__":
    app.run(main)
