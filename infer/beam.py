"""Beam search inside one compiled `lax.while_loop`, with Hugging Face's semantics.

A request with K beams takes K consecutive slots of the engine
(`jaxlm.infer.engine`), its prompt prefilled once and its state (cache, logits,
processor history) copied to the K slots. Each step (`engine_step`, every
request's group at its own length) then follows transformers 5's `_beam_search`:

1. log_softmax of the next-token logits, the logit processors (on the
   log-probabilities, as HF), plus each beam's running score: [B, K * V];
2. the top C = max(2, 1 + n_eos) * K candidates of each prompt;
3. a candidate "hits" when its token is an EOS id or the length reaches
   max_new_tokens; the best K candidates that do not hit run on (the slots'
   cache, history and tokens are reordered: a contiguous cache's rows, a paged
   cache's pages through the page tables);
4. the hits among the first K candidates join the finished hypotheses with
   score = sum of log-probs / length ** length_penalty, keeping the best K;
5. stop when no prompt can improve (HF's early-stopping heuristic: False
   compares with the current length, "never" with max_new_tokens when
   length_penalty > 0), when every prompt has K finished hypotheses and
   early_stopping is True, or when every candidate hit.

`length` counts the generated tokens (EOS included): HF's cur_len + 1 -
decoder_prompt_len, for decoder-only and encoder-decoder models alike.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import processors as lp

NEG = -1.0e9  # HF's "impossible" score


class Groups(NamedTuple):
    """Beam search state of G requests of K beams each (slots g K .. g K + K - 1)."""
    run_scores: jax.Array  # [G, K] summed log-probs of the running beams (best first)
    fin_tokens: jax.Array  # [G, K, W]
    fin_scores: jax.Array  # [G, K] length-penalised
    fin_lengths: jax.Array  # [G, K]
    fin_done: jax.Array  # [G, K] bool
    improvable: jax.Array  # [G] bool
    length_penalty: jax.Array  # [G] f32
    when_full: jax.Array  # [G] bool: early_stopping=True
    never: jax.Array  # [G] bool: early_stopping="never"


def init_groups(g: int, k: int, width: int) -> Groups:
    return Groups(jnp.zeros((g, k), jnp.float32), jnp.full((g, k, width), -1, jnp.int32),
                  jnp.full((g, k), NEG, jnp.float32), jnp.zeros((g, k), jnp.int32),
                  jnp.zeros((g, k), bool), jnp.ones((g,), bool), jnp.ones((g,), jnp.float32),
                  jnp.zeros((g,), bool), jnp.zeros((g,), bool))


def reset_groups(b: Groups, admitted, length_penalty, early) -> Groups:
    """The groups whose first slot is admitted ([S] masks / values) start afresh:
    only beam 0 runs (the K slots hold the same prompt), nothing finished."""
    g, k = b.run_scores.shape
    new = admitted.reshape(g, k)[:, 0]
    fresh = init_groups(g, k, b.fin_tokens.shape[-1])
    fresh = fresh._replace(run_scores=fresh.run_scores.at[:, 1:].set(NEG),
                           length_penalty=length_penalty.reshape(g, k)[:, 0],
                           when_full=early.reshape(g, k)[:, 0] == 1,
                           never=early.reshape(g, k)[:, 0] == 2)
    pick = lambda a, f: jnp.where(new.reshape((g,) + (1,) * (a.ndim - 1)), f, a)  # noqa: E731
    return jax.tree.map(pick, b, fresh)


def hypotheses(b: Groups, g: int):
    """Group g's finished hypotheses, best first (host numpy): tokens [K, W] (-1 past
    each length), scores [K], lengths [K]."""
    import numpy as np
    from ..sharding.distributed import fetch
    tokens, scores, lengths = fetch((b.fin_tokens[g], b.fin_scores[g], b.fin_lengths[g]))
    tokens = np.where(np.arange(tokens.shape[1])[None] < lengths[:, None], tokens, -1)
    return tokens, np.asarray(scores), np.asarray(lengths)


def engine_step(st, kv, sl, step, feats, kind: str, page_table):
    """One beam step of every group (transformers' `_beam_search`, module docstring),
    the groups advancing together, each at its own length: select, reorder the beams
    (their cache, history and tokens), feed the chosen tokens. -> (state, kv, slots,
    stopped slots [S])."""
    from .engine import Slots
    rows, b = st.rows, st.beams
    g, k = b.run_scores.shape
    s_total, v = rows.logits.shape
    w = rows.out.shape[1]
    c = max(2, 1 + feats.stops) * k
    first = jnp.arange(g) * k
    live = sl.live[first]  # [G]
    at = sl.count[first]  # tokens generated so far, per group
    length = at + 1
    budget = sl.budget[first]
    logp = jax.nn.log_softmax(rows.logits.astype(jnp.float32), axis=-1)
    logp = lp.apply(feats.processors, logp, rows.hist, rows.penalties, sl.count, rows.stop_ids)
    acc = (logp.reshape(g, k, v) + b.run_scores[..., None]).reshape(g, k * v)
    top_lp, top_idx = jax.lax.top_k(acc, c)  # [G, C]
    src, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
    run_tokens = rows.out.reshape(g, k, w)
    cand = jnp.take_along_axis(run_tokens, src[..., None], axis=1)  # [G, C, W]
    cand = cand.at[jnp.arange(g)[:, None], jnp.arange(c)[None], at[:, None]].set(tok,
                                                                                 mode="drop")
    stops = rows.stop_ids[first]  # [G, E]
    hits = lp.is_eos(tok, stops[:, None, :]) | (length >= budget)[:, None]  # [G, C]

    run_lp = top_lp + jnp.where(hits, NEG, 0.0)
    run_scores, keep = jax.lax.top_k(run_lp, k)  # [G, K]
    new_tokens = jnp.take_along_axis(cand, keep[..., None], axis=1)
    beam_src = jnp.take_along_axis(src, keep, axis=1)  # [G, K]

    lpen = b.length_penalty[:, None]
    fin_lp = top_lp / (length[:, None].astype(jnp.float32) ** lpen)
    full = jnp.all(b.fin_done, axis=-1, keepdims=True) & b.when_full[:, None]
    just = hits & (jnp.arange(c) < k)[None]
    fin_lp = (fin_lp + jnp.where(full, NEG, 0.0) + jnp.where(b.improvable[:, None], 0.0, NEG)
              + jnp.where(just, 0.0, NEG))
    fin_scores, best = jax.lax.top_k(jnp.concatenate([b.fin_scores, fin_lp], axis=1), k)
    pick = lambda a: jnp.take_along_axis(a, best if a.ndim == 2 else best[..., None], axis=1)
    fin_tokens = pick(jnp.concatenate([b.fin_tokens, cand], axis=1))
    fin_lengths = pick(jnp.concatenate(
        [b.fin_lengths, jnp.broadcast_to(length[:, None], (g, c)).astype(jnp.int32)], axis=1))
    fin_done = pick(jnp.concatenate([b.fin_done, just], axis=1))

    best_len = jnp.where(b.never & (b.length_penalty > 0.0), budget.astype(jnp.float32),
                         length.astype(jnp.float32))
    best_running = run_scores[:, 0] / best_len ** b.length_penalty
    worst = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
    improvable = b.improvable & jnp.any(best_running[:, None] > worst, axis=1)
    go_on = improvable & ~(jnp.all(fin_done, axis=1) & b.when_full) & ~jnp.all(hits, axis=1)

    on = lambda new, old: jnp.where(live.reshape((g,) + (1,) * (old.ndim - 1)), new, old)  # noqa
    b = b._replace(run_scores=on(run_scores, b.run_scores), fin_tokens=on(fin_tokens, b.fin_tokens),
                   fin_scores=on(fin_scores, b.fin_scores),
                   fin_lengths=on(fin_lengths, b.fin_lengths), fin_done=on(fin_done, b.fin_done),
                   improvable=on(improvable, b.improvable))
    slot_live = jnp.repeat(live, k)
    rows_src = jnp.where(slot_live, (first[:, None] + beam_src).reshape(-1),
                         jnp.arange(s_total))  # each slot's source beam
    nxt = jnp.take_along_axis(new_tokens, at[:, None, None], axis=2)[..., 0].reshape(-1)
    out = jnp.where(slot_live[:, None], new_tokens.reshape(s_total, w), rows.out)
    hist = lp.push(lp.gather(rows.hist, rows_src), nxt, slot_live)
    kv = reorder_kv(kv, rows_src, kind, page_table)
    still = jnp.repeat(live & go_on, k)
    stopped = sl.live & ~still
    sl = Slots(sl.lengths, sl.count + sl.live, sl.budget, still, sl.eos)
    logits, kv = step(kv, jnp.maximum(nxt, 0)[:, None], sl.lengths, sl.live)
    rows = rows._replace(out=out, hist=hist,
                         logits=logits[:, 0])
    sl = sl._replace(lengths=sl.lengths + sl.live)
    return st._replace(rows=rows, beams=b), kv, sl, stopped


def reorder_kv(kv: dict, src, kind: str, page_table):
    """The cache with slot s holding what slot src[s] held: a contiguous cache's rows
    (stacked [L, S, ...] or split per layer [S, ...]); a paged cache's pages, slot by
    slot through the page tables (every read before every write)."""
    if kind == "paged":
        dst = page_table.reshape(-1)
        from_ = jnp.take(page_table, src, axis=0).reshape(-1)
        return jax.tree.map(lambda a: a.at[:, dst].set(jnp.take(a, from_, axis=1, mode="clip"),
                                                       mode="drop"), kv)
    return {n: tuple(jnp.take(x, src, axis=0) for x in a) if isinstance(a, tuple)
            else jnp.take(a, src, axis=1) for n, a in kv.items()}
