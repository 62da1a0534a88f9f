"""Token samplers: greedy, temperature, top-k, top-p (nucleus), min-p.

`sample(logits, key, temperature=..., top_k=..., top_p=..., min_p=...)` is
pure and jittable; the settings are Python numbers that pick the code path,
so under `jax.jit` pass them as static arguments. Order of operations (as
Hugging Face's warpers): divide by the temperature, keep the top-k, then keep
the nucleus of what is left (renormalised), then drop the tokens less likely
than min_p times the most likely one, then draw.

`key` is one PRNG key for the whole batch, or one key per row (`[B]` typed
keys or `[B, 2]` raw keys): with per-row keys a row's draw depends only on its
own key and logits, not on the rest of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import InputError


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
    """One-line InputError for settings outside temperature >= 0, top_k >= 0,
    0 < top_p <= 1, 0 <= min_p <= 1."""
    if not temperature >= 0:
        raise InputError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if int(top_k) != top_k or top_k < 0:
        raise InputError(f"top_k={top_k} must be an integer >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if isinstance(min_p, bool) or not 0.0 <= min_p <= 1.0:
        raise InputError(f"min_p={min_p} must be in [0, 1] (0 = off)")


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
    """logits [B, V] -> token ids [B] int32.

    temperature 0 (or top_k 1) is greedy (`greedy`: argmax), the key is unused. top_k 0
    and top_p 1 switch those filters off. top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p (the top token always);
    without top-k it is done with a threshold over the full vocabulary, so
    tokens tied with the last kept one are kept too. min_p 0 is off; otherwise
    a token stays if its probability (after the filters before it) is at least
    min_p times the top token's (HF MinPLogitsWarper).
    """
    check_sampling(temperature, top_k, top_p, min_p)
    logits = logits.astype(jnp.float32)
    if temperature == 0 or top_k == 1:
        return greedy(logits)
    scaled = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, ids = jax.lax.top_k(scaled, top_k)  # [B, k], sorted descending
        if top_p < 1.0:
            values = _nucleus_sorted(values, top_p)
        if min_p > 0.0:
            values = min_p_filter(values, min_p)
        choice = _categorical(key, values)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if top_p < 1.0:
        scaled = _nucleus_threshold(scaled, top_p)
    if min_p > 0.0:
        scaled = min_p_filter(scaled, min_p)
    return _categorical(key, scaled).astype(jnp.int32)


# greedy over a vocabulary of at least GREEDY_CHUNK_MIN ids reads the logits once,
# in chunks of GREEDY_CHUNK (`greedy`)
GREEDY_CHUNK = 128
GREEDY_CHUNK_MIN = 4096


def greedy(logits: jax.Array) -> jax.Array:
    """logits [..., V] -> int32 [...]: exactly `jnp.argmax(logits, -1)` (the first
    index of the maximum; in a row holding a NaN, the first NaN's index).

    From GREEDY_CHUNK_MIN ids on, one pass over the logits: the max and the sum
    of each chunk of GREEDY_CHUNK ids, the first chunk holding the row's max, then
    the first index of the max in it (`_first_max`). A sum that is NaN marks a chunk
    that may hold a NaN (or both infinities), and then the whole batch takes
    `_first_max` over the full rows instead (one `lax.cond`). At [16, 32000]
    inside the decode loop this reads the logits once instead of twice: ~0.4 ms
    of a ~6 ms step (issue 9)."""
    v = logits.shape[-1]
    if v < GREEDY_CHUNK_MIN:
        return _first_max(logits)
    lead = logits.shape[:-1]
    rows = logits.reshape(-1, v)
    pad = -v % GREEDY_CHUNK
    if pad:
        rows = jnp.pad(rows, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    chunks = rows.reshape(rows.shape[0], -1, GREEDY_CHUNK)

    def by_chunk(_):
        j = _first_max(jnp.max(chunks, axis=-1))  # [R]: the first chunk with the max
        chunk = jnp.take_along_axis(chunks, j[:, None, None], axis=1)[:, 0]
        return j * GREEDY_CHUNK + _first_max(chunk)

    unsure = jnp.any(jnp.isnan(jnp.sum(chunks, axis=-1)))
    out = jax.lax.cond(unsure, lambda _: _first_max(rows), by_chunk, None)
    return out.reshape(lead)


def _first_max(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` as plain reductions that XLA:CPU fuses into cheap
    loops (argmax's variadic (value, index) reduce ran ~1.2 ms per step over
    [16, 32000], about half the head matmul; issue 9): the smallest index of the
    max, or of a NaN in a row that holds one. The NaNs are found apart: XLA:CPU's
    `max` over a long row can skip them."""
    v = logits.shape[-1]
    nan = jnp.isnan(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == top)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, iota, v), axis=-1).astype(jnp.int32)


def warp(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0) -> jax.Array:
    """The distribution `sample` draws from, as logits [B, V] with -inf outside
    the support (temperature > 0): HF's TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper and MinPLogitsWarper in that order. Tokens tied with the
    k-th largest are kept (HF too); `sample` keeps exactly k."""
    check_sampling(temperature, top_k, top_p, min_p)
    if not temperature > 0:
        raise InputError("warp needs temperature > 0 (greedy has no distribution)")
    scaled = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p < 1.0:
        scaled = _nucleus_threshold(scaled, top_p)
    if min_p > 0.0:
        scaled = min_p_filter(scaled, min_p)
    return scaled


def min_p_filter(logits, min_p: float):
    """logits [B, C] -> -inf where softmax(logits) < min_p * its max (HF MinPLogitsWarper)."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf, logits)


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
