"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`logical_axes` metadata on its `nnx.Param`); activations are
constrained by name too. `ShardingRules` turns names into a `PartitionSpec` and refuses a spec that would use one
mesh axis twice. A dimension that a mesh axis does not divide is replicated instead (tiny test models); real
model sizes divide evenly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwenjax import _compat

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),  # outside the MoE, expert-parallel shards split the batch
    "seq": None,
    "act_embed": None,
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",     # attention q_proj/o_proj rows (heads x head_dim)
    "kv_heads": "tensor",
    "head_dim": None,
    "gdn_qkv": "tensor",     # GDN in_proj_qkv rows / conv channels
    "gdn_v": "tensor",       # GDN value channels (in_proj_z, out_proj)
    "gdn_heads": "tensor",   # GDN value heads (in_proj_a/b, A_log, dt_bias)
    "conv_kernel": None,
    "experts": "expert",
    "expert_mlp": None,      # an expert's fused gate|up rows (a split would part gate from up)
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    rules: Mapping[str, str | tuple[str, ...] | None] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_RULES))

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> PartitionSpec:
        """PartitionSpec for a tensor with these logical axes (and, given shape+mesh, only divisible splits)."""
        used: dict[str, str] = {}
        out = []
        for i, name in enumerate(logical_axes):
            if name is None:
                out.append(None)
                continue
            if name not in self.rules:
                raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(self.rules)})")
            target = self.rules[name]
            axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
            for a in axes:
                if a in used:
                    raise ValueError(f"sharding rules map logical axes {used[a]!r} and {name!r} of one tensor "
                                     f"{tuple(logical_axes)} to the same mesh axis {a!r}")
                used[a] = name
            if mesh is not None:
                axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
                if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes = ()  # not divisible: replicate this dimension
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)

    def sharding(self, mesh: Mesh, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'data=1,fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2, 'expert': 1}."""
    sizes = {a: 1 for a in MESH_AXES}
    if spec is None:
        return sizes
    items = spec.items() if isinstance(spec, Mapping) else (
        part.split("=", 1) for part in spec.replace(" ", "").split(",") if part)
    for item in items:
        if len(item) != 2:
            raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' items separated by commas")
        name, size = item
        if name not in sizes:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {size!r}") from None
        if sizes[name] < 1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert). With no spec, all devices go on `fsdp`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if spec is None:
        sizes["fsdp"] = len(devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices, but {len(devices)} are available")
    try:
        arr = mesh_utils.create_device_mesh(tuple(sizes[a] for a in MESH_AXES), devices)
    except Exception:  # CPU / unusual topologies: plain order is fine
        arr = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


# ---- parameters --------------------------------------------------------------------------------------------------
def param_logical_axes(path: tuple, var) -> tuple[str | None, ...]:
    axes = tuple(_compat.variable_metadata(var, "logical_axes", None) or (None,) * _compat.variable_value(var).ndim)
    if len(axes) != len(_compat.variable_value(var).shape):
        raise ValueError(f"parameter {'.'.join(map(str, path))}: logical axes {axes} do not match shape "
                         f"{tuple(_compat.variable_value(var).shape)}")
    return axes


def param_shardings(state, mesh: Mesh, rules: ShardingRules):
    """A State-shaped tree of NamedSharding for the parameters in `state` (abstract or concrete)."""
    return _compat.map_variables(
        lambda path, v: rules.sharding(mesh, param_logical_axes(path, v), _compat.variable_value(v).shape), state)


# ---- activations -------------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "qwenjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: ShardingRules | None = None):
    """While tracing inside this context, `constrain` pins activations to `mesh` by the rules."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules or ShardingRules()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, ShardingRules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding`, if any."""
    return _ACTIVE.get()


def mesh_axes_for(logical: str, size: int) -> tuple[str, ...]:
    """The active mesh axes a logical axis of this size is split over (empty: replicated / no mesh)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return ()
    mesh, rules = ctx
    entry = rules.spec((logical,), (size,), mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, logical_axes, x.shape))
