"""The oracles of `x · Wᵀ` for a weight in the checkpoint's [out, in] orientation: the product at fp32 HIGHEST
(`matmul_reference`), and the CPU kernel's exact arithmetic in numpy (`matmul_canonical`), which its bits must
equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["matmul_reference", "matmul_canonical"]

LANES = 16


def matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] · w[out, in]ᵀ → [..., out] fp32."""
    f32 = jnp.float32
    return jnp.einsum("...i,oi->...o", x.astype(f32), w.astype(f32), precision=jax.lax.Precision.HIGHEST)


def matmul_canonical(x, w) -> np.ndarray:
    """x [M, in] · w[out, in]ᵀ → [M, out] fp32, summed exactly as cpu_matvec.cc sums (its header states it):
    16 lane accumulators from +0; bf16 blocks of 32 elements, lane j adding the odd product of its pair, then
    the even one, each sum rounded to fp32; fp32 blocks of 16, lane j one fused multiply-add; zeros past `in`;
    then the lanes added by halves. Every row computed alone, so it says nothing about the rows beside it.
    Subnormal sums are kept (the AVX512-BF16 instruction flushes them: keep test values away from them)."""
    dtype = np.dtype(jnp.dtype(x.dtype))
    if jnp.dtype(w.dtype) != dtype or dtype not in (np.dtype(jnp.bfloat16), np.dtype(np.float32)):
        raise ValueError(f"x and w must be both bfloat16 or both float32; got {x.dtype} and {w.dtype}")
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    block = 2 * LANES if dtype == np.dtype(jnp.bfloat16) else LANES
    pad = -x.shape[1] % block
    x, w = np.pad(x, ((0, 0), (0, pad))), np.pad(w, ((0, 0), (0, pad)))
    acc = np.zeros((x.shape[0], w.shape[0], LANES), np.float32)
    for start in range(0, x.shape[1], block):
        xb, wb = x[:, None, start:start + block], w[None, :, start:start + block]  # [M, 1, block], [1, O, block]
        if block == 2 * LANES:  # bf16 products are exact in fp32: only the sums round
            acc = (acc + xb[..., 1::2] * wb[..., 1::2]) + xb[..., 0::2] * wb[..., 0::2]
        else:
            acc = _fma32(xb, wb, acc)
    s8 = acc[..., :8] + acc[..., 8:]
    s4 = s8[..., :4] + s8[..., 4:]
    return (s4[..., 0] + s4[..., 2]) + (s4[..., 1] + s4[..., 3])


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a * b + c rounded once to fp32. a * b is exact in fp64; the sum is rounded to fp64 toward an odd last bit
    (round-to-odd, from the exact error of the sum), which then rounds to fp32 as the exact sum would."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = np.broadcast_to(c.astype(np.float64), p.shape)
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)  # s + err == p + c exactly (TwoSum)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)
