"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023).

A DPO batch is {"chosen": batch, "rejected": batch}, each an LM batch
(tokens, targets, positions, segment_ids, loss_mask [B,S]) whose loss_mask
covers the response tokens. The policy scores both halves in one forward
(concatenated on the batch axis); the reference policy (the frozen base of a
LoRA run, or a frozen copy of the starting params) scores them under
stop_gradient. With m = (pc - rc) - (pr - rr) (policy / reference log-probs
of the chosen / rejected responses):

    sigmoid: -(1 - ls) log sigmoid(beta m) - ls log sigmoid(-beta m)
    ipo:     (m' - 1 / (2 beta))^2

where m' is m with each response's log-ratio divided by its token count (TRL's IPO,
normalised per token as the IPO authors' results are); ls > 0 is cDPO's label
smoothing (TRL's CPOTrainer sigmoid loss over these log-ratios).

ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024) need no reference (none is
kept: train/state.py). Over the policy's per-token average log-probs ac, ar of the
responses, as TRL's ORPOTrainer and CPOTrainer(loss_type="simpo") compute them:

    orpo:  NLL(chosen, prompt and response tokens) - beta log sigmoid(log odds(ac) - log odds(ar))
    simpo: -(1 - ls) log sigmoid(beta (ac - ar) - gamma) - ls log sigmoid(-beta (ac - ar) + gamma)
           + cpo_alpha NLL(chosen response tokens)

with log odds(p) = p - log(1 - exp(p)); each NLL is a token mean over the batch.
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


def sequence_logprobs(params, cfg, batch, vocab_chunk: int = 0, masks=None):
    """[B] sum over loss_mask of log p(targets | prefix). `vocab_chunk` > 0:
    the log-softmax over vocab chunks (no [B,S,V] logits), per row. `masks`: a list
    of [B, S] masks instead of loss_mask: a list of [B] sums, one forward."""
    if cfg.family != "decoder":
        raise ConfigError(f"a preference objective needs model.family=decoder, not "
                          f"{cfg.family!r}")
    out, _ = forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                     return_hidden=vocab_chunk > 0)
    several = masks is not None
    masks = [m.astype(jnp.float32) for m in (masks if several else [batch["loss_mask"]])]
    targets = batch["targets"].astype(jnp.int32)
    if vocab_chunk > 0:
        top = materialize_outside_layers(params, dtype_of(cfg.dtype))
        w = head_weights(top, cfg).astype(out.dtype)
        row = lambda h, t, m: chunked_lm_loss(h, w, t, m, vocab_chunk,  # noqa: E731
                                              cfg.final_logit_softcap)[0]
        sums = [-jax.vmap(row)(out, targets, m) for m in masks]
    else:
        logp = jax.nn.log_softmax(out, axis=-1)
        token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        sums = [jnp.sum(token * m, axis=-1) for m in masks]
    return sums if several else sums[0]


def target_mask(batch):
    """[B, S] float: every position whose target is the next token of its example (the
    prompt's tokens too): the tokens TRL's ORPO NLL counts."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return jnp.pad(same, ((0, 0), (0, 1))).astype(jnp.float32)


def concat_pairs(batch):
    """{"chosen", "rejected"} -> one LM batch [2B, ...], chosen rows first."""
    return {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]], axis=0)
            for k in LM_KEYS}


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """Per-pair losses [B] and metrics [B] from policy (pc, pr) and reference
    (rc, rr) log-probs of the chosen / rejected responses, each [B]; ipo divides each
    log-ratio by its response's token count (`chosen_tokens`, `rejected_tokens` [B];
    None: 1)."""
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * m)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * m))
    elif loss_type == "ipo":
        per_token = lambda x, n: x if n is None else x / jnp.maximum(n, 1.0)  # noqa: E731
        m_avg = per_token(pc - rc, chosen_tokens) - per_token(pr - rr, rejected_tokens)
        losses = jnp.square(m_avg - 1.0 / (2.0 * beta))
    else:
        raise ConfigError(f"train.dpo.loss={loss_type!r} is not one of sigmoid, ipo (orpo, "
                          "simpo: orpo_loss, simpo_loss)")
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    metrics = {"rewards_chosen": chosen, "rewards_rejected": rejected,
               "reward_accuracy": (chosen > rejected).astype(jnp.float32),
               "reward_margin": chosen - rejected}
    return losses, metrics


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (TRL's)."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(ac, ar, beta: float):
    """Per-pair odds-ratio losses [B] (-beta log sigmoid(log odds ratio); ORPO adds the
    chosen NLL) and metrics [B], from the average log-probs ac, ar [B]."""
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    ratio = jax.nn.log_sigmoid(log_odds)
    return -beta * ratio, {**_reward_metrics(beta * ac, beta * ar), "log_odds_ratio": ratio,
                           "log_odds_chosen": log_odds}


def simpo_loss(ac, ar, beta: float, gamma: float, label_smoothing: float = 0.0):
    """Per-pair SimPO losses [B] and metrics [B] from the average log-probs ac, ar [B]
    (TRL's CPOTrainer.cpo_loss with loss_type="simpo", alpha 0)."""
    logits = (ac - ar) - gamma / beta
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    return losses, _reward_metrics(beta * ac, beta * ar)


def _reward_metrics(chosen, rejected):
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return {"rewards_chosen": chosen, "rewards_rejected": rejected,
            "reward_accuracy": (chosen > rejected).astype(jnp.float32),
            "reward_margin": chosen - rejected}


def nll_mask(batch, loss: str):
    """[B, S]: the chosen tokens whose NLL the loss adds (orpo: prompt and response;
    simpo: the response), or None (sigmoid, ipo)."""
    if loss == "orpo":
        return target_mask(batch["chosen"])
    return batch["chosen"]["loss_mask"] if loss == "simpo" else None


def reference_free_sums(policy_params, cfg, batch, tcfg, vocab_chunk: int, nll_tokens, pairs):
    """ORPO / SimPO: (loss sum, metric sums, pairs) of a (micro)batch such that the sums
    over the whole batch, divided by its `pairs`, are the loss, the NLL term a token mean
    over `nll_tokens`, the whole batch's NLL token count."""
    dcfg = tcfg.dpo
    both = concat_pairs(batch)
    n = batch["chosen"]["tokens"].shape[0]
    full = jnp.concatenate([nll_mask(batch, dcfg.loss),
                            jnp.zeros_like(batch["rejected"]["loss_mask"])], axis=0)
    response, nll = sequence_logprobs(policy_params, cfg, both, vocab_chunk,
                                      [both["loss_mask"], full])
    average = response / jnp.maximum(jnp.sum(both["loss_mask"], axis=-1), 1.0)
    ac, ar = average[:n], average[n:]
    nll_sum = -jnp.sum(nll)
    if dcfg.loss == "orpo":
        losses, metrics = orpo_loss(ac, ar, dcfg.beta)
        weight = 1.0
    else:
        losses, metrics = simpo_loss(ac, ar, dcfg.beta, dcfg.simpo_gamma, dcfg.label_smoothing)
        weight = dcfg.cpo_alpha
    nll_term = nll_sum * (pairs / jnp.maximum(nll_tokens, 1.0))  # / pairs: the token mean
    sums = {k: jnp.sum(v) for k, v in metrics.items()}
    sums["nll_loss"] = jax.lax.stop_gradient(nll_term)
    return jnp.sum(losses) + weight * nll_term, sums, n


def dpo_sums(policy_params, reference_params, cfg, batch, tcfg, vocab_chunk: int = 0,
             nll_tokens=None, pairs=None):
    """(sum of per-pair losses, metric sums, number of pairs) of a DPO batch (ORPO /
    SimPO: `reference_free_sums`, with the whole batch's `nll_tokens` and `pairs`,
    default this batch's)."""
    if tcfg.dpo.reference_free:
        if nll_tokens is None:
            nll_tokens = jnp.sum(nll_mask(batch, tcfg.dpo.loss))
        if pairs is None:
            pairs = batch["chosen"]["tokens"].shape[0]
        return reference_free_sums(policy_params, cfg, batch, tcfg, vocab_chunk, nll_tokens,
                                   pairs)
    both = concat_pairs(batch)
    n = batch["chosen"]["tokens"].shape[0]
    policy = sequence_logprobs(policy_params, cfg, both, vocab_chunk)
    reference = jax.lax.stop_gradient(
        sequence_logprobs(reference_params, cfg, both, vocab_chunk))
    tokens = jnp.sum(both["loss_mask"], axis=-1)
    losses, metrics = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:],
                               tcfg.dpo.beta, tcfg.dpo.loss, tcfg.dpo.label_smoothing,
                               tokens[:n], tokens[n:])
    return jnp.sum(losses), {k: jnp.sum(v) for k, v in metrics.items()}, n
