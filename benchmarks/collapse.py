"""Codebook collapse study: how many codes a ViT-VQGAN uses at initialization and over the
first few hundred steps of the paper's recipe, on real photos.

    python benchmarks/collapse.py init  [--presets=SS,BB] [--seeds=3] [--images=8]
    python benchmarks/collapse.py train --preset=SS --batch=16 [--steps=300] [--every=5]
        [--width=256 --depth=4] [--image_size=64] [--set=model.l2_normalize_codes=False ...]
        [--png=curves.png]
    python benchmarks/collapse.py plot RUN1.log RUN2.log ... --png=curves.png

`init`: the paper's SS and BB models at 256x256, full width and depth, freshly initialized,
encode random 256x256 crops of the bundled training photos (8 crops = 8,192 tokens per seed).
Reports the distinct codes, and for each stage of the encoder (patch embedding, + position
embedding, transformer, tanh head) the codes its output would pick through the same
projection, the norm of the mean unit latent (0: spread over the sphere, 1: all one
direction) and the effective rank of the unit latents (participation ratio of their
covariance; 32 for isotropic 32-d codes). Random unit vectors and a codebook initialized from
encoder outputs of *other* crops are the references. Also: distinct codes as the number of
tokens grows (what a larger batch would see at step 0).

`train`: the stage-1 trainer's own step (`vitvq.train.stage1.Stage1`: the config's loss,
optimizer and schedule, the discriminator, LPIPS) on the real photos pipeline, from a paper
config (`--preset` SS = configs/vitvq_small.py, BB = configs/vitvq_base.py) with the
reductions named on the command line. Records codes used per training batch and the
perplexity of the batch's code distribution every `--every` steps, and held-out usage on
the held-out photos at the end. The learning-rate warmup and cosine are the paper's shape
shrunk to the run (warmup over the first 10% of the steps, as 50k of 500k), dead-code
restart off.

The last line printed is one JSON object.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vitvq.data.sources import load_photos  # noqa: E402
from vitvq.models.quantizer import l2_normalize, nearest_code  # noqa: E402

PRESET_CONFIGS = {"SS": "vitvq_small.py", "BB": "vitvq_base.py"}


def photo_crops(size: int, count: int, seed: int) -> np.ndarray:
    """`count` random size x size crops (native resolution) of the training photos, [0, 1]."""
    photos = load_photos(size).train.images
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = photos[rng.integers(len(photos))]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        out.append(image[top : top + size, left : left + size])
    return np.stack(out).astype(np.float32) / 255.0


def spread(latents, codebook) -> dict:
    """Codes picked by `latents` ([N, D], unit-normalized here) from `codebook`, the norm of
    their mean direction and their effective rank."""
    z = np.asarray(latents, np.float64).reshape(-1, np.shape(latents)[-1])
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    idx = np.asarray(nearest_code(jnp.asarray(z, jnp.float32), l2_normalize(codebook), 1024))
    eig = np.clip(np.linalg.eigvalsh(np.cov(z.T)), 0.0, None)
    return {
        "codes": int(len(np.unique(idx))),
        "mean_norm": round(float(np.linalg.norm(z.mean(0))), 3),
        "eff_rank": round(float(eig.sum() ** 2 / max((eig**2).sum(), 1e-30)), 2),
    }


def load_config(preset: str):
    import importlib.util

    path = ROOT / "configs" / PRESET_CONFIGS[preset]
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# --- init --------------------------------------------------------------------------------


def init_study(args) -> dict:
    from vitvq.models.vitvqgan import vitvqgan_from_preset

    size = 256
    results = {}
    for preset in args.presets.split(","):
        model = vitvqgan_from_preset(preset, image_size=size, posemb=args.posemb)
        # Variables are arguments (not closed over): one compile per preset, no copies of the
        # weights baked into programs.
        encode = jax.jit(lambda v, x, m=model: m.apply(v, x, method=m.encode))
        capture = jax.jit(
            lambda v, x, m=model: m.apply(
                v, x, method=m.encode, capture_intermediates=True, mutable=["intermediates"]
            )
        )
        rows = []
        for seed in range(args.seeds):
            images = photo_crops(size, args.images, 1000 + seed)
            others = photo_crops(size, args.images, 2000 + seed)
            t0 = time.time()
            variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed), images[:1]))
            params = variables["params"]

            (indices, _), inter = capture(variables, images)
            enc = inter["intermediates"]["enc"]
            proj = params["quantizer"]["project_down"]
            codebook = params["quantizer"]["codebook"]
            stages = {
                "patch_embedding": enc["patch_embedding"]["__call__"][0],
                "+position": enc["PositionEmbedding_0"]["__call__"][0],
                "transformer": enc["transformer"]["__call__"][0],
                "tanh_head": enc["head"]["__call__"][0],
            }
            row = {"seed": seed, "tokens": int(indices.size)}
            row["codes"] = int(len(np.unique(np.asarray(indices))))
            for name, h in stages.items():
                row[name] = spread(h @ proj["kernel"] + proj["bias"], codebook)
            position = enc["PositionEmbedding_0"]["__call__"][0] - stages["patch_embedding"]
            row["position_only"] = spread(position @ proj["kernel"] + proj["bias"], codebook)
            rnd = jax.random.normal(jax.random.key(10_000 + seed), (indices.size, 32))
            row["random_unit_latents"] = spread(rnd, codebook)
            # A codebook made of the unit latents of other crops (what initializing the
            # codebook from encoder outputs gives), searched by these crops' latents.
            (_, _), inter_o = capture(variables, others)
            z_o = inter_o["intermediates"]["enc"]["head"]["__call__"][0]
            z_o = np.asarray(z_o @ proj["kernel"] + proj["bias"]).reshape(-1, 32)
            row["codebook_from_other_crops"] = spread(
                stages["tanh_head"] @ proj["kernel"] + proj["bias"], jnp.asarray(z_o)
            )
            row["seconds"] = round(time.time() - t0, 1)
            print(json.dumps({preset: row}), flush=True)
            rows.append(row)
        # Distinct codes as the token count grows (seed 0), what a larger batch would see.
        variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), np.zeros((1, size, size, 3))))
        growth = {}
        seen = []
        for chunk in range(args.growth_chunks):
            idx, _ = encode(variables, photo_crops(size, args.images, 3000 + chunk))
            seen.append(np.asarray(idx).reshape(-1))
            growth[int(sum(len(s) for s in seen))] = int(len(np.unique(np.concatenate(seen))))
        print(json.dumps({preset: {"codes_by_tokens": growth}}), flush=True)
        results[preset] = {"seeds": rows, "codes_by_tokens": growth}
    return results


# --- train -------------------------------------------------------------------------------


def apply_override(config, assignment: str) -> None:
    """One `--set=KEY=VALUE` applied to `config`: train_step.py's `--config.KEY=VALUE` parser
    (the value typed like the one it replaces; an unknown key exits with one line)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import apply_overrides

    apply_overrides(config, [f"--config.{assignment}"])


def study_config(args):
    from configs import common

    c = load_config(args.preset)
    c.dataset = common.dataset("photos", crop_scale=(0.2, 1.0))
    c.image_size = args.image_size
    c.batch_size = args.batch
    c.total_steps = args.steps
    c.dtype = "float32"
    c.eval_batch_size = 64
    c.eval_num_examples = 0
    c.eval_lpips = False
    if args.width:
        for name in ("encoder", "decoder"):
            spec = c.model[name]
            heads = max(1, args.width // 64)
            spec.update(width=args.width, num_heads=heads, mlp_dim=4 * args.width)
    if args.depth:
        c.model.encoder.depth = args.depth
        c.model.decoder.depth = args.depth
    for opt in (c.optimizer, c.disc_optimizer):
        opt.warmup_steps = max(1, args.steps // 10)
    c.codebook_restart.every_steps = 0
    for assignment in args.set:
        apply_override(c, assignment)
    return c


def start_training(config):
    """The stage-1 trainer of `config`: (trainer, its fresh state, the jitted step, the
    training batches from step 0); the mesh is `trainer.mesh`."""
    from vitvq import parallel
    from vitvq.train import runner
    from vitvq.train.stage1 import Stage1

    trainer = Stage1(config, parallel.make_mesh(config.mesh))
    state, shardings = trainer.create_state(config.seed)
    batches = runner.train_batches(
        config.dataset, image_size=config.image_size, batch_size=config.batch_size, seed=config.seed
    )(0)
    return trainer, state, trainer.jit_train_step(shardings), batches


def train_study(args) -> dict:
    from vitvq.data.globalize import to_global
    from vitvq.train.stage1 import make_evaluator

    config = study_config(args)
    trainer, state, step_fn, batches = start_training(config)
    mesh, model = trainer.mesh, trainer.model

    @jax.jit
    def encode(state, images):
        variables = {"params": state.params, "vq_stats": state.vq_stats}
        return model.apply(variables, images, method=model.encode)

    curve = []
    t0 = time.time()
    for step in range(config.total_steps):
        batch = to_global(next(batches), mesh)
        state, metrics = step_fn(state, batch, step)
        if step % args.every == 0 or step == config.total_steps - 1:
            m = jax.device_get(metrics)
            _, aux = encode(state, batch["image"])
            latents = spread(aux["latents"], np.eye(1, aux["latents"].shape[-1]))
            point = {
                "step": step,
                "codes_used": int(m["vq/codes_used"]),
                "perplexity": round(float(m["vq/perplexity"]), 1),
                "vq_loss": round(float(m["loss/vq"]), 4),
                "total_loss": round(float(m["loss/total"]), 4),
                "l2": round(float(m["loss/l2"]), 5),
                "latent_mean_norm": latents["mean_norm"],
                "latent_eff_rank": latents["eff_rank"],
                "seconds": round(time.time() - t0, 1),
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
    evaluate, _ = make_evaluator(trainer, config)
    held_out = {k: round(float(v), 4) for k, v in evaluate(state).items()}
    tokens = config.batch_size * (config.image_size // config.model.patch_size) ** 2
    result = {
        "preset": args.preset,
        "width": config.model.encoder.width,
        "depth": config.model.encoder.depth,
        "image_size": config.image_size,
        "batch": config.batch_size,
        "tokens_per_batch": tokens,
        "codebook_size": config.model.codebook_size,
        "overrides": args.set,
        "steps": config.total_steps,
        "curve": curve,
        "held_out": held_out,
        "seconds": round(time.time() - t0, 1),
    }
    if args.png:
        plot([result], args.png)
    return result


def describe(result: dict) -> str:
    """A short name of a `train` run: tokens per batch, init, restart, normalization."""
    settings = dict(o.partition("=")[::2] for o in result["overrides"])
    init = {"normal": "paper init (normal)", "kmeans": "k-means init"}[
        settings.get("codebook_init.kind", "kmeans")
    ]
    parts = [f"{result['tokens_per_batch']} tokens", init]
    if settings.get("codebook_restart.every_steps", "0") != "0":
        parts.append("+restart")
    if settings.get("model.l2_normalize_codes") == "False":
        parts.append("raw codes")
    return " ".join(parts)


COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def plot(results: list[dict], path: str) -> None:
    """Two panels drawn with PIL (a dependency; no plotting library needed): codes used per
    batch as a share of min(tokens per batch, codebook size), and the perplexity (log
    scale), against the step; a legend below."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, pad = 520, 300, 50
    legend_h = 18 * len(results) + 10
    image = Image.new("RGB", (2 * panel_w + 3 * pad, panel_h + 2 * pad + legend_h), "white")
    draw = ImageDraw.Draw(image)
    max_step = max(p["step"] for r in results for p in r["curve"]) or 1
    max_ppl = max(p["perplexity"] for r in results for p in r["curve"])
    log_top = np.log10(max(max_ppl, 10.0))
    panels = [
        (
            "codes used per batch / min(tokens, codebook)",
            lambda r, p: p["codes_used"] / min(r["tokens_per_batch"], r["codebook_size"]),
        ),
        (
            "perplexity of the batch's codes (log)",
            lambda r, p: np.log10(max(p["perplexity"], 1.0)) / log_top,
        ),
    ]
    for k, (title, value) in enumerate(panels):
        x0, y0 = pad + k * (panel_w + pad), pad
        draw.rectangle([x0, y0, x0 + panel_w, y0 + panel_h], outline="black")
        draw.text((x0, y0 - 30), title, fill="black")
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y0 + panel_h * (1 - frac)
            draw.line([x0, y, x0 + panel_w, y], fill=(225, 225, 225))
            label = f"{frac:.2f}" if k == 0 else f"{10 ** (frac * log_top):.0f}"
            draw.text((x0 - 40, y - 6), label, fill="black")
        draw.text((x0 + panel_w - 60, y0 + panel_h + 5), f"step {max_step}", fill="black")
        draw.text((x0, y0 + panel_h + 5), "0", fill="black")
        for n, r in enumerate(results):
            points = [
                (x0 + panel_w * p["step"] / max_step, y0 + panel_h * (1 - value(r, p)))
                for p in r["curve"]
            ]
            draw.line(points, fill=COLOURS[n % len(COLOURS)], width=2)
    for n, r in enumerate(results):
        y = panel_h + 2 * pad + 18 * n
        draw.line([pad, y + 6, pad + 30, y + 6], fill=COLOURS[n % len(COLOURS)], width=3)
        draw.text((pad + 40, y), r.get("label") or describe(r), fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    p_init = sub.add_parser("init")
    p_init.add_argument("--presets", default="SS,BB")
    p_init.add_argument("--seeds", type=int, default=3)
    p_init.add_argument("--images", type=int, default=8)
    p_init.add_argument("--growth_chunks", type=int, default=4)
    p_init.add_argument("--posemb", default="sincos", help="sincos (the default) or learn")
    p_train = sub.add_parser("train")
    p_train.add_argument("--preset", default="SS", choices=sorted(PRESET_CONFIGS))
    p_train.add_argument("--batch", type=int, default=16)
    p_train.add_argument("--steps", type=int, default=300)
    p_train.add_argument("--every", type=int, default=5)
    p_train.add_argument("--image_size", type=int, default=64)
    p_train.add_argument("--width", type=int, default=0, help="0: the preset's")
    p_train.add_argument("--depth", type=int, default=0, help="0: the preset's")
    p_train.add_argument("--set", action="append", default=[], help="config KEY=VALUE")
    p_train.add_argument("--png", default="")
    p_plot = sub.add_parser("plot", help="one PNG of several `train` runs' curves")
    p_plot.add_argument("logs", nargs="+", help="outputs of `train` (their last line is read)")
    p_plot.add_argument("--png", required=True)
    args = parser.parse_args()
    if args.part == "plot":
        results = [
            json.loads(pathlib.Path(p).read_text().strip().splitlines()[-1]) for p in args.logs
        ]
        plot(results, args.png)
        print(json.dumps({"png": args.png, "runs": len(results)}))
        return
    result = init_study(args) if args.part == "init" else train_study(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
