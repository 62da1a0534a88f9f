"""The jitted train and eval steps: plain, LoRA (frozen base + adapters), the preference
objectives (dpo with its orpo / simpo losses, kto, reward), classify (a sequence
classifier's pooled scores), distill (the frozen tree is the teacher, its config the
static `teacher`), grpo and ppo (the params hold the policy and the value model, whose
config is the static `critic`), each with gradient accumulation.

One `train_step(state, batch)` covers every run kind (see train/state.py):
the trainable tree is `state.params`; the model sees `apply_lora(frozen,
params)` for LoRA runs. With `train.grad_accum_steps` k > 1 the batch is
split into k microbatches (rows j, j + k, ...: each device keeps its share)
scanned inside the step; each microbatch's objective is its loss sum over
the whole batch's denominator (tokens, pairs for DPO and reward, rows for KTO and
classify), so the summed
gradients and losses are exactly the full-batch means. (MoE router losses
are averaged over microbatches.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ..model import forward, head_weights
from ..model.adapters import materialize_outside_layers
from ..config import TrainConfig
from ..model.config import dtype_of
from ..model.classify import pooled_scores
from ..model.families.encoder import mlm_head_inputs
from ..model.layers.embeddings import unembed
from ..model.mtp import mtp_batch, mtp_hiddens
from ..sharding.context import context_reorder, context_size
from ..sharding.rules import constrain
from . import distill, dpo, grpo, kto, ppo, reward
from .lora import apply_lora, lora_scale
from .objectives import causal_lm_loss, chunked_lm_loss, classification_loss, labelled_rows
from .state import TrainState

DPO_METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")
PAIRED = ("dpo", "kto", "reward")  # objectives over preference batches, not LM batches


def loss_fn(params, mcfg, batch, vocab_chunk: int = 0, denominator=None, aux_weight=1.0,
            dropout_key=None, pipeline=None, mtp_weight: float = 0.0):
    """(training objective, (token loss sum, token count, extra metrics)).

    A sequence classifier (model.num_labels > 0) counts rows instead of tokens: its
    loss is over each row's pooled scores and batch["labels"] (accuracy in the extra
    metrics). The objective is the loss sum over `denominator` (default: this
    batch's count, i.e. the mean) plus, for MoE configs, `aux_weight`
    times the router's load-balancing and z losses times their coefficients
    (logged apart). `vocab_chunk` > 0 computes the token loss over vocab chunks.
    `dropout_key`: the model's dropout key (training; None: no dropout).
    `pipeline`: a `jaxlm.sharding.pipeline.Pipeline` (decoders under mesh.stage > 1).
    `mtp_weight` > 0 with model.mtp_depth D > 0: plus the multi-token prediction loss,
    mtp_weight times the mean over depths k of module k's cross-entropy sum on token
    t + 1 + k over the same denominator (DeepSeek-V3's L_MTP; "mtp_loss" in the extra
    metrics, as a sum: divided by the count it is that term).
    """
    keyed = {} if dropout_key is None else {"dropout_key": dropout_key}
    if pipeline is not None:
        keyed["pipeline"] = pipeline
    extra = {}
    if mcfg.num_labels:  # a sequence classifier: one pooled score per row (train/classify.py)
        hidden, aux = forward(params, mcfg, batch["tokens"], batch["positions"],
                              batch["segment_ids"], return_hidden=True, **keyed)
        scores = pooled_scores(params, mcfg, hidden, batch["tokens"], batch["segment_ids"])
        loss_sum, count, extra = classification_loss(scores, batch["labels"][:, 0],
                                                     labelled_rows(batch))
        return _with_router_losses(loss_sum, count, extra, aux, mcfg, denominator, aux_weight)
    mtp = mcfg.family == "decoder" and mcfg.mtp_depth > 0 and mtp_weight > 0
    if mtp:  # each module's inputs and targets, shifted before any reorder
        batch = mtp_batch(batch, mcfg.mtp_depth)
    if mcfg.family == "decoder":  # context parallelism: causal load balancing (identity without)
        batch = context_reorder(batch, context_size())
    if mcfg.family == "encoder_decoder":  # span corruption: encoder inputs -> decoder targets
        out, aux = forward(params, mcfg, batch["tokens"], batch["decoder_tokens"],
                           batch["segment_ids"], batch["decoder_segment_ids"],
                           return_hidden=vocab_chunk > 0, **keyed)
    else:
        out, aux = forward(params, mcfg, batch["tokens"], batch["positions"],
                           batch["segment_ids"], return_hidden=vocab_chunk > 0 or mtp, **keyed)
    heads = [(out, batch["targets"], batch["loss_mask"])]
    if mtp:  # the modules read the model's hidden states; the main loss its logits
        heads += [(h, batch["mtp_targets"][..., k], batch["mtp_mask"][..., k]) for k, h in
                  enumerate(mtp_hiddens(params, mcfg, out, batch, dropout_key))]
        if not vocab_chunk:
            heads = [(unembed(materialize_outside_layers(params, dtype_of(mcfg.dtype)), h,
                              mcfg), t, m) for h, t, m in heads]
    sums = [_token_loss(params, mcfg, h, t, m, vocab_chunk) for h, t, m in heads]
    loss_sum, count = sums[0]
    if mtp:
        extra = {"mtp_loss": mtp_weight * sum(s for s, _ in sums[1:]) / mcfg.mtp_depth}
        loss_sum = loss_sum + extra["mtp_loss"]
    objective, (loss_sum, count, extra) = _with_router_losses(loss_sum, count, extra, aux, mcfg,
                                                              denominator, aux_weight)
    if mtp:  # the token loss logged stays the model's own
        loss_sum = loss_sum - extra["mtp_loss"]
    return objective, (loss_sum, count, extra)


def _token_loss(params, mcfg, out, targets, loss_mask, vocab_chunk):
    """(loss sum, count) of logits (vocab_chunk 0) or hidden states against targets."""
    if vocab_chunk > 0:
        top = materialize_outside_layers(params, dtype_of(mcfg.dtype))
        if mcfg.family == "encoder":  # the MLM head: transform, tied decoder + bias
            out, w = mlm_head_inputs(top, mcfg, out)
        else:
            w = head_weights(top, mcfg).astype(out.dtype)
        return chunked_lm_loss(out, w, targets, loss_mask, vocab_chunk, mcfg.final_logit_softcap)
    return causal_lm_loss(out, targets, loss_mask)


def _with_router_losses(loss_sum, count, extra, aux, mcfg, denominator, aux_weight):
    """loss_fn's result: the loss sum over `denominator` (None: count), plus the MoE
    router losses (logged apart, in `extra`)."""
    denominator = jnp.maximum(count, 1.0) if denominator is None else denominator
    objective = loss_sum / denominator
    if "moe" in aux:
        stats = aux["moe"]
        objective = objective + aux_weight * (mcfg.moe.aux_loss_coef
                                              * stats["load_balancing_loss"]
                                              + mcfg.moe.z_loss_coef * stats["router_z_loss"])
        extra = {**extra, **{f"moe_{k}": v * aux_weight for k, v in stats.items()}}
    return objective, (loss_sum, count, extra)


def _model_params(trainable, frozen, tcfg):
    """(params the model runs, params of the DPO reference policy). PPO: the policy's
    (the value model's are trainable["value"])."""
    if tcfg.objective == "ppo":
        trainable = trainable["policy"]
    if tcfg.lora.rank:
        return apply_lora(frozen, trainable, lora_scale(tcfg)), frozen
    return trainable, frozen


def _objective(trainable, frozen, batch, dropout_key, totals, *, mcfg, tcfg, vocab_chunk, k,
               pipeline=None, teacher=None, critic=None):
    """(objective of one microbatch, additive sums: loss_sum, tokens, metrics)."""
    params, reference = _model_params(trainable, frozen, tcfg)
    if tcfg.objective == "distill":  # `reference`: the teacher's params
        loss_sum, count, extra, aux = distill.distill_sums(params, reference, mcfg, teacher,
                                                           batch, tcfg, vocab_chunk, dropout_key)
        objective, (loss_sum, count, extra) = _with_router_losses(
            loss_sum, count, extra, aux, mcfg, totals["count"], 1.0 / k)
        return objective, {"loss_sum": loss_sum, "tokens": count, **extra}
    count = totals["count"]
    if tcfg.objective in PAIRED:
        if tcfg.objective == "dpo":
            loss_sum, metrics, n = dpo.dpo_sums(params, reference, mcfg, batch, tcfg,
                                                vocab_chunk, totals.get("nll_tokens"), count)
        elif tcfg.objective == "kto":
            loss_sum, metrics, n = kto.kto_sums(params, reference, mcfg, batch, tcfg, vocab_chunk)
        else:
            loss_sum, metrics, n = reward.reward_sums(params, mcfg, batch, tcfg, dropout_key)
        sums = {"loss_sum": loss_sum, "tokens": jnp.asarray(n, jnp.float32), **metrics}
        return loss_sum / count, sums
    if tcfg.objective == "grpo":
        loss_sum, sums = grpo.grpo_sums(params, reference, mcfg, batch, tcfg)
        return loss_sum / count, {"loss_sum": loss_sum, **sums}
    if tcfg.objective == "ppo":  # `critic`: the value model's config
        loss_sum, sums = ppo.ppo_sums(params, trainable["value"], mcfg, critic, batch, tcfg)
        return loss_sum / count, {"loss_sum": loss_sum, **sums}
    objective, (loss_sum, count, extra) = loss_fn(
        params, mcfg, batch, vocab_chunk, denominator=count, aux_weight=1.0 / k,
        dropout_key=dropout_key, pipeline=pipeline,
        mtp_weight=tcfg.mtp_loss_weight if tcfg.objective in ("clm", "sft") else 0.0)
    return objective, {"loss_sum": loss_sum, "tokens": count, **extra}


def _totals(batch, tcfg):
    """The full batch's denominators: {"count": pairs for DPO (ORPO, SimPO: and
    "nll_tokens", the NLL term's), pairs holding an example for reward, rows holding
    one for KTO, labelled rows for classify, GRPO's loss_type's (rows,
    tokens or rows x max length), counted tokens otherwise (PPO: completion tokens)}."""
    if tcfg.objective == "dpo":
        out = {"count": jnp.asarray(batch["chosen"]["tokens"].shape[0], jnp.float32)}
        if tcfg.dpo.reference_free:
            out["nll_tokens"] = jnp.sum(dpo.nll_mask(batch, tcfg.dpo.loss))
        return out
    if tcfg.objective == "reward":
        return {"count": jnp.maximum(jnp.sum(reward.valid_pairs(batch)), 1.0)}
    if tcfg.objective == "kto":
        rows = jnp.any(batch["completion"]["segment_ids"] > 0, axis=-1)
        return {"count": jnp.maximum(jnp.sum(rows.astype(jnp.float32)), 1.0)}
    if tcfg.objective == "grpo":
        return {"count": grpo.denominator(batch["loss_mask"], tcfg.grpo.loss_type,
                                          tcfg.grpo.max_completion_length)}
    if tcfg.objective == "classify":
        return {"count": jnp.maximum(jnp.sum(labelled_rows(batch).astype(jnp.float32)), 1.0)}
    return {"count": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)}


def microbatches(batch, k: int):
    """Every leaf [B, ...] -> [k, B/k, ...]; microbatch j holds rows j, j + k, ..."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                        batch)


def _grads(fn, trainable, frozen, batch, k, key=None):
    """(gradient, sums) of fn summed over k microbatches (scanned), or of one batch.
    `key`: the step's dropout key (microbatch j folds in j), or None."""
    grad = jax.grad(fn, has_aux=True)
    if k == 1:
        return grad(trainable, frozen, batch, key)

    def body(carry, xs):
        mb, j = xs
        mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
        g, s = grad(trainable, frozen, mb, None if key is None else jax.random.fold_in(key, j))
        return jax.tree.map(jnp.add, carry, (g, s)), None

    parts = microbatches(batch, k)
    first = jax.tree.map(lambda x: x[0], parts)
    shapes = jax.eval_shape(grad, trainable, frozen, first, key)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (g, s), _ = jax.lax.scan(body, init, (parts, jnp.arange(k, dtype=jnp.int32)))
    return g, s


DROPOUT_STREAM = 0x64726f70  # "drop": the dropout keys' own stream of train.seed


def dropout_key(mcfg, tcfg, step):
    """The step's dropout key, fold_in(fold_in(key(train.seed), stream), step), or None
    when the model has no dropout. Each (seed, step) has its own masks, so a resumed
    run draws exactly the masks an uninterrupted one does."""
    if not (mcfg.dropout or mcfg.attention_dropout) or tcfg.objective in (
            "dpo", "kto", "grpo", "ppo"):
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(tcfg.seed), DROPOUT_STREAM), step)


def _metrics(sums, tcfg, totals=None):
    n = jnp.maximum(sums["tokens"], 1.0)
    out = {"loss": sums["loss_sum"] / n, "tokens": sums["tokens"]}
    if tcfg.objective == "grpo":  # the loss over loss_type's denominator; token means
        out["loss"] = sums["loss_sum"] / totals["count"]
        out.update({k: sums[k] / n for k in grpo.TOKEN_METRICS})
    if tcfg.objective == "ppo":  # token means over the completion tokens
        out.update({k: sums[k] / n for k in ppo.TOKEN_METRICS})
    if tcfg.objective in ("dpo", "reward"):
        out[f"{tcfg.objective}_loss"] = out["loss"]
        out.update({k: sums[k] / n for k in DPO_METRICS})
        out.update({k: sums[k] / n for k in ("nll_loss", "log_odds_ratio", "log_odds_chosen")
                    if k in sums})
    if tcfg.objective == "kto":
        out["kto_loss"] = out["loss"]
        out.update(kto.kto_metrics(sums, n))
    if tcfg.objective == "distill":
        out.update({k: sums[k] / n for k in distill.METRICS})
    if "mtp_loss" in sums:  # model.mtp_depth: the weighted multi-token prediction term
        out["mtp_loss"] = sums["mtp_loss"] / n
    if "accuracy" in sums:  # classify (num_labels > 1): correct rows / rows
        out["accuracy"] = sums["accuracy"] / n
    out.update({k: v for k, v in sums.items() if k.startswith("moe_")})
    return out


def train_step(state: TrainState, batch, *, mcfg, tx, lr_schedule, vocab_chunk, objective=None,
               tcfg: TrainConfig | None = None, pipeline=None, teacher=None, critic=None):
    """One optimizer step on `batch` (a DPO batch for train.objective=dpo).

    `objective`: a batch transform, e.g. MLM masking keyed by (seed, step).
    A step whose loss, gradient or update is not finite is skipped (params and
    optimizer state kept; the step counter advances): `skipped` is 1 in its
    metrics and `consecutive_skipped` (also `state.skipped`) counts the skips
    in a row, which the loop stops on at train.max_skipped_steps.
    `tcfg` (default: TrainConfig()) picks LoRA, DPO and accumulation; `pipeline`
    (`jaxlm.sharding.pipeline.pipeline_of(cfg)`) runs the layers over the mesh's stages;
    `teacher`: the teacher's ModelConfig (train.objective=distill; its params are
    `state.frozen`); `critic`: the value model's (train.objective=ppo; its params are
    `state.params["value"]`).
    """
    tcfg = tcfg or TrainConfig()
    if objective is not None:
        batch = objective(batch, state.step)
    k = tcfg.grad_accum_steps
    totals = _totals(batch, tcfg)
    fn = functools.partial(_objective, totals=totals, mcfg=mcfg, tcfg=tcfg,
                           vocab_chunk=vocab_chunk, k=k, pipeline=pipeline, teacher=teacher,
                           critic=critic)
    grads, sums = _grads(fn, state.params, state.frozen, batch, k,
                         dropout_key(mcfg, tcfg, state.step))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**_metrics(sums, tcfg, totals), "grad_norm": optax.global_norm(grads),
               "lr": lr_schedule(state.step)}
    ok = _all_finite(metrics["loss"], metrics["grad_norm"], updates)
    params, opt_state = _keep_if_not(ok, (params, opt_state), (state.params, state.opt_state))
    before = 0 if state.skipped is None else state.skipped  # None: a hand-built state
    skipped = jnp.where(ok, 0, before + 1).astype(jnp.int32)
    metrics.update(skipped=(~ok).astype(jnp.int32), consecutive_skipped=skipped)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         skipped=None if state.skipped is None else skipped), metrics


def _all_finite(*trees):
    """Whether every floating-point leaf of `trees` is finite (a scalar bool)."""
    leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _keep_if_not(ok, new, old):
    """`new` where `ok`, else `old`, leaf by leaf: a non-finite step (loss, gradient
    or update) is skipped on device, leaving params and optimizer state unchanged."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def eval_step(params, batch, *, mcfg, vocab_chunk, objective=None, tcfg=None, frozen=None,
              pipeline=None, teacher=None, critic=None):
    """(loss sum, count, metric sums) of a held-out batch: token loss sum and
    tokens, or for DPO the DPO loss sum, pairs and the reward metric sums
    (divide each by count for the means). An MoE model's router statistics are
    training metrics (a per-batch mean, a per-expert load vector), not sums: left out."""
    tcfg = tcfg or TrainConfig()
    if objective is not None:  # with its fixed eval key
        batch = objective(batch, None)
    _, sums = _objective(params, frozen, batch, None, _totals(batch, tcfg), mcfg=mcfg, tcfg=tcfg,
                         vocab_chunk=vocab_chunk, k=1, pipeline=pipeline, teacher=teacher,
                         critic=critic)
    extra = {k: v for k, v in sums.items()
             if k not in ("loss_sum", "tokens") and not k.startswith("moe_")}
    return sums["loss_sum"], sums["tokens"], extra


class _Train:
    """`train(state, batch) -> (state, metrics)`: the jitted step with the
    trainable part of the state donated and the frozen tree passed as a
    separate, undonated argument (returned untouched)."""

    def __init__(self, fn, state_sharding, batch_sharding):
        def core(trainable, frozen, batch):
            new, metrics = fn(trainable.replace(frozen=frozen), batch)
            return new.replace(frozen=None), metrics
        trainable_sh = state_sharding.replace(frozen=None)
        self._jit = jax.jit(core, in_shardings=(trainable_sh, state_sharding.frozen,
                                                batch_sharding),
                            out_shardings=(trainable_sh, None), donate_argnums=0)

    def __call__(self, state, batch):
        new, metrics = self._jit(state.replace(frozen=None), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics

    def lower(self, state, batch):
        return self._jit.lower(state.replace(frozen=None), state.frozen, batch)


class _Eval:
    """`evaluate(state, batch)` (or `evaluate(params, batch)` for plain runs)
    -> (loss sum, count, metric sums)."""

    def __init__(self, fn, state_sharding, batch_sharding):
        self._jit = jax.jit(lambda params, frozen, batch: fn(params, batch, frozen=frozen),
                            in_shardings=(state_sharding.params, state_sharding.frozen,
                                          batch_sharding))

    def __call__(self, state_or_params, batch):
        if isinstance(state_or_params, TrainState):
            return self._jit(state_or_params.params, state_or_params.frozen, batch)
        return self._jit(state_or_params, None, batch)


def compile_steps(mcfg, tx, lr_schedule, state_sharding, batch_sharding, vocab_chunk=0,
                  objective=None, tcfg: TrainConfig | None = None, pipeline=None, teacher=None,
                  critic=None):
    """jit the steps once: the trainable state donated, the frozen tree not, shardings
    pinned. `tcfg` (the run's TrainConfig) turns on LoRA, DPO, distillation and
    accumulation; `pipeline` (a `jaxlm.sharding.pipeline.Pipeline`) the pipelined layer
    stack; `teacher` the distillation teacher's ModelConfig; `critic` PPO's value model's."""
    train = functools.partial(train_step, mcfg=mcfg, tx=tx, lr_schedule=lr_schedule,
                              vocab_chunk=vocab_chunk, objective=objective, tcfg=tcfg,
                              pipeline=pipeline, teacher=teacher, critic=critic)
    evaluate = functools.partial(eval_step, mcfg=mcfg, vocab_chunk=vocab_chunk,
                                 objective=objective, tcfg=tcfg, pipeline=pipeline,
                                 teacher=teacher, critic=critic)
    return (_Train(train, state_sharding, batch_sharding),
            _Eval(evaluate, state_sharding, batch_sharding))
