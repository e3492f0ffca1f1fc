"""The decoding cache: per attention layer a preallocated KV buffer, per GDN layer the conv window and the
fp32 recurrent state, per row the number of tokens it holds, and for speculative decoding the MTP head's KV
buffer (its row p, at slot p, holds token p+1 read with the hidden state of token p) and the hidden state of each
row's last token (the head's next row reads it with the token that follows).

Rows are independent: row r's tokens occupy positions 0 .. lengths[r]-1 (its rotary positions too), so a batch
of prompts of different lengths needs no left padding and no shared position.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qwenjax.config import LINEAR_ATTENTION, Qwen35Config


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "rows"],
                   meta_fields=["dtype", "horizon"])
@dataclasses.dataclass(frozen=True)
class AttentionCache:
    """Keys (after norm and rotary) and values, [B, KV, max_len, head_dim] each, of dtype `dtype`.

    Head-major: a query's products with the keys and values of its KV head are then plain batched matmuls over
    contiguous slots (sequence-major, XLA:CPU transposed the buffers first: a bf16 decode step's attention ran
    2-4x as long, BENCHMARKS.md). A 16-bit float's are held as its bits (uint16): XLA:CPU writes a few slots into
    a bf16 buffer by converting all of it to fp32 and back (8 rows x 4096 slots at the 0.8B shape: 24 ms per
    buffer and step); into an integer one it writes just those slots. `read` and `write` hide the difference.

    A view (`window`, `gather_rows`) keeps the whole buffers and says which of their `rows` [R] it is and how
    many slots it sees (`horizon`): `read` copies out just those, `write` goes straight into the buffers. Copying
    the view's slots out and back in made a 16-row bf16 decode step at 256 slots a quarter slower.
    """
    k: jax.Array
    v: jax.Array
    dtype: jnp.dtype
    rows: jax.Array | None = None  # a view's rows of the buffers (an index past them: a padding row)
    horizon: int | None = None     # a view's slots: the first `horizon`

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype) -> AttentionCache:
        dtype = jnp.dtype(dtype)
        held = _held_dtype(dtype)
        return cls(k=jnp.zeros(shape, held), v=jnp.zeros(shape, held), dtype=dtype)

    @property
    def max_len(self) -> int:
        """The slots a row holds (a view's: its horizon)."""
        return self.k.shape[2] if self.horizon is None else self.horizon

    def read(self) -> tuple[jax.Array, jax.Array]:
        """(keys, values) [B, KV, max_len, head_dim] in `dtype`."""
        def view(x):
            x = x if self.rows is None else jnp.take(x, self.rows, axis=0, mode="clip")
            return _bitcast(x[:, :, :self.max_len], self.dtype)

        return view(self.k), view(self.v)

    def write(self, slots: jax.Array, k: jax.Array, v: jax.Array) -> AttentionCache:
        """The buffers with k, v [B, T, KV, head_dim] (cast to `dtype`) at slots [B, T] of each row; slots past
        max_len are dropped (and so are a view's padding rows)."""
        rows = (jnp.arange(self.k.shape[0]) if self.rows is None else self.rows)[:, None]
        slots = jnp.where(slots < self.max_len, slots, self.k.shape[2])
        # the indexed axes (row, slot) come first in what they select: [B, T, KV, head_dim], new's own layout
        put = lambda buf, new: buf.at[rows, :, slots].set(_bitcast(new.astype(self.dtype), buf.dtype), mode="drop")
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))


def _held_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def _bitcast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedDeltaNetCache:
    conv: jax.Array   # [B, kernel-1, conv_dim]: the last kernel-1 inputs of the causal conv, compute dtype
    state: jax.Array  # [B, HV, K, V] fp32 recurrent state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    layers: tuple[AttentionCache | GatedDeltaNetCache, ...]  # one per decoder layer
    lengths: jax.Array                                       # [B] int32: tokens held by each row
    # [B] int32: a row's next rotary position minus its length. 0 for text; a prompt with images or videos
    # advances positions by less than its token count (`qwenjax.model.positions`), and decoding continues there.
    rope_deltas: jax.Array
    mtp: AttentionCache | None = None  # the MTP head's layer (speculative decoding), same capacity
    # [B, D]: the final-normed hidden state of each row's last token (with `mtp`). The head's row for that token
    # also reads the token after it, which a prefix does not yet know: a prefix cache's snapshot keeps this
    # instead, and the row is computed when the next token comes.
    mtp_hidden: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """Capacity of the attention buffers (0 for a model without attention layers: unbounded)."""
        return max((c.max_len for c in self.layers if isinstance(c, AttentionCache)), default=0)


def init_cache(cfg: Qwen35Config, batch_size: int, max_len: int, dtype=jnp.bfloat16, *, mtp: bool = False) -> Cache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens each (and with `mtp`, the MTP head's)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
    kv = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
    layers = []
    for t in cfg.layer_types:
        if t == LINEAR_ATTENTION:
            layers.append(GatedDeltaNetCache(
                conv=jnp.zeros((batch_size, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), dtype),
                state=jnp.zeros((batch_size, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                 cfg.linear_value_head_dim), jnp.float32)))
        else:
            layers.append(AttentionCache.zeros(kv, dtype))
    return Cache(layers=tuple(layers), lengths=jnp.zeros((batch_size,), jnp.int32),
                 rope_deltas=jnp.zeros((batch_size,), jnp.int32),
                 mtp=AttentionCache.zeros(kv, dtype) if mtp else None,
                 mtp_hidden=jnp.zeros((batch_size, cfg.hidden_size), dtype) if mtp else None)


def accept_steps(cache: Cache, accepted: jax.Array) -> Cache:
    """The cache after each row's first `accepted[r]` (>= 1) tokens of a verify pass (`Qwen35ForCausalLM.verify`,
    whose GDN layers kept their state after every token): each GDN layer's window and state after that token,
    lengths advanced by it. Attention buffers keep every verified token; what lies past a row's length is never
    read and is overwritten as the row grows."""
    pick = accepted.astype(jnp.int32) - 1

    def layer(c):
        if isinstance(c, AttentionCache):
            return c
        take = lambda x: jnp.take_along_axis(x, pick.reshape(-1, *[1] * (x.ndim - 1)), axis=1)[:, 0]
        return GatedDeltaNetCache(conv=take(c.conv), state=take(c.state))

    return dataclasses.replace(cache, layers=tuple(layer(c) for c in cache.layers), lengths=cache.lengths + accepted)


def keep_rows(new: Cache, old: Cache, active: jax.Array) -> Cache:
    """`new` where active [B], else `old`'s GDN windows and states, lengths and MTP hidden states: rows a batched
    pass ran over but that take no part in it. Attention buffers are `new`'s: what a pass wrote lies past each
    row's length, never read and overwritten as the row grows."""
    def pick(a, b):
        return jnp.where(active.reshape(-1, *[1] * (a.ndim - 1)), a, b)

    def layer(n, o):
        return n if isinstance(n, AttentionCache) else jax.tree.map(pick, n, o)

    return dataclasses.replace(new, layers=tuple(layer(n, o) for n, o in zip(new.layers, old.layers)),
                               lengths=pick(new.lengths, old.lengths),
                               mtp_hidden=None if new.mtp_hidden is None else pick(new.mtp_hidden, old.mtp_hidden))


def window(cache: Cache, rows: int, horizon: int) -> Cache:
    """The first `rows` rows of `cache`, seeing the first `horizon` slots of the attention buffers: a cache to
    `extend` when every one of those rows that appends stays within `horizon` (slots past it are dropped), so a
    step reads what the rows hold instead of the whole capacity. `put_window` writes it back."""
    return _sub_cache(cache, lambda x: x[:rows], jnp.arange(rows), horizon)


def _sub_cache(cache: Cache, take, rows: jax.Array, horizon: int) -> Cache:
    """`cache` with `take` applied to every per-row array but the attention buffers, which become views of
    `rows` and `horizon` slots."""
    def layer(c):
        if isinstance(c, AttentionCache):
            return dataclasses.replace(c, rows=rows, horizon=min(horizon, c.k.shape[2]))
        return jax.tree.map(take, c)

    return dataclasses.replace(cache, layers=tuple(layer(c) for c in cache.layers), lengths=take(cache.lengths),
                               rope_deltas=take(cache.rope_deltas), mtp=None if cache.mtp is None else layer(cache.mtp),
                               mtp_hidden=None if cache.mtp_hidden is None else take(cache.mtp_hidden))


def _put_sub_cache(cache: Cache, sub: Cache, put) -> Cache:
    """`cache` with `put(array, sub's array)` for every per-row array but the attention buffers, which `sub`'s
    views wrote already: its buffers, no longer views."""
    def layer(c, s):
        if isinstance(c, AttentionCache):
            return dataclasses.replace(s, rows=None, horizon=None)
        return jax.tree.map(put, c, s)

    return dataclasses.replace(cache, layers=tuple(layer(c, s) for c, s in zip(cache.layers, sub.layers)),
                               lengths=put(cache.lengths, sub.lengths), rope_deltas=put(cache.rope_deltas,
                                                                                       sub.rope_deltas),
                               mtp=None if cache.mtp is None else layer(cache.mtp, sub.mtp),
                               mtp_hidden=None if cache.mtp_hidden is None else put(cache.mtp_hidden, sub.mtp_hidden))


def put_window(cache: Cache, sub: Cache) -> Cache:
    """`cache` with `window(cache, ...)`'s rows replaced by `sub`'s."""
    return _put_sub_cache(cache, sub, lambda x, s: jax.lax.dynamic_update_slice_in_dim(x, s, 0, 0))


def gather_rows(cache: Cache, rows: jax.Array, horizon: int) -> Cache:
    """`window` for rows anywhere in the batch: rows `rows` [R] of `cache` (an index past the batch: padding,
    reads the last row and writes nothing). `scatter_rows` writes it back."""
    return _sub_cache(cache, lambda x: jnp.take(x, rows, axis=0, mode="clip"), rows, horizon)


def scatter_rows(cache: Cache, sub: Cache, rows: jax.Array) -> Cache:
    """`cache` with `gather_rows(cache, rows, ...)`'s rows replaced by `sub`'s (padding rows dropped)."""
    return _put_sub_cache(cache, sub, lambda x, s: x.at[rows].set(s, mode="drop"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSnapshot:
    """What one row of a cache holds after its first `end` tokens, for a prefix cache: each GDN layer's window
    and state there, and each attention layer's keys and values from slot `start` on ([KV, size, head_dim],
    as held: a 16-bit float's bits), valid up to `end`. The slots before `start` come from the snapshots of
    shorter prefixes. With the MTP head's buffer (speculative decoding), its keys and values alike, valid up to
    end - 1 (its row for the last token waits for the token after it), and the last token's hidden state."""
    gdn: tuple[GatedDeltaNetCache, ...]            # one per GDN layer, leading batch axis dropped
    kv: tuple[tuple[jax.Array, jax.Array], ...]     # one (k, v) per attention layer
    mtp: tuple[jax.Array, jax.Array] | None = None
    mtp_hidden: jax.Array | None = None             # [D]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def take_row(cache: Cache, row: jax.Array, start: jax.Array, size: int) -> RowSnapshot:
    """Row `row`'s GDN state and its attention slots start .. start+size-1 (zeros past the buffer)."""
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, row, 0, keepdims=False)
    slots = start + jnp.arange(size)
    segment = lambda x: jnp.take(pick(x), slots, axis=1, mode="fill", fill_value=0)
    return RowSnapshot(
        gdn=tuple(GatedDeltaNetCache(conv=pick(c.conv), state=pick(c.state))
                  for c in cache.layers if isinstance(c, GatedDeltaNetCache)),
        kv=tuple((segment(c.k), segment(c.v)) for c in cache.layers if isinstance(c, AttentionCache)),
        mtp=None if cache.mtp is None else (segment(cache.mtp.k), segment(cache.mtp.v)),
        mtp_hidden=None if cache.mtp_hidden is None else pick(cache.mtp_hidden))


def put_row(cache: Cache, row: jax.Array, snapshot: RowSnapshot, start: jax.Array, end: jax.Array, *,
            state: bool) -> Cache:
    """`cache` with row `row`'s attention slots start .. end-1 (and the MTP head's) taken from `snapshot`
    (`take_row`'s, of the same `start`) and, with `state`, its GDN layers' window and state too (and the last
    token's hidden state) and its length set to `end`: restoring a prefix writes each snapshot of the chain, the
    last one with `state`."""
    size = snapshot.kv[0][0].shape[1] if snapshot.kv else 0
    slots = start + jnp.arange(size)
    slots = jnp.where(slots < end, slots, cache.max_len)  # past the prefix: dropped
    gdn, kv = iter(snapshot.gdn), iter(snapshot.kv)
    put = lambda buf, new: buf.at[row, :, slots].set(jnp.swapaxes(new, 0, 1), mode="drop")  # selects [size, KV, D]

    def layer(c):
        if isinstance(c, AttentionCache):
            k, v = next(kv)
            return dataclasses.replace(c, k=put(c.k, k), v=put(c.v, v))
        g = next(gdn)
        if not state:
            return c
        return GatedDeltaNetCache(conv=c.conv.at[row].set(g.conv), state=c.state.at[row].set(g.state))

    layers = tuple(layer(c) for c in cache.layers)
    mtp = cache.mtp
    if mtp is not None:
        mtp = dataclasses.replace(mtp, k=put(mtp.k, snapshot.mtp[0]), v=put(mtp.v, snapshot.mtp[1]))
    if not state:
        return dataclasses.replace(cache, layers=layers, mtp=mtp)
    return dataclasses.replace(cache, layers=layers, lengths=cache.lengths.at[row].set(end),
                               rope_deltas=cache.rope_deltas.at[row].set(0), mtp=mtp,
                               mtp_hidden=None if mtp is None else cache.mtp_hidden.at[row].set(snapshot.mtp_hidden))


def reset_row(cache: Cache, row: jax.Array) -> Cache:
    """`cache` with row `row` empty: no tokens, GDN windows and states zero (attention slots past a row's length
    are never read)."""
    def layer(c):
        if isinstance(c, AttentionCache):
            return c
        return GatedDeltaNetCache(conv=c.conv.at[row].set(0), state=c.state.at[row].set(0))

    return dataclasses.replace(cache, layers=tuple(layer(c) for c in cache.layers),
                               lengths=cache.lengths.at[row].set(0), rope_deltas=cache.rope_deltas.at[row].set(0))


_CACHE_AXES = {
    AttentionCache: {"k": ("batch", "kv_heads", None, None), "v": ("batch", "kv_heads", None, None)},
    GatedDeltaNetCache: {"conv": ("batch", None, "gdn_qkv"), "state": ("batch", "gdn_heads", None, None)},
}


def cache_shardings(cache: Cache, mesh, rules) -> Cache:
    """A Cache-shaped tree of NamedSharding: rows over the batch axes, heads over the tensor axis."""
    def layer(c):
        return dataclasses.replace(c, **{name: rules.sharding(mesh, axes, getattr(c, name).shape)
                                         for name, axes in _CACHE_AXES[type(c)].items()})

    return Cache(layers=tuple(layer(c) for c in cache.layers),
                 lengths=rules.sharding(mesh, ("batch",), cache.lengths.shape),
                 rope_deltas=rules.sharding(mesh, ("batch",), cache.rope_deltas.shape),
                 mtp=None if cache.mtp is None else layer(cache.mtp),
                 mtp_hidden=None if cache.mtp_hidden is None else rules.sharding(mesh, ("batch", None),
                                                                                 cache.mtp_hidden.shape))
