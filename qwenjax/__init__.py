"""qwenjax: Qwen3.5 in JAX — config → params → forward → logits.

    import qwenjax
    m = qwenjax.from_pretrained("path/to/Qwen3.5-0.8B", dtype="bfloat16")
    logits = m(input_ids, attention_mask=mask)   # [batch, seq, vocab]
    new_ids = qwenjax.generate(m, [prompt_ids], max_new_tokens=64)
    batch = qwenjax.load_processor(path)([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                                        {"type": "text", "text": "What is it?"}]}])
    new_ids = qwenjax.generate(m, **batch, max_new_tokens=64)  # images and videos in the prompt
    qwenjax.export_hf(m, "out_dir", params=trained_params)   # back to a Hugging Face directory
"""

from qwenjax.checkpoint.export import export_hf
from qwenjax.config import ConfigError, Qwen35Config, config_from_dict, load_config
from qwenjax.inference.generate import generate, stream
from qwenjax.inference.processor import load_processor
from qwenjax.ops.kernels import Kernels
from qwenjax.pretrained import Qwen35, forward, from_config, from_pretrained, mtp_logits
from qwenjax.sharding import ShardingRules, make_mesh

__all__ = ["export_hf", "ConfigError", "Qwen35Config", "config_from_dict", "load_config", "Kernels", "Qwen35",
           "forward", "from_config", "from_pretrained", "mtp_logits", "generate", "stream", "load_processor",
           "ShardingRules", "make_mesh"]
__version__ = "0.1.0"
