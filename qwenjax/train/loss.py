"""Next-token cross-entropy over a batch, with a loss mask and packed rows; the MoE router's auxiliary losses.

Position t predicts token t+1. A prediction counts when its target is a real token the loss mask selects (e.g.
assistant tokens of chat data) and, in a packed row, belongs to the same document as position t: the last token
of one document never learns to predict the first token of the next.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.model.moe import RouterStats


def token_losses(logits: jax.Array, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 loss_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T-1] in fp32, weight [B, T-1] in {0, 1}) of each next-token prediction.

    Args:
      logits: [B, T, vocab] from the model over input_ids.
      input_ids: [B, T].
      attention_mask: [B, T], 0 on padding (never a target).
      loss_mask: [B, T], 1 on the tokens to learn (as targets).
      segment_ids: [B, T] of packed rows: a target in another document than its position is not counted.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # log-softmax in fp32 (shared/DESIGN.md: loss in fp32)
    targets = input_ids[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weight = jnp.ones(targets.shape, bool)
    if attention_mask is not None:
        weight &= attention_mask[:, 1:].astype(bool)
    if loss_mask is not None:
        weight &= loss_mask[:, 1:].astype(bool)
    if segment_ids is not None:
        weight &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return log_z - target_logit, weight.astype(jnp.float32)


def next_token_loss(logits: jax.Array, input_ids: jax.Array, **masks) -> tuple[jax.Array, jax.Array]:
    """(sum of the counted losses, number of counted tokens): divide after summing over micro-batches, so that
    gradient accumulation weighs every token alike."""
    with jax.named_scope("loss"):
        nll, weight = token_losses(logits, input_ids, **masks)
        return jnp.sum(nll * weight), jnp.sum(weight)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """The Switch Transformer balance loss as transformers' `load_balancing_loss_func` computes it:
    E · Σ_e f_e · P_e, where f_e is expert e's share of the top-k selections (Σ_e f_e = k) and P_e its mean router
    probability, both over every token of every layer (`stats` summed over the layers)."""
    with jax.named_scope("load_balancing_loss"):
        tokens = jnp.maximum(stats.tokens, 1.0)
        return stats.counts.shape[0] * jnp.sum((stats.counts / tokens) * (stats.probs / tokens))


def router_z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss: the mean over tokens (and layers) of logsumexp(router logits)²."""
    return stats.z / jnp.maximum(stats.tokens, 1.0)
