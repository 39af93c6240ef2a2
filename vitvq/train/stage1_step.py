"""The stage-1 (ViT-VQGAN) train and eval steps: pure functions, jitted by the trainer.

One step updates the generator (encoder, quantizer, decoder) and the discriminator:

  generator:     l2 * L2 + logit_laplace * NLL + perceptual * LPIPS + adversarial * L_G + vq * L_VQ
                 (+ entropy * codebook entropy, optional, off by default)
  discriminator: L_D (+ LeCam) (+ lazy R1 every `r1_every` steps, scaled by r1_every * gamma/2)

The quantizer is the one `model.quantization` picks (vitvq/models/quantizers.py). Its variables
besides the parameters travel in the state: `vq_stats` (code usage; {} for FSQ and LFQ) and
`quantizer_state`, the quantizer's own collections by name ({"vq_ema": ...} for an EMA
codebook, updated by the step like `vq_stats`; {"simvq_basis": ...} for SimVQ, fixed; {} for
the paper's quantizer, FSQ and LFQ, so a default run's state has the arrays it always had).
The k-means init and the dead-code restart rewrite the paper's codebook (`params`) or the EMA
codebook (`vq_ema`: its codes and sums, cluster sizes 1). LFQ's entropy weight is scaled by
`entropy_scale(step)` (its annealing), a traced value.

The logit-Laplace, LPIPS and GAN terms are switched on at configured steps. A step whose
losses, gradients or updated parameters are not finite changes nothing but the step counter and
the count of consecutive non-finite steps (the loop stops the run when that count reaches its
limit).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vitvq import losses
from vitvq.evaluation import metrics as eval_metrics
from vitvq.evaluation.reconstruction import masked_code_counts
from vitvq.models.kmeans import kmeans_codebook
from vitvq.models.quantizer import l2_normalize, restart_dead_codes, usage_statistics
from vitvq.models.quantizers import EXTRA_COLLECTIONS, entropy_scale, is_ema
from vitvq.models.vitvqgan import image_from_logits
from vitvq.models.vq_ema import EMA_COLLECTION
from vitvq.train.finite import all_finite, global_norm


@struct.dataclass
class Stage1State:
    """Everything a stage-1 run checkpoints. Keys are stored as raw uint32 key data."""

    step: jax.Array  # int32 []
    params: Any  # generator (ViTVQGAN) parameters
    opt_state: Any
    vq_stats: Any  # quantizer usage EMA ({"quantizer": {"usage": [K]}})
    disc_params: Any  # discriminator parameters ({} when there is no discriminator)
    disc_opt_state: Any
    ema_params: Any  # EMA of `params` ({} when EMA is off)
    lecam_ema: Any  # {"real": [], "fake": []} EMAs of the discriminator's logits
    nonfinite: jax.Array  # int32 [], consecutive skipped (non-finite) steps
    skipped: jax.Array  # int32 [], all skipped steps of the run (resumes included)
    rng: jax.Array  # uint32 [2] raw key data; the step folds the step number into it
    # The quantizer's other collections by name: {"vq_ema": ...} (EMA codebook) or
    # {"simvq_basis": ...} (SimVQ); {} for the paper's quantizer, FSQ and LFQ.
    quantizer_state: Any = struct.field(default_factory=dict)


def model_collections(vq_stats: Any, quantizer_state: Any) -> dict[str, Any]:
    """The model's variables besides `params`: {"vq_stats": ..., **quantizer_state}, without
    empty collections (FSQ and LFQ keep no usage statistics)."""
    out = {"vq_stats": vq_stats} if vq_stats else {}
    return {**out, **(quantizer_state or {})}


@dataclasses.dataclass(frozen=True)
class Stage1Settings:
    """Static settings of the step (hashable; from the config's loss/restart/ema blocks)."""

    l2: float = 1.0
    logit_laplace: float = 0.1
    perceptual: float = 0.1
    adversarial: float = 0.1
    vq: float = 1.0
    entropy: float = 0.0  # codebook entropy regularizer weight (0 = off)
    entropy_temperature: float = 0.01
    perceptual_start_step: int = 0
    logit_laplace_start_step: int = 0
    # LPIPS on one random square window of this side per image (the same window of the
    # reconstruction and the target), drawn each step; 0 = the whole image. On cpu2 a 64x64
    # window of a 128x128 image cut LPIPS's gradient 4.2x, but windows of 32 or less ran
    # slower than the whole 64x64 image (BENCHMARKS.md).
    perceptual_crop: int = 0
    disc_start_step: int = 0
    gan_loss: str = "non_saturating"
    r1_gamma: float = 10.0
    r1_every: int = 16
    lecam: float = 0.0
    lecam_decay: float = 0.99
    # Scale the adversarial weight by ||d rec / d logits|| / ||d adv / d logits|| each step
    # (taming's adaptive weight, measured at the decoder's output rather than its last layer)
    adaptive_gan_weight: bool = False
    ema_decay: float = 0.0
    restart_every: int = 0
    restart_threshold: float = 0.03
    restart_start: int = 0
    restart_stop: int = -1
    # "kmeans": the first step whose update is applied sets the codebook to k-means of its
    # batch's encoder outputs before updating; "normal": the codebook keeps its random init.
    codebook_init: str = "normal"
    kmeans_iterations: int = 10
    # An EMA codebook (model.quantizer.update="ema") follows its batches; False keeps it
    # fixed (trainable="decoder").
    codebook_ema_on: bool = True
    # The phase of training this step is compiled for (see `phase_settings`).
    perceptual_on: bool = True  # step >= perceptual_start_step
    logit_laplace_on: bool = True  # step >= logit_laplace_start_step
    gan_on: bool = True  # step >= disc_start_step
    r1_now: bool = True  # a lazy-R1 step (step % r1_every == 0)


def init_state(
    rng: jax.Array,
    *,
    model: nn.Module,
    disc: nn.Module | None,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation | None,
    ema: bool,
    image_size: int,
    batch: int,
) -> Stage1State:
    """A fresh state (parameters logically annotated, i.e. boxed), initialized on a zero
    batch of `batch` images; `disc` None means no discriminator."""
    dummy = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    k_model, k_disc, k_step = jax.random.split(rng, 3)
    variables = model.init({"params": k_model}, dummy)
    params = variables["params"]
    quantizer_state = {c: variables[c] for c in EXTRA_COLLECTIONS if c in variables}
    disc_params = disc.init(k_disc, dummy)["params"] if disc is not None else {}
    zero = jnp.zeros((), jnp.float32)
    return Stage1State(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        vq_stats=variables.get("vq_stats", {}),
        disc_params=disc_params,
        disc_opt_state=disc_tx.init(disc_params) if disc is not None else {},
        ema_params=params if ema else {},
        lecam_ema={"real": zero, "fake": zero},
        nonfinite=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(k_step),
        quantizer_state=quantizer_state,
    )


def phase_settings(settings: Stage1Settings, step: int) -> Stage1Settings:
    """The settings of the step compiled for `step`.

    Terms that switch on at a later step, and the lazy R1 penalty, are chosen in Python, so
    each phase is its own compiled step without `lax.cond`: on XLA:CPU a convolution inside
    a conditional branch ran ~15x slower (BENCHMARKS.md), and a zero-weighted term would
    still cost its compute.
    """
    s = settings
    # Flags of terms that are off altogether are constant, so they never cause a recompile.
    gan_on = s.adversarial > 0 and step >= s.disc_start_step
    return dataclasses.replace(
        s,
        perceptual_on=s.perceptual > 0 and step >= s.perceptual_start_step,
        logit_laplace_on=s.logit_laplace > 0 and step >= s.logit_laplace_start_step,
        gan_on=gan_on,
        r1_now=gan_on and s.r1_gamma > 0 and step % max(1, s.r1_every) == 0,
    )


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def _ema_codes(quantizer_state) -> dict[str, jax.Array]:
    return quantizer_state[EMA_COLLECTION]["quantizer"]


def _with_ema_codes(quantizer_state, codes: dict[str, jax.Array]):
    return {**quantizer_state, EMA_COLLECTION: {"quantizer": codes}}


def _init_codebook(params, quantizer_state, vq_stats, images, rng, *, model, iterations):
    """(params, quantizer_state) with the codebook replaced by k-means of the encoder's
    outputs for `images` (the quantizer's normalized latents, i.e. what the nearest-code
    search compares): the paper's codebook parameter, or the EMA codebook with its sums set
    to the centers and its cluster sizes to 1 (as the EMA quantizer's own init)."""
    variables = {"params": params, **model_collections(vq_stats, quantizer_state)}
    _, aux = model.apply(variables, images, method=model.encode)
    ema = is_ema(model.quantization)
    codebook = _ema_codes(quantizer_state)["codebook"] if ema else params["quantizer"]["codebook"]
    fitted = kmeans_codebook(
        jax.lax.stop_gradient(aux["latents"]),
        codebook.shape[0],
        rng,
        iterations=iterations,
        spherical=model.l2_normalize_codes,
        chunk_size=model.search_chunk_size,
    ).astype(codebook.dtype)
    if ema:
        codes = _ema_codes(quantizer_state)
        codes = {
            **codes,
            "codebook": fitted,
            "embed_sum": fitted,
            "cluster_size": jnp.ones_like(codes["cluster_size"]),
        }
        return params, _with_ema_codes(quantizer_state, codes)
    quantizer = {**params["quantizer"], "codebook": fitted}
    return {**params, "quantizer": quantizer}, quantizer_state


def _restart(params, vq_stats, quantizer_state, latents, rng, *, threshold, ema):
    """Dead-code restart of the paper's codebook or of the EMA codebook (restarted codes get
    their new vector as their sum and a cluster size of 1) -> (params, vq_stats,
    quantizer_state, number restarted)."""
    usage = vq_stats["quantizer"]["usage"]
    codebook = _ema_codes(quantizer_state)["codebook"] if ema else params["quantizer"]["codebook"]
    codebook, new_usage, n = restart_dead_codes(codebook, usage, latents, rng, threshold)
    vq_stats = {**vq_stats, "quantizer": {**vq_stats["quantizer"], "usage": new_usage}}
    if ema:
        codes = _ema_codes(quantizer_state)
        dead = usage < threshold
        codes = {
            **codes,
            "codebook": codebook,
            "embed_sum": jnp.where(dead[:, None], codebook, codes["embed_sum"]),
            "cluster_size": jnp.where(dead, 1.0, codes["cluster_size"]).astype(
                codes["cluster_size"].dtype
            ),
        }
        return params, vq_stats, _with_ema_codes(quantizer_state, codes), n
    params = {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
    return params, vq_stats, quantizer_state, n


def _adaptive_gan_scale(logits, images, perceptual_term, *, model, disc, disc_params, settings):
    """||grad of the weighted reconstruction terms|| / ||grad of the adversarial term||, both
    w.r.t. the decoder's output logits (clipped to [0, 1e4], no gradient): the adversarial
    term's pull on the decoder is then `settings.adversarial` times the reconstruction's."""
    s = settings
    logits = jax.lax.stop_gradient(logits)
    to_image = functools.partial(
        image_from_logits, output=model.output, eps=model.logit_laplace_eps
    )

    def reconstruction(z):
        recon = to_image(z)
        loss = s.l2 * losses.l2_loss(recon, images)
        if s.logit_laplace > 0 and s.logit_laplace_on and model.output == "sigmoid":
            loss += s.logit_laplace * losses.logit_laplace_nll(
                images, z, eps=model.logit_laplace_eps
            )
        if perceptual_term is not None:
            loss += s.perceptual * perceptual_term(recon)
        return loss

    def adversarial(z):
        fake_logits = disc.apply({"params": disc_params}, to_image(z))
        return losses.generator_adversarial_loss(fake_logits, s.gan_loss)

    rec_norm = global_norm(jax.grad(reconstruction)(logits))
    adv_norm = global_norm(jax.grad(adversarial)(logits))
    return jax.lax.stop_gradient(jnp.clip(rec_norm / (adv_norm + 1e-4), 0.0, 1e4))


def _discriminator_update(carry, *, images, fake, disc, disc_tx, settings):
    """One discriminator update: (params, opt_state, lecam_ema) -> (new carry, metrics, ok).

    A non-finite loss or update leaves the carry unchanged and reports ok = False.
    """
    s = settings
    disc_params, disc_opt_state, lecam_ema = carry

    def disc_loss(dparams):
        apply = lambda x: disc.apply({"params": dparams}, x)  # noqa: E731
        real_logits, fake_logits = apply(images), apply(fake)
        loss = losses.discriminator_loss(real_logits, fake_logits, s.gan_loss)
        out = {"real_logits": jnp.mean(real_logits), "fake_logits": jnp.mean(fake_logits)}
        out["gan"] = loss
        if s.lecam > 0:
            lecam = losses.lecam_penalty(
                real_logits, fake_logits, lecam_ema["real"], lecam_ema["fake"]
            )
            loss = loss + s.lecam * lecam
            out["lecam"] = lecam
        if s.r1_gamma > 0:  # lazy R1: every r1_every steps, scaled up by r1_every
            r1 = losses.r1_penalty(apply, images) if s.r1_now else jnp.zeros((), jnp.float32)
            loss = loss + 0.5 * s.r1_gamma * s.r1_every * r1
            out["r1"] = r1
        return loss, out

    (d_total, d_out), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(disc_params)
    d_updates, new_opt = disc_tx.update(d_grads, disc_opt_state, disc_params)
    new_params = optax.apply_updates(disc_params, d_updates)
    ok = jnp.isfinite(d_total) & all_finite(d_grads) & all_finite(new_params)
    if s.lecam > 0:
        lecam_ema = {
            k: losses.update_lecam_ema(lecam_ema[k], d_out[f"{k}_logits"], s.lecam_decay)
            for k in ("real", "fake")
        }
    new_carry = _select(ok, (new_params, new_opt, lecam_ema), carry)
    metrics = {f"disc/{k}": v for k, v in d_out.items()}
    metrics["disc/loss"] = d_total
    metrics["disc/grad_norm"] = global_norm(d_grads)
    return new_carry, metrics, ok


def train_step(
    state: Stage1State,
    batch: dict[str, jax.Array],
    perceptual: Any,
    *,
    model: nn.Module,
    disc: nn.Module | None,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation | None,
    settings: Stage1Settings,
    lr_schedule: Any,
) -> tuple[Stage1State, dict[str, jax.Array]]:
    """One generator + discriminator update. `perceptual` is a PerceptualLoss or None."""
    s = settings
    images = batch["image"].astype(jnp.float32)
    step = state.step
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    dropout_rng, restart_rng = jax.random.split(rng)
    use_gan = disc is not None

    base_params, base_qstate = state.params, state.quantizer_state
    ema_codebook = is_ema(model.quantization)
    perceptual_term = None
    if s.perceptual > 0 and perceptual is not None and s.perceptual_on:
        crop_rng = jax.random.fold_in(rng, 1 << 21)

        def perceptual_term(recon):
            """The mean LPIPS of `recon` against the batch (on this step's windows)."""
            pair = (recon, images)
            if s.perceptual_crop:
                pair = losses.paired_random_crops(crop_rng, pair, s.perceptual_crop)
            return jnp.mean(perceptual(*pair))

    # No update has been applied yet: every earlier step (if any) was skipped as non-finite.
    first_update = step == state.skipped
    if s.codebook_init == "kmeans":
        # The run's first applied update starts by fitting the codebook; a resumed run never
        # repeats it (its state is past that update). One program for every step: the other
        # branch is a no-op.
        init = functools.partial(_init_codebook, model=model, iterations=s.kmeans_iterations)
        base_params, base_qstate = jax.lax.cond(
            first_update,
            lambda pq: init(*pq, state.vq_stats, images, jax.random.fold_in(rng, 1 << 20)),
            lambda pq: pq,
            (base_params, base_qstate),
        )
    scale = entropy_scale(step, model.quantization)
    mutable = ["vq_stats"] + ([EMA_COLLECTION] if ema_codebook and s.codebook_ema_on else [])

    def generator_loss(params):
        (recon, aux), mutated = model.apply(
            {"params": params, **model_collections(state.vq_stats, base_qstate)},
            images,
            train=True,
            entropy_scale=scale,
            rngs={"dropout": dropout_rng},
            mutable=mutable,
        )
        terms = {"l2": losses.l2_loss(recon, images), "vq": aux["vq_loss"]}
        weights = {"l2": s.l2, "vq": s.vq}
        if s.entropy > 0:
            codebook = l2_normalize(params["quantizer"]["codebook"])
            terms["entropy"], entropy_parts = losses.codebook_entropy_loss(
                aux["latents"], codebook, s.entropy_temperature
            )
            weights["entropy"] = s.entropy
            aux = {**aux, **{f"entropy_{k}": v for k, v in entropy_parts.items()}}
        if s.logit_laplace > 0 and s.logit_laplace_on and model.output == "sigmoid":
            terms["logit_laplace"] = losses.logit_laplace_nll(
                images, aux["decoder_logits"], eps=model.logit_laplace_eps
            )
            weights["logit_laplace"] = s.logit_laplace
        # Terms that switch on later are absent from the step compiled for earlier steps.
        if perceptual_term is not None:
            terms["perceptual"] = perceptual_term(recon)
            weights["perceptual"] = s.perceptual
        if use_gan and s.adversarial > 0 and s.gan_on:
            fake_logits = disc.apply({"params": state.disc_params}, recon)
            terms["adversarial"] = losses.generator_adversarial_loss(fake_logits, s.gan_loss)
            weights["adversarial"] = s.adversarial
            if s.adaptive_gan_weight:
                gan_scale = _adaptive_gan_scale(
                    aux["decoder_logits"],
                    images,
                    perceptual_term,
                    model=model,
                    disc=disc,
                    disc_params=state.disc_params,
                    settings=s,
                )
                weights["adversarial"] = s.adversarial * gan_scale
                aux = {**aux, "adaptive_gan_scale": gan_scale}
        total = sum(weights[k] * terms[k] for k in terms)
        return total, (terms, aux, mutated, recon)

    (g_total, (terms, aux, mutated, recon)), grads = jax.value_and_grad(
        generator_loss, has_aux=True
    )(base_params)
    vq_stats = mutated.get("vq_stats", state.vq_stats)
    quantizer_state = {**base_qstate, **{c: mutated[c] for c in EXTRA_COLLECTIONS if c in mutated}}
    updates, opt_state = tx.update(grads, state.opt_state, base_params)
    params = optax.apply_updates(base_params, updates)
    # An overflowing update (e.g. a huge learning rate) is as bad as a non-finite gradient.
    finite = jnp.isfinite(g_total) & all_finite(grads) & all_finite(params)

    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["loss/total"] = g_total
    metrics["grad_norm"] = global_norm(grads)
    metrics["update_norm"] = global_norm(updates)
    metrics["param_norm"] = global_norm(params)
    metrics["lr"] = lr_schedule(step)
    for k in ("codes_used", "codebook_usage", "perplexity"):
        metrics[f"vq/{k}"] = aux[k]
    for k in ("token_entropy", "batch_entropy"):
        if f"entropy_{k}" in aux:
            metrics[f"vq/{k}"] = aux[f"entropy_{k}"]
    if "adaptive_gan_scale" in aux:
        metrics["loss/adaptive_gan_scale"] = aux["adaptive_gan_scale"]
    if model.quantization.kind == "lfq":  # LFQ's own entropy loss and its annealed weight
        for k in ("entropy_loss", "per_token_entropy", "batch_entropy"):
            metrics[f"vq/lfq_{k}"] = aux[k]
        metrics["vq/entropy_scale"] = scale

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    lecam_ema = state.lecam_ema
    if use_gan and s.gan_on:
        carry, d_metrics, d_finite = _discriminator_update(
            (disc_params, disc_opt_state, lecam_ema),
            images=images,
            fake=jax.lax.stop_gradient(recon),
            disc=disc,
            disc_tx=disc_tx,
            settings=s,
        )
        disc_params, disc_opt_state, lecam_ema = carry
        finite = finite & d_finite
        metrics.update(d_metrics)

    if s.restart_every > 0:
        stop_ok = True if s.restart_stop < 0 else step < s.restart_stop
        do_restart = (step % s.restart_every == 0) & (step >= s.restart_start) & stop_ok

        restart = functools.partial(
            _restart,
            latents=jax.lax.stop_gradient(aux["latents"]),
            rng=restart_rng,
            threshold=s.restart_threshold,
            ema=ema_codebook,
        )

        def keep(p, stats, q):
            return p, stats, q, jnp.zeros((), jnp.int32)

        params, vq_stats, quantizer_state, restarted = jax.lax.cond(
            do_restart, restart, keep, params, vq_stats, quantizer_state
        )
        metrics["vq/restarted_codes"] = restarted

    ema_params = state.ema_params
    if s.ema_decay > 0 and s.codebook_init == "kmeans":
        # The average starts from the fitted codebook, not the random one it replaced.
        ema_params = _select(first_update, base_params, ema_params)
    if s.ema_decay > 0:
        ema_params = jax.tree_util.tree_map(
            lambda e, p: s.ema_decay * e + (1.0 - s.ema_decay) * p, ema_params, params
        )

    new_state = state.replace(
        step=step + 1,
        params=_select(finite, params, state.params),
        opt_state=_select(finite, opt_state, state.opt_state),
        vq_stats=_select(finite, vq_stats, state.vq_stats),
        quantizer_state=_select(finite, quantizer_state, state.quantizer_state),
        disc_params=_select(finite, disc_params, state.disc_params),
        disc_opt_state=_select(finite, disc_opt_state, state.disc_opt_state),
        ema_params=_select(finite, ema_params, state.ema_params),
        lecam_ema=_select(finite, lecam_ema, state.lecam_ema),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32),
        skipped=jnp.where(finite, state.skipped, state.skipped + 1).astype(jnp.int32),
    )
    metrics["nonfinite_steps"] = new_state.nonfinite
    metrics["skipped_steps"] = new_state.skipped
    return new_state, metrics


def eval_step(
    params: Any,
    collections: Any,
    batch: dict[str, jax.Array],
    perceptual: Any,
    *,
    model: nn.Module,
) -> dict[str, jax.Array]:
    """Per-example reconstruction metrics and masked code counts for one eval batch.
    `collections`: the model's other variables (`model_collections`)."""
    images = batch["image"].astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    recon, aux = model.apply({"params": params, **collections}, images)
    recon = jnp.clip(recon, 0.0, 1.0)
    out = {
        "psnr": eval_metrics.psnr(recon, images),
        "ssim": eval_metrics.ssim(recon, images),
        "l1": eval_metrics.l1_error(recon, images),
        "l2": eval_metrics.l2_error(recon, images),
    }
    if perceptual is not None:
        out["lpips"] = perceptual(recon, images)
    counts = masked_code_counts(aux["indices"], mask, model.num_codes)
    return {
        "per_example": out,
        "code_counts": counts,
        "batch_codes_used": usage_statistics(counts)["codes_used"],
        "mask": mask,  # global and replicated, to match the per-example outputs
        "reconstruction": recon,
    }
