"""Speculative decoding: one cycle of the engine's loop, drafted by a second model or by
the model's own multi-token prediction modules (self-speculation).

    out = jaxlm.generate(params, cfg, prompts, max_new_tokens=64,
                         draft=(draft_params, draft_cfg), num_speculative=4)
    out = jaxlm.generate(params, cfg, prompts, max_new_tokens=64, draft="mtp")
    out.stats   # {"cycles", "drafted", "accepted", "acceptance_rate"}

A draft model is a jaxlm decoder over the same vocabulary with its own cache over
the engine's slots (a paged one: the same page tables); `draft="mtp"` drafts with
the target's own model.mtp_depth MTP modules (`jaxlm.model.mtp`), whose cache
(one layer per module) sits over the same slots and tables. A cycle is
(`engine_cycle`):

1. the drafts: a draft model proposes k tokens autoregressively (k + 1 one-token
   steps under a `lax.scan`: the last one only writes the k-th draft into its
   cache); with MTP they were made by the cycle before (step 5);
2. the target scores the last committed token and the k drafts in one
   forward of k + 1 tokens per row;
3. greedy: the drafts are accepted while they equal the target's argmax, and
   the target's own token follows (the correction, or a bonus token when all k
   were accepted). Sampling (Leviathan et al. 2023): draft token d is accepted
   with probability min(1, p(d) / q(d)); at the first rejection the next
   token is drawn from normalise(max(0, p - q)), after k acceptances from p.
   p and q are the target's and draft's distributions after temperature /
   top-k / top-p (`jaxlm.infer.sampling.warp`), so the output follows the
   target's own sampler;
4. both caches roll back by keeping the committed length (the K/V written past
   it are masked, then overwritten);
5. MTP: the modules run over the cycle's window, positions L - 1 ... L + k (L the
   cache length before the cycle): module 1 reads the target's hidden states there
   (the last cycle's at L - 1, this verify pass's after) and the committed tokens
   one ahead, module j module j - 1's outputs and the tokens j ahead, the drafts
   of the modules before standing in past the committed ones; module j's output
   at the last committed position drafts the next cycle's j-th token (k <=
   model.mtp_depth). A slot's first cycle verifies placeholder drafts.

Rows accept different numbers of tokens per cycle: each row has its own
output count and cache length. Greedy output equals the target's greedy
output token for token, whatever the draft (up to float ties between the
one-token and the k + 1-token forwards of the target).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .processors import is_eos
from .sampling import greedy


# ------------------------------------------------------------ in the engine

def engine_cycle(st, kv, sl, step, feats, kind: str, page_table, draft_step, params=None,
                 cfg=None):
    """One speculative cycle of every live slot (module docstring): a slot that has
    not emitted yet first takes its token from the target's prefill logits; then the
    drafts (a draft model's k one-token steps over its cache from each slot's last
    token, or the MTP drafts of the cycle before), the target scores them in one
    (k + 1)-token pass, the accepted ones and the target's own next token are emitted
    (cut after a stop id and at the budget), and both caches keep the committed length;
    with MTP (feats.mtp: draft_step is `engine.mtp_step`, params / cfg the target's) the
    modules then draft the next cycle. -> (state, kv, slots, stopped slots [S])."""
    from .engine import Slots, finish, record
    from .sampling import pick, warp_rows
    rows = st.rows
    k = feats.speculative
    s_total, w = rows.out.shape
    slots = jnp.arange(s_total)
    keys = jax.random.wrap_key_data(rows.keys)
    shape = feats.sampler
    pick_ = partial(pick, rows=rows.sampler, shape=shape)
    sampled = shape.sample
    probs = lambda logits: jax.nn.softmax(warp_rows(logits, rows.sampler, shape), axis=-1)  # noqa

    # a slot's first token, from the prefill's logits (fold 0, as a plain step's first)
    fresh = sl.live & (sl.count == 0)
    first = pick_(rows.logits, key=jax.vmap(jax.random.fold_in)(keys, sl.count))
    rows = record(rows, sl._replace(live=fresh), first, rows.logits)
    after, stop0 = finish(sl._replace(live=fresh), first, rows, fresh.astype(jnp.int32))
    sl = Slots(sl.lengths, after.count, sl.budget, jnp.where(fresh, after.live, sl.live),
               after.eos)
    cur = rows.out[slots, jnp.maximum(sl.count - 1, 0)]
    ck = jax.vmap(jax.random.fold_in)(keys, sl.count + 1)
    split = jax.vmap(lambda key: jax.random.split(key, 2 * k + 2))(ck)  # [S, 2k + 2]

    if feats.mtp:  # drafted by the cycle before
        drafts, q, dkv = st.mtp.drafts, st.mtp.q, st.draft_kv
    else:
        def draft_one(carry, i):
            dkv, tok = carry
            logits, dkv = draft_step(dkv, tok[:, None], sl.lengths + i, sl.live)
            logits = logits[:, 0]
            d = pick_(logits, key=split[:, i])
            return (dkv, d), (d, probs(logits) if sampled else None)

        (dkv, _), (drafts, q) = jax.lax.scan(draft_one, (st.draft_kv, cur), jnp.arange(k + 1))
        drafts = drafts[:k].T  # [S, k]
        q = None if q is None else jnp.moveaxis(q[:k], 0, 1)  # [S, k, V]
    seq = jnp.concatenate([cur[:, None], drafts], axis=1)  # [S, k + 1]
    plogits, kv, *hidden = step(kv, seq, sl.lengths, sl.live, with_hidden=feats.mtp)
    target = greedy(plogits)  # [S, k + 1]
    n = jnp.sum(jnp.cumprod(drafts == target[:, :k], axis=1), axis=1)
    nxt = jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
    if sampled:  # Leviathan et al.: accept d with prob min(1, p(d) / q(d))
        p = jax.nn.softmax(jax.vmap(lambda x: warp_rows(x, rows.sampler, shape), 1, 1)(plogits),
                           axis=-1)
        pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
        qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        u = jax.vmap(jax.vmap(jax.random.uniform))(split[:, k + 1:2 * k + 1])  # [S, k]
        ns = jnp.sum(jnp.cumprod(u * qd < pd, axis=1), axis=1)
        q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_k = 0
        p_n = jnp.take_along_axis(p, ns[:, None, None], axis=1)[:, 0]
        resid = jnp.maximum(p_n - jnp.take_along_axis(q_pad, ns[:, None, None], axis=1)[:, 0],
                            0.0)
        resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_n)
        nx = jax.vmap(jax.random.categorical)(split[:, 2 * k + 1],
                                              jnp.log(resid)).astype(jnp.int32)
        greedy_row = (rows.sampler.temperature <= 0) | (rows.sampler.top_k == 1)
        n, nxt = jnp.where(greedy_row, n, ns), jnp.where(greedy_row, nxt, nx)
    new = jnp.where(jnp.arange(k + 1)[None] < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                    nxt[:, None])  # [S, k + 1]
    # emitted: n + 1, cut after the first stop id and at the budget; 0 when not live
    eos_at = jnp.where(is_eos(new, rows.stop_ids[:, None, :]) &
                       (jnp.arange(k + 1)[None] <= n[:, None]), jnp.arange(k + 1)[None], k + 1)
    c = jnp.minimum(jnp.minimum(n + 1, jnp.min(eos_at, axis=1) + 1), sl.budget - sl.count)
    c = jnp.where(sl.live, c, 0)
    cols = sl.count[:, None] + jnp.arange(k + 1)[None]
    keep = jnp.arange(k + 1)[None] < c[:, None]
    out = rows.out.at[slots[:, None], jnp.where(keep, cols, w)].set(new, mode="drop")
    rows = rows._replace(out=out)
    last = jnp.take_along_axis(new, jnp.maximum(c - 1, 0)[:, None], axis=1)[:, 0]
    was = sl.live
    if feats.mtp:
        st, dkv = _mtp_drafts(st, dkv, draft_step, params, cfg, hidden[0], cur, new, n,
                              sl._replace(live=was), split[:, :k], pick_,
                              probs if sampled else None)
    sl, stop = finish(sl, last, rows, c)
    sl = sl._replace(lengths=sl.lengths + c)
    spec = st.spec + jnp.stack([k * jnp.sum(was), jnp.sum(jnp.where(was, n, 0))]).astype(
        jnp.int32)
    return st._replace(rows=rows, draft_kv=dkv, spec=spec), kv, sl, stop | stop0


def _mtp_drafts(st, dkv, mtp_step, params, cfg, hidden, cur, new, n, sl, keys, pick_, probs):
    """Step 5 of the cycle (module docstring): the MTP modules over the window at
    positions sl.lengths - 1 + [0, k + 2) -> (state with the next cycle's drafts and the
    target's hidden state at the last committed position, the modules' cache)."""
    from ..model.layers.embeddings import unembed
    from ..model.mtp import mtp_normed
    s, k = keys.shape[:2]
    rows = jnp.arange(s)
    at = n + 1  # the window's index of the last committed position, L + n
    h = jnp.concatenate([st.mtp.hidden[:, None].astype(hidden.dtype), hidden], axis=1)
    # ext[j]: token L + j: cur, the committed ones, then the drafts as they come
    ext = jnp.concatenate([cur[:, None], new, jnp.zeros((s, k), jnp.int32)], axis=1)
    start = jnp.maximum(sl.lengths - 1, 0)
    drafts, qs = [], []
    for j in range(k):
        h, dkv = mtp_step(dkv, j, h, ext[:, j:j + k + 2], start, sl.live)
        logits = unembed(params, mtp_normed(params, h[rows, at], j, cfg)[:, None], cfg)[:, 0]
        d = pick_(logits, key=keys[:, j])
        ext = ext.at[rows, at + 1 + j].set(d)
        drafts.append(d)
        if probs is not None:
            qs.append(probs(logits))
    mtp = st.mtp._replace(hidden=jnp.where(sl.live[:, None], hidden[rows, n].astype(
        st.mtp.hidden.dtype), st.mtp.hidden), drafts=jnp.stack(drafts, axis=1),
        q=jnp.stack(qs, axis=1) if qs else None)
    return st._replace(mtp=mtp), dkv
