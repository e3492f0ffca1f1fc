"""Export to a Hugging Face directory: transformers loads it, untrained tensors are byte-identical, sharding, and
the directory is written atomically."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import qwenjax
from qwenjax import _compat
from qwenjax.checkpoint import export as export_mod
from qwenjax.checkpoint.export import export_hf
from qwenjax.checkpoint.hf import CheckpointIndex

torch = pytest.importorskip("torch")
from qwenjax.testing import hf_logits, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A multimodal bf16 checkpoint (visual tower) with an MTP tensor added, and its tokenizer side files."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("src")
    make_hf_checkpoint(path, multimodal=True, dtype="bfloat16", tie_word_embeddings=True)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["mtp.fc.weight"] = torch.randn(8, 16).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write(json.dumps({"made_for": name}) if name.endswith(".json") else "{{ messages }}")
    return path


def _raw(index: CheckpointIndex, name: str):
    a = index.get(name)
    return a.dtype, a.shape, a.tobytes()


def test_untouched_export_is_byte_identical_and_loads_in_transformers(source, tmp_path):
    from transformers import Qwen3_5ForConditionalGeneration

    m = qwenjax.from_pretrained(source, dtype="float32")  # computes in fp32; exports in the source's bf16
    out = export_hf(m, tmp_path / "out")
    src, dst = CheckpointIndex.open(source), CheckpointIndex.open(out)
    try:
        assert sorted(dst.where) == sorted(src.where)
        for name in src.where:  # every tensor, trained or kept aside, is the source's bytes
            assert _raw(dst, name) == _raw(src, name), name
    finally:
        src.close()
        dst.close()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        with open(os.path.join(source, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, 256, (2, 40))
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(m(ids)), rtol=0, atol=1e-4)


def test_trained_params_round_trip_through_transformers_sharded(tmp_path):
    from transformers import Qwen3_5ForCausalLM

    src = tmp_path / "src"
    make_hf_checkpoint(src, seed=4)
    m = qwenjax.from_pretrained(src, dtype="float32")
    key = jax.random.key(0)
    trained = _compat.replace_values(m.params, lambda path, v: _compat.variable_value(v) + 0.01 * jax.random.normal(
        jax.random.fold_in(key, hash(path) % 2**31), _compat.variable_value(v).shape))
    out = export_hf(m, tmp_path / "out", params=trained, max_shard_bytes=200_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in jax.tree.leaves(trained) if hasattr(v, "nbytes"))
    hf = Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32)
    m2 = m.replace(params=trained)
    ids = np.random.default_rng(1).integers(0, 256, (2, 70))
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(m2(ids)), rtol=0, atol=1e-4)
    assert not np.allclose(hf_logits(hf, ids), np.asarray(m(ids)), atol=1e-3)  # the trained weights were written


def test_export_is_atomic(source, tmp_path, monkeypatch):
    m = qwenjax.from_pretrained(source, dtype="bfloat16")
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="exists"):
        export_hf(m, tmp_path)  # an existing directory is not replaced unless asked

    calls = []

    def failing_save(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(path, tensors, metadata)

    save_file = export_mod.save_file
    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(m, target, max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary directory is left

    monkeypatch.setattr(export_mod, "save_file", save_file)
    export_hf(m, target)
    shutil.copy(os.path.join(target, "config.json"), tmp_path / "config.copy")
    monkeypatch.setattr(export_mod, "save_file", failing_save)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        export_hf(m, target, overwrite=True, max_shard_bytes=100_000)
    assert sorted(os.listdir(tmp_path)) == ["config.copy", "out"]  # the previous export is intact
    assert os.path.isfile(os.path.join(target, "model.safetensors"))
