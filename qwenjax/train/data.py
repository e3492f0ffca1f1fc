"""Training data: JSONL of plain text or chat conversations → token ids with a loss mask → packed rows.

Each line is a JSON object with either `text` (a document: every token is learned, and an end-of-text token is
appended) or `messages` (a conversation rendered with the model's chat template: only the assistant turns are
learned, from after `<|im_start|>assistant\\n` through their `<|im_end|>`). Bad lines are reported with their line
number and skipped, or stop the run with `strict=True`.

Packing is deterministic: the samples of epoch e are shuffled with `seed + e` and laid greedily into rows of
`pack_len` tokens, each document with its own segment id. A position (epoch, row) is all a resumed run needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_OPEN, TURN_CLOSE = "<|im_start|>assistant\n", "<|im_end|>"


class DataError(ValueError):
    """A training sample that cannot be used; the message names its file and line."""


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: np.ndarray        # [n] int32
    loss_mask: np.ndarray  # [n] int32: 1 on tokens to learn
    line: int


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    spans, at = [], 0
    while (start := text.find(ASSISTANT_OPEN, at)) >= 0:
        start += len(ASSISTANT_OPEN)
        end = text.find(TURN_CLOSE, start)
        end = len(text) if end < 0 else end + len(TURN_CLOSE)
        spans.append((start, end))
        at = end
    return spans


def encode_line(obj, tokenizer, *, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss_mask) of one parsed JSONL record; raises ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise ValueError("needs exactly one of `text` or `messages`")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("`text` must be a non-empty string")
        ids = tokenizer.encode(obj["text"]) + ([] if eos_id is None else [eos_id])
        return np.asarray(ids, np.int32), np.ones(len(ids), np.int32)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} needs a string `content`")
        if msg.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role {msg.get('role')!r} (expected one of {ROLES})")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise ValueError("no assistant message: nothing to learn")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans = _assistant_spans(text)
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def read_jsonl(path: str | os.PathLike, tokenizer, *, max_len: int, eos_id: int | None = None,
               strict: bool = False) -> tuple[list[Sample], list[str]]:
    """The usable samples of a JSONL file, and a message per skipped line (`strict`: raise on the first)."""
    samples, problems = [], []
    if os.path.isdir(path):
        raise DataError(f"{os.fspath(path)}: is a directory; the training data is one JSONL file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
                ids, mask = encode_line(obj, tokenizer, eos_id=eos_id)
                if len(ids) > max_len:
                    raise ValueError(f"{len(ids)} tokens, longer than the pack length {max_len}")
                if len(ids) < 2:
                    raise ValueError("fewer than 2 tokens: nothing to predict")
            except ValueError as e:
                message = f"{os.fspath(path)}:{line_no}: {e}"
                if strict:
                    raise DataError(message) from None
                log.warning("skipping %s", message)
                problems.append(message)
                continue
            samples.append(Sample(ids, mask, line_no))
    if not samples:
        raise DataError(f"{os.fspath(path)}: no usable samples ({len(problems)} skipped)")
    return samples, problems


def pack_epoch(samples: list[Sample], pack_len: int, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """All rows of one epoch: input_ids, attention_mask, loss_mask, segment_ids, each [rows, pack_len]."""
    order = np.random.default_rng([seed, epoch]).permutation(len(samples))
    rows: list[list[Sample]] = [[]]
    used = 0
    for i in order:
        s = samples[i]
        if used + len(s.ids) > pack_len:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s.ids)
    out = {k: np.zeros((len(rows), pack_len), np.int32)
           for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids")}
    for r, docs in enumerate(rows):
        at = 0
        for d, s in enumerate(docs, 1):
            n = len(s.ids)
            out["input_ids"][r, at:at + n] = s.ids
            out["loss_mask"][r, at:at + n] = s.loss_mask
            out["attention_mask"][r, at:at + n] = 1
            out["segment_ids"][r, at:at + n] = d
            at += n
    return out


@dataclasses.dataclass
class PackedBatches:
    """Batches of [grad_accum, rows, pack_len] arrays over endless epochs, resumable from a position."""
    samples: list[Sample]
    pack_len: int
    rows: int
    grad_accum: int = 1
    seed: int = 0

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
        return self.from_position({"epoch": 0, "row": 0})

    def from_position(self, position: dict[str, int]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
        """Yields (batch, position after it). A batch never spans two epochs: an epoch's last rows that do not
        fill one are dropped."""
        epoch, row = int(position["epoch"]), int(position["row"])
        per_batch = self.rows * self.grad_accum
        while True:
            rows = pack_epoch(self.samples, self.pack_len, self.seed, epoch)
            n = len(rows["input_ids"])
            if n < per_batch:
                raise DataError(f"an epoch packs into {n} rows of {self.pack_len} tokens, fewer than one batch "
                                f"({self.rows} rows x {self.grad_accum} micro-batches)")
            while row + per_batch <= n:
                batch = {k: v[row:row + per_batch].reshape(self.grad_accum, self.rows, self.pack_len)
                         for k, v in rows.items()}
                row += per_batch
                yield batch, {"epoch": epoch, "row": row}
            epoch, row = epoch + 1, 0
