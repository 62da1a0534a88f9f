"""Generation: one prefill + one compiled decode loop over a preallocated KV cache.

    out = generate(params, cfg, [[5, 7, 9], [3, 4]], max_new_tokens=64, eos_id=2)
    out.tokens       # np.int32 [B, max_new_tokens], PAD_ID (-1) after a row stopped
    out.lengths      # np.int32 [B]: tokens generated per row, EOS included
    out.sequences()  # list of lists of generated ids, EOS excluded

Two jitted functions do all the work, `cfg` and the sampler settings being
static arguments and the cache buffer donated to both:

* `prefill(params, cfg, cache, tokens, prompt_lengths)`: right-padded prompts
  [B, P] are written into the cache in one pass; returns the next-token logits
  at each row's last prompt token and the cache with lengths advanced by the
  prompt lengths (garbage K/V written past a row's length is masked by
  `lengths` and overwritten by the decode).
* `decode(params, cfg, cache, logits, row_keys, max_new_tokens, eos_id, ...)`:
  a `lax.while_loop` that samples, feeds the token back and stops when every
  row is done or `max_new_tokens` is reached. No re-tracing and no host round
  trip per token; `max_new_tokens` and `eos_id` are traced values, so they do
  not recompile either (the output width is bucketed).

Shapes are bucketed (prompt length to a power of two, cache length to a
multiple of 128, output width to a multiple of 64) so that nearby requests
reuse the compiled functions. Row r samples with `fold_in(fold_in(key(seed),
r), step)`: deterministic per seed, and independent of the other rows.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .beam import beam_knobs, beam_loop
from . import guided
from .cache import check_kv_dtype, init_cache, split_layers, stack_layers
from .processors import (History, Processors, apply as apply_processors,
                                    check_processors, count_eos, eos_array,
                                    gather as gather_history, init_history, is_eos, push)
from .sampling import check_sampling, sample
from ..model import forward, unembed
from ..model.families.decoder import fuse_projections, unstack_layers
from ..sharding.distributed import fetch

PAD_ID = -1  # fills GenerateOutput.tokens after a row has stopped
CACHE_BUCKET = 128
WIDTH_BUCKET = 64
MIN_PROMPT_BUCKET = 16
# Decode loops up to this many layers and bytes of layer weights run the layers
# unrolled over per-layer weights split once before the loop: no step copies a
# layer's weights out of the stack (XLA materialises a slice of a scanned array
# that feeds a matmul). Beyond, the scan (trace / compile time; the split copy's
# peak memory). See `_unroll`.
UNROLL_MAX_LAYERS = 32
UNROLL_MAX_BYTES = 2 ** 30

# Python-side trace counters (incremented while tracing, never at run time):
# tests use them to check that the decode step is compiled once.
TRACE_COUNTS = {"prefill": 0, "decode_step": 0, "beam_step": 0}


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_new_tokens]; PAD_ID after a row stopped
    lengths: np.ndarray  # int32 [B]: generated tokens per row, EOS included
    finished: np.ndarray  # bool [B]: the row stopped because it emitted eos_id
    logits: Optional[np.ndarray] = None  # f32 [B, max_new_tokens, V] with return_logits
    scores: Optional[np.ndarray] = None  # f32 [B * R]: beam search's sequence scores
    stats: Optional[dict] = None  # speculative decoding: drafted / accepted counts
    texts: Optional[list] = None  # jaxlm.generate(..., tokenizer=tok): each row's new text

    def sequences(self, include_eos: bool = False) -> list[list[int]]:
        """Generated ids per row; the final EOS is dropped unless include_eos."""
        out = []
        for row, n, eos in zip(self.tokens, self.lengths, self.finished):
            n = int(n) - (1 if eos and not include_eos else 0)
            out.append([int(t) for t in row[:n]])
        return out


def generate(params, cfg, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None,
             max_len: Optional[int] = None, return_logits: bool = False,
             decoder_start_id: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping=False,
             num_return_sequences: int = 1,
             row_seeds: Optional[Sequence[int]] = None, guide=None,
             kv_dtype: str = "auto") -> GenerateOutput:
    """Continue each prompt (a list of token-id lists, or a 2-D int array) by up to
    max_new_tokens tokens; a row stops after emitting eos_id (an id, or a list
    of stop ids: any of them stops the row).

    max_len: cache length (default: longest prompt + max_new_tokens rounded up
    to a multiple of 128, capped at cfg.max_seq_len). return_logits: also
    return the [B, max_new_tokens, V] raw next-token logits of every step
    (tests, debugging: it is B * max_new_tokens * V floats; not with beams).
    Encoder-decoder models (T5): the prompts are the encoder inputs, the
    decoder starts from decoder_start_id (T5: pad = 0), see jaxlm.infer.seq2seq.

    Logit processors (Hugging Face semantics and order, all inside the loop):
    repetition_penalty (prompt + generated tokens), presence_penalty and
    frequency_penalty (OpenAI semantics over the generated tokens only),
    no_repeat_ngram_size (prompt + generated), min_new_tokens (stop ids masked
    before that), then the sampler: temperature, top_k, top_p, min_p.

    num_beams > 1: beam search as transformers' (greedy only: temperature 0),
    with length_penalty, early_stopping (True, False or "never") and
    num_return_sequences (<= num_beams) hypotheses per prompt, best first:
    output row b * num_return_sequences + r, its score in `out.scores`.
    Sampling with num_return_sequences > 1 draws that many samples per prompt.

    row_seeds: one int per prompt; row r then samples with fold_in(key(seed),
    row_seeds[r]) instead of its index r, so that its output does not depend on
    which batch (or position) it is in (batch-infer passes a hash of each
    input's id); the samples of one prompt (num_return_sequences) fold in their
    index on top.

    guide: a `jaxlm.infer.guided.Guide` (regex, JSON schema, choice) for every
    prompt, or a list with one per prompt (None: unconstrained). Guided rows
    only emit tokens their automaton allows, a stop id only once the text
    matches, and always finish (with a stop id) within max_new_tokens; needs
    eos_id. Not with beams or encoder-decoder models.

    kv_dtype: "auto" (the model's compute dtype) or "int8" (per-token, per-head
    scales; see jaxlm.infer.cache; encoder-decoders: the cross K/V too).
    """
    from ..validate import check_head, check_model_args
    check_model_args(params, cfg, "generate")
    if cfg.family == "encoder":
        raise InputError("encoders do not generate text; use jaxlm.forward (masked-LM logits) "
                         "or jaxlm.embed (sentence vectors)")
    check_head(cfg, "generate")
    opts = dict(min_p=min_p, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
                num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, num_return_sequences=num_return_sequences)
    check_kv_dtype(kv_dtype)
    if cfg.family == "encoder_decoder" and guide is not None:
        raise InputError("guided decoding is not supported for encoder-decoder models yet")
    if cfg.family == "encoder_decoder":
        from .seq2seq import generate_seq2seq
        return generate_seq2seq(params, cfg, prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                eos_id=eos_id, decoder_start_id=decoder_start_id,
                                max_len=max_len, return_logits=return_logits,
                                row_seeds=row_seeds, kv_dtype=kv_dtype, **opts)
    rows = _check_prompts(prompts, cfg.vocab_size)
    _check_args(cfg, max_new_tokens, temperature, top_k, top_p, None)
    eos_ids = eos_array(eos_id, cfg.vocab_size)
    proc, beams = check_decoding(temperature=temperature, return_logits=return_logits, **opts)
    n_samples = 1 if beams else num_return_sequences
    guides = _check_guides(guide, len(rows), eos_id, beams, max_new_tokens)
    rows = [r for r in rows for _ in range(n_samples)]
    longest = max(len(r) for r in rows)
    max_len = _cache_len(cfg, longest, max_new_tokens, max_len)
    _check_fits(rows, max_new_tokens, max_len, cfg)

    ring = _context_prefill(max_len)
    tokens, prompt_lengths = _pad_prompts(
        rows, max_len if ring else min(_prompt_bucket(longest), max_len))
    cache = init_cache(cfg, len(rows), max_len, kv_dtype=kv_dtype)
    logits, cache = prefill(params, cfg, cache, tokens, prompt_lengths, fresh=ring)
    width = min(_round_up(max_new_tokens, WIDTH_BUCKET), max_len)
    history = init_history(proc, tokens, prompt_lengths, cfg.vocab_size, width)
    if beams:
        out = beam_decode(params, cfg, cache, logits, history, jnp.int32(max_new_tokens),
                          eos_ids, beam_knobs(**beams["knobs"]), width=width,
                          **beam_settings(beams, eos_id, proc))
        return fetch_beams(out, max_new_tokens, num_return_sequences, eos_ids)
    out = decode(params, cfg, cache, logits, row_keys(seed, len(rows) // n_samples, row_seeds, n_samples),
                 jnp.int32(max_new_tokens), eos_ids, width=width,
                 temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                 return_logits=return_logits, min_p=float(min_p), processors=proc,
                 history=history, guide=None if guides is None else guided.stack(
                     [g for g in guides for _ in range(n_samples)], cfg.vocab_size))
    return fetch_output(out, max_new_tokens, return_logits)


# The value at which each decoding option beyond plain sampling is off (generate's
# defaults): the paths that lack an option (the paged engine, speculative decoding)
# check a call against it.
DECODING_OFF = dict(min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, no_repeat_ngram_size=0, min_new_tokens=0,
                    num_beams=1, num_return_sequences=1, kv_dtype="auto")


def generate_kwargs(g, eos_id=None) -> dict:
    """A GenerateConfig -> the keyword arguments of `generate` (what `jaxlm generate`
    and `batch-infer` pass): eos_id (the tokenizer's) plus g.stop_ids stop a row."""
    stop = ([] if eos_id is None else [eos_id]) + [i for i in g.stop_ids if i != eos_id]
    return dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                top_p=g.top_p, seed=g.seed, eos_id=stop or None, min_p=g.min_p,
                repetition_penalty=g.repetition_penalty, presence_penalty=g.presence_penalty,
                frequency_penalty=g.frequency_penalty,
                no_repeat_ngram_size=g.no_repeat_ngram_size, min_new_tokens=g.min_new_tokens,
                num_beams=g.num_beams, length_penalty=g.length_penalty,
                early_stopping=g.early_stopping, num_return_sequences=g.num_return_sequences,
                kv_dtype=g.kv_dtype)


def check_decoding(*, temperature, return_logits, min_p, repetition_penalty, presence_penalty,
                   frequency_penalty, no_repeat_ngram_size, min_new_tokens, num_beams,
                   length_penalty, early_stopping, num_return_sequences):
    """(Processors, beam settings dict or None), or a one-line InputError."""
    check_sampling(temperature, 0, 1.0, min_p)
    proc = check_processors(repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty,
                            no_repeat_ngram_size=no_repeat_ngram_size,
                            min_new_tokens=min_new_tokens)
    if isinstance(num_beams, bool) or int(num_beams) != num_beams or num_beams < 1:
        raise InputError(f"num_beams={num_beams} must be an integer >= 1 (1 = no beam search)")
    if isinstance(num_return_sequences, bool) or int(num_return_sequences) != \
            num_return_sequences or num_return_sequences < 1:
        raise InputError(f"num_return_sequences={num_return_sequences} must be an integer >= 1")
    if num_beams == 1:
        if num_return_sequences > 1 and temperature == 0:
            raise InputError(f"num_return_sequences={num_return_sequences} needs sampling "
                             "(temperature > 0) or beam search (num_beams > 1): greedy "
                             "decoding returns one sequence")
        return proc, None
    if temperature > 0:
        raise InputError(f"num_beams={num_beams} with temperature={temperature}: sampling "
                         "with beams (do_sample) is not supported; use temperature=0")
    if num_return_sequences > num_beams:
        raise InputError(f"num_return_sequences={num_return_sequences} must be <= "
                         f"num_beams={num_beams}")
    if not np.isfinite(length_penalty) or isinstance(length_penalty, bool):
        raise InputError(f"length_penalty={length_penalty} must be a finite number")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise InputError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if return_logits:
        raise InputError("return_logits is not available with beam search (num_beams > 1)")
    return proc, {"num_beams": int(num_beams), "knobs": {
        "length_penalty": float(length_penalty), "early_stopping": early_stopping}}


def beam_settings(beams: dict, eos_id, proc: Processors) -> dict:
    """The static settings of a beam loop: HF keeps max(2, 1 + n_eos) * K candidates."""
    k = beams["num_beams"]
    return dict(num_beams=k, n_candidates=max(2, 1 + count_eos(eos_id)) * k, processors=proc)


def fetch_beams(out: dict, max_new_tokens: int, n_return: int, eos_ids) -> GenerateOutput:
    """A beam loop's results -> GenerateOutput: row b * n_return + r = hypothesis r of prompt b."""
    out = fetch({k: out[k] for k in ("tokens", "scores", "lengths")})
    tokens = out["tokens"][:, :n_return, :max_new_tokens]
    tokens = tokens.reshape(-1, tokens.shape[-1])
    lengths = out["lengths"][:, :n_return].reshape(-1)
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    finished = np.isin(last, np.asarray(eos_ids)[np.asarray(eos_ids) >= 0]) & (lengths > 0)
    return GenerateOutput(tokens, lengths, finished, None,
                          out["scores"][:, :n_return].reshape(-1))


def fetch_output(out: dict, max_new_tokens: int, return_logits: bool) -> GenerateOutput:
    """A decode loop's device results -> GenerateOutput, in one host transfer."""
    out = fetch({k: v for k, v in out.items() if k != "cache"})  # multi-host: gathered
    step_logits = out["logits"][:, :max_new_tokens] if return_logits else None
    return GenerateOutput(out["tokens"][:, :max_new_tokens], out["lengths"], out["finished"],
                          step_logits)


# ------------------------------------------------------------ compiled parts

@partial(jax.jit, static_argnames=("cfg", "fresh"), donate_argnames=("cache",))
def prefill(params, cfg, cache, tokens, prompt_lengths, fresh: bool = False):
    """Right-padded tokens [B, P] -> (logits [B, V] after each row's last prompt
    token, cache with lengths advanced by prompt_lengths).

    fresh (static): the cache is empty (the caller guarantees lengths 0). Under a
    context mesh the prompt then attends to itself by ring attention, seq-sharded
    through every layer (`decoder(..., fresh_cache=True)`), and the last token's
    hidden state is picked by a one-hot contraction over the sharded seq (partial
    sums all-reduced) rather than a gather of the whole sequence."""
    TRACE_COUNTS["prefill"] += 1
    if fresh and cfg.family == "decoder":
        hidden, aux = forward(params, cfg, tokens, cache=cache, return_hidden=True,
                              fresh_cache=True)
        pick = jax.nn.one_hot(prompt_lengths - 1, tokens.shape[1], dtype=hidden.dtype)
        last = jnp.einsum("bs,bsd->bd", pick, hidden)[:, None]  # [B,1,D]
    else:
        hidden, aux = forward(params, cfg, tokens, cache=cache, return_hidden=True)
        last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)
    cache = dict(aux["cache"], lengths=cache["lengths"] + prompt_lengths)
    return unembed(params, last, cfg)[:, 0], cache


def decode_step(params, cfg, cache, tokens):
    """One token per row: tokens [B] -> (logits [B, V], cache advanced by 1)."""
    logits, aux = forward(params, cfg, tokens[:, None], cache=cache)
    return logits[:, 0], aux["cache"]


def row_keys(seed: int, batch: int, row_seeds: Optional[Sequence[int]] = None,
             samples: int = 1) -> jax.Array:
    """One PRNG key per row: fold_in(key(seed), row_seeds[row]), the row index
    when row_seeds is None. samples > 1: each row repeated that many times
    (consecutively), sample j of a row folding in j as well when row_seeds
    are given (without them rows are numbered 0 .. batch * samples - 1)."""
    base = jax.random.key(seed)
    if samples > 1:
        if row_seeds is None:
            return row_keys(seed, batch * samples)
        per_row = row_keys(seed, batch, row_seeds)
        return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
            jnp.arange(samples, dtype=jnp.uint32)))(per_row).reshape(-1)
    if row_seeds is None:
        folds = np.arange(batch, dtype=np.uint32)
    else:
        folds = np.asarray(row_seeds)
        if folds.shape != (batch,) or not np.issubdtype(folds.dtype, np.integer) \
                or folds.min() < 0 or folds.max() >= 2 ** 32:
            raise InputError(f"row_seeds must be {batch} integers in [0, 2**32), one per "
                             f"prompt, got shape {folds.shape} of {folds.dtype}")
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(folds, jnp.uint32))


class _Loop(NamedTuple):
    step: jax.Array  # next output column
    state: object  # what step_fn advances (a KV cache, or a cache + encoder outputs)
    logits: jax.Array  # [B, V] next-token logits
    tokens: jax.Array  # [B, width] int32
    step_logits: Optional[jax.Array]  # [B, width, V] or None
    done: jax.Array  # [B] bool
    lengths: jax.Array  # [B] int32
    history: History  # what the logit processors read (jaxlm.infer.processors)
    guide: Optional[guided.GuideState] = None  # per-row automaton states (guided decoding)


def sampling_loop(step_fn, state, logits, keys, max_new_tokens, eos_id, *, width: int,
                  temperature: float, top_k: int, top_p: float, return_logits: bool,
                  min_p: float = 0.0, processors: Processors = Processors(),
                  history: Optional[History] = None,
                  guide: Optional[guided.GuideState] = None):
    """Sample from logits [B, V], feed the token to step_fn(state, tokens [B]) ->
    (logits, state), repeat: up to max_new_tokens (<= width) tokens per row, a
    row stopping after any of eos_id (a scalar or [E] int32, -1: unused). The
    logit processors (`processors`, reading `history`, which they need unless
    every processor is off) run before the sampler, the guide's mask
    (`jaxlm.infer.guided`) last, just before it. One `lax.while_loop`,
    traced once. Returns a dict of tokens [B, width] (PAD_ID after a row
    stopped), lengths [B], finished [B], logits ([B, width, V] raw model
    logits, or None) and the final state."""
    b = logits.shape[0]
    eos_ids = jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
    pick = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if history is None:
        if processors.needs_seen or processors.needs_counts or processors.no_repeat_ngram_size:
            raise ValueError("sampling_loop: these processors need a history (init_history)")
        history = History(jnp.zeros((b,), jnp.int32))

    def emit(loop: _Loop) -> _Loop:
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, loop.step)
        processed = apply_processors(processors, loop.logits, loop.history, loop.step, eos_ids)
        if loop.guide is not None:
            processed = guided.mask(loop.guide, processed, eos_ids, max_new_tokens - loop.step,
                                    raw=loop.logits)
        token = jnp.where(loop.done, PAD_ID, pick(processed, step_keys))
        tokens = jax.lax.dynamic_update_slice(loop.tokens, token[:, None], (0, loop.step))
        step_logits = loop.step_logits
        if return_logits:
            step_logits = jax.lax.dynamic_update_slice(
                step_logits, loop.logits[:, None], (0, loop.step, 0))
        return loop._replace(step=loop.step + 1, tokens=tokens, step_logits=step_logits,
                             done=loop.done | is_eos(token, eos_ids),
                             lengths=loop.lengths + (~loop.done),
                             history=push(processors, loop.history, token, ~loop.done),
                             guide=None if loop.guide is None else
                             guided.advance(loop.guide, token, ~loop.done))

    def body(loop: _Loop) -> _Loop:
        last = jax.lax.dynamic_index_in_dim(loop.tokens, loop.step - 1, axis=1, keepdims=False)
        logits, state = step_fn(loop.state, jnp.maximum(last, 0))
        return emit(loop._replace(logits=logits, state=state))

    def more(loop: _Loop):
        return (loop.step < max_new_tokens) & ~jnp.all(loop.done)

    loop = _Loop(step=jnp.int32(0), state=state, logits=logits,
                 tokens=jnp.full((b, width), PAD_ID, jnp.int32),
                 step_logits=jnp.zeros((b, width, logits.shape[-1]), jnp.float32)
                 if return_logits else None,
                 done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
                 history=history, guide=guide)
    loop = jax.lax.while_loop(more, body, emit(loop))
    return {"tokens": loop.tokens, "lengths": loop.lengths, "finished": loop.done,
            "logits": loop.step_logits, "state": loop.state}


@partial(jax.jit, static_argnames=("cfg", "width", "temperature", "top_k", "top_p", "min_p",
                                   "processors", "return_logits"), donate_argnames=("cache",))
def decode(params, cfg, cache, logits, keys, max_new_tokens, eos_id, *, width: int,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           return_logits: bool = False, min_p: float = 0.0,
           processors: Processors = Processors(), history: Optional[History] = None,
           guide: Optional[guided.GuideState] = None):
    """The decoder-only decode loop over the donated cache (see `sampling_loop`).
    Up to UNROLL_MAX_LAYERS layers, the stacked layer weights and the cache are
    split per layer once, outside the loop (`unstack_layers`, `split_layers`), and
    the cache restacked once after it: no step copies a layer's weights or cache
    out of a stack. The split weights' q|k|v and gate|up are concatenated there
    too (`fuse_projections`): one matmul each per step."""
    split = splits(params, cfg)
    if split:
        params, cache = decode_params(params, cfg), split_layers(cache)

    def step(cache, tokens):
        TRACE_COUNTS["decode_step"] += 1
        return decode_step(params, cfg, cache, tokens)

    out = sampling_loop(step, cache, logits, keys, max_new_tokens, eos_id, width=width,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        return_logits=return_logits, min_p=min_p, processors=processors,
                        history=history, guide=guide)
    out["cache"] = stack_layers(out.pop("state")) if split else out.pop("state")
    return out


def _unroll(params, cfg) -> bool:
    """Whether a decode loop runs its layers unrolled over per-layer weights split
    once before the loop (`unstack_layers`): up to UNROLL_MAX_LAYERS layers and
    UNROLL_MAX_BYTES of layer weights (the split is a copy: peak memory holds
    both while the loop runs)."""
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"]))
    return cfg.n_layers <= UNROLL_MAX_LAYERS and nbytes <= UNROLL_MAX_BYTES


def splits(params, cfg) -> bool:
    """Whether `decode_params` splits these params (stacked, within `_unroll`'s limit)."""
    return not isinstance(params["layers"], (list, tuple)) and _unroll(params, cfg)


def decode_params(params, cfg):
    """params as a decode loop reads them (`decode`, the paged engine): up to the
    unroll limit (`_unroll`), the layer weights split per layer and q|k|v, gate|up
    concatenated (`unstack_layers`, `fuse_projections`), so no step copies a
    layer's weights out of the stack; other params pass through."""
    return fuse_projections(unstack_layers(params), cfg) if splits(params, cfg) else params


def gather_cache(cache: dict, rows: jax.Array) -> dict:
    """Cache rows reordered along the batch axis: row i <- rows[i] (k, v [L, B, T, H, D],
    int8 scales [L, B, T, H], lengths [B])."""
    return {n: jnp.take(x, rows, axis=0 if n == "lengths" else 1) for n, x in cache.items()}


@partial(jax.jit, static_argnames=("cfg", "width", "num_beams", "n_candidates",
                                   "processors"))
def beam_decode(params, cfg, cache, logits, history, max_new_tokens, eos_ids, knobs, *,
                width: int, num_beams: int, n_candidates: int, processors: Processors):
    """Beam search from the cache of B prompts prefilled once, tiled here to
    B * num_beams rows (see `jaxlm.infer.beam`). Not donated: the tiled cache
    is a new buffer of another shape."""
    def step(cache, tokens):
        TRACE_COUNTS["beam_step"] += 1
        return decode_step(params, cfg, cache, tokens)

    tile = jnp.repeat(jnp.arange(logits.shape[0]), num_beams)
    return beam_loop(step, gather_cache, gather_cache(cache, tile), logits[tile],
                     gather_history(history, tile), max_new_tokens, eos_ids, knobs,
                     num_beams=num_beams, n_candidates=n_candidates, width=width,
                     processors=processors, pad_id=PAD_ID)


# ------------------------------------------------------------ host-side helpers

def _context_prefill(max_len: int) -> bool:
    """Whether generate's prefill rings (a context mesh is active): the prompts are
    then padded to the whole cache length, so that each device's prompt chunk is its
    own block of the seq-sharded cache (context parallelism is for prompts that fill
    most of the cache). A cache length that does not divide over the context axis is
    a one-line ConfigError."""
    from ..errors import ConfigError
    from ..sharding.context import context_size
    c = context_size()
    if c <= 1:
        return False
    if max_len % c:
        raise ConfigError(f"prefill under context parallelism: the cache length "
                          f"max_len={max_len} does not divide over mesh.context={c} "
                          f"(pass max_len=, a multiple of {c})")
    return True


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_bucket(n: int) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length())


def _cache_len(cfg, longest: int, max_new_tokens: int, max_len: Optional[int]) -> int:
    if max_len is None:
        return min(_round_up(longest + max_new_tokens, CACHE_BUCKET), cfg.max_seq_len)
    if int(max_len) != max_len or max_len < 1:
        raise InputError(f"max_len={max_len} must be a positive integer")
    if max_len > cfg.max_seq_len:
        raise InputError(f"max_len={max_len} is longer than model.max_seq_len={cfg.max_seq_len}")
    return int(max_len)


def _pad_prompts(rows, length: int):
    tokens = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32)


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    """Prompts as a list of 1-D int arrays, or a one-line InputError."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise InputError(f"prompts as an array must be 2-D [batch, length], got shape "
                             f"{tuple(prompts.shape)} (wrap a single prompt in a list)")
        prompts = list(np.asarray(prompts))
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise InputError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, p in enumerate(prompts):
        if np.isscalar(p):
            raise InputError(f"prompt {i} is a single value {p!r}, not a list of token ids "
                             "(wrap a single prompt in a list: [[...]])")
        try:
            r = np.asarray(p)
        except ValueError:
            raise InputError(f"prompt {i} must be a flat list of integer token ids") from None
        if r.size == 0:
            raise InputError(f"prompt {i} is empty: every prompt needs at least one token")
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
            raise InputError(f"prompt {i} must be a flat list of integer token ids, "
                             f"got {r.dtype} with shape {r.shape}")
        bad = np.flatnonzero((r < 0) | (r >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise InputError(f"prompt {i} has token id {int(r[j])} at position {j}, "
                             f"outside [0, {vocab_size}) (model.vocab_size={vocab_size})")
        rows.append(r.astype(np.int32))
    return rows


def _check_args(cfg, max_new_tokens, temperature, top_k, top_p, eos_id) -> None:
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens \
            or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be an integer >= 1")
    check_sampling(temperature, top_k, top_p)
    eos_array(eos_id, cfg.vocab_size)  # an id or a list of ids, each in the vocabulary


def _check_guides(guide, n_prompts: int, eos_id, beams, max_new_tokens: int):
    """guide (one Guide, a list with one per prompt, or None) -> a list per prompt or None."""
    if guide is None:
        return None
    guides = list(guide) if isinstance(guide, (list, tuple)) and not isinstance(
        guide, guided.Guide) else [guide] * n_prompts
    if len(guides) != n_prompts:
        raise InputError(f"guide: {len(guides)} guides for {n_prompts} prompts (give one "
                         "per prompt, None for unconstrained rows)")
    for i, g in enumerate(guides):
        if g is not None and not isinstance(g, guided.Guide):
            raise InputError(f"guide {i} is a {type(g).__name__}, not a "
                             "jaxlm.infer.guided.Guide (Guide.regex / .json_schema / .choice)")
    if all(g is None for g in guides):
        return None
    if beams:
        raise InputError("guided decoding (regex / JSON schema / choice) is not supported "
                         "with beam search (num_beams > 1)")
    if eos_id is None:
        raise InputError("guided decoding needs eos_id: a guided row ends with a stop id")
    for i, g in enumerate(guides):
        if g is not None and int(g.dist[0]) + 1 > max_new_tokens:
            raise InputError(f"guide {i} ({g.description}) needs at least {int(g.dist[0]) + 1} "
                             f"tokens (EOS included), more than max_new_tokens={max_new_tokens}")
    return guides


def _check_fits(rows, max_new_tokens: int, max_len: int, cfg) -> None:
    for i, r in enumerate(rows):
        if len(r) + max_new_tokens > max_len:
            raise InputError(
                f"prompt {i} has {len(r)} tokens + max_new_tokens={max_new_tokens} = "
                f"{len(r) + max_new_tokens}, longer than the cache (max_len={max_len}, "
                f"model.max_seq_len={cfg.max_seq_len})")
