"""The safetensors reader enforces what the format promises, and a checkpoint never reads outside its directory.

The `safetensors` library is the reference: a fuzz of header mutations and truncations checks that the reader
never loads a file the library rejects, and never raises anything but its own `SafetensorsError`.
"""

import json
import os
import struct
import time

import numpy as np
import pytest

from qwenjax.checkpoint.hf import CheckpointError, CheckpointIndex
from qwenjax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int32),
           "c": np.ones((2, 2), np.float16)}


def _header(tensors=TENSORS):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, arr in tensors.items():
        dtype = {np.float32: "F32", np.int32: "I32", np.float16: "F16"}[arr.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    return header


def _write(path, header, data=None, raw_header: bytes | None = None):
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    data = b"".join(a.tobytes() for a in TENSORS.values()) if data is None else data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _load_all(path):
    f = SafetensorsFile(path)
    try:
        return {k: np.array(f.get(k)) for k in f.keys()}
    finally:
        f.close()


def test_a_valid_file_loads(tmp_path):
    got = _load_all(_write(tmp_path / "ok.safetensors", _header()))
    for name, want in TENSORS.items():
        np.testing.assert_array_equal(got[name], want)


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["a"].update(data_offsets=[-8, 16]), r"tensor 'a': data_offsets \[-8, 16\] are not"),
    (lambda h: h["b"].update(data_offsets=[0, 16]), "not overlap or leave gaps"),  # b shares a's bytes
    (lambda h: h["c"].update(data_offsets=[h["c"]["data_offsets"][0] + 4, h["c"]["data_offsets"][1] + 4]),
     "truncated: tensor 'c' ends at byte"),
    (lambda h: h["a"].update(data_offsets=[0.0, 24.0]), r"data_offsets \[0.0, 24.0\] are not"),
    (lambda h: h["a"].update(shape=["2", "3"]), r"shape \['2', '3'\] is not a list of non-negative integers"),
    (lambda h: h["a"].pop("data_offsets"), "tensor 'a': the entry has no data_offsets"),
    (lambda h: h.update(a=[1, 2]), "tensor 'a': the entry is a JSON list"),
    (lambda h: h["a"].update(dtype="F31"), "tensor 'a' has unsupported dtype F31"),
    (lambda h: h["a"].update(shape=[3, 3]), r"tensor 'a' spans 24 bytes, but F32\[3, 3\] needs 36"),
    (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must be an object of strings"),
])
def test_headers_breaking_the_format_are_refused_by_name(tmp_path, edit, message):
    header = _header()
    edit(header)
    with pytest.raises(SafetensorsError, match=message):
        SafetensorsFile(_write(tmp_path / "bad.safetensors", header))


def test_header_structure_and_data_section_are_checked(tmp_path):
    with pytest.raises(SafetensorsError, match="not a JSON object"):
        SafetensorsFile(_write(tmp_path / "list.safetensors", None, raw_header=b"[1, 2]"))
    with pytest.raises(SafetensorsError, match="corrupt header"):
        SafetensorsFile(_write(tmp_path / "deep.safetensors", None, raw_header=b"{\"a\": " + b"[" * 100_000))
    gap = _header()
    del gap["b"]
    with pytest.raises(SafetensorsError, match="tensor 'c' starts at data offset 40, not at 24"):
        SafetensorsFile(_write(tmp_path / "gap.safetensors", gap))
    extra = b"".join(a.tobytes() for a in TENSORS.values()) + b"tail"
    with pytest.raises(SafetensorsError, match="data section holds 52 bytes"):
        SafetensorsFile(_write(tmp_path / "extra.safetensors", _header(), data=extra))
    with open(tmp_path / "huge.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 2 ** 40) + b"{}")
    with pytest.raises(SafetensorsError, match="over the format's bound"):
        SafetensorsFile(tmp_path / "huge.safetensors")


def _checkpoint_with_index(directory, weight_map):
    directory.mkdir()
    _write(directory / "shard.safetensors", _header())
    with open(directory / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return directory


def test_no_shard_is_read_outside_the_checkpoint_directory(tmp_path):
    canary = _write(tmp_path / "canary.safetensors", _header())  # a valid file, outside the checkpoint
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-BYTES" * 4)
    for name in ("../canary.safetensors", str(canary), "../secret.txt", "/proc/self/environ"):
        ckpt = _checkpoint_with_index(tmp_path / f"ckpt{abs(hash(name))}", {"a": name})
        with pytest.raises(CheckpointError, match="outside the checkpoint directory") as e:
            CheckpointIndex.open(ckpt)
        assert "SECRET" not in str(e.value) and name in str(e.value)
    linked = _checkpoint_with_index(tmp_path / "linked", {"a": "link.safetensors"})
    os.symlink(canary, linked / "link.safetensors")  # a link inside that leads out
    with pytest.raises(CheckpointError, match="'link.safetensors', which is outside"):
        CheckpointIndex.open(linked)
    single = tmp_path / "single"
    single.mkdir()
    os.symlink(canary, single / "model.safetensors")
    with pytest.raises(CheckpointError, match="the checkpoint file 'model.safetensors', which is outside"):
        CheckpointIndex.open(single)


def test_a_hub_cache_snapshot_links_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    _write(repo / "blobs" / "0123abcd", _header())
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    os.symlink(repo / "blobs" / "0123abcd", snapshot / "model.safetensors")
    index = CheckpointIndex.open(snapshot)
    np.testing.assert_array_equal(index.get("a"), TENSORS["a"])
    index.close()


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "no `weight_map` object"),
    (b'{"weight_map": {"a": 3}}', "`weight_map` entry 'a' is 3, not a file name"),
    (b'{"weight_map": ', "not valid JSON"),
    (b'{"weight_map": {"a": "\xff\xfe"}}', "not UTF-8 text"),
])
def test_a_bad_index_names_the_file(tmp_path, content, message):
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        CheckpointIndex.open(tmp_path)
    assert "model.safetensors.index.json" in str(e.value)


def _mutations(rng):
    """Random edits of a valid file: header fields changed, retyped or dropped, bytes flipped, truncations."""
    header = _header()
    names = list(TENSORS)
    name = names[rng.integers(len(names))]
    field = ("dtype", "shape", "data_offsets")[rng.integers(3)]
    kind = rng.integers(8)
    raw, data = None, b"".join(a.tobytes() for a in TENSORS.values())
    values = [-4, -1, 0, 1, 2, 3, 4, 8, 12, 16, 24, 40, 44, 10 ** 20, 1.5, "4", None, True, [], [1], {}]
    if kind == 0:
        header[name][field] = values[rng.integers(len(values))]
    elif kind == 1 and field != "dtype":
        seq = list(header[name][field])
        if seq:
            seq[rng.integers(len(seq))] = values[rng.integers(len(values))]
        header[name][field] = seq
    elif kind == 2:
        header[name].pop(field)
    elif kind == 3:
        header[name]["dtype"] = ["F32", "F16", "I32", "BF16", "I8", "U8", "F64", "I64", "X"][rng.integers(9)]
    elif kind == 4:
        data = data[:rng.integers(len(data))] if rng.integers(2) else data + b"\0" * int(rng.integers(1, 9))
    elif kind == 5:
        blob = bytearray(json.dumps(header).encode())
        for _ in range(rng.integers(1, 4)):
            blob[rng.integers(len(blob))] = int(rng.integers(256))
        raw = bytes(blob)
    elif kind == 6:
        other = names[rng.integers(len(names))]
        header[name]["data_offsets"], header[other]["data_offsets"] = (header[other]["data_offsets"],
                                                                       header[name]["data_offsets"])
    else:
        header[name]["data_offsets"] = [o + int(rng.integers(-8, 9)) for o in header[name]["data_offsets"]]
    return header, data, raw


def test_fuzzed_files_load_only_when_the_safetensors_library_loads_them(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    rng = np.random.default_rng(0)
    deadline, cases, loaded = time.monotonic() + 15.0, 0, 0
    while cases < 1500 and time.monotonic() < deadline:
        header, data, raw = _mutations(rng)
        path = _write(tmp_path / f"fuzz{cases % 8}.safetensors", header, data, raw)
        blob = path.read_bytes()
        if rng.integers(5) == 0:  # also truncate the file anywhere
            path.write_bytes(blob[:rng.integers(len(blob))])
        cases += 1
        try:
            ours = _load_all(path)
        except SafetensorsError:
            continue  # the reader's own error; anything else fails the test here
        try:
            with safetensors.safe_open(str(path), framework="numpy") as f:
                theirs = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - whatever the library says, it refused the file
            pytest.fail(f"case {cases}: qwenjax loaded a file the safetensors library refuses ({e}); "
                        f"header {header if raw is None else raw!r}")
        assert sorted(ours) == sorted(theirs)
        for k in ours:
            np.testing.assert_array_equal(ours[k], theirs[k])
        loaded += 1
    assert cases >= 200 and loaded >= 1, (cases, loaded)  # it ran, and valid files did load
