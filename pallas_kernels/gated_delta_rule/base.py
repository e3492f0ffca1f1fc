"""The gated delta rule's contract, shared by every implementation: argument checks and input preparation.

Inputs are token-major ([B, T, heads, dim]); every implementation validates them the same way, works in fp32
and reads q/k heads for value heads the same way (GVA: value head h reads q/k head h // (HV // HK), as
repeat_interleave does). q/k l2norm is x * rsqrt(sum(x^2) + 1e-6), eps inside the rsqrt (FLA and transformers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["L2NORM_EPS", "HIGHEST", "einsum", "l2norm", "prepare", "check_step", "repeat_heads", "previous_doc"]

HIGHEST = jax.lax.Precision.HIGHEST
L2NORM_EPS = 1e-6


def einsum(spec, *operands):
    """jnp.einsum at full fp32 precision on every platform. fp32 dots are exact on CPU whatever the precision flag
    (HIGHEST takes a slower path there); TPU and GPU round fp32 operands unless told HIGHEST (bf16 passes, tf32).
    Chosen per lowering platform, not by the default backend: a program compiled on a CPU host for a TPU or GPU
    (`qwenjax.aot`) must get HIGHEST."""
    product = lambda precision: lambda *ops: jnp.einsum(spec, *ops, precision=precision)
    return jax.lax.platform_dependent(*operands, cpu=product(None), default=product(HIGHEST))


def l2norm(x):
    # Matches FLA / HF: x * rsqrt(sum(x^2) + eps), eps inside the rsqrt.
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def prepare(q, k, v, g, beta, scale, initial_state, segment_ids, use_qk_l2norm):
    """Validates shapes and brings inputs to fp32, head-major [B, HV, T, ...] layout.

    Returns:
        (q, k, v, g, beta, state0, doc) where q, k [B, HK, T, K] are normalised
        and scaled (see `repeat_heads` for GVA); state0 is the fp32
        [B, HV, K, V] initial state and doc an int32 [B, T] per-row document
        index (0 for the first one).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be rank 4 ([B, T, H, D]); got q{q.shape}, k{k.shape}, v{v.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q{q.shape}, k{k.shape}")
    b, t, hk, dk = k.shape
    if v.shape[:2] != (b, t):
        raise ValueError(f"v must be [B={b}, T={t}, HV, V]; got v{v.shape}")
    hv, dv = v.shape[2], v.shape[3]
    if hk == 0 or hv % hk != 0:
        raise ValueError(
            f"number of value heads HV={hv} must be a multiple of the number of q/k heads "
            f"HK={hk} (q/k shape {k.shape}, v shape {v.shape})")
    if g.shape != (b, t, hv) or beta.shape != (b, t, hv):
        raise ValueError(
            f"g and beta must be [B, T, HV]={(b, t, hv)}; got g{g.shape}, beta{beta.shape}")
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(
            f"initial_state must be [B, HV, K, V]={(b, hv, dk, dv)}; got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T]={(b, t)}; got {segment_ids.shape}")

    f32 = jnp.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * jnp.asarray(dk ** -0.5 if scale is None else scale, f32)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, D]
    g, beta = (jnp.swapaxes(x, 1, 2) for x in (g, beta))  # [B, HV, T]

    if initial_state is None:
        state0 = jnp.zeros((b, hv, dk, dv), f32)
    else:
        state0 = initial_state.astype(f32)

    # Document index = number of segment-id changes so far. Comparing these
    # (rather than raw ids) keeps a reused id in a later segment separate.
    if segment_ids is None:
        doc = jnp.zeros((b, t), jnp.int32)
    else:
        seg = jnp.asarray(segment_ids)
        changed = jnp.concatenate(
            [jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        doc = jnp.cumsum(changed.astype(jnp.int32), axis=1)
    return q, k, v, g, beta, state0, doc


def check_step(q, k, v, g, beta, who: str) -> tuple[int, int, int, int, int]:
    """A decode step's fused kernels take one token: (B, HK, K, HV, V), or a ValueError naming `who`."""
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"{who} takes one token, q [B, 1, HK, K]; got q{q.shape}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q{q.shape}, k{k.shape}")
    b, _, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    if hv % hk:
        raise ValueError(f"number of value heads HV={hv} must be a multiple of the number of q/k heads HK={hk} "
                         f"(q/k shape {k.shape}, v shape {v.shape})")
    if v.shape[:2] != (b, 1) or g.shape != (b, 1, hv) or beta.shape != (b, 1, hv):
        raise ValueError(f"v must be [B, 1, HV, V] and g, beta [B, 1, HV]; got v{v.shape}, g{g.shape}, "
                         f"beta{beta.shape}")
    return b, hk, dk, hv, dv


def repeat_heads(x, hv):
    """[B, HK, ...] -> [B, HV, ...]: value head h reads q/k head h // (HV // HK) (repeat_interleave, not tile)."""
    return x if x.shape[1] == hv else jnp.repeat(x, hv // x.shape[1], axis=1)


def previous_doc(doc):
    """Document index of the preceding token; 0 (the initial state's) before t=0."""
    return jnp.concatenate([jnp.zeros_like(doc[:, :1]), doc[:, :-1]], axis=1)
