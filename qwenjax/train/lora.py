"""LoRA adapters on any linear layer of Qwen3.5, the Gated DeltaNet projections included, and merging them back.

    m = add_lora(qwenjax.from_pretrained(path), LoRAConfig(rank=16, alpha=32))   # B = 0: same logits as before
    ... train: the train step updates only the LoRAParam leaves when a model has any ...
    export_hf(base, out_dir, params=merge_lora(m).params)                       # plain weights, W + (alpha/r) B A
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from qwenjax.model.layers import Linear, LoRA
from qwenjax.sharding import param_shardings
from qwenjax.validate import check_fields

# Every linear layer of the dense text model, by attribute name.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GDN_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + GDN_TARGETS + MLP_TARGETS
# The vision tower's: block attention and MLP, and the patch merger's MLP (also named linear_fc1/2). Not in the
# default targets: the tower is frozen unless asked for.
VISION_TARGETS = ("qkv", "proj", "linear_fc1", "linear_fc2")
# The MTP head's own projection (its decoder layer's linears carry the text model's names). Its adapters learn only
# with an MTP loss term (`TrainConfig.mtp_weight`).
MTP_TARGETS = ("fc",)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS  # attribute names of the Linear layers that get adapters
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "LoRAConfig")
        problems = []
        if not self.alpha > 0:
            problems.append(f"alpha={self.alpha} must be > 0")
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        known = ALL_TARGETS + VISION_TARGETS + MTP_TARGETS + ("lm_head",)
        unknown = sorted(set(self.targets) - set(known))
        if unknown or not self.targets:
            problems.append(f"targets {unknown or '()'}: choose among {known}")
        if problems:
            raise ValueError("LoRAConfig: " + "; ".join(problems))


def _linears(model):
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and path:
            yield path, module


def _module_copy(m):
    """m's module over new Variables (same arrays), so editing it leaves `m` untouched."""
    return nnx.merge(m.graphdef, jax.tree.map(lambda x: x, m.params))


def add_lora(m, cfg: LoRAConfig):
    """A copy of model `m` (a `qwenjax.Qwen35`) with adapters on every Linear whose name is in cfg.targets."""
    model = _module_copy(m)
    rngs = nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1)
    count = 0
    for path, linear in _linears(model):
        if path[-1] in cfg.targets:
            out_f, in_f = linear.weight.shape
            linear.lora = nnx.data(LoRA(in_f, out_f, linear.axes, rank=cfg.rank, alpha=cfg.alpha,
                                        dropout=cfg.dropout, rngs=rngs, param_dtype=linear.weight.dtype))
            count += 1
    if not count:
        raise ValueError(f"LoRA targets {cfg.targets} match no linear layer of this model")
    graphdef, params = nnx.split(model)
    return m.replace(graphdef=graphdef, params=jax.device_put(params, param_shardings(params, m.mesh, m.rules)))


def merge_lora(m):
    """Model `m` with every adapter folded into its weight (W + (alpha/rank) B A, rounded once to W's dtype) and
    removed: the base architecture again, ready for `export_hf`."""
    model = _module_copy(m)
    for _, linear in _linears(model):
        if linear.lora is not None:
            w = linear.weight[...]
            linear.weight[...] = (w.astype(jax.numpy.float32) + linear.lora.delta()).astype(w.dtype)
            linear.lora = nnx.data(None)
    graphdef, params = nnx.split(model)
    return m.replace(graphdef=graphdef, params=params)
