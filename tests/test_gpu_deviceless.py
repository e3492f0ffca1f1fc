"""Compiling for NVIDIA GPUs with no GPU present: the decode step for an H100 and an H200 target, and the kernels
it launches per step. Needs the GPU-kernel environment (`bash scripts/gpu_env.sh`: jax 0.11 with the CUDA plugin
wheels); `.ci/run` runs this file there, and the main environment skips it, saying so."""

from __future__ import annotations

import pytest

pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the GPU-kernel environment: bash scripts/gpu_env.sh "
                                                     "(.ci/run runs this file there)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from qwenjax import aot  # noqa: E402
from qwenjax.config import load_config  # noqa: E402

pytestmark = pytest.mark.gpu_kernels


def _on(target):
    sharding = jax.sharding.SingleDeviceSharding(aot.topology_devices(target)[0])
    return lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def test_grouped_matmul_kernels_compile_for_an_h100_at_the_35b_a3b_expert_shape():
    """Forward and both backward products, 4096 tokens routed top-8 over 256 experts: every kernel within the
    registers (no spills) and the shared memory of a block."""
    from pallas_kernels.grouped_matmul.gpu import grouped_matmul_gpu

    on = _on("h100")
    rows, hidden, inter, experts = 4096 * 8, 2048, 512, 256
    fn = jax.value_and_grad(lambda x, w, gs: jnp.sum(grouped_matmul_gpu(x, w, gs)), argnums=(0, 1))
    args = on((rows, hidden)), on((experts, 2 * inter, hidden)), on((experts,), jnp.int32)
    assert jax.jit(fn).lower(*args).as_text().count("mosaic_gpu") >= 3
    resources = aot.mosaic_gpu_resources(fn, *args)
    assert len(resources) == 3, resources  # forward, input gradient, weight gradient
    for kernel, used in resources.items():
        assert used["spill_stores"] == 0 and used["spill_loads"] == 0, (kernel, used)
        assert 0 < used["smem"] <= 227 * 1024, (kernel, used)


@pytest.mark.parametrize("target", sorted(aot.GPU_TARGETS))
def test_decode_step_compiles_for_a_gpu_target_and_its_launches_are_counted(target):
    cfg = load_config("configs/tiny.json")
    compiled = aot.compile_decode_step(cfg, target, batch=2, max_len=128, dtype=jnp.bfloat16)
    import jax

    device = jax.tree.leaves(compiled.input_shardings)[0].mesh.devices.flat[0]
    assert device.device_kind == aot.GPU_TARGETS[target][0]
    launches = aot.kernel_launches(compiled)
    # every layer's work is in fusions; the matmuls are GPU gemm fusions or library calls
    assert sum(n for kind, n in launches.items() if kind.startswith("fusion:")) >= cfg.num_hidden_layers
    assert not set(launches) & aot._NO_LAUNCH
    assert compiled.memory_analysis().argument_size_in_bytes > 0
