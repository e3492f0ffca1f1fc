"""The public model object: `from_pretrained(path)` / `from_config(cfg)` → a callable `Qwen35`.

A `Qwen35` is an immutable value: the config, the NNX graph definition (which holds the resolved `Kernels`),
the (sharded) parameters, the mesh and its sharding rules, and what a round trip to Hugging Face needs. Calling
it runs the forward under `jax.jit` with explicit shardings (compiled once per input shape) and returns logits.
`m.replace(params=..., graphdef=..., kernels=...)` makes a new value with its own, empty compile cache.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qwenjax.checkpoint.hf import has_mtp_tensors, load_params
from qwenjax.config import Qwen35Config, load_config, load_generation_config
from qwenjax import _compat
from qwenjax.inputs import VisionInputs, token_batch, vision_inputs, vision_positions
from qwenjax.memory import check_fits
from qwenjax.model.qwen35 import NO_MTP, Qwen35ForCausalLM
from qwenjax.ops.kernels import Kernels, resolve_kernels
from qwenjax.ops.platform import platform_of
from qwenjax.sharding import ShardingRules, activation_sharding, make_mesh, param_shardings
from qwenjax.validate import check, check_range

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return jnp.dtype(dtype)


def forward(graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, **kwargs) -> jax.Array:
    """The pure forward: logits for a (graphdef, params) pair. Jit it with the shardings you want."""
    return nnx.merge(graphdef, params)(input_ids, attention_mask=attention_mask, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Qwen35:
    """A Qwen3.5 model ready to run: `m(input_ids, attention_mask=None)` → logits [batch, seq, vocab]."""

    config: Qwen35Config
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: Mesh
    rules: ShardingRules
    aside: Mapping[str, str] = dataclasses.field(default_factory=dict)  # checkpoint tensors kept for export
    source: str | None = None                                            # the checkpoint directory it came from
    generation_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # generation_config.json
    _compile_cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def replace(self, *, kernels: Kernels | Mapping[str, str] | None = None, **changes: Any) -> "Qwen35":
        """A new model with these fields replaced (`params`, `graphdef`, `generation_config`, ...) and its own,
        empty compile cache. `kernels` switches implementations: resolved for this model's devices as
        `from_pretrained` resolves it (unset fields from the environment, else "auto")."""
        new = dataclasses.replace(self, **changes)
        if kernels is not None:
            kernels = resolve_kernels(kernels, _platform(new.mesh))
            new = dataclasses.replace(new, graphdef=with_kernels(new.graphdef, new.params, kernels))
        return new

    @property
    def module(self) -> Qwen35ForCausalLM:
        """The NNX module (params bound), for use inside your own jitted functions."""
        return nnx.merge(self.graphdef, self.params)

    @property
    def kernels(self) -> Kernels:
        """The implementations this model's ops run (resolved; part of the graph definition)."""
        return self.module.kernels

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype (that of the embedding table)."""
        return self.params["embed_tokens"]["weight"][...].dtype

    def compiled(self, key: Hashable, build: Callable[[], Callable]) -> Callable:
        """This model's compiled function for `key`: `build()` (a jitted function) on first use, then the same
        object. The cache belongs to this value; `replace` starts a new one, so a model never runs another's
        program."""
        if key not in self._compile_cache:
            self._compile_cache[key] = build()
        return self._compile_cache[key]

    def __call__(self, input_ids, attention_mask=None, *, logits_to_keep: int = 0, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None) -> jax.Array:
        """Logits [batch, seq, vocab] (or [batch, logits_to_keep, vocab]) in the compute dtype.

        Images and videos come as transformers' processor gives them: `pixel_values` [patches, C·T·P·P] with
        `image_grid_thw` [images, 3] (t, h, w in patches), likewise `pixel_values_videos` / `video_grid_thw`; the
        prompt holds each one's pad tokens (t·h·w / merge² of them) between vision start and end tokens."""
        ids, mask = token_batch(input_ids, attention_mask, vocab_size=self.config.vocab_size)
        check_range(check(logits_to_keep, int, "logits_to_keep"), "logits_to_keep (0 keeps all)", minimum=0)
        vision = vision_inputs(self.config, ids, mask, pixel_values, image_grid_thw, pixel_values_videos,
                               video_grid_thw)
        grids = None if vision is None else (vision.image_grid_thw, vision.video_grid_thw)
        positions = None if vision is None else vision_positions(self.config, ids, mask, vision)[0]

        def build():
            data = self.rules.sharding(self.mesh, ("batch", "seq"), ids.shape)

            def run(p, i, m, pos, pixels, video_pixels):
                v = None if grids is None else VisionInputs(pixels, grids[0], video_pixels, grids[1])
                return forward(self.graphdef, p, i, m, logits_to_keep=logits_to_keep, positions=pos, vision=v)

            return jax.jit(run, in_shardings=(param_shardings(self.params, self.mesh, self.rules), data, data,
                                              None, None, None))

        key = ("forward", ids.shape, logits_to_keep, None if grids is None else tuple(
            None if g is None else g.tobytes() for g in grids))
        fn = self.compiled(key, build)
        pixels = (None, None) if vision is None else (vision.pixel_values, vision.pixel_values_videos)
        with activation_sharding(self.mesh, self.rules):
            return fn(self.params, ids, mask, positions, *pixels)


def mtp_logits(m: Qwen35, input_ids, attention_mask=None) -> jax.Array:
    """The MTP head's logits [batch, seq - 1, vocab] for a text batch: position t holds its prediction of token
    t+2, made from token t+1 and the main model's hidden state at t. Raises ValueError for a model without one
    (`mtp.*` tensors absent from its checkpoint, or `mtp_num_hidden_layers` 0)."""
    if not m.config.mtp_num_hidden_layers:
        raise ValueError(NO_MTP)
    ids, mask = token_batch(input_ids, attention_mask, vocab_size=m.config.vocab_size)
    if ids.shape[1] < 2:
        raise ValueError(f"mtp_logits needs at least 2 tokens a row, got input_ids of shape {list(ids.shape)}")

    def build():
        data = m.rules.sharding(m.mesh, ("batch", "seq"), ids.shape)
        run = lambda p, i, mk: forward(m.graphdef, p, i, mk, mtp=True)[1]
        return jax.jit(run, in_shardings=(param_shardings(m.params, m.mesh, m.rules), data, data))

    fn = m.compiled(("mtp_logits", ids.shape), build)
    with activation_sharding(m.mesh, m.rules):
        return fn(m.params, ids, mask)


def with_mtp_head(m: Qwen35, seed: int = 0, *, replace: bool = False) -> Qwen35:
    """Model `m` (which has no MTP head) with a new, randomly initialised one (`mtp_num_hidden_layers` = 1): to
    train with `TrainConfig(mtp_weight=..., mtp_only=True)` for a checkpoint that shipped without its head. The
    other parameters are `m`'s own arrays. `replace`: a head `m` has is dropped for the new one."""
    kernels, params = m.kernels, m.params
    if m.config.mtp_num_hidden_layers:
        if not replace:
            raise ValueError("this model already has an MTP head (replace=True drops it for a new one)")
        params = nnx.State({k: v for k, v in params.items() if k != "mtp"})
    cfg = dataclasses.replace(m.config, mtp_num_hidden_layers=1)
    graphdef, abstract = abstract_model(cfg, m.dtype, m.dtype, kernels)
    head = jax.jit(lambda: nnx.state(Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(seed), param_dtype=m.dtype, dtype=m.dtype,
                                                       kernels=kernels))["mtp"],
                   out_shardings=param_shardings(abstract, m.mesh, m.rules)["mtp"])()
    params = nnx.merge_state(params, nnx.State({"mtp": head}))
    return dataclasses.replace(m, config=cfg, graphdef=graphdef, params=params)


def with_kernels(graphdef: nnx.GraphDef, params: nnx.State, kernels: Kernels) -> nnx.GraphDef:
    """`graphdef` with every dispatching module's `kernels` attribute set to `kernels` (a resolved setting)."""
    module = nnx.merge(graphdef, params)
    for _, sub in nnx.iter_modules(module):
        if isinstance(getattr(sub, "kernels", None), Kernels):
            sub.kernels = kernels
    return nnx.split(module)[0]


def abstract_model(cfg: Qwen35Config, param_dtype: Any, dtype: Any,
                   kernels: Kernels) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract State: shapes, dtypes and logical axes, nothing allocated) of a model."""
    return nnx.split(nnx.eval_shape(lambda: Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=as_dtype(param_dtype),
                                                              dtype=as_dtype(dtype), kernels=kernels)))


def _check_params_fit(abstract: nnx.State, mesh: Mesh, rules: ShardingRules) -> None:
    shardings = jax.tree.leaves(param_shardings(abstract, mesh, rules))
    check_fits("the parameters", ((".".join(map(str, path)), _compat.variable_value(v), s)
                                  for (path, v), s in zip(_compat.variable_items(abstract), shardings)), mesh)


def _platform(mesh: Mesh) -> str:
    return platform_of(mesh.devices.flat[0])


def _resolve(mesh: Mesh | str | None, rules: ShardingRules | None,
             kernels: Kernels | Mapping[str, str] | None) -> tuple[Mesh, ShardingRules, Kernels]:
    if mesh is None or isinstance(mesh, str):
        mesh = make_mesh(mesh, jax.devices()[:1] if mesh is None else None)
    return mesh, rules or ShardingRules(), resolve_kernels(kernels, _platform(mesh))


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.bfloat16, *, param_dtype: Any = None,
                    mesh: Mesh | str | None = None, rules: ShardingRules | None = None,
                    kernels: Kernels | Mapping[str, str] | None = None) -> Qwen35:
    """Loads a local Hugging Face Qwen3.5 checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: compute dtype (and parameter dtype unless `param_dtype` is given); A_log/dt_bias stay fp32.
      mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor, expert), or a spec like "fsdp=4,tensor=2";
        default: one device.
      kernels: the ops' implementations (`qwenjax.Kernels`); unset fields come from the environment, else
        "auto" for the mesh's platform.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    cfg, generation_config = load_config(path), load_generation_config(path)  # both checked before any weight
    if cfg.mtp_num_hidden_layers and not has_mtp_tensors(path):
        cfg = dataclasses.replace(cfg, mtp_num_hidden_layers=0)  # the MTP head is optional; see `mtp_logits`
    dtype = as_dtype(dtype)
    mesh, rules, kernels = _resolve(mesh, rules, kernels)
    graphdef, abstract = abstract_model(cfg, dtype if param_dtype is None else param_dtype, dtype, kernels)
    _check_params_fit(abstract, mesh, rules)
    loaded = load_params(path, cfg, abstract, mesh, rules)
    return Qwen35(cfg, graphdef, loaded.params, mesh, rules, aside=loaded.aside, source=path,
                  generation_config=generation_config)


def from_config(cfg: Qwen35Config, dtype: Any = jnp.float32, *, param_dtype: Any = None, seed: int = 0,
                mesh: Mesh | str | None = None, rules: ShardingRules | None = None,
                kernels: Kernels | Mapping[str, str] | None = None) -> Qwen35:
    """A randomly initialised model, created directly in its sharded layout (arguments as `from_pretrained`)."""
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    mesh, rules, kernels = _resolve(mesh, rules, kernels)
    graphdef, abstract = abstract_model(cfg, param_dtype, dtype, kernels)
    _check_params_fit(abstract, mesh, rules)
    init = jax.jit(lambda: nnx.state(Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype,
                                                       dtype=dtype, kernels=kernels)),
                   out_shardings=param_shardings(abstract, mesh, rules))
    return Qwen35(cfg, graphdef, init(), mesh, rules)
