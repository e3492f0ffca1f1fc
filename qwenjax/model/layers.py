"""Building blocks shared by the Qwen3.5 layers: linear, embedding, norms, SwiGLU MLP, interleaved mRoPE.

Weights are stored exactly as Hugging Face stores them (a linear weight is [out, in]), so loading and exporting
are copies, never transposes. Each parameter carries its logical axis names for `qwenjax.sharding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import Qwen35Config
from qwenjax.ops.kernels import Kernels
from qwenjax.ops.matmul import matmul_wt

Axes = tuple[str | None, ...]


def normal_init(std: float = 0.02):
    return jax.nn.initializers.normal(std)


class LoRAParam(nnx.Param):
    """A LoRA adapter weight. When a model holds any, training updates only these."""


class LoRA(nnx.Module):
    """A low-rank update of a Linear: y += (alpha / rank) · (dropout(x) · Aᵀ) · Bᵀ, i.e. ΔW = (alpha / rank) · B A.

    A [rank, in] starts random (Kaiming-uniform, as PEFT), B [out, rank] at zero, so the model is unchanged until
    B is trained. Dropout is active only in training (`model.train()`).
    """

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, rank: int, alpha: float,
                 dropout: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        bound = (6.0 / in_features) ** 0.5 / (1 + 5) ** 0.5  # kaiming_uniform(a=sqrt(5)), PEFT's default
        self.a = LoRAParam(jax.random.uniform(rngs.params(), (rank, in_features), param_dtype, -bound, bound),
                           logical_axes=(None, axes[1]))
        self.b = LoRAParam(jnp.zeros((out_features, rank), param_dtype), logical_axes=(axes[0], None))
        self.scale = alpha / rank
        self.dropout = nnx.data(nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout else None)

    def __call__(self, x: jax.Array, dtype, matmul: str) -> jax.Array:
        """The update for x in `dtype`, fp32; `matmul` is the implementation of `matmul_wt` to use."""
        if self.dropout is not None:
            x = self.dropout(x)
        h = matmul_wt(x, self.a[...].astype(dtype), implementation=matmul).astype(dtype)
        return matmul_wt(h, self.b[...].astype(dtype), implementation=matmul) * self.scale

    def delta(self) -> jax.Array:
        """ΔW [out, in] in fp32: what merging adds to the weight."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST) * self.scale


class Linear(nnx.Module):
    """y = x · Wᵀ (+ b) with W of shape [out, in], computed in `dtype` with fp32 accumulation (`kernels.cpu_matvec`
    picks the implementation); plus a LoRA update when `qwenjax.train.lora.add_lora` attached one."""

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, rngs: nnx.Rngs, kernels: Kernels,
                 param_dtype=jnp.float32, dtype=None, use_bias: bool = False):
        self.weight = nnx.Param(normal_init()(rngs.params(), (out_features, in_features), param_dtype),
                                logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=axes[:1]) if use_bias else None
        self.dtype = dtype
        self.axes = axes
        self.kernels = kernels
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        w = self.weight[...].astype(dtype)
        y = matmul_wt(x.astype(dtype), w, implementation=self.kernels.cpu_matvec)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora is not None:
            y = y + self.lora(x.astype(dtype), dtype, self.kernels.cpu_matvec)
        return y.astype(dtype)


class Embed(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, kernels: Kernels,
                 param_dtype=jnp.float32, dtype=None):
        self.weight = nnx.Param(normal_init()(rngs.params(), (num_embeddings, features), param_dtype),
                                logical_axes=("vocab", "embed"))
        self.dtype = dtype
        self.kernels = kernels

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype or self.weight.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits = x · Eᵀ."""
        dtype = self.dtype or x.dtype
        return matmul_wt(x.astype(dtype), self.weight[...].astype(dtype),
                         implementation=self.kernels.cpu_matvec).astype(dtype)


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm of the decoder and of attention q/k: x·rsqrt(mean(x²)+eps)·(1+w), all in fp32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axes: Axes = (None,)):
        self.weight = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """The GDN output norm: (w · rmsnorm(x)) · silu(z). NOT zero-centred (w starts at 1).

    The cast sequence follows the reference: normalise in fp32, cast to the input dtype, scale by w, then gate
    with silu(z) in fp32 and cast back.
    """

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(None,))
        self.eps = eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        y = self.weight[...].astype(x.dtype) * y
        return (y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, kernels: Kernels, param_dtype=jnp.float32,
                 dtype=None):
        kw = dict(rngs=rngs, kernels=kernels, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(hidden, intermediate, ("mlp", "embed"), **kw)
        self.up_proj = Linear(hidden, intermediate, ("mlp", "embed"), **kw)
        self.down_proj = Linear(intermediate, hidden, ("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- rotary position embedding -----------------------------------------------------------------------------------
def rope_cos_sin(cfg: Qwen35Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, rotary_dim] (fp32) for partial, interleaved multimodal RoPE.

    `positions` is [B, T] (text: one stream) or [3, B, T] (temporal, height, width streams). Frequency i uses
    the height stream if i % 3 == 1 and i < 3*mrope_section[1], the width stream if i % 3 == 2 and
    i < 3*mrope_section[2], else the temporal stream; the table is then duplicated (rotate-half convention).
    """
    dim = cfg.rotary_dim
    inv_freq, scale = rope_frequencies(cfg)
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, dim/2]
    i = jnp.arange(dim // 2)
    _, sec_h, sec_w = cfg.mrope_section
    stream = jnp.where((i % 3 == 1) & (i < 3 * sec_h), 1, jnp.where((i % 3 == 2) & (i < 3 * sec_w), 2, 0))
    freqs = jnp.where(stream == 1, freqs[1], jnp.where(stream == 2, freqs[2], freqs[0]))  # [B, T, dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if scale == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def rope_frequencies(cfg: Qwen35Config) -> tuple[jax.Array, float]:
    """(inverse frequencies [rotary_dim/2] fp32, the factor on cos and sin). YaRN (Peng et al. 2023) keeps the
    fast frequencies, divides the slow ones by `factor`, ramps linearly between them and scales cos/sin by the
    attention factor; each step in transformers' order and precision (`_compute_yarn_parameters`)."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if cfg.yarn is None:
        return 1.0 / pos_freqs, 1.0
    y = cfg.yarn

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = y.attention_factor
    if attention_factor is None:
        attention_factor = (mscale(y.factor, y.mscale) / mscale(y.factor, y.mscale_all_dim)
                            if y.mscale and y.mscale_all_dim else mscale(y.factor))

    def correction_dim(rotations):  # the dimension that turns `rotations` times over the original length
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # the share of the original (fast) frequency
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of x [B, T, H, D] (rotate-half convention), in fp32."""
    rot = cos.shape[-1]
    x32 = x.astype(jnp.float32)
    xr, xp = x32[..., :rot], x32[..., rot:]
    x1, x2 = jnp.split(xr, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([xr * c + rotated * s, xp], axis=-1).astype(x.dtype)
