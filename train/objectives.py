"""Training objectives: losses over logits with a loss mask."""

import jax
import jax.numpy as jnp


def causal_lm_loss(logits, targets, loss_mask):
    """Summed token cross-entropy and the number of counted tokens.

    logits [B,S,V] float32, targets [B,S] int, loss_mask [B,S] (1 = counted).
    Returning sums lets callers average over any number of batches exactly.
    """
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)
