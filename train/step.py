"""The jitted train and eval steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm.model import forward, head_weights
from jaxlm.model.families.encoder import mlm_head_inputs
from jaxlm.sharding.context import context_reorder, context_size
from jaxlm.train.objectives import causal_lm_loss, chunked_lm_loss
from jaxlm.train.state import TrainState


def loss_fn(params, mcfg, batch, vocab_chunk: int = 0):
    """(training objective, (token loss sum, token count, extra metrics)).

    The objective is the mean token loss plus, for MoE configs, the router's
    load-balancing and z losses times their coefficients (logged apart).
    `vocab_chunk` > 0 computes the token loss over vocab chunks.
    """
    if mcfg.family == "decoder":  # context parallelism: causal load balancing (identity without)
        batch = context_reorder(batch, context_size())
    if mcfg.family == "encoder_decoder":  # span corruption: encoder inputs -> decoder targets
        out, aux = forward(params, mcfg, batch["tokens"], batch["decoder_tokens"],
                           batch["segment_ids"], batch["decoder_segment_ids"],
                           return_hidden=vocab_chunk > 0)
    else:
        out, aux = forward(params, mcfg, batch["tokens"], batch["positions"],
                           batch["segment_ids"], return_hidden=vocab_chunk > 0)
    if vocab_chunk > 0:
        if mcfg.family == "encoder":  # the MLM head: transform, tied decoder + bias
            out, w = mlm_head_inputs(params, mcfg, out)
        else:
            w = head_weights(params, mcfg).astype(out.dtype)
        loss_sum, count = chunked_lm_loss(out, w, batch["targets"], batch["loss_mask"], vocab_chunk)
    else:
        loss_sum, count = causal_lm_loss(out, batch["targets"], batch["loss_mask"])
    objective = loss_sum / jnp.maximum(count, 1.0)
    extra = {}
    if "moe" in aux:
        stats = aux["moe"]
        objective = (objective + mcfg.router_aux_loss_coef * stats["load_balancing_loss"]
                     + mcfg.router_z_loss_coef * stats["router_z_loss"])
        extra = {f"moe_{k}": v for k, v in stats.items()}
    return objective, (loss_sum, count, extra)


def train_step(state: TrainState, batch, *, mcfg, tx, lr_schedule, vocab_chunk, objective=None):
    if objective is not None:  # a batch transform, e.g. MLM masking keyed by (seed, step)
        batch = objective(batch, state.step)
    grads, (loss_sum, count, extra) = jax.grad(loss_fn, has_aux=True)(state.params, mcfg, batch,
                                                                      vocab_chunk)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "tokens": count,
               "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step), **extra}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, mcfg, vocab_chunk, objective=None):
    if objective is not None:  # with its fixed eval key
        batch = objective(batch, None)
    _, (loss_sum, count, _) = loss_fn(params, mcfg, batch, vocab_chunk)
    return loss_sum, count


def compile_steps(mcfg, tx, lr_schedule, state_sharding, batch_sharding, vocab_chunk=0,
                  objective=None):
    """jit the steps once: train state donated, shardings pinned."""
    train = jax.jit(functools.partial(train_step, mcfg=mcfg, tx=tx, lr_schedule=lr_schedule,
                                      vocab_chunk=vocab_chunk, objective=objective),
                    in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, None), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, mcfg=mcfg, vocab_chunk=vocab_chunk,
                                         objective=objective),
                       in_shardings=(state_sharding.params, batch_sharding))
    return train, evaluate
