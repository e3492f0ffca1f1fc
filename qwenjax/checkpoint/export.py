"""Export to a Hugging Face checkpoint directory: the inverse of `load_params`.

Every parameter goes back under the key it was loaded from (the source's layout: `model.language_model.*` or
`model.*`; MoE experts stacked or one tensor per expert), in the dtype the source stored it in (or one dtype given
for all). Tensors qwenjax keeps aside (`model.visual.*`, `mtp.*`) are copied from the source files byte for byte.
The side files a user needs to run the result (config, tokenizer, chat template, generation config, processor
configs) are copied too. Large checkpoints are sharded with an index, as `save_pretrained` does. The directory
appears complete or not at all: it is written under a temporary name beside the target and renamed at the end.

Across hosts (a mesh over several processes) every process calls `export_hf`: each parameter is gathered from
all of them, one at a time, and process 0 alone writes, so `out_dir` must be on a filesystem it can reach; the
call returns everywhere once the directory is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qwenjax import _compat
from qwenjax.checkpoint.hf import (LAYOUT_PREFIXES, CheckpointIndex, hf_key, per_expert_parts, stored_per_expert,
                                  text_prefix)
from qwenjax.checkpoint.safetensors_io import DTYPES, save_file
from qwenjax.config import hf_config_file
from qwenjax.validate import check, check_range

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt",
              "preprocessor_config.json", "video_preprocessor_config.json")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3  # save_pretrained's default max_shard_size ("5GB")
STORAGE_DTYPES = {d.name: d for d in (DTYPES["F32"], DTYPES["BF16"], DTYPES["F16"])}


def export_hf(m, out_dir: str | os.PathLike, *, params: nnx.State | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> str:
    """Writes model `m` (or `params` in its architecture: trained, LoRA-merged) as a HF checkpoint directory.

    Returns the directory. With a source checkpoint (`m` from `from_pretrained`), keys, dtypes, kept-aside
    tensors and side files come from it; without one (`from_config`), the layout is what transformers'
    `save_pretrained` writes for `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` (experts one tensor each), and
    only config.json is written.

    `dtype` ("float32", "bfloat16", "float16") is the storage dtype of every parameter tensor written; default:
    the source checkpoint's dtype per tensor, or the parameter's own without a source. config.json's `dtype`
    says what was written. Tensors kept aside are copied byte for byte regardless.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} is a file, not a checkpoint directory: refusing to replace it")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    check_range(check(max_shard_bytes, int, "max_shard_bytes"), "max_shard_bytes", minimum=1)
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    params = m.params if params is None else params
    if jax.process_index() == 0:
        _write(m, out_dir, params, None if dtype is None else STORAGE_DTYPES[dtype], max_shard_bytes)
    else:
        for _ in _param_tensors(params, "", None):  # take part in every gather process 0 makes
            pass
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"qwenjax export_hf {out_dir}")
    return out_dir


def _write(m, out_dir: str, params: nnx.State, storage: np.dtype | None, max_shard_bytes: int) -> None:
    source = CheckpointIndex.open(m.source) if m.source else None
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned(parent, os.path.basename(out_dir))
    # the pid in the name tells a later export whether the process writing it is still alive
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the finished directory private
    try:
        prefix = text_prefix(source.where) if source else LAYOUT_PREFIXES[m.config.layout]
        tensors = itertools.chain(_param_tensors(params, prefix, source, storage),
                                  ((name, source.get(name)) for name in m.aside))  # the source's bytes, untouched
        weight_map, total = _write_shards(tmp, tensors, max_shard_bytes)
        if len(set(weight_map.values())) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        for name in SIDE_FILES:
            if m.source and os.path.isfile(os.path.join(m.source, name)):
                shutil.copy2(os.path.join(m.source, name), os.path.join(tmp, name))
        config_file = os.path.join(tmp, "config.json")
        if not os.path.isfile(config_file):  # as save_pretrained writes it, with the dtype of the weights
            stored = storage if storage is not None else _compat.variable_value(params["embed_tokens"]["weight"]).dtype
            _write_json(config_file, hf_config_file(m.config, stored.name))
        else:
            if storage is not None:
                _set_config_dtype(config_file, storage.name)
            _set_config_mtp(config_file, m.config.mtp_num_hidden_layers)
        if os.path.exists(out_dir):  # overwrite: move the old one away first, so a failure leaves one of them
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-{os.getpid()}-", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    finally:
        if source is not None:
            source.close()
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _remove_abandoned(parent: str, name: str) -> None:
    """Removes the `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` directories that an export killed midway left
    beside its target (their process is gone); those of a live process are its work in progress."""
    for entry in os.listdir(parent):
        kind, _, rest = entry.removeprefix(f".{name}.").partition("-")
        if not entry.startswith(f".{name}.") or kind not in ("tmp", "old"):
            continue
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        logging.getLogger(__name__).warning("removing %s, left by an export that was killed",
                                            os.path.join(parent, entry))
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _set_config_dtype(config_file: str, name: str) -> None:
    """Makes a copied config.json name the dtype the weights were written in (its `dtype`, or the older
    `torch_dtype`, at the top level and in `text_config`), so that transformers loads them as stored."""
    with open(config_file) as f:
        config = json.load(f)
    for section in (config, config.get("text_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section, dict) and key in section:
                section[key] = name
    config.setdefault("dtype", name)
    _write_json(config_file, config)


def _set_config_mtp(config_file: str, layers: int) -> None:
    """Makes a copied config.json count the MTP layers written (a head added to a checkpoint that had none), in
    `text_config` when there is one."""
    with open(config_file) as f:
        config = json.load(f)
    section = config.get("text_config", config)
    if layers and section.get("mtp_num_hidden_layers", 0) != layers:
        section["mtp_num_hidden_layers"] = layers
        _write_json(config_file, config)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _param_tensors(params: nnx.State, prefix: str, source: CheckpointIndex | None,
                   storage: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, whole host array in `storage`, else the source's dtype, else its own) for every
    parameter, one at a time."""
    for path, var in _compat.variable_items(params):
        key = hf_key(path, prefix)
        value = _compat.variable_value(var)
        # an array spread over several processes is gathered from all of them (each must be here to send)
        value = np.asarray(jax.device_get(value) if value.is_fully_addressable
                           else multihost_utils.process_allgather(value, tiled=True))
        parts = per_expert_parts(key, value.shape) if source is None else stored_per_expert(key, value.shape,
                                                                                                source.where)
        for name, piece in ((key, value),) if not parts else ((p, value[e, rows]) for p, e, rows in parts):
            if storage is not None:
                piece = piece.astype(storage)
            elif source is not None and name in source.where:
                piece = piece.astype(DTYPES[source.info(name).dtype])  # the source's storage dtype
            yield name, np.ascontiguousarray(piece)


def _write_shards(out: str, tensors: Iterator[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> tuple[dict[str, str], int]:
    """Writes the tensors into shards of at most max_shard_bytes (one tensor larger than that gets its own);
    returns the weight map and the total bytes. One shard is `model.safetensors`; several are
    `model-0000i-of-0000n.safetensors`."""
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal pending, size
        if pending:
            save_file(os.path.join(out, f"shard-{len(shards)}"), pending, metadata={"format": "pt"})
            shards.append(list(pending))
            pending, size = {}, 0

    for name, value in tensors:
        if pending and size + value.nbytes > max_shard_bytes:
            flush()
        pending[name] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(out, f"shard-{i}"), os.path.join(out, fname))
        weight_map.update(dict.fromkeys(names, fname))
    return weight_map, total

