"""The Qwen3.5 vision tower (transformers' `Qwen3_5VisionModel`): flattened pixel patches → features that the
language model reads in place of its image/video pad tokens.

    patches [N, C·T·P·P] → patch_embed (Conv3d as a matmul) + interpolated learned positions
      → depth × block (LayerNorm → attention within each frame, 2-D rotary → LayerNorm → MLP)
      → merger (LayerNorm per patch → each merge block's m² patches as one vector → Linear → GELU → Linear)
      → [N / m², out_hidden_size]

Attribute names follow Hugging Face, so a checkpoint's `model.visual.<key>` is this module's parameter path
`<key>` (`blocks.0.attn.qkv.weight`, ...) and loading is a copy. Patches arrive, as from transformers' image
processor, grouped by merge block: each image is t frames of h·w patches in (h/m, w/m, m, m) order.

`grid_thw` ([images, 3]: temporal, height, width in patches) is static: host integers known at trace time, so
every shape, position table and attention grouping below is fixed when the function is traced (one compile
per distinct set of grids).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.config import VisionConfig
from qwenjax.model.layers import Embed, Linear, apply_rope, normal_init
from qwenjax.model.positions import check_grid
from qwenjax.ops.attention import dot_product_attention
from qwenjax.ops.kernels import Kernels, resolve_kernels
from qwenjax.ops.platform import platform_of
from qwenjax.ops.matmul import matmul_wt

LAYER_NORM_EPS = 1e-6  # transformers hard-codes it for every vision LayerNorm (the config has no field)

# The block MLP's activation by transformers' name (config.VISION_ACTIVATIONS lists the same names).
ACTIVATIONS = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
}


class LayerNorm(nnx.Module):
    """(x − mean) · rsqrt(var + eps) · w + b over the last axis, in fp32, returned in x's dtype (torch's
    LayerNorm; the text model's norms are all RMSNorms)."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = LAYER_NORM_EPS):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class PatchProjection(nnx.Module):
    """The patch Conv3d. Its kernel equals its stride and each patch arrives alone, flattened in the kernel's
    (C, T, P, P) order, so the convolution is one biased matmul with the kernel flattened alike. The weight keeps
    the Conv3d's shape [hidden, C, T, P, P] so a checkpoint loads by copying.

    Computes in `dtype`, else in the weight's dtype (as transformers casts the pixels to the weight's): pixels
    usually come as fp32 whatever the model's precision.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.weight = nnx.Param(normal_init()(rngs.params(), shape, param_dtype),
                                logical_axes=("embed", None, None, None, None))
        self.bias = nnx.Param(jnp.zeros((cfg.hidden_size,), param_dtype), logical_axes=("embed",))
        self.dtype = dtype
        self.kernels = kernels

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.weight[...]
        dtype = self.dtype or w.dtype
        y = matmul_wt(patches.astype(dtype), w.reshape(w.shape[0], -1).astype(dtype),
                      implementation=self.kernels.cpu_matvec)
        return (y + self.bias[...].astype(jnp.float32)).astype(dtype)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, **kw):
        self.proj = PatchProjection(cfg, **kw)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


# ---- static layout: positions, learned-position interpolation, frames -------------------------------------------
def _check_grid(grid_thw, cfg: VisionConfig, patches_shape: tuple[int, ...]) -> np.ndarray:
    """`grid_thw` as a host int array [images, 3], checked against the config and the patches' shape."""
    try:
        grid = np.asarray(grid_thw)
    except jax.errors.TracerArrayConversionError:
        raise TypeError("grid_thw must be host integers (e.g. a numpy array), known when the forward is traced; "
                        "it was traced: close over it instead of passing it through jax.jit") from None
    grid = check_grid(grid, "grid_thw", cfg.spatial_merge_size)
    if not len(grid):
        raise ValueError("grid_thw has no rows: no images")
    n = int(np.prod(grid, axis=1).sum())
    if tuple(patches_shape) != (n, cfg.patch_dim):
        raise ValueError(f"pixel_values must be [patches, C*T*P*P] = [{n}, {cfg.patch_dim}] for grid_thw "
                         f"{grid.tolist()}, got {list(patches_shape)}")
    return grid


def patch_rows_cols(grid: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's (row, col) in its frame, in the order patches arrive: per image, t frames of h·w patches in
    merge-block order (block row, block col, row in block, col in block)."""
    rows, cols = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]  # a micro-batch may hold no picture
    for t, h, w in grid:
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows.append(np.tile(r.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1), t))
        cols.append(np.tile(c.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1), t))
    return np.concatenate(rows), np.concatenate(cols)


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The two table rows (floor, floor + 1, clamped) that sample position `index` of `size` stretched over
    `side` entries with corners aligned (`linspace(0, side − 1, size)`), and their weights. fp32 throughout, op
    for op as transformers (`vision_utils._interpolation_axis_taps_weights`), so the weights are bit-equal."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.maximum(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0).astype(np.float32)
    return taps, weights


def position_interpolation(grid: np.ndarray, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the learned position table [patches, 4] and their weights [patches, 4] that resample the square
    table bilinearly to each image's (h, w) grid (align_corners), in the patches' merge-block order, the same for
    every frame of an image."""
    side = cfg.num_grid_per_side
    rows, cols = patch_rows_cols(grid, cfg.spatial_merge_size)
    counts = np.prod(grid, axis=1)
    heights, widths = np.repeat(grid[:, 1], counts), np.repeat(grid[:, 2], counts)
    row_taps, row_w = _bilinear_taps(rows, heights, side)
    col_taps, col_w = _bilinear_taps(cols, widths, side)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights


class PatchLayout(NamedTuple):
    """Where each patch sits, as arrays: everything the tower reads from the grids except the attention's
    grouping. Built on the host (`patch_layout`); under jit its leaves may be traced, so a training batch, whose
    images change every step, compiles once per patch capacity, not once per set of grids."""
    frames: Any       # [P] int32: the patch's frame, numbered over the batch; -1 marks padding
    rows: Any         # [P] int32: the patch's row and column in its frame
    cols: Any
    pos_indices: Any  # [P, 4] int32: rows of the learned position table (`position_interpolation`)
    pos_weights: Any  # [P, 4] float32: their bilinear weights (0 for padding)


def patch_layout(grid: np.ndarray, cfg: VisionConfig, capacity: int | None = None) -> PatchLayout:
    """The layout of patches laid out as `grid` [images, 3] says, padded to `capacity` patches (a multiple of
    spatial_merge_size², default: exactly the grids' patches)."""
    rows, cols = patch_rows_cols(grid, cfg.spatial_merge_size)
    indices, weights = position_interpolation(grid, cfg)
    frames = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
    n = len(rows)
    capacity = n if capacity is None else capacity
    if capacity < n or capacity % cfg.spatial_merge_size ** 2:
        raise ValueError(f"patch capacity {capacity} must hold the {n} patches and be a multiple of "
                         f"spatial_merge_size² = {cfg.spatial_merge_size ** 2}")
    pad = lambda a, value=0: np.concatenate([a, np.full((capacity - n, *a.shape[1:]), value, a.dtype)])
    return PatchLayout(frames=pad(frames.astype(np.int32), -1), rows=pad(rows.astype(np.int32)),
                       cols=pad(cols.astype(np.int32)), pos_indices=pad(indices), pos_weights=pad(weights))


def rotary_cos_sin(rows: jax.Array, cols: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin [patches, head_dim] (fp32) of the 2-D rotary: with f the head_dim/4 frequencies
    1/θ^(2i/(head_dim/2)), the angles are [row·f, col·f] (head_dim/2), duplicated for rotate-half."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    angles = jnp.concatenate([jnp.asarray(rows, jnp.float32)[:, None] * inv_freq,
                              jnp.asarray(cols, jnp.float32)[:, None] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def attend_within_frame_ids(q: jax.Array, k: jax.Array, v: jax.Array, frames: jax.Array, scale: float) -> jax.Array:
    """`attend_within_frames` for a traced layout: one attention over all patches, masked to equal frame ids
    (padding, frame -1, sees only padding). Its scores cost patches² per head, so it suits training batches of
    small images; inference, whose grids are static, groups frames by size instead."""
    mask = frames[None, :, None] == frames[None, None, :]
    return dot_product_attention(q[None], k[None], v[None], mask, scale)[0]


def attend_within_frames(q: jax.Array, k: jax.Array, v: jax.Array, grid: np.ndarray, scale: float) -> jax.Array:
    """Non-causal attention of every patch to the patches of its own frame (one t-slice of one image);
    q, k, v, result: [patches, heads, head_dim].

    Frames of one size are stacked into a batch [frames, h·w, heads, head_dim] and attended with no mask at all,
    so memory grows with frames · (h·w)², never with patches²: a dense or segment-id mask over the whole
    sequence would cost patches² (1.6e9 entries for a 40k-patch video) and compute mostly masked scores.
    An image's frames are contiguous and equally sized, so the batches are slices and reshapes, no gathers.
    Unmasked, a large frame goes blockwise (`attention_blockwise`): one tile of scores at a time, never
    heads · (h·w)² of them (1 GiB for 16 heads over 64 x 64 patches).
    """
    starts = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
    out: list[jax.Array | None] = [None] * len(grid)
    for frame_len in sorted({int(h * w) for _, h, w in grid}):
        images = [i for i, (_, h, w) in enumerate(grid) if h * w == frame_len]

        def stacked(x, images=images, frame_len=frame_len):
            return jnp.concatenate([x[starts[i]:starts[i + 1]].reshape(-1, frame_len, *x.shape[1:])
                                    for i in images])

        o = dot_product_attention(stacked(q), stacked(k), stacked(v), None, scale)  # [frames, h·w, H, D]
        frame_ends = np.cumsum([grid[i, 0] for i in images])
        for i, frames in zip(images, jnp.split(o, frame_ends[:-1])):
            out[i] = frames.reshape(-1, *q.shape[1:])
    return jnp.concatenate(out)


# (q, k, v [patches, heads, head_dim], scale) → [patches, heads, head_dim]: attention within each frame
Attend = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


# ---- layers ------------------------------------------------------------------------------------------------------
class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        self.qkv = Linear(d, 3 * d, ("q_heads", "embed"), **kw)  # rows: [q | k | v], each heads × head_dim
        self.proj = Linear(d, d, ("embed", "q_heads"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
        n = x.shape[0]
        q, k, v = jnp.unstack(self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim), axis=1)
        q, k = (apply_rope(a[None], cos[None], sin[None])[0] for a in (q, k))  # fp32 inside, back to x's dtype
        o = attend(q, k, v, self.head_dim ** -0.5)
        return self.proj(o.reshape(n, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, **kw):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("mlp", "embed"), use_bias=True, **kw)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("embed", "mlp"), use_bias=True, **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, **kw):
        self.norm1 = LayerNorm(cfg.hidden_size, param_dtype=param_dtype)
        self.norm2 = LayerNorm(cfg.hidden_size, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, **kw)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm over each patch (before the merge, not after), then each merge block's m² consecutive patches as
    one vector → Linear → exact GELU → Linear to the language model's width."""

    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, **kw):
        merged = cfg.merged_hidden_size
        self.norm = LayerNorm(cfg.hidden_size, param_dtype=param_dtype)
        self.linear_fc1 = Linear(merged, merged, ("mlp", "embed"), use_bias=True, param_dtype=param_dtype, **kw)
        self.linear_fc2 = Linear(merged, cfg.out_hidden_size, ("embed", "mlp"), use_bias=True,
                                 param_dtype=param_dtype, **kw)
        self.merged = merged

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """`model.visual` of a Qwen3.5 checkpoint. `param_dtype`/`dtype` as the text model's modules: weights are
    stored in param_dtype and products computed in dtype (None: the weights' dtype); norms, softmax, rotary and
    the position interpolation compute in fp32."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 kernels: Kernels | None = None):
        self.config = cfg
        self.kernels = kernels if kernels is not None and kernels.resolved else resolve_kernels(
            kernels, platform_of())
        kw = dict(rngs=rngs, kernels=self.kernels, param_dtype=param_dtype, dtype=dtype)
        self.patch_embed = PatchEmbed(cfg, **kw)
        # nn.Embedding in transformers (`pos_embed.weight`), read by weighted gathers, never by token id; it
        # returns rows in param_dtype (no `dtype`), which are then weighted in fp32.
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.hidden_size, rngs=rngs, kernels=self.kernels,
                               param_dtype=param_dtype)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, grid_thw: np.ndarray | None = None, *,
                 layout: PatchLayout | None = None) -> jax.Array:
        """Features [patches / spatial_merge_size², out_hidden_size] for pixel_values [patches, C·T·P·P] laid out
        as `grid_thw` [images, 3] (host ints: t, h, w in patches) says; one row per merge block, in input order.

        Or, for batches whose images change from step to step (training), a `layout` (`patch_layout`, padded to a
        fixed capacity) in place of the grids: shapes then depend on the capacity alone; the features of padding
        come last and mean nothing.
        """
        if (grid_thw is None) == (layout is None):
            raise ValueError("give the patches' grid_thw or their layout, not both")
        if layout is None:
            grid = _check_grid(grid_thw, self.config, pixel_values.shape)
            layout = patch_layout(grid, self.config)
            attend = functools.partial(_attend_static, grid=grid)
        else:
            attend = functools.partial(_attend_traced, frames=layout.frames)
        x = self.patch_embed(pixel_values)
        # Learned positions: table rows (param dtype) times fp32 weights, summed in fp32, as transformers does.
        rows = self.pos_embed(jnp.asarray(layout.pos_indices)).astype(jnp.float32)  # [patches, 4, hidden]
        x = x + jnp.sum(rows * jnp.asarray(layout.pos_weights)[:, :, None], axis=1).astype(x.dtype)
        cos, sin = rotary_cos_sin(layout.rows, layout.cols, self.config)
        for block in self.blocks:
            x = block(x, cos, sin, attend)
        return self.merger(x)


def _attend_static(q, k, v, scale, *, grid):
    return attend_within_frames(q, k, v, grid, scale)


def _attend_traced(q, k, v, scale, *, frames):
    return attend_within_frame_ids(q, k, v, frames, scale)
