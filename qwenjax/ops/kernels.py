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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

from pallas_kernels.matmul import cpu
from qwenjax.ops import gated_delta_rule, grouped_matmul, matmul, moe


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
                         "CPU matvec implementation"),
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
    - cpu_matvec: "kernel" | "xla": the C++ kernel for products of 1-4 rows on the CPU
      (auto: kernel on CPU when it builds, xla elsewhere).
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
