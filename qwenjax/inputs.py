"""Token ids at the public entry points (`m(...)`, `generate`, `stream`): one validator, errors that locate the
culprit."""

from __future__ import annotations

import numpy as np


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
