"""Inputs that used to pass silently or end in a traceback: each is refused with a message naming the culprit (the
file and field, the flag, the argument, the step), and runs and exports never mix or leave debris.

The safetensors reader and the checkpoint directory boundary are tested in test_safetensors.py, the tokenizer files
and chat template bounds in test_tokenizer_inputs.py.
"""

import io
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenjax
from qwenjax import _compat
from qwenjax.cli import main
from qwenjax.config import ConfigError, config_from_dict, load_config, load_generation_config
from qwenjax.demo import write_random_checkpoint
from qwenjax.inference.generate import generate
from qwenjax.inference.sampling import SamplingParams, sample
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.memory import OutOfMemoryError
from qwenjax.testing import TINY_TEXT
from qwenjax.train.data import DataError
from qwenjax.train.loop import RunConfig, RunDirectoryError, TrainingDiverged, finetune
from qwenjax.train.step import TrainConfig
from qwenjax.validate import InputError

TRAIN = TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=3)
RUN = RunConfig(pack_len=64, rows=2, save_every=1, export=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    model_dir = write_random_checkpoint(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * (3 + i % 5)}) + "\n" for i in range(24)))
    return root, model_dir, data


@pytest.fixture
def model(setup):
    """A fresh model per test: a fine-tune donates its parameters' buffers to the training state."""
    return qwenjax.from_pretrained(setup[1], dtype="float32")


def _finetune(setup, model, out, **kwargs):
    _, model_dir, data = setup
    kwargs = {"train": TRAIN, "run": RUN, "progress": False, **kwargs}
    return finetune(model, Tokenizer(model_dir), data, out, **kwargs)


def _flag_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


class Killed(Exception):
    pass


def _kill_after(n):
    def on_step(step, metrics):
        if step == n:
            raise Killed
    return on_step


# ---- 1: optimiser settings and divergence --------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"),
                                         ("--clip-norm", "-1"), ("--lr", "-1e-3")])
def test_finetune_refuses_nonsensical_optimiser_flags(flag, value, capsys, tmp_path):
    err = _flag_error(["finetune", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), f"{flag}={value}"],
                      capsys)
    assert f"argument {flag}" in err and value in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", float("nan"), "`learning_rate`: must be a finite number"),
    ("learning_rate", float("inf"), "`learning_rate`: must be a finite number"),
    ("weight_decay", float("nan"), "`weight_decay`: must be a finite number"),
    ("clip_norm", -1.0, "clip_norm=-1.0 must be >= 0"),
    ("total_steps", 5.0, "`total_steps`: must be an integer"),
])
def test_train_config_refuses_nonsensical_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_run_whose_loss_turns_nan_stops_naming_the_step(setup, model, tmp_path):
    # the final norm's weight poisoned: every logit, hence the loss, is NaN
    broken = _compat.replace_values(model.params, lambda path, v: jnp.full_like(_compat.variable_value(v), jnp.nan)
                                    if path == ("norm", "weight") else _compat.variable_value(v))
    with pytest.raises(TrainingDiverged, match=r"step 1: loss nan, gradient norm nan \(not finite\).*"
                                               rf"none \({tmp_path / 'nan'} was left as it was\)"):
        _finetune(setup, model.replace(params=broken), tmp_path / "nan")
    assert not os.path.exists(tmp_path / "nan")  # its first step did not run: nothing was written


# ---- 2 and 11: one run per directory, resume checks what it resumes ---------------------------------------------
def test_a_new_run_into_a_used_directory_is_refused_and_leaves_it_alone(setup, model, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(RunDirectoryError, match=f"{out} is not empty.*overwrite"):
        _finetune(setup, model, out)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    # a run that fails to start (bad data) leaves it alone even when asked to overwrite
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match=f"{bad}:1: not JSON"):
        finetune(model, Tokenizer(setup[1]), bad, out, train=TRAIN, run=RunConfig(pack_len=64, strict_data=True),
                 overwrite=True, progress=False)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


def test_resume_checks_the_recorded_settings_and_reports_what_it_skips(setup, model, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _finetune(setup, model, out, on_step=_kill_after(2))
    assert _steps(out) == [1, 2]
    for changes, named in [(dict(train=TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=3)),
                            "train.learning_rate: recorded 0.003, now 0.01"),
                           (dict(run=RunConfig(pack_len=128, rows=2, save_every=1, export=False)),
                            "data.pack_len: recorded 64, now 128")]:
        with pytest.raises(RunDirectoryError, match=f"cannot resume {out}.*{named}"):
            _finetune(setup, model, out, resume=True, **changes)
    bf16 = qwenjax.from_pretrained(setup[1], dtype="bfloat16")
    with pytest.raises(RunDirectoryError, match="dtype: recorded 'float32', now 'bfloat16'"):
        _finetune(setup, bf16, out, resume=True)
    # a save cut off by a kill, and a metrics line cut off mid-write
    unfinished = out / "checkpoints" / "3.orbax-checkpoint-tmp-1796000000"
    unfinished.mkdir()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        resumed = _finetune(setup, qwenjax.from_pretrained(setup[1], dtype="float32"), out, resume=True)
    assert [m["step"] for m in resumed] == [3] and _steps(out) == [1, 2, 3]
    assert f"skipping the unfinished checkpoint {unfinished}" in caplog.text
    assert f"{out / 'metrics.jsonl'}:3 is torn" in caplog.text
    assert not unfinished.exists()


def test_resume_without_a_complete_checkpoint_says_it_restarts(setup, model, tmp_path, caplog):
    out, run = tmp_path / "early", RunConfig(pack_len=64, rows=2, save_every=10, export=False)
    with pytest.raises(Killed):  # killed during its first save, say: no checkpoint is complete
        _finetune(setup, model, out, run=run, on_step=_kill_after(1))
    (out / "checkpoints" / "3.orbax-checkpoint-tmp-1796000000").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        resumed = _finetune(setup, qwenjax.from_pretrained(setup[1], dtype="float32"), out, run=run, resume=True)
    assert "the run restarts from step 0" in caplog.text
    assert "dropping the 1 logged step(s)" in caplog.text
    assert [m["step"] for m in resumed] == [1, 2, 3] and _steps(out) == [1, 2, 3]


def test_run_directory_and_data_paths_are_checked_first(setup, model, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(RunDirectoryError, match=f"{a_file} is a file, not a run directory"):
        _finetune(setup, model, a_file)
    with pytest.raises(RunDirectoryError, match=f"cannot be created: {a_file} is a file"):
        _finetune(setup, model, a_file / "sub" / "run")
    with pytest.raises(DataError, match=f"{tmp_path}: is a directory"):
        finetune(model, Tokenizer(setup[1]), tmp_path, tmp_path / "new", train=TRAIN, run=RUN, progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_finetune_errors_name_the_path_and_create_nothing(setup, tmp_path, capsys):
    _, model_dir, data = setup
    base = ["finetune", "--model", str(model_dir), "--steps", "1", "--pack-len", "64", "--rows", "1"]
    assert main(base + ["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err
    assert main(base + ["--data", str(data), "--out", str(data)]) == 2
    assert f"{data} is a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_metrics_line_broken_in_the_middle_is_named(setup, model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _finetune(setup, model, out, on_step=_kill_after(1))
    (out / "metrics.jsonl").write_text('garbage\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(RunDirectoryError, match=f"{out / 'metrics.jsonl'}:1: not a metrics line"):
        _finetune(setup, qwenjax.from_pretrained(setup[1], dtype="float32"), out, resume=True)


def test_exports_clean_up_after_killed_ones_and_never_replace_a_file(tmp_path, caplog):
    m = qwenjax.from_config(config_from_dict(TINY_TEXT))
    dead = tmp_path / ".export.tmp-999999999-abcd"   # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    old_style = tmp_path / ".export.old-xyz"
    old_style.mkdir()
    mine = tmp_path / f".export.tmp-{os.getpid()}-live"  # a live process's export in progress is left alone
    mine.mkdir()
    with caplog.at_level(logging.WARNING):
        qwenjax.export_hf(m, tmp_path / "export")
    assert not dead.exists() and not old_style.exists() and mine.exists()
    assert f"removing {dead}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", mine.name])
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=f"{a_file} is a file"):
        qwenjax.export_hf(m, a_file, overwrite=True)
    assert a_file.read_bytes() == b"precious"


# ---- 3 and 8: config.json and generation_config.json -----------------------------------------------------------
def _rope(**kw):
    return {"rope_parameters": {**TINY_TEXT["rope_parameters"], **kw}}


@pytest.mark.parametrize("edit, message", [
    ({"tie_word_embeddings": "false"}, "`tie_word_embeddings`: must be true or false, got 'false'"),
    (_rope(rope_theta=0), "`rope_parameters.rope_theta`: must be positive"),
    (_rope(rope_theta=-1e4), "`rope_parameters.rope_theta`: must be positive"),
    (_rope(rope_theta="1e7"), "`rope_parameters.rope_theta`: must be a finite number, got '1e7'"),
    (_rope(mrope_section=5), "`rope_parameters.mrope_section`: must be a list of 3 integers, got 5"),
    ({"intermediate_size": "96"}, "`intermediate_size`: must be an integer, got '96'"),
    ({"rms_norm_eps": "abc"}, "`rms_norm_eps`: must be a finite number, got 'abc'"),
    ({"num_experts": "8"}, "`num_experts`: must be an integer, got '8'"),
    ({"layer_types": None, "full_attention_interval": 0}, "`full_attention_interval`: must be >= 1"),
    ({"max_position_embeddings": 1.5}, "`max_position_embeddings`: must be an integer"),
])
def test_config_types_and_values_are_checked_by_field(edit, message, tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({**TINY_TEXT, **edit}))
    with pytest.raises(ConfigError, match=f"{file}: config field {message}"):
        load_config(file)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    file = tmp_path / "config.json"
    file.write_bytes(json.dumps(TINY_TEXT).encode()[:-1] + b', "note": "\xff"}')
    with pytest.raises(ConfigError, match=f"{file}: not UTF-8 text \\(byte 0xff"):
        load_config(file)


@pytest.mark.parametrize("edit, message", [
    ({"do_sample": "false"}, "`do_sample`: must be true or false, got 'false'"),
    ({"top_k": 1.7}, "`top_k`: must be an integer, got 1.7"),
    ({"temperature": -0.5}, "`temperature`: must be >= 0"),
    ({"top_p": 0}, "`top_p`: must be > 0"),
    ({"eos_token_id": ["1"]}, "`eos_token_id`: must be an integer or a list of integers or null"),
])
def test_generation_config_is_checked_by_field(setup, tmp_path, edit, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup[1], ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text()) if (ckpt / "generation_config.json").exists() \
        else {}
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, **edit}))
    with pytest.raises(ConfigError, match=f"generation_config.json field {message}"):
        load_generation_config(ckpt)
    with pytest.raises(ConfigError, match=message):
        qwenjax.from_pretrained(ckpt)


def test_a_model_too_large_for_the_machine_is_refused_before_allocating(tmp_path, capsys):
    huge = r"the parameters: .* GiB needed.*embed_tokens.weight \[1000000000, 64\]"
    with pytest.raises(OutOfMemoryError, match=huge):
        qwenjax.from_config(config_from_dict({**TINY_TEXT, "vocab_size": 10 ** 9}))
    file = tmp_path / "huge.json"
    file.write_text(json.dumps({**TINY_TEXT, "vocab_size": 10 ** 9}))
    assert main(["forward", "--config", str(file)]) == 2
    assert "not enough memory for the parameters" in capsys.readouterr().err


# ---- 4 and 10: generation arguments and CLI text ----------------------------------------------------------------
def test_generation_arguments_are_checked_by_name(setup, model):
    prompt = [[1, 2, 3]]
    with pytest.raises(InputError, match="max_new_tokens: must be an integer, got inf"):
        generate(model, prompt, max_new_tokens=float("inf"))
    with pytest.raises(InputError, match="seed: must be <= 9223372036854775807"):
        generate(model, prompt, seed=2 ** 70)
    with pytest.raises(InputError, match=r"stop_strings\[0\] is empty"):
        generate(model, prompt, stop_strings=[""], tokenizer=Tokenizer(setup[1]))
    with pytest.raises(InputError, match="`top_k`: must be an integer, got 1.7"):
        generate(model, prompt, top_k=1.7, temperature=1.0)
    with pytest.raises(InputError, match="past the model's max_position_embeddings=262144"):
        generate(model, prompt, max_new_tokens=10 ** 9)
    with pytest.raises(ValueError, match=r"attention_mask\[0, 1\] = 2: must be 0 \(padding\) or 1"):
        generate(model, np.array(prompt), attention_mask=[[1, 2, 1]])
    long = model.replace(config=model.config.replace(max_position_embeddings=2 ** 31 - 1))
    with pytest.raises(OutOfMemoryError, match="not enough memory for a cache of"):
        generate(long, prompt, max_new_tokens=10 ** 9)


def test_a_stop_string_given_as_str_is_one_stop_string(setup, model):
    tok = Tokenizer(setup[1])
    free = generate(model, [[5, 6, 7]], max_new_tokens=8)[0]
    text = tok.decode(free, skip_special_tokens=False)
    stop = text[2:4]  # two characters of the text: as one string it stops later than at its first character
    assert len(stop) == 2 and stop[0] not in text[:2]
    assert generate(model, [[5, 6, 7]], max_new_tokens=8, stop_strings=stop, tokenizer=tok) == \
        generate(model, [[5, 6, 7]], max_new_tokens=8, stop_strings=(stop,), tokenizer=tok)


def test_a_tiny_temperature_samples_the_most_likely_token():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.5]], jnp.float32)
    for t in (1e-40, 1e-30, 1e-8):
        draws = sample(jnp.broadcast_to(logits, (64, 4)), jax.random.key(0), SamplingParams(temperature=t))
        assert set(np.asarray(draws).tolist()) == {1}


def test_cli_text_that_is_not_utf8_is_named(setup, capsys):
    # Python hands undecodable argv bytes over as surrogates ($'\xff\xfe' arrives as '\udcff\udcfe')
    assert main(["generate", "--model", str(setup[1]), "--prompt", "hi \udcff\udcfe"]) == 2
    assert "--prompt: not UTF-8 text (byte 0xff at position 3)" in capsys.readouterr().err
    assert main(["generate", "--model", str(setup[1]), "--stop", ""]) == 2
    assert "--stop #1 is empty" in capsys.readouterr().err
    err = _flag_error(["generate", "--max-new-tokens", "0"], capsys)
    assert "argument --max-new-tokens" in err
    err = _flag_error(["generate", "--seed", str(2 ** 70)], capsys)
    assert "argument --seed" in err


def test_chat_survives_a_line_that_is_not_utf8(setup, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"Hello\n\xff\xfe oops\nAnd again?\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", "--model", str(setup[1]), "--max-new-tokens", "2", "--no-thinking", "--dtype",
                 "float32"]) == 0
    err = capsys.readouterr().err
    assert "input line 2 is not UTF-8 text (byte 0xff at offset 0); ignored, the conversation is kept" in err
    n_prompt = [int(line.split()[0][1:]) for line in err.splitlines() if "prompt tokens" in line]
    assert len(n_prompt) == 2 and n_prompt[1] > n_prompt[0] + 2  # the second turn carries the first


def test_chat_with_stdin_closed_says_so(setup, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", None)
    assert main(["chat", "--model", str(setup[1])]) == 2
    assert "standard input, which is closed" in capsys.readouterr().err
