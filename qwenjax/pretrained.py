"""The public model object: `from_pretrained(path)` / `from_config(cfg)` → a callable `Qwen35`.

It holds the config, the NNX graph definition, the (sharded) parameters and the mesh. Calling it runs the
forward under `jax.jit` with explicit shardings (compiled once per input shape) and returns logits.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwenjax.checkpoint.hf import load_params
from qwenjax.config import Qwen35Config, load_config
from qwenjax.model.qwen35 import Qwen35ForCausalLM
from qwenjax.sharding import ShardingRules, activation_sharding, make_mesh, param_shardings

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


class Qwen35:
    """A Qwen3.5 model ready to run: `m(input_ids, attention_mask=None)` → logits [batch, seq, vocab]."""

    def __init__(self, config: Qwen35Config, graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh,
                 rules: ShardingRules, aside: dict[str, str] | None = None, source: str | None = None,
                 generation_config: dict | None = None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.mesh = mesh
        self.rules = rules
        self.aside = dict(aside or {})  # checkpoint tensors kept for export (model.visual.*, mtp.*)
        self.source = source
        self.generation_config = dict(generation_config or {})  # generation_config.json (eos ids, sampling)
        self._compiled: dict[tuple, Any] = {}

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype (that of the embedding table)."""
        return self.params["embed_tokens"]["weight"][...].dtype

    @property
    def module(self) -> Qwen35ForCausalLM:
        """The NNX module (params bound), for use inside your own jitted functions."""
        return nnx.merge(self.graphdef, self.params)

    def _batch_sharding(self, shape) -> NamedSharding:
        return self.rules.sharding(self.mesh, ("batch", "seq"), shape)

    def __call__(self, input_ids, attention_mask=None, *, logits_to_keep: int = 0) -> jax.Array:
        """Logits [batch, seq, vocab] (or [batch, logits_to_keep, vocab]) in the compute dtype."""
        ids = _check_ids(input_ids, self.config.vocab_size)
        mask = _check_mask(attention_mask, ids.shape)
        key = (ids.shape, logits_to_keep)
        if key not in self._compiled:
            data = self._batch_sharding(ids.shape)
            self._compiled[key] = jax.jit(
                lambda p, i, m: forward(self.graphdef, p, i, m, logits_to_keep=logits_to_keep),
                in_shardings=(param_shardings(self.params, self.mesh, self.rules), data, data))
        with activation_sharding(self.mesh, self.rules):
            return self._compiled[key](self.params, ids, mask)


def _check_ids(input_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq] (or [seq]), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: sequence length 0")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        r, c = bad[0]
        raise ValueError(f"input_ids[{r}, {c}] = {ids[r, c]} is outside the vocabulary [0, {vocab_size}) "
                         f"({len(bad)} such token(s))")
    return ids.astype(np.int32)


def _check_mask(attention_mask, shape) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int32)
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {tuple(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    return mask.astype(np.int32)


def _abstract(cfg: Qwen35Config, param_dtype, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(
        lambda: Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)))


def _resolve(mesh: Mesh | str | None, rules: ShardingRules | None) -> tuple[Mesh, ShardingRules]:
    if mesh is None or isinstance(mesh, str):
        mesh = make_mesh(mesh, jax.devices()[:1] if mesh is None else None)
    return mesh, rules or ShardingRules()


def from_pretrained(path: str | os.PathLike, dtype: Any = jnp.bfloat16, *, param_dtype: Any = None,
                    mesh: Mesh | str | None = None, rules: ShardingRules | None = None) -> Qwen35:
    """Loads a local Hugging Face Qwen3.5 checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: compute dtype (and parameter dtype unless `param_dtype` is given); A_log/dt_bias stay fp32.
      mesh: a `jax.sharding.Mesh` with axes (data, fsdp, tensor, expert), or a spec like "fsdp=4,tensor=2";
        default: one device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    cfg = load_config(path)
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    mesh, rules = _resolve(mesh, rules)
    graphdef, abstract = _abstract(cfg, param_dtype, dtype)
    loaded = load_params(path, cfg, abstract, mesh, rules)
    gen_file = os.path.join(path, "generation_config.json")
    gen = {}
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            gen = json.load(f)
    return Qwen35(cfg, graphdef, loaded.params, mesh, rules, aside=loaded.aside, source=path, generation_config=gen)


def from_config(cfg: Qwen35Config, dtype: Any = jnp.float32, *, param_dtype: Any = None, seed: int = 0,
                mesh: Mesh | str | None = None, rules: ShardingRules | None = None) -> Qwen35:
    """A randomly initialised model, created directly in its sharded layout."""
    dtype = as_dtype(dtype)
    param_dtype = as_dtype(param_dtype) if param_dtype is not None else dtype
    mesh, rules = _resolve(mesh, rules)
    graphdef, abstract = _abstract(cfg, param_dtype, dtype)
    init = jax.jit(lambda: nnx.state(Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype,
                                                       dtype=dtype)),
                   out_shardings=param_shardings(abstract, mesh, rules))
    return Qwen35(cfg, graphdef, init(), mesh, rules)
