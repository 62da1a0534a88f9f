"""KTO (Ethayarajh et al. 2024, train.objective=kto): unpaired completions, each
desirable or not, against a reference policy, as TRL's KTOTrainer computes it.

A KTO batch (train/preference.py `kto_batches`) is {"completion": rows, "kl": rows,
"label": [B, S]}: row i of "completion" is prompt_i + completion_i (loss_mask on the
completion), row i of "kl" the mismatched prompt_i + completion_{i-1} of the same
batch (TRL's rotation), "label" 1 for a desirable completion (every column). With
the sequence log-probs over the completion tokens of the policy (p) and the frozen
reference (r):

    z    = max(0, mean_i(p_kl - r_kl))            (no gradient: TRL computes it without)
    loss = desirable_weight (1 - sigmoid(beta (p - r - z)))     desirable rows
           undesirable_weight (1 - sigmoid(beta (z - p + r)))   undesirable rows

averaged over rows. Logged: kl (z), rewards_chosen / rewards_rejected (beta (p - r)
averaged over the desirable / undesirable rows) and their difference, reward_margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .dpo import LM_KEYS, sequence_logprobs


def kto_loss(policy, reference, policy_kl, reference_kl, desirable, valid, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """(per-row losses [B], the KL estimate z [], per-row rewards [B]): `desirable` and
    `valid` [B] 0/1 (valid 0: an empty row, no loss and not in z's mean)."""
    valid = valid.astype(jnp.float32)
    desirable = desirable.astype(jnp.float32)
    z = jnp.sum((policy_kl - reference_kl) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    z = jnp.maximum(jax.lax.stop_gradient(z), 0.0)
    ratio = policy - reference
    chosen = 1.0 - jax.nn.sigmoid(beta * (ratio - z))
    rejected = 1.0 - jax.nn.sigmoid(beta * (z - ratio))
    losses = (desirable * desirable_weight * chosen
              + (1.0 - desirable) * undesirable_weight * rejected) * valid
    return losses, z, jax.lax.stop_gradient(beta * ratio)


def kto_sums(policy_params, reference_params, cfg, batch, tcfg, vocab_chunk: int = 0):
    """(sum of per-row losses, metric sums, rows) of a KTO batch."""
    rows = {k: jnp.concatenate([batch["completion"][k], batch["kl"][k]], axis=0)
            for k in LM_KEYS}
    n = batch["completion"]["tokens"].shape[0]
    policy = sequence_logprobs(policy_params, cfg, rows, vocab_chunk)
    reference = jax.lax.stop_gradient(
        sequence_logprobs(reference_params, cfg, rows, vocab_chunk))
    valid = jnp.any(batch["completion"]["segment_ids"] > 0, axis=-1).astype(jnp.float32)
    desirable = (batch["label"][:, 0] > 0.5).astype(jnp.float32) * valid
    k = tcfg.kto
    losses, z, rewards = kto_loss(policy[:n], reference[:n], jax.lax.stop_gradient(policy[n:]),
                                  reference[n:], desirable, valid, k.beta, k.desirable_weight,
                                  k.undesirable_weight)
    undesirable = valid - desirable
    count = jnp.sum(valid)
    sums = {"kl": z * count, "desirable": jnp.sum(desirable), "undesirable": jnp.sum(undesirable),
            "rewards_chosen": jnp.sum(rewards * desirable),
            "rewards_rejected": jnp.sum(rewards * undesirable)}
    return jnp.sum(losses), sums, count


def kto_metrics(sums, n):
    """Logged means from summed KTO metrics (`kto_sums`) over n rows."""
    chosen = sums["rewards_chosen"] / jnp.maximum(sums["desirable"], 1.0)
    rejected = sums["rewards_rejected"] / jnp.maximum(sums["undesirable"], 1.0)
    return {"kl": sums["kl"] / n, "rewards_chosen": chosen, "rewards_rejected": rejected,
            "reward_margin": chosen - rejected}
