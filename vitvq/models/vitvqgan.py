"""The ViT-VQGAN tokenizer: ViT encoder -> factorized l2-normalized codes -> ViT decoder.

The quantizer is the paper's unless `quantization` (the config's `model.quantizer` block,
vitvq/models/quantizers.py) picks another kind: an EMA-trained codebook, SimVQ, FSQ or LFQ.
`num_codes` and `codes_dim` are the chosen quantizer's (FSQ: prod(levels) codes of
len(levels) dimensions; LFQ: 2**bits codes of `bits` dimensions).

`backbone="cnn"` swaps both transformer stacks for the original VQGAN's convolutional
encoder and decoder (`vitvq/models/cnn.py`, the paper's CNN baseline); the quantizer, the
output parametrization and everything downstream stay the same. The CNN downsamples by
`patch_size`, so both backbones give the same token grid.

Output parametrization (`output`):
- "sigmoid" (the paper): the decoder predicts a per-pixel location `mu` in logit space for
  the logit-Laplace loss; the image is the distribution's mean mapped back to pixels,
  (sigmoid(mu) - eps) / (1 - 2 eps). The unclipped value is returned for the L2 loss (so its
  gradient never dies at the borders); `decode` clips to [0, 1].
- "raw" (Parti): the decoder output is the image itself; use it without the logit-Laplace
  loss.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitvq.errors import ConfigError, InputError
from vitvq.models import axes
from vitvq.models.cnn import CNNDecoder, CNNEncoder, CNNSpec, validate_cnn_spec
from vitvq.models.layers import dense
from vitvq.models.quantizers import (
    QuantizerSpec,
    build_quantizer,
    quantizer_spec,
    spec_code_dim,
    spec_num_codes,
)
from vitvq.models.vit import POSEMB_KINDS, TransformerSpec, ViTDecoder, ViTEncoder

Dtype = Any

OUTPUT_KINDS = ("sigmoid", "raw")
BACKBONES = ("vit", "cnn")

# docs/paper.md table 2. Parameter counts there are per transformer stack and rounded by the
# authors; `tests/test_vitvqgan.py` checks ours against them.
TRANSFORMER_PRESETS = {
    "S": TransformerSpec(width=512, depth=8, num_heads=8, mlp_dim=2048),
    "B": TransformerSpec(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": TransformerSpec(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}
# Encoder + decoder pairs: SS (stage-2 default), BB (ablation default), SL (best).
VITVQGAN_PRESETS = {"SS": ("S", "S"), "BB": ("B", "B"), "SL": ("S", "L")}


class ViTVQGAN(nn.Module):
    """Images [B, H, W, 3] in [0, 1] <-> int32 codes [B, H/p, W/p]."""

    image_size: int = 256
    patch_size: int = 8
    encoder: TransformerSpec = TRANSFORMER_PRESETS["S"]
    decoder: TransformerSpec = TRANSFORMER_PRESETS["S"]
    codebook_size: int = 8192
    code_dim: int = 32  # lookup dimension of the factorized codes
    beta: float = 0.25  # commitment weight of the VQ loss
    output: str = "sigmoid"  # "sigmoid" (logit-Laplace mean, paper) or "raw" (Parti)
    logit_laplace_eps: float = 0.1  # pixel squashing of the logit-Laplace loss
    posemb: str = "sincos"  # "sincos" (fixed) or "learn"
    search_chunk_size: int = 1024  # codes compared at once in the nearest-code search
    usage_decay: float = 0.99  # EMA decay of code usage (dead-code restart)
    l2_normalize_codes: bool = True  # False: the paper's ablation without l2-normalized codes
    backbone: str = "vit"  # "vit" (the paper) or "cnn" (the original VQGAN's, the baseline)
    cnn: CNNSpec = CNNSpec()  # the convolutional encoder/decoder, when backbone == "cnn"
    quantization: QuantizerSpec = QuantizerSpec()  # the quantizer kind (config model.quantizer)
    remat: bool = False  # ViT backbone: recompute each transformer block in the backward pass
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_codes(self) -> int:
        """How many codes the quantizer has (indices are in [0, num_codes))."""
        return spec_num_codes(self.quantization, self.codebook_size)

    @property
    def codes_dim(self) -> int:
        """The dimension of the codes the decoder's `project_up` receives."""
        return spec_code_dim(self.quantization, self.code_dim)

    def setup(self):
        validate_model(self)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.backbone == "cnn":
            self.enc = CNNEncoder(self.cnn, self.image_size, **kw)
            self.dec = CNNDecoder(self.cnn, self.image_size, 3, **kw)
            decoder_width = self.cnn.width
        else:
            vit = dict(posemb=self.posemb, remat=self.remat, **kw)
            self.enc = ViTEncoder(self.encoder, self.image_size, self.patch_size, **vit)
            self.dec = ViTDecoder(self.decoder, self.image_size, self.patch_size, 3, **vit)
            decoder_width = self.decoder.width
        self.quantizer = build_quantizer(
            self.quantization,
            codebook_size=self.codebook_size,
            code_dim=self.code_dim,
            beta=self.beta,
            search_chunk_size=self.search_chunk_size,
            usage_decay=self.usage_decay,
            l2_normalize_codes=self.l2_normalize_codes,
            **kw,
        )
        self.project_up = dense(decoder_width, axes.CODE_DIM, axes.EMBED, name="project_up", **kw)

    def _quantize(
        self, images: jax.Array, train: bool, entropy_scale: Any = 1.0
    ) -> tuple[jax.Array, dict]:
        features = self.enc(images, deterministic=not train)
        if self.quantization.kind == "lfq":
            quantized, aux = self.quantizer(features, entropy_scale)
        else:
            quantized, aux = self.quantizer(features)
        b = images.shape[0]
        aux["indices"] = aux["indices"].reshape(b, self.grid_size, self.grid_size)
        return quantized, aux

    def _decode_codes(self, codes: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """Normalized codes [B, T, code_dim] -> (image mean, unclipped; decoder logits)."""
        logits = self.dec(self.project_up(codes), deterministic=not train)  # float32
        return image_from_logits(logits, self.output, self.logit_laplace_eps), logits

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        """Images [B, H, W, 3] in [0, 1] -> (int32 codes [B, H/p, W/p], aux)."""
        _, aux = self._quantize(images, train)
        return aux["indices"], aux

    def decode(self, indices: jax.Array) -> jax.Array:
        """int32 codes [B, h, w] -> images [B, H, W, 3] float32 clipped to [0, 1]."""
        check_indices(indices, self.grid_size, self.num_codes)
        b = indices.shape[0]
        codes = self.quantizer.lookup(indices.reshape(b, -1))
        images, _ = self._decode_codes(codes, train=False)
        return jnp.clip(images, 0.0, 1.0)

    def code_table(self) -> jax.Array:
        """Every code the decoder receives, in index order: [num_codes, codes_dim] float32
        (the normalized codebook, an EMA or SimVQ codebook, FSQ's grid, LFQ's signs). What
        identifies a tokenizer's vocabulary: a VIM predicts indices into it."""
        return self.quantizer.lookup(jnp.arange(self.num_codes, dtype=jnp.int32))

    def __call__(
        self, images: jax.Array, train: bool = False, entropy_scale: Any = 1.0
    ) -> tuple[jax.Array, dict]:
        """Reconstructs images. Returns (reconstruction [B, H, W, 3] float32, aux).

        The reconstruction is unclipped (see the module docstring). aux holds the VQ losses,
        `indices`, `latents`, code usage statistics and `decoder_logits` (the logit-Laplace
        location when output == "sigmoid"). `entropy_scale` multiplies LFQ's entropy weight
        (its annealing; other kinds ignore it).
        """
        quantized, aux = self._quantize(images, train, entropy_scale)
        recon, logits = self._decode_codes(quantized, train)
        aux["decoder_logits"] = logits
        return recon, aux


def image_from_logits(logits: jax.Array, output: str, eps: float) -> jax.Array:
    """The decoder's image (unclipped) for its output logits: the logit-Laplace mean
    `(sigmoid(logits) - eps) / (1 - 2 eps)` for `output="sigmoid"`, the logits for "raw"."""
    if output == "sigmoid":
        return (jax.nn.sigmoid(logits) - eps) / (1.0 - 2.0 * eps)
    return logits


def validate_model(model: ViTVQGAN) -> None:
    """Raises ConfigError on inconsistent hyperparameters, naming the value."""
    if model.patch_size <= 0 or model.image_size % model.patch_size:
        raise ConfigError(
            f"image_size {model.image_size} must be divisible by patch_size {model.patch_size}"
        )
    if model.output not in OUTPUT_KINDS:
        raise ConfigError(
            f"unknown decoder output {model.output!r}; expected one of {OUTPUT_KINDS}"
        )
    if model.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {model.backbone!r}; expected one of {BACKBONES}")
    if model.backbone == "cnn":
        validate_cnn_spec(model.cnn, model.image_size, model.patch_size)
        if model.remat:
            raise ConfigError(
                "remat recomputes the ViT backbone's blocks; the cnn backbone has none"
            )
    if model.posemb not in POSEMB_KINDS:
        raise ConfigError(f"unknown posemb {model.posemb!r}; expected one of {POSEMB_KINDS}")
    for name in ("encoder", "decoder"):
        spec = getattr(model, name)
        if spec.width % spec.num_heads:
            raise ConfigError(
                f"{name} width {spec.width} is not divisible by its {spec.num_heads} heads"
            )
    if model.codebook_size < 1 or model.code_dim < 1:
        raise ConfigError(
            f"codebook_size ({model.codebook_size}) and code_dim ({model.code_dim}) must be >= 1"
        )
    if not 0.0 <= model.logit_laplace_eps < 0.5:
        raise ConfigError(f"logit_laplace_eps must be in [0, 0.5), got {model.logit_laplace_eps}")


def check_indices(indices: jax.Array, grid_size: int, codebook_size: int) -> None:
    """Raises InputError on a bad code grid; checks values when they are concrete."""
    shape = tuple(indices.shape)
    if len(shape) != 3 or shape[1:] != (grid_size, grid_size):
        raise InputError(
            f"codes must be [batch, {grid_size}, {grid_size}] for this model, got shape {shape}"
        )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise InputError(f"codes must be integers, got dtype {indices.dtype}")
    if not isinstance(indices, jax.core.Tracer) and indices.size:
        values = np.asarray(indices)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= codebook_size:
            raise InputError(
                f"code indices must be in [0, {codebook_size - 1}], got values in [{low}, {high}]"
            )


def transformer_preset(name: str) -> TransformerSpec:
    """The paper's S, B or L transformer size."""
    if name not in TRANSFORMER_PRESETS:
        raise ConfigError(
            f"unknown transformer preset {name!r}; expected one of {sorted(TRANSFORMER_PRESETS)}"
        )
    return TRANSFORMER_PRESETS[name]


def vitvqgan_from_preset(name: str, **overrides) -> ViTVQGAN:
    """A ViTVQGAN with the paper's SS, BB or SL encoder/decoder sizes; fields overridable."""
    if name not in VITVQGAN_PRESETS:
        raise ConfigError(
            f"unknown ViT-VQGAN preset {name!r}; expected one of {sorted(VITVQGAN_PRESETS)}"
        )
    enc, dec = VITVQGAN_PRESETS[name]
    fields = {"encoder": transformer_preset(enc), "decoder": transformer_preset(dec)}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTVQGAN)}
    if unknown:
        raise ConfigError(f"unknown ViTVQGAN fields {sorted(unknown)}")
    fields.update(overrides)
    return ViTVQGAN(**fields)


def transformer_spec(d: Mapping[str, Any], what: str) -> TransformerSpec:
    """A TransformerSpec from a dict (config block or bundle JSON); names unknown keys."""
    known = {f.name for f in dataclasses.fields(TransformerSpec)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}; expected {sorted(known)}")
    missing = {"width", "depth", "num_heads", "mlp_dim"} - set(d)
    if missing:
        raise ConfigError(f"{what} is missing {sorted(missing)}")
    return TransformerSpec(**dict(d))


def cnn_spec(d: Mapping[str, Any], what: str = "model.cnn") -> CNNSpec:
    """A CNNSpec from a dict (config block or bundle JSON); names unknown keys."""
    known = {f.name for f in dataclasses.fields(CNNSpec)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what} has unknown keys {sorted(unknown)}; expected {sorted(known)}")
    fields = dict(d)
    if "channel_mult" in fields:
        fields["channel_mult"] = tuple(int(m) for m in fields["channel_mult"])
    return CNNSpec(**fields)


def build_vitvqgan(model_cfg: Mapping[str, Any], image_size: int, dtype: Dtype = jnp.float32):
    """A ViTVQGAN from a `model` config block (or the same dict read from a bundle).

    A bundle written before the CNN backbone existed has no `backbone` or `cnn` key: it is a
    ViT model, the default; one written before the quantizer kinds has no `quantizer` key:
    the paper's quantizer (kind "vq")."""
    fields = dict(model_cfg)
    fields["quantization"] = quantizer_spec(fields.pop("quantizer", None))
    fields["encoder"] = transformer_spec(fields.get("encoder", {}), "model.encoder")
    fields["decoder"] = transformer_spec(fields.get("decoder", {}), "model.decoder")
    if "cnn" in fields:
        fields["cnn"] = cnn_spec(fields["cnn"])
    known = {f.name for f in dataclasses.fields(ViTVQGAN)} - {"parent", "name"}
    unknown = set(fields) - known
    if unknown:
        raise ConfigError(f"model config has unknown keys {sorted(unknown)}")
    model = ViTVQGAN(image_size=image_size, dtype=dtype, **fields)
    validate_model(model)
    return model
