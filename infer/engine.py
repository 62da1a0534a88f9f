"""The one inference engine: requests in, tokens out, continuous batching over a KV cache.

    eng = Engine(params, cfg, settings=GenerateConfig(max_new_tokens=64), slots=8)
    req = eng.add([5, 7, 9], temperature=0.7, num_return_sequences=2)   # any time
    for event in eng.stream():                              # tokens as they are produced
        print(event.request.index, event.sample, event.tokens, event.finish_reason)
    req.outputs[0].tokens, req.outputs[0].finish_reason      # "stop" | "length"

A fixed number of slots decode together, one sequence each, over one KV cache:
a pool of pages (`cache="paged"`, `jaxlm.model.kv.Paged`: each slot holds the
pages its sequence has written, from one allocator, `jaxlm.infer.pages`) or
one preallocated row per slot (`cache="contiguous"`, `jaxlm.model.kv.Contiguous`:
faster per step when every request fits the slots at once, BENCHMARKS.md). The
device runs up to `steps_per_call` steps per host round trip in one
`lax.while_loop` compiled once (`_run`); the loop exits early once
`refill_batch` slots have finished while requests wait, and the host then frees
their slots, admits the next requests (prefilled together in one call, `_admit`:
packed into one row per data shard, each prompt from a page boundary, its own
segment ids and positions), and goes on. A request arriving mid-run waits for a
slot like any other: nothing recompiles.

Every decoding feature of `jaxlm.generate` runs here, in the same loop:
* one sampling step (`jaxlm.infer.sampling.pick` after the logit processors and
  the guide mask), each slot with its own settings (temperature, top-k, top-p,
  min-p, penalties, min_new_tokens, stop ids, seed: traced, so requests with
  other values share the compiled loop; `Features` holds what is static);
* `n` samples of one prompt: prefilled once, its full pages shared by the n
  slots (a paged cache allocates them once), the partial last page copied;
* beam search (`jaxlm.infer.beam`): a request takes num_beams slots, reordered
  within the group every step;
* speculative decoding (`jaxlm.infer.speculative`): a draft model's cache over
  the same slots and page tables, k drafts and one verify pass per cycle;
* guided decoding (a per-slot automaton state over one stacked table);
* per-token log-probs and raw logits (`return_logits`);
* every generative family: decoders (RoPE, learned, ALiBi positions; MoE) and
  encoder-decoders (T5: the encoder runs at admission, its cross K/V kept per
  slot, the relative bias over the cache's positions).

Stop strings (`stop`) end a sequence on its decoded text (checked on the host
after each round trip, as vLLM / OpenAI do); the text returned stops before the
stop string. Row r of request i samples its t-th token with fold_in(fold_in(
key(seed), row_seed), t) (row_seed defaulting to the request's index; sample j of
n folds in j on top), so a request's tokens do not depend on what it is batched
with. Multi-process: every process runs the host loop on the same state; each
round trip's per-slot state is gathered to all (`sharding.distributed.fetch`).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ..model.families.decoder import decoder, fuse_projections, unstack_layers
from ..model.families.encoder_decoder import cross_kv, decode as decode_t5, decoder_layers, encode
from ..model.kv import Contiguous, Paged, init_cache, init_pages
from ..model.kv.contiguous import split_layers, stack_layers
from ..model.kv.paged import pages_for, pool_layout
from ..model.block import BlockInputs
from ..model.config import dtype_of
from ..model.kv.quant import kv_dtype_of
from ..model.layers.embeddings import unembed
from ..model.mtp import mtp_module, shifted
from ..sharding.context import context_size
from ..sharding.distributed import fetch
from . import guided
from .pages import PagePool
from .processors import History, Penalties, ProcessorShape, apply as apply_processors, \
    is_eos, push
from .sampling import Sampler, SamplerShape, pick

PAD_ID = -1  # fills output rows after a sequence stopped
WIDTH_BUCKET = 64
PACK_TOKENS = 512  # a prefill pack's width (a prompt's own, if longer): its attention is W^2
STOP_SLOTS = 4  # stop ids per slot (more: the next power of two)
# Decode loops up to this many layers and bytes of layer weights run the layers
# unrolled over per-layer weights split once before the loop: no step copies a
# layer's weights out of the stack (XLA materialises a slice of a scanned array
# that feeds a matmul). Beyond, the scan (trace / compile time; the split copy's
# peak memory).
UNROLL_MAX_LAYERS = 32
UNROLL_MAX_BYTES = 2 ** 30


# ------------------------------------------------------------ what a run compiles

@dataclasses.dataclass(frozen=True)
class Features:
    """What the compiled loop runs (static): the sampler's and the processors' code
    paths over all requests (`of`), guides, beams, speculative decoding, what each
    step records, and the buffers' widths."""
    sampler: SamplerShape = SamplerShape()
    processors: ProcessorShape = ProcessorShape()
    guided: bool = False
    beams: int = 0  # num_beams of every request (0: no beam search)
    speculative: int = 0  # drafts per cycle (0: none)
    mtp: bool = False  # speculative drafts from the model's own MTP modules (model.mtp_depth)
    logprobs: bool = False
    top_logprobs: int = 0  # the k most likely tokens' log-probs recorded each step (0: none)
    return_logits: bool = False
    width: int = WIDTH_BUCKET  # output columns per slot
    stops: int = STOP_SLOTS  # stop ids per slot
    history: int = 0  # the n-gram history's columns (prompt + output)
    # the loop reads per-layer weights split (and q|k|v, gate|up fused) from the stack
    # up to the unroll limit (`unrolls`: a copy of the layer weights while it runs);
    # False: the layer scan over the stacked weights as given, no copy (GRPO's
    # rollouts over the training params, train/rollout.py)
    split_weights: bool = True

    @classmethod
    def of(cls, settings: Sequence, vocab_size: int, **kw) -> "Features":
        """Features that run every one of `settings` (GenerateConfig-like objects)."""
        settings = list(settings)
        sampler = SamplerShape.of([(s.temperature, s.top_k, s.top_p, s.min_p)
                                   for s in settings], vocab_size)
        return cls(sampler, ProcessorShape.of(settings), **kw)


def bucket(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= n, and at least `least`."""
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


# ------------------------------------------------------------ device state

class Slots(NamedTuple):
    """Per-slot scalars (host numpy in, device out at every round trip)."""
    lengths: jax.Array  # [S] int32: positions in the cache
    count: jax.Array  # [S] int32: tokens generated
    budget: jax.Array  # [S] int32: the request's max_new_tokens
    live: jax.Array  # [S] bool
    eos: jax.Array  # [S] bool: finished with a stop id


class Rows(NamedTuple):
    """Per-slot device state that stays on device (donated to every call)."""
    logits: jax.Array  # [S, V] f32: next-token logits
    out: jax.Array  # [S, W] int32: the tokens generated
    keys: jax.Array  # [S, 2] uint32: PRNG key data
    sampler: Sampler
    penalties: Penalties
    stop_ids: jax.Array  # [S, E] int32 (-1: unused)
    hist: History
    guide: Optional[jax.Array] = None  # [S] int32 automaton states
    logprobs: Optional[jax.Array] = None  # [S, W] f32
    step_logits: Optional[jax.Array] = None  # [S, W, V] f32
    top_ids: Optional[jax.Array] = None  # [S, W, K] int32: each step's K most likely tokens
    top_lps: Optional[jax.Array] = None  # [S, W, K] f32: their log-probs


class State(NamedTuple):
    rows: Rows
    kv: dict  # contiguous {"k", "v": [L, S, T, KVH, D]} or paged {"k", "v": [L, N, ps, KVH, D]}
    cross: Optional[dict] = None  # encoder-decoders: {"k", "v": [L, S, Te, KVH, D]}
    enc_seg: Optional[jax.Array] = None  # [S, Te] encoder padding (0)
    guide: Optional[guided.GuideState] = None  # the stacked automaton tables (state unused)
    beams: Optional[object] = None  # jaxlm.infer.beam.Groups
    draft_kv: Optional[dict] = None  # speculative decoding: the draft's (MTP modules') cache
    spec: Optional[jax.Array] = None  # [2] int32: drafted, accepted
    mtp: Optional["MtpRows"] = None  # self-speculation: what the next cycle's drafts read


class MtpRows(NamedTuple):
    """Per-slot state of self-speculative decoding (`jaxlm.infer.speculative`)."""
    hidden: jax.Array  # [S, D] the model's hidden state at the last cached position
    drafts: jax.Array  # [S, k] int32: the next cycle's drafts
    q: Optional[jax.Array] = None  # [S, k, V] f32: their distributions (sampling)


def _store(kind: str, kv, lengths, live, page_table):
    if kind == "paged":
        return Paged(kv, page_table, lengths, live, slots=page_table.shape[0])
    return Contiguous(kv, lengths, live=live)


def model_step(params, cfg, kind: str, kv, tokens, lengths, live, page_table, cross=None,
               enc_seg=None, with_hidden: bool = False):
    """Every slot's tokens [S, T] at positions lengths [S] + [0, T) -> (logits [S, T, V]
    float32, kv with the live slots' K/V written (, with_hidden: the final-norm hidden
    states [S, T, D])): the family's forward over the `kind` store (paged: page_table
    [S, P], the layout the pool's is fitted to)."""
    store = _store(kind, kv, lengths, live, page_table)
    if cfg.family == "encoder_decoder":
        hidden, aux = decode_t5(params, cfg, tokens, cross, segment_ids=enc_seg, store=store)
    else:
        hidden, aux = decoder(params, cfg, tokens, store=store)
    out = unembed(params, hidden, cfg), aux["store"].kv
    return out + (hidden,) if with_hidden else out


def mtp_step(params, cfg, kind: str, kv, k: int, hidden, tokens, lengths, live, page_table):
    """MTP module k (`jaxlm.model.mtp`) over every slot's window: hidden [S, T, D] and
    tokens [S, T] at positions lengths [S] + [0, T), its K/V written into layer k of the
    modules' cache kv -> (its outputs [S, T, D] before its norm, kv)."""
    store = _store(kind, kv, lengths, live, page_table)
    b, t = tokens.shape
    positions = store.positions(b, t)
    inputs = BlockInputs(positions, store.mask(True, positions, None, cfg.sliding_window or None))
    h, store, _ = mtp_module(params, cfg, k, hidden, tokens, store, inputs)
    return h, store.kv


def _mtp_prefill(params, cfg, kind, kv, pack: "Pack", hidden, slots: int):
    """The MTP modules' cache over packed prompts: module k at position i reads the
    model's (module k - 1's) hidden state there and prompt token i + k + 1 (past a
    prompt's end: a placeholder, rewritten by its first cycle)."""
    j = pack.tokens.shape[0]
    if kind == "paged":
        store = Paged(kv, pack.where, jnp.zeros((j,), jnp.int32), fresh=True, slots=slots)
    else:
        store = Contiguous(kv, jnp.zeros((j,), jnp.int32), rows=pack.where, fresh=True)
    inputs = BlockInputs(pack.positions, store.mask(True, pack.positions, pack.segments,
                                                    cfg.sliding_window or None),
                         None, pack.segments > 0)
    h = hidden
    for k in range(cfg.mtp_depth):
        h, store, _ = mtp_module(params, cfg, k, h, shifted(pack.tokens, k + 1), store, inputs)
    return store.kv


def unrolls(params, cfg) -> bool:
    """Whether a decode loop runs its layers unrolled over per-layer weights split
    once before the loop (`unstack_layers`): stacked weights, up to UNROLL_MAX_LAYERS
    layers and UNROLL_MAX_BYTES of layer weights (the split is a copy: peak memory
    holds both while the loop runs)."""
    if cfg.family != "decoder" or isinstance(params["layers"], (list, tuple)):
        return False
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    return cfg.n_layers <= UNROLL_MAX_LAYERS and nbytes <= UNROLL_MAX_BYTES


def decode_params(params, cfg):
    """params as a decode loop reads them: up to the unroll limit (`unrolls`), the
    layer weights split per layer and q|k|v, gate|up concatenated (`unstack_layers`,
    `fuse_projections`), so no step copies a layer's weights out of the stack."""
    return fuse_projections(unstack_layers(params), cfg) if unrolls(params, cfg) else params


_split_once = jax.jit(decode_params, static_argnums=1)


# ------------------------------------------------------------ admission (compiled)

class Pack(NamedTuple):
    """Prompts packed for one prefill call: row j holds prompts each from a page
    boundary (a contiguous cache: one prompt per row), segment r + 1 for its r-th,
    positions restarting, 0 = padding."""
    tokens: jax.Array  # [J, W] int32
    positions: jax.Array  # [J, W] int32
    segments: jax.Array  # [J, W] int32
    where: jax.Array  # paged: [J, W / ps] page ids (n_pages: dropped); contiguous: [J] rows
    last: jax.Array  # [R] flat index into [J * W] of each prompt's last token
    out_slot: jax.Array  # [R] the slot given that prompt's next-token logits (S: none)
    tok_slot: jax.Array  # [J, W] the slot of each token (S: padding)


class Extend(NamedTuple):
    """Prompts whose first pages are cached (prefix caching): each admitted request's
    first slot computes the rest of its prompt over its page table, one row each
    (one data shard: the admitted slots' rows only; else every slot's row, in order)."""
    tokens: jax.Array  # [R, T] int32: the row's uncached prompt tokens (left-aligned)
    lengths: jax.Array  # [R] int32: its cached tokens (where the row's tokens start)
    last: jax.Array  # [R] int32: the column of its last prompt token
    live: jax.Array  # [R] bool: the rows computed
    table: jax.Array  # [R, P] their page tables
    slot: jax.Array  # [R] the row's slot (S: none)
    hist_tokens: jax.Array  # [N] every prompt token of the admitted requests (history)
    hist_slot: jax.Array  # [N] its slot (S: padding)
    hist_pos: jax.Array  # [N] its position


class EncPack(NamedTuple):
    """Encoder inputs of the admitted requests of an encoder-decoder."""
    tokens: jax.Array  # [A, P] int32, right-padded
    segments: jax.Array  # [A, P] int32: 1, 0 = padding
    out_slot: jax.Array  # [A] the slot of each (S: a padding row)
    table: jax.Array  # paged: [S, P_pages] every slot's page table; contiguous: [S, 1] unused


class New(NamedTuple):
    """The per-slot settings of the slots admitted by one call ([S]: others ignored)."""
    keys: jax.Array  # [S, 2] uint32
    sampler: Sampler
    penalties: Penalties
    stop_ids: jax.Array  # [S, E]
    hist_len: jax.Array  # [S] the prompt's length (the processors' history)
    guide: Optional[jax.Array]  # [S] the guide's start state (0: unconstrained)
    length_penalty: Optional[jax.Array] = None  # beams: [S] f32
    early: Optional[jax.Array] = None  # beams: [S] int32 early_stopping 0 False, 1 True, 2 never


def _where_rows(mask, new, old):
    return jnp.where(mask.reshape(mask.shape + (1,) * (old.ndim - 1)), new, old)


def _reset_rows(rows: Rows, new: New, adm) -> Rows:
    """The admitted slots' settings set, their outputs and history cleared."""
    sel = partial(_where_rows, adm)
    h = rows.hist
    hist = History(sel(new.hist_len, h.length),
                   None if h.seen is None else sel(jnp.zeros_like(h.seen), h.seen),
                   None if h.counts is None else sel(jnp.zeros_like(h.counts), h.counts),
                   None if h.tokens is None else sel(jnp.zeros_like(h.tokens), h.tokens))
    return rows._replace(
        out=sel(jnp.full_like(rows.out, PAD_ID), rows.out), keys=sel(new.keys, rows.keys),
        sampler=jax.tree.map(sel, new.sampler, rows.sampler),
        penalties=jax.tree.map(sel, new.penalties, rows.penalties),
        stop_ids=sel(new.stop_ids, rows.stop_ids), hist=hist,
        guide=None if rows.guide is None else sel(new.guide, rows.guide),
        logprobs=None if rows.logprobs is None else sel(jnp.zeros_like(rows.logprobs),
                                                        rows.logprobs),
        step_logits=None if rows.step_logits is None else sel(
            jnp.zeros_like(rows.step_logits), rows.step_logits))


def _history_of(hist: History, slot, tokens, positions) -> History:
    """The prompt tokens [N] at positions [N] of slots [N] (S: padding, dropped)
    written into the admitted slots' (cleared) history."""
    seen = None if hist.seen is None else hist.seen.at[slot, tokens].set(True, mode="drop")
    toks = None if hist.tokens is None else hist.tokens.at[slot, positions].set(tokens,
                                                                                 mode="drop")
    return hist._replace(seen=seen, tokens=toks)


def _copy_rows(a, src, dst, axis: int = 0):
    """a with the entries dst [F] along `axis` taken from src [F] (dst out of range: none)."""
    moved = jnp.take(a, src, axis=axis, mode="clip")
    index = (slice(None),) * axis + (dst,)
    return a.at[index].set(moved, mode="drop")


def _extend_decoder(params, cfg, kv, ext: Extend, slots: int):
    """The uncached rest of prompts, each after its cached pages -> (kv with their K/V,
    next-token logits [S, V] of each live slot)."""
    store = Paged(kv, ext.table, ext.lengths, ext.live, slots=slots)
    hidden, aux = decoder(params, cfg, ext.tokens, store=store)
    last = jnp.take_along_axis(hidden, ext.last[:, None, None], axis=1)  # [S, 1, D]
    return aux["store"].kv, unembed(params, last, cfg)[:, 0]


def _prefill_decoder(params, cfg, kind, kv, pack: Pack, slots: int, whole: bool = False,
                     with_hidden: bool = False):
    """Packed prompts -> (kv with their K/V, next-token logits [R, V] of each prompt
    (, with_hidden: the hidden states [J, W, D] and each prompt's last one [R, D]));
    whole: row r holds prompt r (`_admit`)."""
    j = pack.tokens.shape[0]
    if kind == "paged":
        store = Paged(kv, pack.where, jnp.zeros((j,), jnp.int32), fresh=True, slots=slots)
    else:
        store = Contiguous(kv, jnp.zeros((j,), jnp.int32), rows=pack.where, fresh=True)
    hidden, aux = decoder(params, cfg, pack.tokens, positions=pack.positions,
                          segment_ids=pack.segments, store=store)
    w = hidden.shape[1]
    if context_size() > 1:  # the sequence is sharded: a one-hot contraction, no gather
        pick = jax.nn.one_hot(pack.last % w, w, dtype=hidden.dtype)
        rows = hidden if whole else jnp.take(hidden, pack.last // w, axis=0)
        last = jnp.einsum("rs,rsd->rd", pick, rows)
    else:
        last = hidden.reshape(-1, hidden.shape[-1])[pack.last]
    out = aux["store"].kv, unembed(params, last[:, None], cfg)[:, 0]
    return out + (hidden, last) if with_hidden else out


@partial(jax.jit, static_argnames=("cfg", "draft_cfg", "feats", "kind", "start_id", "whole"),
         donate_argnames=("state",))
def _admit(params, cfg, draft_params, draft_cfg, state: State, pack, new: New, admitted, forks,
           page_copies, *, feats: Features, kind: str, start_id: int, whole: bool = False):
    """Prefill the admitted requests into their first slots, set every admitted
    slot's settings, and copy the first slot's state to the request's other slots
    (forks [F, 2] (src, dst) slots, or None; paged page_copies [C, 2] (src, dst)
    pages). whole: the pack's rows are the slots, in order (a ring prefill under a
    context mesh): their logits are taken as they are, with no scatter."""
    rows = _reset_rows(state.rows, new, admitted)
    s = rows.logits.shape[0]
    if state.beams is not None:
        from .beam import reset_groups
        state = state._replace(beams=reset_groups(state.beams, admitted, new.length_penalty,
                                                  new.early))
    cross, enc_seg, draft_kv = state.cross, state.enc_seg, state.draft_kv
    if cfg.family == "encoder_decoder":
        enc = pack
        encoded = encode(params, cfg, enc.tokens, enc.segments)
        new_cross = cross_kv(params, cfg, encoded, kv_dtype_of(state.cross))  # [L, A, P, KVH, D]
        width = enc.tokens.shape[1]
        cross = {n: a.at[:, enc.out_slot, :width].set(new_cross[n].astype(a.dtype), mode="drop")
                 for n, a in cross.items()}
        seg = jnp.zeros((enc.tokens.shape[0], enc_seg.shape[1]), jnp.int32)
        enc_seg = enc_seg.at[enc.out_slot].set(seg.at[:, :width].set(enc.segments), mode="drop")
        a = enc.tokens.shape[0]
        # the decoder's first step, the start id at position 0, over every slot (the
        # store's layout is the slots'): written and read for the admitted slots only
        first = jnp.zeros((s,), bool).at[enc.out_slot].set(True, mode="drop")
        start = jnp.full((s, 1), start_id, jnp.int32)
        logits, kv = model_step(params, cfg, kind, state.kv, start, jnp.zeros((s,), jnp.int32),
                                first, enc.table, cross, enc_seg)
        logits_all = _where_rows(first, logits[:, 0], rows.logits)
        hist = _history_of(rows.hist, enc.out_slot, jnp.full((a,), start_id, jnp.int32),
                           jnp.zeros((a,), jnp.int32))
    elif isinstance(pack, Extend):
        kv, logits = _extend_decoder(params, cfg, state.kv, pack, s)
        logits_all = rows.logits.at[pack.slot].set(logits, mode="drop")
        hist = _history_of(rows.hist, pack.hist_slot, pack.hist_tokens, pack.hist_pos)
    else:
        out = _prefill_decoder(params, cfg, kind, state.kv, pack, s, whole, feats.mtp)
        kv, logits = out[:2]
        logits_all = (_where_rows(admitted, logits, rows.logits) if whole else
                      rows.logits.at[pack.out_slot].set(logits, mode="drop"))
        if feats.mtp:  # self-speculation: the modules' cache, the first cycle's inputs
            draft_kv = _mtp_prefill(params, cfg, kind, draft_kv, pack, out[2], s)
            m = state.mtp
            put = (lambda new, old: _where_rows(admitted, new, old)) if whole else \
                (lambda new, old: old.at[pack.out_slot].set(new, mode="drop"))
            z = jnp.zeros((out[3].shape[0], feats.speculative), jnp.int32)  # placeholders
            state = state._replace(mtp=MtpRows(
                put(out[3].astype(m.hidden.dtype), m.hidden), put(z, m.drafts),
                None if m.q is None else put(jax.nn.one_hot(z, m.q.shape[-1]), m.q)))
        hist = _history_of(rows.hist, pack.tok_slot.reshape(-1), pack.tokens.reshape(-1),
                           pack.positions.reshape(-1))
        if draft_kv is not None and not feats.mtp:
            draft_kv, _ = _prefill_decoder(draft_params, draft_cfg, kind, draft_kv, pack, s)
    rows = rows._replace(logits=logits_all, hist=hist)
    if forks is None:
        return state._replace(rows=rows, kv=kv, cross=cross, enc_seg=enc_seg, draft_kv=draft_kv)
    src, dst = forks[:, 0], forks[:, 1]
    copy = partial(_copy_rows, src=src, dst=dst)
    rows = rows._replace(logits=copy(rows.logits), hist=jax.tree.map(copy, rows.hist),
                         guide=None if rows.guide is None else copy(rows.guide))
    if kind == "paged":
        move = partial(_copy_rows, src=page_copies[:, 0], dst=page_copies[:, 1], axis=1)
    else:
        move = partial(_copy_rows, src=src, dst=dst, axis=1)
    kv = jax.tree.map(move, kv)
    if draft_kv is not None:
        draft_kv = jax.tree.map(move, draft_kv)
    if state.mtp is not None:
        state = state._replace(mtp=jax.tree.map(copy, state.mtp))
    if cross is not None:
        cross = jax.tree.map(partial(_copy_rows, src=src, dst=dst, axis=1), cross)
        enc_seg = copy(enc_seg)
    return state._replace(rows=rows, kv=kv, cross=cross, enc_seg=enc_seg, draft_kv=draft_kv)


# ------------------------------------------------------------ the decode loop (compiled)

def sample_step(rows: Rows, sl: Slots, feats: Features, guide: Optional[guided.GuideState]):
    """The one sampling step: the logit processors (transformers' order), then the
    guide's mask, then the sampler / greedy -> (token [S], rows with the history and
    the guide states advanced for the live slots)."""
    processed = apply_processors(feats.processors, rows.logits, rows.hist, rows.penalties,
                                 sl.count, rows.stop_ids)
    gs = None
    if feats.guided:
        gs = guide._replace(state=rows.guide)
        processed = guided.mask(gs, processed, rows.stop_ids, sl.budget - sl.count,
                                raw=rows.logits)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.keys), sl.count)
    tok = pick(processed, rows.sampler, keys, feats.sampler)
    tok = jnp.where(sl.live, tok, PAD_ID)
    rows = rows._replace(hist=push(rows.hist, tok, sl.live))
    if gs is not None:
        rows = rows._replace(guide=guided.advance(gs, tok, sl.live).state)
    return tok, rows


def record(rows: Rows, sl: Slots, tok, raw_logits) -> Rows:
    """Write each live slot's token (and its log-prob / raw logits) at its column."""
    s, w = rows.out.shape
    col = jnp.where(sl.live, sl.count, w)
    at = (jnp.arange(s), col)
    rows = rows._replace(out=rows.out.at[at].set(tok, mode="drop"))
    if rows.logprobs is not None:
        full = jax.nn.log_softmax(raw_logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(full, jnp.maximum(tok, 0)[:, None], axis=-1)[:, 0]
        rows = rows._replace(logprobs=rows.logprobs.at[at].set(lp, mode="drop"))
        if rows.top_ids is not None:
            top_lps, top_ids = jax.lax.top_k(full, rows.top_ids.shape[-1])
            rows = rows._replace(top_ids=rows.top_ids.at[at].set(top_ids, mode="drop"),
                                 top_lps=rows.top_lps.at[at].set(top_lps, mode="drop"))
    if rows.step_logits is not None:
        rows = rows._replace(step_logits=rows.step_logits.at[at].set(raw_logits, mode="drop"))
    return rows


def finish(sl: Slots, tok, rows: Rows, emitted) -> tuple[Slots, jax.Array]:
    """Count the emitted tokens [S] (0 or more per slot; tok its last), stop the slots
    that emitted a stop id or reached their budget -> (slots, how many stopped)."""
    count = sl.count + emitted
    eos = is_eos(tok, rows.stop_ids) & (emitted > 0)
    stop = sl.live & (eos | (count >= sl.budget))
    return Slots(sl.lengths, count, sl.budget, sl.live & ~stop, sl.eos | eos), stop


@partial(jax.jit, static_argnames=("cfg", "draft_cfg", "feats", "kind"),
         donate_argnames=("state",))
def _run(params, cfg, draft_params, draft_cfg, state: State, sl: Slots, page_table, max_steps,
         exit_after, *, feats: Features, kind: str):
    """Up to max_steps decode steps (speculative: cycles) of every live slot; stops
    early after the step where the exit_after-th slot of this call finished (0:
    never). -> (state, slots, steps run). Stacked params (an engine that is not
    `presplit`) are split per layer here, inside the program (`decode_params`)."""
    if feats.split_weights:
        params = decode_params(params, cfg)
    draft_params = None if draft_params is None else decode_params(draft_params, draft_cfg)
    split = kind == "contiguous" and isinstance(params.get("layers"), (list, tuple))
    kv = split_layers(state.kv) if split else state.kv
    step = partial(model_step, params, cfg, kind, page_table=page_table, cross=state.cross,
                   enc_seg=state.enc_seg)

    def body(c):
        i, st, kv, sl, done = c
        if feats.beams:
            from .beam import engine_step
            st, kv, sl, stop = engine_step(st, kv, sl, step, feats, kind, page_table)
        elif feats.speculative:
            from .speculative import engine_cycle
            if feats.mtp:  # self-speculation: the model's own MTP modules draft
                propose = partial(mtp_step, params, cfg, kind, page_table=page_table)
            else:
                propose = partial(model_step, draft_params, draft_cfg, kind,
                                  page_table=page_table)
            st, kv, sl, stop = engine_cycle(st, kv, sl, step, feats, kind, page_table, propose,
                                            params=params, cfg=cfg)
        else:
            rows = st.rows
            tok, rows = sample_step(rows, sl, feats, st.guide)
            rows = record(rows, sl, tok, rows.logits)
            sl, stop = finish(sl, tok, rows, sl.live.astype(jnp.int32))
            logits, kv = step(kv, jnp.maximum(tok, 0)[:, None], sl.lengths, sl.live)
            rows = rows._replace(logits=logits[:, 0])  # a slot not live: never read again
            sl = sl._replace(lengths=sl.lengths + sl.live)
            st = st._replace(rows=rows)
        return i + 1, st, kv, sl, done + jnp.sum(stop, dtype=jnp.int32)

    def more(c):
        i, _, _, sl, done = c
        waiting = (exit_after == 0) | (done < exit_after)
        return (i < max_steps) & jnp.any(sl.live) & waiting

    i, state, kv, sl, _ = jax.lax.while_loop(
        more, body, (jnp.int32(0), state, kv, sl, jnp.int32(0)))
    return state._replace(kv=stack_layers(kv) if split else kv), sl, i


# ------------------------------------------------------------ requests

@dataclasses.dataclass
class Output:
    """One sequence of a request: a sample (n), or a returned beam hypothesis."""
    tokens: list = dataclasses.field(default_factory=list)  # ids, the final stop id included
    finish_reason: Optional[str] = None  # "stop" (a stop id or string) | "length" | "abort"
    logprobs: Optional[list] = None  # log-prob of each token under the raw model logits
    # Features.top_logprobs: per token, the k most likely (id, log-prob), most likely first
    top_logprobs: Optional[list] = None
    logits: Optional[np.ndarray] = None  # [len, V] raw next-token logits (return_logits)
    score: Optional[float] = None  # beam search: the length-penalised score
    text: Optional[str] = None  # with a detokenizer: the text (a stop string cut off)
    stopped_by_id: bool = False  # ended with one of the stop ids (the last token)


class Request:
    """A prompt and its settings, submitted to an Engine (`Engine.add`)."""

    def __init__(self, index: int, prompt: np.ndarray, settings, eos_ids: tuple, stop: tuple,
                 guide, row_seed: int, on_token: Optional[Callable] = None):
        self.index, self.prompt, self.settings = index, prompt, settings
        self.eos_ids, self.stop, self.guide, self.row_seed = eos_ids, stop, guide, row_seed
        self.on_token = on_token
        self.outputs = [Output() for _ in range(settings.num_return_sequences)]
        self.slots: list[int] = []
        self.finished = False
        self.cached, self.keys = 0, []  # prefix caching: prompt tokens read from cached pages

    @property
    def width(self) -> int:  # slots it takes
        return self.settings.num_beams if self.settings.num_beams > 1 else \
            self.settings.num_return_sequences

    def __repr__(self) -> str:
        return (f"Request({self.index}, {len(self.prompt)} prompt ids, "
                f"{'finished' if self.finished else 'running'})")


class Event(NamedTuple):
    """New tokens of one output of a request (finish_reason set on its last event)."""
    request: Request
    sample: int
    tokens: list
    finish_reason: Optional[str]


# ------------------------------------------------------------ the engine (host side)

class Engine:
    """Request-driven decoding over `slots` slots (module docstring).

    settings: the GenerateConfig each request starts from (`add` overrides keys per
    request). max_prompt_len / max_new_tokens: the largest prompt and budget any
    request may bring (they size the buffers: output width, cache length, pages per
    slot; default settings.max_new_tokens and the rest of model.max_seq_len).
    features: what the compiled loop runs (default: what `settings` needs;
    `Features.of` over every request's settings when they differ); a request
    needing more is refused with one line. cache: "paged" (page_size, n_pages:
    default enough for every slot's longest request) or "contiguous" (one row of
    max_len per slot). draft: (params, cfg) of a draft model (speculative decoding,
    features.speculative drafts per cycle). detokenize(ids) -> str: needed for stop
    strings and `Output.text`. guides: every Guide requests will use (stacked into
    one table on device). page_buckets: the loop reads the page tables cut to the
    next power of two of the most pages a slot holds (the XLA attention path gathers
    only those; at most log2(max_pages) + 1 loop compilations over the engine's
    life: a server's long context, mostly short requests)."""

    def __init__(self, params, cfg, *, settings, max_prompt_len: Optional[int] = None,
                 max_new_tokens: Optional[int] = None,
                 slots: int = 8, cache: str = "paged", page_size: int = 16,
                 n_pages: Optional[int] = None, steps_per_call: int = 32,
                 refill_batch: Optional[int] = None, features: Optional[Features] = None,
                 draft=None, detokenize: Optional[Callable] = None, decoder_start_id: int = 0,
                 guides: Sequence = (), max_len: Optional[int] = None,
                 on_refill: Optional[Callable[[dict], None]] = None, presplit: bool = True,
                 page_buckets: bool = False):
        if cfg.family not in ("decoder", "encoder_decoder"):
            raise InputError(f"model.family={cfg.family!r} does not generate text")
        if cache not in ("paged", "contiguous"):
            raise InputError(f"cache={cache!r} must be 'paged' or 'contiguous'")
        refill_batch = max(1, slots // 8) if refill_batch is None else refill_batch
        max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_prompt_len is None:
            max_prompt_len = cfg.max_seq_len - (0 if cfg.family == "encoder_decoder"
                                                else max_new_tokens)
        for name, value in (("slots", slots), ("page_size", page_size),
                            ("steps_per_call", steps_per_call), ("refill_batch", refill_batch),
                            ("max_prompt_len", max_prompt_len),
                            ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise InputError(f"{name}={value} must be an integer >= 1")
        self.cfg, self.settings, self.kind = cfg, settings, cache
        self.seq2seq = cfg.family == "encoder_decoder"
        self.steps_per_call, self.refill_batch = int(steps_per_call), int(refill_batch)
        self.detokenize, self.start_id = detokenize, int(decoder_start_id)
        self.on_refill = on_refill
        self.page_buckets = bool(page_buckets)
        feats = features or Features.of([settings], cfg.vocab_size)
        width = bucket(max_new_tokens, WIDTH_BUCKET)
        # the positions a slot's cache holds: decoders prompt + new tokens (+ a cycle's
        # drafts), encoder-decoders the decoder's tokens
        # (a decoder's request itself fits model.max_seq_len: `add` checks each one, so
        # max_prompt_len and max_new_tokens may each reach it: a server's longest prompt
        # and longest answer, not both at once)
        longest = min(max_prompt_len + max_new_tokens, cfg.max_seq_len)
        self.span = (max_new_tokens if self.seq2seq else longest) + feats.speculative
        if not self.seq2seq and max(max_prompt_len, max_new_tokens) > cfg.max_seq_len:
            raise InputError(f"max_prompt_len={max_prompt_len} / max_new_tokens="
                             f"{max_new_tokens} is longer than model.max_seq_len="
                             f"{cfg.max_seq_len}")
        history = bucket((1 if self.seq2seq else max_prompt_len) + width, WIDTH_BUCKET) \
            if feats.processors.ngram else 0
        self.feats = feats = dataclasses.replace(feats, width=width, history=history,
                                                 guided=feats.guided or bool(guides))
        if feats.beams and slots % feats.beams:
            raise InputError(f"slots={slots} must be a multiple of num_beams={feats.beams}")
        self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
        # split (and fused) once for the engine's life, not at every round trip; an engine
        # that runs once (`jaxlm.generate` admitting everything at once) leaves it to its
        # one decode loop, inside the program (no separate copy of the weights)
        def prepared(p, c):
            return _split_once(p, c) if presplit and feats.split_weights and unrolls(p, c) \
                else p

        self.params = prepared(params, cfg)
        if draft == "mtp" and not (feats.mtp and cfg.mtp_depth >= feats.speculative > 0):
            raise InputError(f"draft='mtp' needs Features(mtp=True) and 1 <= speculative <= "
                             f"model.mtp_depth={cfg.mtp_depth}")
        if feats.mtp and draft != "mtp":
            raise InputError("Features(mtp=True) drafts with the model's MTP modules: "
                             "draft='mtp'")
        self.draft = None if draft is None or feats.mtp else (prepared(*draft), draft[1])
        self.n_slots = slots
        kv_dtype = settings.kv_dtype
        if cache == "paged":
            self.page_size = page_size
            self.max_pages = pages_for(self.span, page_size)
            layout = pool_layout(slots, slots, cfg.n_kv_heads)
            self.shards = layout.shards if layout is not None else 1
            n_pages = slots * self.max_pages if n_pages is None else n_pages
            if isinstance(n_pages, bool) or int(n_pages) != n_pages or n_pages < 1:
                raise InputError(f"n_pages={n_pages} must be an integer >= 1")
            self.asked_pages = int(n_pages)  # each data shard must hold any one request
            n_pages = -(-int(n_pages) // self.shards) * self.shards
            self.pool = PagePool(n_pages, page_size, slots, self.max_pages, shards=self.shards)
            kv = init_pages(cfg, n_pages, page_size, slots=slots, kv_dtype=kv_dtype,
                            layers=decoder_layers(cfg) if self.seq2seq else None)
            draft_kv = None if self.draft is None else init_pages(
                self.draft[1], n_pages, page_size, slots=slots)
            if feats.mtp:
                draft_kv = init_pages(cfg, n_pages, page_size, slots=slots,
                                      layers=cfg.mtp_depth)
        else:
            self.span = max_len or bucket(self.span, 128 if self.span > 128 else 1)
            self.page_size = self.span
            self.pool, self.shards = None, 1
            kv = _kv_rows(init_cache(cfg, slots, self.span, kv_dtype=kv_dtype,
                                     layers=decoder_layers(cfg) if self.seq2seq else None))
            draft_kv = None if self.draft is None else _kv_rows(
                init_cache(self.draft[1], slots, self.span))
            if feats.mtp:
                draft_kv = _kv_rows(init_cache(cfg, slots, self.span, layers=cfg.mtp_depth))
        cross = enc_seg = None
        if self.seq2seq:
            self.enc_len = pow2(max_prompt_len, 16)
            shapes = init_cache(cfg, slots, self.enc_len, kv_dtype=kv_dtype,
                                layers=decoder_layers(cfg))
            cross = _kv_rows(shapes)
            enc_seg = jnp.zeros((slots, self.enc_len), jnp.int32)
        self.guides: dict = {}
        self.guide_state = None
        if feats.guided:
            self._stack_guides(list(guides))
        self.state = State(_init_rows(slots, cfg.vocab_size, feats), kv, cross, enc_seg,
                           self.guide_state, _init_beams(slots, feats),
                           draft_kv, jnp.zeros((2,), jnp.int32) if feats.speculative else None,
                           _init_mtp(slots, cfg, feats) if feats.mtp else None)
        z = np.zeros(slots, np.int32)
        self.slots = {"lengths": z.copy(), "count": z.copy(), "budget": z.copy(),
                      "live": np.zeros(slots, bool), "eos": np.zeros(slots, bool)}
        self.owner: list = [None] * slots  # slot -> (request, output index)
        self.queue: deque = deque()
        self.requests: list[Request] = []
        self.n_added = 0  # requests added so far (the next one's index)
        self.emitted = np.zeros(slots, np.int32)  # tokens of each slot streamed so far
        self.events: list[Event] = []
        # the engine's own counters: admission calls, prompts prefilled (once per request,
        # whatever its n), decode-loop calls and steps, requests admitted and finished,
        # prompt pages allocated (once per request: its samples share them)
        # prompt tokens admitted, those computed by a prefill and those read from cached pages
        self.stats = {"admit_calls": 0, "prefilled": 0, "run_calls": 0, "steps": 0,
                      "admitted": 0, "finished": 0, "prompt_pages": 0, "prompt_tokens": 0,
                      "prefill_tokens": 0, "cached_tokens": 0}
        # prefix caching (settings.prefix_cache): a decoder's paged pool, no beams (they
        # reorder pages) and no draft model (its cache is not kept with the pages)
        self.prefix = bool(getattr(settings, "prefix_cache", False)) and self.pool is not None \
            and not self.seq2seq and not feats.beams and self.draft is None and not feats.mtp

    # -------------------------------------------------------- requests

    def add(self, prompt, settings=None, *, guide=None, row_seed: Optional[int] = None,
            eos_ids=(), on_token: Optional[Callable] = None, **overrides) -> Request:
        """Queue a request: prompt ids; settings: a GenerateConfig (default the
        engine's), with `overrides` of its keys (temperature=0.7, ...; its stop strings
        end the request on its text); eos_ids: its stop ids (besides
        settings.stop_ids); row_seed: what its key folds in (default its index);
        on_token(event): called with each Event of the request. A request the engine
        cannot run is a one-line InputError (a bad setting: its ConfigError)."""
        s = self.settings if settings is None else settings
        if overrides:
            s = dataclasses.replace(s, **overrides)
        stop = s.stop
        ids = np.asarray(prompt, np.int32).reshape(-1)
        i = self.n_added
        if ids.size == 0:
            raise InputError(f"prompt {i} is empty: every prompt needs at least one token")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise InputError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size})")
        if len(ids) > self.max_prompt_len:
            raise InputError(f"prompt {i} has {len(ids)} tokens, more than this engine's "
                             f"max_prompt_len={self.max_prompt_len}")
        if s.max_new_tokens > self.max_new_tokens:
            raise InputError(f"max_new_tokens={s.max_new_tokens} (prompt {i}) is more than this "
                             f"engine's max_new_tokens={self.max_new_tokens}")
        if not self.seq2seq and len(ids) + s.max_new_tokens > self.cfg.max_seq_len:
            raise InputError(f"prompt {i} has {len(ids)} tokens + max_new_tokens="
                             f"{s.max_new_tokens}, more than model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        stop_ids = tuple(dict.fromkeys(list(eos_ids) + list(s.stop_ids)))
        if len(stop_ids) > self.feats.stops:
            raise InputError(f"prompt {i}: {len(stop_ids)} stop ids, more than this engine's "
                             f"{self.feats.stops}")
        if stop and self.detokenize is None:
            raise InputError("stop strings need a tokenizer to decode the text")
        self._check_covered(s, guide, i)
        if guide is not None:
            if s.num_beams > 1:
                raise InputError("guided decoding is not supported with beam search")
            if not stop_ids:
                raise InputError("guided decoding needs a stop id: a guided row ends with one")
            if int(guide.dist[0]) + 1 > s.max_new_tokens:
                raise InputError(f"guide ({guide.description}) needs at least "
                                 f"{int(guide.dist[0]) + 1} tokens (EOS included), more than "
                                 f"max_new_tokens={s.max_new_tokens}")
            if id(guide) not in self.guides:
                self._stack_guides(list(self.guides.values()) + [guide])
        req = Request(i, ids, s, stop_ids, tuple(stop), guide, i if row_seed is None else
                      int(row_seed), on_token)
        if self.pool is not None:
            first, other = self._future_pages(req)
            need = first + (req.width - 1) * other
            if need * self.shards > self.asked_pages:
                per = (f" (x {self.shards} data shards: n_pages >= {self.shards * need})"
                       if self.shards > 1 else "")
                raise InputError(f"n_pages={self.asked_pages}: the page pool is too small for "
                                 f"prompt {i} ({len(ids)} tokens + max_new_tokens="
                                 f"{s.max_new_tokens}), which needs {need} pages of "
                                 f"page_size={self.page_size}{per}")
        if req.width > self.n_slots // self.shards:
            raise InputError(f"prompt {i} needs {req.width} slots (n / num_beams) at once, more "
                             f"than the {self.n_slots // self.shards} of a data shard")
        self.requests.append(req)
        self.queue.append(req)
        self.n_added += 1
        return req

    def prefix_hit_rate(self) -> float:
        """Prompt tokens read from cached pages / prompt tokens admitted (0 before any)."""
        total = self.stats["prompt_tokens"]
        return self.stats["cached_tokens"] / total if total else 0.0

    def forget_finished(self) -> None:
        """Drop the finished requests from `requests` (a long-lived engine, a server:
        the caller holds the ones it still reads)."""
        self.requests = [r for r in self.requests if not r.finished]

    def _check_covered(self, s, guide, i: int) -> None:
        """InputError when the compiled features cannot run settings s."""
        f = self.feats
        need = Features.of([s], self.cfg.vocab_size)
        sh, have = need.sampler, f.sampler
        short = []
        if sh.sample and not have.sample or sh.top_k > have.top_k or \
                (sh.full_vocab and not have.full_vocab) or (sh.top_p and not have.top_p) or \
                (sh.min_p and not have.min_p):
            short.append("its sampler settings")
        p, q = need.processors, f.processors
        if (p.seen and not q.seen) or (p.counts and not q.counts) or p.ngram > q.ngram or \
                (p.min_new and not q.min_new):
            short.append("its logit processors")
        if (s.num_beams if s.num_beams > 1 else 0) != f.beams:
            short.append(f"num_beams={s.num_beams} (the engine runs {f.beams or 1})")
        if guide is not None and not f.guided:
            short.append("a guide")
        if short:
            raise InputError(f"request {i}: this engine was compiled without "
                             f"{' and '.join(short)}; create it with Features.of(...) over "
                             "every request's settings")

    def _stack_guides(self, guides: list) -> None:
        self.guides = {id(g): g for g in guides}
        order = list(self.guides.values())
        state = guided.stack(order, self.cfg.vocab_size)
        self.guide_offset = {id(g): int(state.state[k]) for k, g in enumerate(order)}
        self.guide_state = state._replace(state=jnp.zeros((self.n_slots,), jnp.int32))
        if hasattr(self, "state"):
            self.state = self.state._replace(guide=self.guide_state)

    def cancel(self, req: Request) -> None:
        """Stop a request now: its slots and pages are freed, its outputs end "abort"."""
        if req.finished:
            return
        if req in self.queue:
            self.queue.remove(req)
        for s in list(req.slots):
            self._free(s)
        for out in req.outputs:
            if out.finish_reason is None:
                out.finish_reason = "abort"
        req.finished = True

    @property
    def busy(self) -> bool:
        return bool(self.queue) or bool(self.slots["live"].any())

    def run(self) -> list[Request]:
        """Step until every request added so far has finished."""
        while self.busy:
            self.step()
        return self.requests

    def stream(self):
        """Step until idle, yielding each Event as it happens (new tokens of a request's
        output; its last event carries the finish reason)."""
        while self.busy or self.events:
            if not self.events:
                self.step()
            while self.events:
                yield self.events.pop(0)

    # -------------------------------------------------------- one round trip

    def step(self) -> None:
        """Admit what fits, run up to steps_per_call steps, collect: one round trip."""
        admitted = self._admit()
        if self.on_refill is not None:
            self.on_refill(self._refill_info(admitted))
        live = self.slots["live"]
        if not live.any():
            return
        if self.pool is not None:  # pages for the positions the next steps may write
            per_step = 1 + self.feats.speculative
            for s in np.flatnonzero(live):
                left = int(self.slots["budget"][s] - self.slots["count"][s])
                ahead = min(self.steps_per_call * per_step, left - 1 + self.feats.speculative)
                self.pool.grow(s, int(self.slots["lengths"][s]) + max(ahead, 0))
        waiting = len(self.queue)
        sl = Slots(**{k: v.copy() for k, v in self.slots.items()})
        state, sl_dev, steps = _run(
            self.params, self.cfg, *self._draft(), self.state, sl, self._table(),
            np.int32(self.steps_per_call), np.int32(min(waiting, self.refill_batch)),
            feats=self.feats, kind=self.kind)
        self.state = state
        self.stats["run_calls"] += 1
        del admitted
        # every process runs this loop on the same host state; fetch gathers what spans
        # other processes' devices (a collective each of them calls)
        rows = state.rows
        new, out, lps, tops = fetch((sl_dev._asdict(), rows.out, rows.logprobs,
                                     None if rows.top_ids is None else (rows.top_ids,
                                                                        rows.top_lps)))
        was_live = self.slots["live"]
        self.slots = {k: np.array(v) for k, v in new.items()}
        self.stats["steps"] += int(fetch(steps))
        self._collect(was_live, np.asarray(out), None if lps is None else np.asarray(lps),
                      None if tops is None else tuple(map(np.asarray, tops)))

    def _refill_info(self, admitted: list) -> dict:
        """What `on_refill` sees after an admission (tests: the page accounting)."""
        sl, ps = self.slots, self.page_size
        info = {"lengths": sl["lengths"].copy(), "live": sl["live"].copy(),
                "admitted": [s for r in admitted for s in r.slots[:1]],
                "waiting": len(self.queue), "pool": self.state.kv}
        if self.pool is not None:
            info.update(pages_in_use=self.pool.in_use(), page_size=ps,
                        pages_needed=int(sum(pages_for(sl["lengths"][s], ps)
                                             for s in range(self.n_slots) if sl["live"][s])),
                        table=self.pool.table.copy(), n_pages=self.pool.n_pages,
                        refs=self.pool.refs.copy())
        return info

    def lower(self):
        """The decode loop (`_run`) lowered for this engine's state and shapes, not run
        (tests and benchmarks read its compiled HLO and memory analysis)."""
        sl = Slots(**{k: v.copy() for k, v in self.slots.items()})
        return _run.lower(self.params, self.cfg, *self._draft(), self.state, sl, self._table(),
                          np.int32(self.steps_per_call), np.int32(0), feats=self.feats,
                          kind=self.kind)

    def _draft(self):
        return (None, None) if self.draft is None else self.draft

    def _table(self):
        if self.pool is None:
            return np.zeros((self.n_slots, 1), np.int32)
        if not self.page_buckets:
            return self.pool.table.copy()
        used = max(map(len, self.pool.held), default=1)
        return self.pool.table[:, :min(pow2(used, 1), self.max_pages)].copy()

    def _collect(self, was_live, out, lps, tops=None) -> None:
        """Stream the new tokens, end the finished outputs, check stop strings."""
        sl = self.slots
        beams = self.feats.beams
        for s in range(self.n_slots):
            owner = self.owner[s]
            if owner is None:
                continue
            req, k = owner
            if beams:
                if not was_live[s] or sl["live"][s]:
                    continue
                if s % beams == 0:  # the group's first slot reports the group
                    self._finish_beams(req, s)
                continue
            o = req.outputs[k]
            n = int(sl["count"][s])
            fresh = [int(t) for t in out[s, self.emitted[s]:n]]
            before = len(o.tokens)
            if fresh:
                o.tokens.extend(fresh)
                if lps is not None:
                    o.logprobs = (o.logprobs or []) + [float(x) for x in
                                                       lps[s, self.emitted[s]:n]]
                if tops is not None:
                    ids, tl = tops[0][s, self.emitted[s]:n], tops[1][s, self.emitted[s]:n]
                    o.top_logprobs = (o.top_logprobs or []) + [
                        list(zip(map(int, i), map(float, v))) for i, v in zip(ids, tl)]
                self.emitted[s] = n
            reason = None
            if was_live[s] and not sl["live"][s]:
                reason = "stop" if sl["eos"][s] else "length"
                o.stopped_by_id = bool(sl["eos"][s])
            if req.stop and fresh and self._stop_string(o, req.stop, before):
                reason = "stop"
                fresh = o.tokens[before:]  # what the stop string left of this round's
            if reason is not None:
                self._end(req, k, s, reason)
            if fresh or reason is not None:
                self._emit(req, k, fresh, reason)
        if self.pool is not None:  # give back the pages grown ahead and not written
            for s in np.flatnonzero(sl["live"]):
                self.pool.trim(s, int(sl["lengths"][s]))

    def _stop_string(self, o: Output, stops: tuple, checked: int) -> bool:
        """Cut o at the first stop string its text holds (tokens: through the one that
        completed it; text: before it) -> whether one was found. Its first `checked`
        tokens held none (the earlier round trips looked)."""
        text = self.detokenize(o.tokens)
        hits = [text.find(t) for t in stops if t in text]
        if not hits:
            return False
        at = min(hits)
        for n in range(checked + 1, len(o.tokens) + 1):  # the fewest tokens whose text holds it
            if any(t in self.detokenize(o.tokens[:n]) for t in stops):
                o.tokens = o.tokens[:n]
                if o.logprobs is not None:
                    o.logprobs = o.logprobs[:n]
                if o.top_logprobs is not None:
                    o.top_logprobs = o.top_logprobs[:n]
                break
        o.text = text[:at]
        o.stopped_by_id = False
        return True

    def _emit(self, req: Request, k: int, tokens: list, reason) -> None:
        ev = Event(req, k, tokens, reason)
        self.events.append(ev)
        if req.on_token is not None:
            req.on_token(ev)

    def _end(self, req: Request, k: int, s: int, reason: str) -> None:
        o = req.outputs[k]
        o.finish_reason = reason
        if o.text is None and self.detokenize is not None:
            ids = o.tokens[:-1] if o.stopped_by_id else o.tokens
            o.text = self.detokenize(ids)
        if self.feats.return_logits:
            n = len(o.tokens)
            o.logits = np.asarray(fetch(self.state.rows.step_logits[s, :n]))
        self._free(s)
        if all(x.finish_reason is not None for x in req.outputs):
            req.finished = True
            self.stats["finished"] += 1

    def _free(self, s: int) -> None:
        owner = self.owner[s]
        self.owner[s] = None
        self.slots["live"][s] = False
        if self.prefix and owner is not None:  # its written full pages (a multi-turn chat's
            req, k = owner                     # next prompt starts with them)
            seq = np.concatenate([req.prompt, np.asarray(req.outputs[k].tokens, np.int32)])
            written = min(int(self.slots["lengths"][s]), len(seq))
            self.pool.remember(s, self.pool.chain(seq[:written]))
        if self.pool is not None:
            self.pool.release(s)
        if owner is not None and s in owner[0].slots:
            owner[0].slots.remove(s)

    def _finish_beams(self, req: Request, first: int) -> None:
        from .beam import hypotheses
        tokens, scores, lengths = hypotheses(self.state.beams, first // self.feats.beams)
        for k, o in enumerate(req.outputs):
            n = int(lengths[k])
            o.tokens = [int(t) for t in tokens[k, :n]]
            o.score = float(scores[k])
            last = o.tokens[-1] if o.tokens else None
            o.stopped_by_id = last in req.eos_ids
            o.finish_reason = "stop" if o.stopped_by_id else "length"
            if self.detokenize is not None:
                o.text = self.detokenize(o.tokens[:-1] if o.stopped_by_id else o.tokens)
            self._emit(req, k, o.tokens, o.finish_reason)
        for s in range(first, first + self.feats.beams):
            self._free(s)
        req.finished = True
        self.stats["finished"] += 1

    # -------------------------------------------------------- admission (host side)

    def _admit(self) -> list:
        """Give waiting requests (in order) free slots and pages, prefill them; -> the
        requests admitted."""
        free = [s for s in range(self.n_slots) if self.owner[s] is None]
        chosen = []
        pending: set = set()  # full prompt pages this admission writes (prefix caching)
        while self.queue:
            req = self.queue[0]
            if self.prefix:
                if not req.keys:
                    req.keys = self.pool.chain(req.prompt)
                usable = req.keys[:(len(req.prompt) - 1) // self.page_size]
                if any(k in pending and not any(k in c for c in self.pool.cached)
                       for k in usable):
                    break  # pages of its prefix are being written now: read at the next refill
            slots = self._place(req, free)
            if slots is None:
                break  # wait for slots or pages (a finishing sequence gives its pages back)
            self.queue.popleft()
            free = [s for s in free if s not in slots]
            chosen.append((req, slots))
            self._take(req, slots)
            pending.update(req.keys)
        if not chosen:
            return []
        if self.seq2seq:
            calls = [chosen]
        elif self.kind == "paged":
            fresh = [x for x in chosen if not x[0].cached]
            hits = [x for x in chosen if x[0].cached]
            calls = (self._packs(fresh) if fresh else []) + ([hits] if hits else [])
        else:
            calls = [chosen]
        for group in calls:
            self._admit_call(group)
            self.stats["prefilled"] += len(group)
        self.stats["admitted"] += len(chosen)
        for req, slots in chosen:
            n = len(req.prompt)
            self.stats["prompt_tokens"] += n
            self.stats["cached_tokens"] += req.cached
            self.stats["prefill_tokens"] += n - req.cached
            if self.prefix:  # its full prompt pages, now (being) written, for later requests
                self.pool.remember(slots[0], req.keys)
        return [r for r, _ in chosen]

    def _future_pages(self, req: Request) -> tuple[int, int]:
        """(pages the request's first slot ever holds, those of each other slot)."""
        full = pages_for(self._positions(req), self.page_size)
        if req.settings.num_beams > 1:
            return full, full
        return full, full - (0 if self.seq2seq else len(req.prompt) // self.page_size)

    def _positions(self, req: Request) -> int:
        """Positions a slot of req may write: its prompt + max_new_tokens - 1 (+ drafts)."""
        base = 0 if self.seq2seq else len(req.prompt)
        return base + req.settings.max_new_tokens - 1 + self.feats.speculative + \
            (1 if self.seq2seq else 0)

    def _place(self, req: Request, free: list) -> Optional[list]:
        """Free slots for req, all in one data shard (beams: an aligned group), whose
        shard's pages hold it and what its live slots may still take; or None."""
        w = req.width
        per = self.n_slots // self.shards
        for j in range(self.shards):
            mine = [s for s in free if s // per == j]
            if self.feats.beams:
                starts = [s for s in mine if s % w == 0 and all(s + d in mine for d in range(w))]
                slots = list(range(starts[0], starts[0] + w)) if starts else None
            else:
                slots = mine[:w] if len(mine) >= w else None
            if slots is None:
                continue
            if self.pool is None:
                return slots
            first, other = self._future_pages(req)
            reserved = sum(self._slot_pages(s) - len(self.pool.held[s])
                           for s in range(j * per, (j + 1) * per) if self.owner[s] is not None)
            if first + (w - 1) * other <= self.pool.n_free(j) - reserved:
                return slots
        return None

    def _slot_pages(self, s: int) -> int:
        """The pages slot s holds at its longest (shared ones included: what it still
        takes is this minus what it holds)."""
        req, k = self.owner[s]
        return self._future_pages(req)[0]

    def _take(self, req: Request, slots: list) -> None:
        req.slots = list(slots)
        n = len(req.prompt)
        s = self.settings
        del s
        for k, slot in enumerate(slots):
            self.owner[slot] = (req, 0 if req.settings.num_beams > 1 else k)
            self.emitted[slot] = 0
            self.slots["lengths"][slot] = 1 if self.seq2seq else n
            self.slots["count"][slot] = 0
            self.slots["budget"][slot] = req.settings.max_new_tokens
            self.slots["live"][slot] = True
            self.slots["eos"][slot] = False
        req.cached = 0
        if self.pool is None or self.seq2seq:
            return
        if self.prefix:  # the longest cached run of its full pages, leaving a token to compute
            hit = self.pool.lookup(slots[0], req.keys[:(n - 1) // self.page_size])
            self.pool.attach(slots[0], hit)
            req.cached = len(hit) * self.page_size
        self.pool.grow(slots[0], n)
        self.stats["prompt_pages"] += len(self.pool.held[slots[0]])
        shared = 0 if req.settings.num_beams > 1 else n // self.page_size
        for slot in slots[1:]:
            self.pool.share(slots[0], slot, shared)
            self.pool.grow(slot, n)

    def _packs(self, chosen: list) -> list:
        """Admitted requests in calls of packs: each data shard's prompts into rows of
        at most PACK_TOKENS (a longer prompt alone); a call takes one row per shard."""
        ps = self.page_size
        per = self.n_slots // self.shards
        rows = [[] for _ in range(self.shards)]
        for req, slots in chosen:
            packs = rows[slots[0] // per]
            size = pages_for(len(req.prompt), ps) * ps
            if not packs or sum(pages_for(len(r.prompt), ps) * ps for r, _ in packs[-1]) \
                    + size > PACK_TOKENS:
                packs.append([])
            packs[-1].append((req, slots))
        calls = []
        for k in range(max(map(len, rows))):
            calls.append([x for packs in rows if k < len(packs) for x in packs[k]])
        return calls

    def _admit_call(self, group: list) -> None:
        """One compiled admission of the requests in group [(request, slots)]."""
        s_total = self.n_slots
        admitted = np.zeros(s_total, bool)
        forks, copies = [], []
        for req, slots in group:
            admitted[slots] = True
            for slot in slots[1:]:
                forks.append((slots[0], slot))
                if self.pool is not None and not self.seq2seq:
                    first = self.pool.held[slots[0]]
                    mine = self.pool.held[slot]
                    for i in range(len(mine)):  # the pages it does not share
                        if mine[i] != first[i]:
                            copies.append((first[i], mine[i]))
        new = self._new_rows(group, admitted)
        # (src, dst) lists padded to a power of two (a bounded number of compilations;
        # each copy moves what it names: the padding points out of range)
        f = np.full((pow2(len(forks), 1), 2), s_total, np.int32)
        if forks:
            f[:len(forks)] = forks
        c = np.full((pow2(len(copies), 1), 2), self.pool.n_pages if self.pool else 0, np.int32)
        if copies:
            c[:len(copies)] = copies
        if self.seq2seq:
            pack = self._enc_pack(group)
        elif self.pool is not None:
            pack = self._extend_pack(group) if group[0][0].cached else self._page_pack(group)
        else:
            pack = self._row_pack(group)
        whole = (not self.seq2seq and self.pool is None and context_size() > 1)
        self.state = _admit(self.params, self.cfg, *self._draft(), self.state, pack, new,
                            admitted, f if forks else None, c, feats=self.feats, kind=self.kind,
                            start_id=self.start_id, whole=whole)
        self.stats["admit_calls"] += 1

    def _new_rows(self, group: list, admitted) -> New:
        s_total, e = self.n_slots, self.feats.stops
        cols = {k: np.zeros(s_total, np.float32) for k in
                ("temperature", "top_p", "min_p", "repetition", "presence", "frequency")}
        ints = {k: np.zeros(s_total, np.int32) for k in ("top_k", "ngram", "min_new",
                                                         "hist_len", "guide")}
        cols["top_p"][:] = 1.0
        cols["repetition"][:] = 1.0
        stop = np.full((s_total, e), -1, np.int32)
        seeds = np.zeros(s_total, np.uint32)
        folds = np.zeros(s_total, np.uint32)
        subs = np.full(s_total, -1, np.int64)
        for req, slots in group:
            g = req.settings
            for k, slot in enumerate(slots):
                cols["temperature"][slot], cols["top_p"][slot] = g.temperature, g.top_p
                cols["min_p"][slot], cols["repetition"][slot] = g.min_p, g.repetition_penalty
                cols["presence"][slot] = g.presence_penalty
                cols["frequency"][slot] = g.frequency_penalty
                ints["top_k"][slot], ints["ngram"][slot] = g.top_k, g.no_repeat_ngram_size
                ints["min_new"][slot] = g.min_new_tokens
                ints["hist_len"][slot] = 1 if self.seq2seq else len(req.prompt)
                if req.guide is not None:
                    ints["guide"][slot] = self.guide_offset[id(req.guide)]
                stop[slot, :len(req.eos_ids)] = req.eos_ids
                seeds[slot], folds[slot] = g.seed % 2 ** 32, req.row_seed % 2 ** 32
                if req.settings.num_beams == 1 and g.num_return_sequences > 1:
                    subs[slot] = k
        keys = np.asarray(_key_data(seeds, folds, np.maximum(subs, 0).astype(np.uint32),
                                    subs >= 0))
        lpen, early = None, None
        if self.feats.beams:
            lpen, early = np.ones(s_total, np.float32), np.zeros(s_total, np.int32)
            for req, slots in group:
                g = req.settings
                lpen[slots] = g.length_penalty
                early[slots] = 2 if g.early_stopping == "never" else int(bool(g.early_stopping))
        return New(keys, Sampler(cols["temperature"], ints["top_k"], cols["top_p"],
                                 cols["min_p"]),
                   Penalties(cols["repetition"], cols["presence"], cols["frequency"],
                             ints["ngram"], ints["min_new"]),
                   stop, ints["hist_len"], ints["guide"] if self.feats.guided else None,
                   lpen, early)

    def _extend_pack(self, group: list) -> Extend:
        """The uncached rest of each prompt of group at its first slot's row (the
        widths bucketed: a bounded number of compilations)."""
        s_total = self.n_slots
        rest = max(len(r.prompt) - r.cached for r, _ in group)
        width = _pack_width(rest, 1)
        compact = self.shards == 1
        n_rows = min(pow2(len(group), 1), s_total) if compact else s_total
        tokens = np.zeros((n_rows, width), np.int32)
        lengths, last = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int32)
        live, slot = np.zeros(n_rows, bool), np.full(n_rows, s_total, np.int32)
        table = self._table()
        n_hist = s_total * self.max_prompt_len  # one shape per engine: no compile per mix
        h_tok, h_pos = np.zeros(n_hist, np.int32), np.zeros(n_hist, np.int32)
        h_slot = np.full(n_hist, s_total, np.int32)
        at = 0
        for k, (req, slots) in enumerate(group):
            n, c, s = len(req.prompt), req.cached, slots[0]
            r = k if compact else s
            tokens[r, :n - c], lengths[r], last[r], live[r] = req.prompt[c:], c, n - c - 1, True
            slot[r] = s
            h_tok[at:at + n], h_pos[at:at + n], h_slot[at:at + n] = req.prompt, np.arange(n), s
            at += n
        rows_table = table[np.minimum(slot, s_total - 1)] if compact else table
        return Extend(tokens, lengths, last, live, rows_table, slot, h_tok, h_slot, h_pos)

    def _page_pack(self, group: list) -> Pack:
        """Each data shard's prompts of group packed into its row (`_packs` made them fit)."""
        ps, s_total, j = self.page_size, self.n_slots, self.shards
        per = s_total // j
        by_shard = [[(r, sl) for r, sl in group if sl[0] // per == row] for row in range(j)]
        width = _pack_width(max(sum(pages_for(len(r.prompt), ps) * ps for r, _ in p)
                                for p in by_shard), ps)
        n_out = min(s_total, j * width // ps)  # the logits rows: a function of the width only
        tokens, positions, segments = (np.zeros((j, width), np.int32) for _ in range(3))
        tok_slot = np.full((j, width), s_total, np.int32)
        ids = np.full((j, width // ps), self.pool.n_pages, np.int32)
        last, out_slot = np.zeros(n_out, np.int32), np.full(n_out, s_total, np.int32)
        o = 0
        for row, pack in enumerate(by_shard):
            at = 0
            for seg, (req, slots) in enumerate(pack, 1):
                n = len(req.prompt)
                tokens[row, at:at + n], positions[row, at:at + n] = req.prompt, np.arange(n)
                segments[row, at:at + n], tok_slot[row, at:at + n] = seg, slots[0]
                held = self.pool.held[slots[0]]
                ids[row, at // ps:at // ps + len(held)] = held
                last[o], out_slot[o] = row * width + at + n - 1, slots[0]
                at, o = at + pages_for(n, ps) * ps, o + 1
        return Pack(tokens, positions, segments, ids, last, out_slot, tok_slot)

    def _row_pack(self, group: list) -> Pack:
        """One prompt per row, written into its first slot's cache row (contiguous).
        Under a context mesh every slot's row, each padded to the cache length: the
        prefill rings (`jaxlm.model.kv.Contiguous`), so it admits all slots at once."""
        from ..sharding.context import context_size
        s_total = self.n_slots
        longest = max(len(r.prompt) for r, _ in group)
        width = min(pow2(longest, 16), self.span)
        j = min(pow2(len(group), 1), s_total)
        if context_size() > 1:
            if len(group) != s_total or self.slots["live"].sum() != s_total:
                raise InputError("under context parallelism the contiguous cache is prefilled "
                                 "for every slot at once: give as many prompts as slots")
            group = sorted(group, key=lambda x: x[1][0])
            width, j = self.span, s_total
        tokens, positions, segments = (np.zeros((j, width), np.int32) for _ in range(3))
        tok_slot = np.full((j, width), s_total, np.int32)
        where = np.full(j, s_total, np.int32)
        last, out_slot = np.zeros(j, np.int32), np.full(j, s_total, np.int32)
        for row, (req, slots) in enumerate(group):
            n = len(req.prompt)
            tokens[row, :n], positions[row] = req.prompt, np.arange(width)
            segments[row, :n], tok_slot[row, :n] = 1, slots[0]
            where[row], last[row], out_slot[row] = slots[0], row * width + n - 1, slots[0]
        return Pack(tokens, positions, segments, where, last, out_slot, tok_slot)

    def _enc_pack(self, group: list) -> EncPack:
        s_total = self.n_slots
        longest = max(len(r.prompt) for r, _ in group)
        width = min(pow2(longest, 16), self.enc_len)
        a = min(pow2(len(group), 1), s_total)
        tokens, segments = np.zeros((a, width), np.int32), np.zeros((a, width), np.int32)
        out_slot = np.full(a, s_total, np.int32)
        for row, (req, slots) in enumerate(group):
            n = len(req.prompt)
            tokens[row, :n], segments[row, :n], out_slot[row] = req.prompt, 1, slots[0]
        if self.pool is not None:
            for req, slots in group:  # the first decoder token's page
                self.pool.grow(slots[0], 1)
        return EncPack(tokens, segments, out_slot, self._table())


def _pack_width(n: int, page_size: int) -> int:
    """The pack width for n tokens: the next of 2^k and 3 x 2^(k-1) (>= 16),
    rounded up to a page: a bounded number of compilations, <= 1.5x padding."""
    w = 16
    while w < n:
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3
    return -(-w // page_size) * page_size


@jax.jit
def _key_data(seeds, folds, subs, has_sub):
    """Per slot: the key data of fold_in(key(seed), fold), and of sample j of n > 1
    fold_in(that, j)."""
    def one(seed, fold, sub, has):
        k = jax.random.fold_in(jax.random.key(seed), fold)
        return jnp.where(has, jax.random.key_data(jax.random.fold_in(k, sub)),
                         jax.random.key_data(k))
    return jax.vmap(one)(seeds, folds, subs, has_sub)


def _init_mtp(slots: int, cfg, feats: Features) -> MtpRows:
    k = feats.speculative
    return MtpRows(jnp.zeros((slots, cfg.d_model), dtype_of(cfg.dtype)),
                   jnp.zeros((slots, k), jnp.int32),
                   jnp.zeros((slots, k, cfg.vocab_size), jnp.float32)
                   if feats.sampler.sample else None)


def _kv_rows(cache: dict) -> dict:
    """init_cache's dict without its lengths (the engine keeps them per slot)."""
    return {n: a for n, a in cache.items() if n != "lengths"}


def _init_rows(slots: int, vocab: int, feats: Features) -> Rows:
    w, e = feats.width, feats.stops
    p = feats.processors
    hist = History(jnp.zeros((slots,), jnp.int32),
                   jnp.zeros((slots, vocab), bool) if p.seen else None,
                   jnp.zeros((slots, vocab), jnp.int32) if p.counts else None,
                   jnp.zeros((slots, feats.history), jnp.int32) if p.ngram else None)
    f32 = lambda v: jnp.full((slots,), v, jnp.float32)  # noqa: E731
    i32 = lambda v: jnp.full((slots,), v, jnp.int32)  # noqa: E731
    return Rows(jnp.zeros((slots, vocab), jnp.float32), jnp.full((slots, w), PAD_ID, jnp.int32),
                jnp.zeros((slots, 2), jnp.uint32),
                Sampler(f32(0.0), i32(0), f32(1.0), f32(0.0)),
                Penalties(f32(1.0), f32(0.0), f32(0.0), i32(0), i32(0)),
                jnp.full((slots, e), -1, jnp.int32), hist,
                i32(0) if feats.guided else None,
                jnp.zeros((slots, w), jnp.float32) if feats.logprobs else None,
                jnp.zeros((slots, w, vocab), jnp.float32) if feats.return_logits else None,
                *((jnp.zeros((slots, w, k), jnp.int32), jnp.zeros((slots, w, k), jnp.float32))
                  if (k := min(feats.top_logprobs, vocab)) and feats.logprobs else (None, None)))


def _init_beams(slots: int, feats: Features):
    if not feats.beams:
        return None
    from .beam import init_groups
    return init_groups(slots // feats.beams, feats.beams, feats.width)
