"""Which implementation each hot op runs: one small, frozen, hashable setting kept on the model.

    m = qwenjax.from_pretrained(path, kernels=Kernels(gated_delta_rule="pallas_tpu_interpret"))
    m.kernels                     # every field resolved to a concrete implementation for m's devices
    m2 = m.replace(kernels=m.kernels.replace(grouped_matmul="ragged_dot"))   # compiles anew, runs its own

A field is resolved once, when a model is built: the argument, else its environment variable
(`QWENJAX_GATED_DELTA_RULE`, `QWENJAX_GROUPED_MATMUL`, `QWENJAX_EXPERT_PARALLEL`, `QWENJAX_CPU_MATVEC`), else
"auto", which picks by the platform of the model's devices (`qwenjax.ops.platform`: NVIDIA Hopper is a platform of
its own, where the Mosaic GPU kernels run). The resolved setting lives in the model's graph
definition (a static attribute of the modules that dispatch), so it is part of every compile-cache key, and the
ops receive it as a static argument: nothing reads the environment while tracing.

`compiler_options(platform)` is the other half of batch invariance on the CPU: the XLA options under which a
compiled program's per-row numbers do not depend on how many rows it runs (pass them to the `jax.jit` of every
program whose results a request's tokens come from: `generate`'s, the serving engine's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from pallas_kernels.matmul import cpu
from qwenjax.ops import gated_delta_rule, grouped_matmul, matmul, moe
from qwenjax.ops.platform import platform_of


@dataclasses.dataclass(frozen=True)
class _Field:
    env: str
    choices: tuple[str, ...]
    auto: Callable[[str], str]  # platform ("cpu", "gpu", "gpu_sm90", "tpu") -> choice
    what: str


_FIELDS = {
    "gated_delta_rule": _Field("QWENJAX_GATED_DELTA_RULE", tuple(gated_delta_rule.IMPLEMENTATIONS),
                               gated_delta_rule.auto, "gated delta rule implementation"),
    "grouped_matmul": _Field("QWENJAX_GROUPED_MATMUL", tuple(grouped_matmul.IMPLEMENTATIONS),
                             grouped_matmul.auto, "grouped matmul implementation"),
    "expert_parallel": _Field("QWENJAX_EXPERT_PARALLEL", moe.EXPERT_PARALLEL, moe.auto_expert_parallel,
                              "expert parallelism"),
    "cpu_matvec": _Field("QWENJAX_CPU_MATVEC", tuple(matmul.IMPLEMENTATIONS), matmul.auto,
                         "CPU matmul implementation"),
}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One implementation name per hot op; None (unset) or "auto" until `resolve` fills it in.

    - gated_delta_rule: "xla" | "pallas_tpu" | "pallas_tpu_interpret" | "pallas_gpu" | "pallas_gpu_interpret"
      | "recurrent" (auto: pallas_tpu on TPU, pallas_gpu on NVIDIA Hopper, xla elsewhere);
    - grouped_matmul: "ragged_dot" | "pallas_tpu" | "pallas_tpu_interpret" | "pallas_gpu" | "pallas_gpu_interpret"
      (auto: pallas_tpu on TPU, pallas_gpu on NVIDIA Hopper);
    - expert_parallel: "allgather" | "ragged_all_to_all" | "ragged_all_to_all_emulated"
      (auto: ragged_all_to_all on TPU and GPU);
    - cpu_matvec: "kernel" | "xla": the C++ kernel for every x · Wᵀ on the CPU, any number of rows, each row's
      products independent of the rows beside it (auto: kernel on CPU when it builds, xla elsewhere). "xla" on
      the CPU turns batch invariance off (`program_options`): a request's tokens may then depend on its batch.
    """

    gated_delta_rule: str | None = None
    grouped_matmul: str | None = None
    expert_parallel: str | None = None
    cpu_matvec: str | None = None

    def __post_init__(self):
        for name, field in _FIELDS.items():
            value = getattr(self, name)
            if value is not None and value != "auto" and value not in field.choices:
                raise ValueError(f"Kernels({name}={value!r}): the {field.what} must be one of "
                                 f"{['auto', *field.choices]}")

    def replace(self, **changes: str | None) -> "Kernels":
        return dataclasses.replace(self, **changes)

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) not in (None, "auto") for name in _FIELDS)

    def resolve(self, platform: str) -> "Kernels":
        """Every unset field from its environment variable, else "auto"; "auto" by `platform`."""
        chosen = {}
        for name, field in _FIELDS.items():
            value = getattr(self, name)
            if value is None:
                value = os.environ.get(field.env) or "auto"
                if value != "auto" and value not in field.choices:
                    raise ValueError(f"${field.env}={value!r}: the {field.what} must be one of "
                                     f"{['auto', *field.choices]}")
            chosen[name] = field.auto(platform) if value == "auto" else value
        if chosen["cpu_matvec"] == "kernel":  # asked for by name: say why it cannot run, now rather than mid-trace
            if platform != "cpu":
                raise ValueError(f"Kernels(cpu_matvec='kernel') runs on the CPU; the model's devices are {platform}")
            cpu.require()
        return Kernels(**chosen)


def resolve_kernels(kernels: Kernels | Mapping[str, str] | None, platform: str) -> Kernels:
    """`kernels` (a Kernels, a dict of its fields, or None for all unset) resolved for `platform`."""
    if kernels is None:
        kernels = Kernels()
    elif isinstance(kernels, Mapping):
        unknown = sorted(set(kernels) - set(_FIELDS))
        if unknown:
            raise ValueError(f"kernels: unknown op(s) {unknown}; the ops are {sorted(_FIELDS)}")
        kernels = Kernels(**kernels)
    elif not isinstance(kernels, Kernels):
        raise TypeError(f"kernels must be a qwenjax.Kernels (or a dict of its fields), got {type(kernels).__name__}")
    return kernels.resolve(platform)


# XLA:CPU (jaxlib 0.10-0.11) hands reductions and elementwise fusions to YNNPACK library kernels, which sum in an
# order chosen by the shape (row 0 of a sum over 256 columns changes from 16 rows up: every RMSNorm of a 256-wide
# model) and drop bf16 roundings (a max over bf16 logits read their fp32 values). Measured on the bundled model: a
# prompt's hidden states after a prefill differed alone and beside 15 other prompts, and with a 16- or a 64-token
# GDN chunk; without these fusions, bit for bit the same (tests/test_batch_invariance.py). Keeping YNNPACK's dots
# alone ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", jaxlib 0.10.2) broke the prefill's invariance again (attention's
# dots). The price: XLA's own attention dots read a bf16 cache converted to fp32 (a copy of the window a step).
_NO_LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

log = logging.getLogger(__name__)


def compiler_options(platform: str) -> dict[str, str]:
    """XLA compiler options (`jax.jit(..., compiler_options=...)`) under which a program's numbers for one row do
    not depend on the rows beside it, on `platform` (a `qwenjax.ops.platform` name): on the CPU, no library
    fusions; elsewhere none. Empty, with a warning once, where this XLA knows no such option."""
    return _cpu_options() if platform == "cpu" else {}


@functools.cache
def _cpu_options() -> dict[str, str]:
    try:
        x = jax.device_put(jnp.zeros(2), jax.devices("cpu")[0])
        jax.jit(lambda a: a + 1, compiler_options=_NO_LIBRARY_FUSIONS).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - an XLA without the option: compile as it does, and say so
        log.warning("qwenjax: XLA refused %s (%s): on this CPU a request's numbers may depend on its batch",
                    _NO_LIBRARY_FUSIONS, e)
        return {}
    return dict(_NO_LIBRARY_FUSIONS)


def program_options(m) -> dict[str, str]:
    """`compiler_options` for the programs a model `m` (a `qwenjax.Qwen35`) runs requests through (`generate`'s
    and the serving engine's `jax.jit(..., compiler_options=...)`): those of the platform of its devices, when its
    products are batch-invariant. `Kernels(cpu_matvec="xla")` (or QWENJAX_CPU_MATVEC=xla) turns batch invariance
    off on the CPU: XLA's dot sums in a shape-dependent order, so the library fusions go back on too."""
    mesh = getattr(m, "mesh", None)
    platform = platform_of(None if mesh is None else mesh.devices.flat[0])
    if platform == "cpu" and getattr(m.kernels, "cpu_matvec", "kernel") != "kernel":
        return {}
    return compiler_options(platform)
