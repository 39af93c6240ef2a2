"""Which quantizer a ViT-VQGAN uses: the `model.quantizer` config block, its vocabulary and the
factory that maps it to a module.

Kinds (`kind`):
  "vq"     the paper's factorized codebook (`VectorQuantizer`, vitvq/models/quantizer.py), or
           with `update="ema"` the same search with a codebook that follows exponential moving
           averages (`EMAVectorQuantizer`, vq_ema.py; `ema_decay`, `ema_epsilon`);
  "simvq"  a frozen random basis times one learned map (`SimVQuantizer`, simvq.py);
  "fsq"    finite scalar quantization on a fixed grid of `levels` (`FSQuantizer`, fsq.py);
  "lfq"    lookup-free quantization: `bits` signs (`LookupFreeQuantizer`, lfq.py).

"vq" and "simvq" read the model block's `codebook_size`, `code_dim`, `beta`,
`search_chunk_size` and `usage_decay` as before ("vq" also `l2_normalize_codes`), and take
`gradient`: "straight_through" (the paper) or "rotation" (the rotation trick; the names are
`vitvq.models.rotation.GRADIENTS`).
"fsq" and "lfq" have no codebook: their code count is prod(levels) and 2**bits, their code
dimension len(levels) and bits, and the model block's codebook keys are not read.

LFQ's entropy weight can be annealed (`entropy_anneal_steps` > 0): the weight is
`entropy_weight * scale(step)` with scale going linearly from `entropy_anneal_factor` at step 0
to 1 at `entropy_anneal_steps` and staying 1 after; `entropy_anneal_steps=0` keeps it at 1
(`entropy_scale`). The trainer passes the scale as a traced value: no recompilation.

A config saved before the block existed has no `model.quantizer`: it is kind "vq", exactly
the quantizer it trained with (`quantizer_spec({})` is the default spec).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vitvq.errors import ConfigError
from vitvq.models.fsq import FSQuantizer
from vitvq.models.lfq import LookupFreeQuantizer
from vitvq.models.quantizer import VectorQuantizer
from vitvq.models.simvq import BASIS_COLLECTION, SimVQuantizer
from vitvq.models.vq_ema import EMA_COLLECTION, EMAVectorQuantizer

KINDS = ("vq", "simvq", "fsq", "lfq")
UPDATES = ("gradient", "ema")  # how a "vq" codebook learns
# The collections besides params and vq_stats that a quantizer may hold, in the train state:
# vq_ema (updated by the train step) and simvq_basis (fixed).
EXTRA_COLLECTIONS = (EMA_COLLECTION, BASIS_COLLECTION)


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """The `model.quantizer` block (defaults: the paper's quantizer)."""

    kind: str = "vq"
    # vq
    update: str = "gradient"  # "gradient" (the paper) or "ema"
    ema_decay: float = 0.99  # update="ema": decay of the codebook statistics, in (0, 1)
    ema_epsilon: float = 1e-5  # update="ema": Laplace smoothing of the cluster sizes
    # vq and simvq
    gradient: str = "straight_through"  # or "rotation"
    # fsq
    levels: tuple[int, ...] = (8, 5, 5, 5)  # 1000 codes
    # lfq
    bits: int = 14  # 16384 codes
    entropy_weight: float = 0.1
    entropy_groups: int = 2  # the entropy factorizes over groups of bits (2 x 7 bits)
    diversity_gamma: float = 1.0
    commitment_weight: float = 0.25
    entropy_anneal_steps: int = 0  # 0: no annealing
    entropy_anneal_factor: float = 3.0  # the entropy weight's factor at step 0 (annealed to 1)


DEFAULTS = QuantizerSpec()
SPEC_KEYS = tuple(f.name for f in dataclasses.fields(QuantizerSpec))

# The keys each kind reads (`kind` aside); ema_decay/ema_epsilon only with update="ema".
KIND_KEYS = {
    "vq": ("update", "ema_decay", "ema_epsilon", "gradient"),
    "simvq": ("gradient",),
    "fsq": ("levels",),
    "lfq": (
        "bits",
        "entropy_weight",
        "entropy_groups",
        "diversity_gamma",
        "commitment_weight",
        "entropy_anneal_steps",
        "entropy_anneal_factor",
    ),
}


def applies(key: str, spec: Mapping[str, Any]) -> bool:
    """Whether the kind (and update) in `spec` (a `model.quantizer` block, possibly partial)
    read `key`."""
    kind = spec.get("kind", DEFAULTS.kind)
    if key == "kind":
        return True
    if key in ("ema_decay", "ema_epsilon"):
        return kind == "vq" and spec.get("update", DEFAULTS.update) == "ema"
    return key in KIND_KEYS.get(kind, ())


def quantizer_spec(d: Mapping[str, Any] | None, what: str = "model.quantizer") -> QuantizerSpec:
    """A QuantizerSpec from a dict (config block or bundle JSON; None or {}: the default);
    names unknown keys and an unknown kind."""
    fields = dict(d or {})
    unknown = set(fields) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{what} has unknown keys {sorted(unknown)}; expected {sorted(SPEC_KEYS)}"
        )
    kind = fields.get("kind", DEFAULTS.kind)
    if kind not in KINDS:
        raise ConfigError(
            f"{what}.kind={kind!r} is not a supported quantizer; supported: {', '.join(KINDS)}"
        )
    if "levels" in fields:
        fields["levels"] = tuple(int(v) for v in fields["levels"])
    return QuantizerSpec(**fields)


def spec_num_codes(spec: QuantizerSpec, codebook_size: int) -> int:
    """The number of codes (indices run over [0, num_codes))."""
    if spec.kind == "fsq":
        return math.prod(spec.levels)
    if spec.kind == "lfq":
        return 2**spec.bits
    return codebook_size


def spec_code_dim(spec: QuantizerSpec, code_dim: int) -> int:
    """The dimension of the codes the decoder receives."""
    if spec.kind == "fsq":
        return len(spec.levels)
    if spec.kind == "lfq":
        return spec.bits
    return code_dim


def is_ema(spec: QuantizerSpec) -> bool:
    return spec.kind == "vq" and spec.update == "ema"


def entropy_scale(step: Any, spec: QuantizerSpec) -> Any:
    """LFQ's entropy-weight factor at `step` (traceable): linear from
    `entropy_anneal_factor` at 0 to 1 at `entropy_anneal_steps`, then 1; 1 without annealing."""
    steps = int(spec.entropy_anneal_steps)
    if spec.kind != "lfq" or steps <= 0:
        return jnp.ones((), jnp.float32)
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)
    start = jnp.float32(spec.entropy_anneal_factor)
    return start + (1.0 - start) * frac


def build_quantizer(
    spec: QuantizerSpec,
    *,
    codebook_size: int,
    code_dim: int,
    beta: float,
    search_chunk_size: int,
    usage_decay: float,
    l2_normalize_codes: bool,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """The quantizer module `spec` chooses (the model block's codebook keys for vq/simvq)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, name=name)
    # The keys the codebook kinds (vq and simvq) share.
    searched = dict(
        codebook_size=codebook_size,
        code_dim=code_dim,
        beta=beta,
        search_chunk_size=search_chunk_size,
        usage_decay=usage_decay,
        gradient=spec.gradient,
        **kw,
    )
    if spec.kind == "vq":
        common = dict(searched, l2_normalize_codes=l2_normalize_codes)
        if spec.update == "ema":
            return EMAVectorQuantizer(decay=spec.ema_decay, epsilon=spec.ema_epsilon, **common)
        return VectorQuantizer(**common)
    if spec.kind == "simvq":
        return SimVQuantizer(**searched)
    if spec.kind == "fsq":
        return FSQuantizer(levels=spec.levels, **kw)
    if spec.kind == "lfq":
        return LookupFreeQuantizer(
            bits=spec.bits,
            entropy_weight=spec.entropy_weight,
            commitment_weight=spec.commitment_weight,
            entropy_groups=spec.entropy_groups,
            diversity_gamma=spec.diversity_gamma,
            **kw,
        )
    raise ConfigError(f"unknown quantizer kind {spec.kind!r}; supported: {', '.join(KINDS)}")
