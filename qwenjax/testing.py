"""Small random Qwen3.5 checkpoints in the real Hugging Face layout, written by transformers itself.

Tests and benchmarks use these as the oracle's input: the directory that `save_pretrained` writes is what a user
downloads, and the transformers model that wrote it is the reference implementation. Needs the `test` extra
(torch, transformers).
"""

from __future__ import annotations

import math
import os
from typing import Any

TINY_TEXT = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)

TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80)

TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                   num_position_embeddings=16, temporal_patch_size=2, spatial_merge_size=2)


def randomize_(model, seed: int = 0) -> None:
    """Gives every parameter a magnitude that makes logits O(1) and every code path matter.

    transformers' init (std 0.02, zero norms) yields near-constant logits, against which almost any bug passes.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(math.log(0.05), math.log(1.0), generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 1:  # norm weights (zero-centred ones around 0, the gated norm around 1)
                base = 1.0 if name.endswith("linear_attn.norm.weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name:  # also the tied LM head: keep logits O(1-10)
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        # Trained GDN layers read keys that resemble their queries; with independent random q and k, the output
        # S^T q of some tokens nearly cancels and the gated RMSNorm that follows amplifies rounding noise
        # (of the reference too) past any useful tolerance. Correlate k with q, projection and conv alike.
        for name, mod in model.named_modules():
            if name.endswith("linear_attn"):
                kd = mod.key_dim
                for w in (mod.in_proj_qkv.weight, mod.conv1d.weight):
                    w[kd:2 * kd].copy_(0.8 * w[:kd] + 0.2 * w[kd:2 * kd])


def make_hf_checkpoint(path: str | os.PathLike, *, multimodal: bool = False, dtype: str = "float32",
                       seed: int = 0, randomize: bool = True, max_shard_size: str | None = None,
                       fused_experts: bool = False, vision_token_ids: dict[str, int] | None = None,
                       **text_overrides: Any):
    """Writes a random Qwen3.5 checkpoint with `save_pretrained` and returns the transformers model (eval mode).

    `num_experts` among the overrides makes it a Qwen3.5-MoE model (`TINY_MOE` fills the other MoE fields).
    `vision_token_ids` (multimodal) sets `image_token_id`, `video_token_id`, `vision_start_token_id`,
    `vision_end_token_id` (transformers' defaults lie outside a tiny vocabulary). `save_pretrained` stores experts one
    tensor each; `fused_experts` rewrites them in the stacked layout
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) that checkpoints also use.
    """
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    text = {**TINY_TEXT, **text_overrides}
    moe = bool(text.get("num_experts"))
    if moe:
        text = {**TINY_MOE, **text}
        text.pop("intermediate_size")
    kind = "Qwen3_5Moe" if moe else "Qwen3_5"
    if multimodal:
        tie = text.pop("tie_word_embeddings", False)
        config = getattr(tf, f"{kind}Config")(text_config=text, vision_config=TINY_VISION, tie_word_embeddings=tie,
                                              **(vision_token_ids or {}))
        model = getattr(tf, f"{kind}ForConditionalGeneration")(config)
    else:
        model = getattr(tf, f"{kind}ForCausalLM")(getattr(tf, f"{kind}TextConfig")(**text))
    if randomize:
        randomize_(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kwargs)
    if fused_experts:
        fuse_experts_(path)
    return model


# min/max pixels under both the image processor's names and transformers 5's `size` (which the video one reads)
VISION_PROCESSOR = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 64,
                    "max_pixels": 2048, "size": {"shortest_edge": 64, "longest_edge": 2048},
                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def make_vision_checkpoint(path: str | os.PathLike, *, seed: int = 5, **text_overrides: Any):
    """A random multimodal checkpoint (`make_hf_checkpoint`, `TINY_VISION`) that a user could point qwenjax at: a
    byte-level tokenizer that knows the vision tokens (ids 284-287, in a vocabulary of 288) with the chat
    template, and small-patch processor configs (`VISION_PROCESSOR`). Returns the transformers model."""
    import json

    from qwenjax.demo import byte_tokenizer, write_tokenizer
    from qwenjax.inference.processor import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    tok = byte_tokenizer()
    tok.add_special_tokens([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
    ids = dict(image_token_id=tok.token_to_id(IMAGE_PAD), video_token_id=tok.token_to_id(VIDEO_PAD),
               vision_start_token_id=tok.token_to_id(VISION_START), vision_end_token_id=tok.token_to_id(VISION_END))
    hf = make_hf_checkpoint(path, multimodal=True, vision_token_ids=ids, seed=seed,
                            **{"vocab_size": 288, **text_overrides})
    write_tokenizer(path, tok)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        with open(os.path.join(os.fspath(path), name), "w") as f:
            json.dump(VISION_PROCESSOR, f)
    return hf


def hf_mtp_head(text_config, seed: int = 0):
    """A Qwen3.5 MTP head (`mtp.*`, which transformers does not model) assembled from transformers' own modules:
    its zero-centred RMSNorm, `fc` as a bias-free Linear [H, 2H], and one full-attention decoder layer of the
    text config's kind (dense or MoE; eager attention), with parameter names as the checkpoint's keys after
    `mtp.`. Randomised like `randomize_`; eval mode."""
    import copy

    import torch

    moe = bool(getattr(text_config, "num_experts", 0))
    if moe:
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf
        kind = "Qwen3_5Moe"
    else:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
        kind = "Qwen3_5"
    cfg = copy.deepcopy(text_config)
    cfg._attn_implementation = "eager"
    norm = getattr(hf, f"{kind}RMSNorm")
    head = torch.nn.Module()
    head.pre_fc_norm_embedding = norm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    head.pre_fc_norm_hidden = norm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    head.fc = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
    head.layers = torch.nn.ModuleList([getattr(hf, f"{kind}DecoderLayer")(cfg, cfg.layer_types.index("full_attention"))
                                       for _ in range(max(1, getattr(cfg, "mtp_num_hidden_layers", 1)))])
    head.norm = norm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    randomize_(head, seed)
    return head.eval()


def set_mtp_layers_(path: str | os.PathLike, n: int = 1) -> None:
    """Writes `mtp_num_hidden_layers` into a checkpoint's config.json (in `text_config` when there is one), as
    the released configs carry it; transformers' configs drop the field."""
    import json

    file = os.path.join(os.fspath(path), "config.json")
    with open(file) as f:
        config = json.load(f)
    config.get("text_config", config)["mtp_num_hidden_layers"] = n
    with open(file, "w") as f:
        json.dump(config, f, indent=2)


def add_mtp_tensors_(path: str | os.PathLike, head) -> None:
    """Adds `head`'s parameters (`hf_mtp_head`) to a single-file checkpoint as `mtp.*` tensors, and its layer
    count to config.json."""
    from safetensors.torch import load_file, save_file

    set_mtp_layers_(path, len(head.layers))

    file = os.path.join(os.fspath(path), "model.safetensors")
    tensors = load_file(file)
    dtype = tensors[next(iter(tensors))].dtype
    tensors.update({f"mtp.{k}": v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, file, metadata={"format": "pt"})


def fuse_experts_(path: str | os.PathLike) -> None:
    """Rewrites a single-file checkpoint's per-expert tensors as stacked `gate_up_proj` / `down_proj`."""
    import re

    import numpy as np
    from safetensors.numpy import load_file, save_file

    file = os.path.join(os.fspath(path), "model.safetensors")
    tensors = load_file(file)
    experts: dict[str, dict[int, dict[str, Any]]] = {}
    out = {}
    for name, value in tensors.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
        else:
            out[name] = value
    for base, per in experts.items():
        order = sorted(per)
        out[f"{base}.gate_up_proj"] = np.stack([np.concatenate([per[e]["gate_proj"], per[e]["up_proj"]])
                                                for e in order])
        out[f"{base}.down_proj"] = np.stack([per[e]["down_proj"] for e in order])
    save_file(out, file, metadata={"format": "pt"})


def hf_text_model(config: str, dtype: str = "float32", layers: int | None = None, seed: int = 0):
    """A randomly initialised transformers `Qwen3_5ForCausalLM` (eval mode) with the text part of a configs/ file
    (e.g. "qwen3.5-0.8b"); `layers` overrides the depth (the layer types then follow the default 3:1 pattern)."""
    import json

    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from qwenjax.config import resolve_config

    with open(resolve_config(config)) as f:
        raw = json.load(f)
    text = dict(raw.get("text_config", raw))
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if layers:
        text["num_hidden_layers"] = layers
        text.pop("layer_types", None)
    text = {k: v for k, v in text.items() if not k.startswith("_") and k != "architectures"}
    torch.manual_seed(seed)
    return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text)).to(getattr(torch, dtype)).eval()


def paired_models(config: str, dtype: str = "float32", layers: int | None = None, seed: int = 0):
    """(transformers model, qwenjax model) with the same random weights: `hf_text_model`, written with
    `save_pretrained` and loaded by `qwenjax.from_pretrained`, as the benchmarks compare them."""
    import tempfile

    import qwenjax

    hf = hf_text_model(config, dtype, layers, seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        m = qwenjax.from_pretrained(tmp, dtype=dtype)
    return hf, m


def hf_logits(model, input_ids, attention_mask=None):
    """Logits of a transformers model as a float32 numpy array."""
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)))
    return out.logits.float().numpy()


def gradient_errors(got, want) -> tuple[dict[str, float], float]:
    """Relative errors ‖got - want‖ / ‖want‖ per parameter ("layers.0.mlp.gate.weight": ...) and over all of
    them together, for two gradient States of one model."""
    import numpy as np

    from qwenjax import _compat

    per, diff, total = {}, 0.0, 0.0
    for (path, a), (_, b) in zip(_compat.variable_items(got), _compat.variable_items(want)):
        a = np.asarray(_compat.variable_value(a), np.float64)
        b = np.asarray(_compat.variable_value(b), np.float64)
        per[".".join(map(str, path))] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        diff, total = diff + float(np.sum((a - b) ** 2)), total + float(np.sum(b ** 2))
    return per, (diff / max(total, 1e-300)) ** 0.5


def randomize_vision_(model, seed: int = 0) -> None:
    """Gives a transformers vision tower weights under which every parameter matters: LayerNorm gains around 1,
    biases away from 0, learned positions as large as the patch embedding."""
    import re

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"norm\d?\.weight$", name):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_embed.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))


def vision_tower_from_hf(hf, param_dtype: Any = "float32", dtype: Any = None):
    """A qwenjax `VisionTower` holding the weights of transformers' `Qwen3_5VisionModel` `hf`: its state_dict keys
    are the tower's parameter paths (no renaming), shapes equal."""
    import jax.numpy as jnp
    from flax import nnx

    from qwenjax import _compat
    from qwenjax.config import vision_config_from_dict
    from qwenjax.model.vision import VisionTower

    cfg = vision_config_from_dict(hf.config.to_dict())
    tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype),
                                               dtype=None if dtype is None else jnp.dtype(dtype)))
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    state = nnx.state(tower, nnx.Param)
    paths = {".".join(map(str, p)) for p, _ in _compat.variable_items(state)}
    if paths != set(sd):
        raise AssertionError(f"tower paths and transformers' keys differ: {sorted(paths ^ set(sd))[:8]}")

    def value(path, var):
        key, current = ".".join(map(str, path)), _compat.variable_value(var)
        if current.shape != sd[key].shape:
            raise AssertionError(f"{key}: {current.shape} vs transformers' {sd[key].shape}")
        return jnp.asarray(sd[key], current.dtype)

    nnx.update(tower, _compat.replace_values(state, value))
    return tower
