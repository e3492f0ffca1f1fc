"""Compile for TPU topologies and NVIDIA GPUs from any host (compile-only devices): memory, cost and the
kernels a program launches, before renting.

    from qwenjax import aot
    compiled = aot.compile_forward_backward(cfg, "v5p:2x2x1", mesh="fsdp=4", batch=4, seq=4096)
    print(aot.summary(compiled))
    compiled = aot.compile_multimodal_forward(cfg, "v5e:2x2", batch=4, seq=2048, image_size=448)  # with images
    compiled = aot.compile_decode_step(cfg, "h100", batch=1, max_len=4096)  # one GPU, no GPU present
    print(aot.kernel_launches(compiled))

TPU topologies ("v5e:2x2", ...) need `libtpu` (`pip install "jax[tpu]==<your jax version>"`). GPU targets
(`GPU_TARGETS`: "h100", "h200") need the CUDA plugin wheels (`jax-cuda13-plugin`, `jax-cuda13-pjrt`, no nvidia-*
packages: `scripts/gpu_env.sh`) and, without CUDA libraries, `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` in the environment
before JAX starts. No accelerator is needed. Nothing is allocated: parameters and batches are shapes with
shardings over the target's devices. The ops' implementations (`kernels`) are resolved for the target, not for
the host. Several processes that load libtpu at once (parallel test runs, a CI beside a script) need
`ALLOW_MULTIPLE_LIBTPU_LOAD=1` in their environment before JAX starts.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import _compat
from qwenjax.config import Qwen35Config
from qwenjax.inputs import VisionInputs, vision_positions
from qwenjax.ops.kernels import Kernels, resolve_kernels
from qwenjax.ops.platform import platform_of
from qwenjax.pretrained import abstract_model
from qwenjax.sharding import ShardingRules, activation_sharding, make_mesh, param_shardings
from qwenjax.train.loss import next_token_loss


# What XLA's GPU compiler needs to know of a GPU it cannot see (a GpuTargetConfigProto), from NVIDIA's published
# figures for the SXM parts: SMs, shared memory (per SM, per block, per block opted in), registers, L2, memory
# size and bandwidth, clock, compute capability 9.0.
_HOPPER = dict(core_count=132, threads_per_block_limit=1024, threads_per_warp=32, threads_per_core_limit=2048,
               shared_memory_per_block=49152, shared_memory_per_block_optin=232448, shared_memory_per_core=233472,
               registers_per_core_limit=65536, registers_per_block_limit=65536, l2_cache_size=52428800,
               clock_rate_ghz=1.98, fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
               block_dim_limit_z=65535)
GPU_TARGETS = {  # name: (device name, facts beyond _HOPPER)
    "h100": ("NVIDIA H100 80GB HBM3", dict(device_memory_size=80 * 2 ** 30, memory_bandwidth=3_350_000_000_000)),
    "h200": ("NVIDIA H200", dict(device_memory_size=141 * 10 ** 9, memory_bandwidth=4_800_000_000_000)),
}


def gpu_target_config(name: str) -> str:
    """The GpuTargetConfigProto (text) of a name in GPU_TARGETS."""
    device, facts = GPU_TARGETS[name]
    info = "\n".join(f"  {k}: {v}" for k, v in {**_HOPPER, **facts}.items())
    return (f'gpu_device_info {{\n  name: "{device}"\n{info}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n'
            f'platform_name: "CUDA"\ndevice_description_str: "{device}"\n')


def topology_devices(name: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:2x2", "v6e:2x2" or "v5p:2x2x1", or of one GPU of
    GPU_TARGETS ("h100", "h200")."""
    from jax.experimental import topologies

    if name in GPU_TARGETS:
        try:
            return list(topologies.get_topology_desc(name, platform="cuda", topology="1x1x1",
                                                     target_config=gpu_target_config(name)).devices)
        except Exception as e:  # no CUDA plugin, or one that did not initialise
            raise RuntimeError(f"cannot get a compile-only {name} ({type(e).__name__}: {e}); compiling for a GPU "
                               "needs the CUDA plugin wheels (scripts/gpu_env.sh) and, with no CUDA libraries, "
                               "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 set before JAX starts") from e
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # no libtpu, or an unknown topology
        raise RuntimeError(f"cannot get compile-only devices for TPU topology {name!r} ({type(e).__name__}: {e}); "
                           "compiling for TPU needs libtpu: pip install \"jax[tpu]==<your jax version>\" (GPU "
                           f"targets: {', '.join(sorted(GPU_TARGETS))})") from e


def compile_forward_backward(cfg: Qwen35Config, topology: str, *, mesh: str | None = None, batch: int = 1,
                             seq: int = 2048, dtype: Any = jnp.bfloat16, remat: str = "none",
                             kernels: Kernels | Mapping[str, str] | None = None, rules: ShardingRules | None = None,
                             backward: bool = True):
    """The compiled gradient of the next-token loss with respect to every parameter, for `topology` (with
    `backward=False`, the compiled forward: logits).

    mesh: a mesh spec over the topology's devices ("fsdp=4,tensor=2", "fsdp=2,expert=8"; default all on fsdp).
    kernels: the ops' implementations; unset fields are resolved for the TPU (environment, else "auto").
    """
    mesh_, rules, graphdef, params = _abstract(cfg, topology, mesh, dtype, kernels, rules)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rules.sharding(mesh_, ("batch", None),
                                                                                 (batch, seq)))

    def loss(params, ids):
        logits = nnx.merge(graphdef, params)(ids, remat=remat)
        total, count = next_token_loss(logits, ids)
        return total / count

    def forward(params, ids):
        return nnx.merge(graphdef, params)(ids)

    with activation_sharding(mesh_, rules):
        lowered = jax.jit(jax.value_and_grad(loss) if backward else forward).lower(params, ids)
    return lowered.compile()


def _abstract(cfg, topology, mesh, dtype, kernels, rules):
    """(mesh, rules, graphdef, parameters as shapes sharded over the topology's devices)."""
    devices = topology_devices(topology)
    mesh_ = make_mesh(mesh, devices)
    rules = rules or ShardingRules()
    graphdef, abstract = abstract_model(cfg, dtype, dtype, resolve_kernels(kernels, platform_of(devices[0])))
    shardings = param_shardings(abstract, mesh_, rules)
    params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                          shardings, is_leaf=_compat.is_variable)
    return mesh_, rules, graphdef, params


def image_batch(cfg: Qwen35Config, *, batch: int, seq: int, image_size: int = 448,
                images_per_row: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prompt batch as the processor lays it out: each of `batch` rows of `seq` tokens holds `images_per_row`
    square images of `image_size` pixels (vision start, t·h·w / merge² image pads, vision end; one frame each),
    the rest is text. Returns (input_ids [B, T] int32, multimodal positions [3, B, T] int32, image_grid_thw
    [B · images_per_row, 3])."""
    v = cfg.vision
    if v is None:
        raise ValueError("a batch with images needs a model with a vision tower: this config has no vision_config")
    unit = v.patch_size * v.spatial_merge_size
    if image_size <= 0 or image_size % unit:
        raise ValueError(f"image_size={image_size}: must be a positive multiple of patch_size x spatial_merge_size "
                         f"= {unit} pixels (the processor resizes to one)")
    side = image_size // v.patch_size
    pads = side * side // v.spatial_merge_size ** 2
    text = 8  # a few text tokens before the first image
    need = text + images_per_row * (pads + 2)
    if images_per_row < 1 or need > seq:
        raise ValueError(f"{images_per_row} image(s) of {image_size}x{image_size} pixels take {pads} pad tokens "
                         f"each, plus start and end tokens: a row needs at least {need} tokens, seq={seq}")
    row = [1] * text
    for _ in range(images_per_row):
        row += [cfg.vision_start_token_id] + [cfg.image_token_id] * pads + [cfg.vision_end_token_id]
    row += [1] * (seq - len(row))
    ids = np.tile(np.asarray(row, np.int32), (batch, 1))
    grid = np.tile(np.array([[1, side, side]], np.int64), (batch * images_per_row, 1))
    mask = np.ones_like(ids)
    positions, _ = vision_positions(cfg, ids, mask, VisionInputs(None, grid, None, None))
    return ids, positions.astype(np.int32), grid


def compile_multimodal_forward(cfg: Qwen35Config, topology: str, *, mesh: str | None = None, batch: int = 1,
                               seq: int = 2048, image_size: int = 448, images_per_row: int = 1,
                               dtype: Any = jnp.bfloat16, logits_to_keep: int = 0,
                               kernels: Kernels | Mapping[str, str] | None = None,
                               rules: ShardingRules | None = None):
    """The compiled forward with images, for `topology`: vision tower, features into the image pad tokens, text
    model, logits (of the last `logits_to_keep` positions if > 0). The batch is `image_batch`'s; its
    image_grid_thw is static (host ints, closed over), so the program is for that image batch shape alone.
    Pixels come as the processor gives them, fp32 [patches, C·T·P·P], replicated; tokens and positions are
    split over the batch axes."""
    mesh_, rules, graphdef, params = _abstract(cfg, topology, mesh, dtype, kernels, rules)
    _, _, grid = image_batch(cfg, batch=batch, seq=seq, image_size=image_size, images_per_row=images_per_row)
    patches = int(np.prod(grid, axis=1).sum())
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rules.sharding(mesh_, ("batch", None),
                                                                                 (batch, seq)))
    positions = jax.ShapeDtypeStruct((3, batch, seq), jnp.int32,
                                     sharding=rules.sharding(mesh_, (None, "batch", None), (3, batch, seq)))
    pixels = jax.ShapeDtypeStruct((patches, cfg.vision.patch_dim), jnp.float32,
                                  sharding=rules.sharding(mesh_, (None, None)))

    def forward(params, ids, positions, pixels):
        return nnx.merge(graphdef, params)(ids, positions=positions, logits_to_keep=logits_to_keep,
                                           vision=VisionInputs(pixels, grid, None, None))

    with activation_sharding(mesh_, rules):
        lowered = jax.jit(forward).lower(params, ids, positions, pixels)
    return lowered.compile()


def compile_decode_step(cfg: Qwen35Config, topology: str, *, mesh: str | None = None, batch: int = 1,
                        max_len: int = 4096, dtype: Any = jnp.bfloat16,
                        kernels: Kernels | Mapping[str, str] | None = None, rules: ShardingRules | None = None):
    """The compiled greedy decode step, as `qwenjax.generate` runs it (one token per row appended to a cache of
    `max_len` slots per row, the next tokens chosen), for `topology`."""
    from qwenjax.model.cache import cache_shardings, init_cache

    mesh_, rules, graphdef, params = _abstract(cfg, topology, mesh, dtype, kernels, rules)
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache,
                         cache_shardings(cache, mesh_, rules))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rules.sharding(mesh_, ("batch",), (batch,)))

    def step(params, cache, tokens):
        logits, cache = nnx.merge(graphdef, params).extend(tokens[:, None], cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    with activation_sharding(mesh_, rules):
        lowered = jax.jit(step, donate_argnums=1).lower(params, cache, tokens)
    return lowered.compile()


# Entry instructions that launch nothing: they name, pack or alias buffers.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all",
              "partition-id", "replica-id", "add-dependency"}


def kernel_launches(compiled) -> dict[str, int]:
    """What a compiled program launches per run, by kind: the instructions of its entry computation that do work on
    the device (fusions, library calls such as cuBLAS or Mosaic kernels, copies, ...), counted by opcode (a
    fusion by its kind, a custom call by its target). A loop counts once, as `while`: its body runs per trip."""
    import collections
    import re

    text = compiled.as_text()
    entry = text[text.index("\nENTRY "):]
    entry = entry[:entry.index("\n}")]
    # what tells them apart: a fusion's kind, then for a custom fusion (GPU) what its backend made of it (a Triton
    # GEMM, a Triton elementwise or reduction kernel, a dynamic-slice fusion around a library or Mosaic call, ...)
    detail = {"fusion": r"kind=(\w+)", "custom-call": r'custom_call_target="([^"]+)"'}
    custom_fusion = r'"fusion_backend_config":\{"kind":"_*([^"]+)"(?:,"custom_fusion_config":\{"name":"([^"]+)")?'
    counts: collections.Counter = collections.Counter()
    for line in entry.splitlines()[1:]:
        m = re.search(r"= (?:\S+|\([^=]*\)) ([\w-]+)\(", line)  # "= shape opcode(" or "= (tuple shape) opcode("
        if m is None or m.group(1) in _NO_LAUNCH:
            continue
        kind = m.group(1)
        sub = re.search(detail[kind], line) if kind in detail else None
        name = f"{kind}:{sub.group(1)}" if sub else kind
        if name == "fusion:kCustom" and (backend := re.search(custom_fusion, line)):
            name += ":" + (backend.group(2) or backend.group(1))
        counts[name] += 1
    return dict(counts)


def summary(compiled) -> dict[str, float]:
    """Memory per device (bytes) and XLA's cost estimates of a compiled program."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older JAX
    return {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    }
