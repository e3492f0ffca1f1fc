"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), min-p — jittable, seeded.

Filters apply in transformers' order (temperature, top-k, top-p, min-p), each on fp32 logits, and a filter always
keeps the most likely token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.validate import InputError, check_fields

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off

    def __post_init__(self):
        check_fields(self, "sampling argument")  # 1.7 is not a top_k, "0.5" not a temperature
        if not self.temperature >= 0:
            raise InputError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise InputError(f"top_k={self.top_k}: must be a non-negative integer (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p={self.top_p}: must be in (0, 1] (1 turns it off)")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p={self.min_p}: must be in [0, 1] (0 turns it off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "min_p"], meta_fields=["used"])
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Each row's own sampling settings, as arrays [B] (a server's batch mixes requests). `used` (static: the
    compile key) names what any row uses, of "sample", "top_k", "top_p", "min_p": a greedy-only batch compiles to
    an argmax, and a filter no row uses is skipped."""
    temperature: jax.Array  # [B] float32, 0: greedy
    top_k: jax.Array        # [B] int32, 0: off
    top_p: jax.Array        # [B] float32, 1: off
    min_p: jax.Array        # [B] float32, 0: off
    used: frozenset[str]

    @classmethod
    def of(cls, rows: Sequence[SamplingParams]) -> RowSampling:
        """Host arrays for `rows` (each already checked by SamplingParams)."""
        used = {name for p in rows for name, on in (("sample", not p.greedy), ("top_k", p.top_k > 0),
                                                    ("top_p", p.top_p < 1), ("min_p", p.min_p > 0)) if on}
        column = lambda field, dtype: np.array([getattr(p, field) for p in rows], dtype)
        return cls(column("temperature", np.float32), column("top_k", np.int32), column("top_p", np.float32),
                   column("min_p", np.float32), used=frozenset(used) if "sample" in used else frozenset())


def with_checkpoint_defaults(generation_config: dict, **given) -> dict:
    """temperature, top_k, top_p, min_p: those `given` (not None), else the checkpoint's generation_config.json
    (when its do_sample is true), else greedy."""
    sample = generation_config.get("do_sample", False)
    defaults = dict(temperature=(1.0, 0.0), top_k=(0, 0), top_p=(1.0, 1.0), min_p=(0.0, 0.0))
    out = {}
    for field, (sampled, off) in defaults.items():
        value = given.get(field)
        if value is None:
            value = generation_config.get(field) if sample else off
            value = sampled if value is None else value
        out[field] = value
    return out


def filter_logits(logits: jax.Array, params: SamplingParams | RowSampling) -> jax.Array:
    """fp32 logits [B, V] scaled by temperature, with filtered-out tokens at -inf (per row with RowSampling,
    whose greedy rows are left unscaled: `sample` takes their argmax)."""
    x = logits.astype(jnp.float32)
    per_row = isinstance(params, RowSampling)
    column = (lambda a: a[:, None]) if per_row else (lambda a: a)
    uses = (lambda name: name in params.used) if per_row else (
        lambda name: getattr(params, name) != SamplingParams.__dataclass_fields__[name].default)
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None] if per_row else \
        params.temperature
    # Shifted so the largest is 0 before dividing: a tiny temperature then sends the rest to -inf, not the
    # largest to +inf (inf - inf is NaN, and categorical over NaN always draws token 0).
    x = (x - x.max(axis=-1, keepdims=True)) / temperature
    vocab = x.shape[-1]
    if uses("top_k"):
        if per_row:  # each row its own k (0: all); one sort serves every row
            k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
            kth = jnp.take_along_axis(-jnp.sort(-x, axis=-1), (k - 1)[:, None], axis=-1)
            x = jnp.where(x < kth, _NEG, x)
        elif params.top_k < vocab:
            kth = jax.lax.top_k(x, params.top_k)[0][:, -1:]
            x = jnp.where(x < kth, _NEG, x)
    if uses("top_p"):
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        # keep a token while the mass before it is < top_p (so the first token always stays)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < column(params.top_p)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, _NEG)
    if uses("min_p"):
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < column(params.min_p) * probs.max(-1, keepdims=True), _NEG, x)
    return x


def argmax(logits: jax.Array) -> jax.Array:
    """The index of each row's largest logit, the first among ties (int32) as jnp.argmax, in two plain reductions:
    XLA:CPU runs jnp.argmax's (value, index) reduction one element at a time, 14 ms for 16 rows of a 248k
    vocabulary against 1.4 ms (BENCHMARKS.md)."""
    vocab = logits.shape[-1]
    top = logits.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)  # a row of NaNs has no maximum: an id, never one past the vocabulary


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V]."""
    if params.greedy:
        return argmax(logits)
    return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, params: RowSampling) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V], row r with its own settings and key keys[r]."""
    greedy = argmax(logits)
    if "sample" not in params.used:
        return greedy
    drawn = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, params)).astype(jnp.int32)
    return jnp.where(params.temperature > 0, drawn, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's log-probabilities (of its raw logits, before temperature and filters, as vLLM reports them):
    of each row's `tokens` [B], and the `top` most likely tokens' ids and log-probabilities [B, top]."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lps, top_ids = jax.lax.top_k(lp, top) if top else (lp[:, :0], jnp.zeros((lp.shape[0], 0), jnp.int32))
    return chosen, top_ids.astype(jnp.int32), top_lps
