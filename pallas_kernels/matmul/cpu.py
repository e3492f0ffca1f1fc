"""`x · Wᵀ` on the CPU through a small C++ kernel (cpu_matvec.cc) called as an XLA FFI target, for any number of
rows: every linear layer and the LM head, in decode steps and prefills alike.

Two reasons. Speed: decoding reads every weight once per step, and XLA:CPU's bf16 dot reads them at 1-9 GB/s; the
kernel streams them at the memory bandwidth, and with AVX512-BF16 it also outruns XLA's dot on many rows.
Batch invariance: each output element is one fixed sequence of fp32 operations on its x row and weight row
(`reference.matmul_canonical` spells it out), so a row's products do not depend on how many rows share the call,
on their padding or on the threads. XLA's dot does not promise that (its one-row fp32 dot sums in another order
than two rows), and a decode batch that ran the kernel at 1-4 rows and XLA's dot beyond changed greedy tokens.

It is compiled once per machine at first use with the host's C++ compiler (`$CXX`, else g++/c++) into the cache
directory (`$QWENJAX_CACHE`, else ~/.cache/qwenjax) and registered with XLA. Where that fails (no compiler, no
headers), `available()` is False and says why in a warning; `qwenjax.Kernels(cpu_matvec="auto")` then picks XLA.

Gradients are the XLA dot's (custom VJP), so the kernel can sit inside a differentiated model; there the forward
of a product of more than 4 rows is XLA's dot too (`_fwd`: training needs no batch invariance, and XLA's GEMM is
faster on many rows).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels.matmul.xla import matmul_xla

__all__ = ["matmul_cpu", "matmul_kernel", "matvec", "available", "require", "applies", "compiler", "TARGETS"]

log = logging.getLogger(__name__)

TARGETS = {jnp.dtype(jnp.bfloat16): ("qwenjax_bf16_matmul", "QwenjaxBf16Matmul"),
           jnp.dtype(jnp.float32): ("qwenjax_f32_matmul", "QwenjaxF32Matmul")}  # dtype -> (target, symbol)
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_matvec.cc")
# -ffp-contract=off: no multiply-add is fused but the kernel's explicit ones (its arithmetic is its contract)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC"]


def compiler() -> str | None:
    """The C++ compiler the kernel is built with, or None where the machine has none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    """The CPU's feature flags: a -march=native build must not be reused on a CPU with fewer (a shared home)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(cxx: str) -> str:
    """Compiles the kernel unless this source, jaxlib and CPU already have a build; returns the .so path."""
    import jaxlib

    with open(_SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), platform.machine().encode(),
                                     _cpu_features().encode(), cxx.encode(), " ".join(_FLAGS).encode()]))
    key = key.hexdigest()[:16]
    cache = os.environ.get("QWENJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwenjax")
    out = os.path.join(cache, f"cpu_matvec-{key}.so")
    if os.path.exists(out):
        return out
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build or an interrupted one never leaves a partial library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def _build_and_register() -> str | None:
    """Builds and registers the kernel once per process; None, or why it cannot be had (also in a warning)."""
    cxx = compiler()
    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler found ($CXX, g++, c++, clang++)")
        lib = ctypes.cdll.LoadLibrary(_build(cxx))
        for target, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: no kernel, and say why
        log.warning("qwenjax: the CPU matvec kernel is unavailable, CPU decoding uses XLA's slower dot: %s", e)
        return str(e)
    return None


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call)."""
    return _build_and_register() is None


def require() -> None:
    """Raises, saying why, unless the kernel is available."""
    why = _build_and_register()
    if why is not None:
        raise RuntimeError(f"the CPU matvec kernel is unavailable: {why}")


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `matmul_kernel(x, w)` serves x [..., in] · w[out, in]ᵀ: both bf16 or both fp32, w a matrix, at least
    one row."""
    return (x.dtype == w.dtype and w.dtype in TARGETS and w.ndim == 2 and x.ndim >= 1
            and x.shape[-1] == w.shape[1] and math.prod(x.shape[:-1]) >= 1)


def matmul_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32: the kernel where it `applies`, XLA's dot elsewhere."""
    return matmul_kernel(x, w) if applies(x, w) else matmul_xla(x, w)


@jax.custom_vjp
def matmul_kernel(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ, both bf16 or both fp32, fp32 out, any number of rows; see `applies`."""
    require()  # registers the FFI target in this process before the call is traced
    x2 = x.reshape(-1, x.shape[-1])
    out = jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32)
    y = jax.ffi.ffi_call(TARGETS[jnp.dtype(w.dtype)][0], out, vmap_method="sequential")(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[0])


# Differentiated products (training) need no batch invariance, and many rows run faster through XLA's GEMM (the
# kernel's fixed order sums each output across its 16 lanes; at 1024-4096 rows of the bundled model's shapes it took
# 1.3-2x XLA's time, and a training step's forward is all such products). So the forward of a gradient keeps the
# rule products had before the kernel took them all: 1-4 rows (fp32: 2-4, where XLA's one-row dot is as fast)
# through the kernel, more through XLA's dot. Inference (no gradient: `generate`, the engine) takes the kernel for
# every product.
_GRADIENT_MAX_ROWS = 4


def _differentiated(x, w):
    rows = math.prod(x.shape[:-1])
    fast = 2 <= rows if w.dtype == jnp.float32 else 1 <= rows
    return matmul_kernel(x, w) if fast and rows <= _GRADIENT_MAX_ROWS else matmul_xla(x, w)


def _fwd(x, w):
    return _differentiated(x, w), (x, w)


def _bwd(res, g):
    return jax.vjp(matmul_xla, *res)[1](g)


matmul_kernel.defvjp(_fwd, _bwd)
matvec = matmul_kernel  # its name when it served 1-4 rows (scripts/bench_cpu_matvec.py)
