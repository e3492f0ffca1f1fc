"""Grouped-query softmax attention in XLA: causal block skipping for full-sequence forwards, and a blockwise
(online-softmax) path for long unmasked non-causal attention (the vision tower's frames)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["attention_blockwise", "attention_xla"]

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays NaN-free
_MAX_CAUSAL_BLOCKS = 16
_MIN_CAUSAL_BLOCK = 128
# Blockwise attention: one tile is at most this many fp32 scores (8 MiB), measured best on a 2-core AVX-512
# machine among 2^19-2^23 at 784 and 4096 patches (BENCHMARKS.md, vision tower); blocks of 1024 queries/keys.
_TILE_SCORES = 1 << 21
_QUERY_BLOCK = 1024
_KEY_BLOCK = 1024


def _attend(q, k, v, mask, scale):
    """q [B, T, H, D] against head-major k, v [B, KV, S, D]."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    # [B, KV, G, T, D]: the query heads grouped by the KV head they read, then positions; both products are then
    # batched matmuls with (B, KV) leading in every operand, which XLA runs without transposing k or v first
    qg = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None, :, :], s, _MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bksd->bkgtd", p, v, preferred_element_type=jnp.float32)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *,
                        query_block: int = _QUERY_BLOCK, key_block: int = _KEY_BLOCK,
                        tile_scores: int = _TILE_SCORES) -> jax.Array:
    """Unmasked, non-causal softmax(q·kᵀ·scale)·v tile by tile (the vision tower's attention within a frame).

    Every (batch, key/value head) pair is an item whose query rows are its group's query heads times positions
    (all of them read the same keys). Items go `tile_scores // (query block · key block)` at a time, queries
    `query_block` rows at a time, and keys `key_block` at a time with an online softmax (running max and sum, the
    flash-attention recurrence), so no more than one tile of fp32 scores exists at once. On the CPU that tile
    stays in cache and XLA reuses its buffer from step to step: the dense path writes and re-reads
    batch · heads · T · S fresh scores (1 GiB for 16 heads over 4096 patches) and runs at a third of the speed.
    Ragged lengths are padded: padded queries are dropped, padded keys get the mask value. Same result as
    `attention_xla` with mask None, for head-major k, v [B, KV, S, D].
    """
    b, t, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    group, items = h // kv, b * kv
    rows = group * t
    qi = q.reshape(b, t, kv, group, d).transpose(0, 2, 3, 1, 4).reshape(items, rows, d)
    ki, vi = (x.reshape(items, s, d) for x in (k, v))
    n_q, n_k = -(-rows // query_block), -(-s // key_block)
    bq, bk = -(-rows // n_q), -(-s // n_k)  # equal blocks, the padding under one block
    per_tile = max(1, min(items, tile_scores // (bq * bk)))
    per_tile = max(c for c in range(1, per_tile + 1) if items % c == 0)  # items split evenly, no padding
    qi = jnp.pad(qi, ((0, 0), (0, n_q * bq - rows), (0, 0)))
    ki, vi = (jnp.pad(x, ((0, 0), (0, n_k * bk - s), (0, 0))) for x in (ki, vi))
    key_bias = jnp.where(jnp.arange(n_k * bk) < s, 0.0, _MASK_VALUE).reshape(n_k, bk)  # all 0 when s fits

    def rows_block(qb, kc, vc):  # [c, bq, d] against [c, n_k·bk, d]
        def scores(kb, bias):
            sc = jnp.einsum("cqd,ckd->cqk", qb, kb, preferred_element_type=jnp.float32) * scale
            return sc if n_k * bk == s else sc + bias

        def pv(p, vb):
            return jnp.einsum("cqk,ckd->cqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)

        if n_k == 1:
            sc = scores(kc, key_bias[0])
            p = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
            return pv(p, vc) / jnp.sum(p, axis=-1, keepdims=True)

        def step(carry, block):
            m, l, acc = carry
            kb, vb, bias = block
            sc = scores(kb, bias)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1, keepdims=True))
            p, rescale = jnp.exp(sc - m_new), jnp.exp(m - m_new)
            return (m_new, l * rescale + jnp.sum(p, axis=-1, keepdims=True), acc * rescale + pv(p, vb)), None

        c = qb.shape[0]
        blocks = (kc.reshape(c, n_k, bk, d).swapaxes(0, 1), vc.reshape(c, n_k, bk, d).swapaxes(0, 1), key_bias)
        init = (jnp.full((c, bq, 1), _MASK_VALUE, jnp.float32), jnp.zeros((c, bq, 1), jnp.float32),
                jnp.zeros((c, bq, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, blocks)
        return acc / l

    def tile(args):  # per_tile items: every query block against every key block
        qc, kc, vc = args
        qb = qc.reshape(per_tile, n_q, bq, d).swapaxes(0, 1)
        o = jax.lax.map(lambda x: rows_block(x, kc, vc), qb)  # [n_q, c, bq, d]
        return o.swapaxes(0, 1).reshape(per_tile, n_q * bq, d)

    split = lambda x: x.reshape(items // per_tile, per_tile, *x.shape[1:])
    o = jax.lax.map(tile, (split(qi), split(ki), split(vi))).reshape(items, n_q * bq, d)[:, :rows]
    return o.reshape(b, kv, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float, *,
                  causal: bool = False, kv_heads_first: bool = False) -> jax.Array:
    """softmax(q·kᵀ·scale + mask)·v without repeating k/v for the query groups.

    Args:
      q: [B, T, H, D]; k, v: [B, S, KV, D] with H a multiple of KV (query head h reads kv head h // (H // KV)),
        or with `kv_heads_first` [B, KV, S, D] (a decode cache's layout: no transpose of the buffers then).
      mask: boolean [B or 1, T, S] (True = may attend) or None.
      causal: the caller promises `mask` allows nothing above the diagonal (T == S). Query blocks then skip
        the key blocks after them: about half the work of a full-sequence forward.
    Without mask or causality, scores larger than one tile go blockwise (`attention_blockwise`).
    Returns:
      [B, T, H, D] in q's dtype. Scores, softmax and accumulation are fp32.
    """
    if not kv_heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    b, t, h, _ = q.shape
    s = k.shape[2]
    if mask is None and not causal and b * h * t * s > _TILE_SCORES:
        return attention_blockwise(q, k, v, scale)
    n_blocks = min(_MAX_CAUSAL_BLOCKS, t // _MIN_CAUSAL_BLOCK)
    if not causal or t != s or n_blocks < 2:
        return _attend(q, k, v, mask, scale)
    block = math.ceil(t / n_blocks)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        m = None if mask is None else mask[:, start:end, :end]
        outs.append(_attend(q[:, start:end], k[:, :, :end], v[:, :, :end], m, scale))
    return jnp.concatenate(outs, axis=1)
