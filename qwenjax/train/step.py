"""The train step: next-token loss → gradients accumulated over micro-batches → clipped AdamW with warmup and
cosine decay.

When the parameters hold LoRA adapters (`qwenjax.train.lora.add_lora`), only the adapters are differentiated and
optimised; the base weights stay frozen and carry no optimizer state. A vision tower is frozen the same way unless
`TrainConfig.train_vision` (LoRA adapters on its linears train either way), and the MTP head unless its loss is on
(`TrainConfig.mtp_weight`); `TrainConfig.mtp_only` trains the MTP head alone on the frozen model.

Numerics: the model computes in its dtype (bf16 in practice); gradients are accumulated, clipped and fed to the
optimizer in fp32, and the optimizer state is fp32. With `master_fp32` the step also keeps fp32 master weights
and the model's weights are their rounding; without it the bf16 weights are updated directly (in fp32, then
rounded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwenjax import _compat
from qwenjax.model.layers import LoRAParam
from qwenjax.model.qwen35 import NO_MTP, REMAT_POLICIES
from qwenjax.sharding import ShardingRules, activation_sharding
from qwenjax.train.loss import load_balancing_loss, next_token_loss, router_z_loss, target_weights
from qwenjax.validate import check_fields

# [grad_accum, B, T] arrays; with pictures also positions [grad_accum, 3, B, T] and vision (a PackedVision of
# [grad_accum, ...] arrays: qwenjax.train.data.pack_pictures)
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions", "vision")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    final_lr_ratio: float = 0.1       # the cosine ends at learning_rate * final_lr_ratio
    weight_decay: float = 0.1         # decoupled; not applied to 1-D parameters (norms, A_log, dt_bias, biases)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0            # global gradient norm; 0 turns clipping off
    grad_accum: int = 1               # micro-batches per step
    remat: str = "none"               # "none", "full" or "dots" (the model's REMAT_POLICIES)
    master_fp32: bool = False
    seed: int = 0                     # dropout masks (LoRA dropout) differ per step and micro-batch
    # MoE models: loss += router_aux_loss_coef · load-balancing loss (None: the model config's
    # `router_aux_loss_coef`, as transformers adds it) + router_z_loss_coef · router z-loss.
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    train_vision: bool = False        # also train the vision tower's weights (frozen by default)
    # loss += mtp_weight · the MTP head's mean loss over its counted tokens (predicting token t+2, masked and
    # packed like the main loss); > 0 trains the head, which is frozen otherwise. mtp_only: train only the head.
    mtp_weight: float = 0.0
    mtp_only: bool = False

    def __post_init__(self):
        check_fields(self, "TrainConfig")  # also: every float finite (a NaN learning rate trains NaN weights)
        problems = []
        if self.learning_rate <= 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.clip_norm < 0:  # a negative norm bound flips the gradient: ascent
            problems.append(f"clip_norm={self.clip_norm} must be >= 0 (0 turns clipping off)")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0:
            problems.append(f"need 0 <= b1, b2 < 1 and eps > 0; got b1={self.b1}, b2={self.b2}, eps={self.eps}")
        if not 0 <= self.final_lr_ratio <= 1:
            problems.append(f"final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        if min(self.router_z_loss_coef, self.router_aux_loss_coef or 0.0) < 0:
            problems.append("router loss coefficients must be >= 0")
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps < 1:
            problems.append(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                            "total_steps >= 1")
        if self.grad_accum < 1:
            problems.append(f"grad_accum={self.grad_accum} must be >= 1")
        if self.mtp_weight < 0 or (self.mtp_only and not self.mtp_weight):
            problems.append(f"mtp_weight={self.mtp_weight} must be >= 0, and > 0 with mtp_only")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat={self.remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.learning_rate, warmup_steps=self.warmup_steps,
            # optax needs a cosine part of >= 1 step; with warmup_steps == total_steps it is never reached
            decay_steps=max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * self.final_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
        adamw = optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                            weight_decay=self.weight_decay, mask=decay_mask)
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), adamw) if self.clip_norm else adamw


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: nnx.State           # the trained parameters, in the model's dtype: what the forward reads
    frozen: nnx.State | None    # the rest (base weights under LoRA), never updated; None: everything trains
    master: nnx.State | None    # fp32 copies of `params` when TrainConfig.master_fp32
    opt_state: Any              # fp32, over `params` only
    step: jax.Array             # int32 scalar: optimizer steps taken

    def all_params(self) -> nnx.State:
        """Trained and frozen parameters together: the model's State (for `Qwen35`, `merge_lora`, export)."""
        return self.params if self.frozen is None else nnx.merge_state(self.params, self.frozen)


def split_trainable(params: nnx.State, cfg: TrainConfig) -> tuple[nnx.State, nnx.State | None]:
    """(trained, frozen): the LoRA adapters and the rest when the model has adapters; with `cfg.mtp_only` the
    MTP head and the rest; else everything but the vision tower (unless `cfg.train_vision`) and the MTP head
    (unless its loss is on: without one, weight decay alone would move it), and the rest (None when nothing is
    frozen)."""
    if cfg.mtp_weight and "mtp" not in params:
        raise ValueError(f"mtp_weight={cfg.mtp_weight}: {NO_MTP}")
    if any(isinstance(v, LoRAParam) for _, v in _compat.variable_items(params)):
        return nnx.split_state(params, LoRAParam, ...)
    if cfg.mtp_only:
        return nnx.split_state(params, lambda path, _: path[0] == "mtp", ...)
    frozen = (set() if cfg.mtp_weight else {"mtp"}) | (set() if cfg.train_vision else {"visual"})
    if any(root in params for root in frozen):
        return nnx.split_state(params, lambda path, _: path[0] not in frozen, ...)
    return params, None


def _fp32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_state(params: nnx.State, cfg: TrainConfig) -> TrainState:
    """The state before the first step, laid out where the parameters are: fp32 masters and Adam moments take
    the sharding of their parameter, scalars (step, counts) are replicated over the parameters' mesh."""
    params, frozen = split_trainable(params, cfg)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    scalar = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
    optimizer = cfg.optimizer()
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, _fp32(params)),
                                          shardings, transform_non_params=lambda _: scalar)

    def build(params):
        # copy: an fp32 parameter (A_log, dt_bias) must not share its buffer with its master (both are donated)
        master = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params) if cfg.master_fp32 else None
        return master, optimizer.init(_fp32(params)), jnp.zeros((), jnp.int32)

    # Committed, with the shardings the step's outputs have: jit compiles again for an input spelled otherwise.
    master, opt_state, step = jax.jit(build, out_shardings=(
        shardings if cfg.master_fp32 else None, opt_shardings, scalar))(params)
    params = jax.device_put(params, shardings)
    return TrainState(params=params, frozen=frozen, master=master, opt_state=opt_state, step=step)


def check_batch(cfg: TrainConfig, batch: dict[str, jax.Array]) -> None:
    unknown = set(batch) - set(BATCH_KEYS)
    if unknown or "input_ids" not in batch:
        raise ValueError(f"batch needs input_ids and may hold {BATCH_KEYS}; got {sorted(batch)}")
    if batch["input_ids"].shape[0] != cfg.grad_accum:
        raise ValueError(f"batch leading axis {batch['input_ids'].shape[0]} != grad_accum {cfg.grad_accum}")


def accumulated_gradients(graphdef: nnx.GraphDef, cfg: TrainConfig, params: nnx.State,
                          batch: dict[str, jax.Array], frozen: nnx.State | None = None,
                          step: jax.Array | int = 0) -> tuple[nnx.State, jax.Array, jax.Array, jax.Array]:
    """(fp32 gradient w.r.t. `params` of the mean loss over every counted token of all micro-batches (plus
    mtp_weight times the MTP head's mean loss), summed main loss, tokens, the MTP head's mean loss or 0).
    `frozen` holds the parameters that are read but not differentiated."""
    rngs, rest = (None, None) if frozen is None else nnx.split_state(frozen, nnx.RngState, ...)
    mask_keys = ("attention_mask", "loss_mask", "segment_ids")
    # The MTP term is a mean over its own counted tokens, the main loss over its; the step divides the summed
    # loss by the main count at the end, so the MTP sum is scaled by main count / MTP count, both counted here
    # from the masks of all micro-batches before any forward.
    if cfg.mtp_weight:
        counts = [jnp.sum(target_weights(batch["input_ids"][i], shift=shift, **{k: batch[k][i] for k in mask_keys
                                                                               if k in batch}))
                  for shift in (1, 2) for i in range(batch["input_ids"].shape[0])]
        n = batch["input_ids"].shape[0]
        main_count, mtp_count = jnp.maximum(sum(counts[:n]), 1.0), jnp.maximum(sum(counts[n:]), 1.0)

    def loss_sum(params, mb, index):
        masks = {k: mb[k] for k in mask_keys if k in mb}
        # Reseeding mutates the dropout streams' Variables, which NNX allows only for Variables created at the
        # current trace level: hence new ones (tree.map copies the Variables, not the arrays).
        fresh_rngs = None if rngs is None else jax.tree.map(lambda x: x, rngs)
        model = nnx.merge(graphdef, *(s for s in (params, rest, fresh_rngs) if s is not None))
        model.train()  # dropout on (LoRA's); the base model has none
        nnx.reseed(model, dropout=jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), step), index))
        kw = dict(attention_mask=masks.get("attention_mask"), segment_ids=masks.get("segment_ids"), remat=cfg.remat,
                  positions=mb.get("positions"), vision=mb.get("vision"))
        outputs = model(mb["input_ids"], router_stats=model.config.is_moe, mtp=bool(cfg.mtp_weight), **kw)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        total, count = next_token_loss(outputs[0], mb["input_ids"], **masks)
        loss, mtp_total = total, jnp.zeros(())
        if cfg.mtp_weight:
            mtp_total, _ = next_token_loss(outputs[1], mb["input_ids"], shift=2, **masks)
            loss = loss + cfg.mtp_weight * mtp_total * (main_count / mtp_count)
        if model.config.is_moe:
            stats = outputs[-1]
            aux_coef = (model.config.router_aux_loss_coef if cfg.router_aux_loss_coef is None
                        else cfg.router_aux_loss_coef)
            # the sum is divided by the token count later: scaling by it adds coef · aux to the mean loss
            aux = aux_coef * load_balancing_loss(stats) + cfg.router_z_loss_coef * router_z_loss(stats)
            loss = loss + aux * count
        return loss, (total, count, mtp_total)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def micro(carry, mb_index):
        mb, index = mb_index
        grads, total, count, mtp_total = carry
        (_, (mb_total, mb_count, mb_mtp)), g = grad_fn(params, mb, index)
        return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), total + mb_total,
                count + mb_count, mtp_total + mb_mtp), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    indices = jnp.arange(batch["input_ids"].shape[0])
    (grads, total, count, mtp_total), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(())),
                                                       (batch, indices))
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    return grads, total, count, (mtp_total / mtp_count if cfg.mtp_weight else mtp_total)


def train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over `batch`, a dict of [grad_accum, B, T] arrays (`input_ids`, and optionally
    `attention_mask`, `loss_mask`, `segment_ids`). The loss is the mean over every counted token of all
    micro-batches. Returns the new state and metrics (loss, tokens, grad_norm before clipping, learning rate)."""
    check_batch(cfg, batch)
    grads, total, count, mtp_loss = accumulated_gradients(graphdef, cfg, state.params, batch, state.frozen,
                                                          state.step)
    base = state.master if state.master is not None else _fp32(state.params)
    updates, opt_state = cfg.optimizer().update(grads, state.opt_state, base)
    new32 = optax.apply_updates(base, updates)
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), new32, state.params)
    new_state = TrainState(params=params, frozen=state.frozen, master=new32 if state.master is not None else None,
                           opt_state=opt_state, step=state.step + 1)
    metrics = {"loss": total / jnp.maximum(count, 1.0), "tokens": count, "grad_norm": optax.tree.norm(grads),
               "learning_rate": cfg.schedule()(state.step)}
    if cfg.mtp_weight:
        metrics["mtp_loss"] = mtp_loss
    return new_state, metrics


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules: ShardingRules) -> dict[str, Any]:
    """Places a batch on `mesh`: rows split by the rules' "batch" axis, pictures replicated (the tower reads a
    micro-batch's patches all together)."""
    axes = {"positions": (None, None, "batch", "seq")}
    return {k: jax.device_put(v, NamedSharding(mesh, P())) if k == "vision" else
            jax.device_put(v, rules.sharding(mesh, axes.get(k, (None, "batch", "seq")), v.shape))
            for k, v in batch.items()}


def jit_train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, mesh: Mesh | None = None,
                   rules: ShardingRules | None = None):
    """`train_step` jitted for this model and config, donating the state.

    With a `mesh` (the model's, `m.mesh`), each batch is split over it by the rules' "batch" axis (data x fsdp
    by default) and the activations are pinned the same way, while the parameters and optimizer state keep the
    shardings they come with: data- and fsdp-parallel training, tensor-parallel where the rules split weights.

    The new state keeps the shardings of the state passed in. Left to jit, they would come back equal but spelled
    differently (P() for P(None,), a NamedSharding for a SingleDeviceSharding), and jit, which caches on the
    spelling, would compile the step a second time on the second call.
    """
    jitted = {}
    rules = rules or ShardingRules()

    def train_step_on_mesh(state: TrainState, batch: dict[str, jax.Array]):
        with activation_sharding(mesh, rules):
            return train_step(graphdef, cfg, state, batch)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        if mesh is not None:
            batch = shard_batch(batch, mesh, rules)
        key = jax.tree.structure(state)
        if key not in jitted:
            shardings = jax.tree.map(lambda x: x.sharding, state)
            jitted[key] = jax.jit(train_step_on_mesh, donate_argnums=0, out_shardings=(shardings, None))
        return jitted[key](state, batch)

    return step
