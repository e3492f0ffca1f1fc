"""What the Mosaic GPU (Hopper, sm_90a) kernels share: the device facts they are built for, and the switch to
Mosaic GPU's interpreter, which runs them on the CPU with race detection (the tests).

Version differences live here: the interpreter is public from jax 0.11 (`plgpu.InterpretGPUParams`); on older
JAX `interpret=True` raises, naming the environment that has it (`scripts/gpu_env.sh`). Mosaic GPU is imported
when a kernel is built, never at import time, so the main environment imports every dispatch table.
"""

from __future__ import annotations

import contextlib
import dataclasses

__all__ = ["GpuFacts", "H100", "interpreter_available", "interpreted", "pad_to_multiple", "RACE_REPORT"]


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What a kernel's grid and tiles are sized by; passed in, never queried from the device."""
    num_sms: int
    smem_bytes: int  # dynamic shared memory one block may take


H100 = GpuFacts(num_sms=132, smem_bytes=227 * 1024)  # H100 SXM and H200: 132 SMs, 227 KiB per block


def pad_to_multiple(x, axis: int, multiple: int):
    """x zero-padded at the end of `axis` to a multiple of `multiple` (whole tiles for the kernels)."""
    import jax.numpy as jnp

    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def interpreter_available() -> bool:
    try:
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except ImportError:  # pragma: no cover - a JAX built without Mosaic GPU
        return False
    return hasattr(plgpu, "force_gpu_interpret_mode")


@contextlib.contextmanager
def interpreted(interpret: bool):
    """Every Mosaic GPU kernel traced inside runs in the interpreter (with race detection) when `interpret`."""
    if not interpret:
        yield
        return
    if not interpreter_available():
        import jax
        raise RuntimeError(f"the Mosaic GPU interpreter needs jax >= 0.11 (this is jax {jax.__version__}); "
                           "`bash scripts/gpu_env.sh` makes an environment that has it")
    from jax.experimental.pallas import mosaic_gpu as plgpu
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        yield


# What the interpreter prints for each race it sees (it keeps no record past the kernel that raced): tests capture
# the output of the kernels they run and look for it.
RACE_REPORT = "RACE DETECTED"
