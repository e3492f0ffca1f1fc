"""The fine-tuning run: model + tokenizer + JSONL → train steps → Orbax checkpoints, metrics log, HF export.

    out_dir/checkpoints/<step>/   Orbax: the TrainState (params, optimizer state, step) and the data position
    out_dir/metrics.jsonl         one line per step: step, loss, tokens, tokens_per_s, grad_norm, learning_rate
    out_dir/export/               the trained model as a Hugging Face directory (LoRA merged), at the end

Orbax writes each checkpoint under a temporary name and renames it when complete, so a killed run leaves only
whole checkpoints; `resume=True` continues from the newest one with the same data position, and the metrics log
is cut back to that step, so the loss curve of a resumed run is the uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp

from qwenjax.checkpoint.export import export_hf
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.pretrained import Qwen35
from qwenjax.train.data import PackedBatches, read_jsonl
from qwenjax.train.lora import LoRAConfig, add_lora, merge_lora
from qwenjax.train.step import TrainConfig, TrainState, init_state, jit_train_step


@dataclasses.dataclass(frozen=True)
class RunConfig:
    pack_len: int = 1024
    rows: int = 8                 # rows per micro-batch
    save_every: int = 100         # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    strict_data: bool = False     # stop at the first bad JSONL line instead of skipping it
    export: bool = True

    def __post_init__(self):
        bad = [f"{name}={getattr(self, name)} must be >= 1"
               for name in ("pack_len", "rows", "save_every", "keep_checkpoints") if getattr(self, name) < 1]
        if bad:
            raise ValueError("RunConfig: " + "; ".join(bad))


def finetune(model: Qwen35, tokenizer: Tokenizer, data_path: str | os.PathLike, out_dir: str | os.PathLike, *,
             train: TrainConfig, run: RunConfig = RunConfig(), lora: LoRAConfig | None = None,
             resume: bool = False, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Trains `model` on the JSONL file `data_path` for `train.total_steps` steps (or the rest of them, resuming);
    returns the metrics of the steps run.

    The model's dtype and mesh are the run's: the mesh spreads the weights, optimizer state and batch rows over
    its devices (`jit_train_step`); checkpoints are written and restored in that layout. The export (with a
    source checkpoint, `from_pretrained`) takes its layout, dtypes and side files from that checkpoint.

    `on_step(step, metrics)` is called after each step (a test can raise there to simulate a kill).
    """
    os.makedirs(out_dir, exist_ok=True)
    primary = jax.process_index() == 0  # across hosts, process 0 alone writes the metrics log and shows progress
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    samples, _ = read_jsonl(data_path, tokenizer, max_len=run.pack_len, eos_id=eos, strict=run.strict_data)
    m = add_lora(model, lora) if lora is not None else model
    step_fn = jit_train_step(m.graphdef, train, m.mesh, m.rules)
    state = init_state(m.params, train)
    position = {"epoch": 0, "row": 0}

    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(out_dir), "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints))
    metrics_file = os.path.join(out_dir, "metrics.jsonl")
    if resume and manager.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
        state, position = restored.state, restored.position
        if primary:
            _truncate_metrics(metrics_file, int(state.step))
    elif primary and os.path.exists(metrics_file):
        os.remove(metrics_file)

    batches = PackedBatches(samples, run.pack_len, run.rows, train.grad_accum, train.seed).from_position(position)
    first, last = int(state.step), train.total_steps
    bar = _progress(first, last) if progress and primary else None
    history = []
    with open(metrics_file if primary else os.devnull, "a") as log:
        for step in range(first, last):
            batch, position = next(batches)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            metrics.update(step=step + 1, tokens_per_s=metrics["tokens"] / (time.perf_counter() - t0))
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            history.append(metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
            if (step + 1) % run.save_every == 0 or step + 1 == last:
                _save(manager, state, position)
            if on_step is not None:
                on_step(step + 1, metrics)
    if bar is not None:
        bar.close()
    manager.close()
    if run.export:
        trained = m.replace(params=state.all_params())
        export_hf(model, os.path.join(out_dir, "export"), overwrite=True,
                  params=(merge_lora(trained) if lora is not None else trained).params)
    return history


def _save(manager: ocp.CheckpointManager, state: TrainState, position: dict) -> None:
    manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          position=ocp.args.JsonSave(position)))
    manager.wait_until_finished()


def _truncate_metrics(path: str, step: int) -> None:
    """Drops the log lines of steps after `step` (run after that checkpoint, then lost with the kill)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def _progress(first: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=first, unit="step", dynamic_ncols=True)
