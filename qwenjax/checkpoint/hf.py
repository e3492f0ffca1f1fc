"""Loading Hugging Face Qwen3.5 checkpoints (local directories) into sharded qwenjax parameters.

Keys map 1:1 onto the NNX module tree (see `qwenjax.model.qwen35`), after the text prefix; MoE experts are read from
either layout found in the wild (stacked `mlp.experts.gate_up_proj`, or one tensor per expert and projection,
see `per_expert_parts`). Tensors are read through memory maps and placed shard by shard with
`jax.make_array_from_callback`, so host memory peaks near one parameter, not the model (and each host of a
multi-host mesh reads only the shards it holds). Every problem (missing, unexpected, mis-shaped tensors) is found
before any tensor is read and reported together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwenjax import _compat
from qwenjax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, TensorInfo
from qwenjax.config import Qwen35Config
from qwenjax.sharding import ShardingRules, param_shardings
from qwenjax.validate import InputError, read_json

TEXT_PREFIXES = ("model.language_model.", "model.", "")
LAYOUT_PREFIXES = {"multimodal": "model.language_model.", "text": "model."}  # what save_pretrained writes
VISUAL_PREFIX = "model.visual."  # the vision tower's tensors (module path `visual.*`)
MTP_PREFIX = "mtp."  # the multi-token-prediction head's (module path `mtp.*`), outside any text prefix
# Tensors of parts a model was built without (a text-only config's tower, MTP layers its config does not count):
# kept (by reference) for export, never silently dropped.
ASIDE_PREFIXES = (VISUAL_PREFIX, MTP_PREFIX)
LOADABLE_DTYPES = ("BF16", "F16", "F32")


class CheckpointError(InputError):
    """A checkpoint whose tensors do not fit the model its config describes."""


@dataclass
class CheckpointIndex:
    """Tensor name -> the safetensors file that holds it, for a single-file or sharded checkpoint."""

    path: str
    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> file name

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CheckpointIndex":
        path = os.fspath(path)
        idx = cls(path)
        index_file = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_file):
            weight_map = _read_weight_map(index_file)
            for fname in sorted(set(weight_map.values())):
                _check_inside(path, fname, f"{index_file} lists shard")
                if not os.path.isfile(os.path.join(path, fname)):
                    raise CheckpointError(f"{index_file} lists shard {fname!r}, which does not exist")
                idx.files[fname] = _open(os.path.join(path, fname))
            for name, fname in weight_map.items():
                if name not in idx.files[fname].keys():
                    raise CheckpointError(f"{index_file} puts {name!r} in {fname!r}, which does not contain it")
                idx.where[name] = fname
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            _check_inside(path, "model.safetensors", "the checkpoint file")
            idx.files["model.safetensors"] = _open(os.path.join(path, "model.safetensors"))
            idx.where = {k: "model.safetensors" for k in idx.files["model.safetensors"].keys()}
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return idx

    def info(self, name: str) -> TensorInfo:
        return self.files[self.where[name]].info(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    def release(self, name: str) -> None:
        self.files[self.where[name]].release(name)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def has_mtp_tensors(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory holds any `mtp.*` tensor (transformers' save_pretrained drops them)."""
    index = CheckpointIndex.open(path)
    try:
        return any(k.startswith(MTP_PREFIX) for k in index.where)
    finally:
        index.close()


def _check_inside(directory: str, name: str, what: str) -> None:
    """Refuses file `name` of a checkpoint directory unless it lies inside the directory, links resolved. A Hugging
    Face hub cache snapshot (`models--*/snapshots/<rev>/`) links its files to the repository's `blobs/`, which
    counts as inside."""
    root = os.path.realpath(directory)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    full = os.path.realpath(os.path.join(root, name))
    if not any(full != base and os.path.commonpath([base, full]) == base for base in allowed):
        raise CheckpointError(f"{what} {name!r}, which is outside the checkpoint directory {root}: refused")


def _read_weight_map(index_file: str) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: tensor name -> shard file name, both strings."""
    index = read_json(index_file, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: no `weight_map` object")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{index_file}: `weight_map` entry {bad[0]!r} is {bad[1]!r}, not a file name")
    return weight_map


def _open(path: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def text_prefix(keys) -> str:
    """The key prefix of the text model's tensors ("model.language_model.", "model.", ""), found by the
    embedding among a checkpoint's tensor names `keys`."""
    for p in TEXT_PREFIXES:
        if f"{p}embed_tokens.weight" in keys:
            return p
    raise CheckpointError("checkpoint has no embedding tensor; looked for "
                          + ", ".join(f"{p}embed_tokens.weight" for p in TEXT_PREFIXES))


def hf_key(path: tuple, prefix: str) -> str:
    """The checkpoint key of the parameter at this module path, e.g. ("layers", 3, "mlp", "up_proj", "weight")."""
    if path[0] == "lm_head":
        return "lm_head." + ".".join(map(str, path[1:]))
    if path[0] == "visual":
        return VISUAL_PREFIX + ".".join(map(str, path[1:]))
    if path[0] == "mtp":
        return MTP_PREFIX + ".".join(map(str, path[1:]))
    return prefix + ".".join(map(str, path))


def per_expert_parts(key: str, shape) -> list[tuple[str, int, slice]] | None:
    """The per-expert layout of a stacked expert parameter, as (key, expert, rows of that expert's slab):
    `…mlp.experts.gate_up_proj` [E, 2I, H] is each expert's `gate_proj.weight` (rows :I) and `up_proj.weight`
    (rows I:); `…mlp.experts.down_proj` [E, H, I] is each expert's `down_proj.weight`. None for other keys."""
    base, _, name = key.rpartition(".")
    if not base.endswith("mlp.experts") or len(shape) != 3:
        return None
    if name == "gate_up_proj":
        i = shape[1] // 2
        return [(f"{base}.{e}.{proj}.weight", e, slice(j * i, (j + 1) * i))
                for e in range(shape[0]) for j, proj in enumerate(("gate_proj", "up_proj"))]
    if name == "down_proj":
        return [(f"{base}.{e}.down_proj.weight", e, slice(0, shape[1])) for e in range(shape[0])]
    return None


def stored_per_expert(key: str, shape, keys) -> list[tuple[str, int, slice]] | None:
    """The parts of `key` when the checkpoint whose tensor names are `keys` stores it per expert, else None."""
    parts = per_expert_parts(key, shape)
    return parts if parts and key not in keys and parts[0][0] in keys else None


@dataclass
class LoadedCheckpoint:
    params: nnx.State
    aside: dict[str, str]  # tensor name -> file path, for tensors kept but not modelled (visual, mtp)
    prefix: str


def load_params(path: str | os.PathLike, cfg: Qwen35Config, abstract_state: nnx.State, mesh: Mesh,
                rules: ShardingRules) -> LoadedCheckpoint:
    """Reads a checkpoint directory into a State shaped like `abstract_state` (dtypes taken from it)."""
    index = CheckpointIndex.open(path)
    try:
        prefix = text_prefix(index.where)
        plan, problems, expected = {}, [], set()
        for var_path, var in _compat.variable_items(abstract_state):
            k = hf_key(var_path, prefix)
            want = tuple(_compat.variable_value(var).shape)
            parts = stored_per_expert(k, want, index.where)
            if parts:
                plan[var_path] = parts
                for part, _, rows in parts:
                    expected.add(part)
                    part_shape = (rows.stop - rows.start, want[2])
                    if part not in index.where:
                        problems.append(f"missing tensor {part!r} (expected shape {list(part_shape)}; the "
                                        f"checkpoint stores {k.rpartition('.')[0]} per expert)")
                    elif index.info(part).shape != part_shape:
                        problems.append(f"tensor {part!r} has shape {list(index.info(part).shape)}, "
                                        f"expected {list(part_shape)}")
                    elif index.info(part).dtype not in LOADABLE_DTYPES:
                        problems.append(f"tensor {part!r} has dtype {index.info(part).dtype}; loadable: "
                                        f"{', '.join(LOADABLE_DTYPES)}")
                continue
            expected.add(k)
            plan[var_path] = k
            if k not in index.where:
                problems.append(f"missing tensor {k!r} (expected shape {list(want)})")
                continue
            info = index.info(k)
            if info.shape != want:
                problems.append(f"tensor {k!r} has shape {list(info.shape)}, expected {list(want)}")
            if info.dtype not in LOADABLE_DTYPES:
                problems.append(f"tensor {k!r} has dtype {info.dtype}; loadable: {', '.join(LOADABLE_DTYPES)}")
        aside = {}
        for k in index.where:
            if k in expected:
                continue
            if k.startswith(ASIDE_PREFIXES) or (k == "lm_head.weight" and cfg.tie_word_embeddings):
                aside[k] = os.path.join(index.path, index.where[k])
            else:
                problems.append(f"unexpected tensor {k!r} with shape {list(index.info(k).shape)}")
        if problems:
            shown = "\n  ".join(problems[:50]) + ("" if len(problems) <= 50 else f"\n  ... {len(problems) - 50} more")
            raise CheckpointError(f"checkpoint {index.path} does not match its config:\n  {shown}")

        shardings = dict(_compat.variable_items(param_shardings(abstract_state, mesh, rules)))

        def read(var_path, var):
            value = _compat.variable_value(var)
            read_one = _read if isinstance(plan[var_path], str) else _read_per_expert
            return read_one(index, plan[var_path], value.shape, np.dtype(value.dtype), shardings[var_path])

        params = _compat.replace_values(abstract_state, read)
        return LoadedCheckpoint(params=params, aside=aside, prefix=prefix)
    finally:
        index.close()


def _aligned_empty(shape, dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array on a 64-byte boundary, which the CPU backend adopts without a copy."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _read(index: CheckpointIndex, key: str, shape, dtype: np.dtype, sharding) -> jax.Array:
    """One parameter as a sharded array; each shard is filled straight from the memory-mapped tensor."""
    def shard(idx):
        src = index.get(key)[idx]
        out = _aligned_empty(src.shape, dtype)
        out[...] = src
        index.release(key)
        return out

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def _read_per_expert(index: CheckpointIndex, parts, shape, dtype: np.dtype, sharding) -> jax.Array:
    """A stacked expert parameter [E, ...] from one tensor per expert (and projection), shard by shard."""
    by_expert: dict[int, list[tuple[str, slice]]] = {}
    for key, e, rows in parts:
        by_expert.setdefault(e, []).append((key, rows))

    def shard(idx):
        experts = range(shape[0])[idx[0]]
        out = _aligned_empty((len(experts), *(len(range(n)[i]) for n, i in zip(shape[1:], idx[1:]))), dtype)
        slab = np.empty(shape[1:], dtype)
        for j, e in enumerate(experts):
            for key, rows in by_expert[e]:
                slab[rows] = index.get(key)
                index.release(key)
            out[j] = slab[idx[1:]]
        return out

    return jax.make_array_from_callback(tuple(shape), sharding, shard)
