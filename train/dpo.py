"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023).

A DPO batch is {"chosen": batch, "rejected": batch}, each an LM batch
(tokens, targets, positions, segment_ids, loss_mask [B,S]) whose loss_mask
covers the response tokens. The policy scores both halves in one forward
(concatenated on the batch axis); the reference policy (the frozen base of a
LoRA run, or a frozen copy of the starting params) scores them under
stop_gradient. With m = (pc - rc) - (pr - rr) (policy / reference log-probs
of the chosen / rejected responses):

    sigmoid: -(1 - ls) log sigmoid(beta m) - ls log sigmoid(-beta m)
    ipo:     (m - 1 / (2 beta))^2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..model import forward, head_weights
from ..model.adapters import materialize_outside_layers
from ..model.config import dtype_of
from .objectives import chunked_lm_loss

LM_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def sequence_logprobs(params, cfg, batch, vocab_chunk: int = 0):
    """[B] sum over loss_mask of log p(targets | prefix). `vocab_chunk` > 0:
    the log-softmax over vocab chunks (no [B,S,V] logits), per row."""
    if cfg.family != "decoder":
        raise ConfigError(f"train.objective=dpo needs model.family=decoder, not {cfg.family!r}")
    out, _ = forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                     return_hidden=vocab_chunk > 0)
    mask = batch["loss_mask"].astype(jnp.float32)
    targets = batch["targets"].astype(jnp.int32)
    if vocab_chunk > 0:
        top = materialize_outside_layers(params, dtype_of(cfg.dtype))
        w = head_weights(top, cfg).astype(out.dtype)
        row = lambda h, t, m: chunked_lm_loss(h, w, t, m, vocab_chunk)[0]  # noqa: E731
        return -jax.vmap(row)(out, targets, mask)
    logp = jax.nn.log_softmax(out, axis=-1)
    token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token * mask, axis=-1)


def concat_pairs(batch):
    """{"chosen", "rejected"} -> one LM batch [2B, ...], chosen rows first."""
    return {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]], axis=0)
            for k in LM_KEYS}


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Per-pair losses [B] and metrics [B] from policy (pc, pr) and reference
    (rc, rr) log-probs of the chosen / rejected responses, each [B]."""
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * m)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * m))
    elif loss_type == "ipo":
        losses = jnp.square(m - 1.0 / (2.0 * beta))
    else:
        raise ConfigError(f"train.dpo.loss={loss_type!r} is not one of sigmoid, ipo")
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    metrics = {"rewards_chosen": chosen, "rewards_rejected": rejected,
               "reward_accuracy": (chosen > rejected).astype(jnp.float32),
               "reward_margin": chosen - rejected}
    return losses, metrics


def dpo_sums(policy_params, reference_params, cfg, batch, tcfg, vocab_chunk: int = 0):
    """(sum of per-pair losses, metric sums, number of pairs) of a DPO batch."""
    both = concat_pairs(batch)
    n = batch["chosen"]["tokens"].shape[0]
    policy = sequence_logprobs(policy_params, cfg, both, vocab_chunk)
    reference = jax.lax.stop_gradient(
        sequence_logprobs(reference_params, cfg, both, vocab_chunk))
    losses, metrics = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:],
                               tcfg.dpo.beta, tcfg.dpo.loss, tcfg.dpo.label_smoothing)
    return jnp.sum(losses), {k: jnp.sum(v) for k, v in metrics.items()}, n
