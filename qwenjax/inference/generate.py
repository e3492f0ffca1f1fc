"""Batched, cached, streaming generation.

    prompts ──prefill (one jitted call, cache fresh)──▶ first token ──decode step (jitted, cache donated)──▶ …

Rows keep their own lengths in the cache, so prompts of different lengths need no left padding. The host loop
dispatches step i+1 before it reads step i's tokens, so checking stop conditions never stalls the device.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.inference import speculative
from qwenjax.inference.sampling import ADJUSTMENTS, RowSampling, SamplingParams, TokenHistory, sample
from qwenjax.inference.tokenizer import StreamDecoder
from qwenjax.inputs import VisionInputs, token_rows, vision_inputs, vision_positions
from qwenjax.memory import check_fits
from qwenjax.model.cache import Cache, cache_shardings, init_cache
from qwenjax.model.qwen35 import NO_MTP
from qwenjax.ops.kernels import program_options
from qwenjax.sharding import activation_sharding, param_shardings
from qwenjax.validate import InputError, check, check_range

PROMPT_BUCKET = 64   # prompt lengths round up to this (one compiled prefill per bucket)
CACHE_BUCKET = 256   # default cache capacity rounds up to this
MAX_SEED = 2 ** 63 - 1


def eos_ids(m, eos_token_ids) -> frozenset[int]:
    if eos_token_ids is None:  # both were type-checked when the model was loaded
        eos_token_ids = m.generation_config.get("eos_token_id", m.config.eos_token_id)
    else:
        eos_token_ids = check(eos_token_ids, int | tuple[int, ...], "eos_token_ids")
    if eos_token_ids is None:
        return frozenset()
    return frozenset([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids)


def flat_params_model(m):
    """(leaves -> the module, the leaves' shardings): the jitted generation functions take the parameters as a
    flat list of arrays (`jax.tree.leaves(m.params)`). Flattening the nnx State on every call took host time per
    decode step from 3.9 to 6.1 ms at the 0.8B shape; on a 2-core CPU that time comes out of the device threads."""
    graphdef, treedef = m.graphdef, jax.tree.structure(m.params)
    return (lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)),
            jax.tree.leaves(param_shardings(m.params, m.mesh, m.rules)))


def vision_kwargs(vision: tuple | None, grids: tuple | None) -> dict:
    """`extend`'s keyword arguments for a prefill's images and videos: `vision` is what the jitted prefill takes,
    (positions, rope deltas, pixels, video pixels) or None; `grids` the static (image_grid_thw, video_grid_thw)."""
    if vision is None:
        return {}
    positions, deltas, pixels, video_pixels = vision
    return dict(positions=positions, rope_deltas=deltas, vision=VisionInputs(pixels, grids[0], video_pixels, grids[1]))


def grids_key(grids: tuple | None) -> tuple | None:
    """The compile-cache key of a prefill's grids (numpy arrays do not hash)."""
    return None if grids is None else tuple(None if g is None else g.tobytes() for g in grids)


def _penalized(adjust: RowSampling | None) -> bool:
    return adjust is not None and "penalties" in adjust.used


def _compiled(m, kind: str, sampling: SamplingParams, grids: tuple | None = None, controls: bool = False):
    """The jitted prefill or decode step of model `m` (compiled once per shape by jit itself; a prefill with
    images or videos once per set of `grids`, (image_grid_thw, video_grid_thw), which fix the vision shapes).
    `sampling`'s filters are compiled in. With `controls`, the programs also take the logit controls `adjust` (a
    RowSampling; the prefill before its pictures, the step with the rows' `TokenHistory`, None without penalties)
    and give the history back; without, they are the programs generation ran before there were controls."""
    vocab_size = m.config.vocab_size

    def build():
        model, p_shard = flat_params_model(m)
        if kind == "prefill":
            def fn(leaves, cache: Cache, ids, mask, rng, *rest):  # rest: [adjust], [vision]
                adjust, vision = rest[0] if controls else None, rest[-1] if grids is not None else None
                logits, cache = model(leaves).extend(ids, cache, attention_mask=mask, fresh=True,
                                                     **vision_kwargs(vision, grids))
                history = TokenHistory.of_prompts(ids, mask, vocab_size) if _penalized(adjust) else None
                tokens = sample(logits, jax.random.fold_in(rng, 0), sampling, adjust, history, 0)
                return (tokens, cache) + ((None if history is None else history.add(tokens),) if controls else ())
            args = 4 + controls + (grids is not None)
        else:
            def fn(leaves, cache: Cache, tokens, rng, step, *rest):  # rest: [adjust, history]
                adjust, history = rest if controls else (None, None)
                logits, cache = model(leaves).extend(tokens[:, None], cache)
                new = sample(logits, jax.random.fold_in(rng, step), sampling, adjust, history, step)
                return (new, cache) + ((None if history is None else history.add(new),) if controls else ())
            args = 4 + 2 * controls
        return jax.jit(fn, in_shardings=(p_shard, *[None] * args),
                       donate_argnums=(1, 6) if kind == "step" and controls else 1, compiler_options=program_options(m))

    return m.compiled(("generate", kind, sampling, grids_key(grids), controls), build)


def _compiled_speculative(m, kind: str, sampling: SamplingParams, k: int, grids: tuple | None = None,
                          controls: bool = False):
    """The jitted speculative prefill or step (`qwenjax.inference.speculative`), parameters as a flat list; a
    prefill with images or videos compiled once per set of `grids`, as `_compiled`'s. With `controls` as
    `_compiled`'s, each row's history and generated-token count (for min_tokens) also stay on the device, as rows
    gain 1 .. k+1 tokens a pass."""
    vocab_size = m.config.vocab_size

    def build():
        model, p_shard = flat_params_model(m)
        if kind == "prefill":
            def fn(leaves, cache, ids, mask, rng, vocab, *rest):  # rest: [adjust], [vision]
                adjust, vision = rest[0] if controls else None, rest[-1] if grids is not None else None
                history = TokenHistory.of_prompts(ids, mask, vocab_size) if _penalized(adjust) else None
                out = speculative.prefill(model(leaves), cache, ids, mask, rng, k, sampling, vocab=vocab,
                                          adjust=adjust, history=history, produced=0, **vision_kwargs(vision, grids))
                return out + ((None if history is None else history.add(out[0]), jnp.ones(ids.shape[0], jnp.int32))
                              if controls else ())
            args = 5 + controls + (grids is not None)
        else:
            def fn(leaves, cache, pending, drafts, dists, rng, i, vocab, *rest):  # rest: [adjust, history, lengths]
                adjust, history, lengths = rest if controls else (None, None, None)
                out = speculative.step(model(leaves), cache, pending, drafts, dists, jax.random.fold_in(rng, i),
                                       sampling, vocab=vocab, adjust=adjust, history=history, produced=lengths)
                if not controls:
                    return out
                emitted, count = out[:2]
                kept = jnp.arange(k + 1)[None] < count[:, None]
                return out + (None if history is None else history.add(emitted, kept), lengths + count)
            args = 7 + 3 * controls
        return jax.jit(fn, in_shardings=(p_shard, *[None] * args),
                       donate_argnums=(1, 9) if kind == "step" and controls else 1, compiler_options=program_options(m))

    return m.compiled(("speculative", kind, sampling, k, grids_key(grids), controls), build)


def compiled_draft_vocab(m):
    """The jitted `DraftVocab.of`: a draft vocabulary's ids and their rows of the LM head, gathered once."""
    def build():
        model, p_shard = flat_params_model(m)
        return jax.jit(lambda leaves, ids: speculative.DraftVocab.of(model(leaves), ids), in_shardings=(p_shard, None),
                       compiler_options=program_options(m))

    return m.compiled(("draft_vocab",), build)


def draft_vocab_ids(draft_vocab, vocab_size: int, k: int) -> np.ndarray | None:
    """`draft_vocab` checked: distinct token ids, for speculative decoding; as int32, or None."""
    if draft_vocab is None:
        return None
    if not k:
        raise InputError("draft_vocab is the MTP head's draft vocabulary: it needs num_speculative_tokens > 0")
    ids = np.asarray(draft_vocab)
    if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != bool):
        raise InputError(f"draft_vocab must be a non-empty list of token ids; got shape {ids.shape}, {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise InputError(f"draft_vocab[{bad[0]}] = {ids[bad[0]]} is not a token id (vocab_size={vocab_size})")
    seen: dict[int, int] = {}
    for i, t in enumerate(ids.tolist()):
        if seen.setdefault(t, i) != i:
            raise InputError(f"draft_vocab[{i}] = {t} repeats draft_vocab[{seen[t]}]")
    return ids.astype(np.int32)


def new_cache(m, batch_size: int, max_len: int, *, mtp: bool = False) -> Cache:
    """An empty cache for model `m`, laid out over its mesh (with the MTP head's buffer when `mtp`)."""
    def build():  # compiled once per shape: a request's time to first token must not include a compilation
        abstract = jax.eval_shape(lambda: init_cache(m.config, batch_size, max_len, m.dtype, mtp=mtp))
        shardings = cache_shardings(abstract, m.mesh, m.rules)
        check_fits(f"a cache of {max_len:,} tokens x {batch_size} row(s)",
                   ((jax.tree_util.keystr(path), a, s) for (path, a), s in
                    zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings))), m.mesh)
        return jax.jit(lambda: init_cache(m.config, batch_size, max_len, m.dtype, mtp=mtp), out_shardings=shardings)

    return m.compiled(("new_cache", batch_size, max_len, mtp), build)()


def stream(m, input_ids, attention_mask=None, *, max_new_tokens: int = 128, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, presence_penalty: float = 0.0,
           frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
           logit_bias: Sequence[tuple[int, float]] = (), min_tokens: int = 0, ignore_eos: bool = False,
           seed: int = 0, eos_token_ids: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (),
           tokenizer=None, max_cache_len: int | None = None, pixel_values=None, image_grid_thw=None,
           pixel_values_videos=None, video_grid_thw=None, num_speculative_tokens: int = 0,
           speculative_stats: speculative.SpeculativeStats | None = None,
           draft_vocab: Sequence[int] | None = None) -> Iterator[list[int | None]]:
    """Like `generate`, but yields after every step a list with each row's new token (None once it stopped)."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty, logit_bias=logit_bias)
    sampling.check_vocab(m.config.vocab_size)
    check_range(check(max_new_tokens, int, "max_new_tokens"), "max_new_tokens", minimum=1)
    check_range(check(min_tokens, int, "min_tokens"), "min_tokens", minimum=0, maximum=max_new_tokens)
    check(ignore_eos, bool, "ignore_eos")
    k = check_range(check(num_speculative_tokens, int, "num_speculative_tokens"), "num_speculative_tokens",
                    minimum=0)
    if k and not m.config.mtp_num_hidden_layers:
        raise InputError(f"num_speculative_tokens={k}: {NO_MTP}")
    draft_vocab = draft_vocab_ids(draft_vocab, m.config.vocab_size, k)
    check_range(check(seed, int, "seed"), "seed", minimum=0, maximum=MAX_SEED)
    if max_cache_len is not None:
        check_range(check(max_cache_len, int, "max_cache_len"), "max_cache_len", minimum=1)
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else check(stop_strings, tuple[str, ...],
                                                                                "stop_strings")
    empty = [i for i, s in enumerate(stop_strings) if not s]
    if empty:
        raise InputError(f"stop_strings[{empty[0]}] is empty: it would stop every row after its first token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to read the generated text (pass tokenizer=...)")
    prompts = token_rows(input_ids, attention_mask, vocab_size=m.config.vocab_size)
    empty = next((r for r, p in enumerate(prompts) if p.size == 0), None)
    if empty is not None:
        raise ValueError(f"prompt row {empty} is empty: generation needs at least one prompt token")
    lengths = np.array([len(p) for p in prompts])
    batch, longest = len(prompts), int(lengths.max())
    limit = m.config.max_position_embeddings
    if longest + max_new_tokens > limit:
        r = int(lengths.argmax())
        raise InputError(f"prompt row {r} has {longest} tokens; with max_new_tokens={max_new_tokens} it would reach "
                         f"position {longest + max_new_tokens}, past the model's max_position_embeddings={limit}")
    # a verify pass writes up to k tokens past what a row keeps
    need = max_new_tokens + k
    capacity = max_cache_len or min(limit + k, CACHE_BUCKET * math.ceil((longest + need) / CACHE_BUCKET))
    too_long = np.flatnonzero(lengths + need > capacity)
    if too_long.size:
        r = int(too_long[0])
        raise ValueError(f"prompt row {r} has {lengths[r]} tokens; with max_new_tokens={max_new_tokens}"
                         f"{f' and {k} speculative tokens' if k else ''} it needs {lengths[r] + need} cache slots, "
                         f"but the cache holds {capacity} (raise max_cache_len or shorten the prompt)")
    eos = frozenset() if ignore_eos else eos_ids(m, eos_token_ids)
    stops = StopChecks(tokenizer, stop_strings, min_tokens, batch)
    adjust = RowSampling.of([sampling] * batch, vocab_size=m.config.vocab_size, min_tokens=[min_tokens] * batch,
                            stop_ids=[eos] * batch)
    adjust = adjust if adjust.used & set(ADJUSTMENTS) else None
    sampling = sampling.filters_only()  # the controls travel in `adjust`: one compiled program for every value

    width = PROMPT_BUCKET * math.ceil(longest / PROMPT_BUCKET)
    ids = np.zeros((batch, width), np.int32)
    mask = np.zeros((batch, width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, 1

    vision = vision_inputs(m.config, ids, mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    grids, prefill_args = None, ()
    if vision is not None:
        grids = (vision.image_grid_thw, vision.video_grid_thw)
        positions, deltas = vision_positions(m.config, ids, mask, vision)
        prefill_args = ((positions, deltas, vision.pixel_values, vision.pixel_values_videos),)
    if k:
        yield from _stream_speculative(m, ids, mask, capacity, k, sampling, adjust, seed, max_new_tokens, eos,
                                       stops, speculative_stats, grids, prefill_args, draft_vocab)
        return

    rng = jax.random.key(seed)
    controls = adjust is not None
    prefill = _compiled(m, "prefill", sampling, grids, controls)
    step = _compiled(m, "step", sampling, controls=controls)
    done = np.zeros(batch, bool)
    params = jax.tree.leaves(m.params)
    with activation_sharding(m.mesh, m.rules):
        tokens, cache, *history = prefill(params, new_cache(m, batch, capacity), ids, mask, rng,
                                          *[adjust] * controls, *prefill_args)
        for i in range(max_new_tokens):
            if i + 1 < max_new_tokens:  # dispatch the next step before reading this one's tokens
                next_tokens, cache, *history = step(params, cache, tokens, rng, np.int32(i + 1),
                                                    *([adjust, *history] if controls else []))
            out: list[int | None] = []
            for r, t in enumerate(np.asarray(tokens).tolist()):
                if done[r]:
                    out.append(None)
                    continue
                out.append(t)
                if t in eos or stops.hit(r, t):
                    done[r] = True
            yield out
            if done.all() or i + 1 == max_new_tokens:
                return
            tokens = next_tokens


def _stream_speculative(m, ids, mask, capacity, k, sampling, adjust, seed, max_new_tokens, eos, stops, stats,
                        grids, prefill_args, draft_vocab) -> Iterator[list[int | None]]:
    """`stream`'s loop with MTP drafts: each verify pass gives every row 1 .. k+1 tokens, queued and yielded one
    per row per round, as plain decoding yields them. `grids` and `prefill_args`: the prompt's images and videos,
    as the plain prefill takes them; `draft_vocab`: checked token ids or None; `stops`: the rows' StopChecks."""
    batch = ids.shape[0]
    rng = jax.random.key(seed)
    controls = adjust is not None
    prefill = _compiled_speculative(m, "prefill", sampling, k, grids, controls)
    step = _compiled_speculative(m, "step", sampling, k, controls=controls)
    params = jax.tree.leaves(m.params)
    done = np.zeros(batch, bool)
    with activation_sharding(m.mesh, m.rules):
        vocab = None if draft_vocab is None else compiled_draft_vocab(m)(params, draft_vocab)
        # with controls, `state` is (history, each row's generated-token count), carried from pass to pass
        pending, drafts, dists, cache, *state = prefill(params, new_cache(m, batch, capacity, mtp=True), ids, mask,
                                                        rng, vocab, *[adjust] * controls, *prefill_args)
        passes = 1
        # dispatch each verify pass before reading the previous one's tokens, as plain decoding does: its inputs
        # are all on the device, and the host's bookkeeping then overlaps the pass
        in_flight = step(params, cache, pending, drafts, dists, rng, np.int32(passes), vocab,
                         *([adjust, *state] if controls else []))
        queues = [[t] for t in np.asarray(pending).tolist()]
        produced = 0
        while True:
            while all(queues[r] for r in range(batch) if not done[r]):
                out: list[int | None] = []
                for r in range(batch):
                    if done[r]:
                        out.append(None)
                        continue
                    t = queues[r].pop(0)
                    out.append(t)
                    if t in eos or stops.hit(r, t):
                        done[r] = True
                produced += 1
                yield out
                if done.all() or produced == max_new_tokens:
                    return
            emitted, count, pending, drafts, dists, cache, *state = in_flight
            passes += 1
            in_flight = step(params, cache, pending, drafts, dists, rng, np.int32(passes), vocab,
                             *([adjust, *state] if controls else []))
            emitted, count = np.asarray(emitted), np.asarray(count)
            for r in range(batch):
                if done[r]:
                    continue
                queues[r].extend(emitted[r, :count[r]].tolist())
                if stats is not None:
                    stats.steps += 1
                    stats.drafted += k
                    stats.accepted += int(count[r]) - 1


class StopStrings:
    """Whether a row's text, fed token by token, has come to hold one of `stop_strings`, at a cost per token linear
    in the text held back: each token decodes a short window of tokens (`StreamDecoder`), and the search covers only
    what can hold a match ending in the token's new characters (the longest stop string's length less one, and
    them). `check=False` reads a token without matching (vLLM's min_tokens: a match must end past it)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.strings = tuple(stop_strings)
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=False)
        self.keep = max(map(len, self.strings)) - 1
        self.tail = ""  # the last `keep` characters of the text

    def add(self, token: int, check: bool = True) -> bool:
        new = self.decoder.push(token)
        if not new:  # nothing new, or the first bytes of a character
            return False
        text = self.tail + new
        hit = check and any(text.find(s, max(0, len(self.tail) - len(s) + 1)) >= 0 for s in self.strings)
        self.tail = text[max(0, len(text) - self.keep):] if self.keep else ""
        return hit


class StopChecks:
    """`generate`'s stop strings for each of `batch` rows: `hit(r, token)` feeds row r's next token, True when its
    text holds a stop string that ends past its first `min_tokens` tokens (vLLM's rule)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], min_tokens: int, batch: int):
        self.rows = [StopStrings(tokenizer, stop_strings) for _ in range(batch)] if stop_strings else None
        self.min_tokens, self.counts = min_tokens, [0] * batch

    def hit(self, r: int, token: int) -> bool:
        if self.rows is None:
            return False
        self.counts[r] += 1
        return self.rows[r].add(token, check=self.counts[r] > self.min_tokens)


def generate(m, input_ids, attention_mask=None, **kwargs: Any) -> list[list[int]]:
    """New token ids per row, for a batch of prompts.

    Args:
      m: a `qwenjax.Qwen35` model.
      input_ids: [batch, seq] ids (with `attention_mask` marking the real tokens, any padding side), a [seq]
        array, or a list of rows of different lengths.
      max_new_tokens: at most this many new tokens per row.
      temperature, top_k, top_p, min_p: sampling (temperature 0 is greedy); `seed` makes it reproducible.
      presence_penalty, frequency_penalty ([-2, 2]), repetition_penalty (> 0), logit_bias ((token id, bias in
        [-100, 100]) pairs): vLLM's logit controls (`qwenjax.inference.sampling`), greedy or sampled.
      eos_token_ids: a row stops after any of these (default: generation_config.json's `eos_token_id`, else
        the config's); the stopping token is included, as transformers does. `ignore_eos`: none stops a row.
      min_tokens: no eos token and no stop string ends a row before it has this many tokens (the eos tokens are
        masked out until then, as vLLM does).
      stop_strings: a row also stops once its text contains one of these (a str is one stop string; needs
        `tokenizer`).
      max_cache_len: cache capacity per row (default: longest prompt + max_new_tokens, rounded up to 256).
      pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw: images and videos in the prompts, as
        `m(...)` takes them (in the order of their pad tokens, row by row).
      num_speculative_tokens: k > 0 drafts k tokens a step with the checkpoint's MTP head and verifies them in
        one pass of the main model (`qwenjax.inference.speculative`): greedy output is plain greedy's, sampled
        output has plain sampling's distribution. `speculative_stats` (a `SpeculativeStats`) counts the drafts.
      draft_vocab: the token ids the MTP head may draft (e.g. `speculative.frequent_tokens`; default all): its
        draft steps then read only their rows of the LM head (`speculative.DraftVocab`). The output is the same.
    """
    rows: list[list[int]] | None = None
    for out in stream(m, input_ids, attention_mask, **kwargs):
        if rows is None:
            rows = [[] for _ in out]
        for r, t in enumerate(out):
            if t is not None:
                rows[r].append(t)
    return rows or []
