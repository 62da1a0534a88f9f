"""Speculative decoding with a draft model, the whole cycle inside one `lax.while_loop`.

    out = generate_speculative(params, cfg, draft_params, draft_cfg, prompts,
                               max_new_tokens=64, num_speculative=4)
    out.tokens / out.lengths / out.sequences()   # as jaxlm.generate
    out.stats   # {"cycles", "drafted", "accepted", "acceptance_rate"}

Both models are jaxlm decoders over the same vocabulary, each with its own
preallocated cache. After one prefill of each, a cycle is:

1. the draft proposes k tokens autoregressively (k + 1 one-token steps under
   a `lax.scan`: the last one only writes the k-th draft into its cache);
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
4. both caches roll back by setting `lengths` to the committed length (the
   K/V written past it are masked, then overwritten).

Rows accept different numbers of tokens per cycle: each row has its own
output count and cache length. Greedy output equals the target's greedy
output token for token, whatever the draft (up to float ties between the
one-token and the k + 1-token forwards of the target).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .cache import init_cache
from .generate import (PAD_ID, GenerateOutput, _cache_len, _check_args,
                                  _check_fits, _check_prompts, _pad_prompts, _prompt_bucket,
                                  _round_up, WIDTH_BUCKET, decode_step, prefill, row_keys)
from .processors import eos_array, is_eos
from .sampling import greedy, sample, warp
from ..model import forward

TRACE_COUNTS = {"cycle": 0}


class _Spec(NamedTuple):
    cycle: jax.Array  # cycles run
    tcache: dict  # target cache: committed tokens except `cur`
    dcache: dict  # draft cache: the same tokens
    cur: jax.Array  # [B] last committed token, not yet fed to either model
    out: jax.Array  # [B, width + k + 1] generated tokens
    n_out: jax.Array  # [B] generated so far
    done: jax.Array  # [B]
    drafted: jax.Array  # [] draft tokens proposed to live rows
    accepted: jax.Array  # [] of which accepted


def generate_speculative(params, cfg, draft_params, draft_cfg, prompts, *, max_new_tokens: int,
                         num_speculative: int = 4, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, eos_id=None,
                         max_len=None) -> GenerateOutput:
    """Continue each prompt by up to max_new_tokens tokens of the target (params,
    cfg), drafting num_speculative tokens per cycle with (draft_params, draft_cfg)."""
    for name, c in (("target", cfg), ("draft", draft_cfg)):
        if c.family != "decoder":
            raise InputError(f"speculative decoding needs decoder models; the {name} is "
                             f"{c.family!r}")
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise InputError(f"the draft's vocabulary ({draft_cfg.vocab_size} tokens) differs from "
                         f"the target's ({cfg.vocab_size}): speculative decoding needs one "
                         "shared vocabulary")
    k = num_speculative
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"num_speculative={k} must be an integer >= 1")
    rows = _check_prompts(prompts, cfg.vocab_size)
    _check_args(cfg, max_new_tokens, temperature, top_k, top_p, eos_id)
    eos_ids = eos_array(eos_id, cfg.vocab_size)
    longest = max(len(r) for r in rows)
    max_len = min(_cache_len(cfg, longest, max_new_tokens, max_len), draft_cfg.max_seq_len)
    _check_fits(rows, max_new_tokens, max_len, cfg)
    tokens, prompt_lengths = _pad_prompts(rows, min(_prompt_bucket(longest), max_len))
    b = len(rows)
    tlogits, tcache = prefill(params, cfg, init_cache(cfg, b, max_len), tokens, prompt_lengths)
    _, dcache = prefill(draft_params, draft_cfg, init_cache(draft_cfg, b, max_len), tokens,
                        prompt_lengths)
    width = _round_up(max_new_tokens, WIDTH_BUCKET)
    out = spec_decode(params, cfg, draft_params, draft_cfg, tcache, dcache, tlogits,
                      row_keys(seed, b), jnp.int32(max_new_tokens), eos_ids, k=int(k),
                      width=width, temperature=float(temperature), top_k=int(top_k),
                      top_p=float(top_p))
    out = jax.device_get({n: v for n, v in out.items() if n not in ("tcache", "dcache")})
    n = out["n_out"]
    toks = np.where(np.arange(out["out"].shape[1])[None] < n[:, None], out["out"], PAD_ID)
    toks = toks[:, :max_new_tokens].astype(np.int32)
    last = toks[np.arange(b), np.maximum(n - 1, 0)]
    ids = np.asarray(eos_ids)
    finished = np.isin(last, ids[ids >= 0]) & (n > 0)
    drafted, accepted = int(out["drafted"]), int(out["accepted"])
    stats = {"cycles": int(out["cycle"]), "drafted": drafted, "accepted": accepted,
             "acceptance_rate": accepted / drafted if drafted else 0.0}
    return GenerateOutput(toks, n.astype(np.int32), finished, None, None, stats)


@partial(jax.jit, static_argnames=("cfg", "draft_cfg", "k", "width", "temperature", "top_k",
                                   "top_p"), donate_argnames=("tcache", "dcache"))
def spec_decode(params, cfg, draft_params, draft_cfg, tcache, dcache, tlogits, keys,
                max_new_tokens, eos_ids, *, k: int, width: int, temperature: float,
                top_k: int, top_p: float):
    """The draft -> verify -> accept loop (module docstring); returns device arrays."""
    b = tlogits.shape[0]
    is_greedy = temperature == 0 or top_k == 1
    rows = jnp.arange(b)
    dist = partial(warp, temperature=temperature, top_k=top_k, top_p=top_p)
    pick = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def cycle(s: _Spec) -> _Spec:
        TRACE_COUNTS["cycle"] += 1
        ck = jax.vmap(jax.random.fold_in, (0, None))(keys, s.cycle + 1)  # [B] keys
        split = jax.vmap(lambda key: jax.random.split(key, 2 * k + 2))(ck)  # [B, 2k+2]

        def draft_step(carry, i):
            cache, tok = carry
            logits, cache = decode_step(draft_params, draft_cfg, cache, tok)
            d = pick(logits, split[:, i])
            q = None if is_greedy else jax.nn.softmax(dist(logits), axis=-1)
            return (cache, d), (d, q)

        (dcache, _), (drafts, q) = jax.lax.scan(draft_step, (s.dcache, s.cur),
                                                jnp.arange(k + 1))
        drafts = drafts[:k].T  # [B, k]
        seq = jnp.concatenate([s.cur[:, None], drafts], axis=1)  # [B, k + 1]
        plogits, aux = forward(params, cfg, seq, cache=s.tcache)  # [B, k + 1, V]
        tcache = aux["cache"]
        if is_greedy:
            target = greedy(plogits)  # [B, k + 1]: argmax
            ok = drafts == target[:, :k]
            n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # leading acceptances [B]
            nxt = jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
        else:
            p = jax.nn.softmax(jax.vmap(dist, in_axes=1, out_axes=1)(plogits), axis=-1)
            q = jnp.moveaxis(q[:k], 0, 1)  # [B, k, V]
            pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
            qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
            u = jax.vmap(jax.vmap(jax.random.uniform))(split[:, k + 1:2 * k + 1])  # [B, k]
            n = jnp.sum(jnp.cumprod(u * qd < pd, axis=1), axis=1)
            q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_k = 0
            p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
            resid = jnp.maximum(p_n - jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0],
                                0.0)
            resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_n)
            nxt = jax.vmap(jax.random.categorical)(split[:, 2 * k + 1],
                                                   jnp.log(resid)).astype(jnp.int32)
        new = jnp.where(jnp.arange(k + 1)[None] < n[:, None],
                        jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])  # [B, k + 1]
        # emitted count: n + 1, cut after the first EOS and at max_new_tokens; 0 when done
        eos_at = jnp.where(is_eos(new, eos_ids) & (jnp.arange(k + 1)[None] <= n[:, None]),
                           jnp.arange(k + 1)[None], k + 1)
        first_eos = jnp.min(eos_at, axis=1)
        c = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), max_new_tokens - s.n_out)
        c = jnp.where(s.done, 0, c)
        cols = s.n_out[:, None] + jnp.arange(k + 1)[None]
        out = s.out.at[rows[:, None], cols].set(
            jnp.where(jnp.arange(k + 1)[None] < c[:, None], new, s.out[rows[:, None], cols]),
            mode="drop")
        n_out = s.n_out + c
        done = s.done | (first_eos < c) | (n_out >= max_new_tokens)
        cur = jnp.where(c > 0, jnp.take_along_axis(new, jnp.maximum(c - 1, 0)[:, None],
                                                   axis=1)[:, 0], s.cur)
        live = ~s.done
        tcache = dict(tcache, lengths=s.tcache["lengths"] + c)
        dcache = dict(dcache, lengths=s.dcache["lengths"] + c)
        return s._replace(cycle=s.cycle + 1, tcache=tcache, dcache=dcache, cur=cur, out=out,
                          n_out=n_out, done=done,
                          drafted=s.drafted + k * jnp.sum(live),
                          accepted=s.accepted + jnp.sum(jnp.where(live, n, 0)))

    first = pick(tlogits, jax.vmap(jax.random.fold_in, (0, None))(keys, 0))
    out = jnp.full((b, width + k + 1), PAD_ID, jnp.int32).at[:, 0].set(first)
    s = _Spec(cycle=jnp.int32(0), tcache=tcache, dcache=dcache, cur=first, out=out,
              n_out=jnp.ones((b,), jnp.int32),
              done=is_eos(first, eos_ids) | (max_new_tokens <= 1),
              drafted=jnp.int32(0), accepted=jnp.int32(0))
    s = jax.lax.while_loop(lambda s: ~jnp.all(s.done), cycle, s)
    return {"out": s.out, "n_out": s.n_out, "cycle": s.cycle, "drafted": s.drafted,
            "accepted": s.accepted, "tcache": s.tcache, "dcache": s.dcache}
