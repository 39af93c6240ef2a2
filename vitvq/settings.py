"""A training config, checked once and then frozen: `Settings`.

`vitvq.config_check.check(config, trainer=...)` runs every rule once (with the device and
process counts also the mesh and the batch sizes; the first bad value raises a one-line
`ConfigError` naming the key, the value and what is allowed) and returns the values as
`Settings`, a read-only tree. The stage builders, the loop, the data input and the writers
read only that tree; none of them checks a key again.

A `Settings` reads like the ConfigDict it came from (`s.loss.l2`, `s["batch_size"]`,
`s.get("init_from")`, `s.to_dict()`), holds plain Python values (sequences as tuples) and
cannot be changed: `replace("loss.perceptual", 0.0)` returns a changed copy. It is built
from a ConfigDict or from a plain dict (the step benchmark has no ml_collections), and is
hashable, so it can key a cache of compiled functions.

The value sets of the keys whose vocabulary no model owns (`DTYPES`, `TRAINABLE`) live here
too.
"""

import json
from collections.abc import Iterator, Mapping
from typing import Any

# The values some keys take, owned here: `vitvq.config_check` checks configs against them and
# the stage builders read them from here (value sets owned by a model, such as the backbones,
# stay with the model).
# config.dtype: the compute dtype, by name (a jax.numpy dtype of that name).
DTYPES = ("bfloat16", "float16", "float32")
# config.trainable (stage 1): which generator parameters train. "decoder": the encoder and the
# quantizer (its projection and codebook) are frozen; the code projection up and the decoder
# train (Parti's decoder fine-tuning).
TRAINABLE = ("all", "decoder")


def _freeze(value: Any, checked: bool = False) -> Any:
    if isinstance(value, Settings):
        return value
    if hasattr(value, "items") and hasattr(value, "keys"):
        return Settings(value, checked=checked)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, checked) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class Settings(Mapping):
    """A read-only tree of config values (attribute and item access)."""

    __slots__ = ("_values", "_checked")

    def __init__(self, values: Any = (), *, checked: bool = False):
        if hasattr(values, "to_dict"):  # a ConfigDict: its field references resolved
            values = values.to_dict()
        items = values.items() if hasattr(values, "items") else values
        frozen = {str(k): _freeze(v, checked) for k, v in items}
        object.__setattr__(self, "_values", frozen)
        object.__setattr__(self, "_checked", checked)

    # --- reading ----------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"the settings have no key {key!r}") from None

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"Settings({self.to_dict()!r})"

    @property
    def checked(self) -> bool:
        """Whether `check` built these settings, or the block of such settings (every rule
        passed: the rules of a pipeline cover its `vim` block too)."""
        return self._checked

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable copy (nested dicts, sequences as lists)."""
        return {k: _thaw(v) for k, v in self._values.items()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    # --- frozen -----------------------------------------------------------------------------

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError(f"settings are frozen: cannot set {key!r} (use .replace)")

    def __delattr__(self, key: str) -> None:
        raise TypeError(f"settings are frozen: cannot delete {key!r}")

    def replace(self, *pairs: Any, **changes: Any) -> "Settings":
        """A copy with values changed: `replace("loss.perceptual", 0.0, eval_lpips=False)`.

        Dotted keys reach into nested blocks. The copy is not checked again: change only to
        values the rules allow (it keeps `checked` of the original)."""
        if len(pairs) % 2:
            raise TypeError("replace takes (dotted key, value) pairs and keyword changes")
        changes = {**dict(zip(pairs[::2], pairs[1::2], strict=True)), **changes}
        tree = self.to_dict()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _thaw(_freeze(value))
        return Settings(tree, checked=self._checked)

    def without(self, *keys: str) -> "Settings":
        """A copy without the top-level `keys` (a pipeline's stage-1 part drops `vim`)."""
        return Settings(
            {k: v for k, v in self._values.items() if k not in keys}, checked=self._checked
        )


def frozen(config: Any) -> Settings:
    """`config` as Settings (already frozen settings as they are); checks nothing."""
    return config if isinstance(config, Settings) else Settings(config)
