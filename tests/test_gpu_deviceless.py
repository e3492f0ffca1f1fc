"""Compiling for NVIDIA GPUs with no GPU present: every Mosaic GPU kernel for an H100 (registers, spills, shared
memory; `scripts/gpu_kernel_resources.py`), the decode step for an H100 and an H200 target, and the kernels it
launches per step. Needs the GPU-kernel environment (`bash scripts/gpu_env.sh`: jax 0.11 with the CUDA plugin
wheels); `.ci/run` runs this file there (with QWENJAX_GPU_KERNEL_ENV=1: without the plugin it fails), and the
main environment skips it, saying so."""

from __future__ import annotations

import re

import pytest

from kernel_test_base import in_gpu_kernel_env

if in_gpu_kernel_env():
    import jax_plugins.xla_cuda13  # noqa: F401  the GPU-kernel environment's plugin: missing, the run fails
else:
    pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the GPU-kernel environment: bash scripts/gpu_env.sh "
                                                         "(.ci/run runs this file there)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwenjax import aot  # noqa: E402
from qwenjax.config import load_config  # noqa: E402
from scripts.gpu_kernel_resources import CASES, compile_case, mosaic_gpu_resources  # noqa: E402

pytestmark = pytest.mark.gpu_kernels

# Registers a thread, per kernel: the counts of BENCHMARKS.md (2026-12-06, ptxas of the CUDA 13 plugin wheels) up
# to the next multiple of 8, the unit registers are allocated in. A kernel that grows shows here, before it
# spills (ptxas's 255 is no bound: it spills rather than exceed it). The decode step exactly: it has 5 to spare.
REGISTERS = {"grouped_matmul_kernel": 176, "body": 184, "state_pass_forward": 192, "state_pass_states": 160,
             "state_gradient_pass": 192, "decode_step": 250}


@pytest.mark.parametrize("case", list(CASES))
def test_every_mosaic_gpu_kernel_compiles_for_an_h100_within_a_blocks_registers_and_shared_memory(case):
    """Each kernel at a real model shape (grouped matmul: the 35B-A3B experts; the gated delta rule: 16k tokens
    of the 9B and 397B layers, and the decode step): no spills, registers within the kernel's budget, shared
    memory within an H100 block's 227 KiB."""
    fn, args = compile_case(case, "h100")
    resources = mosaic_gpu_resources(fn, *args)
    assert len(resources) == CASES[case][1], resources
    for kernel, used in resources.items():
        name = re.sub(r"_[0-9]+$", "", kernel)  # the compile's counter
        assert used["registers"] <= REGISTERS[name], (kernel, used, REGISTERS[name])
        assert used["spill_stores"] == 0 and used["spill_loads"] == 0, (kernel, used)
        assert 0 < used["smem"] <= 227 * 1024, (kernel, used)


@pytest.mark.parametrize("target", sorted(aot.GPU_TARGETS))
def test_decode_step_compiles_for_a_gpu_target_and_its_launches_are_counted(target):
    cfg = load_config("configs/tiny.json")
    compiled = aot.compile_decode_step(cfg, target, batch=2, max_len=128, dtype=jnp.bfloat16)
    device = jax.tree.leaves(compiled.input_shardings)[0].mesh.devices.flat[0]
    assert device.device_kind == aot.GPU_TARGETS[target][0]
    launches = aot.kernel_launches(compiled)
    # the gated delta rule: the Mosaic step kernel ("auto" on a Hopper target), one launch per linear-attention
    # layer; everything else in fusions (the matmuls as GPU gemm fusions or library calls)
    assert launches.get("custom-call:mosaic_gpu_v2") == cfg.layer_types.count("linear_attention"), launches
    assert sum(n for kind, n in launches.items() if kind.startswith("fusion:")) >= cfg.num_hidden_layers
    assert compiled.memory_analysis().argument_size_in_bytes > 0
