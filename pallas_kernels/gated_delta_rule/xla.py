"""The gated delta rule in pure JAX, as production runs it off TPU: the chunked WY form (prefill, training) and
a two-pass single-token step (decode).

`chunk_quantities` forms everything of the chunked form that does not depend on the incoming state, for all
chunks at once; `state_pass` walks the chunks with `lax.scan`. The TPU kernels (`tpu.py`) reuse the first and
replace the second.

The unit-lower-triangular system is inverted by plain forward substitution (`_unit_lower_inverse`) rather than
``jax.scipy.linalg.solve_triangular``: on CPU the latter is a LAPACK trsm custom call, and with jaxlib 0.10.2
several of them running concurrently in one program (u and w here, more under grad or when several calls share
a jit) intermittently deadlock the XLA CPU runtime.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.base import einsum, prepare, previous_doc, repeat_heads

__all__ = ["gated_delta_rule_chunked", "fitted_chunk_size", "gated_delta_rule_step", "ChunkQuantities",
           "chunk_quantities", "state_pass", "state_pass_inputs", "check_initial_state", "from_chunks"]

# Masked pairwise exponents are replaced by this *before* exp: exp() gives an
# exact 0 and, unlike masking after exp, no inf*0 = NaN reaches the gradients.
_MASK_EXPONENT = -1e30


@jax.custom_jvp
def _unit_lower_inverse(l):
    """Returns (I + tril(l, -1))^-1 for a batch [..., C, C], by forward substitution.

    Row i of the inverse is e_i - sum_{j<i} l_ij * row_j; rows not yet computed
    are still zero, so each step is one unmasked matvec. Same arithmetic as a
    trsm, but plain XLA (see the module docstring).
    """
    c = l.shape[-1]
    l = jnp.tril(l, -1)
    eye = jnp.broadcast_to(jnp.eye(c, dtype=l.dtype), l.shape)
    row_axis = l.ndim - 2

    def body(i, inv):
        l_i = jax.lax.dynamic_index_in_dim(l, i, row_axis, keepdims=False)
        e_i = jax.lax.dynamic_index_in_dim(eye, i, row_axis, keepdims=False)
        row = e_i - einsum("...j,...jc->...c", l_i, inv)
        return jax.lax.dynamic_update_index_in_dim(inv, row, i, row_axis)

    return jax.lax.fori_loop(0, c, body, jnp.zeros_like(l))


@_unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    # d(M^-1) = -M^-1 dM M^-1 with dM = tril(dl, -1). Linear in dl, so JAX
    # transposes it for reverse mode: dl_bar = -tril(A^T A_bar A^T, -1), the
    # same rule FLA uses; no loop is differentiated.
    (l,), (dl,) = primals, tangents
    inv = _unit_lower_inverse(l)
    matmul = lambda a, b: einsum("...ij,...jk->...ik", a, b)
    d_inv = -matmul(matmul(inv, jnp.tril(dl, -1)), inv)
    return inv, d_inv


def gated_delta_rule_step(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                           use_qk_l2norm=True):
    """One token of the recurrence (T == 1, a decode step), reading the state twice and writing it once.

    The recurrent form decays S, reads it for S^T k, writes the update, then reads it again for the output.
    With a = exp(g) and delta = beta * (v - a S^T k) the same token is

        S' = a S + k delta^T,    o = S'^T q = a S^T q + (k . q) delta,

    so S^T k and S^T q come from one pass over the old state and S' from a second one. The state is what a
    decode step moves (1 MiB per layer and row at the 0.8B shape, against ~0.1 MiB of activations).
    Same arguments and results as `gated_delta_rule_recurrent`; segment_ids cannot matter for one token.
    """
    if q.shape[1] != 1:
        raise ValueError(f"gated_delta_rule_step takes one token (T == 1); got q{q.shape}")
    out_dtype = v.dtype
    q, k, v, g, beta, state, _ = prepare(q, k, v, g, beta, scale, initial_state, None, use_qk_l2norm)
    q, k = repeat_heads(q, v.shape[1]), repeat_heads(k, v.shape[1])
    q, k, v, g, beta = q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0]  # [B, HV, ...]
    decay = jnp.exp(g)[..., None]                                                      # [B, HV, 1]
    # One batched product for both reads, [k; q] [2, K] · S [K, V] per head: with S as the right operand in its
    # own layout no transpose of the state comes first (with S on the left, XLA:CPU transposed it: 1.3-1.8x as
    # long; a sum over axis 2 is a strided reduction, 8x as long at the 0.8B shape).
    state_kq = einsum("bhnk,bhkv->bhnv", jnp.stack([k, q], axis=-2), state)
    state_k, state_q = state_kq[:, :, 0], state_kq[:, :, 1]                            # S^T k, S^T q: [B, HV, V]
    delta = (v - decay * state_k) * beta[..., None]
    new_state = decay[..., None] * state + k[..., :, None] * delta[..., None, :]
    o = decay * state_q + jnp.sum(k * q, axis=-1, keepdims=True) * delta
    return o[:, None].astype(out_dtype), new_state


class ChunkQuantities(NamedTuple):
    """The chunk-parallel quantities of the chunked WY form, head-major: [B, heads, N chunks, C, ...].

    q and k stay per q/k head (GVA is never materialised here); the rest are per value head, which
    `H = HV // HK` consecutive value heads share a q/k head with. All fp32.
    """
    q: jax.Array          # [B, HK, N, C, K] normalised and scaled
    k: jax.Array          # [B, HK, N, C, K] normalised
    w: jax.Array          # [B, HV, N, C, K]  A diag(beta exp(G) reach) K
    u: jax.Array          # [B, HV, N, C, V]  A diag(beta) V
    attn: jax.Array       # [B, HV, N, C, C]  Q K^T * Gamma (causal, diagonal included)
    decay_in: jax.Array   # [B, HV, N, C]     exp(G) * reach: chunk start -> token
    decay_out: jax.Array  # [B, HV, N, C]     exp(G_last - G) * in_last: token -> chunk end


def chunk_quantities(q, k, v, g, beta, *, chunk_size=64, scale=None, segment_ids=None,
                     use_qk_l2norm=True):
    """Everything of the chunked form that does not depend on the incoming state (see
    `gated_delta_rule_chunked`), for all chunks at once. T is padded to a multiple of chunk_size.

    The state multiplier of a chunk, carry * exp(G_last), is `decay_in[..., -1]`: the last token is in
    the chunk's last document, which the incoming state reaches exactly when no document starts inside.

    Returns:
        (ChunkQuantities, T): the quantities and the unpadded length.
    """
    if isinstance(chunk_size, bool) or operator.index(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    c = operator.index(chunk_size)
    q, k, v, g, beta, _, doc = prepare(q, k, v, g, beta, scale, None, segment_ids, use_qk_l2norm)
    b, hk, t, dk = k.shape
    hv = v.shape[1]

    # Pad T to a multiple of C. Padded steps have q = k = v = 0, g = 0 and
    # beta = 0 (S <- 1 * S + 0, an exact no-op) and continue the last document,
    # so the final state is unaffected.
    pad = (-t) % c
    if pad:
        pad_time = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        q, k, v, g, beta = (pad_time(x) for x in (q, k, v, g, beta))
        doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
    n = (t + pad) // c

    def to_chunks(x):
        return x.reshape(x.shape[:2] + (n, c) + x.shape[3:])

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))  # [B, H, N, C, ...]
    doc_prev = to_chunks(previous_doc(doc)[:, None])[..., 0]  # [B, 1, N] live at chunk start
    doc = to_chunks(doc[:, None])  # [B, 1, N, C], broadcasts over heads
    doc_last = doc[..., -1]
    reach = doc == doc_prev[..., None]
    in_last = doc == doc_last[..., None]

    # Chunk-local cumsum keeps every exponent used below <= 0 (no overflow) and
    # bounds the cancellation error of G_i - G_j by |G| over one chunk only.
    gcum = jnp.cumsum(g, axis=-1)
    pos = jnp.arange(c)
    pair_mask = (pos[:, None] >= pos[None, :]) & (doc[..., :, None] == doc[..., None, :])
    pair_exponent = jnp.where(pair_mask, gcum[..., :, None] - gcum[..., None, :], _MASK_EXPONENT)
    gamma = jnp.exp(pair_exponent)  # [B, HV, N, C, C], exactly 0 off-mask
    decay_in = jnp.where(reach, jnp.exp(gcum), 0.0)
    decay_out = jnp.where(in_last, jnp.exp(gcum[..., -1:] - gcum), 0.0)

    # Value heads grouped by the q/k head they read: [B, HK, HV // HK, N, ...]; q/k products are formed
    # once per q/k head and only the gated results are per value head.
    grouped = lambda x: x.reshape((b, hk, hv // hk) + x.shape[2:])
    per_value_head = lambda x: x.reshape((b, hv) + x.shape[3:])
    kk = einsum("bgnik,bgnjk->bgnij", k, k)[:, :, None]
    qk = einsum("bgnik,bgnjk->bgnij", q, k)[:, :, None]
    gamma, beta, decay_in_g = grouped(gamma), grouped(beta), grouped(decay_in)
    # Cross-document pairs are 0 in Gamma, so A is block diagonal per document.
    a_inv = _unit_lower_inverse(kk * gamma * beta[..., :, None])
    u = einsum("bgrnij,bgrnjv->bgrniv", a_inv * beta[..., None, :], grouped(v))
    w = einsum("bgrnij,bgnjk->bgrnik", a_inv * (beta * decay_in_g)[..., None, :], k)
    attn = qk * gamma
    return ChunkQuantities(q=q, k=k, w=per_value_head(w), u=per_value_head(u), attn=per_value_head(attn),
                           decay_in=decay_in, decay_out=decay_out), t


def state_pass(x: ChunkQuantities, state0):
    """The inter-chunk recurrence over chunk quantities, one chunk at a time (`lax.scan`).

    Per chunk, with S the incoming fp32 state [B, HV, K, V]:
        V_new = U - W S
        O     = decay_in * (Q S) + attn V_new
        S'    = decay_in[-1] * S + K^T (decay_out * V_new)

    Returns o fp32 [B, HV, N, C, V] and the final state.
    """
    b, hv = x.u.shape[:2]
    hk = x.q.shape[1]
    group = lambda s: s.reshape((b, hk, hv // hk) + s.shape[2:])

    def step(state, xs):
        q_c, k_c, w_c, u_c, attn_c, din_c, dout_c = xs
        v_new = u_c - einsum("bhck,bhkv->bhcv", w_c, state)
        q_state = einsum("bgck,bgrkv->bgrcv", q_c, group(state)).reshape(v_new.shape)
        o_c = din_c[..., None] * q_state + einsum("bhij,bhjv->bhiv", attn_c, v_new)
        k_update = einsum("bgck,bgrcv->bgrkv", k_c, group(dout_c[..., None] * v_new)).reshape(state.shape)
        state = din_c[..., -1, None, None] * state + k_update
        return state, o_c

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in x)
    final_state, o = jax.lax.scan(step, state0, xs)  # o: [N, B, HV, C, V]
    return jnp.moveaxis(o, 0, 2), final_state


def fitted_chunk_size(t: int) -> int:
    """The chunk for a sequence of t tokens: 64, or for a shorter one the first of 16, 32 that holds it.

    Padding is not free: the triangular inverse walks every row of the chunk, and the pairwise gates are C x C.
    A 16-token prefill (the serving engine's short chunks) padded to 64 took 2.3x as long through the whole
    bundled model on XLA:CPU, and 3x at 4 rows (BENCHMARKS.md).
    """
    return next(c for c in (16, 32, 64) if t <= c or c == 64)


def gated_delta_rule_chunked(q, k, v, g, beta, *, chunk_size=None, scale=None, initial_state=None,
                             segment_ids=None, use_qk_l2norm=True):
    """Chunked WY form. Returns (o, final_state).

    Within a chunk of C tokens (G = chunk-local cumsum of g, S = incoming state)::

        Gamma_ij = exp(G_i - G_j) if j <= i and same document, else 0
        A        = (I + strict_tril(diag(beta) K K^T * Gamma))^-1  (unit lower)
        U        = A diag(beta) V
        W        = A diag(beta * exp(G) * reach) K
        V_new    = U - W S
        O        = (Q * exp(G) * reach) S + (Q K^T * Gamma) V_new
        S'       = carry * exp(G_last) S + (K * exp(G_last - G) * in_last)^T V_new

    where ``reach`` marks tokens of the document live at the chunk start (the
    only ones the incoming state may reach), ``in_last`` tokens of the chunk's
    last document, and ``carry`` is 0 if a document starts inside the chunk.
    Without segment_ids all three masks are 1 and this is exactly HF's
    ``torch_chunk_gated_delta_rule``. `chunk_quantities` forms everything but
    S for all chunks at once; `state_pass` walks the chunks.

    Args: as `gated_delta_rule_recurrent`, plus
        chunk_size: Tokens per chunk; T is padded internally to a multiple. Default: `fitted_chunk_size(T)`.

    Returns:
        o: [B, T, HV, V] in v.dtype.
        final_state: fp32 [B, HV, K, V] after the last (unpadded) token.
    """
    if chunk_size is None:
        chunk_size = fitted_chunk_size(q.shape[1])
    x, t = chunk_quantities(q, k, v, g, beta, chunk_size=chunk_size, scale=scale, segment_ids=segment_ids,
                            use_qk_l2norm=use_qk_l2norm)
    state0 = check_initial_state(initial_state, k, v)
    o, final_state = state_pass(x, state0)
    return from_chunks(o, t, v.dtype), final_state


def state_pass_inputs(q, k, v, g, beta, *, chunk_size, scale, initial_state, segment_ids, use_qk_l2norm):
    """What a state-pass kernel takes: (q, k, w, u, attn) as matmul operands (bf16 for bf16 v, else fp32), the
    gates fp32 [B, HV, N, 2C] (decay_in | decay_out, one row per chunk), the fp32 initial state, and T."""
    x, t = chunk_quantities(q, k, v, g, beta, chunk_size=chunk_size, scale=scale, segment_ids=segment_ids,
                            use_qk_l2norm=use_qk_l2norm)
    operand = jnp.bfloat16 if v.dtype == jnp.bfloat16 else jnp.float32
    operands = tuple(a.astype(operand) for a in (x.q, x.k, x.w, x.u, x.attn))
    gates = jnp.concatenate([x.decay_in, x.decay_out], axis=-1)
    return operands, gates, check_initial_state(initial_state, k, v), t


def check_initial_state(initial_state, k, v):
    """The fp32 [B, HV, K, V] state entering the sequence: `initial_state`, or zeros."""
    b, _, hv, dv = v.shape
    shape = (b, hv, k.shape[-1], dv)
    if initial_state is None:
        return jnp.zeros(shape, jnp.float32)
    if initial_state.shape != shape:
        raise ValueError(f"initial_state must be [B, HV, K, V]={shape}; got {initial_state.shape}")
    return initial_state.astype(jnp.float32)


def from_chunks(o, t, dtype):
    """o [B, HV, N, C, V] -> [B, T, HV, V] in `dtype`, the padding dropped."""
    b, hv, n, c, dv = o.shape
    o = o.reshape(b, hv, n * c, dv)[:, :, :t]
    return jnp.swapaxes(o, 1, 2).astype(dtype)
