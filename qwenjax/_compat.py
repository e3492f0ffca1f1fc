"""The one place that hides differences between the JAX (0.10 - 0.12) and Flax NNX versions we support."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
from flax import nnx


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_metadata(v: nnx.Variable, name: str, default: Any = None) -> Any:
    """A metadata field of an NNX Variable (`get_metadata()` in newer Flax, `.metadata` before)."""
    meta = v.get_metadata() if hasattr(v, "get_metadata") else getattr(v, "metadata", {})
    return meta.get(name, default)


def variable_value(v: nnx.Variable) -> Any:
    """The raw value of a Variable (an array, or a ShapeDtypeStruct in an abstract State)."""
    return v.get_value() if hasattr(v, "get_value") else v.value


def _key_name(k: Any) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def variable_items(state: Any) -> Iterator[tuple[tuple[str | int, ...], nnx.Variable]]:
    """(path, Variable) for every Variable of an NNX State; path is a tuple of attribute names / list indices."""
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_variable):
        yield tuple(_key_name(k) for k in path), v


def map_variables(fn: Callable[[tuple, nnx.Variable], Any], state: Any) -> Any:
    """Maps `fn(path, variable)` over a State; the result has the State's structure with fn's values as leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: fn(tuple(_key_name(k) for k in path), v), state, is_leaf=is_variable)


def replace_values(state: Any, fn: Callable[[tuple, nnx.Variable], Any]) -> Any:
    """The State with each Variable's value replaced by `fn(path, variable)`, metadata kept."""
    return map_variables(lambda path, v: v.replace(fn(path, v)), state)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = False):
    """`jax.shard_map` (JAX >= 0.6) with a fallback to the experimental location of older releases."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    from jax.experimental.shard_map import shard_map as _sm  # pragma: no cover - old JAX only
    return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)
