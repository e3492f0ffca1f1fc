"""One process of the two-host fine-tuning run of tests/test_multihost.py (not collected by pytest).

    python tests/multihost_finetune_worker.py PROCESS_ID PORT MODEL_DIR DATA OUT_DIR

Each process owns 2 fake CPU devices; together they form one 4-device mesh (fsdp=2, tensor=2), so every weight,
Adam moment and batch is split across the two processes, which talk over gloo as hosts do over a network.
"""

import os
import sys

if __name__ == "__main__":  # before JAX is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

import qwenjax  # noqa: E402
from qwenjax.inference.tokenizer import Tokenizer  # noqa: E402
from qwenjax.train.loop import RunConfig, finetune  # noqa: E402
from qwenjax.train.step import TrainConfig  # noqa: E402

TRAIN = TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=4)
RUN = RunConfig(pack_len=64, rows=2, save_every=2)
MESH = "fsdp=2,tensor=2"

if __name__ == "__main__":
    process_id, port, model, data, out = int(sys.argv[1]), sys.argv[2], *sys.argv[3:6]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    finetune(qwenjax.from_pretrained(model, dtype="float32", mesh=MESH), Tokenizer(model), data, out,
             train=TRAIN, run=RUN, progress=False)
