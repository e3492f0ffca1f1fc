"""Checkpoint loading: layouts, dtypes, sharded indexes, kept-aside tensors, and every kind of bad input."""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import qwenjax  # noqa: E402
from qwenjax import _compat  # noqa: E402
from qwenjax.checkpoint.hf import CheckpointError  # noqa: E402
from qwenjax.checkpoint.safetensors_io import SafetensorsFile  # noqa: E402
from qwenjax.testing import hf_logits, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def multimodal_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm")
    hf = make_hf_checkpoint(path, multimodal=True)
    return path, hf


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Re-saves model.safetensors after edit(dict of numpy arrays) (via the safetensors package, torch tensors)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def test_reader_matches_safetensors_package(multimodal_ckpt):
    from safetensors.numpy import load_file

    path, _ = multimodal_ckpt
    ref = load_file(os.path.join(path, "model.safetensors"))
    f = SafetensorsFile(os.path.join(path, "model.safetensors"))
    assert sorted(f.keys()) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(f.get(k), v)
    f.close()


def test_the_vision_tower_loads_and_mtp_tensors_are_kept_aside(multimodal_ckpt, tmp_path):
    import torch

    path = _copy(multimodal_ckpt[0], tmp_path / "with_mtp")
    _rewrite(path, lambda t: t.update({"mtp.fc.weight": torch.ones(4, 8)}))
    m = qwenjax.from_pretrained(path, dtype="float32")
    assert list(m.aside) == ["mtp.fc.weight"]
    visual = {f"model.visual.{k}": v.numpy() for k, v in multimodal_ckpt[1].model.visual.state_dict().items()}
    loaded = {"model.visual." + ".".join(map(str, p[1:])): np.asarray(_compat.variable_value(v))
              for p, v in _compat.variable_items(m.params) if p[0] == "visual"}
    assert sorted(loaded) == sorted(visual)
    for k, v in visual.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_vision_tensors_that_do_not_fit_vision_config_are_named(multimodal_ckpt, tmp_path):
    import torch

    path = _copy(multimodal_ckpt[0], tmp_path / "bad_visual")
    _rewrite(path, lambda t: t.update({"model.visual.merger.linear_fc2.weight": torch.ones(64, 100)}))
    with pytest.raises(CheckpointError, match=r"model.visual.merger.linear_fc2.weight' has shape \[64, 100\], "
                                              r"expected \[64, 128\]"):
        qwenjax.from_pretrained(path, dtype="float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    hf = make_hf_checkpoint(tmp_path, dtype=dtype)
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    ids = np.random.default_rng(0).integers(0, 256, (2, 33))
    # the checkpoint's values are exactly representable in fp32: compare with the reference upcast to fp32
    ref = hf_logits(hf.float(), ids)
    assert np.abs(np.asarray(m(ids)) - ref).max() < 1e-4


def test_sharded_checkpoint_with_index(tmp_path):
    hf = make_hf_checkpoint(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    m = qwenjax.from_pretrained(tmp_path, dtype="float32")
    ids = np.random.default_rng(0).integers(0, 256, (1, 20))
    assert np.abs(np.asarray(m(ids)) - hf_logits(hf, ids)).max() < 1e-4


def test_missing_tensor_is_named(multimodal_ckpt, tmp_path):
    path = _copy(multimodal_ckpt[0], tmp_path / "missing")
    key = "model.language_model.layers.2.linear_attn.in_proj_z.weight"
    _rewrite(path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}' \(expected shape \[64, 64\]\)"):
        qwenjax.from_pretrained(path)


def test_wrong_shape_is_named(multimodal_ckpt, tmp_path):
    import torch

    path = _copy(multimodal_ckpt[0], tmp_path / "shape")
    key = "model.language_model.layers.3.self_attn.k_proj.weight"
    _rewrite(path, lambda t: t.update({key: torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \[32, 64\], expected \[64, 64\]"):
        qwenjax.from_pretrained(path)


def test_unexpected_tensor_is_named(multimodal_ckpt, tmp_path):
    import torch

    path = _copy(multimodal_ckpt[0], tmp_path / "unexpected")
    _rewrite(path, lambda t: t.update({"model.language_model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.language_model.layers.0.mystery.weight'"):
        qwenjax.from_pretrained(path)


def test_truncated_safetensors_file(multimodal_ckpt, tmp_path):
    path = _copy(multimodal_ckpt[0], tmp_path / "truncated")
    file = path / "model.safetensors"
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at byte"):
        qwenjax.from_pretrained(path)
    with open(file, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="truncated"):
        qwenjax.from_pretrained(path)


def test_index_naming_a_missing_shard(tmp_path):
    make_hf_checkpoint(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=f"lists shard '{victim}', which does not exist"):
        qwenjax.from_pretrained(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwenjax.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qwenjax.from_pretrained(tmp_path)


def test_bad_token_ids_are_located(multimodal_ckpt):
    m = qwenjax.from_pretrained(multimodal_ckpt[0], dtype="float32")
    ids = np.zeros((2, 5), np.int64)
    ids[1, 3] = 256
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = 256 is outside the vocabulary \[0, 256\)"):
        m(ids)
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(np.zeros((2, 5), np.int64), attention_mask=np.ones((2, 4)))


def test_sharded_load_equals_single_device(multimodal_ckpt):
    import jax

    path, hf = multimodal_ckpt
    m = qwenjax.from_pretrained(path, dtype="float32", mesh="fsdp=4,tensor=2")
    w = m.params["layers"][0]["linear_attn"]["in_proj_qkv"]["weight"][...]
    assert len(w.sharding.device_set) == 8 and w.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids = np.random.default_rng(0).integers(0, 256, (4, 40))
    assert np.abs(np.asarray(m(ids)) - hf_logits(hf, ids)).max() < 1e-4
