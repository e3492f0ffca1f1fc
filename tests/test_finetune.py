"""The fine-tuning run: a killed run resumes onto the uninterrupted loss curve; the CLI trains LoRA and exports."""

import json
import os

import jax
import numpy as np
import pytest

import qwenjax
from qwenjax.cli import main
from qwenjax.demo import write_random_checkpoint
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.train.data import read_jsonl
from qwenjax.train.loop import RunConfig, finetune
from qwenjax.train.step import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = write_random_checkpoint(root / "model")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "qwen", "jax"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 9))))}) for _ in range(40)]
    lines += [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return root, model, data


class Killed(Exception):
    pass


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f)]


TRAIN = TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=7, grad_accum=2)
RUN = RunConfig(pack_len=64, rows=2, save_every=2, export=False)


def _finetune(model_dir, data, out, *, mesh=None, **kwargs):
    """The TRAIN/RUN fine-tune of the checkpoint in `model_dir`, loaded in fp32 onto `mesh`."""
    model = qwenjax.from_pretrained(model_dir, dtype="float32", mesh=mesh)
    return finetune(model, Tokenizer(model_dir), data, out, train=TRAIN, run=RUN, progress=False, **kwargs)


@pytest.fixture(scope="module")
def straight(setup):
    root, model, data = setup
    _finetune(model, data, root / "straight")
    return _losses(root / "straight")


@pytest.mark.parametrize("mesh", [None, "data=2,fsdp=2,tensor=2"])
def test_killed_run_resumes_onto_the_same_loss_curve(setup, straight, mesh):
    root, model, data = setup
    out = root / f"killed-{mesh}"

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # after step 5 ran and was logged; the newest checkpoint is step 4's
    with pytest.raises(Killed):
        _finetune(model, data, out, mesh=mesh, on_step=kill_at_5)
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5]
    resumed = _finetune(model, data, out, mesh=mesh, resume=True)
    assert [m["step"] for m in resumed] == [5, 6, 7]
    if mesh is None:
        assert _losses(out) == straight  # step 5's line was cut back and recomputed identically
    else:  # sharded over 8 devices and restored into that layout: the same curve, up to summation order (fp32)
        assert [s for s, _ in _losses(out)] == [s for s, _ in straight]
        np.testing.assert_allclose([l for _, l in _losses(out)], [l for _, l in straight], rtol=1e-5)
    assert straight[-1][1] < straight[0][1]


def test_cli_finetunes_lora_and_exports(setup, capsys):
    root, model, data = setup
    out = root / "cli"
    mesh = ["--mesh", "fsdp=4,tensor=2"] if len(jax.devices()) == 8 else []  # adapters and export, sharded
    rc = main(["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "3",
               "--pack-len", "64", "--rows", "2", "--lora-rank", "4", "--lr", "1e-2", "--dtype", "float32", *mesh])
    assert rc == 0
    assert "step 3: loss" in capsys.readouterr().out
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"loss", "tokens", "tokens_per_s", "grad_norm", "learning_rate"} <= set(metrics[0])
    exported = qwenjax.from_pretrained(out / "export", dtype="float32")
    base = qwenjax.from_pretrained(model, dtype="float32")
    ids = np.arange(1, 40)[None]
    assert not np.allclose(np.asarray(exported(ids)), np.asarray(base(ids)), atol=1e-4)  # LoRA merged in
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.isfile(out / "export" / name)


def test_cli_reports_bad_data_with_line_numbers(setup, tmp_path, capsys):
    _, model, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    rc = main(["finetune", "--model", str(model), "--data", str(bad), "--out", str(tmp_path / "o"),
               "--steps", "1", "--pack-len", "64", "--rows", "1", "--strict-data"])
    assert rc == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err


def test_run_config_errors_name_the_field():
    with pytest.raises(ValueError, match="save_every=0"):
        RunConfig(save_every=0)
    with pytest.raises(ValueError, match="pack_len=0"):
        RunConfig(pack_len=0)


def _tree(path) -> dict:
    """Every file under `path` with its bytes ({} when there is no such directory)."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


def test_new_users_command_trains_the_bundled_model_on_40_chat_examples(tmp_path, capsys, caplog):
    """Issue 36, as a new user tried it: 40 short chat examples in README's format, `--lora-rank 4`, every other
    flag left at its default (1024-token rows, 8 per batch: the data packs into 2 rows) and no --model. It trains
    the bundled model, repeating the epoch to fill each batch, and writes checkpoints, metrics and the export."""
    from qwenjax.demo import DEFAULT_MODEL_DIR

    data = tmp_path / "x.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {word} number {i}?"},
        {"role": "assistant", "content": f"{word.capitalize()} {i} is a word in a short answer."}]}) + "\n"
        for i, word in enumerate(["list", "dict", "tuple", "set", "string"] * 8)))
    out = tmp_path / "r"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--lora-rank", "4", "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert f"No --model given: fine-tuning the bundled {DEFAULT_MODEL_DIR}" in err
    assert "packs into 2 rows of 1024 tokens, fewer than one batch (8 rows x 1 micro-batches): each batch repeats " \
           "the epoch about" in caplog.text
    assert json.load(open(out / "run.json"))["model"]["source"] == DEFAULT_MODEL_DIR
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1] and np.isfinite(metrics[0]["loss"])
    samples, _ = read_jsonl(data, Tokenizer(DEFAULT_MODEL_DIR), max_len=1024)
    answers = sum(int(s.loss_mask.sum()) for s in samples)
    assert metrics[0]["tokens"] > 4 * answers  # a batch of the epoch repeated: several times its answer tokens
    assert os.listdir(out / "checkpoints") == ["1"] and os.path.isfile(out / "export" / "model.safetensors")


def test_a_run_that_fails_to_start_writes_nothing_and_the_corrected_command_runs(setup, tmp_path, monkeypatch):
    """Bad data, or a first step that cannot run (out of memory, say): --out is left as it was, absent or holding
    the earlier run, so the corrected command needs no --overwrite."""
    import qwenjax.train.loop

    _, model, data = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + "{oops\n")
    out = tmp_path / "run"
    command = ["finetune", "--model", str(model), "--out", str(out), "--steps", "2", "--pack-len", "64", "--rows",
               "2", "--dtype", "float32", "--save-every", "1"]
    assert main(command + ["--data", str(bad), "--strict-data"]) == 2
    assert not out.exists()

    def out_of_memory(*args, **kwargs):
        def step(state, batch):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate (simulated)")
        return step
    real_step = qwenjax.train.loop.jit_train_step
    monkeypatch.setattr(qwenjax.train.loop, "jit_train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        main(command + ["--data", str(data)])
    assert not out.exists()
    monkeypatch.setattr(qwenjax.train.loop, "jit_train_step", real_step)
    assert main(command + ["--data", str(data)]) == 0  # no --overwrite needed
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    done = _tree(out)
    # a new run asked to replace it that fails at its first step: the earlier run stays whole
    monkeypatch.setattr(qwenjax.train.loop, "jit_train_step", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        main(command + ["--data", str(data), "--overwrite", "--lr", "1e-3"])
    assert _tree(out) == done
