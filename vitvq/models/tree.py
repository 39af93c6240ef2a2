"""Nested parameter dicts <-> flat {"a/b/c": leaf} dicts (bundles and weight files)."""

from collections.abc import Mapping
from typing import Any

from flax.linen import meta


def unbox(value: Any) -> Any:
    """A leaf without its Flax metadata box (no sharding constraint applied)."""
    if isinstance(value, meta.Partitioned):
        return value.unbox(apply_constraint=False)
    return value.unbox() if isinstance(value, meta.AxisMetadata) else value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}; metadata boxes are stripped, leaves kept as they are."""
    out = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"parameter name {key!r} contains '/'")
        value = unbox(value)
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
