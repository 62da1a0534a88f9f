"""Inverted dropout for training from scratch (BERT / T5 style).

Keys are explicit: `dropout_key=None` (eval, generation, every caller but the
train step) is the identity, so those paths stay deterministic and bit-identical
to a model without dropout. The train step derives the key from
(train.seed, step); inside the scanned layers each layer folds in its index and
each site its own number (`site_key`). The random bits are drawn over the
global array (threefry is partitionable), so every device of every process gets
its slice of one mask and resume is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# the sites of one layer: fold_in(layer key, site)
ATTN_OUT, MLP_OUT, ATTN_PROBS, CROSS_OUT, CROSS_PROBS = range(5)
EMBED, FINAL = 100, 101  # outside the layers: fold_in(step key, site)


def site_key(key, site: int):
    """fold_in(key, site), or None without a key."""
    return None if key is None else jax.random.fold_in(key, site)


def dropout(x, rate: float, key):
    """x' = x * keep / (1 - rate), keep ~ Bernoulli(1 - rate) per element, so
    E[x'] = x; the identity when `key` is None or `rate` is 0."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
