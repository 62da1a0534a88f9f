"""Continuous batching over a paged KV cache.

    out = generate_many(params, cfg, prompts, max_new_tokens=[64, 8, ...], slots=8,
                        page_size=16, eos_id=2, temperature=0.7, seed=0)
    out.sequences()      # per prompt, in input order (as jaxlm.generate's GenerateOutput)

A fixed number of slots decode together over one page pool
(`jaxlm.infer.paged`). The device runs up to `steps_per_call` decode steps
per host round trip, in one `lax.while_loop` compiled once; the loop exits
early once `refill_batch` slots have finished while prompts are waiting (or as
many as wait), and the host then returns the finished slots' pages, prefills
the next prompts into them and goes on, without waiting for the rest of the
batch. One refill for two finishes (the default at 16 slots, slots // 8)
halves the round trips and prefill calls for one slot idling a few steps
(~1.1x the tokens/s of refilling at every finish on bench-cpu before packed
prefill, ~1.05x since; BENCHMARKS.md).
The prompts admitted at one refill are prefilled together, packed into one
row per data shard (up to PACK_TOKENS; each prompt from a page boundary, with
its own segment id and positions restarting, so it attends only to itself),
whose K/V are written straight into the slots' pages: no padding rows, no
contiguous cache to copy from. The pack's width is bucketed (2^k and
3 x 2^(k-1)), so prefill compiles once per bucket (TRACE_COUNTS["admit"]).

Under `jaxlm.sharding.rules.use_mesh` the pool is created sharded and stays
so (`jaxlm.infer.paged`): each data shard owns a block of pages and its
slots allocate only from it; n_pages is rounded up to a multiple of the data
shards, each of which must fit the longest request. Multi-process (a global
mesh over several processes' devices): every process runs the same host loop
on the same host state, and each round trip's per-slot state is gathered to
all of them (`jaxlm.sharding.distributed.fetch`).

Memory: a slot holds the pages its sequence has written, plus, during one
round trip, the pages the next `steps_per_call` tokens may need; after each
round trip the unused ones go back to the pool, so at every refill the
pages in use are exactly what the live sequences need (rounded up to a
page): `on_refill` sees it. A prompt is admitted when the pool can hold it
and what every live sequence may still need (its prompt + max_new_tokens), so
growth never runs out of pages.

Identical to `jaxlm.generate` run prompt by prompt with the same seeds:
prompt i samples its t-th token with fold_in(fold_in(key(seed), row_seeds[i]), t),
row_seeds defaulting to the prompt's index (as generate numbers its rows),
with the same sampler; the attention is the same function over the same keys.
Mixture-of-experts models route as generate does, so this holds for dropless
routing (`model.moe.capacity_factor` 0, as Mixtral's); with a capacity factor
which tokens an expert drops depends on the tokens batched with them (a pack here, a
batch there), in generate too.
Logit processors, beams, guides and return_logits are the static path's
(`jaxlm.generate`).
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .generate import (DECODING_OFF, PAD_ID, GenerateOutput, _check_prompts,
                                  decode_params, row_keys, splits)
from .paged import (PagePool, check_paged_family, constrain_pages, init_pages,
                               pages_for, paged_step, pool_layout, write_prompt)
from .processors import eos_array, is_eos
from .sampling import check_sampling, sample
from ..model.families.decoder import decoder
from ..model.layers.embeddings import unembed
from ..sharding.distributed import fetch

TRACE_COUNTS = {"engine_loop": 0, "admit": 0}
WIDTH_BUCKET = 64
PACK_TOKENS = 512  # a prefill pack's width (a prompt's own, if longer): its attention is W^2


class _Slots(NamedTuple):
    """Per-slot state of the compiled loop (host numpy in, device out)."""
    lengths: jax.Array  # [S] int32: positions in the cache
    count: jax.Array  # [S] int32: tokens generated
    budget: jax.Array  # [S] int32: the request's max_new_tokens
    live: jax.Array  # [S] bool
    eos: jax.Array  # [S] bool: finished with a stop id


@partial(jax.jit, static_argnames=("cfg", "temperature", "top_k", "top_p", "min_p"),
         donate_argnames=("pages", "logits", "out"))
def decode_loop(params, cfg, pages, logits, out, slots: _Slots, page_table, key_data, eos_ids,
                max_steps, exit_after, *, temperature: float, top_k: int, top_p: float,
                min_p: float = 0.0):
    """Up to max_steps decode steps of every live slot; stops early after the step
    where the exit_after-th slot of this call finished (exit_after 0: never).
    logits [S, V]: each slot's next-token logits; out [S, W] int32: the tokens of
    each slot's request; key_data: the slots' PRNG keys (`jax.random.key_data`,
    of the default implementation). Returns (pages, logits, out, slots, steps run)."""
    TRACE_COUNTS["engine_loop"] += 1
    keys = jax.random.wrap_key_data(key_data)
    params = decode_params(params, cfg)
    pick = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = jnp.arange(out.shape[0])

    def body(c):
        i, pages, logits, out, st, done = c
        step_keys = jax.vmap(jax.random.fold_in)(keys, st.count)
        tok = pick(logits, step_keys)
        out = out.at[rows, jnp.where(st.live, st.count, out.shape[1])].set(tok, mode="drop")
        count = st.count + st.live
        eos = is_eos(tok, eos_ids) & st.live
        stop = st.live & (eos | (count >= st.budget))
        live = st.live & ~stop
        new_logits, pages = paged_step(params, cfg, pages, page_table, st.lengths, tok, live)
        pages = constrain_pages(pages, out.shape[0])
        logits = jnp.where(live[:, None], new_logits, logits)
        st = _Slots(st.lengths + live, count, st.budget, live, st.eos | eos)
        return i + 1, pages, logits, out, st, done + jnp.sum(stop, dtype=jnp.int32)

    def more(c):
        i, _, _, _, st, done = c
        waiting = (exit_after == 0) | (done < exit_after)
        return (i < max_steps) & jnp.any(st.live) & waiting

    i, pages, logits, out, slots, _ = jax.lax.while_loop(
        more, body, (jnp.int32(0), pages, logits, out, slots, jnp.int32(0)))
    return pages, logits, out, slots, i


_split_once = jax.jit(decode_params, static_argnums=1)


class Request(NamedTuple):
    tokens: np.ndarray
    max_new_tokens: int
    index: int


def generate_many(params, cfg, prompts, *, max_new_tokens, slots: int = 8,
                  page_size: int = 16, n_pages: Optional[int] = None,
                  steps_per_call: int = 32, refill_batch: Optional[int] = None,
                  temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0, seed: int = 0, eos_id=None,
                  row_seeds: Optional[Sequence[int]] = None,
                  on_refill: Optional[Callable[[dict], None]] = None,
                  on_finish: Optional[Callable[[int, list, bool], None]] = None
                  ) -> GenerateOutput:
    """Continue every prompt by up to its max_new_tokens (an int, or one per
    prompt) with continuous batching over `slots` slots and a pool of `n_pages`
    pages of `page_size` tokens (default: enough for `slots` of the longest
    request). refill_batch: how many slots finish (while prompts wait) before
    the device loop returns to refill them (default max(1, slots // 8)).
    Returns a GenerateOutput in input order (tokens [N, max of
    max_new_tokens], PAD_ID after a row stopped).

    on_refill(info): called at every refill, after finished slots gave their
    pages back and waiting prompts were prefilled, before the next round trip;
    info has pages_in_use, pages_needed (sum over live slots of
    ceil(length / page_size)), lengths [S], live [S], table [S, P], n_pages,
    admitted (the slots just prefilled, together in one call), waiting (prompts not
    admitted yet), pool (the page pool's device arrays: read, do not keep; they
    are donated to the next call).
    on_finish(index, tokens, eos): as each request finishes (e.g. to write it out).
    """
    check_paged_family(cfg)
    rows = _check_prompts(prompts, cfg.vocab_size)
    budgets = _budgets(max_new_tokens, len(rows))
    check_sampling(temperature, top_k, top_p, min_p)
    refill_batch = max(1, slots // 8) if refill_batch is None else refill_batch
    for name, value in (("slots", slots), ("page_size", page_size),
                        ("steps_per_call", steps_per_call), ("refill_batch", refill_batch)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise InputError(f"{name}={value} must be an integer >= 1")
    eos_ids = eos_array(eos_id, cfg.vocab_size)
    # the rows' keys as host data (uint32 [N, 2]): indexed per round trip in numpy
    key_data = np.asarray(jax.random.key_data(row_keys(seed, len(rows), row_seeds)))
    # split (and fused) once for the whole run, not at every round trip and prefill:
    # the same peak memory as each call's own split (the jitted split is a copy too).
    # Only when it splits: a jitted pass-through would copy every weight.
    if splits(params, cfg):
        params = _split_once(params, cfg)
    need = [len(r) + m for r, m in zip(rows, budgets)]  # positions a request may write, +1
    for i, n in enumerate(need):
        if n > cfg.max_seq_len:
            raise InputError(f"prompt {i} has {len(rows[i])} tokens + max_new_tokens="
                             f"{budgets[i]} = {n}, longer than model.max_seq_len="
                             f"{cfg.max_seq_len}")
    full = [pages_for(n - 1, page_size) for n in need]  # pages a request ever holds
    longest = max(range(len(rows)), key=lambda i: full[i])
    layout = pool_layout(slots, slots, cfg.n_kv_heads)  # the data shards that divide slots
    shards = layout.shards if layout is not None else 1
    if n_pages is None:
        n_pages = slots * full[longest]
    if isinstance(n_pages, bool) or int(n_pages) != n_pages or n_pages < shards * full[longest]:
        per = f" (x {shards} data shards: n_pages >= {shards * full[longest]})" if shards > 1 else ""
        raise InputError(f"n_pages={n_pages}: the page pool is too small for prompt {longest} "
                         f"({len(rows[longest])} tokens + max_new_tokens={budgets[longest]}), "
                         f"which needs {full[longest]} pages of page_size={page_size}{per}")
    n_pages = -(-int(n_pages) // shards) * shards  # each data shard owns an equal block
    max_pages = max(full)
    width = -(-max(budgets) // WIDTH_BUCKET) * WIDTH_BUCKET
    pool = PagePool(n_pages, page_size, slots, max_pages, shards=shards)
    pages = init_pages(cfg, n_pages, page_size, slots=slots)
    logits = jnp.zeros((slots, cfg.vocab_size), jnp.float32)
    out_dev = jnp.full((slots, width), PAD_ID, jnp.int32)
    st = {k: np.zeros(slots, np.int32) for k in ("lengths", "count", "budget")}
    st["live"], st["eos"] = np.zeros(slots, bool), np.zeros(slots, bool)
    req_of = np.zeros(slots, np.int64)  # which request each slot holds
    queue = deque(Request(r, m, i) for i, (r, m) in enumerate(zip(rows, budgets)))
    tokens = np.full((len(rows), max(budgets)), PAD_ID, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    finished = np.zeros(len(rows), bool)
    sampler = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   min_p=float(min_p))

    def reserved(shard: int) -> int:  # pages the shard's live slots may still take
        return sum(full[req_of[s]] - len(pool.held[s]) for s in range(slots)
                   if st["live"][s] and pool.shard_of(s) == shard)

    while True:
        # refill: every free slot takes the next prompt its shard's pages can hold;
        # the admitted prompts are prefilled together, in one call
        admitted = []
        for s in range(slots):
            if st["live"][s] or not queue:
                continue
            req, shard = queue[0], pool.shard_of(s)
            if full[req.index] > pool.n_free(shard) - reserved(shard):
                continue  # wait for pages (a finishing sequence gives its pages back)
            queue.popleft()
            pool.grow(s, len(req.tokens))
            req_of[s] = req.index
            st["lengths"][s], st["count"][s], st["budget"][s] = len(req.tokens), 0, \
                req.max_new_tokens
            st["live"][s], st["eos"][s] = True, False
            admitted.append(s)
        if admitted:
            pages, logits = _prefill_into(params, cfg, pages, logits, pool,
                                          [(s, rows[req_of[s]]) for s in admitted])
        if on_refill is not None:
            on_refill({"pages_in_use": pool.in_use(), "page_size": page_size,
                       "pages_needed": int(sum(pages_for(st["lengths"][s], page_size)
                                               for s in range(slots) if st["live"][s])),
                       "lengths": st["lengths"].copy(), "live": st["live"].copy(),
                       "table": pool.table.copy(), "n_pages": pool.n_pages,
                       "admitted": admitted, "waiting": len(queue), "pool": pages})
        if not st["live"].any():
            break
        # grow: pages for the positions the next steps_per_call tokens may write
        for s in np.flatnonzero(st["live"]):
            ahead = min(steps_per_call, int(st["budget"][s] - st["count"][s] - 1))
            pool.grow(s, int(st["lengths"][s]) + ahead)
        pages, logits, out_dev, slots_dev, _ = decode_loop(
            params, cfg, pages, logits, out_dev, _Slots(**{k: v.copy() for k, v in st.items()}),
            pool.table.copy(), key_data[req_of], eos_ids, np.int32(steps_per_call),
            np.int32(min(len(queue), refill_batch)), **sampler)
        was_live = st["live"]
        # every process runs this loop on the same host state; fetch gathers what
        # spans other processes' devices (a collective each of them calls)
        new, out_np = fetch((slots_dev._asdict(), out_dev))
        st = {k: np.array(v) for k, v in new.items()}
        for s in range(slots):
            if was_live[s] and not st["live"][s]:  # finished: collect, free its pages
                i, n = int(req_of[s]), int(st["count"][s])
                tokens[i, :n], lengths[i], finished[i] = out_np[s, :n], n, st["eos"][s]
                pool.release(s)
                if on_finish is not None:
                    seq = [int(t) for t in out_np[s, :n - int(st["eos"][s])]]
                    on_finish(i, seq, bool(st["eos"][s]))
            elif st["live"][s]:
                pool.trim(s, int(st["lengths"][s]))
    return GenerateOutput(tokens, lengths, finished)


def _prefill_into(params, cfg, pages, logits, pool: PagePool, group):
    """Prefill the prompts of group [(slot, prompt)] into the pages their slots
    hold, packed: each data shard's prompts into its own row of at most
    PACK_TOKENS (a longer prompt alone), the rows of all shards in one call
    (`_prefill_packed`), as many calls as the fullest shard needs rows."""
    ps = pool.page_size
    rows = [[] for _ in range(pool.shards)]  # per shard: its packs [(slot, prompt)]
    for s, prompt in group:
        packs = rows[pool.shard_of(s)]
        if not packs or _packed(packs[-1], ps) + _packed([(s, prompt)], ps) > PACK_TOKENS:
            packs.append([])
        packs[-1].append((s, prompt))
    for k in range(max(map(len, rows))):
        pages, logits = _prefill_pack(params, cfg, pages, logits, pool,
                                      [packs[k] if k < len(packs) else [] for packs in rows])
    return pages, logits


def _packed(pack, page_size: int) -> int:
    """Tokens a pack [(slot, prompt)] takes: each prompt rounded up to a page."""
    return sum(pages_for(len(p), page_size) for _, p in pack) * page_size


def _pack_width(n: int, page_size: int) -> int:
    """The pack width for n tokens: the next of 2^k and 3 x 2^(k-1) (>= 16),
    rounded up to a page: a bounded number of compilations, <= 1.5x padding."""
    w = 16
    while w < n:
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3
    return -(-w // page_size) * page_size


def _prefill_pack(params, cfg, pages, logits, pool: PagePool, packs):
    """packs [J][(slot, prompt)]: row j the prompts of data shard j's slots, each
    from a page boundary (positions restarting, its own segment id) ->
    `_prefill_packed` over [J, W] tokens."""
    ps, slots, j = pool.page_size, pool.table.shape[0], len(packs)
    width = _pack_width(max(_packed(p, ps) for p in packs), ps)
    n_out = min(slots, j * width // ps)  # the logits rows: a function of the width only
    tokens, positions, segments = (np.zeros((j, width), np.int32) for _ in range(3))
    ids = np.full((j, width // ps), pool.n_pages, np.int32)
    last, slot_ids = np.zeros(n_out, np.int32), np.full(n_out, slots, np.int32)
    out = 0
    for row, pack in enumerate(packs):
        at = 0
        for seg, (s, prompt) in enumerate(pack, 1):
            n = len(prompt)
            tokens[row, at:at + n], positions[row, at:at + n] = prompt, np.arange(n)
            segments[row, at:at + n] = seg
            ids[row, at // ps:at // ps + len(pool.held[s])] = pool.held[s]
            last[out], slot_ids[out] = row * width + at + n - 1, s
            at, out = at + pages_for(n, ps) * ps, out + 1
    return _prefill_packed(params, cfg, pages, logits, tokens, positions, segments, last, ids,
                           slot_ids)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("pages", "logits"))
def _prefill_packed(params, cfg, pages, logits, tokens, positions, segments, last, page_ids,
                    slot_ids):
    """Prefill packed rows: tokens, positions, segments [J, W] (a row's r-th prompt
    at segment r + 1, from a page boundary; 0: padding) -> each layer's K/V
    written at page_ids [J, W / ps] (n_pages: dropped) and the logits after each
    prompt's last token (at last [R], flat indices into [J * W]) set in slots
    slot_ids [R] (S: dropped). The attention is the model's causal self-attention
    within each segment (`decoder`)."""
    TRACE_COUNTS["admit"] += 1
    hidden, aux = decoder(params, cfg, tokens, positions=positions, segment_ids=segments,
                          return_hidden=True, return_kv=True)
    last_hidden = hidden.reshape(-1, hidden.shape[-1])[last]
    new_logits = unembed(params, last_hidden[:, None], cfg)[:, 0]
    slots = logits.shape[0]
    kv = aux["kv"]
    pages = constrain_pages(write_prompt(pages, kv["k"], kv["v"], page_ids, slots), slots)
    return pages, logits.at[slot_ids].set(new_logits, mode="drop")


def _budgets(max_new_tokens, n: int) -> list[int]:
    values = [max_new_tokens] * n if np.isscalar(max_new_tokens) else list(max_new_tokens)
    if len(values) != n:
        raise InputError(f"max_new_tokens: {len(values)} values for {n} prompts (give one "
                         "int, or one per prompt)")
    for i, m in enumerate(values):
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise InputError(f"max_new_tokens={m} (prompt {i}) must be an integer >= 1")
    return [int(m) for m in values]


ENGINE_KWARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "eos_id")
# What the engine lacks (the page pool holds K/V at the model's dtype): the static path's.
_OFF = {k: off for k, off in DECODING_OFF.items() if k not in ENGINE_KWARGS}


def unsupported(cfg, kwargs: dict) -> Optional[str]:
    """Why the engine cannot run these `jaxlm.generate` keyword arguments (as
    `generate_kwargs` makes them) on this model, or None if it can."""
    try:
        check_paged_family(cfg)
    except InputError as e:
        return str(e)
    for k, off in _OFF.items():
        if k in kwargs and kwargs[k] != off:
            return f"{k}={kwargs[k]!r} is the static path's (jaxlm.generate)"
    return None


def engine_kwargs(kwargs: dict) -> dict:
    """generate_kwargs(...) -> the keyword arguments generate_many takes."""
    return {k: kwargs[k] for k in ENGINE_KWARGS if k in kwargs}
