"""Reward models (train.objective=reward): the Bradley-Terry loss on preference pairs.

A reward model is a sequence classifier with one score (model.num_labels = 1, the
`*ForSequenceClassification` layout): its score head reads the hidden state of a
sequence's last non-pad token (`jaxlm.model.layers.score.pool_positions`). On a
preference batch (train/preference.py: {"chosen": rows, "rejected": rows}, each the
prompt followed by its response) the chosen and rejected rows are scored in one
forward, and with r_w, r_l their scores and m the pair's "margin" column (0 without
one), as TRL's RewardTrainer computes it:

    loss = -log sigmoid(r_w - r_l - m)  [+ center_rewards_coefficient (r_w + r_l)^2]

averaged over pairs. Logged: reward_accuracy (r_w > r_l), reward_margin (r_w - r_l),
rewards_chosen and rewards_rejected (means).

Started from a causal LM (train.init_from), the LM head is dropped and a fresh score
head is initialised (`fresh_score_head`), as AutoModelForSequenceClassification(
num_labels=1) does; a *ForSequenceClassification dir keeps its head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..model import forward, model_specs
from ..model.classify import pooled_scores
from ..model.params import initialize
from .dpo import concat_pairs

METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
_SCORE_STREAM = 0x73636f72  # "scor": the fresh score head's key, folded into train.seed


def reward_loss(chosen, rejected, margin=None, center_rewards_coefficient: float = 0.0):
    """Per-pair losses [B] and metrics [B] from the scores of the chosen and rejected
    sequences [B] (and a margin [B] the chosen one should win by)."""
    diff = chosen - rejected
    losses = -jax.nn.log_sigmoid(diff if margin is None else diff - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * jnp.square(chosen + rejected)
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return losses, {"rewards_chosen": chosen, "rewards_rejected": rejected,
                    "reward_accuracy": (chosen > rejected).astype(jnp.float32),
                    "reward_margin": chosen - rejected}


def valid_pairs(batch):
    """[B] float: the pairs of a preference batch that hold an example (a short eval
    batch is padded with empty pairs)."""
    return jnp.any(batch["chosen"]["segment_ids"] > 0, axis=-1).astype(jnp.float32)


def reward_sums(params, cfg, batch, tcfg, dropout_key=None):
    """(sum of per-pair losses, metric sums, pairs) of a preference batch."""
    both = concat_pairs(batch)
    n = batch["chosen"]["tokens"].shape[0]
    keyed = {} if dropout_key is None else {"dropout_key": dropout_key}
    hidden, _ = forward(params, cfg, both["tokens"], both["positions"], both["segment_ids"],
                        return_hidden=True, **keyed)
    scores = pooled_scores(params, cfg, hidden, both["tokens"], both["segment_ids"])[:, 0]
    margin = batch["chosen"]["margin"][:, 0] if "margin" in batch["chosen"] else None
    losses, metrics = reward_loss(scores[:n], scores[n:], margin,
                                  tcfg.reward.center_rewards_coefficient)
    valid = valid_pairs(batch)
    return (jnp.sum(losses * valid), {k: jnp.sum(v * valid) for k, v in metrics.items()},
            jnp.sum(valid))


def fresh_score_head(lm_params, cfg, seed: int):
    """A causal LM's params as the reward model `cfg`'s (num_labels = 1): the LM head
    dropped, the score head drawn as the model's specs say (normal(init_std), as HF
    initialises it), keyed by `seed`."""
    specs = model_specs(cfg)
    head = {k: specs[k] for k in ("score", "pooler") if k in specs}
    key = jax.random.fold_in(jax.random.key(seed), _SCORE_STREAM)
    body = {k: v for k, v in lm_params.items() if k in specs and k not in head}
    return {**body, **initialize(head, key)}
