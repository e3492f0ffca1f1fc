"""Next-token sampling: logit controls, then greedy or temperature, top-k, top-p (nucleus), min-p — jittable, seeded.

Each step, on fp32 logits, in vLLM's order (vllm/v1/sample/sampler.py):
0. a constrained row's grammar mask (`qwenjax.inference.grammar`: the tokens its grammar refuses at -inf);
1. logit_bias (added) and min_tokens (a row's stop ids at -inf until it has generated min_tokens tokens);
2. repetition_penalty (tokens seen in the prompt or the output: positive logits divided by it, negative ones
   multiplied), frequency_penalty (minus its count in the output times f), presence_penalty (minus p for a token
   in the output) — vLLM's `apply_penalties`;
3. greedy takes the argmax of those; sampling divides by the temperature, then filters in transformers' order
   (top-k, top-p, min-p; a filter always keeps the most likely token).
Reported log-probabilities are the model's raw ones (`token_logprobs`), as vLLM's default.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.inference.grammar import apply_token_bitmask
from qwenjax.validate import InputError, check_fields

_NEG = -jnp.inf
MAX_LOGIT_BIAS = 300      # entries per request, as OpenAI's API
INT32_MAX = 2 ** 31 - 1   # pads token-id columns: an index past any vocabulary, dropped by the scatters
# RowSampling.used tags of the logit controls; "grammar": a constrained row's token mask (`grammar.py`)
ADJUSTMENTS = ("grammar", "penalties", "logit_bias", "min_tokens")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0            # 0: off; the vocabulary or more: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    presence_penalty: float = 0.0    # [-2, 2]; 0: off
    frequency_penalty: float = 0.0   # [-2, 2]; 0: off
    repetition_penalty: float = 1.0  # > 0; 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), at most 300, ids distinct

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InputError(f"{name}={getattr(self, name)}: must be in [-2, 2] (0 turns it off)")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 turns it off)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InputError(f"logit_bias has {len(self.logit_bias)} entries: at most {MAX_LOGIT_BIAS}")
        seen: dict[int, int] = {}
        for i, (token, bias) in enumerate(self.logit_bias):
            if not 0 <= token <= INT32_MAX:
                raise InputError(f"logit_bias[{i}]: token id {token} is not a token id")
            if not -100 <= bias <= 100:
                raise InputError(f"logit_bias[{i}]: the bias {bias} of token {token} must be in [-100, 100]")
            if seen.setdefault(token, i) != i:
                raise InputError(f"logit_bias[{i}]: token {token} is biased twice (also logit_bias[{seen[token]}])")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """InputError unless every logit_bias token is below `vocab_size`."""
        bad = next((i for i, (t, _) in enumerate(self.logit_bias) if t >= vocab_size), None)
        if bad is not None:
            raise InputError(f"logit_bias[{bad}]: token id {self.logit_bias[bad][0]} is not a token id "
                             f"(vocab_size={vocab_size})")

    def filters_only(self) -> SamplingParams:
        """These settings without the logit controls (which `RowSampling` columns carry)."""
        return dataclasses.replace(self, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                                   logit_bias=())


def _bucket(n: int) -> int:
    """A compiled width for n ids: 0, 4, 16, 64, ... (few shapes, little padding)."""
    size = 4 if n else 0
    while size < n:
        size *= 4
    return size


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                                "repetition_penalty", "bias_ids", "bias", "min_tokens", "min_tokens_ids", "allowed"],
                   meta_fields=["used"])
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Each row's own sampling settings, as arrays (a server's batch mixes requests). `used` (static: the compile
    key) names what any row uses, of "sample", "top_k", "top_p", "min_p" (a greedy-only batch compiles to an
    argmax, and a filter no row uses is skipped) and the logit controls "penalties", "logit_bias", "min_tokens"
    (a batch without them compiles as if they did not exist), and "grammar": `allowed` holds each row's token
    mask for each of the J positions a program scores (1, or a verify pass's k+1), from `grammar.py`; a row that
    is not constrained allows every token (all bits set). Without "grammar" it is [B, 0, 0]: the engine sets it
    per step (`with_allowed`), since a row's mask follows the tokens it sampled."""
    temperature: jax.Array  # [B] float32, 0: greedy
    top_k: jax.Array        # [B] int32, 0: off
    top_p: jax.Array        # [B] float32, 1: off
    min_p: jax.Array        # [B] float32, 0: off
    presence_penalty: jax.Array    # [B] float32
    frequency_penalty: jax.Array   # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    bias_ids: jax.Array     # [B, L] int32, INT32_MAX: no entry
    bias: jax.Array         # [B, L] float32
    min_tokens: jax.Array   # [B] int32: a row's min_tokens_ids stay at -inf until it generated this many tokens
    min_tokens_ids: jax.Array  # [B, S] int32 (its eos and stop ids), INT32_MAX: no entry
    allowed: jax.Array      # [B, J, ceil(V/32)] int32 bitmask words (bit j of word i: token 32i + j), or [B, 0, 0]
    used: frozenset[str]

    @classmethod
    def of(cls, rows: Sequence[SamplingParams], *, vocab_size: int | None = None,
           min_tokens: Sequence[int] | None = None,
           stop_ids: Sequence[Collection[int]] | None = None) -> RowSampling:
        """Host arrays for `rows` (each already checked by SamplingParams, and `check_vocab`), with each row's
        `min_tokens` and the `stop_ids` it masks until then. A top_k of `vocab_size` or more keeps every token:
        off (so any integer is safe here, never past int32)."""
        limit = INT32_MAX if vocab_size is None else vocab_size
        top_k = [p.top_k if p.top_k < limit else 0 for p in rows]
        used = {name for p, k in zip(rows, top_k) for name, on in (
            ("sample", not p.greedy), ("top_k", k > 0), ("top_p", p.top_p < 1), ("min_p", p.min_p > 0)) if on}
        used = used if "sample" in used else set()
        min_tokens = [0] * len(rows) if min_tokens is None else list(min_tokens)
        stop_ids = [()] * len(rows) if stop_ids is None else [sorted(s) for s in stop_ids]
        masked = [ids if m > 0 else [] for m, ids in zip(min_tokens, stop_ids)]
        used |= {tag for tag, on in (("penalties", any(p.penalized for p in rows)),
                                     ("logit_bias", any(p.logit_bias for p in rows)),
                                     ("min_tokens", any(masked))) if on}
        column = lambda field, dtype: np.array([getattr(p, field) for p in rows], dtype)
        bias_ids, bias = _pad([[t for t, _ in p.logit_bias] for p in rows], np.int32, INT32_MAX), \
            _pad([[b for _, b in p.logit_bias] for p in rows], np.float32, 0)
        return cls(column("temperature", np.float32), np.array(top_k, np.int32), column("top_p", np.float32),
                   column("min_p", np.float32), column("presence_penalty", np.float32),
                   column("frequency_penalty", np.float32), column("repetition_penalty", np.float32), bias_ids,
                   bias, np.array([m if ids else 0 for m, ids in zip(min_tokens, masked)], np.int32),
                   _pad(masked, np.int32, INT32_MAX), np.zeros((len(rows), 0, 0), np.int32), used=frozenset(used))

    def with_allowed(self, words: np.ndarray) -> RowSampling:
        """These rows constrained by the token masks `words` [B, J, ceil(V/32)] int32 (`allowed`)."""
        return dataclasses.replace(self, allowed=words, used=self.used | {"grammar"})

    @classmethod
    def stack(cls, parts: Sequence[RowSampling]) -> RowSampling:
        """The rows of `parts` (host RowSamplings) in one, id columns padded to the widest."""
        def cat(field, fill):
            arrays = [getattr(p, field) for p in parts]
            if arrays[0].ndim != 2:  # [B] columns; `allowed`, [B, 0, 0] until the engine sets the batch's
                return np.concatenate(arrays)
            width = max(a.shape[1] for a in arrays)
            return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)
                                   for a in arrays])

        fills = dict(bias_ids=INT32_MAX, min_tokens_ids=INT32_MAX)
        return cls(**{f.name: cat(f.name, fills.get(f.name, 0)) for f in dataclasses.fields(cls) if f.name != "used"},
                   used=frozenset().union(*(p.used for p in parts)))


def _pad(rows: Sequence[Sequence], dtype, fill) -> np.ndarray:
    """[B, bucket(longest)] from rows of different lengths."""
    out = np.full((len(rows), _bucket(max(map(len, rows), default=0))), fill, dtype)
    for r, values in enumerate(rows):
        out[r, :len(values)] = values
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenHistory:
    """What the penalties read, per row: how often each token was generated, and which tokens the prompt holds
    (the whole prompt, however much of it a prefix cache restored)."""
    counts: jax.Array  # [B, V] int32
    prompt: jax.Array  # [B, V] bool

    @classmethod
    def of_prompts(cls, ids: jax.Array, mask: jax.Array, vocab_size: int) -> TokenHistory:
        """Rows of prompt `ids` [B, T] where `mask`, nothing generated yet."""
        b = ids.shape[0]
        prompt = jnp.zeros((b, vocab_size), bool).at[jnp.arange(b)[:, None], jnp.where(mask, ids, INT32_MAX)].set(
            True, mode="drop")
        return cls(jnp.zeros((b, vocab_size), jnp.int32), prompt)

    def add(self, tokens: jax.Array, where: jax.Array | None = None, rows: jax.Array | None = None) -> TokenHistory:
        """With generated `tokens` [N] or [N, J] counted, those `where` (of the same shape), in rows `rows` [N]
        (default the first N; an index past the last row is dropped)."""
        rows = jnp.arange(tokens.shape[0]) if rows is None else rows
        rows = rows.reshape(-1, *[1] * (tokens.ndim - 1))
        one = jnp.ones(tokens.shape, jnp.int32) if where is None else where.astype(jnp.int32)
        return dataclasses.replace(self, counts=self.counts.at[rows, tokens].add(one, mode="drop"))

    def take(self, rows: jax.Array) -> TokenHistory:
        """Rows `rows` [N] (an index past the last row reads the last: padding, whose tokens are dropped)."""
        return TokenHistory(self.counts[rows], self.prompt[rows])


def _penalize(x, count, in_prompt, repetition, frequency, presence):
    """vLLM's apply_penalties, elementwise (fp32). Every caller runs these same operations on its [B, V] or
    [B, J, V] logits, so that XLA fuses them alike (it contracts a product and a subtraction into one FMA) and a
    verify pass's positions equal plain decoding's bit for bit."""
    present = count > 0
    # vLLM's scaling where(x > 0, 1 / penalties, penalties), penalties = where(seen, repetition, 1): the same
    # values, with one division a row instead of one a logit
    scaling = jnp.where(in_prompt | present, jnp.where(x > 0, 1.0 / repetition, repetition), 1.0)
    return x * scaling - frequency * count.astype(jnp.float32) - presence * present.astype(jnp.float32)


def adjust_logits(logits: jax.Array, rows: RowSampling, history: TokenHistory | None = None, produced=None,
                  drafts: jax.Array | None = None) -> jax.Array:
    """fp32 `logits` [B, V], or [B, J, V] (J consecutive positions of each row, as a verify pass scores), with
    each row's logit bias, min_tokens mask and penalties (steps 1 and 2 of the module's order).

    `history`: each row's prompt and generated tokens (with penalties). `produced` [B] or a scalar: the tokens
    each row generated before (the first position's) token, for min_tokens. With J positions, `drafts` [B, J-1]
    are the tokens at positions 0 .. J-2: position j counts drafts[:, :j] as generated too."""
    x = logits.astype(jnp.float32)
    b, vocab = x.shape[0], x.shape[-1]
    at_positions = (lambda a: a) if x.ndim == 2 else (lambda a: a[:, None])  # [B, ...] over the J positions
    row = jnp.arange(b)[:, None]
    if "grammar" in rows.used:
        x = apply_token_bitmask(x, rows.allowed[:, 0] if x.ndim == 2 else rows.allowed[:, :x.shape[1]])
    if "logit_bias" in rows.used:
        x = x + at_positions(jnp.zeros((b, vocab), jnp.float32).at[row, rows.bias_ids].add(rows.bias, mode="drop"))
    if "min_tokens" in rows.used:
        banned = jnp.zeros((b, vocab), bool).at[row, rows.min_tokens_ids].set(True, mode="drop")
        position = jnp.broadcast_to(jnp.asarray(produced, jnp.int32), (b,))
        if x.ndim == 3:
            position = position[:, None] + jnp.arange(x.shape[1])
        below = position < at_positions(rows.min_tokens)
        x = jnp.where(at_positions(banned) & below[..., None], _NEG, x)
    if "penalties" not in rows.used:
        return x
    counts, in_prompt = at_positions(history.counts), at_positions(history.prompt)
    if x.ndim == 3 and drafts is not None:
        # position j counts drafts[:, :j] too: [B, J, V] counts, computed where they are read (XLA fuses them)
        positions, vocab_ids = jnp.arange(x.shape[1])[None, :, None], jnp.arange(vocab)[None, None]
        for i in range(drafts.shape[1]):
            counts = counts + ((drafts[:, i, None, None] == vocab_ids) & (i < positions)).astype(jnp.int32)
    column = lambda a: a.reshape(-1, *[1] * (x.ndim - 1))  # [B] over positions and vocabulary
    return _penalize(x, counts, in_prompt, *(column(getattr(rows, f)) for f in (
        "repetition_penalty", "frequency_penalty", "presence_penalty")))


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


def _adjusted(logits, rows: RowSampling | None, history, produced):
    return logits if rows is None or not rows.used & set(ADJUSTMENTS) else adjust_logits(logits, rows, history,
                                                                                         produced)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, adjust: RowSampling | None = None,
           history: TokenHistory | None = None, produced=None) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V]; `adjust`: the rows' logit controls (`adjust_logits`)."""
    logits = _adjusted(logits, adjust, history, produced)
    if params.greedy:
        return argmax(logits)
    return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, params: RowSampling, history: TokenHistory | None = None,
                produced=None) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V], row r with its own settings and key keys[r] (`history`
    and `produced`: as `adjust_logits` takes them)."""
    logits = _adjusted(logits, params, history, produced)
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
