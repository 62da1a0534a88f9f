"""The jitted train and eval steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm.model import forward, head_weights
from jaxlm.train.objectives import causal_lm_loss, chunked_lm_loss
from jaxlm.train.state import TrainState


def loss_fn(params, mcfg, batch, vocab_chunk: int = 0):
    """Mean token loss and (sum, count); `vocab_chunk` > 0: the chunked loss."""
    out, _ = forward(params, mcfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                     return_hidden=vocab_chunk > 0)
    if vocab_chunk > 0:
        w = head_weights(params, mcfg).astype(out.dtype)
        loss_sum, count = chunked_lm_loss(out, w, batch["targets"], batch["loss_mask"], vocab_chunk)
    else:
        loss_sum, count = causal_lm_loss(out, batch["targets"], batch["loss_mask"])
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)


def train_step(state: TrainState, batch, *, mcfg, tx, lr_schedule, vocab_chunk):
    grads, (loss_sum, count) = jax.grad(loss_fn, has_aux=True)(state.params, mcfg, batch,
                                                               vocab_chunk)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "tokens": count,
               "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, mcfg, vocab_chunk):
    _, (loss_sum, count) = loss_fn(params, mcfg, batch, vocab_chunk)
    return loss_sum, count


def compile_steps(mcfg, tx, lr_schedule, state_sharding, batch_sharding, vocab_chunk=0):
    """jit the steps once: train state donated, shardings pinned."""
    train = jax.jit(functools.partial(train_step, mcfg=mcfg, tx=tx, lr_schedule=lr_schedule,
                                      vocab_chunk=vocab_chunk),
                    in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, None), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, mcfg=mcfg, vocab_chunk=vocab_chunk),
                       in_shardings=(state_sharding.params, batch_sharding))
    return train, evaluate
