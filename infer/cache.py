"""The preallocated KV cache: `k`, `v` [layers, batch, max_len, kv_heads, head_dim] + `lengths`."""

import jax.numpy as jnp

from jaxlm.model.config import dtype_of


def init_cache(cfg, batch: int, max_len: int, dtype=None):
    dtype = dtype or dtype_of(cfg.dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "lengths": jnp.zeros((batch,), jnp.int32)}
