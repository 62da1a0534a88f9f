"""T5 relative-position buckets as an additive attention bias.

The bias of query i over key j is `table[bucket(j - i), head]`: one learned
table [buckets, heads] per stack. Buckets (Mesh TensorFlow / Hugging Face T5):

* bidirectional (encoder): half the buckets for keys after the query, half
  for keys at or before it; unidirectional (decoder): all buckets for keys at
  or before the query (keys after it share bucket 0 and are masked anyway).
* within a half, distances below `n // 2` get a bucket each; larger ones
  share logarithmically wider buckets up to `max_distance`; farther keys all
  fall in the last bucket.

The distance -> bucket map is a small lookup table built with numpy at trace
time, in float32 exactly as the reference computes it, so bucket edges agree
with Hugging Face bit for bit; at run time it is an integer gather.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from ..params import Spec, normal


def relative_bias_specs(cfg):
    return {"table": Spec((cfg.relative_buckets, cfg.n_heads), (None, "heads"),
                          normal(cfg.init_std), cfg.param_dtype)}


@functools.lru_cache(maxsize=None)
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance (farther: the last entry), int32."""
    d = np.arange(max_distance + 1, dtype=np.int64)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(d.astype(np.float32) / np.float32(max_exact))
        scaled = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(
            num_buckets - max_exact)
    large = max_exact + np.where(d < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return np.where(d < max_exact, d, large).astype(np.int32)


def relative_buckets(relative, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """relative = key position - query position (int array) -> bucket ids in [0, num_buckets)."""
    relative = jnp.asarray(relative, jnp.int32)
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative > 0, num_buckets, 0)
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    lut = jnp.asarray(_distance_buckets(num_buckets, max_distance))
    return offset + lut[jnp.minimum(distance, max_distance)]


def relative_bias(p, q_positions, kv_positions, cfg, *, bidirectional: bool, dtype=jnp.float32):
    """positions [B or 1, Sq] / [B or 1, Sk] -> additive bias [B or 1, H, Sq, Sk]."""
    relative = kv_positions[:, None, :] - q_positions[:, :, None]  # [B,Sq,Sk]
    buckets = relative_buckets(relative, bidirectional=bidirectional,
                               num_buckets=cfg.relative_buckets,
                               max_distance=cfg.relative_max_distance)
    values = jnp.take(p["table"], buckets, axis=0)  # [B,Sq,Sk,H]
    return values.transpose(0, 3, 1, 2).astype(dtype)
