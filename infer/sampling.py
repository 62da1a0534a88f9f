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

import dataclasses
from typing import NamedTuple

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


class Sampler(NamedTuple):
    """Per-row sampler settings (traced arrays [R]; a batch's rows may differ)."""
    temperature: jax.Array  # f32: 0 = greedy
    top_k: jax.Array  # i32: 0 = off
    top_p: jax.Array  # f32: 1 = off
    min_p: jax.Array  # f32: 0 = off

    @classmethod
    def of(cls, rows: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "Sampler":
        full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (rows,))  # noqa: E731
        return cls(full(temperature, jnp.float32), full(top_k, jnp.int32),
                   full(top_p, jnp.float32), full(min_p, jnp.float32))


@dataclasses.dataclass(frozen=True)
class SamplerShape:
    """What a compiled draw needs to know of the rows' samplers (static): whether
    any row samples, the top-k candidates drawn from (the largest top_k of a row
    that uses one: that row draws over exactly its k), whether a sampled row draws
    over the whole vocabulary (top_k 0), and whether top-p / min-p are on anywhere."""
    sample: bool = False
    top_k: int = 0
    full_vocab: bool = False
    top_p: bool = False
    min_p: bool = False

    @classmethod
    def of(cls, settings, vocab_size: int) -> "SamplerShape":
        """settings: (temperature, top_k, top_p, min_p) per row (an iterable)."""
        sampled = [(k if 0 < k < vocab_size else 0, p, m) for t, k, p, m in settings
                   if t > 0 and k != 1]
        if not sampled:
            return cls()
        return cls(True, max(k for k, _, _ in sampled), any(k == 0 for k, _, _ in sampled),
                   any(p < 1.0 for _, p, _ in sampled), any(m > 0.0 for _, _, m in sampled))


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0) -> jax.Array:
    """logits [B, V] -> token ids [B] int32: `pick` with one setting for every row.

    temperature 0 (or top_k 1) is greedy (`greedy`: argmax), the key is unused. top_k 0
    and top_p 1 switch those filters off. top-p keeps the smallest set of
    most likely tokens whose probability reaches top_p (the top token always);
    without top-k it is done with a threshold over the full vocabulary, so
    tokens tied with the last kept one are kept too. min_p 0 is off; otherwise
    a token stays if its probability (after the filters before it) is at least
    min_p times the top token's (HF MinPLogitsWarper).
    """
    check_sampling(temperature, top_k, top_p, min_p)
    shape = SamplerShape.of([(temperature, top_k, top_p, min_p)], logits.shape[-1])
    return pick(logits, Sampler.of(logits.shape[0], temperature, top_k, top_p, min_p), key,
                shape)


def pick(logits: jax.Array, rows: Sampler, key, shape: SamplerShape) -> jax.Array:
    """The sampler step: logits [B, V] (processed) -> token ids [B] int32, each row by
    its own settings (`Sampler`), the code paths compiled in by `shape`: greedy rows
    (temperature 0 or top_k 1) take `greedy`; a sampled row divides by its
    temperature, keeps its top_k (exactly k, drawn among `shape.top_k` candidates),
    then its nucleus (renormalised), then drops tokens less likely than min_p times
    the top one, and draws (`key`: one key for the batch, or one per row)."""
    logits = logits.astype(jnp.float32)
    best = greedy(logits)
    if not shape.sample:
        return best
    v = logits.shape[-1]
    t = rows.temperature[:, None]
    scaled = logits / jnp.where(t > 0, t, 1.0)
    top_p, min_p = rows.top_p[:, None], rows.min_p[:, None]
    drawn = None
    if shape.top_k:
        values, ids = jax.lax.top_k(scaled, shape.top_k)  # [B, K], sorted descending
        keep = jnp.arange(shape.top_k)[None] < rows.top_k[:, None]
        values = jnp.where(keep, values, -jnp.inf)
        if shape.top_p:
            values = jnp.where(top_p < 1.0, _nucleus_sorted(values, top_p), values)
        if shape.min_p:
            values = jnp.where(min_p > 0.0, min_p_filter(values, min_p), values)
        choice = _categorical(key, values)
        drawn = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if shape.full_vocab:
        full = scaled
        if shape.top_p:
            full = jnp.where(top_p < 1.0, _nucleus_threshold(full, top_p), full)
        if shape.min_p:
            full = jnp.where(min_p > 0.0, min_p_filter(full, min_p), full)
        whole = _categorical(key, full).astype(jnp.int32)
        drawn = whole if drawn is None else jnp.where(
            (rows.top_k > 0) & (rows.top_k < v), drawn, whole)
    greedy_row = (rows.temperature <= 0) | (rows.top_k == 1)
    return jnp.where(greedy_row, best, drawn)


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


def warp_rows(logits: jax.Array, rows: Sampler, shape: SamplerShape) -> jax.Array:
    """`warp` with each row's own settings (rows with temperature 0 as if 1): logits
    [B, V] -> the distribution `pick` draws a sampled row from, -inf outside it."""
    t = rows.temperature[:, None]
    scaled = logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    v = logits.shape[-1]
    if shape.top_k:
        kth = jax.lax.top_k(scaled, shape.top_k)[0]
        cut = jnp.take_along_axis(kth, jnp.clip(rows.top_k - 1, 0, shape.top_k - 1)[:, None],
                                  axis=-1)
        on = ((rows.top_k > 0) & (rows.top_k < v))[:, None]
        scaled = jnp.where(on & (scaled < cut), -jnp.inf, scaled)
    if shape.top_p:
        scaled = jnp.where(rows.top_p[:, None] < 1.0,
                           _nucleus_threshold(scaled, rows.top_p[:, None]), scaled)
    if shape.min_p:
        scaled = jnp.where(rows.min_p[:, None] > 0.0, min_p_filter(scaled, rows.min_p[:, None]),
                           scaled)
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
