"""The fine-tuning run: model + tokenizer + JSONL → train steps → Orbax checkpoints, metrics log, HF export.

    out_dir/run.json              the settings that shape the run (model, dtype, optimizer, packing, LoRA)
    out_dir/checkpoints/<step>/   Orbax: the TrainState (params, optimizer state, step) and the data position
    out_dir/metrics.jsonl         one line per step: step, loss, tokens, tokens_per_s, grad_norm, learning_rate
                                  (and mtp_loss with an MTP loss term)
    out_dir/export/               the trained model as a Hugging Face directory (LoRA merged), at the end

Orbax writes each checkpoint under a temporary name and renames it when complete, so a killed run leaves only
whole checkpoints; `resume=True` continues from the newest one with the same data position, and the metrics log
is cut back to that step, so the loss curve of a resumed run is the uninterrupted run's. A run directory holds
one run: a new run into a used one is refused unless asked to overwrite it, and a resume with other settings is
refused, naming them. Nothing is written before the first step has run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qwenjax.checkpoint.export import export_hf
from qwenjax.config import config_to_hf_dict
from qwenjax.inference.tokenizer import Tokenizer
from qwenjax.pretrained import Qwen35
from qwenjax.train.data import PackedBatches, VisionData, read_jsonl
from qwenjax.train.lora import LoRAConfig, add_lora, merge_lora
from qwenjax.train.step import TrainConfig, TrainState, init_state, jit_train_step
from qwenjax.validate import InputError, check, check_fields, read_json_object

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    pack_len: int = 1024
    rows: int = 8                 # rows per micro-batch
    save_every: int = 100         # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    strict_data: bool = False     # stop at the first bad JSONL line instead of skipping it
    export: bool = True

    def __post_init__(self):
        check_fields(self, "RunConfig")
        bad = [f"{name}={getattr(self, name)} must be >= 1"
               for name in ("pack_len", "rows", "save_every", "keep_checkpoints") if getattr(self, name) < 1]
        if bad:
            raise ValueError("RunConfig: " + "; ".join(bad))


class RunDirectoryError(InputError):
    """A run directory that cannot take this run: it holds another run, or its recorded settings differ."""


class TrainingDiverged(ValueError):
    """The loss or gradient norm became non-finite; the message names the step."""


RUN_RECORD = "run.json"          # the settings that shape the run, written when it starts, checked on resume
_RUN_ENTRIES = (RUN_RECORD, "checkpoints", "metrics.jsonl", "export")
_ORBAX_TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix for a checkpoint still being written


def finetune(model: Qwen35, tokenizer: Tokenizer, data_path: str | os.PathLike, out_dir: str | os.PathLike, *,
             train: TrainConfig, run: RunConfig = RunConfig(), lora: LoRAConfig | None = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True, processor=None,
             on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Trains `model` on the JSONL file `data_path` for `train.total_steps` steps (or the rest of them, resuming);
    returns the metrics of the steps run.

    `out_dir` must be new or empty, unless `resume` (continue the run it holds: the settings that shape the run
    must be the ones it recorded) or `overwrite` (replace the run it holds). Nothing is written before the first
    step has run (the data read and packed, the training state built, the step compiled and run to a finite loss),
    so a run that fails to start leaves the directory as it was: absent, or holding what it held. Data too small to
    fill one batch is repeated, each epoch shuffled anew (`PackedBatches.group`), and a warning says so.
    A run stops with `TrainingDiverged` at the first step whose loss or gradient norm is not finite.

    The model's dtype and mesh are the run's: the mesh spreads the weights, optimizer state and batch rows over
    its devices (`jit_train_step`); checkpoints are written and restored in that layout. The export (with a
    source checkpoint, `from_pretrained`) takes its layout, dtypes and side files from that checkpoint.

    A model with a vision tower reads images and videos in the data's messages (`qwenjax.train.data`) through
    `processor` (default: `qwenjax.load_processor` of the model's directory); the tower is frozen unless
    `train.train_vision`, or LoRA targets its linears (`qwenjax.train.lora.VISION_TARGETS`).

    The model's weight arrays become the run's (donated to the train step, so that they are not held twice):
    after the run, load the export (or the source again) rather than use `model`.

    `on_step(step, metrics)` is called after each step (a test can raise there to simulate a kill).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_writable_dir(out_dir)
    primary = jax.process_index() == 0  # across hosts, process 0 alone writes the metrics log and shows progress
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    vision = None
    if model.config.vision is not None:
        if processor is None:
            from qwenjax.inference.processor import Processor, load_processor

            processor = (load_processor(model.source) if model.source and os.path.isdir(model.source)
                         else Processor(tokenizer))
        vision = VisionData(processor, model.config)
    samples, _ = read_jsonl(data_path, tokenizer, max_len=run.pack_len, eos_id=eos, strict=run.strict_data,
                            vision=vision)
    record = _run_record(model, train, run, lora)
    resuming = resume and _holds_run(out_dir)
    if resuming:
        _check_same_run(out_dir, record)
    elif _entries(out_dir) and not overwrite:
        raise RunDirectoryError(f"{out_dir} is not empty ({', '.join(_entries(out_dir)[:4])}): pass resume to continue "
                                "the run it holds, overwrite to replace it, or choose a new directory")
    packer = PackedBatches(samples, run.pack_len, run.rows, train.grad_accum, train.seed, vision)
    if (repeats := packer.repeats()) is not None:
        log.warning("%s", repeats)
    m = add_lora(model, lora) if lora is not None else model
    step_fn = jit_train_step(m.graphdef, train, m.mesh, m.rules)
    state = init_state(m.params, train)
    position = {"epoch": 0, "row": 0}
    checkpoints = os.path.join(out_dir, "checkpoints")
    metrics_file = os.path.join(out_dir, "metrics.jsonl")
    manager = None
    if resuming:  # a run directory already: what it holds is read (a cut-off save removed) before the first step
        _sync(f"qwenjax finetune {out_dir}: checked")
        if primary:
            _remove_unfinished_checkpoints(checkpoints)
        _sync(f"qwenjax finetune {out_dir}: cleaned")
        manager = _manager(checkpoints, run)
        state, position = _restore_newest(manager, state, position)

    def start_writing():
        """After the first step has run (or, resuming a finished run, at once): the directory takes the run."""
        nonlocal manager
        _sync(f"qwenjax finetune {out_dir}: started")  # every process has checked it before process 0 changes it
        if primary and not resuming:
            for name in _RUN_ENTRIES:  # overwrite: only what a run writes; anything else in the directory stays
                path = os.path.join(out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            os.makedirs(out_dir, exist_ok=True)
            _write_atomic(os.path.join(out_dir, RUN_RECORD), (json.dumps(record, indent=2) + "\n").encode())
        if primary and resuming:
            _truncate_metrics(metrics_file, first)  # the lines of the steps after the checkpoint resumed from
        _sync(f"qwenjax finetune {out_dir}: written")
        manager = manager or _manager(checkpoints, run)
        return open(metrics_file if primary else os.devnull, "a")

    first, last = int(state.step), train.total_steps
    if first < last:  # the first batch is packed (its pictures read) before anything is written
        batches = packer.from_position(position)
        batches = itertools.chain([next(batches)], batches)
    bar = _progress(first, last) if progress and primary else None
    history, metrics_log = [], None
    try:
        for step in range(first, last):
            batch, position = next(batches)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            metrics.update(step=step + 1, tokens_per_s=metrics["tokens"] / (time.perf_counter() - t0))
            finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
            if metrics_log is None and finite:
                metrics_log = start_writing()
            if metrics_log is not None:
                metrics_log.write(json.dumps(metrics) + "\n")
                metrics_log.flush()
            history.append(metrics)
            if not finite:
                newest = manager.latest_step() if manager is not None else None
                raise TrainingDiverged(
                    f"step {step + 1}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']} (not finite); "
                    f"stopped without saving it. The newest checkpoint is "
                    f"{'step ' + str(newest) if newest is not None else 'none'}"
                    f"{'' if metrics_log is not None else f' ({out_dir} was left as it was)'}; a lower learning "
                    f"rate (now {metrics['learning_rate']:.3g}) or clipping may help")
            if bar is not None:
                mtp = {"mtp_loss": f"{metrics['mtp_loss']:.4f}"} if "mtp_loss" in metrics else {}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", **mtp, tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
            if (step + 1) % run.save_every == 0 or step + 1 == last:
                _save(manager, state, position)
            if on_step is not None:
                on_step(step + 1, metrics)
        if metrics_log is None:  # resuming a run whose steps had all run
            metrics_log = start_writing()
    finally:
        if metrics_log is not None:
            metrics_log.close()
        if bar is not None:
            bar.close()
    manager.close()
    if run.export:
        trained = m.replace(params=state.all_params())
        export_hf(model, os.path.join(out_dir, "export"), overwrite=True,
                  params=(merge_lora(trained) if lora is not None else trained).params)
    return history


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _manager(checkpoints: str, run: RunConfig) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=run.keep_checkpoints))


# ---- the run directory -------------------------------------------------------------------------------------------
def _check_writable_dir(path: str) -> None:
    """`path` is a directory or can become one: neither it nor a parent is a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirectoryError(f"{path} is a file, not a run directory")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise RunDirectoryError(f"{path} cannot be created: {parent} is a file")


def _entries(out_dir: str) -> list[str]:
    return sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []


def _holds_run(out_dir: str) -> bool:
    return any(name in _RUN_ENTRIES for name in _entries(out_dir))


def _run_record(model: Qwen35, train: TrainConfig, run: RunConfig, lora: LoRAConfig | None) -> dict:
    """What decides the run's trajectory: a resumed run must match it to continue the same curve."""
    return {"model": {"source": model.source, "config": config_to_hf_dict(model.config)},
            "dtype": jax.numpy.dtype(model.dtype).name,
            "train": dataclasses.asdict(train),
            "data": {"pack_len": run.pack_len, "rows": run.rows},
            "lora": None if lora is None else dataclasses.asdict(lora)}


def _differences(recorded, now, path: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(now, dict):
        return [d for k in sorted(set(recorded) | set(now), key=str)
                for d in _differences(recorded.get(k), now.get(k), f"{path}.{k}" if path else str(k))]
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # JSON has lists where the dataclasses have tuples
    return [] if norm(recorded) == norm(now) else [f"{path}: recorded {recorded!r}, now {now!r}"]


def _check_same_run(out_dir: str, record: dict) -> None:
    file = os.path.join(out_dir, RUN_RECORD)
    if not os.path.isfile(file):
        log.warning("%s has no %s (written by an older qwenjax): resuming without checking the settings",
                    out_dir, RUN_RECORD)
        return
    recorded = read_json_object(file, RunDirectoryError)
    # the same model may have moved: its config must match, its path need not
    if recorded.get("model", {}).get("source") != record["model"]["source"]:
        log.warning("resuming %s: the model was %s, now %s", out_dir, recorded.get("model", {}).get("source"),
                    record["model"]["source"])
    recorded = {**recorded, "model": {**recorded.get("model", {}), "source": record["model"]["source"]}}
    diff = _differences(json.loads(json.dumps(recorded)), json.loads(json.dumps(record)))
    if diff:
        raise RunDirectoryError(f"cannot resume {out_dir}: its run had other settings ({'; '.join(diff[:6])}"
                                f"{'; ...' if len(diff) > 6 else ''}); use the same settings, or a new directory")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _remove_unfinished_checkpoints(checkpoints: str) -> None:
    """Orbax writes a checkpoint under a temporary name and renames it when complete; one still under that name
    was cut off by a kill. Said, then removed."""
    for name in _entries(checkpoints):
        if _ORBAX_TMP in name:
            log.warning("skipping the unfinished checkpoint %s (its save was interrupted); removed",
                        os.path.join(checkpoints, name))
            shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)


def _restore_newest(manager: ocp.CheckpointManager, state: TrainState, position: dict) -> tuple[TrainState, dict]:
    """The newest checkpoint that restores (an unreadable one is named and skipped); none: step 0, said."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure to read it means: use an older one
            log.warning("skipping checkpoint step %d in %s: it cannot be restored (%s: %s)", step,
                        manager.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            continue
        return restored.state, restored.position
    log.warning("no complete checkpoint in %s: the run restarts from step 0", manager.directory)
    return state, position


def _save(manager: ocp.CheckpointManager, state: TrainState, position: dict) -> None:
    manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          position=ocp.args.JsonSave(position)))
    manager.wait_until_finished()


def _truncate_metrics(path: str, step: int) -> None:
    """Keeps the log lines of steps up to `step` (the checkpoint resumed from); later ones ran after it and are
    run again. A torn last line (a kill mid-write) is named and dropped; a bad line elsewhere is an error."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept, dropped = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            at = check(entry.get("step") if isinstance(entry, dict) else None, int, f"{path}:{n} `step`")
        except (ValueError, UnicodeDecodeError) as e:
            if n < len(lines) - 1:  # not the last line (the file ends with "\n", so the last piece is empty)
                raise RunDirectoryError(f"{path}:{n}: not a metrics line ({e})") from None
            log.warning("%s:%d is torn (a kill cut it off mid-write): dropped", path, n)
            continue
        if at <= step:
            kept.append(line + b"\n")
        else:
            dropped += 1
    if dropped and step == 0:
        log.warning("%s: dropping the %d logged step(s) of the run that had no checkpoint", path, dropped)
    _write_atomic(path, b"".join(kept))


def _progress(first: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=first, unit="step", dynamic_ncols=True)
