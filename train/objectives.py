"""Training objectives: losses over logits (or hidden states) with a loss mask.

Losses return (sum over counted tokens, number of counted tokens), so callers
can average over any number of batches exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def causal_lm_loss(logits, targets, loss_mask):
    """Token cross-entropy from logits [B,S,V] float32, targets [B,S], loss_mask [B,S]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def chunked_lm_loss(hidden, w, targets, loss_mask, chunk: int):
    """The same loss from hidden states [B,S,D] and the head w [D,V], computed
    over vocab chunks of about `chunk` columns.

    The [B,S,V] logits are never materialised: the forward pass keeps a
    running log-sum-exp per token; the backward pass recomputes each chunk's
    logits and turns them straight into that chunk's gradient. Each chunk's
    logits stay in cache, which on CPU makes the head's matmuls nearly twice
    as fast, and on any device saves the largest activation of the step.
    """
    d = hidden.shape[-1]
    mask = loss_mask.astype(jnp.float32).reshape(-1)
    loss = _chunked_ce(hidden.reshape(-1, d), w, targets.reshape(-1).astype(jnp.int32), mask,
                       _chunking(w.shape[1], chunk))
    return loss, jnp.sum(mask)


def _chunking(vocab: int, chunk: int) -> tuple[int, int]:
    n = max(1, math.ceil(vocab / chunk))
    return n, math.ceil(vocab / n)


def _chunks(w, n, size):
    """[D, V] -> [n, D, size], zero-padded past V."""
    d, v = w.shape
    w = jnp.pad(w, ((0, 0), (0, n * size - v)))
    return w.reshape(d, n, size).transpose(1, 0, 2)


def _chunk_logits(x, w_c, c, size, vocab):
    logits = jnp.matmul(x, w_c, preferred_element_type=jnp.float32)
    cols = c * size + jnp.arange(size)
    return jnp.where(cols < vocab, logits, -jnp.inf), cols


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(x, w, targets, mask, chunking):
    return _chunked_ce_fwd(x, w, targets, mask, chunking)[0]


def _chunked_ce_fwd(x, w, targets, mask, chunking):
    n, size = chunking
    vocab = w.shape[1]

    def step(carry, c_and_w):
        m, s, t = carry
        c, w_c = c_and_w
        logits, cols = _chunk_logits(x, w_c, c, size, vocab)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        t = t + jnp.sum(jnp.where(cols[None] == targets[:, None], logits, 0.0), axis=1)
        return (m_new, s, t), None

    rows = x.shape[0]
    init = (jnp.full((rows,), -jnp.inf), jnp.zeros((rows,)), jnp.zeros((rows,)))
    (m, s, t), _ = jax.lax.scan(step, init, (jnp.arange(n), _chunks(w, n, size)))
    lse = m + jnp.log(s)
    return jnp.sum((lse - t) * mask), (x, w, targets, mask, lse)


def _chunked_ce_bwd(chunking, res, g):
    x, w, targets, mask, lse = res
    n, size = chunking
    vocab = w.shape[1]
    coef = g * mask

    def step(dx, c_and_w):
        c, w_c = c_and_w
        logits, cols = _chunk_logits(x, w_c, c, size, vocab)
        dlogits = jnp.exp(logits - lse[:, None]) * coef[:, None]
        dlogits = dlogits - jnp.where(cols[None] == targets[:, None], coef[:, None], 0.0)
        dlogits = dlogits.astype(x.dtype)
        dx = dx + jnp.matmul(dlogits, w_c.T, preferred_element_type=jnp.float32)
        return dx, jnp.matmul(x.T, dlogits, preferred_element_type=jnp.float32)

    dx, dw = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), (jnp.arange(n), _chunks(w, n, size)))
    dw = dw.transpose(1, 0, 2).reshape(w.shape[0], n * size)[:, :vocab]
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)
