"""Codebook usage by quantizer kind, in miniature (issue 31): each `model.quantizer` kind at
about 8k and 64k codes, trained as the collapse study trains (`collapse.study_config`).

    python benchmarks/quantizers.py run --row=NAME [--steps=300 --batch=16 --width=256
        --depth=4 --image_size=64] [--out=DIR]
    python benchmarks/quantizers.py all --out=DIR [--rows=paper,fsq-8k] [scale flags as run]
    python benchmarks/quantizers.py table DIR [--png=curves.png [--png_rows=paper,fsq-8k]]

Scale (BENCHMARKS.md, "Over training"): the SS config at 256 wide x 4 blocks on 64x64 photo
crops, batch 16 (1,024 tokens), 300 steps of the paper's optimizer shrunk to the run, LPIPS
and the GAN off in training. A smaller scale is fine if every row uses it (`table` says when
the rows' scales differ).

Rows (`ROWS`, the table's order): the paper's recipe first (vq, normal init, straight-through,
gradient-trained codes); today's defaults (k-means init + dead-code restart every 25 steps:
the only row with a restart); the k-means init alone, and with an EMA codebook or the
rotation trick (8k: k-means init is not a restart); vq with an EMA codebook and with the
rotation trick, SimVQ, FSQ and LFQ at about 8k and 64k codes, all with the normal init (only
vq reads it) and no restart. FSQ levels (8,8,5,5,5) = 8,000 and (8,8,8,5,5,5) = 64,000 (the
FSQ paper's levels for 2**16, and one 8 fewer: both 97.7% of the power of two). LFQ 13 bits
(one entropy group: 13 is prime) and 16 bits (the default 2 groups of 8 bits).

`run` trains one row in its process and writes DIR/NAME.json at the end; `all` runs the
missing rows one after another, each in a subprocess (log: DIR/NAME.log), so a stopped `all`
resumes at the first row without a JSON. Per row:
- codes used, counted from the codes: each of the last 30 training batches is encoded
  (`model.encode`, with the parameters its step trains) before its step; distinct indices per
  batch (their mean is what the default bar reads) and over the 30 x 1,024 = 30,720 tokens
  together (ceiling min(codes, 30,720));
- held-out (the trainer's evaluation, 384 crops of the two held-out photos): distinct codes,
  PSNR and LPIPS (VGG) after the last step;
- effective rank of the unit latents of the last batch after the last step
  (`collapse.spread`; at most their dimension: 32 vq/SimVQ, 5-6 FSQ, 13-16 LFQ);
- img/s: training images per second over steps 1.. (step 0 holds the compile), encodes
  excluded; a curve of the step's `vq/codes_used` and perplexity every 5 steps (`--png`).

Default bar (`passes`): mean distinct codes per batch over the last 30 steps >= half of
min(tokens per batch, codes) (512 of 1,024), no restart, held-out PSNR >= 22.69 dB (the
defaults' figure in the collapse study at batch 16: meaningful at this scale only).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WINDOW = 30  # the last steps whose batches are encoded
EVERY = 5  # steps between the curve's points
PSNR_BAR = 22.69  # dB: the defaults' held-out PSNR, collapse study, batch 16
RESTART = (
    "codebook_init.kind=kmeans",
    "codebook_restart.every_steps=25",
    "codebook_restart.threshold=0.03",
    "codebook_restart.start_step=25",
)
NORMAL = ("codebook_init.kind=normal",)
K64 = ("model.codebook_size=65536",)


KMEANS = ("codebook_init.kind=kmeans",)


def _q(*keys: str, init: tuple[str, ...] = NORMAL) -> tuple[str, ...]:
    return init + tuple(f"model.quantizer.{k}" for k in keys)


def _k(*keys: str) -> tuple[str, ...]:
    return _q(*keys, init=KMEANS)


ROWS = {  # name -> (label, overrides of collapse.study_config)
    "paper": ("vq, paper (normal init, straight-through)", NORMAL),
    "defaults": ("vq, defaults (k-means + restart)", RESTART),
    "vq-kmeans": ("vq, k-means init, no restart", KMEANS),
    "vq-kmeans-ema-8k": ("vq, k-means init + EMA codebook", _k("update=ema")),
    "vq-kmeans-rotation-8k": ("vq, k-means init + rotation trick", _k("gradient=rotation")),
    "vq-ema-8k": ("vq, EMA codebook", _q("update=ema")),
    "vq-ema-64k": ("vq, EMA codebook", _q("update=ema") + K64),
    "vq-rotation-8k": ("vq, rotation trick", _q("gradient=rotation")),
    "vq-rotation-64k": ("vq, rotation trick", _q("gradient=rotation") + K64),
    "simvq-8k": ("SimVQ", _q("kind=simvq")),
    "simvq-64k": ("SimVQ", _q("kind=simvq") + K64),
    "fsq-8k": ("FSQ (8,8,5,5,5)", _q("kind=fsq", "levels=(8,8,5,5,5)")),
    "fsq-64k": ("FSQ (8,8,8,5,5,5)", _q("kind=fsq", "levels=(8,8,8,5,5,5)")),
    "lfq-8k": ("LFQ 13 bits", _q("kind=lfq", "bits=13", "entropy_groups=1")),
    "lfq-64k": ("LFQ 16 bits", _q("kind=lfq", "bits=16")),
}
COMMON = ("loss.perceptual=0.0", "loss.adversarial=0.0", "eval_lpips=True")
SCALE = (("steps", 300), ("batch", 16), ("width", 256), ("depth", 4), ("image_size", 64))


def overrides(row: str) -> list[str]:
    """The `--set` assignments of a row, the study's common ones first."""
    return [*COMMON, *ROWS[row][1]]


def usage(codes: list, num_codes: int) -> dict:
    """Distinct codes of the batches `codes` (index arrays, one per step): per batch, their
    mean, and over all of them together, with the ceilings min(codes, tokens)."""
    flat = [np.asarray(c).reshape(-1) for c in codes]
    per_batch = [int(np.unique(c).size) for c in flat]
    tokens = int(sum(c.size for c in flat))
    return {
        "steps": len(flat),
        "tokens_per_batch": int(flat[0].size),
        "distinct_per_batch": per_batch,
        "mean_distinct_per_batch": round(float(np.mean(per_batch)), 1),
        "batch_ceiling": min(num_codes, int(flat[0].size)),
        "distinct": int(np.unique(np.concatenate(flat)).size),
        "tokens": tokens,
        "ceiling": min(num_codes, tokens),
    }


def passes(result: dict) -> tuple[bool, str]:
    """Whether a row meets the default bar, and why not ("" when it does)."""
    u = result["usage"]
    why = []
    if u["mean_distinct_per_batch"] < 0.5 * u["batch_ceiling"]:
        why.append(f"usage < {u['batch_ceiling'] / 2:g}")
    if result["restart"]:
        why.append("restart")
    if result["held_out"]["psnr"] < PSNR_BAR:
        why.append(f"PSNR < {PSNR_BAR}")
    return not why, ", ".join(why)


def table(results: list[dict]) -> str:
    """The Markdown table of `results` (rows in `ROWS` order), with its ceilings stated."""
    order = {name: k for k, name in enumerate(ROWS)}
    results = sorted(results, key=lambda r: order.get(r["row"], len(order)))
    u = results[0]["usage"]
    ceilings = ", ".join(f"{c:,}" for c in sorted({r["usage"]["ceiling"] for r in results}))
    big = sorted({r["num_codes"] for r in results if r["num_codes"] > u["tokens"]})
    if big:
        ceilings += f": {' and '.join(f'{c:,}' for c in big)} codes give at most {u['tokens']:,}"
    lines = [
        f"Last {u['steps']} steps: {u['steps']} x {u['tokens_per_batch']:,} = {u['tokens']:,} "
        f"tokens, so their distinct codes are at most min(codes, {u['tokens']:,}) (here "
        f"{ceilings}), a batch's min(codes, {u['tokens_per_batch']:,}). Default bar: mean per "
        f"batch >= half of that, no restart, held-out PSNR >= {PSNR_BAR} dB.",
        "",
        "| row | quantizer | codes | distinct, last steps (of ceiling) | mean per batch "
        "(of ceiling) | held-out codes (of codes) | latent eff. rank (of dim) | held-out PSNR "
        "| held-out LPIPS | img/s | default bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        u, h = r["usage"], r["held_out"]
        ok, why = passes(r)
        lines.append(
            f"| {r['row']} | {r['label']} | {r['num_codes']:,} | {u['distinct']:,} / "
            f"{u['ceiling']:,} ({u['distinct'] / u['ceiling']:.0%}) | "
            f"{u['mean_distinct_per_batch']:,.0f} / {u['batch_ceiling']:,} | "
            f"{h['codes_used']:,.0f} ({h['codes_used'] / r['num_codes']:.1%}) | "
            f"{r['eff_rank']:.2f} / {r['latent_dim']} | "
            f"{h['psnr']:.2f} | {h.get('lpips', float('nan')):.4f} | {r['img_per_s']:.2f} | "
            f"{'pass' if ok else 'fail: ' + why} |"
        )
    scales = {json.dumps(r["scale"], sort_keys=True) for r in results}
    if len(scales) > 1:
        lines += ["", f"Rows at different scales: {sorted(scales)}."]
    missing = [name for name in ROWS if name not in {r["row"] for r in results}]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    return "\n".join(lines)


# --- run ---------------------------------------------------------------------------------


def train_row(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import collapse  # sets JAX_PLATFORMS=cpu unless set, then imports jax
    import jax

    from vitvq.data.globalize import to_global
    from vitvq.train.stage1 import check_config, make_evaluator
    from vitvq.train.stage1_step import model_collections

    scale = {k: getattr(args, k) for k, _ in SCALE}
    study = argparse.Namespace(preset="SS", set=overrides(args.row), **scale)
    config = collapse.study_config(study)
    check_config(config)  # one line naming a bad key before anything is built
    trainer, state, step_fn, batches = collapse.start_training(config)
    mesh, model = trainer.mesh, trainer.model

    @jax.jit
    def encode(state, images):
        other = model_collections(state.vq_stats, state.quantizer_state)
        return model.apply({"params": state.params, **other}, images, method=model.encode)

    steps, window = config.total_steps, min(WINDOW, config.total_steps)
    codes, curve, excluded, t0 = [], [], 0.0, time.time()
    for step in range(steps):
        batch = to_global(next(batches), mesh)
        if step >= steps - window:  # this step's codes, with the parameters it trains
            jax.block_until_ready(state)
            t = time.time()
            codes.append(np.asarray(encode(state, batch["image"])[0]))
            if step > 0:  # the clock starts after step 0 (see below)
                excluded += time.time() - t
        state, metrics = step_fn(state, batch, step)
        if step == 0:
            jax.block_until_ready(state)
            t_train = time.time()
        if step % EVERY == 0 or step == steps - 1:
            m = jax.device_get(metrics)
            curve.append({"step": step, "seconds": round(time.time() - t0, 1)})
            for key in ("vq/codes_used", "vq/perplexity", "loss/total"):
                curve[-1][key.split("/")[1]] = round(float(m[key]), 4)
            print(json.dumps(curve[-1]), flush=True)
    jax.block_until_ready(state)
    train_seconds = time.time() - t_train - excluded
    _, aux = encode(state, batch["image"])
    latents = collapse.spread(aux["latents"], np.eye(1, aux["latents"].shape[-1]))
    evaluate, _ = make_evaluator(trainer, config)
    held_out = {k: round(float(v), 4) for k, v in evaluate(state).items()}
    return {
        "row": args.row,
        "label": ROWS[args.row][0],
        "overrides": overrides(args.row),
        "scale": scale,
        "kind": config.model.quantizer.kind,
        "num_codes": model.num_codes,
        "codebook_size": model.num_codes,  # for collapse.plot
        "tokens_per_batch": int(codes[0].size),
        "latent_dim": int(aux["latents"].shape[-1]),
        "restart": model.quantization.kind == "vq" and config.codebook_restart.every_steps > 0,
        "usage": usage(codes, model.num_codes),
        "held_out": held_out,
        "eff_rank": latents["eff_rank"],
        "latent_mean_norm": latents["mean_norm"],
        "img_per_s": round(config.batch_size * (steps - 1) / max(train_seconds, 1e-9), 3),
        "curve": curve,
        "seconds": round(time.time() - t0, 1),
    }


def write_json(path: pathlib.Path, result: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, path)  # a row's file exists only once it is complete


def read_rows(directory: pathlib.Path) -> list[dict]:
    """The rows' JSON files in `directory`, in `ROWS` order."""
    paths = [directory / f"{name}.json" for name in ROWS]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def run_all(args) -> dict:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.rows.split(",") if args.rows else list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    done, failed = [], {}
    for name in names:
        if (out / f"{name}.json").exists():
            print(f"{name}: {out / name}.json exists, skipped", flush=True)
            continue
        flags = [f"--{k}={getattr(args, k)}" for k, _ in SCALE]
        argv = [sys.executable, __file__, "run", f"--row={name}", f"--out={out}", *flags]
        print(f"{name}: {' '.join(argv[2:])}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc == 0:
            done.append(name)
        else:
            failed[name] = rc
        print(f"{name}: exit {rc}", flush=True)
    rows = read_rows(out)
    if rows:
        print(table(rows), flush=True)
    return {"out": str(out), "ran": done, "failed": failed}


def print_table(directory: pathlib.Path, png: str, png_rows: str = "") -> None:
    rows = read_rows(directory)
    if not rows:
        raise SystemExit(f"no row JSON in {directory}")
    print(table(rows))
    if png:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import collapse

        names = png_rows.split(",") if png_rows else [r["row"] for r in rows]
        drawn = [r for r in rows if r["row"] in names]
        collapse.plot([{**r, "label": f"{r['row']}: {r['label']}"} for r in drawn], png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    for name in ("run", "all"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("--row", required=True, choices=list(ROWS))
        else:
            p.add_argument("--rows", default="", help="comma-separated; default: all")
        p.add_argument("--out", default="quantizer_rows", required=name == "all")
        for key, default in SCALE:
            p.add_argument(f"--{key}", type=int, default=default)
    p_table = sub.add_parser("table")
    p_table.add_argument("dir")
    p_table.add_argument("--png", default="")
    p_table.add_argument("--png_rows", default="", help="rows to draw (comma-separated)")
    args = parser.parse_args()
    if args.part == "table":
        return print_table(pathlib.Path(args.dir), args.png, args.png_rows)
    if args.part == "all":
        result = run_all(args)
        print(json.dumps(result))
        sys.exit(1 if result["failed"] else 0)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = train_row(args)
    write_json(out / f"{args.row}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
