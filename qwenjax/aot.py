"""Compile for TPU topologies from any host (libtpu's compile-only devices): memory and cost before renting.

    from qwenjax import aot
    compiled = aot.compile_forward_backward(cfg, "v5p:2x2x1", mesh="fsdp=4", batch=4, seq=4096)
    print(aot.summary(compiled))

Needs `libtpu` (`pip install "jax[tpu]==<your jax version>"`); no TPU. Nothing is allocated: parameters and
batches are shapes with shardings over the topology's devices. The ops' implementations (`kernels`) are resolved
for the TPU, not for the host: by default the Mosaic kernels and ragged all-to-all expert parallelism. Several
processes that load libtpu at once (parallel test runs, a CI beside a script) need
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` in their environment before JAX starts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax import _compat
from qwenjax.config import Qwen35Config
from qwenjax.ops.kernels import Kernels, resolve_kernels
from qwenjax.pretrained import abstract_model
from qwenjax.sharding import ShardingRules, activation_sharding, make_mesh, param_shardings
from qwenjax.train.loss import next_token_loss


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:2x2", "v6e:2x2" or "v5p:2x2x1"."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # no libtpu, or an unknown topology
        raise RuntimeError(f"cannot get compile-only devices for TPU topology {name!r} ({type(e).__name__}: {e}); "
                           "compiling for TPU needs libtpu: pip install \"jax[tpu]==<your jax version>\"") from e


def compile_forward_backward(cfg: Qwen35Config, topology: str, *, mesh: str | None = None, batch: int = 1,
                             seq: int = 2048, dtype: Any = jnp.bfloat16, remat: str = "none",
                             kernels: Kernels | Mapping[str, str] | None = None, rules: ShardingRules | None = None,
                             backward: bool = True):
    """The compiled gradient of the next-token loss with respect to every parameter, for `topology` (with
    `backward=False`, the compiled forward: logits).

    mesh: a mesh spec over the topology's devices ("fsdp=4,tensor=2", "fsdp=2,expert=8"; default all on fsdp).
    kernels: the ops' implementations; unset fields are resolved for the TPU (environment, else "auto").
    """
    devices = topology_devices(topology)
    mesh_ = make_mesh(mesh, devices)
    rules = rules or ShardingRules()
    graphdef, abstract = abstract_model(cfg, dtype, dtype, resolve_kernels(kernels, devices[0].platform))
    shardings = param_shardings(abstract, mesh_, rules)
    params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                          shardings, is_leaf=_compat.is_variable)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rules.sharding(mesh_, ("batch", None),
                                                                                 (batch, seq)))

    def loss(params, ids):
        logits = nnx.merge(graphdef, params)(ids, remat=remat)
        total, count = next_token_loss(logits, ids)
        return total / count

    def forward(params, ids):
        return nnx.merge(graphdef, params)(ids)

    with activation_sharding(mesh_, rules):
        lowered = jax.jit(jax.value_and_grad(loss) if backward else forward).lower(params, ids)
    return lowered.compile()


def summary(compiled) -> dict[str, float]:
    """Memory per device (bytes) and XLA's cost estimates of a compiled program."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older JAX
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    }
