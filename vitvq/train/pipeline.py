"""The whole pipeline in one run (configs/demo.py): tokenizer -> bundle -> VIM -> bundle ->
samples.

    workdir/tokenizer/       the stage-1 run (the config's top-level keys)
    workdir/vim/             the stage-2 run (the config's `vim` block)
    workdir/bundle/          tokenizer + VIM bundle (vitvq.load_sampler / load_tokenizer)
    workdir/samples.png      one row per class, sampled from the bundle
    workdir/reconstructions.png   held-out images (top) and their reconstructions (bottom)

Every part resumes: running the command again continues the stage that was interrupted and
redoes the (cheap) exports and images.
"""

import json
import logging
import os
import time

import jax
import numpy as np

from vitvq import config_check, preemption
from vitvq import data as data_lib
from vitvq.data import sources
from vitvq.evaluation import linear_probe, metrics, sample_quality
from vitvq.pictures import caption_columns, image_grid, label_rows, save_png
from vitvq.sampler import load_sampler, sample_grid
from vitvq.train import stage1, stage2
from vitvq.train.export import export

logger = logging.getLogger(__name__)


def _stage(name: str, message: str) -> float:
    print(f"[{name}] {message}", flush=True)
    return time.time()


def _digits_checks(sampler, vim_config) -> dict[str, float]:
    """Sample recognition by a classifier trained on real digits; the linear probe of the
    VIM's middle block against the same probe on raw pixels."""
    digits = sources.load_digits(sampler.image_size)
    train_x, train_y = np.stack(digits.train.images), digits.train.labels
    test_x, test_y = np.stack(digits.eval.images), digits.eval.labels
    sc = vim_config.sampling
    recognition = sample_quality.class_recognition(
        sampler,
        train_x,
        train_y,
        test_x,
        test_y,
        per_class=20,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        cfg_scale=sc.cfg_scale,
        acceptance_rate=0.5,  # also with rejection at the paper's rate (another classifier)
    )
    block = linear_probe.probe_block(sampler.model.transformer.depth)
    probe = linear_probe.vim_probe(sampler, train_x, train_y, test_x, test_y, block=block)
    pixels = linear_probe.pixel_probe(train_x, train_y, test_x, test_y)
    print(
        f"samples recognized as their class: {recognition['recognized']:.3f} (a logistic "
        f"regression on real digits; {recognition['real_top1']:.3f} on held-out real digits)\n"
        f"with rejection (acceptance rate 0.5, a classifier on 8x8 digits that scores "
        f"{recognition['rejecter_real_top1']:.3f}): "
        f"{recognition['recognized_with_rejection']:.3f}\n"
        f"linear probe, VIM block {block}: {probe['top1']:.3f} top-1; raw pixels: "
        f"{pixels['top1']:.3f}",
        flush=True,
    )
    out = {f"samples/{k}": v for k, v in recognition.items()}
    out["probe/vim_top1"] = probe["top1"]
    out["probe/vim_block"] = float(block)
    out["probe/pixels_top1"] = pixels["top1"]
    return out


def _preempted(what: str) -> bool:
    """True when the stage just run stopped for a preemption: the pipeline stops too (the
    same command resumes that stage)."""
    step = preemption.stopped_at()
    if step is not None:
        _stage("preempted", f"the {what} run stopped at step {step}; run the command again")
    return step is not None


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    # Both stages' keys now, once: a bad VIM value must not wait for the tokenizer's training.
    config = config_check.check(
        config,
        trainer="pipeline",
        num_devices=jax.device_count(),
        process_count=jax.process_count(),
    )
    tok_dir = os.path.join(workdir, "tokenizer")
    vim_dir = os.path.join(workdir, "vim")
    tok_bundle = os.path.join(workdir, "tokenizer_bundle")
    out_bundle = os.path.join(workdir, "bundle")
    stage1_config = config.without("vim").replace(trainer="vitvqgan")
    start = time.time()

    t = _stage("1/5", f"training the tokenizer ({stage1_config.total_steps} steps) in {tok_dir}")
    # Each stage's final evaluation is its last eval line; the JSON line is the run's own.
    tok_metrics = stage1.train_and_evaluate(stage1_config, tok_dir, summary=False)
    if _preempted("tokenizer"):
        return {}
    logger.info("tokenizer done in %.0f s", time.time() - t)

    _stage("2/5", f"exporting the tokenizer to {tok_bundle}")
    if jax.process_index() == 0:
        export(tok_dir, tok_bundle, overwrite=True)

    vim_config = config.vim.replace(tokenizer_bundle=tok_bundle)
    t = _stage("3/5", f"training the VIM ({vim_config.total_steps} steps) in {vim_dir}")
    vim_metrics = stage2.train_and_evaluate(vim_config, vim_dir, summary=False)
    if _preempted("VIM"):
        return {}
    logger.info("VIM done in %.0f s", time.time() - t)

    _stage("4/5", f"exporting tokenizer + VIM to {out_bundle}")
    if jax.process_index() == 0:
        export(tok_dir, out_bundle, vim_workdir=vim_dir, overwrite=True)

    _stage("5/5", "sampling and reconstructing from the bundle")
    result = {f"tokenizer/{k}": v for k, v in tok_metrics.items()}
    result.update({f"vim/{k}": v for k, v in vim_metrics.items()})
    if jax.process_index() == 0:
        sampler = load_sampler(out_bundle)
        sc = config.vim.sampling
        grid = sample_grid(
            sampler,
            num_samples=int(sc.num_per_class),
            labels=None,
            seed=int(config.seed),
            temperature=sc.temperature,
            top_k=sc.top_k,
            top_p=sc.top_p,
            cfg_scale=sc.cfg_scale,
        )
        save_png(os.path.join(workdir, "samples.png"), grid)
        batch = next(
            iter(
                data_lib.eval_batches(
                    stage1_config.dataset,
                    image_size=sampler.image_size,
                    global_batch_size=16,
                    num_examples=16,
                )
            )
        )
        originals = np.round(batch["image"] * 255.0).astype(np.uint8)
        recons = sampler.tokenizer.reconstruct(originals)
        plain = image_grid([originals / 255.0, recons / 255.0], max_columns=16)
        grid = label_rows(plain, ["input", "decoded"], sampler.image_size)
        psnrs = metrics.psnr(originals, recons, data_range=255.0)
        grid = caption_columns(  # each pair's PSNR (dB) under it
            grid,
            [f"{float(p):.1f}" for p in psnrs],
            sampler.image_size,
            left=grid.shape[1] - plain.shape[1],
            title="PSNR",
        )
        save_png(os.path.join(workdir, "reconstructions.png"), grid)
        if sampler.num_classes and stage1_config.dataset.name == "digits":
            result.update(_digits_checks(sampler, vim_config))
    print(
        f"done in {time.time() - start:.0f} s:\n"
        f"  samples          {os.path.join(workdir, 'samples.png')} (one row per class)\n"
        f"  reconstructions  {os.path.join(workdir, 'reconstructions.png')}\n"
        f"  bundle           {out_bundle} (vitvq.load_sampler / vitvq.load_tokenizer)\n"
        f"  runs             {tok_dir}, {vim_dir}",
        flush=True,
    )
    print(json.dumps({"final_eval": result}, sort_keys=True))
    return result
