"""The rule engine of the config check: what a rule is, how it is applied, how a bad value reads.

A `Rule` says that a dotted key (relative to the config) must satisfy a value spec: `Int`,
`Real`, `OneOf`, `Fractions`, `Bool`, `Text`, `PositiveInts` or `IntTuple`, each of which
says whether a value is `ok` and, in words, what is `allowed`. `apply` walks a table of rules
over a config (a ConfigDict or a plain dict; `get` reads a dotted key, `MISSING` when absent)
and `fail` raises the one-line `ConfigError` that names the full key, the value and what is allowed,
e.g.

    config.seed=-1 is invalid; allowed: an integer in [0, 4294967295]

The rule tables of the trainers, the checks that relate keys and the entry point
(`check`) live in vitvq/config_check.py; nothing here knows a trainer or a key.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from vitvq.errors import ConfigError

MISSING = object()  # what `get` returns for an absent key (None is a value)


# --- value specs ---------------------------------------------------------------------------


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(x) -> str:
    """A bound or choice as a message shows it: 0.5, 1, 'hinge', None."""
    return repr(x) if not isinstance(x, float) else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer in [lo, hi] (either bound optional), or one of `also` (e.g. -1, None)."""

    lo: int | None = None
    hi: int | None = None
    also: tuple = ()
    note: str = ""  # what the extra values mean, e.g. "-1: the rest of the devices"

    def ok(self, value) -> bool:
        if value in self.also and (value is None or is_int(value)):
            return True
        if not is_int(value):
            return False
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer in [{self.lo}, {self.hi}]"
        elif self.lo is not None:
            text = f"an integer >= {self.lo}"
        elif self.hi is not None:
            text = f"an integer <= {self.hi}"
        else:
            text = "an integer"
        if self.also:
            text += " or " + " or ".join(_fmt(a) for a in self.also)
        return f"{text} ({self.note})" if self.note else text


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite number in the interval from lo to hi (open ends where `*_open`)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def ok(self, value) -> bool:
        if not is_real(value) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"a number in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        elif self.lo is not None:
            text = f"a finite number {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        elif self.hi is not None:
            text = f"a finite number {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        else:
            text = "a finite number"
        return f"{text} ({self.note})" if self.note else text


@dataclasses.dataclass(frozen=True)
class OneOf:
    choices: tuple

    def ok(self, value) -> bool:
        return isinstance(value, str | int | float | type(None)) and value in self.choices

    def allowed(self) -> str:
        return "one of " + ", ".join(_fmt(c) for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Fractions:
    """None, or a pair (lo, hi) with 0 < lo <= hi <= 1."""

    def ok(self, value) -> bool:
        if value is None:
            return True
        if not isinstance(value, tuple | list) or len(value) != 2:
            return False
        lo, hi = value
        return is_real(lo) and is_real(hi) and 0 < lo <= hi <= 1

    def allowed(self) -> str:
        return "None or a pair (lo, hi) with 0 < lo <= hi <= 1 (fractions of the shorter side)"


@dataclasses.dataclass(frozen=True)
class Bool:
    def ok(self, value) -> bool:
        return isinstance(value, bool)

    def allowed(self) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Text:
    """A non-empty string; where `optional`, also None or "" (unset)."""

    optional: bool = False
    note: str = ""

    def ok(self, value) -> bool:
        if self.optional and value in (None, ""):
            return True
        return isinstance(value, str) and bool(value)

    def allowed(self) -> str:
        text = "a non-empty string" + (" or None (unset)" if self.optional else "")
        return f"{text} ({self.note})" if self.note else text


@dataclasses.dataclass(frozen=True)
class PositiveInts:
    """A non-empty tuple (or list) of integers >= 1, e.g. the CNN's channel multipliers."""

    def ok(self, value) -> bool:
        return (
            isinstance(value, tuple | list)
            and len(value) > 0
            and all(is_int(v) and v >= 1 for v in value)
        )

    def allowed(self) -> str:
        return "a non-empty tuple of integers >= 1, e.g. (1, 1, 2, 4)"


@dataclasses.dataclass(frozen=True)
class IntTuple:
    """A non-empty tuple (or list) of integers >= `lo`, e.g. FSQ's levels."""

    lo: int = 1
    example: str = ""

    def ok(self, value) -> bool:
        return (
            isinstance(value, tuple | list)
            and len(value) > 0
            and all(is_int(v) and v >= self.lo for v in value)
        )

    def allowed(self) -> str:
        example = f", e.g. {self.example}" if self.example else ""
        return f"a non-empty tuple of integers >= {self.lo}{example}"


Spec = Int | Real | OneOf | Fractions | Bool | Text | PositiveInts | IntTuple


# --- rules, how they apply, how a bad value reads ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """`key` (dotted, relative to the config) must satisfy `spec`.

    required: the trainer reads the key without a default, so a missing key is an error.
    when: the rule applies only when `when(config)` is true (e.g. a threshold that only
      matters when the feature it belongs to is on); `reason` says so in the message.
    """

    key: str
    spec: Spec
    required: bool = False
    when: Callable[[Any], bool] | None = None
    reason: str = ""  # why `when` makes the key matter, added to the message


def get(config, key: str, default=MISSING):
    """The value at dotted `key` (references resolved), or `default` when absent."""
    node = config
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        try:
            node = node.get(part, MISSING)
        except (KeyError, AttributeError):
            return default
        if node is MISSING:
            return default
    return node


def fail(path: str, value, allowed: str, reason: str = "") -> None:
    """Raises the one-line ConfigError: `path=value is invalid[: reason]; allowed: ...`."""
    shown = repr(dict(value.items())) if hasattr(value, "items") else repr(value)
    reason = f": {reason}" if reason else ""
    raise ConfigError(f"{path}={shown} is invalid{reason}; allowed: {allowed}")


def apply(rules: Sequence[Rule], config, prefix: str) -> None:
    """Checks each rule against `config` in order; keys are named `prefix.key` in messages."""
    for rule in rules:
        if rule.when is not None and not rule.when(config):
            continue
        value = get(config, rule.key)
        path = f"{prefix}.{rule.key}"
        if value is MISSING:
            if rule.required:
                reason = f" ({rule.reason})" if rule.reason else ""
                raise ConfigError(f"{path} is missing{reason}; allowed: {rule.spec.allowed()}")
            continue
        if not rule.spec.ok(value):
            fail(path, value, rule.spec.allowed(), rule.reason)


def divisors(n: int) -> str:
    """The divisors of `n` as an allowed-values message lists them (the first 12, then ...)."""
    small = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in small[:12]) + (", ..." if len(small) > 12 else "")
