"""Loading streams tensor by tensor: peak host memory stays near one copy of the model, not two."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qwenjax.testing import make_hf_checkpoint  # noqa: E402

# A loader that materialised the checkpoint on the host before placing it would peak at ~2x the checkpoint.
MAX_GROWTH = 1.4  # measured 1.22x: the model, plus the largest tensor in flight (the embedding, 0.21x)


def test_peak_memory_of_loading_stays_near_model_size(tmp_path):
    make_hf_checkpoint(tmp_path, randomize=False, vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       linear_num_key_heads=8, linear_num_value_heads=8, linear_key_head_dim=64,
                       linear_value_head_dim=64)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size > 400e6
    script = textwrap.dedent(f"""
        import resource, jax, qwenjax
        jax.numpy.ones(1).block_until_ready()
        def peak():  # VmHWM: peak resident set, in bytes
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        before = peak()
        m = qwenjax.from_pretrained({str(tmp_path)!r}, dtype="float32")
        jax.block_until_ready(m.params)
        print(peak() - before)
    """)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {growth / size:.2f}x the checkpoint")
    assert growth < MAX_GROWTH * size, f"loading {size / 1e6:.0f} MB grew peak RSS by {growth / 1e6:.0f} MB"
