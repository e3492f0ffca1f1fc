"""Multimodal rotary positions (M-RoPE): transformers' `Qwen3_5Model.get_rope_index`
(`transformers/models/qwen3_5/modeling_qwen3_5.py`), ported to host-side numpy.

Every token has three positions, (temporal, height, width), that rotate separate parts of the head (see
`mrope_section`). Per row, over the tokens that the attention mask keeps, in order, with a running position p
starting at 0:

* a text token gets (p, p, p), and p += 1;
* a vision block (a maximal run of image pad tokens, or of video pad tokens) that starts at p, with grid (t, h, w)
  in patches and merged grid (t, H, W) = (t, h/m, w/m), m = spatial_merge_size, gets for its merged token
  (ti, r, c), in that (row-major) order: (p + ti, p + r, p + c); then p += max(H, W). The temporal size does not
  advance p (transformers' rule; with t = 1, the only t the processors make, p lands on the block's largest
  position + 1);
* videos are split per frame first: a video of t temporal patches is t blocks of grid (1, h, w), each wrapped in
  its own vision_start/vision_end with its timestamp text `<{seconds:.1f} seconds>` before it (transformers'
  `Qwen3VLProcessor.replace_video_token`), so frames are ordered by the text between them, not by ti;
* masked (padding) tokens get (0, 0, 0);
* rope_delta = (largest position in the row, over all three streams) + 1 − (number of kept tokens). A later
  token that is the n-th kept token of its row (0-based; n = cache length without padding) gets n + delta on all
  three streams, as transformers' `compute_3d_position_ids` does at decode.

Image grids are consumed in order across the whole batch (row 0's blocks first), as are the video frames. Unlike
transformers, which pairs runs with grids without checking (an extra grid is ignored, a missing one is a
StopIteration, a wrong-length run a shape error), this checks the counts, the grids and every block's length, and
that each block follows a vision_start token; a row with no kept token (transformers fails on it) gets zeros and
delta 0.
"""

from __future__ import annotations

import numpy as np

_TEXT, _IMAGE, _VIDEO = 0, 1, 2


def check_grid(grid_thw, name: str, merge: int) -> np.ndarray:
    """`grid_thw` ([n, 3] t, h, w in patches; None: no rows) as int64, every t, h, w positive and h, w multiples of
    the spatial merge size; errors name `name` and the row. The one check of a grid, wherever one enters."""
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or (grid.size and not np.issubdtype(grid.dtype, np.integer)):
        raise ValueError(f"{name} must be integers of shape [n, 3] (t, h, w), got {grid.dtype} {list(grid.shape)}")
    grid = grid.astype(np.int64)
    for i, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) <= 0 or h % merge or w % merge:
            raise ValueError(f"{name} row {i} = ({t}, {h}, {w}): t, h, w must be positive and h, w multiples of "
                             f"spatial_merge_size={merge}")
    return grid


def multimodal_positions(input_ids, attention_mask=None, *, image_grid_thw=None, video_grid_thw=None,
                         spatial_merge_size: int, image_token_id: int, video_token_id: int,
                         vision_start_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(position ids [3, B, T] int32 — temporal, height, width — and rope deltas [B] int32) for `input_ids`
    [B, T] with `attention_mask` [B, T] (nonzero = kept; None keeps all), `image_grid_thw` [images, 3] and
    `video_grid_thw` [videos, 3] in patches, as the image/video processors return them. See the module docstring.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers of shape [batch, seq], got {ids.dtype} {ids.shape}")
    if attention_mask is None:
        keep = np.ones(ids.shape, bool)
    else:
        keep = np.asarray(attention_mask)
        if keep.shape != ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {ids.shape}, got {keep.shape}")
        keep = keep != 0
    m = int(spatial_merge_size)
    if m <= 0:
        raise ValueError(f"spatial_merge_size must be positive, got {spatial_merge_size}")
    images = check_grid(image_grid_thw, "image_grid_thw", m)
    videos = check_grid(video_grid_thw, "video_grid_thw", m)
    # One (1, h, w) block per video frame, remembering (video row, frame) for messages.
    frames = np.repeat(videos, videos[:, 0], axis=0)
    frames[:, 0] = 1
    frame_of = [(v, f) for v, t in enumerate(videos[:, 0].tolist()) for f in range(t)]

    # Each row's runs (kind, start, end) over its kept tokens; every vision block (a run of pad tokens), in batch
    # order, as (row, vision_start's index, first pad's index, pads) with indices into the padded row.
    B, T = ids.shape
    rows = []
    blocks = {_IMAGE: [], _VIDEO: []}
    for b in range(B):
        where = np.flatnonzero(keep[b])
        tok = ids[b, where]
        kind = np.where(tok == image_token_id, _IMAGE, np.where(tok == video_token_id, _VIDEO, _TEXT))
        bounds = np.flatnonzero(np.diff(kind)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64) if len(tok) else np.zeros(0, np.int64)
        ends = np.concatenate([bounds, [len(tok)]]).astype(np.int64) if len(tok) else np.zeros(0, np.int64)
        runs = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            k = int(kind[s])
            if k != _TEXT:
                what = "image" if k == _IMAGE else "video"
                if s == 0 or tok[s - 1] != vision_start_token_id:
                    raise ValueError(f"row {b}: the {what} tokens at position {int(where[s])} do not follow a "
                                     f"vision_start token ({vision_start_token_id})")
                blocks[k].append((b, int(where[s - 1]), int(where[s]), e - s))
            runs.append((k, s, e))
        rows.append((where, runs))

    for k, grid, name, unit in ((_IMAGE, images, "image_grid_thw", "rows"),
                                (_VIDEO, frames, "video_grid_thw", "frames (sum of t)")):
        if len(blocks[k]) != len(grid):
            what = "image" if k == _IMAGE else "video"
            extra = f" over {len(videos)} rows" if k == _VIDEO else ""
            raise ValueError(f"input_ids hold {len(blocks[k])} {what} blocks (vision_start followed by {what} tokens"
                             f"{', one per video frame' if k == _VIDEO else ''}) but {name} has {len(grid)} "
                             f"{unit}{extra}")
        for i, (b, start, pos, n) in enumerate(blocks[k]):
            t, h, w = grid[i].tolist()
            want = t * h * w // (m * m)
            if n != want:
                src = (f"image_grid_thw row {i} ({t}, {h}, {w})" if k == _IMAGE else
                       "video_grid_thw row {} frame {} (1, {}, {})".format(*frame_of[i], h, w))
                raise ValueError(f"row {b}: {n} {'image' if k == _IMAGE else 'video'} tokens after the vision_start "
                                 f"at position {start} (pad tokens from position {pos}), "
                                 f"but {src} needs t*h*w/spatial_merge_size^2 = {want}")

    positions = np.zeros((3, B, T), np.int64)
    deltas = np.zeros(B, np.int64)
    nxt = {_IMAGE: 0, _VIDEO: 0}
    for b, (where, runs) in enumerate(rows):
        if not len(where):
            continue
        out = np.empty((3, len(where)), np.int64)
        p = 0
        for k, s, e in runs:
            if k == _TEXT:
                out[:, s:e] = np.arange(p, p + e - s)
                p += e - s
                continue
            grid = images if k == _IMAGE else frames
            t, h, w = grid[nxt[k]].tolist()
            nxt[k] += 1
            H, W = h // m, w // m
            ti, r, c = np.meshgrid(np.arange(t), np.arange(H), np.arange(W), indexing="ij")
            out[:, s:e] = p + np.stack([ti.ravel(), r.ravel(), c.ravel()])
            p += max(H, W)
        positions[:, b, where] = out
        deltas[b] = out.max() + 1 - len(where)
    return positions.astype(np.int32), deltas.astype(np.int32)
