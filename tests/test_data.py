"""Training data: JSONL parsing with line-numbered errors, chat loss masks, deterministic packing, resuming."""

import itertools
import json

import numpy as np
import pytest

from qwenjax.demo import write_random_checkpoint
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.train.data import DataError, PackedBatches, pack_epoch, read_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(write_random_checkpoint(tmp_path_factory.mktemp("demo")))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "See you."}]}


def test_bad_lines_are_reported_with_their_line_number(tokenizer, tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"text": "a fine document"}),
        "{not json",
        json.dumps({"messages": [{"role": "bot", "content": "hi"}]}),
        json.dumps({"text": "x" * 500}),
        "",
        json.dumps(CHAT),
        json.dumps({"text": "ok", "messages": []}),
    ])
    eos = tokenizer.token_to_id("<|endoftext|>")
    samples, problems = read_jsonl(path, tokenizer, max_len=128, eos_id=eos)
    assert [s.line for s in samples] == [1, 6]
    assert len(problems) == 4
    assert problems[0].startswith(f"{path}:2: not JSON")
    assert problems[1] == f"{path}:3: message 0 has unknown role 'bot' (expected one of " \
                          "('system', 'user', 'assistant', 'tool'))"
    assert problems[2] == f"{path}:4: 501 tokens, longer than the pack length 128"
    assert problems[3] == f"{path}:7: needs exactly one of `text` or `messages`"
    assert samples[0].ids[-1] == eos and samples[0].loss_mask.all()
    with pytest.raises(DataError, match=r"d.jsonl:2: not JSON"):
        read_jsonl(path, tokenizer, max_len=128, strict=True)


def test_chat_loss_mask_covers_assistant_turns_only(tokenizer, tmp_path):
    (sample,), _ = read_jsonl(_write(tmp_path / "c.jsonl", [json.dumps(CHAT)]), tokenizer, max_len=512)
    learned = tokenizer.decode(sample.ids[sample.loss_mask == 1], skip_special_tokens=False)
    assert "Hello!" in learned and "See you." in learned
    assert learned.count("<|im_end|>") == 2  # each assistant turn learns to end itself
    assert "Hi there" not in learned and "Be brief." not in learned and "Bye" not in learned
    assert "assistant\n" not in learned  # the turn header is the prompt's
    full = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=False)
    assert tokenizer.decode(sample.ids, skip_special_tokens=False) == full


def test_packing_is_deterministic_complete_and_resumable(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "w" * int(n)}) for n in rng.integers(3, 40, 60)]
    samples, _ = read_jsonl(_write(tmp_path / "t.jsonl", lines), tokenizer, max_len=64,
                            eos_id=tokenizer.token_to_id("<|endoftext|>"))
    e0, e0_again, e1 = (pack_epoch(samples, 64, seed=3, epoch=e) for e in (0, 0, 1))
    assert all(np.array_equal(e0[k], e0_again[k]) for k in e0)
    assert not np.array_equal(e0["input_ids"], e1["input_ids"][:len(e0["input_ids"])])  # reshuffled
    # every sample exactly once per epoch, as one contiguous segment
    segments = [(r, s) for r in range(len(e0["segment_ids"])) for s in set(e0["segment_ids"][r]) - {0}]
    assert len(segments) == len(samples)
    assert sorted(int(e0["attention_mask"][r][e0["segment_ids"][r] == s].sum()) for r, s in segments) == \
        sorted(len(s.ids) for s in samples)

    stream = PackedBatches(samples, pack_len=64, rows=2, grad_accum=2, seed=3)
    first = list(itertools.islice(iter(stream), 5))
    batch, position = first[2]
    assert batch["input_ids"].shape == (2, 2, 64)
    resumed = list(itertools.islice(stream.from_position(position), 2))
    for (a, _), (b, _) in zip(first[3:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_data_smaller_than_a_batch_repeats_its_epoch_and_resumes(tokenizer, tmp_path):
    """40 short samples, one epoch a few rows: each batch packs the epoch several times over, shuffled anew each
    time; every batch is full, and a resumed stream continues with the same batches."""
    lines = [json.dumps({"text": f"sample {i} " * (1 + i % 3)}) for i in range(40)]
    samples, _ = read_jsonl(_write(tmp_path / "small.jsonl", lines), tokenizer, max_len=256,
                            eos_id=tokenizer.token_to_id("<|endoftext|>"))
    one_epoch = len(pack_epoch(samples, 256, seed=0, epoch=0)["input_ids"])
    stream = PackedBatches(samples, pack_len=256, rows=4, grad_accum=2, seed=0)
    assert one_epoch < 8
    first = list(itertools.islice(iter(stream), 4))
    rows, epochs = stream.group(0)
    assert len(rows) >= 8 and epochs > 1
    assert f"packs into {one_epoch} rows of 256 tokens" in stream.repeats()
    # the group is its epochs' shuffles one after the other: every sample `epochs` times, in differing orders
    laid = [s.line for row in rows for s in row]
    assert sorted(laid) == sorted([s.line for s in samples] * epochs)
    n = len(samples)
    assert all(laid[i * n:(i + 1) * n] != laid[(i + 1) * n:(i + 2) * n] for i in range(epochs - 1))
    for batch, _ in first:
        assert batch["input_ids"].shape == (2, 4, 256) and batch["attention_mask"].any(-1).all()  # no empty row
    # here a group fills one batch: the next batch starts the next group, the epochs after the ones packed
    assert [p for _, p in first[:2]] == [{"epoch": 0, "row": 8}, {"epoch": epochs, "row": 8}]
    assert not np.array_equal(first[0][0]["input_ids"], first[1][0]["input_ids"])
    resumed = list(itertools.islice(stream.from_position(first[1][1]), 2))
    for (a, pa), (b, pb) in zip(first[2:], resumed):
        assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    # data that fills a batch keeps one epoch per group (the positions of runs written before repeating existed)
    assert PackedBatches(samples, pack_len=256, rows=1, grad_accum=1, seed=0).repeats() is None
