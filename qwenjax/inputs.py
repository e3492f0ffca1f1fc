"""Token ids and images at the public entry points (`m(...)`, `generate`, `stream`): one validator, errors that
locate the culprit."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from qwenjax.model.positions import check_grid, multimodal_positions


def token_batch(input_ids, attention_mask=None, *, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T] int32, mask [B, T] int32), checked.

    `input_ids` is a [B, T] or [T] array of token ids with an optional 0/1 `attention_mask` of its shape (1 for
    tokens, 0 for padding), or a list of rows of any lengths (right-padded here, the mask marking each row's
    tokens). Every token the mask selects must lie in [0, vocab_size); padding positions are set to 0.
    """
    if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a rectangular input_ids array, not a list of rows")
        rows = [np.asarray(r) for r in input_ids]
        for r, row in enumerate(rows):
            if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
                raise ValueError(f"input_ids row {r} must be a 1-D sequence of integer token ids")
        ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
        mask = np.zeros(ids.shape, np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = row, 1
    else:
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], [seq] or a list of rows, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask)
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
            off = np.argwhere(~np.isin(mask, (0, 1)))
            if off.size:
                r, c = off[0]
                raise ValueError(f"attention_mask[{r}, {c}] = {mask[r, c]}: must be 0 (padding) or 1 (token)")
    if ids.shape[0] == 0:
        raise ValueError("input_ids has no rows")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: sequence length 0")
    bad = np.argwhere(((ids < 0) | (ids >= vocab_size)) & (mask == 1))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"input_ids[{r}, {c}] = {ids[r, c]} is outside the vocabulary [0, {vocab_size}) "
                         f"({len(bad)} such token(s))")
    return np.where(mask == 1, ids, 0).astype(np.int32), mask.astype(np.int32)


def token_rows(input_ids, attention_mask=None, *, vocab_size: int) -> list[np.ndarray]:
    """Each row's tokens (where the mask is 1, in order) as int32 arrays; inputs as `token_batch` takes them."""
    ids, mask = token_batch(input_ids, attention_mask, vocab_size=vocab_size)
    return [row[m == 1] for row, m in zip(ids, mask)]


class VisionInputs(NamedTuple):
    """Pixels in transformers' flattened-patch layout [patches, C·T·P·P] with their grids [n, 3] (t, h, w in
    patches; host integers, static under jit)."""
    pixel_values: Any = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: Any = None
    video_grid_thw: np.ndarray | None = None


class PackedVision(NamedTuple):
    """The pictures of a training micro-batch, every image and video of its rows in token order, padded to a
    fixed patch capacity: pixel_values [P, C·T·P·P] and their `qwenjax.model.vision.PatchLayout`. The k-th
    feature fills the k-th image-or-video pad token of the batch, row-major (`qwenjax.train.data` packs them)."""
    pixel_values: Any
    layout: Any


def vision_inputs(cfg, ids: np.ndarray, mask: np.ndarray, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None) -> VisionInputs | None:
    """The images and videos of a batch (`token_batch`'s ids and mask), checked against the model's config and
    the prompt's pad tokens; None without any."""
    given = {"pixel_values": (pixel_values, image_grid_thw), "pixel_values_videos": (pixel_values_videos,
                                                                                     video_grid_thw)}
    if all(p is None and g is None for p, g in given.values()) and cfg.vision is None:
        return None
    if cfg.vision is None:
        raise ValueError("images or videos given to a text-only model: its config.json has no vision_config")
    if any(p is not None for p, _ in given.values()) and cfg.vision.out_hidden_size != cfg.hidden_size:
        # e.g. a config without vision_config: transformers' default tower
        raise ValueError(f"vision_config.out_hidden_size = {cfg.vision.out_hidden_size} differs from the text model's "
                         f"hidden_size = {cfg.hidden_size}: the tower's features cannot replace token embeddings")
    grids = {}
    merge = cfg.vision.spatial_merge_size
    for (name, (pixels, grid)), grid_name, token_id in zip(given.items(), ("image_grid_thw", "video_grid_thw"),
                                                           (cfg.image_token_id, cfg.video_token_id)):
        if (pixels is None) != (grid is None):
            raise ValueError(f"{name} and {grid_name} go together: one was given without the other")
        pads = int(((ids == token_id) & (mask == 1)).sum())
        if pixels is None:
            if pads:
                raise ValueError(f"the prompt holds {pads} {'image' if token_id == cfg.image_token_id else 'video'} "
                                 f"pad token(s) (id {token_id}) but no {name} were given")
            grids[grid_name] = None
            continue
        grid = check_grid(grid, grid_name, merge)
        features = int(np.prod(grid, axis=1).sum()) // merge ** 2
        if pads != features:
            raise ValueError(f"the prompt holds {pads} pad token(s) of id {token_id} but {grid_name} gives "
                             f"{features} feature(s) (t·h·w / {merge}² summed): they must match")
        grids[grid_name] = grid
    if pixel_values is None and pixel_values_videos is None:
        return None
    return VisionInputs(pixel_values, grids["image_grid_thw"], pixel_values_videos, grids["video_grid_thw"])


def vision_positions(cfg, ids: np.ndarray, mask: np.ndarray, vision: VisionInputs) -> tuple[np.ndarray, np.ndarray]:
    """The [3, B, T] rotary positions of a batch with images or videos and each row's rope delta [B]
    (transformers' `get_rope_index`)."""
    return multimodal_positions(
        ids, mask, image_grid_thw=vision.image_grid_thw, video_grid_thw=vision.video_grid_thw,
        spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id)
