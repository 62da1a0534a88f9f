"""Group relative policy optimisation (Shao et al. 2024), with DAPO's clip-higher and
token-mean (Yu et al. 2025) and Dr. GRPO's unnormalised sum (Liu et al. 2025): the loss
of TRL's GRPOTrainer (`_compute_loss`, trl 1.16), term for term.

A GRPO batch is an LM batch of rollouts (prompt + completion per row; train/rollout.py)
plus, per position, `old_logps` (the rollout's log-prob of `targets[t]`) and `advantages`
(the row's group-normalised advantage, repeated along the row). With logp the policy's
log-prob of targets[t] at logits / temperature, ratio r = exp(logp - old_logps):

    per_token = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) + beta k3
    k3 = exp(ref - logp) - (ref - logp) - 1          (ref: the reference's log-probs)

over the completion tokens (loss_mask), aggregated by loss_type:
    grpo:        mean over rows of (the row's masked token sum / its token count)
    bnpo, dapo:  masked token sum / the batch's completion tokens
    dr_grpo:     masked token sum / (rows x max_completion_length)
(TRL's dapo divides by the generation batch's tokens; one optimizer batch per
rollout, as here, makes that bnpo's denominator.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..model import forward

GRPO_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "old_logps",
             "advantages")
# sums over completion tokens, logged as their means (train/step.py)
TOKEN_METRICS = ("kl", "entropy", "clip_low", "clip_high", "clip_region")


def token_logps(params, cfg, batch, temperature: float, with_entropy: bool = False):
    """[B, S] log p(targets[t] | prefix) at logits / temperature (and [B, S] entropies)."""
    logits, _ = forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    targets = batch["targets"].astype(jnp.int32)
    token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if not with_entropy:
        return token
    return token, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def per_token_loss(logps, old_logps, advantages, ref_logps, *, beta: float, epsilon: float,
                   epsilon_high: float):
    """(per-token loss [B, S], per-token k3 KL or None, ratio [B, S]); advantages [B, S]."""
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = jnp.exp(d) - d - 1.0
        loss = loss + beta * kl
    return loss, kl, ratio


def aggregate_sum(loss, mask, loss_type: str):
    """The numerator of loss_type's aggregation over these rows (the denominator,
    `denominator`, is the whole batch's: microbatches add up)."""
    masked = loss * mask
    if loss_type == "grpo":
        return jnp.sum(jnp.sum(masked, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    return jnp.sum(masked)


def denominator(mask, loss_type: str, max_completion_length: int):
    """loss_type's denominator over the whole batch's loss_mask [B, S]."""
    rows = jnp.asarray(mask.shape[0], jnp.float32)
    if loss_type == "grpo":
        return rows
    if loss_type == "dr_grpo":
        return rows * max_completion_length
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)  # bnpo, dapo


def grpo_loss(logps, old_logps, advantages, ref_logps, mask, *, beta, epsilon, epsilon_high,
              loss_type, max_completion_length):
    """The loss of one batch: TRL's `_compute_loss` value (a scalar)."""
    mask = mask.astype(jnp.float32)
    loss, _, _ = per_token_loss(logps, old_logps, advantages, ref_logps, beta=beta,
                                epsilon=epsilon, epsilon_high=epsilon_high)
    return (aggregate_sum(loss, mask, loss_type)
            / denominator(mask, loss_type, max_completion_length))


def grpo_sums(policy_params, reference_params, cfg, batch, tcfg):
    """(loss numerator, metric sums) of a GRPO (micro)batch: the metrics are sums over
    completion tokens (KL, entropy, clipped shares) and `tokens`, their count."""
    g = tcfg.grpo
    mask = batch["loss_mask"].astype(jnp.float32)
    logps, entropy = token_logps(policy_params, cfg, batch, g.temperature, with_entropy=True)
    ref = None
    if g.beta != 0.0:
        ref = jax.lax.stop_gradient(token_logps(reference_params, cfg, batch, g.temperature))
    adv = batch["advantages"].astype(jnp.float32)
    loss, kl, ratio = per_token_loss(logps, batch["old_logps"].astype(jnp.float32), adv, ref,
                                     beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_upper)
    ratio = jax.lax.stop_gradient(ratio)
    low = ((ratio < 1.0 - g.epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + g.epsilon_upper) & (adv > 0)).astype(jnp.float32)
    total = lambda x: jnp.sum(jax.lax.stop_gradient(x) * mask)  # noqa: E731
    sums = {"tokens": jnp.sum(mask), "entropy": total(entropy), "clip_low": total(low),
            "clip_high": total(high), "clip_region": total(jnp.maximum(low, high)),
            "kl": total(kl) if kl is not None else jnp.zeros((), jnp.float32)}
    return aggregate_sum(loss, mask, g.loss_type), sums
