"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), min-p — jittable, seeded.

Filters apply in transformers' order (temperature, top-k, top-p, min-p), each on fp32 logits, and a filter always
keeps the most likely token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """fp32 logits [B, V] scaled by temperature, with filtered-out tokens at -inf."""
    x = logits.astype(jnp.float32)
    # Shifted so the largest is 0 before dividing: a tiny temperature then sends the rest to -inf, not the
    # largest to +inf (inf - inf is NaN, and categorical over NaN always draws token 0).
    x = (x - x.max(axis=-1, keepdims=True)) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, params.top_k)[0][:, -1:]
        x = jnp.where(x < kth, _NEG, x)
    if params.top_p < 1:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        # keep a token while the mass before it is < top_p (so the first token always stays)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < params.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, _NEG)
    if params.min_p > 0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < params.min_p * probs.max(-1, keepdims=True), _NEG, x)
    return x


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V]."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)
