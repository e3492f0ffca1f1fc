"""Next-token cross-entropy over a batch, with a loss mask and packed rows; the MoE router's auxiliary losses.

Position t predicts token t+1 (the MTP head: token t+2). A prediction counts when its target is a real token the
loss mask selects (e.g. assistant tokens of chat data) and, in a packed row, belongs to the same document as
position t (and every token between): the last token of one document never learns to predict the next one's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.model.moe import RouterStats


def target_weights(input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                   loss_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                   shift: int = 1) -> jax.Array:
    """[B, T-shift] fp32 in {0, 1}: whether position t's prediction of token t+shift counts (masks as in
    `token_losses`). It depends on the masks alone, so a step can count its tokens before any forward."""
    t = input_ids.shape[1]
    weight = jnp.ones((input_ids.shape[0], t - shift), bool)
    if attention_mask is not None:
        weight &= attention_mask[:, shift:].astype(bool)
    if loss_mask is not None:
        weight &= loss_mask[:, shift:].astype(bool)
    if segment_ids is not None:
        for k in range(shift):  # each step of the way stays in the document (an id may come back later)
            weight &= segment_ids[:, k + 1:t - shift + k + 1] == segment_ids[:, k:t - shift + k]
    return weight.astype(jnp.float32)


def token_losses(logits: jax.Array, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 loss_mask: jax.Array | None = None, segment_ids: jax.Array | None = None, shift: int = 1,
                 ) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood [B, T-shift] in fp32, weight [B, T-shift] in {0, 1}) of each prediction of
    token t+shift from position t.

    Args:
      logits: [B, T', vocab] with T' >= T - shift: the model's (T' = T, shift 1) or the MTP head's
        (T' = T - 1, shift 2) over input_ids.
      input_ids: [B, T].
      attention_mask: [B, T], 0 on padding (never a target).
      loss_mask: [B, T], 1 on the tokens to learn (as targets).
      segment_ids: [B, T] of packed rows: a target in another document than its position is not counted.
    """
    logits = logits[:, :input_ids.shape[1] - shift].astype(jnp.float32)  # fp32 (shared/DESIGN.md: loss in fp32)
    targets = input_ids[:, shift:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weight = target_weights(input_ids, attention_mask=attention_mask, loss_mask=loss_mask, segment_ids=segment_ids,
                            shift=shift)
    return log_z - target_logit, weight


def next_token_loss(logits: jax.Array, input_ids: jax.Array, **masks) -> tuple[jax.Array, jax.Array]:
    """(sum of the counted losses, number of counted tokens): divide after summing over micro-batches, so that
    gradient accumulation weighs every token alike. `shift=2` with the MTP head's logits: its loss."""
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
