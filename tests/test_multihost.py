"""Fine-tuning across two processes (two "hosts", 2 CPU devices each, one 4-device mesh over gloo): the loss
curve is the single-device run's, the Orbax checkpoint restores on one device, and the exported Hugging Face
directory, gathered from both processes and written by process 0, holds exactly the trained weights."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import qwenjax
from multihost_finetune_worker import RUN, TRAIN
from qwenjax import _compat
from qwenjax.demo import write_random_checkpoint
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.train.loop import finetune
from qwenjax.train.step import init_state

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_finetune_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f)]


def test_two_process_finetune_matches_one_device_and_exports_the_trained_weights(tmp_path):
    model = write_random_checkpoint(tmp_path / "model")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "qwen", "jax"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 9))))}) + "\n"
                            for _ in range(40)))
    out, port = tmp_path / "two-hosts", str(_free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(WORKER), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), port, str(model), str(data), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    finetune(qwenjax.from_pretrained(model, dtype="float32"), Tokenizer(model), data, tmp_path / "one-device",
             train=TRAIN, run=RUN, progress=False)
    two, one = _losses(out), _losses(tmp_path / "one-device")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, TRAIN.total_steps + 1))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)

    # The last checkpoint, written by both processes, restores on this one device ...
    m = qwenjax.from_pretrained(model, dtype="float32")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init_state(m.params, TRAIN))
    with ocp.CheckpointManager(os.path.join(out, "checkpoints")) as manager:
        assert manager.latest_step() == TRAIN.total_steps
        state = manager.restore(TRAIN.total_steps, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore())).state
    # ... and the export holds exactly those weights.
    exported = qwenjax.from_pretrained(out / "export", dtype="float32")
    pairs = zip(_compat.variable_items(state.params), _compat.variable_items(exported.params))
    for (path, a), (path_b, b) in pairs:
        assert path == path_b
        assert np.array_equal(np.asarray(_compat.variable_value(a)), np.asarray(_compat.variable_value(b))), path
    assert not np.array_equal(np.asarray(exported.params["embed_tokens"]["weight"][...]),
                              np.asarray(m.params["embed_tokens"]["weight"][...]))  # it did train
