"""Every implementation of every hot op against its oracle (the battery of tests/kernel_test_base.py).

A new backend of an op adds its name to the op's IMPLEMENTATIONS line below and gets the whole battery: forward
and backward, fp32 and bf16, ragged and edge shapes. The TPU kernels run in Pallas' TPU interpreter here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_test_base import KernelVsOracle, gpu_interpreter_required
from pallas_kernels.attention import attention_blockwise, attention_reference
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_recurrent
from pallas_kernels.gpu_common import interpreter_available
from pallas_kernels.grouped_matmul.gpu import Blocks as GpuBlocks
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.tpu import Tiling
from pallas_kernels.matmul import cpu
from pallas_kernels.matmul.reference import matmul_reference
from qwenjax.ops import attention, gated_delta_rule, grouped_matmul, matmul
from test_gated_delta_rule import make_inputs

SHORT = {"float32": "f32", "bfloat16": "bf16"}
# fp32: what is left is summation order; bf16: matmul operands (and some gradients) rounded to bf16, where the
# oracle computes in fp32 from the same bf16 inputs: about one bf16 ulp of the largest value.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
STEP_OUTPUT_TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-3}  # the decode step's o: see TestGatedDeltaRuleStep
# The Mosaic GPU kernels run in their interpreter where it exists (jax >= 0.11: the GPU-kernel environment of
# scripts/gpu_env.sh, where .ci/run runs this file's GPU lines); they lower and compile in test_gpu_deviceless.py.
# Where it must exist (that environment, any jax >= 0.11) the lines are there and fail without it.
GPU_INTERPRETED = ("pallas_gpu_interpret",) if interpreter_available() or gpu_interpreter_required() else ()


# ---- the gated delta rule ------------------------------------------------------------------------------------------
class GdrCase(NamedTuple):
    dtype: str
    ratio: int          # value heads per q/k head (GVA)
    t: int
    initial_state: bool
    segments: bool      # packed documents
    g_value: float | None = None  # every gate this log-decay (None: realistic random gates)
    head_dim: int = 16  # K = V: 128 as the released models have, 16 zero-padded to the GPU kernels' 64 columns


def _segments(batch, t):
    """Row 0: documents start at 37 (inside chunk 0), 64 (a chunk boundary) and 90; row 1: at 5."""
    seg = np.zeros((batch, t), np.int32)
    for start in (37, 64, 90):
        seg[0, start:] += 1
    seg[1, 5:] = 7
    return seg


def _gdr_inputs(case: GdrCase, seed: int):
    q, k, v, g, beta, state = make_inputs(seed, t=case.t, ratio=case.ratio, g_value=case.g_value,
                                          with_state=case.initial_state, dk=case.head_dim, dv=case.head_dim)
    if case.g_value is not None:
        g[:, ::7] = -0.05  # a few mild gates so that some state survives between tokens
    q, k, v = (jnp.asarray(x, case.dtype) for x in (q, k, v))
    args = (q, k, v, jnp.asarray(g), jnp.asarray(beta)) + ((jnp.asarray(state),) if case.initial_state else ())
    kwargs = {"segment_ids": jnp.asarray(_segments(q.shape[0], case.t)) if case.segments else None}
    return args, kwargs


def _with_state(fn):
    """fn(q, k, v, g, beta[, initial_state], **kwargs), the state positional so that it is differentiated."""
    return lambda q, k, v, g, beta, *state, **kw: fn(q, k, v, g, beta, initial_state=(state or [None])[0], **kw)


class TestGatedDeltaRule(KernelVsOracle):
    """The sequence form (prefill, training) against the token-by-token recurrence."""

    IMPLEMENTATIONS = ("xla", "pallas_tpu_interpret") + GPU_INTERPRETED
    # Every GVA ratio, dtype and option meets the others; T off the chunk size (64), documents on it; heads of
    # 128 (two of the GPU kernels' 64-column blocks) and of 16 (zero-padded); 1 to 3 chunks. The edge cases (one
    # token; gates of -20, whose per-chunk cumsums reach ~-1280: exp underflows to 0, and the masked
    # upper-triangle exponents would be +1280 without masking) in both dtypes: the GPU kernels take bf16 only.
    CASES = {
        "f32-gva2-t100-state": GdrCase("float32", 2, 100, True, False),
        "f32-gva3-t130-segments-d128": GdrCase("float32", 3, 130, False, True, head_dim=128),
        "f32-gva2-t70-state-segments": GdrCase("float32", 2, 70, True, True),
        "f32-gva1-t1": GdrCase("float32", 1, 1, True, False),
        "f32-gva1-t70-gates-20": GdrCase("float32", 1, 70, True, False, g_value=-20.0),
        "bf16-gva1-t100-state-d128": GdrCase("bfloat16", 1, 100, True, False, head_dim=128),
        "bf16-gva3-t130-segments-d128": GdrCase("bfloat16", 3, 130, False, True, head_dim=128),
        "bf16-gva2-t63-state-segments": GdrCase("bfloat16", 2, 63, True, True),
        "bf16-gva2-t1-d128": GdrCase("bfloat16", 2, 1, True, False, head_dim=128),
        "bf16-gva1-t70-gates-20": GdrCase("bfloat16", 1, 70, True, False, g_value=-20.0),
    }

    @classmethod
    def covers(cls, implementation, case):
        return "gpu" not in implementation or case.dtype == "bfloat16"  # fp32 takes XLA's chunked form ("xla")

    def inputs(self, case):
        return _gdr_inputs(case, seed=case.ratio * 10 + case.t)

    def run(self, name, case):
        return _with_state(gated_delta_rule.IMPLEMENTATIONS[name][0])

    def oracle(self, case):
        return _with_state(gated_delta_rule_recurrent)

    def tolerance(self, case, implementation):
        return TOLERANCE[case.dtype], TOLERANCE[case.dtype]


class TestGatedDeltaRuleStep(KernelVsOracle):
    """The single-token form (a decode step) against the recurrence; inference only."""

    IMPLEMENTATIONS = ("xla", "pallas_tpu_interpret") + GPU_INTERPRETED
    CASES = {f"{SHORT[dtype]}-gva{ratio}-d{d}": GdrCase(dtype, ratio, 1, True, False, head_dim=d)
             for dtype in ("float32", "bfloat16") for ratio, d in ((1, 16), (2, 128), (3, 128))}
    BACKWARD = False

    def inputs(self, case):
        (q, k, v, g, beta, state), kwargs = _gdr_inputs(case, seed=case.ratio)
        beta = beta.at[0, 0, 0].set(0.0)  # a padded row: no write, pure decay
        return (q, k, v, g, beta, state), kwargs

    def run(self, name, case):
        return _with_state(gated_delta_rule.IMPLEMENTATIONS[name][1])

    def oracle(self, case):
        return _with_state(gated_delta_rule_recurrent)

    def tolerance(self, case, implementation):
        # o: fp32 values that differ in summation order only, then one rounding to o's dtype (bf16: an ulp of the
        # largest at most, 2^-8 ~ 3.9e-3). The state is fp32 in every dtype, computed in fp32 (the vector unit or
        # CUDA cores, no operand rounding): summation order only, 1e-5 (a state rounded to bf16 is ~4e-3 off).
        return (STEP_OUTPUT_TOLERANCE[case.dtype], TOLERANCE["float32"]), 0.0


# ---- the grouped matmul --------------------------------------------------------------------------------------------
class GmmCase(NamedTuple):
    dtype: str
    group_sizes: tuple[int, ...]  # rows past their sum (3 here) belong to no group
    tiling: Tiling                # the TPU kernels' tiles (tm, tk, tn), legal for a TPU (lanes of 128)


# K = 200 and N = 136 cross the tiles of both kernels, padded: the TPU's 128 (two K steps, two column tiles) and
# the GPU's 64 (`GPU_BLOCKS`: four K steps, three column blocks); M up to 133 rows, three of the GPU's row blocks.
GMM_K, GMM_N = 200, 136
GPU_BLOCKS = GpuBlocks(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)  # the smallest wgmma tiles
_GROUPS = {
    "empty-groups-ragged-tiles": ((37, 0, 70, 2, 0, 21), Tiling(32, 128, 128)),  # groups across row tiles
    "leading-empty-groups": ((0, 0, 130, 1), Tiling(16, 128, 128)),               # one group over many tiles
    "one-tile": ((3, 4), Tiling(512, 512, 512)),                                  # one TPU tile
    "no-rows-routed": ((0, 0, 0), Tiling(16, 128, 128)),
    "fewer-rows-than-groups": ((1, 0, 2, 0, 0, 0, 1, 0, 0, 0), Tiling(16, 128, 128)),  # decode
}


class TestGroupedMatmul(KernelVsOracle):
    IMPLEMENTATIONS = ("ragged_dot", "pallas_tpu_interpret") + GPU_INTERPRETED
    EXACT_ZEROS = True
    CASES = {f"{SHORT[dtype]}-{name}": GmmCase(dtype, sizes, tiling)
             for dtype in ("float32", "bfloat16") for name, (sizes, tiling) in _GROUPS.items()}

    @classmethod
    def covers(cls, implementation, case):
        # the GPU function sends fp32 (tensor cores would round it to tf32) and fewer rows than groups (a decode
        # step: XLA gathers each row's weights) to XLA's ragged_dot: the "ragged_dot" line
        rows = sum(case.group_sizes) + 3
        return "gpu" not in implementation or (case.dtype == "bfloat16" and rows >= len(case.group_sizes))

    def inputs(self, case):
        m, k, n = sum(case.group_sizes) + 3, GMM_K, GMM_N
        keys = jax.random.split(jax.random.key(len(case.group_sizes)), 2)
        x = jax.random.normal(keys[0], (m, k)).astype(case.dtype)
        w = jax.random.normal(keys[1], (len(case.group_sizes), n, k)).astype(case.dtype)
        return (x, w), {"group_sizes": jnp.array(case.group_sizes, jnp.int32)}

    def run(self, name, case):
        fn = grouped_matmul.IMPLEMENTATIONS[name]
        if name.startswith("pallas_tpu"):
            return functools.partial(fn, tiling=case.tiling)
        if name.startswith("pallas_gpu"):
            return functools.partial(fn, blocks=GPU_BLOCKS)
        return fn

    def oracle(self, case):
        return grouped_matmul_reference

    def tolerance(self, case, implementation):
        return TOLERANCE["float32"], TOLERANCE[case.dtype]  # the forward accumulates in fp32 either way


# ---- x · Wᵀ ---------------------------------------------------------------------------------------------------------
class MatmulCase(NamedTuple):
    dtype: str
    rows: int
    out_features: int
    in_features: int


class TestMatmul(KernelVsOracle):
    """The CPU kernel serves every number of rows (under a gradient XLA's dot past 4 rows: tests/test_cpu_matvec.py)."""

    # A machine with no C++ compiler runs XLA's path alone; where one exists the kernel line is always there, and a
    # kernel that fails to build fails it (and tests/test_cpu_matvec.py).
    IMPLEMENTATIONS = ("xla",) + (("kernel",) if cpu.compiler() else ())
    CASES = {f"{SHORT[dtype]}-{rows}x{o}x{i}": MatmulCase(dtype, rows, o, i)
             for dtype in ("float32", "bfloat16") for rows in (1, 2, 4, 5) for o, i in ((37, 1001), (2051, 16))}

    def inputs(self, case):
        kx, kw = jax.random.split(jax.random.key(case.rows))
        x = jax.random.normal(kx, (case.rows, case.in_features), case.dtype)
        w = jax.random.normal(kw, (case.out_features, case.in_features), case.dtype)
        return (x, w), {}

    def run(self, name, case):
        return matmul.IMPLEMENTATIONS[name]

    def oracle(self, case):
        return matmul_reference

    def tolerance(self, case, implementation):
        return TOLERANCE["float32"], TOLERANCE[case.dtype]  # products of bf16 are exact in fp32


# ---- attention ------------------------------------------------------------------------------------------------------
class AttentionCase(NamedTuple):
    dtype: str
    t: int                 # queries
    s: int                 # keys
    heads: tuple[int, int]  # query heads, key/value heads
    mask: str              # "causal" (with right padding), "cache" (decode over a buffer) or "none"


class TestAttention(KernelVsOracle):
    IMPLEMENTATIONS = ("xla",)
    CASES = {
        "f32-causal-blocks-256": AttentionCase("float32", 256, 256, (4, 2), "causal"),
        "f32-causal-ragged-blocks-300": AttentionCase("float32", 300, 300, (4, 2), "causal"),
        "f32-gqa3-unmasked": AttentionCase("float32", 5, 5, (6, 2), "none"),
        "f32-decode-over-cache": AttentionCase("float32", 1, 64, (4, 1), "cache"),
        "bf16-causal-blocks-256": AttentionCase("bfloat16", 256, 256, (4, 2), "causal"),
        # unmasked and over one tile of scores: attention_xla goes blockwise, two (ragged) key blocks
        "f32-unmasked-blockwise": AttentionCase("float32", 300, 1100, (4, 2), "none"),
        "bf16-unmasked-blockwise": AttentionCase("bfloat16", 300, 1100, (4, 2), "none"),
    }

    def inputs(self, case):
        (h, kv), d = case.heads, 32
        ks = jax.random.split(jax.random.key(case.t), 3)
        q = jax.random.normal(ks[0], (2, case.t, h, d), case.dtype)
        k = jax.random.normal(ks[1], (2, case.s, kv, d), case.dtype)
        v = jax.random.normal(ks[2], (2, case.s, kv, d), case.dtype)
        if case.mask == "causal":  # row 1 has 37 padding tokens at the end
            valid = jnp.arange(case.s)[None, :] < jnp.array([[case.s], [case.s - 37]])
            mask = jnp.tril(jnp.ones((case.t, case.s), bool))[None] & valid[:, None, :]
        elif case.mask == "cache":  # rows hold 40 and 7 tokens of the buffer
            mask = jnp.arange(case.s)[None, None, :] < jnp.array([40, 7])[:, None, None]
        else:
            mask = None
        return (q, k, v), {"mask": mask, "causal": case.mask == "causal"}

    def run(self, name, case):
        fn = attention.IMPLEMENTATIONS[name]
        return lambda q, k, v, mask, causal: fn(q, k, v, mask, 0.2, causal=causal)

    def oracle(self, case):
        return lambda q, k, v, mask, causal: attention_reference(q, k, v, mask, 0.2).astype(q.dtype)

    def tolerance(self, case, implementation):
        # fp32: the oracle's products, summed in blocks (causal block skipping, the blockwise path's online
        # softmax): measured at most 8e-7 of the largest, forward and backward; bf16: the battery's one ulp
        tol = 2e-6 if case.dtype == "float32" else TOLERANCE[case.dtype]
        return tol, tol


@pytest.mark.parametrize("b, t, s, heads, blocks, tile", [
    ((2, 37, 53, (4, 2), (16, 16), 300)),    # ragged queries and keys, GQA, two items a tile
    ((2, 19, 70, (6, 2), (7, 9), 1)),        # many small blocks, one item a tile
    ((1, 64, 64, (2, 1), (64, 16), 10**6)),  # keys in four blocks, query heads of a group in one block
])
def test_attention_blockwise_small_blocks(b, t, s, heads, blocks, tile):
    """The blockwise path's tiling (items per tile, query blocks, the online softmax over key blocks, the padding of
    ragged lengths) against the oracle, forward and backward, on blocks small enough to take every branch."""
    (h, kv), d = heads, 32
    ks = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, s, kv, d)) for key in ks[1:])
    blockwise = functools.partial(attention_blockwise, scale=0.2, query_block=blocks[0], key_block=blocks[1],
                                  tile_scores=tile)
    run = lambda q, k, v: blockwise(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))  # it takes k, v head-major
    oracle = functools.partial(attention_reference, mask=None, scale=0.2)
    np.testing.assert_allclose(run(q, k, v), oracle(q, k, v), atol=TOLERANCE["float32"])
    loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))
    for ours, theirs in zip(jax.grad(loss(run), (0, 1, 2))(q, k, v), jax.grad(loss(oracle), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE["float32"])


def test_every_dispatch_table_entry_is_in_a_battery_or_named_here():
    """An implementation added to a dispatch table without a battery line fails here, not silently."""
    on_tpu_only = {"pallas_tpu"}  # compiled for TPU topologies (libtpu, compile-only) in the ops' own tests
    on_gpu_only = {"pallas_gpu"}  # compiled for an H100 target in test_gpu_deviceless.py
    interpreted_elsewhere = set() if GPU_INTERPRETED else {"pallas_gpu_interpret"}  # the GPU-kernel environment's
    for table, battery in ((gated_delta_rule.IMPLEMENTATIONS, TestGatedDeltaRule),
                           (gated_delta_rule.IMPLEMENTATIONS, TestGatedDeltaRuleStep),
                           (grouped_matmul.IMPLEMENTATIONS, TestGroupedMatmul),
                           (attention.IMPLEMENTATIONS, TestAttention)):
        untested = (set(table) - set(battery.IMPLEMENTATIONS) - on_tpu_only - on_gpu_only - interpreted_elsewhere
                    - {"recurrent"})  # recurrent: the oracle
        assert not untested, f"{battery.__name__}: no battery line for {sorted(untested)}"
    assert set(matmul.IMPLEMENTATIONS) - set(TestMatmul.IMPLEMENTATIONS) <= (set() if cpu.compiler() else {"kernel"})


def test_one_row_bf16_product_is_padded_for_the_cpu_only():
    """XLA:CPU gets a one-row bf16 product as two rows (its GEMM path); a program lowered for a GPU or TPU must
    not, also when it is lowered on a CPU host (a deviceless compile): the choice is made per lowering platform."""
    from pallas_kernels.matmul.xla import matmul_xla

    x, w = jax.ShapeDtypeStruct((1, 64), jnp.bfloat16), jax.ShapeDtypeStruct((32, 64), jnp.bfloat16)
    lowered = {platform: jax.jit(matmul_xla).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
               for platform in ("cpu", "cuda", "tpu")}
    assert "concatenate" in lowered["cpu"]
    assert "concatenate" not in lowered["cuda"] and "concatenate" not in lowered["tpu"]
