"""Proximal policy optimisation for RLHF (Schulman et al. 2017; Ouyang et al. 2022's
InstructGPT recipe), as TRL's PPOTrainer (v0.12-0.19, "PPOv2") runs it, on GRPO's
rollouts (train/rollout.py): train.objective=ppo.

Each rollout the engine samples one completion per prompt over the policy's params in
place (`Rollouts.sample`); then one jitted pass over the rollout (`score_rollout`)
computes, at the positions that predict completion tokens (loss_mask), the policy's
log-probs at logits / temperature (`old_logps`), the frozen reference's (the starting
policy; with LoRA the base with the adapters off), the value model's values
(`old_values`) and the frozen reward model's score of prompt + completion (pooled as
jaxlm.classify pools), less train.ppo.missing_eos_penalty for a completion without an
EOS token. With kl = logp - ref per token (k1; k3 on request):

    r_t       = -kl_coef kl_t  (+ score at the last completion token)
    delta_t   = r_t + gamma V_{t+1} - V_t          (V past the completion: 0)
    A_t       = delta_t + gamma lam A_{t+1}        (GAE, backwards)
    returns   = A + V;  A whitened over the batch's completion tokens (masked_whiten)

(with whiten_rewards, r is whitened first, its mean kept). The train step (train/step.py)
then runs the policy and the value model on the rollout, ratio = exp(logp - old_logps):

    pg_loss = masked_mean(max(-A ratio, -A clip(ratio, 1 - cliprange, 1 + cliprange)))
    vf_loss = 0.5 masked_mean(max((V - returns)^2,
                                  (clip(V, V_old - cliprange_value, V_old + cliprange_value)
                                   - returns)^2))
    loss    = pg_loss + vf_coef vf_loss

masked over the completion tokens of the whole batch (microbatches add up), for
num_ppo_epochs optimizer steps per rollout (GRPO's num_iterations mechanism: the rollout
in use travels in the data state). One optimizer runs over the params {"policy": the
policy's params (LoRA: its adapters), "value": the value model's}, as TRL's one
optimizer over its PolicyAndValueWrapper. Where TRL adds the score one token past the
last response token (its `sequence_lengths_p1`), here it is at the last completion
token, as InstructGPT's recipe reads.

The value model is a one-score sequence classifier (model.num_labels = 1, the score head
of model/layers/score.py) read at every position: train.ppo.value_init=reward starts it
from the reward model (backbone and head, as TRL's examples do), =policy from the
policy's backbone with a zero head. The reward model is held by the rollouts, read into
its shardings, never trained; its vocabulary must be the policy's.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError, JaxlmError
from ..model import forward, model_specs
from ..model.classify import pooled_scores
from .grpo import token_logps
from .rollout import Rollouts, policy_params

PPO_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "old_logps",
            "old_values", "advantages", "returns")
# sums over completion tokens, logged as their means (train/step.py)
TOKEN_METRICS = ("policy_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "entropy",
                 "approxkl", "ratio")
_LM_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


# ---------------------------------------------------------------- the formulas


def masked_mean(x, mask, axis=None):
    """The mean of x over mask's ones (TRL's masked_mean)."""
    return jnp.sum(x * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_var(x, mask, unbiased: bool = True):
    """The variance of x over mask's ones, with Bessel's correction n / (n - 1) (TRL's
    masked_var; n = 1 leaves the biased value instead of dividing by 0)."""
    centred = x - masked_mean(x, mask)
    var = masked_mean(jnp.square(centred), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / sqrt(var + 1e-8) over mask's ones; shift_mean=False adds the mean
    back (TRL's masked_whiten)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_rewards(logps, ref_logps, scores, mask, *, kl_coef: float, estimator: str = "k1"):
    """(rewards [B, T], kl [B, T]) over the completion tokens (mask [B, T]): the KL
    penalty -kl_coef kl_t per token, and each row's score [B] added at its last one."""
    mask = mask.astype(jnp.float32)
    logr = ref_logps - logps
    kl = (-logr if estimator == "k1" else jnp.expm1(logr) - logr) * mask
    t = jnp.arange(mask.shape[-1])
    last = jnp.argmax(t * mask, axis=-1)  # the last completion position of each row
    at_last = (t[None] == last[:, None]) & (jnp.sum(mask, -1) > 0)[:, None]
    return -kl_coef * kl + scores[:, None] * at_last, kl


def gae(rewards, values, *, gamma: float, lam: float):
    """(advantages, returns) [B, T] by generalised advantage estimation, backwards over
    T: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns
    A + V; V_T = 0 and A_T = 0 past the end. (Rewards and values are 0 outside the
    completion, so a completion that ends before T ends its sum there.)"""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)

    def back(following, xs):
        r, v, v_next = xs
        a = r + gamma * v_next - v + gamma * lam * following
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros_like(values[:, 0]),
                          (rewards.T, values.T, next_values.T), reverse=True)
    adv = adv.T
    return adv, adv + values


def advantages_and_returns(rewards, values, mask, *, gamma: float, lam: float,
                           whiten_rewards: bool = False):
    """(whitened advantages, returns) [B, T] of a rollout's per-token rewards and values
    over its completion tokens (mask); both 0 outside them."""
    mask = mask.astype(jnp.float32)
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = gae(rewards, values, gamma=gamma, lam=lam)
    return masked_whiten(adv, mask) * mask, returns * mask


def per_token_losses(logps, old_logps, advantages, vpred, old_values, returns, *,
                     cliprange: float, cliprange_value: float):
    """(pg loss [B, T], unhalved value loss [B, T], {ratio, pg_clipped, vf_clipped})."""
    vclipped = jnp.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf1, vf2 = jnp.square(vpred - returns), jnp.square(vclipped - returns)
    ratio = jnp.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return (jnp.maximum(pg1, pg2), jnp.maximum(vf1, vf2),
            {"ratio": ratio, "pg_clipped": pg2 > pg1, "vf_clipped": vf2 > vf1})


def ppo_loss(logps, old_logps, advantages, vpred, old_values, returns, mask, *,
             cliprange: float, cliprange_value: float, vf_coef: float):
    """(loss, pg_loss, vf_loss) of one batch, TRL's PPOTrainer's: loss = pg_loss + vf_coef
    vf_loss, each a masked mean over the completion tokens."""
    mask = mask.astype(jnp.float32)
    pg, vf, _ = per_token_losses(logps, old_logps, advantages, vpred, old_values, returns,
                                 cliprange=cliprange, cliprange_value=cliprange_value)
    pg_loss, vf_loss = masked_mean(pg, mask), 0.5 * masked_mean(vf, mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss


# ---------------------------------------------------------------- the models


def values_of(params, vcfg, batch):
    """[B, S] float32: the value model's one score at every position."""
    scores, _ = forward(params, vcfg, batch["tokens"], batch["positions"], batch["segment_ids"])
    return scores[..., 0]


def reward_config(tcfg):
    """The reward model's ModelConfig (its config.yaml / config.json; no weights read)."""
    from ..api import model_config_of
    return model_config_of(tcfg.ppo.reward_model_path)


def value_config(cfg):
    """The value model's ModelConfig: the reward model's (value_init=reward), or the
    policy's with one score in place of its LM head (value_init=policy)."""
    if cfg.train.ppo.value_init == "reward":
        return reward_config(cfg.train)
    return dataclasses.replace(cfg.model, num_labels=1, pad_token_id=-1, label_names=())


def check_ppo(cfg) -> None:
    """One-line ConfigError unless train.ppo.reward_model_path is a one-score decoder
    classifier with the policy's vocabulary (and tokenizer, where both dirs hold one),
    and train.init_from names the policy; called before the run dir is written."""
    if cfg.train.objective != "ppo":
        return
    path = cfg.train.ppo.reward_model_path
    if not path:
        raise ConfigError("train.objective=ppo needs a reward model: train.ppo.reward_model_path"
                          "=PATH (a jaxlm reward run dir or a Hugging Face "
                          "*ForSequenceClassification dir)")
    if not os.path.isdir(path):
        raise ConfigError(f"train.ppo.reward_model_path={path} is not a directory (a jaxlm "
                          "reward run dir or a Hugging Face *ForSequenceClassification dir)")
    if not cfg.train.init_from:
        raise ConfigError("train.objective=ppo needs the policy to start from: "
                          "train.init_from=PATH (an SFT run or a Hugging Face dir)")
    reward = reward_config(cfg.train)
    if reward.num_labels != 1 or reward.family != "decoder":
        raise ConfigError(f"train.ppo.reward_model_path={path} is not a one-score decoder "
                          f"classifier (model.family={reward.family}, num_labels="
                          f"{reward.num_labels}): train one with train.objective=reward")
    if reward.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"train.ppo.reward_model_path={path} has a vocabulary of {reward.vocab_size} "
            f"tokens, the policy {cfg.model.vocab_size} (model.vocab_size): the reward model "
            "scores the policy's token ids, so both need the same vocabulary")
    from ..model.tokenizer import load_tokenizer
    from .prepare import tokenizer_digest
    try:
        ours, theirs = load_tokenizer(cfg.train.init_from), load_tokenizer(path)
    except JaxlmError:  # a dir without a tokenizer: the vocabulary sizes are all to compare
        return
    if tokenizer_digest(ours) != tokenizer_digest(theirs):
        raise ConfigError(
            f"train.ppo.reward_model_path={path} has another tokenizer than the policy "
            f"(train.init_from={cfg.train.init_from}; digests {tokenizer_digest(theirs)} and "
            f"{tokenizer_digest(ours)}): the reward model scores the policy's token ids, so "
            "both need the same vocabulary")


def _shardings(mcfg, cfg, mesh):
    from ..model.params import logical_axes
    from ..sharding.rules import tree_shardings
    return tree_shardings(mesh, logical_axes(model_specs(mcfg)), cfg.mesh.rules)


def load_reward_model(cfg, mesh, step: int | None = None):
    """The reward model's params (a jaxlm one's checkpoint `step`, default its latest),
    each leaf read straight into its sharding."""
    from ..api import load_params
    rcfg = reward_config(cfg.train)
    return load_params(cfg.train.ppo.reward_model_path, rcfg, _shardings(rcfg, cfg, mesh),
                       step)


def value_from_policy(policy, vcfg):
    """The value model's params from the policy's: its backbone, a zero score head."""
    specs = model_specs(vcfg)
    head = {k: specs[k] for k in ("score", "pooler") if k in specs}
    from ..model.params import abstract
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract(head))
    return {**{k: v for k, v in policy.items() if k in specs and k not in head}, **zeros}


def initial_params(cfg, mesh, policy):
    """{"policy": the starting policy's params, "value": the value model's}, placed in
    their shardings: the reward model's weights (value_init=reward), or the policy's
    backbone with a zero score head (value_init=policy)."""
    from ..api import load_params
    vcfg = value_config(cfg)
    sh = _shardings(vcfg, cfg, mesh)
    if cfg.train.ppo.value_init == "reward":
        value = load_params(cfg.train.ppo.reward_model_path, vcfg, sh)
    else:
        value = jax.jit(lambda p: value_from_policy(p, vcfg), out_shardings=sh)(policy)
    return {"policy": policy, "value": value}


# ---------------------------------------------------------------- a rollout


@functools.partial(jax.jit, static_argnames=("mcfg", "vcfg", "rcfg", "tcfg"))
def score_rollout(policy, reference, value, reward, batch, has_eos, *, mcfg, vcfg, rcfg, tcfg):
    """({old_logps, old_values, advantages, returns} [B, S], metrics) of a rollout's LM
    batch: the policy's and the reference's log-probs at logits / temperature, the
    values, the reward model's scores (less missing_eos_penalty where has_eos [B] is 0),
    the per-token rewards and GAE, all at the loss_mask positions (module docstring)."""
    p = tcfg.ppo
    mask = batch["loss_mask"].astype(jnp.float32)
    logps = token_logps(policy, mcfg, batch, p.temperature) * mask
    ref = token_logps(reference, mcfg, batch, p.temperature) * mask
    values = values_of(value, vcfg, batch) * mask
    hidden, _ = forward(reward, rcfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                        return_hidden=True)
    scores = pooled_scores(reward, rcfg, hidden, batch["tokens"], batch["segment_ids"])[:, 0]
    scores = scores - p.missing_eos_penalty * (1.0 - has_eos)
    rewards, kl = token_rewards(logps, ref, scores, mask, kl_coef=p.kl_coef,
                                estimator=p.kl_estimator)
    adv, returns = advantages_and_returns(rewards, values, mask, gamma=p.gamma, lam=p.lam,
                                          whiten_rewards=p.whiten_rewards)
    rows = jnp.asarray(mask.shape[0], jnp.float32)
    # as TRL logs them: per-row sums over the completion, averaged over rows
    non_score = -p.kl_coef * jnp.sum(kl) / rows
    metrics = {"score": jnp.mean(scores), "kl": jnp.sum(kl) / rows,
               "non_score_reward": non_score, "rlhf_reward": jnp.mean(scores) + non_score,
               "value": masked_mean(values, mask)}
    return {"old_logps": logps, "old_values": values, "advantages": adv,
            "returns": returns}, metrics


class PPORollouts(Rollouts):
    """PPO's batch source: GRPO's prompts and sampling (one completion per prompt), scored
    by the reward model, the value model and the reference (module docstring)."""

    def _init_rewards(self) -> None:
        self.reward_cfg, self.value_cfg = reward_config(self.cfg.train), value_config(self.cfg)
        self.reward_params = None  # read onto the training mesh by `place`

    def place(self, mesh, step: int | None = None) -> None:
        self.reward_params = load_reward_model(self.cfg, mesh, step)

    def make(self, state, step: int):
        cfg = self.cfg
        policy = policy_params(cfg, state)
        _, prompts, completions, _, rows = self.sample(policy, step)
        batch = self._layout(rows)
        has_eos = np.asarray([any(t in self.eos for t in r[1]) for r in rows], np.float32)
        out, metrics = score_rollout(policy, state.frozen, state.params["value"],
                                     self.reward_params, {k: batch[k] for k in _LM_KEYS},
                                     has_eos, mcfg=cfg.model, vcfg=self.value_cfg,
                                     rcfg=self.reward_cfg, tcfg=cfg.train)
        out, metrics = jax.device_get((out, metrics))
        batch.update({k: np.asarray(v, np.float32) for k, v in out.items()})
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["completion_length"] = float(np.mean([len(r[1]) for r in rows]))
        metrics["eos_share"] = float(has_eos.mean())
        self.last = {"prompts": prompts, "completions": completions}
        return batch, metrics


# ---------------------------------------------------------------- in the train step


def ppo_sums(policy, value, mcfg, vcfg, batch, tcfg):
    """(loss numerator, metric sums) of a PPO (micro)batch: sum over its completion tokens
    of pg + vf_coef 0.5 vf; the metrics are sums over those tokens (`tokens`: their
    count), divided by the whole batch's count in the step."""
    p = tcfg.ppo
    mask = batch["loss_mask"].astype(jnp.float32)
    logps, entropy = token_logps(policy, mcfg, batch, p.temperature, with_entropy=True)
    vpred = values_of(value, vcfg, batch)
    old = batch["old_logps"].astype(jnp.float32)
    pg, vf, aux = per_token_losses(logps, old, batch["advantages"].astype(jnp.float32), vpred,
                                   batch["old_values"].astype(jnp.float32),
                                   batch["returns"].astype(jnp.float32), cliprange=p.cliprange,
                                   cliprange_value=p.cliprange_value)
    total = lambda x: jnp.sum(jax.lax.stop_gradient(x).astype(jnp.float32) * mask)  # noqa: E731
    sums = {"tokens": jnp.sum(mask), "policy_loss": total(pg), "value_loss": 0.5 * total(vf),
            "pg_clipfrac": total(aux["pg_clipped"]), "vf_clipfrac": total(aux["vf_clipped"]),
            "entropy": total(entropy), "approxkl": total(0.5 * jnp.square(logps - old)),
            "ratio": total(aux["ratio"])}
    return jnp.sum(pg * mask) + p.vf_coef * 0.5 * jnp.sum(vf * mask), sums


__all__ = ["masked_mean", "masked_var", "masked_whiten", "token_rewards", "gae",
           "advantages_and_returns", "per_token_losses", "ppo_loss", "values_of",
           "value_config", "reward_config", "check_ppo", "initial_params", "score_rollout",
           "PPORollouts", "ppo_sums"]
