"""Pure-JAX reference implementations ("oracles") of the gated delta rule.

These mirror Hugging Face transformers' ``torch_recurrent_gated_delta_rule`` and
``torch_chunk_gated_delta_rule`` (``models/qwen3_5/modeling_qwen3_5.py``) and add
packed-sequence support via ``segment_ids``. They favour clarity and exactness
over speed; Pallas kernels are tested against them.

Recurrence, per value head (S in R^{K x V}, fp32)::

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)

All internal math runs in fp32 with ``Precision.HIGHEST`` matmuls so that the
oracle does not silently drop to bf16/tf32 passes on accelerators.

The unit-lower-triangular system is inverted by plain forward substitution
(``_unit_lower_inverse``) rather than ``jax.scipy.linalg.solve_triangular``: on
CPU the latter is a LAPACK trsm custom call, and with jaxlib 0.10.2 several of
them running concurrently in one program (u and w here, more under grad or when
several calls share a jit) intermittently deadlock the XLA CPU runtime.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

__all__ = ["gated_delta_rule_recurrent", "gated_delta_rule_chunked", "gated_delta_rule_step"]

_HIGHEST = jax.lax.Precision.HIGHEST
# Masked pairwise exponents are replaced by this *before* exp: exp() gives an
# exact 0 and, unlike masking after exp, no inf*0 = NaN reaches the gradients.
_MASK_EXPONENT = -1e30
_L2NORM_EPS = 1e-6


def _einsum(spec, *operands):
    # fp32 dots are exact fp32 on CPU whatever the precision flag, and HIGHEST takes a slower path there.
    precision = None if jax.default_backend() == "cpu" else _HIGHEST
    return jnp.einsum(spec, *operands, precision=precision)


def _l2norm(x):
    # Matches FLA / HF: x * rsqrt(sum(x^2) + eps), eps inside the rsqrt.
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2NORM_EPS)


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
        row = e_i - _einsum("...j,...jc->...c", l_i, inv)
        return jax.lax.dynamic_update_index_in_dim(inv, row, i, row_axis)

    return jax.lax.fori_loop(0, c, body, jnp.zeros_like(l))


@_unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    # d(M^-1) = -M^-1 dM M^-1 with dM = tril(dl, -1). Linear in dl, so JAX
    # transposes it for reverse mode: dl_bar = -tril(A^T A_bar A^T, -1), the
    # same rule FLA uses; no loop is differentiated.
    (l,), (dl,) = primals, tangents
    inv = _unit_lower_inverse(l)
    matmul = lambda a, b: _einsum("...ij,...jk->...ik", a, b)
    d_inv = -matmul(matmul(inv, jnp.tril(dl, -1)), inv)
    return inv, d_inv


def _prepare(q, k, v, g, beta, scale, initial_state, segment_ids, use_qk_l2norm):
    """Validates shapes and brings inputs to fp32, head-major [B, HV, T, ...] layout.

    Returns:
        (q, k, v, g, beta, state0, doc) where q, k are normalised, scaled and
        expanded to HV heads; state0 is the fp32 [B, HV, K, V] initial state
        and doc an int32 [B, T] per-row document index (0 for the first one).
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
        q, k = _l2norm(q), _l2norm(k)
    q = q * jnp.asarray(dk ** -0.5 if scale is None else scale, f32)
    # GVA: value head h reads q/k head h // (HV // HK) (repeat_interleave, not tile).
    if hv != hk:
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(k, hv // hk, axis=2)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, HV, T, D]
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


def _previous_doc(doc):
    """Document index of the preceding token; 0 (the initial state's) before t=0."""
    return jnp.concatenate([jnp.zeros_like(doc[:, :1]), doc[:, :-1]], axis=1)


def gated_delta_rule_recurrent(q, k, v, g, beta, *, scale=None, initial_state=None,
                               segment_ids=None, use_qk_l2norm=True):
    """Token-by-token recurrence via jax.lax.scan. Returns (o, final_state).

    Args:
        q: Queries, [B, T, HK, K].
        k: Keys, [B, T, HK, K].
        v: Values, [B, T, HV, V]; HV must be a multiple of HK (GVA).
        g: Log-decay (<= 0), [B, T, HV].
        beta: Write strength, already passed through a sigmoid, [B, T, HV].
        scale: Query scale applied after the l2norm; defaults to K ** -0.5.
        initial_state: Optional [B, HV, K, V] state entering the first token
            (with segment_ids: entering the first segment of each row only).
        segment_ids: Optional int [B, T]. Wherever segment_ids[b, t] differs
            from segment_ids[b, t - 1] the state is reset to zero before token
            t is applied, so packed documents never see each other.
        use_qk_l2norm: L2-normalise q and k (in fp32, eps 1e-6) first.

    Returns:
        o: [B, T, HV, V] in v.dtype.
        final_state: fp32 [B, HV, K, V] after the last token.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, state0, doc = _prepare(
        q, k, v, g, beta, scale, initial_state, segment_ids, use_qk_l2norm)
    reset = (doc != _previous_doc(doc))[:, None, :]  # [B, 1, T], broadcast over heads

    def step(state, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        state = jnp.where(reset_t[..., None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        kv_mem = _einsum("bhkv,bhk->bhv", state, k_t)
        delta = (v_t - kv_mem) * beta_t[..., None]
        state = state + k_t[..., :, None] * delta[..., None, :]
        o_t = _einsum("bhkv,bhk->bhv", state, q_t)
        return state, o_t

    time_major = lambda x: jnp.moveaxis(x, 2, 0)
    xs = tuple(time_major(x) for x in (q, k, v, g, beta, reset))
    final_state, o = jax.lax.scan(step, state0, xs)
    o = jnp.moveaxis(o, 0, 1)  # [T, B, HV, V] -> [B, T, HV, V]
    return o.astype(out_dtype), final_state


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
    q, k, v, g, beta, state, _ = _prepare(q, k, v, g, beta, scale, initial_state, None, use_qk_l2norm)
    q, k, v, g, beta = q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], beta[:, :, 0]  # [B, HV, ...]
    decay = jnp.exp(g)[..., None]                                                      # [B, HV, 1]
    # One batched product for both reads. (A sum over axis 2 is a strided reduction: 8x slower on XLA:CPU.)
    state_kq = _einsum("bhkv,bhkn->bhnv", state, jnp.stack([k, q], axis=-1))
    state_k, state_q = state_kq[:, :, 0], state_kq[:, :, 1]                            # S^T k, S^T q: [B, HV, V]
    delta = (v - decay * state_k) * beta[..., None]
    new_state = decay[..., None] * state + k[..., :, None] * delta[..., None, :]
    o = decay * state_q + jnp.sum(k * q, axis=-1, keepdims=True) * delta
    return o[:, None].astype(out_dtype), new_state


def gated_delta_rule_chunked(q, k, v, g, beta, *, chunk_size=64, scale=None, initial_state=None,
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
    ``torch_chunk_gated_delta_rule``.

    Args:
        q: Queries, [B, T, HK, K].
        k: Keys, [B, T, HK, K].
        v: Values, [B, T, HV, V]; HV must be a multiple of HK (GVA).
        g: Log-decay (<= 0), [B, T, HV].
        beta: Write strength, already passed through a sigmoid, [B, T, HV].
        chunk_size: Tokens per chunk; T is padded internally to a multiple.
        scale: Query scale applied after the l2norm; defaults to K ** -0.5.
        initial_state: Optional [B, HV, K, V] state entering the first token
            (with segment_ids: entering the first segment of each row only).
        segment_ids: Optional int [B, T]; the state resets to zero wherever the
            id changes from the previous token (see gated_delta_rule_recurrent).
        use_qk_l2norm: L2-normalise q and k (in fp32, eps 1e-6) first.

    Returns:
        o: [B, T, HV, V] in v.dtype.
        final_state: fp32 [B, HV, K, V] after the last (unpadded) token.
    """
    if isinstance(chunk_size, bool) or operator.index(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    chunk_size = operator.index(chunk_size)
    out_dtype = v.dtype
    q, k, v, g, beta, state0, doc = _prepare(
        q, k, v, g, beta, scale, initial_state, segment_ids, use_qk_l2norm)
    b, hv, t, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size

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

    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))  # [B, HV, N, C, ...]
    doc_prev = to_chunks(_previous_doc(doc)[:, None])[..., 0]  # [B, 1, N] live at chunk start
    doc = to_chunks(doc[:, None])  # [B, 1, N, C], broadcasts over heads
    doc_last = doc[..., -1]
    reach = doc == doc_prev[..., None]
    in_last = doc == doc_last[..., None]
    carry = doc_last == doc_prev

    # Chunk-local cumsum keeps every exponent used below <= 0 (no overflow) and
    # bounds the cancellation error of G_i - G_j by |G| over one chunk only.
    gcum = jnp.cumsum(g, axis=-1)
    pos = jnp.arange(c)
    pair_mask = (pos[:, None] >= pos[None, :]) & (doc[..., :, None] == doc[..., None, :])
    pair_exponent = jnp.where(pair_mask, gcum[..., :, None] - gcum[..., None, :], _MASK_EXPONENT)
    gamma = jnp.exp(pair_exponent)  # [B, HV, N, C, C], exactly 0 off-mask

    k_beta = k * beta[..., None]
    # Cross-document pairs are 0 in Gamma, so A is block diagonal per document.
    a_inv = _unit_lower_inverse(_einsum("...ik,...jk->...ij", k_beta, k) * gamma)
    decay_in = jnp.where(reach, jnp.exp(gcum), 0.0)  # start of chunk -> token i
    u = _einsum("...ij,...jv->...iv", a_inv, v * beta[..., None])
    w = _einsum("...ij,...jk->...ik", a_inv, k_beta * decay_in[..., None])

    attn = _einsum("...ik,...jk->...ij", q, k) * gamma  # causal incl. diagonal
    q_in = q * decay_in[..., None]
    k_out = k * jnp.where(in_last, jnp.exp(gcum[..., -1:] - gcum), 0.0)[..., None]
    state_decay = jnp.where(carry, jnp.exp(gcum[..., -1]), 0.0)  # [B, HV, N]

    def step(state, xs):
        u_c, w_c, q_c, k_c, attn_c, decay_c = xs
        v_new = u_c - _einsum("bhck,bhkv->bhcv", w_c, state)
        o_c = (_einsum("bhck,bhkv->bhcv", q_c, state)
               + _einsum("bhij,bhjv->bhiv", attn_c, v_new))
        state = state * decay_c[..., None, None] + _einsum("bhck,bhcv->bhkv", k_c, v_new)
        return state, o_c

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, q_in, k_out, attn, state_decay))
    final_state, o = jax.lax.scan(step, state0, xs)  # o: [N, B, HV, C, V]
    o = jnp.moveaxis(o, 0, 2).reshape(b, hv, n * c, dv)[:, :, :t]
    return jnp.swapaxes(o, 1, 2).astype(out_dtype), final_state
