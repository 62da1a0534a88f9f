"""Token samplers: greedy, temperature, top-k, top-p (nucleus).

`sample(logits, key, temperature=..., top_k=..., top_p=...)` is pure and
jittable; the three settings are Python numbers that pick the code path, so
under `jax.jit` pass them as static arguments. Order of operations (as in
Hugging Face): divide by the temperature, keep the top-k, then keep the
nucleus of what is left (renormalised), then draw.

`key` is one PRNG key for the whole batch, or one key per row (`[B]` typed
keys or `[B, 2]` raw keys): with per-row keys a row's draw depends only on its
own key and logits, not on the rest of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.errors import InputError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """One-line InputError for settings outside temperature >= 0, top_k >= 0, 0 < top_p <= 1."""
    if not temperature >= 0:
        raise InputError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if int(top_k) != top_k or top_k < 0:
        raise InputError(f"top_k={top_k} must be an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p={top_p} must be in (0, 1] (1 = off)")


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """logits [B, V] -> token ids [B] int32.

    temperature 0 (or top_k 1) is greedy: argmax, the key is unused. top_k 0
    and top_p 1 switch those filters off. top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p (the top token always);
    without top-k it is done with a threshold over the full vocabulary, so
    tokens tied with the last kept one are kept too.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32)
    if temperature == 0 or top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, ids = jax.lax.top_k(scaled, top_k)  # [B, k], sorted descending
        if top_p < 1.0:
            values = _nucleus_sorted(values, top_p)
        choice = _categorical(key, values)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if top_p < 1.0:
        scaled = _nucleus_threshold(scaled, top_p)
    return _categorical(key, scaled).astype(jnp.int32)


def _nucleus_sorted(values, top_p):
    """values [B, C] sorted descending: -inf outside the nucleus."""
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
    return jnp.where(before < top_p, values, -jnp.inf)


def _nucleus_threshold(scaled, top_p):
    """scaled [B, V] unsorted: -inf for tokens less likely than the nucleus's last one."""
    ordered = -jnp.sort(-scaled, axis=-1)  # descending; values only, no index payload
    kept = _nucleus_sorted(ordered, top_p)
    n_kept = jnp.sum(jnp.isfinite(kept), axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, n_kept - 1, axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _categorical(key, logits):
    if _is_batch_of_keys(key):
        return jax.vmap(jax.random.categorical)(key, logits)
    return jax.random.categorical(key, logits, axis=-1)


def _is_batch_of_keys(key) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2  # raw uint32 keys: [2] one key, [B, 2] a batch
