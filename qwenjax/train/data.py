"""Training data: JSONL of plain text or chat conversations → token ids with a loss mask → packed rows.

Each line is a JSON object with either `text` (a document: every token is learned, and an end-of-text token is
appended) or `messages` (a conversation rendered with the model's chat template: only the assistant turns are
learned, from after `<|im_start|>assistant\\n` through their `<|im_end|>`). Bad lines are reported with their line
number and skipped, or stop the run with `strict=True`.

For a model with a vision tower (`VisionData`), a message's content may be a list of parts, as the processor takes
them: `{"type": "text", "text": ...}`, `{"type": "image", "image": "pictures/cat.png"}`, `{"type": "video",
"video": "clips/run.mp4" or a directory of frames}`, paths relative to the JSONL file. Reading checks each picture
and keeps its grid and its sample's multimodal positions; the pixels are decoded again when a batch needs them, so
a large image set never sits in memory. Pad tokens of pictures are never loss targets.

Packing is deterministic: the samples of epoch e are shuffled by (seed, e) and laid greedily into rows of
`pack_len` tokens, each document with its own segment id. Data too small to fill one batch is repeated: the epochs
from e on, each shuffled anew, are packed as one stream until their rows fill a batch (`PackedBatches.group`), as
other trainers repeat a small dataset. A position (the group's first epoch, row) is all a resumed run needs.
With pictures, a batch also holds each row's [3, T] positions (every document's own, from 0) and its pictures
(`qwenjax.inputs.PackedVision`: every picture of a micro-batch in token order, padded to a power-of-two patch
capacity, so a run compiles once per capacity it meets).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterator

import numpy as np

from qwenjax.inputs import PackedVision
from qwenjax.model.positions import multimodal_positions
from qwenjax.model.vision import patch_layout

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_OPEN, TURN_CLOSE = "<|im_start|>assistant\n", "<|im_end|>"


class DataError(ValueError):
    """A training sample that cannot be used; the message names its file and line."""


@dataclasses.dataclass(frozen=True)
class Picture:
    kind: str                    # "image" or "video"
    source: Any                  # what the processor reads: a path (made absolute), a directory of frames
    grid: tuple[int, int, int]   # (t, h, w) in patches, as read


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: np.ndarray        # [n] int32
    loss_mask: np.ndarray  # [n] int32: 1 on tokens to learn
    line: int
    pictures: tuple[Picture, ...] = ()  # in token order
    positions: np.ndarray | None = None  # [3, n] int32 multimodal positions, for samples with pictures


@dataclasses.dataclass(frozen=True)
class VisionData:
    """What reading and packing pictures needs: the processor (`qwenjax.load_processor`) and the model's config,
    whose placeholder ids and vision_config the processor's tokenizer and patches must match."""
    processor: Any
    config: Any

    def __post_init__(self):
        from qwenjax.inference.processor import IMAGE_PAD, VIDEO_PAD, VISION_START

        cfg, tokenizer = self.config, self.processor.tokenizer
        if cfg.vision is None:
            raise DataError("pictures need a model with a vision tower; this config has no vision_config")
        for token, field in ((IMAGE_PAD, "image_token_id"), (VIDEO_PAD, "video_token_id"),
                             (VISION_START, "vision_start_token_id")):
            if tokenizer.token_to_id(token) != getattr(cfg, field):
                raise DataError(f"{tokenizer.path}: {token} is id {tokenizer.token_to_id(token)}, but the model "
                                f"config's {field} is {getattr(cfg, field)}")

    def pixels(self, picture: Picture) -> np.ndarray:
        """The picture's patches [t·h·w, C·T·P·P], decoded again; its grid must be the one read."""
        if picture.kind == "image":
            pixels, grid = self.processor.image_processor([picture.source])
        else:
            pixels, grid, _ = self.processor.video_processor([picture.source])
        if tuple(grid[0].tolist()) != picture.grid:
            raise DataError(f"{picture.source}: its patch grid is {grid[0].tolist()} now, {list(picture.grid)} "
                            "when the data was read: the file changed during the run")
        return pixels


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    spans, at = [], 0
    while (start := text.find(ASSISTANT_OPEN, at)) >= 0:
        start += len(ASSISTANT_OPEN)
        end = text.find(TURN_CLOSE, start)
        end = len(text) if end < 0 else end + len(TURN_CLOSE)
        spans.append((start, end))
        at = end
    return spans


def _absolute_sources(messages: list, base_dir: str) -> list:
    """The messages with each picture path taken relative to `base_dir` (the JSONL file's directory)."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = [{**part, part["type"]: os.path.join(base_dir, part[part["type"]])}
                       if isinstance(part, dict) and part.get("type") in ("image", "video")
                       and isinstance(part.get(part["type"]), str) else part for part in content]
            message = {**message, "content": content}
        out.append(message)
    return out


def encode_line(obj, tokenizer, *, eos_id: int | None, vision: VisionData | None = None,
                base_dir: str = "") -> Sample:
    """The sample (line 0) of one parsed JSONL record; raises ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise ValueError("needs exactly one of `text` or `messages`")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("`text` must be a non-empty string")
        ids = tokenizer.encode(obj["text"]) + ([] if eos_id is None else [eos_id])
        return Sample(np.asarray(ids, np.int32), np.ones(len(ids), np.int32), 0)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list) and vision is None:
            raise ValueError(f"message {i} has a list of parts for content: images and videos need a model with a "
                             "vision tower; a text model's content is a string")
        if not isinstance(content, (str, list)):
            raise ValueError(f"message {i} needs a string `content`{' or a list of parts' if vision else ''}")
        if msg.get("role") not in ROLES:
            raise ValueError(f"message {i} has unknown role {msg.get('role')!r} (expected one of {ROLES})")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise ValueError("no assistant message: nothing to learn")
    if vision is None:
        text, pictures = tokenizer.apply_chat_template(messages, add_generation_prompt=False), ()
    else:
        from qwenjax.inference.processor import inline_pictures

        messages = _absolute_sources(messages, base_dir)
        text, arrays, kinds = vision.processor.expand(messages, add_generation_prompt=False)
        _, images, videos = inline_pictures(messages)
        sources = {"image": iter(images or ()), "video": iter(videos or ())}
        grids = {kind: iter(arrays[f"{kind}_grid_thw"] if arrays[f"{kind}_grid_thw"] is not None else ())
                 for kind in ("image", "video")}
        pictures = tuple(Picture(kind, next(sources[kind]), tuple(next(grids[kind]).tolist())) for kind in kinds)
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids = np.asarray(ids, np.int32)
    spans = _assistant_spans(text)
    mask = np.asarray([int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets], np.int32)
    if not pictures:
        return Sample(ids, mask, 0)
    cfg = vision.config
    mask[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)] = 0  # features in, never predicted
    grid = lambda kind: np.array([p.grid for p in pictures if p.kind == kind], np.int64).reshape(-1, 3)
    positions, _ = multimodal_positions(
        ids[None], image_grid_thw=grid("image"), video_grid_thw=grid("video"),
        spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id)
    return Sample(ids, mask, 0, pictures, positions[:, 0])


def read_jsonl(path: str | os.PathLike, tokenizer, *, max_len: int, eos_id: int | None = None,
               strict: bool = False, vision: VisionData | None = None) -> tuple[list[Sample], list[str]]:
    """The usable samples of a JSONL file, and a message per skipped line (`strict`: raise on the first).
    `vision`: messages may hold images and videos (paths relative to the file)."""
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
                sample = encode_line(obj, tokenizer, eos_id=eos_id, vision=vision,
                                     base_dir=os.path.dirname(os.path.abspath(path)))
                if len(sample.ids) > max_len:
                    raise ValueError(f"{len(sample.ids)} tokens, longer than the pack length {max_len}")
                if len(sample.ids) < 2:
                    raise ValueError("fewer than 2 tokens: nothing to predict")
            except ValueError as e:
                message = f"{os.fspath(path)}:{line_no}: {e}"
                if strict:
                    raise DataError(message) from None
                log.warning("skipping %s", message)
                problems.append(message)
                continue
            samples.append(dataclasses.replace(sample, line=line_no))
    if not samples:
        raise DataError(f"{os.fspath(path)}: no usable samples ({len(problems)} skipped)")
    return samples, problems


def pack_rows(samples: list[Sample], pack_len: int, seed: int, epoch: int, epochs: int = 1) -> list[list[Sample]]:
    """The samples of each row of epochs `epoch` .. `epoch + epochs - 1` packed as one stream: each epoch's samples
    shuffled by (seed, epoch), laid greedily in order."""
    rows: list[list[Sample]] = [[]]
    used = 0
    for e in range(epoch, epoch + epochs):
        used = _lay(rows, used, samples, pack_len, seed, e)
    return rows


def _lay(rows: list[list[Sample]], used: int, samples: list[Sample], pack_len: int, seed: int, epoch: int) -> int:
    """Lays epoch `epoch`'s shuffled samples after `rows` (whose last row holds `used` tokens); returns the tokens
    the last row then holds."""
    for i in np.random.default_rng([seed, epoch]).permutation(len(samples)):
        s = samples[i]
        if used + len(s.ids) > pack_len:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s.ids)
    return used


def pack_epoch(samples: list[Sample], pack_len: int, seed: int, epoch: int, *,
               positions: bool = False) -> dict[str, np.ndarray]:
    """All rows of one epoch: input_ids, attention_mask, loss_mask, segment_ids, each [rows, pack_len]; with
    `positions`, also each row's multimodal positions [rows, 3, pack_len] (each document's own, from 0)."""
    return pack_arrays(pack_rows(samples, pack_len, seed, epoch), pack_len, positions=positions)


def pack_arrays(rows: list[list[Sample]], pack_len: int, *, positions: bool = False) -> dict[str, np.ndarray]:
    """`pack_epoch`'s arrays for rows already laid out (`pack_rows`)."""
    out = {k: np.zeros((len(rows), pack_len), np.int32)
           for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids")}
    if positions:
        out["positions"] = np.zeros((len(rows), 3, pack_len), np.int32)
    for r, docs in enumerate(rows):
        at = 0
        for d, s in enumerate(docs, 1):
            n = len(s.ids)
            out["input_ids"][r, at:at + n] = s.ids
            out["loss_mask"][r, at:at + n] = s.loss_mask
            out["attention_mask"][r, at:at + n] = 1
            out["segment_ids"][r, at:at + n] = d
            if positions:
                out["positions"][r, :, at:at + n] = np.arange(n) if s.positions is None else s.positions
            at += n
    return out


def patch_capacity(patches: int, merge: int) -> int:
    """A micro-batch's patch capacity: the next power of two ≥ `patches` (at least 64), rounded up to whole merge
    blocks, so that the shapes a run compiles for stay few."""
    capacity = 1 << max(6, (patches - 1).bit_length())
    return -(-capacity // merge ** 2) * merge ** 2


def pack_pictures(micro_batches: list[list[Sample]], vision: VisionData) -> PackedVision:
    """The pictures of each micro-batch (its rows' samples, in row order) as one `PackedVision` with a leading
    micro-batch axis, every micro-batch padded to the same capacity."""
    cfg = vision.config.vision
    pictures = [[p for s in samples for p in s.pictures] for samples in micro_batches]
    counts = [sum(int(np.prod(p.grid)) for p in mb) for mb in pictures]
    capacity = patch_capacity(max(counts), cfg.spatial_merge_size)
    pixels, layouts = [], []
    for mb, n in zip(pictures, counts):
        x = np.zeros((capacity, cfg.patch_dim), np.float32)
        if mb:
            x[:n] = np.concatenate([vision.pixels(p) for p in mb])
        pixels.append(x)
        layouts.append(patch_layout(np.array([p.grid for p in mb], np.int64).reshape(-1, 3), cfg, capacity))
    return PackedVision(np.stack(pixels), type(layouts[0])(*(np.stack(leaves) for leaves in zip(*layouts))))


@dataclasses.dataclass
class PackedBatches:
    """Batches of [grad_accum, rows, pack_len] arrays over endless epochs, resumable from a position. With
    `vision` and samples that hold pictures, batches also hold `positions` [grad_accum, 3, rows, pack_len] and
    `vision` (`pack_pictures`)."""
    samples: list[Sample]
    pack_len: int
    rows: int
    grad_accum: int = 1
    seed: int = 0
    vision: VisionData | None = None

    def __post_init__(self):
        if not self.samples:
            raise DataError("no samples to pack")

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        return self.from_position({"epoch": 0, "row": 0})

    def group(self, epoch: int) -> tuple[list[list[Sample]], int]:
        """(the rows' samples, the number of epochs) of the group of batches that starts at `epoch`: that epoch
        alone when its rows fill at least one batch; else it and the epochs after it, each shuffled anew, packed as
        one stream, as many as fill one batch."""
        per_batch, rows, used, epochs = self.rows * self.grad_accum, [[]], 0, 0
        while epochs == 0 or len(rows) < per_batch:
            used = _lay(rows, used, self.samples, self.pack_len, self.seed, epoch + epochs)
            epochs += 1
        return rows, epochs

    def repeats(self) -> str | None:
        """None when an epoch fills a batch; else a sentence saying how the data is repeated to fill one."""
        _, epochs = self.group(0)
        if epochs == 1:
            return None
        n = len(pack_rows(self.samples, self.pack_len, self.seed, 0))
        return (f"the data ({len(self.samples)} samples) packs into {n} row{'s' * (n != 1)} of {self.pack_len} "
                f"tokens, fewer than one batch ({self.rows} rows x {self.grad_accum} micro-batches): each batch "
                f"repeats the epoch about {epochs} times, shuffled anew each time (a row may hold a sample more than "
                "once; the rows left over after a batch are dropped)")

    def from_position(self, position: dict[str, int]) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        """Yields (batch, position after it). A batch never spans two groups (`group`: one epoch, or as many as
        fill a batch): a group's last rows that do not fill one are dropped. The position is the group's first
        epoch and the row after the batch."""
        epoch, row = int(position["epoch"]), int(position["row"])
        per_batch = self.rows * self.grad_accum
        pictures = self.vision is not None and any(s.pictures for s in self.samples)
        while True:
            samples, epochs = self.group(epoch)
            rows = pack_arrays(samples, self.pack_len, positions=pictures)
            n = len(rows["input_ids"])
            while row + per_batch <= n:
                batch = {k: v[row:row + per_batch].reshape(self.grad_accum, self.rows, *v.shape[1:])
                         for k, v in rows.items()}
                if pictures:
                    batch["positions"] = batch["positions"].transpose(0, 2, 1, 3)  # [accum, 3, rows, T]
                    batch["vision"] = pack_pictures(
                        [[s for r in samples[row + a * self.rows:row + (a + 1) * self.rows] for s in r]
                         for a in range(self.grad_accum)], self.vision)
                row += per_batch
                yield batch, {"epoch": epoch, "row": row}
            epoch, row = epoch + epochs, 0
