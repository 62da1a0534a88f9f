"""Projections as single 2-D matmuls.

`dense(x, w, n)` contracts the last n axes of x with the first n axes of w,
flattening everything else: x [..., *in] @ w [*in, *out] -> [..., *out].
An einsum with several batch-like axes ("btd,dhk->bthk") is the same maths,
but its gradients become multi-axis contractions that XLA's CPU backend runs
about 2x slower than the plain GEMMs this produces. Under context parallelism
(the sequence split over devices) the leading axes stay apart instead.
"""

import math

import jax.numpy as jnp

from jaxlm.sharding.context import context_size


def dense(x, w, n_contract: int = 1, out_dtype=None):
    lead = x.shape[:x.ndim - n_contract]
    k = math.prod(x.shape[x.ndim - n_contract:])
    out = w.shape[n_contract:]
    if context_size() > 1:  # seq split over devices: flattening [B, S] would gather it
        y = jnp.matmul(x.reshape(*lead, k), w.reshape(k, -1), preferred_element_type=out_dtype)
        return y.reshape(*lead, *out)
    y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out)
