"""Config parsing: released sizes, both layouts, and errors that name the bad field."""

import glob
import json
import re

import pytest

from qwenjax.config import ConfigError, VisionConfig, config_from_dict, load_config

RELEASED = {  # name: (layers, hidden, attn heads, kv heads, gdn k heads, gdn v heads, experts, tied)
    "qwen3.5-0.8b": (24, 1024, 8, 2, 16, 16, 0, True),
    "qwen3.5-2b": (24, 2048, 8, 2, 16, 16, 0, True),
    "qwen3.5-4b": (32, 2560, 16, 4, 16, 32, 0, True),
    "qwen3.5-9b": (32, 4096, 16, 4, 16, 32, 0, False),
    "qwen3.5-27b": (64, 5120, 24, 4, 16, 48, 0, False),
    "qwen3.5-35b-a3b": (40, 2048, 16, 2, 16, 32, 256, False),
    "qwen3.5-122b-a10b": (48, 3072, 32, 2, 16, 64, 256, False),
    "qwen3.5-397b-a17b": (60, 4096, 32, 2, 16, 64, 512, False),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs(name):
    c = load_config(f"configs/{name}.json")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.linear_num_key_heads, c.linear_num_value_heads, c.num_experts, c.tie_word_embeddings) == RELEASED[name]
    assert c.vocab_size == 248320 and c.head_dim == 256 and c.rotary_dim == 64
    assert c.block_pattern == ("linear_attention",) * 3 + ("full_attention",)
    assert c.mtp_num_hidden_layers == 1
    # Where the released tower's shape is recorded, the config is the checkpoint's composite one and its tower
    # writes the text width; elsewhere the text layout, so that no default tower is built for a shape run.
    if c.layout == "multimodal":
        assert c.vision.out_hidden_size == c.hidden_size and c.vision.depth == 27
    assert (c.layout == "multimodal") == (name in ("qwen3.5-9b", "qwen3.5-27b")) and (c.vision is None) == (
        c.layout == "text")


def test_every_config_file_parses():
    files = glob.glob("configs/*.json")
    assert len(files) >= 10
    for f in files:
        load_config(f)


def test_released_configs_load_in_transformers():
    transformers = pytest.importorskip("transformers")
    for name in ("qwen3.5-9b", "qwen3.5-27b"):
        d = json.load(open(f"configs/{name}.json"))
        hf = transformers.Qwen3_5Config(**{k: v for k, v in d.items() if k != "architectures"})
        ours = load_config(f"configs/{name}.json")
        assert hf.text_config.layer_types == list(ours.layer_types)
        assert hf.text_config.linear_num_value_heads == ours.linear_num_value_heads
        assert hf.tie_word_embeddings == ours.tie_word_embeddings


def _tiny():
    return json.load(open("configs/tiny.json"))


def test_text_and_multimodal_layouts_agree():
    text = _tiny()
    mm = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
          "tie_word_embeddings": True, "text_config": {k: v for k, v in text.items() if k != "architectures"}}
    a, b = config_from_dict(text), config_from_dict(mm)
    assert a.layout == "text" and b.layout == "multimodal"
    assert b.tie_word_embeddings and not a.tie_word_embeddings  # the top-level flag wins for composite models
    assert a.vision is None and b.vision == VisionConfig()  # no vision_config: transformers' default tower
    assert a.replace(tie_word_embeddings=True, layout="multimodal", model_type="qwen3_5", vision=b.vision) == b


def test_layer_types_default_from_interval():
    d = _tiny()
    del d["layer_types"]
    d["num_hidden_layers"] = 6
    d["full_attention_interval"] = 3
    c = config_from_dict(d)
    assert c.layer_types == ("linear_attention", "linear_attention", "full_attention") * 2
    assert c.num_blocks == 2


@pytest.mark.parametrize("edit, field", [
    ({"linear_num_value_heads": 5}, "linear_num_value_heads"),   # 5 value heads over 2 key heads
    ({"num_key_value_heads": 3}, "num_key_value_heads"),         # 4 query heads over 3 kv heads
    ({"hidden_size": 0}, "hidden_size"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types"),
    ({"layer_types": ["linear_attention"] * 3 + ["sliding_attention"]}, "layer_types[3]"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": "4", "original_max_position_embeddings": 64}},
     "rope_parameters.factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": -2.0, "original_max_position_embeddings": 64}},
     "rope_parameters.factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_impossible_configs_name_the_field(edit, field):
    d = {**_tiny(), **edit}
    with pytest.raises(ConfigError, match=re.escape(f"`{field}`")):
        config_from_dict(d)


def test_multimodal_errors_are_prefixed():
    text = {**_tiny(), "linear_num_value_heads": 3}
    with pytest.raises(ConfigError, match="`text_config.linear_num_value_heads`"):
        config_from_dict({"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": text})


def test_missing_field_and_bad_json(tmp_path):
    d = _tiny()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing required field.*hidden_size"):
        config_from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
