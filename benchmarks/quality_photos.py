"""Tokenizer quality on real photos under a fixed CPU budget (issue: beat the thumbnail).

    python benchmarks/quality_photos.py [--minutes=30] [--select] [--out=DIR]
        [--config=configs/photos.py:full] [--config.KEY=VALUE ...]

Trains `configs/photos.py` (encoder/decoder 256 wide x 4 blocks, patch 8, 64x64 images, FSQ
with 64,000 codes) on random crops of the bundled training photos for a wall-time budget
(imports excluded, compilation included), then measures on the held-out photos (chelsea,
coffee; never seen in training):

- held-out set: square crops of each held-out photo with sides of 25%, 35%, 50%, 70% and 100%
  of its shorter side (100% = the center crop), on grids with half-side strides, each resized
  to 64x64 (PIL bicubic, antialiased), uint8: a few hundred images, so that codebook usage
  over the set can go far beyond the 64 codes of one image;
- our PSNR (uint8 in, uint8 out), SSIM, LPIPS, codebook usage on the set, on random training
  crops and on the same grid of crops of two training photos (`TRAIN_GRID_PHOTOS`);
- the thumbnail baseline in the same run: area-downsample to 8x8, bicubic back to 64x64 (and
  a 16x16 thumbnail, `psnr_thumbnail_16`, the grid of patch-4 codes, for scale);
- the same figures on a wider held-out set (`"wide"` in the JSON): the two held-out photos plus
  the seven other photographs bundled with scikit-image that training never sees
  (`WIDE_EXTRA`, greyscale, as RGB), because overlapping crops of two smooth photos repeat
  their patches and cap the usage any tokenizer can reach on them (BENCHMARKS.md measures it);
  with PSNR per photo (ours and the thumbnail's).

`--select` is for choosing a recipe without looking at the held-out photos: it trains on the
training photos less `SELECT_PHOTOS` (two of them) and measures on the same grid of crops of
those two instead, skipping the wider set. Choose with `--select`, then report the held-out
figure once.

Prints progress (with per-batch codebook usage), writes a PNG of originals above
reconstructions and DIR/held_out.npz (every held-out image, its reconstruction and PSNR, for
benchmarks/side_by_side.py), and prints one JSON object as its last line.
"""

import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from photo_sets import (  # noqa: E402
    FLAT_PHOTOS,
    TRAIN_GRID_PHOTOS,
    WIDE_EXTRA,
    apply_in_chunks,
    held_out_images,
    held_out_names,
    psnr_uint8,
    thumbnail,
    to_uint8,
    use_selection_split,
)

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "photos.py"))
_MINUTES = flags.DEFINE_float("minutes", 30.0, "training wall-time budget")
_OUT = flags.DEFINE_string("out", "runs/quality_photos", "where the PNG goes")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "steps between progress lines")
_SELECT = flags.DEFINE_bool(
    "select", False, "train without SELECT_PHOTOS and measure on them (choosing a recipe)"
)


def measure_wide(run_model, size, ours, thumb, codes, k) -> dict:
    """The figures on the wider held-out set: the two held-out photos (their PSNRs `ours` and
    `thumb` and `codes` already measured) plus WIDE_EXTRA, with the PSNR per photo."""
    from vitvq.data import sources

    extra = held_out_images(size, WIDE_EXTRA)
    extra_codes, extra_recon = run_model(extra)
    wide_psnr = np.concatenate([ours, psnr_uint8(extra, extra_recon)])
    wide_thumb = np.concatenate([thumb, psnr_uint8(extra, thumbnail(extra))])
    # Which photo each wide image comes from, for the per-photo figures.
    names = np.concatenate([held_out_names(), held_out_names(WIDE_EXTRA)])
    per_photo = {
        name: [
            round(float(wide_psnr[names == name].mean()), 2),
            round(float(wide_thumb[names == name].mean()), 2),
        ]
        for name in [*sources.PHOTOS_EVAL, *WIDE_EXTRA]
    }
    textured = [n for n in per_photo if n not in FLAT_PHOTOS]
    wide_codes = np.concatenate([codes.reshape(len(ours), -1), extra_codes.reshape(len(extra), -1)])
    return {
        "photos": [*sources.PHOTOS_EVAL, *WIDE_EXTRA],
        "num_held_out": int(len(wide_psnr)),
        "psnr": round(float(wide_psnr.mean()), 3),
        "psnr_thumbnail": round(float(wide_thumb.mean()), 3),
        "psnr_per_photo": per_photo,  # name: [ours, thumbnail]
        # The per-photo means over the textured photos (all but the two nearly flat ones).
        "textured_psnr": round(float(np.mean([per_photo[n][0] for n in textured])), 3),
        "textured_psnr_thumbnail": round(float(np.mean([per_photo[n][1] for n in textured])), 3),
        "textured_ahead": sum(per_photo[n][0] > per_photo[n][1] for n in textured),
        "codebook_usage": round(len(np.unique(wide_codes)) / k, 4),
    }


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from vitvq import data as data_lib
    from vitvq import parallel
    from vitvq.data import sources
    from vitvq.data.globalize import to_global
    from vitvq.evaluation import metrics
    from vitvq.models.perceptual import lpips_fn
    from vitvq.train.stage1 import Stage1

    config = _CONFIG.value
    if _SELECT.value:
        use_selection_split()
    mesh = parallel.make_mesh(config.mesh)
    trainer = Stage1(config, mesh)
    model = trainer.model
    start = time.time()
    state, shardings = trainer.create_state(config.seed)
    step_fn = trainer.jit_train_step(shardings)
    batches = data_lib.train_batches(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
    )
    budget = _MINUTES.value * 60.0
    step, history = 0, []
    while time.time() - start < budget and step < config.total_steps:
        state, m = step_fn(state, to_global(next(batches), mesh), step)
        step += 1
        if step % _LOG_EVERY.value == 0:
            m = jax.device_get(m)
            row = {
                "step": step,
                "seconds": round(time.time() - start, 1),
                "loss": float(m["loss/total"]),
                "l2": float(m["loss/l2"]),
                "batch_codes_used": int(m["vq/codes_used"]),
                "restarted": int(m.get("vq/restarted_codes", 0)),
            }
            for key in ("loss/perceptual", "loss/logit_laplace", "loss/adversarial", "disc/loss"):
                if key in m:
                    row[key.replace("loss/", "")] = round(float(m[key]), 4)
            history.append(row)
            print(json.dumps(row), flush=True)
    train_seconds = time.time() - start

    params, stats = state.params, state.vq_stats

    @jax.jit
    def reconstruct(images):
        codes, _ = model.apply({"params": params, "vq_stats": stats}, images, method=model.encode)
        recon = model.apply({"params": params, "vq_stats": stats}, codes, method=model.decode)
        return codes, recon

    def run_model(images_uint8):
        codes, recon = apply_in_chunks(reconstruct, images_uint8)
        return codes, to_uint8(recon)

    held_out = held_out_images(config.image_size)
    codes, recon = run_model(held_out)
    ours = psnr_uint8(held_out, recon)
    thumb = psnr_uint8(held_out, thumbnail(held_out))
    x = jnp.asarray(held_out, jnp.float32) / 255.0
    y = jnp.asarray(recon, jnp.float32) / 255.0
    ssim = float(jnp.mean(metrics.ssim(y, x)))
    lpips = lpips_fn()
    lp = float(
        np.mean(
            [np.mean(np.asarray(lpips(y[i : i + 64], x[i : i + 64]))) for i in range(0, len(x), 64)]
        )
    )
    train_imgs = np.concatenate(
        [
            (next(batches)["image"] * 255.0 + 0.5).astype(np.uint8)
            for _ in range(len(held_out) // config.batch_size + 1)
        ]
    )[: len(held_out)]
    train_codes, _ = run_model(train_imgs)
    grid_codes, _ = run_model(
        held_out_images(config.image_size, TRAIN_GRID_PHOTOS)[: len(held_out)]
    )
    k = model.num_codes  # the quantizer's code count (FSQ: prod(levels))
    wide = (
        None if _SELECT.value else measure_wide(run_model, config.image_size, ours, thumb, codes, k)
    )
    grid = np.concatenate(
        [
            np.concatenate(list(held_out[:: len(held_out) // 8][:8]), axis=1),
            np.concatenate(list(recon[:: len(held_out) // 8][:8]), axis=1),
        ],
        axis=0,
    )
    os.makedirs(_OUT.value, exist_ok=True)
    png = os.path.join(_OUT.value, "held_out_reconstructions.png")
    Image.fromarray(grid).save(png)
    # Every held-out image and its reconstruction, for side-by-side pictures of several runs
    # (benchmarks/side_by_side.py).
    arrays = os.path.join(_OUT.value, "held_out.npz")
    np.savez_compressed(arrays, images=held_out, recon=recon, psnr=ours)

    result = {
        "command": " ".join(["benchmarks/quality_photos.py", *sys.argv[1:]]),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "num_held_out": int(len(held_out)),
        "psnr": round(float(ours.mean()), 3),
        "psnr_min": round(float(ours.min()), 3),
        "psnr_thumbnail": round(float(thumb.mean()), 3),
        "ssim": round(ssim, 4),
        "lpips": round(lp, 4),
        "codebook_usage": round(len(np.unique(codes)) / k, 4),
        "codebook_usage_train_crops": round(len(np.unique(train_codes)) / k, 4),
        "codebook_usage_train_grid": round(len(np.unique(grid_codes)) / k, 4),
        "psnr_thumbnail_16": round(float(psnr_uint8(held_out, thumbnail(held_out, 16)).mean()), 3),
        "held_out_photos": list(sources.PHOTOS_EVAL),
        "wide": wide,
        "png": png,
        "arrays": arrays,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
