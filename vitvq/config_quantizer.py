"""The config check's rules for the `model.quantizer` block (vitvq/models/quantizers.py).

Each kind's keys are checked only when that kind is chosen (`QUANTIZER_RULES`, part of the
stage-1 table in vitvq/config_check.py). A key the chosen kind does not read is refused when
it was changed from its default (the default block holds every kind's keys, so that any of
them can be set on the command line): e.g. `model.quantizer.levels` with kind "vq", or
`model.quantizer.update="ema"` with kind "fsq" (`check_quantizer_relations`). A config without
the block (saved before it existed) is kind "vq". A stage-1 config that trains a VIM's
tokenizer (a pipeline's) gives at most the VIM's largest vocabulary (`check_vim_vocabulary`).
"""

import dataclasses

from vitvq.config_rules import (
    MISSING,
    Int,
    IntTuple,
    OneOf,
    Real,
    Rule,
    divisors,
    fail,
    get,
    is_int,
    is_real,
)
from vitvq.errors import ConfigError
from vitvq.models.fsq import MAX_CODES
from vitvq.models.lfq import MAX_BITS
from vitvq.models.quantizers import (
    DEFAULTS,
    KINDS,
    SPEC_KEYS,
    UPDATES,
    applies,
    spec_num_codes,
)
from vitvq.models.rotation import GRADIENTS
from vitvq.models.vim import MAX_VOCAB

BLOCK = "model.quantizer"


def kind_of(config) -> str:
    """The quantizer kind of a config ("vq" when it has no `model.quantizer` block)."""
    return get(config, f"{BLOCK}.kind", DEFAULTS.kind)


def _when(*kinds: str, ema: bool = False):
    def on(config) -> bool:
        if kind_of(config) not in kinds:
            return False
        return not ema or get(config, f"{BLOCK}.update", DEFAULTS.update) == "ema"

    return on


def _read_when(*kinds: str, ema: bool = False) -> dict:
    if ema:
        reason = f"read when {BLOCK}.kind='vq' and {BLOCK}.update='ema'"
    else:
        reason = f"read when {BLOCK}.kind is {' or '.join(repr(k) for k in kinds)}"
    return dict(when=_when(*kinds, ema=ema), reason=reason)


_WHEN_EMA = _read_when("vq", ema=True)

QUANTIZER_RULES = (
    Rule(f"{BLOCK}.kind", OneOf(KINDS)),
    Rule(f"{BLOCK}.update", OneOf(UPDATES), **_read_when("vq")),
    Rule(f"{BLOCK}.ema_decay", Real(0.0, 1.0, lo_open=True, hi_open=True), **_WHEN_EMA),
    Rule(f"{BLOCK}.ema_epsilon", Real(lo=0.0, lo_open=True), **_WHEN_EMA),
    Rule(f"{BLOCK}.gradient", OneOf(GRADIENTS), **_read_when("vq", "simvq")),
    Rule(f"{BLOCK}.levels", IntTuple(lo=2, example="(8, 5, 5, 5)"), **_read_when("fsq")),
    Rule(f"{BLOCK}.bits", Int(lo=1, hi=MAX_BITS), **_read_when("lfq")),
    Rule(f"{BLOCK}.entropy_weight", Real(lo=0.0), **_read_when("lfq")),
    Rule(f"{BLOCK}.entropy_groups", Int(lo=1), **_read_when("lfq")),
    Rule(f"{BLOCK}.diversity_gamma", Real(lo=0.0), **_read_when("lfq")),
    Rule(f"{BLOCK}.commitment_weight", Real(lo=0.0), **_read_when("lfq")),
    Rule(f"{BLOCK}.entropy_anneal_steps", Int(lo=0, note="0: no annealing"), **_read_when("lfq")),
    Rule(f"{BLOCK}.entropy_anneal_factor", Real(lo=0.0), **_read_when("lfq")),
)


def _same(value, default) -> bool:
    if isinstance(default, tuple):
        return isinstance(value, tuple | list) and tuple(value) == default
    return value == default


def check_quantizer_relations(config, prefix: str) -> None:
    """Unknown keys, keys the chosen kind does not read (changed from their default), and the
    values that relate keys (LFQ's groups and bits, FSQ's code count), after the rules ran."""
    block = get(config, BLOCK, None)
    if block is None or block is MISSING:
        return
    if not hasattr(block, "keys"):
        fail(f"{prefix}.{BLOCK}", block, f"a block with the keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(block.keys()) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"{prefix}.{BLOCK} has unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}"
        )
    kind = kind_of(config)
    for key in SPEC_KEYS:
        value = block.get(key, MISSING)
        if value is MISSING or applies(key, block):
            continue
        default = getattr(DEFAULTS, key)
        if not _same(value, default):
            readers = [k for k in KINDS if applies(key, {"kind": k, "update": "ema"})]
            needs = (
                f"{prefix}.{BLOCK}.kind={readers[0]!r}"
                if len(readers) == 1
                else (f"{prefix}.{BLOCK}.kind in {readers}")
            )
            if key in ("ema_decay", "ema_epsilon"):
                needs += f" with {prefix}.{BLOCK}.update='ema'"
            fail(
                f"{prefix}.{BLOCK}.{key}",
                value,
                f"its default {default!r} (unused), or {needs}",
                f"{prefix}.{BLOCK}.kind={kind!r}"
                + (f" with update={block.get('update', 'gradient')!r}" if kind == "vq" else "")
                + " does not read it",
            )
    if kind == "lfq":
        bits = get(config, f"{BLOCK}.bits", DEFAULTS.bits)
        groups = get(config, f"{BLOCK}.entropy_groups", DEFAULTS.entropy_groups)
        if is_int(bits) and is_int(groups) and bits % groups:
            fail(
                f"{prefix}.{BLOCK}.entropy_groups",
                groups,
                f"a divisor of {prefix}.{BLOCK}.bits={bits} ({divisors(bits)})",
                f"{bits} bits do not split into {groups} equal groups",
            )
    if kind == "fsq":
        levels = tuple(get(config, f"{BLOCK}.levels", DEFAULTS.levels))
        codes = 1
        for level in levels:
            codes *= level
        if codes > MAX_CODES:
            fail(
                f"{prefix}.{BLOCK}.levels",
                levels,
                f"levels whose product is at most {MAX_CODES} (int32 code indices)",
                f"{codes} codes",
            )
    _check_other_keys(config, prefix, kind)


def _check_other_keys(config, prefix: str, kind: str) -> None:
    """Keys outside the block that only the paper's quantizer reads."""
    ema = kind == "vq" and get(config, f"{BLOCK}.update", DEFAULTS.update) == "ema"
    if kind != "vq" and get(config, "model.l2_normalize_codes", True) is False:
        fail(
            f"{prefix}.model.l2_normalize_codes",
            False,
            f"True with {prefix}.{BLOCK}.kind={kind!r} (only kind 'vq' has the ablation "
            "without l2-normalized codes)",
        )
    entropy = get(config, "loss.entropy", 0.0)
    if (kind != "vq" or ema) and is_real(entropy) and entropy > 0:
        fail(
            f"{prefix}.loss.entropy",
            entropy,
            f"0 with {prefix}.{BLOCK}.kind={kind!r}"
            + (" and update='ema'" if ema else "")
            + " (the codebook entropy term reads the paper's gradient-trained codebook; "
            "LFQ has its own: model.quantizer.entropy_weight)",
        )


def check_vim_vocabulary(config, prefix: str) -> None:
    """The code count of a stage-1 config whose tokenizer feeds a VIM (the VIM's vocabulary)
    is at most MAX_VOCAB; after the rules and `check_quantizer_relations` ran."""
    kind = kind_of(config)
    spec = dataclasses.replace(
        DEFAULTS,
        kind=kind,
        levels=tuple(get(config, f"{BLOCK}.levels", DEFAULTS.levels)),
        bits=get(config, f"{BLOCK}.bits", DEFAULTS.bits),
    )
    codes = spec_num_codes(spec, get(config, "model.codebook_size"))
    if codes > MAX_VOCAB:
        # The key that sets the count, with the value it has: FSQ's levels, LFQ's bits, or a
        # codebook's size.
        key, value = {
            "fsq": (f"{BLOCK}.levels", spec.levels),
            "lfq": (f"{BLOCK}.bits", spec.bits),
        }.get(kind, ("model.codebook_size", get(config, "model.codebook_size")))
        fail(
            f"{prefix}.{key}",
            value,
            f"a quantizer of at most {MAX_VOCAB} codes (2**18, the largest VIM vocabulary; "
            "docs/codebook.md)",
            f"it gives {codes} codes, the vocabulary of {prefix}.vim",
        )
