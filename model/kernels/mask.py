"""The mask spec every attention implementation understands."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class MaskSpec(NamedTuple):
    """What a query may see. All fields optional; a NamedTuple, so a pytree.

    causal:          key position <= query position.
    q_positions:     [B, Sq] absolute positions of the queries (default arange).
    kv_positions:    [B or 1, Sk] absolute positions of the keys (default arange).
    q_segment_ids / kv_segment_ids: [B, Sq] / [B, Sk]; a query sees only keys
                     of its own segment; segment 0 is padding and sees nothing.
    kv_lengths:      [B] number of valid keys (a KV cache's fill level).
    window:          sliding window: key position > query position - window.
    """
    causal: bool = False
    q_positions: Optional[jax.Array] = None
    kv_positions: Optional[jax.Array] = None
    q_segment_ids: Optional[jax.Array] = None
    kv_segment_ids: Optional[jax.Array] = None
    kv_lengths: Optional[jax.Array] = None
    window: Optional[int] = None

    def visible(self, sq: int, sk: int) -> jax.Array:
        """Boolean [B or 1, Sq, Sk]: the dense mask (reference use only)."""
        qp = self.q_positions if self.q_positions is not None else jnp.arange(sq)[None]
        kp = self.kv_positions if self.kv_positions is not None else jnp.arange(sk)[None]
        ok = jnp.ones((1, sq, sk), bool)
        if self.causal:
            ok = ok & (kp[:, None, :] <= qp[:, :, None])
        if self.window is not None:
            ok = ok & (kp[:, None, :] > qp[:, :, None] - self.window)
        if self.q_segment_ids is not None:
            qs, ks = self.q_segment_ids, self.kv_segment_ids
            ok = ok & (qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] != 0)
        if self.kv_lengths is not None:
            ok = ok & (jnp.arange(sk)[None, None, :] < self.kv_lengths[:, None, None])
        return ok
