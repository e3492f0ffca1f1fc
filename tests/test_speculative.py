"""Speculative decoding's building blocks: a verify pass over several tokens keeps every GDN layer's state after
each of them, and keeping a row's accepted prefix gives the cache that plain decoding of those tokens gives."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
import qwenjax.validate
from qwenjax.cli import main
from qwenjax.demo import byte_tokenizer, write_tokenizer
from qwenjax.inputs import token_batch, vision_inputs, vision_positions
from qwenjax.model.cache import AttentionCache, GatedDeltaNetCache, accept_steps, init_cache
from qwenjax.inference import speculative
from qwenjax.inference.sampling import SamplingParams, filter_logits
from qwenjax.inference.speculative import SpeculativeStats
from qwenjax.testing import TINY_MOE, add_mtp_tensors_, hf_mtp_head, make_hf_checkpoint
from test_multimodal import TOKENS, _image, _pixels, _text, _video


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec")
    make_hf_checkpoint(path, seed=2)  # random weights of a size that makes every path matter (randomize_)
    return qwenjax.from_pretrained(path, dtype="float32")


def test_accepting_a_prefix_of_a_verify_pass_equals_plain_decoding(model):
    """Rows of prompt lengths 9 and 4 verify 4 tokens each; row 0 keeps 2 of them, row 1 all 4. Against the same
    tokens decoded one by one: every GDN window and state, the lengths, the attention keys and values held, and
    the verify logits at the kept tokens equal the full forward's (1e-4). Several tokens in one pass take other
    matrix-product paths than one at a time: equal to fp32 rounding (1e-5), not bit for bit."""
    mod, cfg = model.module, model.config
    rng = np.random.default_rng(0)
    seq = rng.integers(0, cfg.vocab_size, (2, 13))
    lens, accepted, t = np.array([9, 4]), np.array([2, 4]), 4
    prompt = np.where(np.arange(9)[None] < lens[:, None], seq[:, :9], 0)
    mask = (np.arange(9)[None] < lens[:, None]).astype(np.int32)
    prefill = jax.jit(lambda i, c, mk: mod.extend(i, c, attention_mask=mk, fresh=True))
    _, cache = prefill(jnp.asarray(prompt), init_cache(cfg, 2, 32, jnp.float32), jnp.asarray(mask))
    drafts = seq[np.arange(2)[:, None], lens[:, None] + np.arange(t)]  # each row's next 4 tokens

    logits, _, steps = jax.jit(mod.verify)(jnp.asarray(drafts), cache)
    kept = accept_steps(steps, jnp.asarray(accepted))

    step = jax.jit(lambda i, c, mk: mod.extend(i, c, attention_mask=mk))
    plain = cache
    for i in range(t):  # a row that has taken its accepted tokens appends nothing more
        plain = step(jnp.asarray(drafts[:, i:i + 1]), plain, jnp.asarray((i < accepted)[:, None].astype(np.int32)))[1]

    assert np.asarray(kept.lengths).tolist() == np.asarray(plain.lengths).tolist() == (lens + accepted).tolist()
    for n, (a, b) in enumerate(zip(kept.layers, plain.layers)):
        if isinstance(a, GatedDeltaNetCache):
            np.testing.assert_allclose(a.conv, b.conv, atol=1e-5, err_msg=f"layer {n} conv window")
            np.testing.assert_allclose(a.state, b.state, atol=1e-5, err_msg=f"layer {n} state")
        else:
            assert isinstance(a, AttentionCache)
            for r in range(2):
                held = lens[r] + accepted[r]
                np.testing.assert_allclose(a.k[r, :, :held], b.k[r, :, :held], atol=1e-5, err_msg=f"layer {n} keys")
                np.testing.assert_allclose(a.v[r, :, :held], b.v[r, :, :held], atol=1e-5, err_msg=f"layer {n} values")

    full = np.asarray(jax.jit(lambda i: mod(i))(jnp.asarray(seq)))
    for r in range(2):
        for i in range(accepted[r]):
            err = np.abs(np.asarray(logits)[r, i] - full[r, lens[r] + i]).max()
            assert err < 1e-4, f"row {r}, verified token {i}: logits differ by {err:.2e}"


# ---- speculative generation ---------------------------------------------------------------------------------------
PROMPT_LENGTHS = (70, 5, 131, 1)


@pytest.fixture(scope="module", params=["dense", "moe"])
def mtp_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"spec-{request.param}")
    overrides = {"num_experts": TINY_MOE["num_experts"]} if request.param == "moe" else {}
    hf = make_hf_checkpoint(path, seed=3, **overrides)
    add_mtp_tensors_(path, hf_mtp_head(hf.config, seed=4))
    return qwenjax.from_pretrained(path, dtype="float32")


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _oracle_drafts(monkeypatch, prompts, plain, vocab):
    """Replaces the head's drafts by the plain greedy continuation, wrong at every position divisible by 3: the
    accept counts then run over 0 .. k (the head itself still runs and fills its cache)."""
    width = max(len(p) + len(o) for p, o in zip(prompts, plain)) + 8
    truth = np.zeros((len(prompts), width), np.int32)
    for r, (p, o) in enumerate(zip(prompts, plain)):
        truth[r, :len(p) + len(o)] = p + o
    real = speculative.draft

    def oracle(mod, cache, embeds, hidden, start, mask, k, sampling, key, *args, **kwargs):
        drafts, dists, cache = real(mod, cache, embeds, hidden, start, mask, k, sampling, key, *args, **kwargs)
        n_rows = embeds.shape[1] if mask is None else mask.sum(-1)
        pos = (start + n_rows)[:, None] + jnp.arange(1, k + 1)  # the position each draft predicts
        right = jnp.take_along_axis(jnp.asarray(truth), jnp.minimum(pos, width - 1), axis=1)
        return jnp.where(pos % 3 != 0, right, (right + 1) % vocab).astype(jnp.int32), dists, cache

    monkeypatch.setattr(speculative, "draft", oracle)


@pytest.mark.parametrize("k", [1, 3])  # k = 2 takes no path that 1 and 3 do not
def test_speculative_greedy_equals_plain_greedy(mtp_model, monkeypatch, k):
    """Prompts of 70, 5, 131 and 1 tokens; row 0 stops early at an eos. With the checkpoint's (random) head,
    and with drafts that are right two times in three, so that rows keep different numbers of them."""
    m = mtp_model
    prompts = _prompts(m.config.vocab_size)
    plain = qwenjax.generate(m, prompts, max_new_tokens=14)
    eos = plain[0][6]
    plain_eos = qwenjax.generate(m, prompts, max_new_tokens=14, eos_token_ids=eos)
    stats = SpeculativeStats()
    assert qwenjax.generate(m, prompts, max_new_tokens=14, eos_token_ids=eos, num_speculative_tokens=k,
                            speculative_stats=stats) == plain_eos
    assert stats.drafted == k * stats.steps > 0
    _oracle_drafts(monkeypatch, prompts, plain, m.config.vocab_size)
    fresh = m.replace()  # its own compile cache: the patched drafts are traced anew
    stats = SpeculativeStats()
    assert qwenjax.generate(fresh, prompts, max_new_tokens=14, num_speculative_tokens=k,
                            speculative_stats=stats) == plain
    if k > 1:
        assert 0 < stats.accepted < stats.drafted  # some kept, some rejected
    assert stats.steps < 4 * 14  # fewer verify passes than tokens


@pytest.mark.parametrize("mtp_model", ["dense"], indirect=True)  # MoE adds nothing here
@pytest.mark.parametrize("controls", [
    dict(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.5, logit_bias=[(5, 2.0)], min_tokens=6),
    dict(repetition_penalty=0.6, frequency_penalty=-0.8)])  # < 1, < 0: repeating is encouraged
def test_speculative_greedy_with_logit_controls_equals_plain_greedy(mtp_model, monkeypatch, controls):
    """Penalties, a bias and min_tokens, k = 3: a verified position counts the drafts before it as generated, so
    the output is plain greedy's with the same controls; with the checkpoint's head, and with drafts right two
    times in three (rows keep different numbers of them)."""
    m, k = mtp_model, 3
    prompts = _prompts(m.config.vocab_size)
    plain = qwenjax.generate(m, prompts, max_new_tokens=14, **controls)
    assert plain != qwenjax.generate(m, prompts, max_new_tokens=14)
    assert qwenjax.generate(m, prompts, max_new_tokens=14, num_speculative_tokens=k, **controls) == plain
    _oracle_drafts(monkeypatch, prompts, plain, m.config.vocab_size)
    stats = SpeculativeStats()
    assert qwenjax.generate(m.replace(), prompts, max_new_tokens=14, num_speculative_tokens=k,
                            speculative_stats=stats, **controls) == plain
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("mtp_model", ["dense"], indirect=True)  # MoE adds nothing here
def test_recomputing_the_kept_tokens_equals_keeping_every_state(mtp_model):
    """speculative.step's two rollbacks from the same cache and drafts (3 rows keeping 3, 1 and 0 of 3 drafts):
    the same tokens, counts and next drafts, and the same cache: GDN windows and states, lengths, and the main
    model's and the head's keys and values up to each row's length."""
    m, k = mtp_model, 3
    mod, sampling = m.module, SamplingParams()
    prompts = _prompts(m.config.vocab_size)[:3]
    plain = qwenjax.generate(m, prompts, max_new_tokens=k + 1)
    ids = np.zeros((3, 192), np.int32)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
    cache = init_cache(m.config, 3, 256, jnp.float32, mtp=True)
    first, _, dists, cache = jax.jit(lambda c: speculative.prefill(mod, c, ids, mask, jax.random.key(0), k,
                                                                 sampling))(cache)
    assert np.asarray(first).tolist() == [o[0] for o in plain]
    drafts = np.array([o[1:] for o in plain], np.int32)
    for r, wrong_from in ((1, 1), (2, 0)):
        drafts[r, wrong_from] = (drafts[r, wrong_from] + 1) % m.config.vocab_size
    run = {rb: jax.jit(lambda c, rb=rb: speculative.step(mod, c, first, jnp.asarray(drafts), dists,
                                                         jax.random.key(1), sampling, rollback=rb))(cache)
           for rb in speculative.ROLLBACKS}
    (*out_s, kept_s), (*out_r, kept_r) = ((*o[:5], o[5]) for o in run.values())
    assert np.asarray(out_s[1]).tolist() == [k + 1, 2, 1]
    for a, b in zip(out_s, out_r):
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lengths = np.asarray(kept_s.lengths)
    np.testing.assert_array_equal(lengths, np.asarray(kept_r.lengths))
    for n, (a, b) in enumerate(zip(kept_s.layers + (kept_s.mtp,), kept_r.layers + (kept_r.mtp,))):
        if isinstance(a, GatedDeltaNetCache):
            np.testing.assert_allclose(a.conv, b.conv, atol=1e-5, err_msg=f"layer {n} conv window")
            np.testing.assert_allclose(a.state, b.state, atol=1e-5, err_msg=f"layer {n} state")
        else:
            for r in range(3):
                np.testing.assert_allclose(a.k[r, :, :lengths[r]], b.k[r, :, :lengths[r]], atol=1e-5, err_msg=f"{n} k")
                np.testing.assert_allclose(a.v[r, :, :lengths[r]], b.v[r, :, :lengths[r]], atol=1e-5, err_msg=f"{n} v")
    with pytest.raises(ValueError, match="rollback"):
        speculative.step(mod, cache, first, jnp.asarray(drafts), dists, jax.random.key(1), sampling, rollback="x")


@pytest.fixture(scope="module")
def vision_mtp_model(tmp_path_factory):
    """A random multimodal checkpoint (dense) with a random MTP head."""
    path = tmp_path_factory.mktemp("spec-vision")
    hf = make_hf_checkpoint(path, multimodal=True, vision_token_ids=TOKENS, seed=3)
    add_mtp_tensors_(path, hf_mtp_head(hf.config.text_config, seed=4))
    return qwenjax.from_pretrained(path, dtype="float32")


def _vision_prompts():
    """Two prompts: images of 6 and 1 features, and a video of 2 frames in the second; their pixels."""
    rng = np.random.default_rng(5)
    images, video = [(1, 4, 6), (1, 2, 2)], (2, 4, 4)
    prompts = [_text(rng, 4) + _image(images[0]) + _text(rng, 3),
               _text(rng, 9) + _image(images[1]) + _text(rng, 2) + _video(rng, video) + _text(rng, 2)]
    return prompts, dict(pixel_values=_pixels(rng, images), image_grid_thw=np.array(images),
                         pixel_values_videos=_pixels(rng, [video]), video_grid_thw=np.array([video]))


def test_speculative_greedy_with_images_and_a_video_equals_plain_greedy(vision_mtp_model, monkeypatch):
    """k = 2 on prompts with images of different sizes and a video (the rows' rope deltas differ): with the
    checkpoint's head, and with drafts right two times in three, so that verify passes keep some of them at the
    positions that follow the pictures."""
    m = vision_mtp_model
    prompts, vision = _vision_prompts()
    plain = qwenjax.generate(m, prompts, max_new_tokens=12, **vision)
    assert qwenjax.generate(m, prompts, max_new_tokens=12, num_speculative_tokens=2, **vision) == plain
    _oracle_drafts(monkeypatch, prompts, plain, m.config.vocab_size)
    stats = SpeculativeStats()
    assert qwenjax.generate(m.replace(), prompts, max_new_tokens=12, num_speculative_tokens=2,
                            speculative_stats=stats, **vision) == plain
    assert 0 < stats.accepted < stats.drafted


def test_prefill_drafts_read_the_vision_features(vision_mtp_model):
    """Over a prompt with images and a video, the MTP head reads what the training path gives it: each image or
    video pad's vision feature and the multimodal positions. The speculative prefill's draft (k = 1) equals the
    argmax of `m(prompt + first token, vision=..., mtp=True)`'s MTP logits at the last prompt token, and sampled
    (temperature 1) its draft distribution equals their softmax (1e-5). The random head's argmax moves little,
    the distribution catches the slips: reading the pads' token embeddings, or the text positions, over the
    prompt moves 87-96% of its probabilities by more than 1e-5."""
    mod, cfg = vision_mtp_model.module, vision_mtp_model.config
    prompts, pictures = _vision_prompts()
    ids, mask = token_batch(prompts, vocab_size=cfg.vocab_size)
    vision = vision_inputs(cfg, ids, mask, **pictures)
    positions, deltas = vision_positions(cfg, ids, mask, vision)
    n = mask.sum(-1)
    forward = jax.jit(lambda i, mk, p: mod(i, attention_mask=mk, vision=vision, positions=p, mtp=True))
    for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
        prefill = jax.jit(lambda c, i, mk, p, d: speculative.prefill(
            mod, c, i, mk, jax.random.key(0), 1, sampling, vision=vision, positions=p, rope_deltas=d))
        first, drafts, dists, _ = prefill(init_cache(cfg, 2, 128, jnp.float32, mtp=True), ids, mask, positions,
                                          deltas)
        whole, whole_mask = token_batch([p + [int(f)] for p, f in zip(prompts, np.asarray(first))],
                                        vocab_size=cfg.vocab_size)
        whole_positions, _ = vision_positions(cfg, whole, whole_mask, vision)
        _, mtp_logits = forward(jnp.asarray(whole), jnp.asarray(whole_mask), jnp.asarray(whole_positions))
        want = np.asarray(mtp_logits)[np.arange(2), n - 1]  # row n-1 reads the first token, predicts the second
        if sampling.greedy:
            assert np.asarray(drafts)[:, 0].tolist() == want.argmax(-1).tolist()
        else:
            np.testing.assert_allclose(np.asarray(dists)[:, 0], np.asarray(jax.nn.softmax(want, axis=-1)),
                                       atol=1e-5)


def test_sharded_speculative_generation_equals_single_device(tmp_path, monkeypatch):
    """mesh data=2, fsdp=2, tensor=2 (dense): speculative greedy equals single-device speculative greedy and plain
    greedy, with the checkpoint's head (also drafting from a third of the vocabulary) and with drafts that verify
    passes partly keep (the head's cache sharded like the attention layers')."""
    hf = make_hf_checkpoint(tmp_path, seed=3)
    add_mtp_tensors_(tmp_path, hf_mtp_head(hf.config, seed=4))
    single = qwenjax.from_pretrained(tmp_path, dtype="float32")
    sharded = qwenjax.from_pretrained(tmp_path, dtype="float32", mesh="data=2,fsdp=2,tensor=2")
    prompts = _prompts(single.config.vocab_size)
    plain = qwenjax.generate(single, prompts, max_new_tokens=10)
    assert qwenjax.generate(single, prompts, max_new_tokens=10, num_speculative_tokens=2) == plain
    assert qwenjax.generate(sharded, prompts, max_new_tokens=10, num_speculative_tokens=2) == plain
    assert qwenjax.generate(sharded, prompts, max_new_tokens=10, num_speculative_tokens=2,
                            draft_vocab=list(range(0, single.config.vocab_size, 3))) == plain
    _oracle_drafts(monkeypatch, prompts, plain, single.config.vocab_size)
    stats = SpeculativeStats()
    assert qwenjax.generate(sharded.replace(), prompts, max_new_tokens=10, num_speculative_tokens=2,
                            speculative_stats=stats) == plain
    assert 0 < stats.accepted < stats.drafted


def test_speculative_needs_an_mtp_head_and_a_valid_count(tmp_path, mtp_model):
    with pytest.raises(qwenjax.validate.InputError, match="num_speculative_tokens"):
        qwenjax.generate(mtp_model, [[1, 2]], max_new_tokens=2, num_speculative_tokens=-1)
    make_hf_checkpoint(tmp_path, seed=1)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    with pytest.raises(qwenjax.validate.InputError, match="num_speculative_tokens=2: this model has no MTP head"):
        qwenjax.generate(m, [[1, 2]], max_new_tokens=2, num_speculative_tokens=2)


@pytest.mark.parametrize("mtp_model", ["dense"], indirect=True)  # MoE adds nothing here
def test_a_draft_vocabulary_drafts_its_tokens_by_the_full_heads_rows(mtp_model):
    """speculative.draft with a DraftVocab of 40 tokens: greedy drafts are the argmax of the whole LM head's logits
    over those tokens; sampled ones come from the softmax of those logits (filtered), 0 elsewhere."""
    m = mtp_model
    mod, cfg = m.module, m.config
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
    cache = init_cache(cfg, 2, 32, jnp.float32, mtp=True)
    _, cache, hidden, embeds = jax.jit(lambda c: mod.extend(ids, c, fresh=True, return_hidden=True))(cache)
    vocab_ids = np.sort(np.random.default_rng(6).choice(cfg.vocab_size, 40, replace=False)).astype(np.int32)
    vocab = speculative.DraftVocab.of(mod, jnp.asarray(vocab_ids))
    start = jnp.zeros((2,), jnp.int32)
    h, _ = mod.mtp_extend(embeds, hidden, cache, start)
    full = np.asarray(mod.head(h))[:, vocab_ids]  # the whole head's logits at the vocabulary's tokens
    greedy = speculative.draft(mod, cache, embeds, hidden, start, None, 1, SamplingParams(), jax.random.key(0),
                               vocab=vocab)[0]
    np.testing.assert_array_equal(np.asarray(greedy)[:, 0], vocab_ids[full.argmax(-1)])
    sampling = SamplingParams(temperature=0.7, top_k=10)
    drafts, dists, _ = speculative.draft(mod, cache, embeds, hidden, start, None, 1, sampling, jax.random.key(1),
                                         vocab=vocab)
    q = np.asarray(dists)[:, 0]
    expected = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(full), sampling), axis=-1))
    np.testing.assert_allclose(q[:, vocab_ids], expected, atol=1e-6)
    assert np.all(np.delete(q, vocab_ids, axis=1) == 0)
    assert set(np.asarray(drafts)[:, 0].tolist()) <= set(vocab_ids.tolist())


@pytest.mark.parametrize("mtp_model", ["dense"], indirect=True)  # MoE adds nothing here
def test_speculative_greedy_with_a_draft_vocabulary_equals_plain_greedy(mtp_model):
    """The same output from a draft vocabulary of the tokens plain greedy writes plus 30 others; bad vocabularies
    are refused, naming the entry."""
    m = mtp_model
    prompts = _prompts(m.config.vocab_size)
    plain = qwenjax.generate(m, prompts, max_new_tokens=10)
    vocab = sorted(set(sum(plain, [])) | set(range(30)))
    stats = SpeculativeStats()
    assert qwenjax.generate(m, prompts, max_new_tokens=10, num_speculative_tokens=2, draft_vocab=vocab,
                            speculative_stats=stats) == plain
    assert stats.drafted == 2 * stats.steps > 0
    bad = [([], "non-empty"), ([1, 2, 1], r"draft_vocab\[2\] = 1 repeats draft_vocab\[0\]"),
           ([5, m.config.vocab_size], r"draft_vocab\[1\] = .* is not a token id"), ([[1, 2]], "non-empty list")]
    for draft_vocab, match in bad:
        with pytest.raises(qwenjax.validate.InputError, match=match):
            qwenjax.generate(m, [[1, 2]], max_new_tokens=2, num_speculative_tokens=1, draft_vocab=draft_vocab)
    with pytest.raises(qwenjax.validate.InputError, match="needs num_speculative_tokens > 0"):
        qwenjax.generate(m, [[1, 2]], max_new_tokens=2, draft_vocab=[1, 2])


def test_frequent_tokens_counts_and_breaks_ties_by_id():
    class Words:
        def encode(self, text):
            return [int(w) for w in text.split()]

    assert speculative.frequent_tokens(Words(), ["5 3 3 9", "9 3 7 7", "1"], 3) == [3, 7, 9]


def three_token_chi_square(model, prompt, sampling: SamplingParams):
    """rows of 3 tokens sampled after `prompt` from a model of 8 tokens -> Pearson's chi-square p-value of their
    joint counts against the exact probabilities of the 512 triples from the model's own logits (cells of expected
    count < 5 pooled)."""
    triples = np.array(np.meshgrid(*[np.arange(8)] * 3, indexing="ij")).reshape(3, -1).T  # [512, 3]
    seqs = np.concatenate([np.tile(prompt, (len(triples), 1)), triples], axis=1)
    logits = np.asarray(model(seqs))[:, len(prompt) - 1:len(prompt) + 2]  # the logits each sampled token came from
    probs = np.asarray(jax.nn.softmax(jax.vmap(lambda z: filter_logits(z, sampling), 1, 1)(jnp.asarray(logits))))
    exact = np.prod(np.take_along_axis(probs, triples[:, :, None], axis=2)[..., 0], axis=1)

    def p_value(rows):
        counts, expected = np.bincount(np.asarray(rows) @ np.array([64, 8, 1]), minlength=512), exact * len(rows)
        big = expected >= 5
        obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
        return float(jax.scipy.stats.chi2.sf(float(np.sum((obs - exp) ** 2 / exp)), len(obs) - 1))

    return p_value


def test_speculative_sampling_has_plain_sampling_distribution(tmp_path, monkeypatch):
    """Rejection sampling keeps plain sampling's distribution. A model of 8 tokens with a random head (far from
    the model: most drafts are rejected, some kept), temperature 1 and top-k 6; 4,096 rows of one prompt each
    sample 3 tokens with k = 2: the second and third come out of a verify pass (a kept draft, the residual
    distribution after a rejection, or the bonus token). Their joint counts over the 512 triples against the
    exact probabilities from the model's own logits: Pearson's chi-square, cells of expected count < 5 pooled,
    must not reject at p = 0.001, with the whole vocabulary to draft from and with 5 of the 8 tokens. As a
    control, drafts always kept (no rejection step) must be rejected."""
    hf = make_hf_checkpoint(tmp_path, seed=5, vocab_size=8)
    add_mtp_tensors_(tmp_path, hf_mtp_head(hf.config, seed=6))
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    prompt, n, kw = [3, 1, 4, 1, 5], 4096, dict(temperature=1.0, top_k=6)
    sampling = SamplingParams(**kw)
    p_value = three_token_chi_square(m, prompt, sampling)

    spec = qwenjax.generate(m, [prompt] * n, max_new_tokens=3, seed=1, num_speculative_tokens=2, **kw)
    assert p_value(spec) > 1e-3
    # drafting from 5 of the 8 tokens: the head's q is 0 elsewhere, and the output distribution is the same
    spec = qwenjax.generate(m, [prompt] * n, max_new_tokens=3, seed=1, num_speculative_tokens=2,
                            draft_vocab=[0, 2, 3, 5, 7], **kw)
    assert p_value(spec) > 1e-3
    real_step = speculative.step

    def keep_every_draft(mod, cache, pending, drafts, dists, key, sampling, **kw):  # q(d) tiny: p(d)/q(d) > u
        rows, slots = jnp.arange(drafts.shape[0])[:, None], jnp.arange(drafts.shape[1])
        return real_step(mod, cache, pending, drafts, jnp.zeros_like(dists).at[rows, slots, drafts].set(1e-30), key,
                         sampling, **kw)

    monkeypatch.setattr(speculative, "step", keep_every_draft)
    wrong = qwenjax.generate(m.replace(), [prompt] * n, max_new_tokens=3, seed=1, num_speculative_tokens=2, **kw)
    assert p_value(wrong) < 1e-3


def test_cli_generate_speculative_prints_the_acceptance(tmp_path, capsys):
    tok = byte_tokenizer()
    hf = make_hf_checkpoint(tmp_path, seed=3, vocab_size=-(-tok.get_vocab_size() // 64) * 64)
    add_mtp_tensors_(tmp_path, hf_mtp_head(hf.config, seed=4))
    write_tokenizer(tmp_path, tok)
    args = ["generate", "--model", str(tmp_path), "--prompt", "abc", "--raw", "--max-new-tokens", "8",
            "--temperature", "0", "--dtype", "float32"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--speculative", "3"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert "speculative: " in spec.err and "drafts accepted" in spec.err and "speculative" not in plain.err
    vocab = tmp_path / "draft_vocab.json"
    vocab.write_text(json.dumps(list(range(0, 300, 2))))
    assert main(args + ["--speculative", "2", "--draft-vocab", str(vocab)]) == 0
    assert capsys.readouterr().out == plain.out
    vocab.write_text(json.dumps({"ids": [1]}))
    with pytest.raises(SystemExit):
        main(args + ["--speculative", "2", "--draft-vocab", str(vocab)])
    assert "--draft-vocab" in capsys.readouterr().err
    vocab.write_text(json.dumps([1, 10 ** 6]))
    assert main(args + ["--speculative", "2", "--draft-vocab", str(vocab)]) == 2
    assert "draft_vocab[1] = 1000000 is not a token id" in capsys.readouterr().err
