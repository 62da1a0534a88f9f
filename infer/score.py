"""Log-likelihoods of text under a causal LM: `jaxlm.score` (lm-eval's `loglikelihood`)
and `perplexity` (token NLL, perplexity, bits per byte over sliding windows).

    out = jaxlm.score(params, cfg, ["The sky is"], [" blue"], tokenizer=tok)
    out.logprobs[0], out.is_greedy[0]        # summed log p(continuation | context)
    ppl = perplexity(params, cfg, ["a document", ...], tokenizer=tok, stride=512)
    ppl.perplexity, ppl.bits_per_byte, ppl.token_nlls[0]

Pairs (context, continuation) are encoded as lm-eval encodes them: the whole text
and the context apart, the continuation the ids past the context's; a context's
trailing spaces go to the continuation; an empty context is the prefix token (BOS,
else EOS). Pairs that share a context run it once: one jitted call prefills
`batch_size` contexts into a KV cache (`jaxlm.model.kv.Contiguous`), copies each
context's cache rows to its continuations, and runs every continuation over them
(a multiple-choice question: its context once, not once per choice). A pair longer
than max_length + 1 tokens is cut from the left, as lm-eval's `hf` backend cuts it,
counted in `truncated`, and scored as a row of its own.

Rows (cut pairs, perplexity windows): an input sequence and a list of queries
(position, token): the log-probability of `token` given the row's tokens up to and
including `position`, and whether it is the argmax there. One jitted pass per batch
of rows; a row whose input is a prefix of another's shares that row. Either way the
LM head runs on the queried positions only, and batches are padded to few widths
(multiples of 16) and a fixed batch size: few compiles.

Perplexity windows: each document's ids (prefix token first) are scored token by
token, every token once; the targets are taken `stride` at a time, each chunk in a
window of max_length inputs ending just before its last target, so that every token
but the first window's sees at least max_length - stride tokens of context (Hugging
Face's perplexity guide; stride = max_length: disjoint windows, lm-eval's
`loglikelihood_rolling`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .engine import bucket, pow2

_BUCKET = 16  # row widths and query counts are padded to a multiple of this


class Scores(NamedTuple):
    """`jaxlm.score`'s result, one entry per (context, continuation) pair."""
    logprobs: np.ndarray  # f64 [n]: summed log-probability of the continuation
    is_greedy: np.ndarray  # bool [n]: every continuation token is the argmax
    truncated: int  # pairs cut from the left to max_length + 1 tokens


class Perplexity(NamedTuple):
    """`perplexity`'s result over a list of documents."""
    nll: float  # mean negative log-likelihood per token (nats)
    perplexity: float  # exp(nll)
    bits_per_byte: float  # summed NLL in bits / the documents' UTF-8 bytes (nan: no text)
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the documents (0 for token-id documents)
    token_nlls: list  # per document: f64 [its tokens scored] NLL of each, in order


def prefix_id(tokenizer) -> int:
    """What an empty context is conditioned on: BOS, else EOS (lm-eval's prefix token)."""
    for i in (tokenizer.bos_id, tokenizer.eos_id):
        if i is not None:
            return i
    raise InputError("the tokenizer has neither a BOS nor an EOS id to condition on")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context ids, continuation ids) as lm-eval's causal backends make them."""
    if not context:
        cont = tokenizer.encode(continuation)
        first = prefix_id(tokenizer)
        return ([first], cont) if not cont or cont[0] != first else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    ctx = tokenizer.encode(context, add_special_tokens=True)
    return ctx, whole[len(ctx):]


def _max_length(cfg, max_length) -> int:
    if max_length is None:
        return cfg.max_seq_len
    if not isinstance(max_length, int) or max_length < 1 or max_length > cfg.max_seq_len:
        raise InputError(f"max_length={max_length!r} must be an int in [1, "
                         f"model.max_seq_len={cfg.max_seq_len}]")
    return max_length


def _check_ids(ids, cfg, where: str) -> list:
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < cfg.vocab_size), None)
    if bad is not None:
        raise InputError(f"{where}: token id {bad} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    return ids


def score(params, cfg, contexts, continuations, *, tokenizer=None, batch_size: int = 16,
          max_length: Optional[int] = None, mesh=None, rules=None,
          progress: bool = False) -> Scores:
    """`jaxlm.score`: log p(continuation | context) summed over the continuation's
    tokens, and whether greedy decoding would produce it, for each pair.

    contexts / continuations: lists of strings (with `tokenizer=`, encoded as
    lm-eval encodes them) or of token-id lists. batch_size: rows per forward pass.
    max_length: the model's context (default model.max_seq_len); longer pairs are
    cut from the left (`Scores.truncated` counts them). mesh / rules: run the rows
    sharded over the mesh's batch axes (the params loaded under that mesh)."""
    from ..validate import check_model_args
    check_model_args(params, cfg, "score")
    if cfg.family != "decoder":
        raise InputError(f"score: a causal decoder is needed, got a {cfg.family} model")
    if isinstance(contexts, str) or isinstance(continuations, str):
        raise InputError("score: contexts and continuations must be lists (one per pair)")
    contexts, continuations = list(contexts), list(continuations)
    if len(contexts) != len(continuations):
        raise InputError(f"score: {len(contexts)} contexts but {len(continuations)} "
                         "continuations")
    pairs = []
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        if isinstance(c, str) != isinstance(x, str):
            raise InputError(f"score: pair {i} mixes a string and token ids")
        if isinstance(c, str):
            if tokenizer is None:
                raise InputError("score: strings need tokenizer= (e.g. jaxlm.load_tokenizer(DIR))")
            c, x = encode_pair(tokenizer, c, x)
        pairs.append((_check_ids(c, cfg, f"score: context {i}"),
                      _check_ids(x, cfg, f"score: continuation {i}")))
    return score_ids(params, cfg, pairs, batch_size=batch_size, max_length=max_length,
                     mesh=mesh, rules=rules, progress=progress)


def score_ids(params, cfg, pairs: Sequence[tuple], *, batch_size: int = 16,
              max_length: Optional[int] = None, mesh=None, rules=None,
              progress: bool = False) -> Scores:
    """`score` on (context ids, continuation ids) pairs, already checked."""
    length = _max_length(cfg, max_length)
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise InputError(f"score: pair {i} has an empty {'context' if not ctx else 'continuation'}"
                             " (no tokens)")
        if len(cont) > length:
            raise InputError(f"score: continuation {i} has {len(cont)} tokens, more than the "
                             f"model's {length} positions")
    logprobs = np.zeros(len(pairs), np.float64)
    greedy = np.zeros(len(pairs), bool)
    fits = [i for i, (c, x) in enumerate(pairs) if len(c) + len(x) - 1 <= length]
    for i, lp, gr in _shared_contexts(params, cfg, [pairs[i] for i in fits], fits, batch_size,
                                      mesh, rules, progress):
        logprobs[i], greedy[i] = lp, gr
    long = [i for i, (c, x) in enumerate(pairs) if len(c) + len(x) - 1 > length]
    for i, lp, gr in _cut_rows(params, cfg, [pairs[i] for i in long], long, length,
                               batch_size, mesh, rules, progress):
        logprobs[i], greedy[i] = lp, gr
    return Scores(logprobs, greedy, len(long))


def _cut_rows(params, cfg, pairs, ids, length, batch_size, mesh, rules, progress):
    """(index, log-prob, greedy) of pairs longer than the model: each cut from the left to
    length + 1 ids, one row each (or a row it is a prefix of)."""
    if not pairs:
        return
    inputs, targets = [], []
    for ctx, cont in pairs:
        whole = (list(ctx) + list(cont))[-(length + 1):]
        inputs.append(tuple(whole[:-1]))
        targets.append(list(cont))
    # a pair whose input is a prefix of another's reads its log-probs from that row:
    # in sorted order a prefix sits right before the inputs that extend it
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    owner = {}
    for k in range(len(order) - 1, -1, -1):
        i = order[k]
        nxt = order[k + 1] if k + 1 < len(order) else None
        if nxt is not None and inputs[nxt][:len(inputs[i])] == inputs[i]:
            owner[i] = owner[nxt]
        else:
            owner[i] = i
    rows, where = {}, {}
    for i in range(len(inputs)):
        row = rows.setdefault(owner[i], (list(inputs[owner[i]]), []))
        n, start = len(inputs[i]), len(row[1])
        row[1].extend((n - len(targets[i]) + j, t) for j, t in enumerate(targets[i]))
        where[i] = (owner[i], start, len(targets[i]))
    keys = list(rows)
    got = dict(zip(keys, query_rows(params, cfg, [rows[k] for k in keys], batch_size=batch_size,
                                    mesh=mesh, rules=rules, progress=progress)))
    for i, (row, start, n) in where.items():
        lp, gr = got[row]
        yield ids[i], float(np.sum(lp[start:start + n], dtype=np.float64)), \
            bool(np.all(gr[start:start + n]))


def _shared_contexts(params, cfg, pairs, ids, batch_size, mesh, rules, progress):
    """(index, log-prob, greedy) of pairs that fit the model: the pairs of one context
    share one pass over it (`_shared_context_logprobs`), `batch_size` contexts a call."""
    from tqdm.auto import tqdm
    if not pairs:
        return
    groups: dict = {}
    for k, (ctx, cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(k)
    order = sorted(groups, key=lambda c: -len(c))
    multiple = _batch_multiple(mesh, rules)
    b = bucket(batch_size, multiple)
    pad = max(cfg.pad_token_id, 0)
    bar = tqdm(total=len(pairs), disable=not progress, desc="scoring", unit="pair",
               dynamic_ncols=True)
    chunks, part, n_conts = [], [], 0
    for c in order:  # up to b contexts and about 4b continuations a call
        if part and (len(part) == b or n_conts + len(groups[c]) > 4 * b):
            chunks.append(part)
            part, n_conts = [], 0
        part.append(c)
        n_conts += len(groups[c])
    if part:
        chunks.append(part)
    with _mesh_context(mesh, rules):
        for part in chunks:
            members = [(g, k) for g, c in enumerate(part) for k in groups[c]]
            width = _bucket(max(len(c) for c in part), cfg.max_seq_len)
            # continuations are short: their width is a power of two, not a multiple of 16
            x = pow2(max(max(len(pairs[k][1]) for _, k in members) - 1, 1), 1)
            r = bucket(pow2(len(members), multiple), multiple)  # a power of two
            ctx = np.full((b, width), pad, np.int32)
            ctx_len = np.ones((b,), np.int32)
            for g, c in enumerate(part):
                ctx[g, :len(c)], ctx_len[g] = c, len(c)
            group = np.zeros((r,), np.int32)
            cont_in = np.full((r, x), pad, np.int32)
            tok = np.zeros((r, x + 1), np.int32)
            for j, (g, k) in enumerate(members):
                cont = pairs[k][1]
                group[j] = g
                cont_in[j, :len(cont) - 1] = cont[:-1]
                tok[j, :len(cont)] = cont
            lp, gr = _shared_context_logprobs(
                params, cfg, *put_rows((ctx, ctx_len, group, cont_in, tok), mesh, rules))
            lp, gr = np.asarray(lp), np.asarray(gr)
            for j, (_, k) in enumerate(members):
                n = len(pairs[k][1])
                yield ids[k], float(np.sum(lp[j, :n], dtype=np.float64)), bool(np.all(gr[j, :n]))
            bar.update(len(members))
    bar.close()


def _mesh_context(mesh, rules):
    import contextlib
    if mesh is None:
        return contextlib.nullcontext()
    from ..sharding.rules import use_mesh
    return use_mesh(mesh, rules)


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The sliding windows over n ids (the first: the prefix token, never a target):
    (input start, input end, first target) per window; window w's inputs are
    ids[start:end], its targets ids[first:end + 1] (see the module docstring)."""
    out = []
    for first in range(1, n, stride):
        last = min(first + stride, n) - 1  # the chunk's last target; inputs end before it
        out.append((max(0, last - max_length), last, first))
    return out


def perplexity(params, cfg, documents, *, tokenizer=None, max_length: Optional[int] = None,
               stride: Optional[int] = None, batch_size: int = 16, mesh=None, rules=None,
               progress: bool = False) -> Perplexity:
    """Token NLL, perplexity and bits per byte of `documents` (strings with
    `tokenizer=`: each is its prefix token (BOS, else EOS) then its ids; or token-id
    lists, whose first id is the prefix and is not scored).

    max_length: the window (default model.max_seq_len); stride: targets per window
    (default max_length: disjoint windows; smaller: overlapping windows, more
    context per token). Bits per byte: the summed NLL in bits over the documents'
    UTF-8 bytes (strings only), comparable across tokenizers."""
    length = _max_length(cfg, max_length)
    stride = length if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= length:
        raise InputError(f"stride={stride!r} must be an int in [1, max_length={length}]")
    if isinstance(documents, str):
        raise InputError("perplexity: documents must be a list (of strings or token-id lists)")
    docs, n_bytes = [], 0
    for i, d in enumerate(documents):
        if isinstance(d, str):
            if tokenizer is None:
                raise InputError("perplexity: strings need tokenizer=")
            n_bytes += len(d.encode("utf-8"))
            d = [prefix_id(tokenizer)] + tokenizer.encode(d)
        d = _check_ids(d, cfg, f"perplexity: document {i}")
        if len(d) < 2:
            raise InputError(f"perplexity: document {i} has no tokens to score")
        docs.append(d)
    if not docs:
        raise InputError("perplexity: no documents")
    rows, spans = [], []
    for i, d in enumerate(docs):
        for start, end, first in windows(len(d), length, stride):
            # input position p predicts d[start + p + 1]; targets d[first:end + 1]
            rows.append((d[start:end], [(t - 1 - start, d[t]) for t in range(first, end + 1)]))
            spans.append(i)
    got = query_rows(params, cfg, rows, batch_size=batch_size, mesh=mesh, rules=rules,
                     progress=progress)
    per_doc = [[] for _ in docs]
    for i, (lp, _) in zip(spans, got):
        per_doc[i].append(-lp.astype(np.float64))
    token_nlls = [np.concatenate(x) for x in per_doc]
    total = float(sum(x.sum() for x in token_nlls))
    tokens = sum(len(x) for x in token_nlls)
    nll = total / tokens
    bpb = total / math.log(2) / n_bytes if n_bytes else float("nan")
    return Perplexity(nll, math.exp(nll), bpb, tokens, n_bytes, token_nlls)


# ------------------------------------------------------------ rows -> query log-probs

def _picked_logprobs(params, cfg, hidden, tok):
    """hidden [B, Q, D] (the states that predict tok [B, Q]) -> (log p(tok) [B, Q] f32,
    tok is the argmax [B, Q] bool); the head runs on these states only."""
    from ..model import unembed
    logits = unembed(params, hidden, cfg)  # [B, Q, V] float32
    lp = jnp.take_along_axis(logits, tok[..., None], axis=-1)[..., 0] \
        - jax.nn.logsumexp(logits, axis=-1)
    return lp, jnp.argmax(logits, axis=-1) == tok


@functools.partial(jax.jit, static_argnames=("cfg",))
def _query_logprobs(params, cfg, tokens, pos, tok):
    """tokens [B, W], pos / tok [B, Q] -> (log p(tok | tokens[:pos + 1]) [B, Q] f32,
    tok is the argmax there [B, Q] bool)."""
    from ..model import forward
    hidden, _ = forward(params, cfg, tokens, return_hidden=True)  # [B, W, D]
    picked = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # [B, Q, D]
    return _picked_logprobs(params, cfg, picked, tok)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _shared_context_logprobs(params, cfg, ctx, ctx_len, group, cont_in, tok):
    """Contexts run once, each of their continuations over the context's cache.

    ctx [G, Wc] (right-padded), ctx_len [G]; per continuation r: group [R] (its
    context), cont_in [R, X] (its ids but the last), tok [R, X + 1] (its ids).
    -> (log p [R, X + 1], is argmax [R, X + 1]) of tok given the context and the
    continuation's ids before it."""
    from ..model import forward
    from ..model.kv import Contiguous
    from ..model.kv.contiguous import init_cache
    g, wc = ctx.shape
    store = Contiguous.of(init_cache(cfg, g, wc + cont_in.shape[1]), fresh=True)
    hidden, aux = forward(params, cfg, ctx, store=store, return_hidden=True)  # [G, Wc, D]
    first = hidden[group, ctx_len[group] - 1]  # [R, D]: predicts each continuation's first id
    kv = jax.tree.map(lambda x: jnp.take(x, group, axis=1), aux["store"].kv)  # [L, R, T, ...]
    rows = Contiguous(kv, lengths=ctx_len[group])  # continuations go after their context
    # padding past the model's positions reads the last one (learned positions: no gather
    # out of range, whose NaN would reach the real tokens through masked-out values)
    at = jnp.minimum(rows.positions(*cont_in.shape), cfg.max_seq_len - 1)
    rest, _ = forward(params, cfg, cont_in, at, store=rows, return_hidden=True)  # [R, X, D]
    return _picked_logprobs(params, cfg, jnp.concatenate([first[:, None], rest], axis=1), tok)


def _bucket(n: int, cap: int) -> int:
    return max(n, min(cap, bucket(n, _BUCKET)))


def put_rows(arrays, mesh, rules):
    """The host batch arrays on device: split over the mesh's batch axes under a mesh."""
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    from ..sharding.rules import named_sharding
    sharding = named_sharding(mesh, ("batch",), rules)
    return [jax.device_put(a, sharding) for a in arrays]


def _batch_multiple(mesh, rules) -> int:
    if mesh is None:
        return 1
    from ..sharding.rules import partition_spec
    spec = partition_spec(("batch",), rules)[0] or ()
    return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))


def query_rows(params, cfg, rows, *, batch_size: int = 16, mesh=None, rules=None,
               progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """rows: (input ids, [(position, token), ...]) -> per row (log-probs f32 [q],
    is-argmax bool [q]) of its queries, in order. Rows run longest first,
    `batch_size` at a time (rounded up to the mesh's batch shards)."""
    from tqdm.auto import tqdm
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be an int >= 1")
    multiple = _batch_multiple(mesh, rules)
    b = bucket(batch_size, multiple)
    pad = max(cfg.pad_token_id, 0)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    bar = tqdm(total=len(rows), disable=not progress, desc="scoring", unit="row",
               dynamic_ncols=True)
    with _mesh_context(mesh, rules):
        for s in range(0, len(order), b):
            part = order[s:s + b]
            width = _bucket(max(len(rows[i][0]) for i in part), cfg.max_seq_len)
            q = _bucket(max(len(rows[i][1]) for i in part), 1 << 30)
            tokens = np.full((b, width), pad, np.int32)
            pos = np.zeros((b, q), np.int32)
            tok = np.zeros((b, q), np.int32)
            for j, i in enumerate(part):
                ids, queries = rows[i]
                tokens[j, :len(ids)] = ids
                if queries:
                    pos[j, :len(queries)], tok[j, :len(queries)] = zip(*queries)
            lp, greedy = _query_logprobs(params, cfg, *put_rows((tokens, pos, tok), mesh, rules))
            lp, greedy = np.asarray(lp), np.asarray(greedy)
            for j, i in enumerate(part):
                n = len(rows[i][1])
                out[i] = (lp[j, :n], greedy[j, :n])
            bar.update(len(part))
    bar.close()
    return out


__all__ = ["score", "score_ids", "perplexity", "Scores", "Perplexity", "encode_pair",
           "prefix_id", "query_rows", "windows"]
