"""KV stores: where a layer's keys and values go, and what its queries attend to.

Every family's block calls its attention through one store:

    store, out = store.attend(i, q, k, v, mask, bias, cfg)   # layer i; q [B,S,H,D]

and the layer stack carries the store through the layers (`model.block.over_layers`),
so the block does not know which store it runs over. The store also says what the
call's tokens see (`mask`), where they sit (`positions`), and moves its fill level
on once the stack ran (`advance`). Implementations (pytrees: they ride in a scan
carry or a `lax.while_loop`):

* `NoCache`: training and scoring: attention over the call's own K/V (`mask`
  decides causal / segments / window); nothing is kept.
* `Recording`: as NoCache, and each layer's K/V (after RoPE) written into
  buffers [L, B, S, KVH, D] (what a prefix cache or a packed prefill reads).
* `Contiguous` (`contiguous.py`): the preallocated cache [L, B, T, KVH, D] with
  per-row lengths (int8 with scales, or split per layer head-major for a decode
  loop); `fresh` under a context mesh: the ring prefill.
* `Paged` (`paged.py`): a pool of pages [L, N, ps, KVH, D] and a page table per
  row, written and read per data shard under `jax.shard_map`; `fresh`: a packed
  prefill (prompts attend to themselves, their K/V written into their pages).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..kernels import MaskSpec
from ..layers.attention import attend
from .contiguous import (Contiguous, cache_axes, cache_bytes, cache_shapes, check_kv_dtype,
                         constrain_cache, init_cache, own_mask, quantize_kv, read_cross)
from .paged import Paged, init_pages


def arange_positions(b: int, s: int):
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoCache:
    """Attention over the call's own K/V; nothing is kept (training, scoring)."""

    fresh = True  # the call's tokens attend only to each other

    def positions(self, b: int, s: int):
        return arange_positions(b, s)

    def mask(self, causal: bool, positions, segment_ids, window) -> MaskSpec:
        return own_mask(causal, positions, segment_ids, window)

    def attend(self, i, q, k, v, mask, bias, cfg, dropout_key=None):
        return self, attend(q, k, v, mask, cfg, bias, dropout_key)

    def advance(self, s: int):
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Recording(NoCache):
    """NoCache that keeps each layer's K/V: k, v [L, B, S, KVH, D] (`create`)."""
    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, cfg, b: int, s: int, dtype=None, layers: int | None = None):
        from ..config import dtype_of
        shape = (layers or cfg.n_layers, b, s, cfg.n_kv_heads, cfg.head_dim)
        dtype = dtype or dtype_of(cfg.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def attend(self, i, q, k, v, mask, bias, cfg, dropout_key=None):
        put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)
        return (Recording(put(self.k, k), put(self.v, v)),
                attend(q, k, v, mask, cfg, bias, dropout_key))


NO_CACHE = NoCache()

__all__ = ["NoCache", "NO_CACHE", "Recording", "Contiguous", "Paged", "init_cache",
           "init_pages", "cache_axes", "cache_bytes", "cache_shapes", "check_kv_dtype",
           "constrain_cache", "quantize_kv", "read_cross", "own_mask", "arange_positions"]

from ...lazy import submodule_getattr as _submodule_getattr  # noqa: E402

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
