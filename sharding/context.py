"""Causal load balancing for context parallelism (ring attention).

With the sequence split in order over c devices, device i's queries see only
the keys of devices <= i: under a causal mask the last device works c times
as long as the first. Instead the sequence is cut into 2c chunks and device
i holds chunks i and 2c-1-i (one early, one late), so every device has the
same number of visible (query, key) pairs.

Where it happens: `train.step.loss_fn` calls `context_reorder` on the batch
as it enters the model (the token loss is a sum over tokens, so nothing is
undone); `balanced_forward` does the same around `forward` and restores the
logits' order. Positions travel with their tokens (the ORIGINAL positions),
so RoPE and the masks (built from positions and segment ids, never array
indices) are unchanged; correctness never depends on the reorder, only the
balance does. Identity when no context mesh is active.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from .rules import active_mesh


def context_size() -> int:
    """Devices the active rules split `seq` over (1: no context parallelism)."""
    active = active_mesh()
    if active is None:
        return 1
    from ..model.kernels.ring import ring_axes
    mesh, rules = active
    return math.prod(mesh.shape[a] for a in ring_axes(mesh, rules))


def balanced_order(seq_len: int, context: int) -> np.ndarray:
    """[seq_len] int: new[j] = old[order[j]]; device i's slice holds chunks i and 2c-1-i."""
    if seq_len % (2 * context):
        raise ConfigError(f"sequence length {seq_len} must divide by 2 x context = {2 * context} "
                          "for causal load balancing")
    chunks = np.arange(seq_len).reshape(2 * context, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * context - 1 - i]])
                           for i in range(context)])


def context_reorder(batch: dict, context: int) -> dict:
    """Permute every [B, S, ...] array of `batch` along seq into the balanced order.

    S is the length of batch["tokens"]; `positions` (arange when absent) are
    permuted with the tokens, so they keep the original positions."""
    if context <= 1:
        return batch
    s = batch["tokens"].shape[1]
    order = balanced_order(s, context)
    batch = dict(batch)
    if batch.get("positions") is None:
        batch["positions"] = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32),
                                              batch["tokens"].shape)
    return {k: (jnp.take(x, order, axis=1) if getattr(x, "ndim", 0) >= 2 and x.shape[1] == s
                else x) for k, x in batch.items()}


def context_restore(x, context: int, axis: int = 1):
    """Undo `context_reorder` along `axis` (e.g. logits [B, S, V])."""
    if context <= 1:
        return x
    inverse = np.argsort(balanced_order(x.shape[axis], context))
    return jnp.take(x, inverse, axis=axis)


def balanced_forward(params, cfg, tokens, positions=None, segment_ids=None, **kwargs):
    """`forward` with the causal load-balancing reorder around it under a
    context mesh: (logits or hidden [B,S,...] in the original order, aux)."""
    from ..model import forward
    c = context_size()
    b = context_reorder({"tokens": tokens, "positions": positions, "segment_ids": segment_ids}, c)
    out, aux = forward(params, cfg, b["tokens"], b["positions"], b["segment_ids"], **kwargs)
    return context_restore(out, c), aux
