"""Typed Qwen3.5 configuration, read from a Hugging Face `config.json` and validated.

Both checkpoint layouts are accepted:
- multimodal (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`): text settings live under
  `text_config`, vision settings under `vision_config` (`Qwen35Config.vision`, a `VisionConfig`);
- text-only (`Qwen3_5ForCausalLM`, `Qwen3_5MoeForCausalLM`): text settings at the top level.

Every check names the offending field, so a bad config fails at load time, not deep inside a traced forward.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from qwenjax.validate import InputError, check, check_fields, check_range, read_json_object

# The configs/ files shipped with the package (qwenjax/configs links the repository's configs/ in a checkout).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
_LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)


class ConfigError(InputError):
    """A config.json (or a field passed in code) that cannot describe a Qwen3.5 model."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension (`rope_parameters.rope_type: "yarn"`): Qwen3.5's documented way past its trained
    length. Field names and defaults are transformers' (`_compute_yarn_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: from factor (and mscale / mscale_all_dim when both are set)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        check_fields(self, "config field", ConfigError, field_name=lambda f: f"`rope_parameters.{f}`")
        for f in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            if not getattr(self, f) > 0:
                raise ConfigError(f"config field `rope_parameters.{f}`: must be positive, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class Qwen35Config:
    """The text model's settings (dense and MoE), plus what a round trip to Hugging Face needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    # RoPE: partial rotary over the first `head_dim * partial_rotary_factor` dims, frequencies interleaved
    # between the temporal/height/width position streams by `mrope_section` (text uses one stream for all three).
    rope_type: str = "default"            # "default" or "yarn" (then `yarn` holds its settings)
    yarn: YarnScaling | None = None
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    mrope_interleaved: bool = True
    # MoE (num_experts == 0: dense). Parsed now so configs/ can describe every released size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    # Multi-token prediction head layers (`mtp.*` tensors).
    mtp_num_hidden_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Where the config came from: "multimodal" (text under text_config) or "text". Exports write the same layout.
    layout: str = "text"
    model_type: str = "qwen3_5_text"
    # The vision tower and the placeholder token ids of a multimodal checkpoint (None: text only).
    vision: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self):
        if not self.layer_types and isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """The shortest prefix of `layer_types` whose repetition gives all layers (the scanned block)."""
        n = len(self.layer_types)
        for p in range(1, n + 1):
            if n % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(n)):
                return self.layer_types[:p]
        raise AssertionError("unreachable: p == n always matches")

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // len(self.block_pattern)

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"config field `{field}`: {msg}")

        # Types first (a string where a number belongs is an error, never coerced), then values.
        check_fields(self, "config field", ConfigError,
                     field_name=lambda f: f"`rope_parameters.{f}`" if f in _ROPE_FIELDS else f"`{f}`")
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                  "linear_value_head_dim", "linear_conv_kernel_dim", "max_position_embeddings"):
            v = getattr(self, f)
            need(v > 0, f, f"must be a positive integer, got {v!r}")
        for f in ("bos_token_id", "pad_token_id"):
            v = getattr(self, f)
            need(v is None or v >= 0, f, f"must be a token id >= 0, got {v}")
        eos = (self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id or ()
        need(all(i >= 0 for i in eos), "eos_token_id", f"must be token ids >= 0, got {self.eos_token_id}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} is not a multiple of "
             f"num_key_value_heads={self.num_key_value_heads}")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
             f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
             f"linear_num_key_heads={self.linear_num_key_heads} (each value head reads one key head)")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            need(t in _LAYER_TYPES, f"layer_types[{i}]", f"{t!r} is not one of {_LAYER_TYPES}")
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is used by Qwen3.5, got {self.hidden_act!r}")
        need(self.rope_type in ("default", "yarn"), "rope_parameters.rope_type",
             f"{self.rope_type!r} is not supported (only 'default' and 'yarn'); refusing rather than ignoring it")
        need((self.rope_type == "yarn") == (self.yarn is not None), "rope_parameters",
             f"rope_type {self.rope_type!r} with yarn settings {self.yarn}")
        need(self.rope_theta > 0, "rope_parameters.rope_theta", f"must be positive, got {self.rope_theta}")
        need(0.0 < self.partial_rotary_factor <= 1.0, "rope_parameters.partial_rotary_factor",
             f"must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0, "rope_parameters.partial_rotary_factor",
             f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even")
        need(all(s >= 0 for s in self.mrope_section), "rope_parameters.mrope_section",
             f"{list(self.mrope_section)} must be 3 non-negative ints")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.is_moe:
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive for an MoE model")
            need(self.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size",
                 "must be positive for a Qwen3.5-MoE model (every layer has a gated shared expert)")
        else:
            need(self.intermediate_size > 0, "intermediate_size", f"must be positive, got {self.intermediate_size}")
        need(self.layout in ("text", "multimodal"), "layout", f"unknown layout {self.layout!r}")

    def replace(self, **changes) -> "Qwen35Config":
        return dataclasses.replace(self, **changes)


def default_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
    """Qwen3.5's pattern: every `full_attention_interval`-th layer is full attention, the rest Gated DeltaNet."""
    return tuple(FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION
                 for i in range(num_layers))


_ROPE_FIELDS = ("rope_type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved", "yarn")
_FIELDS = {f.name for f in dataclasses.fields(Qwen35Config)}
_REQUIRED = {f.name for f in dataclasses.fields(Qwen35Config)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
_MULTIMODAL_ARCHS = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


def config_from_dict(d: dict[str, Any]) -> Qwen35Config:
    """Builds a config from a parsed config.json (either layout)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    archs = check(d.get("architectures") or [], list[str], "config field `architectures`", ConfigError)
    multimodal = "text_config" in d or any(a in _MULTIMODAL_ARCHS for a in archs)
    if multimodal:
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config field `text_config`: required for a multimodal Qwen3.5 config")
        # The top-level flag is what transformers ties by for the composite model.
        tie = check(d["tie_word_embeddings"], bool, "config field `tie_word_embeddings`", ConfigError) \
            if "tie_word_embeddings" in d else text.get("tie_word_embeddings", False)
        field_prefix = "text_config."
    else:
        text = d
        tie = d.get("tie_word_embeddings", False)
        field_prefix = ""

    kw: dict[str, Any] = {k: v for k, v in text.items() if k in _FIELDS}
    kw["tie_word_embeddings"] = tie
    kw["layout"] = "multimodal" if multimodal else "text"
    kw["model_type"] = d.get("model_type", text.get("model_type", "qwen3_5_text"))
    if multimodal:
        kw["vision"] = vision_config_from_dict(d.get("vision_config") or {})
        kw.update({k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id") if k in d})

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config field `{field_prefix}rope_parameters`: must be an object, got {rope!r}")
    kw["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if kw["rope_type"] == "yarn":
        kw["yarn"] = _yarn_from_dict(rope, text.get("max_position_embeddings"), field_prefix)
    kw["rope_theta"] = rope.get("rope_theta", text.get("rope_theta", 10_000_000.0))
    kw["partial_rotary_factor"] = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    kw["mrope_section"] = rope.get("mrope_section", (11, 11, 10))
    kw["mrope_interleaved"] = rope.get("mrope_interleaved", True)
    if "layer_types" not in text or text["layer_types"] is None:
        n = text.get("num_hidden_layers")
        interval = check(text.get("full_attention_interval", 4), int,
                         f"config field `{field_prefix}full_attention_interval`", ConfigError)
        if interval < 1:
            raise ConfigError(f"config field `{field_prefix}full_attention_interval`: must be >= 1, got {interval}")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            kw["layer_types"] = default_layer_types(n, interval)
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if "head_dim" not in text and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                      for v in (hidden, heads)):
        kw["head_dim"] = hidden // heads
    # MoE checkpoints have no dense FFN width; keep the field meaningful for dense ones only.
    if "intermediate_size" not in kw and kw.get("num_experts"):
        kw["intermediate_size"] = 0

    missing = sorted(_REQUIRED - kw.keys())
    if missing:
        raise ConfigError(f"config is missing required field(s) {', '.join(field_prefix + m for m in missing)}")
    try:
        return Qwen35Config(**kw)
    except ConfigError as e:
        if field_prefix:
            raise ConfigError(str(e).replace("config field `", f"config field `{field_prefix}", 1)) from None
        raise


def _yarn_from_dict(rope: dict, max_position_embeddings: Any, field_prefix: str) -> YarnScaling:
    """The YaRN settings of a `rope_parameters` object, with transformers' fallbacks: a missing factor is
    max_position_embeddings / original_max_position_embeddings; a missing (or 0) beta is 32 / 1."""
    kw = {f.name: rope[f.name] for f in dataclasses.fields(YarnScaling) if rope.get(f.name) is not None}
    if "original_max_position_embeddings" not in kw:
        raise ConfigError(f"config field `{field_prefix}rope_parameters.original_max_position_embeddings`: "
                          "required for rope_type 'yarn'")
    if "factor" not in kw and isinstance(max_position_embeddings, int):
        kw["factor"] = max_position_embeddings / kw["original_max_position_embeddings"]
    kw.update({b: d for b, d in (("beta_fast", 32.0), ("beta_slow", 1.0)) if not rope.get(b)})
    try:
        return YarnScaling(**kw)
    except TypeError:
        raise ConfigError(f"config field `{field_prefix}rope_parameters.factor`: required for rope_type 'yarn'") \
            from None
    except ConfigError as e:
        raise ConfigError(str(e).replace("config field `", f"config field `{field_prefix}", 1)) from None


def resolve_config(name: str | os.PathLike) -> str:
    """The path of a config file: `name` itself if it exists, else the package's configs/ file of that name
    (e.g. "qwen3.5-9b" or "tiny")."""
    name = os.fspath(name)
    if os.path.exists(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".json") else name + ".json")
    if os.path.isfile(candidate):
        return candidate
    known = sorted(f.removesuffix(".json") for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))
    raise FileNotFoundError(f"no config {name!r} (a path, or one of: {', '.join(known)})")


def load_config(path: str | os.PathLike) -> Qwen35Config:
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {file!r}")
    d = read_json_object(file, ConfigError)
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def config_to_hf_dict(cfg: Qwen35Config) -> dict[str, Any]:
    """The text config as transformers writes it (used for configs/ files, tests and exports)."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            "mrope_section": list(cfg.mrope_section), "mrope_interleaved": cfg.mrope_interleaved,
            **({} if cfg.yarn is None else {k: v for k, v in dataclasses.asdict(cfg.yarn).items() if v is not None})}
    text = {
        "model_type": "qwen3_5_moe_text" if cfg.is_moe else "qwen3_5_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads, "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim, "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "layer_types": list(cfg.layer_types), "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": cfg.hidden_act,
        "attention_bias": cfg.attention_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": rope,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    }
    if cfg.is_moe:
        text.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                    moe_intermediate_size=cfg.moe_intermediate_size,
                    shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                    router_aux_loss_coef=cfg.router_aux_loss_coef)
    else:
        text["intermediate_size"] = cfg.intermediate_size
    if cfg.mtp_num_hidden_layers:
        text["mtp_num_hidden_layers"] = cfg.mtp_num_hidden_layers
    return text


def hf_config_file(cfg: Qwen35Config, dtype: str) -> dict[str, Any]:
    """config.json as transformers' `save_pretrained` writes it for this model: the composite
    `Qwen3_5(Moe)ForConditionalGeneration` with a vision tower, else `Qwen3_5(Moe)ForCausalLM`."""
    kind = "Qwen3_5Moe" if cfg.is_moe else "Qwen3_5"
    text = config_to_hf_dict(cfg)
    if cfg.vision is None:
        return {"architectures": [f"{kind}ForCausalLM"], **text, "dtype": dtype}
    v = dataclasses.asdict(cfg.vision)
    vision = {"model_type": "qwen3_5_moe_vision" if cfg.is_moe else "qwen3_5_vision",
              **{k: x for k, x in v.items() if k not in _VISION_ROPE_FIELDS},
              "rope_parameters": {"rope_type": cfg.vision.rope_type, "rope_theta": cfg.vision.rope_theta}}
    return {"architectures": [f"{kind}ForConditionalGeneration"],
            "model_type": "qwen3_5_moe" if cfg.is_moe else "qwen3_5", "text_config": text, "vision_config": vision,
            "tie_word_embeddings": cfg.tie_word_embeddings, "image_token_id": cfg.image_token_id,
            "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "dtype": dtype}


# ---- vision tower --------------------------------------------------------------------------------------------------
# The block MLP activations the vision tower implements (`qwenjax.model.vision.ACTIVATIONS`), by transformers' name.
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
_VISION_ROPE_FIELDS = ("rope_type", "rope_theta")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower's settings (`vision_config` of a multimodal checkpoint); defaults as transformers'
    `Qwen3_5VisionConfig`. Only what changes the computation is kept (not `initializer_range`)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304  # a square table: 48 x 48 learned positions
    # 2-D ("axial") rotary of the attention; transformers keeps these in `rope_parameters`.
    rope_type: str = "axial"
    rope_theta: float = 10_000.0

    def __post_init__(self):
        check_fields(self, "config field", ConfigError,
                     field_name=lambda f: f"`vision_config.rope_parameters.{f}`" if f in _VISION_ROPE_FIELDS
                     else f"`vision_config.{f}`")

        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"config field `vision_config.{field}`: {msg}")

        for f in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings"):
            v = getattr(self, f)
            need(v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.hidden_size % self.num_heads == 0, "num_heads",
             f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        # The rotary splits each head in two halves (rotate-half), each half in an h part and a w part.
        need(self.head_dim % 4 == 0, "num_heads",
             f"head_dim = hidden_size / num_heads = {self.head_dim} must be a multiple of 4 (2-D rotary)")
        need(self.num_grid_per_side ** 2 == self.num_position_embeddings, "num_position_embeddings",
             f"must be a perfect square (a square grid of learned positions), got {self.num_position_embeddings}")
        need(self.hidden_act in VISION_ACTIVATIONS, "hidden_act",
             f"{self.hidden_act!r} is not one of {VISION_ACTIVATIONS}")
        need(self.rope_type == "axial", "rope_parameters.rope_type",
             f"only 'axial' (2-D) rotary is used by the vision tower, got {self.rope_type!r}")
        need(self.rope_theta > 0, "rope_parameters.rope_theta", f"must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_hidden_size(self) -> int:
        """The merger's input: the spatial_merge_size^2 patches of one merge block, concatenated."""
        return self.hidden_size * self.spatial_merge_size ** 2


_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)}


def vision_config_from_dict(d: dict[str, Any]) -> VisionConfig:
    """The vision tower's config from the raw `vision_config` dict of a config.json (fields it lacks take
    transformers' defaults; fields that do not change the computation are ignored)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config field `vision_config`: must be an object, got {type(d).__name__}")
    kw: dict[str, Any] = {k: v for k, v in d.items() if k in _VISION_FIELDS}
    # As transformers reads them: `rope_parameters` (or the older `rope_scaling`) first, then a top-level
    # `rope_theta`; rope_type "default" means the model's default, axial.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config field `vision_config.rope_parameters`: must be an object, got {rope!r}")
    kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10_000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_type"] = "axial" if rope_type == "default" else rope_type
    cfg = VisionConfig(**kw)
    # transformers sizes the rotary by a `head_dim` attribute when one is present, the attention always by
    # hidden_size / num_heads: the two must agree.
    if d.get("head_dim") not in (None, cfg.head_dim):
        raise ConfigError(f"config field `vision_config.head_dim`: must equal hidden_size / num_heads = "
                          f"{cfg.head_dim}, got {d['head_dim']!r}")
    return cfg


# generation_config.json: the fields qwenjax reads, with their types and ranges; the others pass through unread.
GENERATION_FIELDS: dict[str, tuple[Any, dict]] = {
    "do_sample": (bool, {}),
    "temperature": (float, {"minimum": 0}),
    "top_k": (int, {"minimum": 0}),
    "top_p": (float, {"above": 0, "maximum": 1}),
    "min_p": (float | None, {"minimum": 0, "maximum": 1}),
    "max_new_tokens": (int | None, {"minimum": 1}),
    "eos_token_id": (int | list[int] | None, {}),
    "bos_token_id": (int | None, {}),
    "pad_token_id": (int | None, {}),
}


def load_generation_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint directory's generation_config.json ({} without one), its known fields type-checked."""
    file = os.path.join(os.fspath(path), "generation_config.json")
    if not os.path.isfile(file):
        return {}
    gen = read_json_object(file, ConfigError)
    for name, (kind, bounds) in GENERATION_FIELDS.items():
        if name in gen:
            gen[name] = check(gen[name], kind, f"{file} field `{name}`", ConfigError)
            if gen[name] is not None and bounds:
                check_range(gen[name], f"{file} field `{name}`", error=ConfigError, **bounds)
    return gen
