"""`jaxlm.generate` on token ids: every prompt through the one engine (`jaxlm.infer.engine`).

    out = generate(params, cfg, [[5, 7, 9], [3, 4]], max_new_tokens=64, eos_id=2)
    out.tokens       # np.int32 [B, max_new_tokens], PAD_ID (-1) after a row stopped
    out.lengths      # np.int32 [B]: tokens generated per row, EOS included
    out.sequences()  # list of lists of generated ids, EOS excluded
    for ev in generate(params, cfg, prompts, max_new_tokens=64, stream=True): ...

The decoding settings are one value (`jaxlm.config.GenerateConfig`): the keyword
arguments here are its keys. The engine runs them over a contiguous cache when the
whole batch is admitted at once (`cache="auto"`: the case where it is faster than
the paged pool per step, BENCHMARKS.md) or over a paged pool (`cache="paged"`,
also when there are more sequences than `slots`). Row r samples with
`fold_in(fold_in(key(seed), r), step)` (r: the prompt's index or `row_seeds[r]`;
sample j of n folds in j on top): deterministic per seed, and independent of the
other rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np

from ..errors import InputError
from . import guided
from .engine import PAD_ID, Engine, Features, bucket, pow2
from .processors import check_processors, count_eos, eos_array
from .sampling import check_sampling

CACHE_BUCKET = 128
MAX_SLOTS = 256  # cache="auto": a contiguous cache up to this many sequences at once


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_new_tokens]; PAD_ID after a row stopped
    lengths: np.ndarray  # int32 [B]: generated tokens per row, EOS included
    finished: np.ndarray  # bool [B]: the row stopped because it emitted a stop id
    logits: Optional[np.ndarray] = None  # f32 [B, max_new_tokens, V] with return_logits
    scores: Optional[np.ndarray] = None  # f32 [B * R]: beam search's sequence scores
    stats: Optional[dict] = None  # speculative decoding: drafted / accepted counts
    texts: Optional[list] = None  # jaxlm.generate(..., tokenizer=tok): each row's new text
    logprobs: Optional[np.ndarray] = None  # f32 [B, max_new_tokens] with logprobs=True

    def sequences(self, include_eos: bool = False) -> list[list[int]]:
        """Generated ids per row; the final EOS is dropped unless include_eos."""
        out = []
        for row, n, eos in zip(self.tokens, self.lengths, self.finished):
            n = int(n) - (1 if eos and not include_eos else 0)
            out.append([int(t) for t in row[:n]])
        return out


class StreamEvent(NamedTuple):
    """`generate(..., stream=True)`: new tokens of output row `row` (b * n + r)."""
    row: int
    tokens: list
    finish_reason: Optional[str]  # "stop" | "length" on the row's last event
    text: Optional[str] = None  # with a tokenizer: the new text


def settings_of(**kw):
    """The GenerateConfig of generate's keyword arguments (a bad value: its one-line
    ConfigError, naming the generate.* key)."""
    from ..config import GenerateConfig
    return GenerateConfig(**kw)


def generate(params, cfg, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id=None,
             max_len: Optional[int] = None, return_logits: bool = False,
             decoder_start_id: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping=False,
             num_return_sequences: int = 1,
             row_seeds: Optional[Sequence[int]] = None, guide=None,
             kv_dtype: str = "auto", logprobs: bool = False, stream: bool = False,
             cache: str = "auto", slots: Optional[int] = None, page_size: int = 16,
             draft=None, num_speculative: Optional[int] = None, stop: Sequence[str] = (),
             detokenize=None, engine_options: Optional[dict] = None,
             prefix_cache: bool = True):
    """Continue each prompt (a list of token-id lists, or a 2-D int array) by up to
    max_new_tokens tokens; a row stops after emitting eos_id (an id, or a list
    of stop ids: any of them stops the row).

    max_len: cache length (default: longest prompt + max_new_tokens rounded up
    to a multiple of 128, capped at cfg.max_seq_len). return_logits: also
    return the [B, max_new_tokens, V] raw next-token logits of every step
    (tests, debugging: it is B * max_new_tokens * V floats; not with beams);
    logprobs: each token's log-probability under the raw logits [B, max_new_tokens].
    Encoder-decoder models (T5): the prompts are the encoder inputs, the
    decoder starts from decoder_start_id (T5: pad = 0).

    Logit processors (Hugging Face semantics and order, all inside the loop):
    repetition_penalty (prompt + generated tokens), presence_penalty and
    frequency_penalty (OpenAI semantics over the generated tokens only),
    no_repeat_ngram_size (prompt + generated), min_new_tokens (stop ids masked
    before that), then the sampler: temperature, top_k, top_p, min_p.

    num_beams > 1: beam search as transformers' (greedy only: temperature 0),
    with length_penalty, early_stopping (True, False or "never") and
    num_return_sequences (<= num_beams) hypotheses per prompt, best first:
    output row b * num_return_sequences + r, its score in `out.scores`.
    Sampling with num_return_sequences > 1 draws that many samples per prompt,
    prefilled once (a paged cache shares the prompt's pages).

    row_seeds: one int per prompt; row r then samples with fold_in(key(seed),
    row_seeds[r]) instead of its index r, so that its output does not depend on
    which batch (or position) it is in.

    guide: a `jaxlm.infer.guided.Guide` (regex, JSON schema, choice) for every
    prompt, or a list with one per prompt (None: unconstrained). Guided rows
    only emit tokens their automaton allows, a stop id only once the text
    matches, and always finish (with a stop id) within max_new_tokens; needs
    eos_id. Not with beams or speculative decoding.

    draft: (params, cfg) of a draft decoder over the same vocabulary: speculative
    decoding, num_speculative drafts per cycle (default 4; greedy output equals the
    target's own greedy output); `out.stats` holds the drafted / accepted counts.
    draft="mtp": self-speculation, the model's own multi-token prediction modules draft
    (model.mtp_depth > 0; num_speculative <= model.mtp_depth, default all of them).

    kv_dtype: "auto" (the model's compute dtype), "int8", "int4" or "fp8" (per-token,
    per-head scales; encoder-decoders: the cross K/V too). cache: "auto" (contiguous when
    every sequence fits `slots` at once, else paged), "contiguous" or "paged";
    slots: sequences decoded together (default: all of them, up to 256).
    stop: stop strings (with detokenize(ids) -> str): a row ends once its text
    holds one. stream=True: an iterator of StreamEvent, each row's tokens as they
    are produced; the engine frees a row's slots when the iterator is closed.
    prefix_cache: a paged engine reuses the pages of prompt prefixes already in its
    pool (the outputs are the same either way).
    """
    from ..validate import check_lm_head, check_model_args
    check_model_args(params, cfg, "generate")
    if cfg.family == "encoder":
        raise InputError("encoders do not generate text; use jaxlm.forward (masked-LM logits) "
                         "or jaxlm.embed (sentence vectors)")
    check_lm_head(cfg, "generate")
    rows = _check_prompts(prompts, cfg.vocab_size)
    budgets = _budgets(max_new_tokens, len(rows))
    check_sampling(temperature, top_k, top_p, min_p)
    eos_array(eos_id, cfg.vocab_size)
    eos = _eos_tuple(eos_id)
    check_processors(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                     frequency_penalty=frequency_penalty,
                     no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens)
    beams = check_beams(temperature=temperature, return_logits=return_logits,
                        num_beams=num_beams, length_penalty=length_penalty,
                        early_stopping=early_stopping,
                        num_return_sequences=num_return_sequences)
    guides = _check_guides(guide, len(rows), eos_id, beams, min(budgets))
    if draft is not None:
        num_speculative = _num_speculative(cfg, draft, num_speculative)
        _check_draft(cfg, draft, num_speculative, beams, guides,
                     dict(min_p=min_p, repetition_penalty=repetition_penalty,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size,
                          min_new_tokens=min_new_tokens, num_return_sequences=num_return_sequences,
                          kv_dtype=kv_dtype))
    if not 0 <= decoder_start_id < cfg.vocab_size:
        raise InputError(f"decoder_start_id={decoder_start_id} is outside [0, {cfg.vocab_size})")
    if row_seeds is not None:
        seeds = np.asarray(row_seeds)
        if seeds.shape != (len(rows),) or not np.issubdtype(seeds.dtype, np.integer) \
                or seeds.min() < 0 or seeds.max() >= 2 ** 32:
            raise InputError(f"row_seeds must be {len(rows)} integers in [0, 2**32), one per "
                             f"prompt, got shape {seeds.shape} of {seeds.dtype}")
    base = settings_of(max_new_tokens=max(budgets), temperature=float(temperature),
                       top_k=int(top_k), top_p=float(top_p), seed=int(seed), min_p=float(min_p),
                       repetition_penalty=float(repetition_penalty),
                       presence_penalty=float(presence_penalty),
                       frequency_penalty=float(frequency_penalty),
                       no_repeat_ngram_size=int(no_repeat_ngram_size),
                       min_new_tokens=int(min_new_tokens), num_beams=int(num_beams),
                       length_penalty=float(length_penalty), early_stopping=early_stopping,
                       num_return_sequences=int(num_return_sequences), kv_dtype=kv_dtype,
                       stop=stop, prefix_cache=bool(prefix_cache))
    import dataclasses
    per_row = [base if m == base.max_new_tokens else dataclasses.replace(base, max_new_tokens=m)
               for m in budgets]
    longest = max(len(r) for r in rows)
    seq2seq = cfg.family == "encoder_decoder"
    span = _span(cfg, longest, max(budgets), max_len, seq2seq)
    if not seq2seq:
        for i, (r, m) in enumerate(zip(rows, budgets)):
            if len(r) + m > span:
                raise InputError(
                    f"prompt {i} has {len(r)} tokens + max_new_tokens={m} = {len(r) + m}, "
                    f"longer than the cache (max_len={span}, model.max_seq_len="
                    f"{cfg.max_seq_len})")
    width = base.num_beams if base.num_beams > 1 else base.num_return_sequences
    n_seq = len(rows) * width
    if slots is None:
        slots = min(n_seq, MAX_SLOTS)
        slots = max(width, slots // width * width)
    if cache == "auto":
        cache = "contiguous" if n_seq <= slots and _context_ok(span) else "paged"
    feats = Features.of([base], cfg.vocab_size, guided=guides is not None,
                        beams=base.num_beams if base.num_beams > 1 else 0,
                        speculative=int(num_speculative) if draft is not None else 0,
                        mtp=draft == "mtp",
                        logprobs=bool(logprobs), return_logits=bool(return_logits),
                        stops=max(4, pow2(len(eos), 1)))
    options = {k: v for k, v in (engine_options or {}).items() if v is not None}
    if cache == "contiguous" and n_seq <= slots and not stream:
        # every sequence admitted at once: one round trip runs them to the end (a round
        # trip splits and restacks the cache per layer once), which splits the weights
        # per layer inside its program too
        options.setdefault("steps_per_call", max(budgets) + 1)
        options.setdefault("presplit", False)
    engine = Engine(params, cfg, settings=base, max_prompt_len=longest,
                    max_new_tokens=max(budgets), slots=slots, cache=cache, page_size=page_size,
                    max_len=span, features=feats, draft=draft, detokenize=detokenize,
                    decoder_start_id=decoder_start_id,
                    guides=[g for g in (guides or []) if g is not None], **options)
    reqs = [engine.add(r, per_row[i], guide=None if guides is None else guides[i],
                       row_seed=i if row_seeds is None else int(row_seeds[i]), eos_ids=eos)
            for i, r in enumerate(rows)]
    if engine_options is not None and "engine" in engine_options:
        engine_options["engine"] = engine  # tests: the engine's counters and pool
    if stream:
        return _stream(engine, reqs, width)
    engine.run()
    return _output(engine, reqs, width, max(budgets), bool(return_logits), bool(logprobs))


def _stream(engine: Engine, reqs, n: int):
    """The engine's events as StreamEvents (row = request index * n + output); closing
    the iterator early cancels what is still running (its slots and pages freed)."""
    try:
        for ev in engine.stream():
            o = ev.request.outputs[ev.sample]
            yield StreamEvent(ev.request.index * n + ev.sample, ev.tokens, ev.finish_reason,
                              o.text if ev.finish_reason is not None else None)
    finally:
        for r in reqs:
            engine.cancel(r)


def _output(engine: Engine, reqs, n: int, width: int, return_logits: bool,
            logprobs: bool) -> GenerateOutput:
    outs = [o for r in reqs for o in r.outputs]
    tokens = np.full((len(outs), width), PAD_ID, np.int32)
    lengths = np.zeros(len(outs), np.int32)
    finished = np.zeros(len(outs), bool)
    logits = np.zeros((len(outs), width, engine.cfg.vocab_size), np.float32) \
        if return_logits else None
    lps = np.zeros((len(outs), width), np.float32) if logprobs else None
    for i, o in enumerate(outs):
        t = o.tokens[:width]
        tokens[i, :len(t)], lengths[i], finished[i] = t, len(t), o.stopped_by_id
        if logits is not None and o.logits is not None:
            logits[i, :len(o.logits)] = o.logits[:width]
        if lps is not None and o.logprobs is not None:
            lps[i, :len(o.logprobs)] = o.logprobs[:width]
    scores = np.asarray([o.score for o in outs], np.float32) if engine.feats.beams else None
    stats = None
    if engine.feats.speculative:
        drafted, accepted = (int(x) for x in jax.device_get(engine.state.spec))
        stats = {"cycles": engine.stats["steps"], "drafted": drafted, "accepted": accepted,
                 "acceptance_rate": accepted / drafted if drafted else 0.0}
    texts = [o.text for o in outs] if engine.detokenize is not None else None
    return GenerateOutput(tokens, lengths, finished, logits, scores, stats, texts, lps)


# ------------------------------------------------------------ host-side checks

def _context_ok(span: int) -> bool:
    """Under a context mesh the contiguous cache's length must divide over it (the
    prefill rings: prompts padded to the cache length, each device's chunk its own
    block of the seq-sharded cache); otherwise a one-line ConfigError."""
    from ..errors import ConfigError
    from ..sharding.context import context_size
    c = context_size()
    if c > 1 and span % c:
        raise ConfigError(f"prefill under context parallelism: the cache length "
                          f"max_len={span} does not divide over mesh.context={c} "
                          f"(pass max_len=, a multiple of {c})")
    return True


def _span(cfg, longest: int, max_new_tokens: int, max_len: Optional[int], seq2seq: bool) -> int:
    """The cache length: max_len, or (decoders) longest prompt + max_new_tokens
    rounded up to 128 and capped at model.max_seq_len; (encoder-decoders) the
    decoder's max_new_tokens rounded up to 128."""
    if max_len is not None:
        if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 1:
            raise InputError(f"max_len={max_len} must be a positive integer")
        if seq2seq and max_len < max_new_tokens:
            raise InputError(f"max_len={max_len} must be an integer >= max_new_tokens="
                             f"{max_new_tokens}")
        if not seq2seq and max_len > cfg.max_seq_len:
            raise InputError(f"max_len={max_len} is longer than model.max_seq_len="
                             f"{cfg.max_seq_len}")
        return int(max_len)
    if seq2seq:
        return bucket(max_new_tokens, CACHE_BUCKET)
    return min(bucket(longest + max_new_tokens, CACHE_BUCKET), cfg.max_seq_len)


def _eos_tuple(eos_id) -> tuple:
    if eos_id is None:
        return ()
    ids = [eos_id] if np.ndim(eos_id) == 0 else list(eos_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _budgets(max_new_tokens, n: int) -> list[int]:
    values = [max_new_tokens] * n if np.isscalar(max_new_tokens) else list(max_new_tokens)
    if len(values) != n:
        raise InputError(f"max_new_tokens: {len(values)} values for {n} prompts (give one "
                         "int, or one per prompt)")
    for i, m in enumerate(values):
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise InputError(f"max_new_tokens={m} must be an integer >= 1" +
                             (f" (prompt {i})" if not np.isscalar(max_new_tokens) else ""))
    return [int(m) for m in values]


def check_beams(*, temperature, return_logits, num_beams, length_penalty, early_stopping,
                num_return_sequences) -> bool:
    """Whether this is beam search (num_beams > 1), or a one-line InputError."""
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
        return False
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
    return True


def _num_speculative(cfg, draft, k):
    """num_speculative as given, or its default: 4 drafts, model.mtp_depth with draft="mtp"."""
    if isinstance(draft, str):
        if draft != "mtp":
            raise InputError(f"draft={draft!r} must be (params, cfg) of a draft model or 'mtp' "
                             "(the model's own multi-token prediction modules)")
        if not cfg.mtp_depth:
            raise InputError("draft='mtp' needs a model with multi-token prediction modules "
                             "(model.mtp_depth > 0); this one has none")
        k = cfg.mtp_depth if k is None else k
        if isinstance(k, int) and not isinstance(k, bool) and k > cfg.mtp_depth:
            raise InputError(f"num_speculative={k} is more than model.mtp_depth="
                             f"{cfg.mtp_depth}: with draft='mtp' module j drafts token j")
        return k
    return 4 if k is None else k


def _check_draft(cfg, draft, k, beams: bool, guides, options: dict) -> None:
    dparams, dcfg = (None, cfg) if draft == "mtp" else draft
    for name, c in (("target", cfg), ("draft", dcfg)):
        if c.family != "decoder":
            raise InputError(f"speculative decoding needs decoder models; the {name} is "
                             f"{c.family!r}")
    if dcfg.vocab_size != cfg.vocab_size:
        raise InputError(f"the draft's vocabulary ({dcfg.vocab_size} tokens) differs from "
                         f"the target's ({cfg.vocab_size}): speculative decoding needs one "
                         "shared vocabulary")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"num_speculative={k} must be an integer >= 1")
    off = dict(min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
               no_repeat_ngram_size=0, min_new_tokens=0, num_return_sequences=1,
               kv_dtype="auto")
    for key, value in options.items():
        if value != off[key]:
            raise InputError(f"generate.{key} is not supported with speculative decoding "
                             f"(it is {value!r})")
    if beams or guides is not None:
        raise InputError("speculative decoding does not combine with beam search or guides")


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
                kv_dtype=g.kv_dtype, stop=g.stop, prefix_cache=g.prefix_cache)


__all__ = ["generate", "GenerateOutput", "StreamEvent", "PAD_ID", "generate_kwargs",
           "count_eos"]


def generate_many(params, cfg, prompts, *, max_new_tokens, slots: int = 8,
                  page_size: int = 16, n_pages: Optional[int] = None,
                  steps_per_call: int = 32, refill_batch: Optional[int] = None,
                  on_refill=None, **kwargs) -> GenerateOutput:
    """`generate` with continuous batching over a paged pool of `slots` slots: each
    prompt its own max_new_tokens (an int, or one per prompt), a finished slot
    refilled with the next prompt (`jaxlm.infer.engine`). on_refill(info): the pool's
    accounting after each admission (pages_in_use, pages_needed, table, live, ...)."""
    return generate(params, cfg, prompts, max_new_tokens=max_new_tokens, cache="paged",
                    slots=slots, page_size=page_size,
                    engine_options=dict(n_pages=n_pages, steps_per_call=steps_per_call,
                                        refill_batch=refill_batch, on_refill=on_refill),
                    **kwargs)
