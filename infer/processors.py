"""Logit processors with Hugging Face semantics, applied inside the compiled decode loop.

    proc = Processors(repetition_penalty=1.1, no_repeat_ngram_size=3, min_new_tokens=8)
    hist = init_history(proc, prompt_tokens, prompt_lengths, vocab_size, width)
    logits = apply(proc, logits, hist, n_new, eos_ids)   # [R, V] -> [R, V]
    hist = push(proc, hist, token, live)                  # after sampling

`Processors` is a frozen (hashable) settings record, a static argument of the
jitted loops; `History` is the loop-carried pytree the processors read:

* `seen` [R, V] bool: the token occurs in the prompt or the generated text
  (repetition penalty, as HF: prompt + generated);
* `counts` [R, V] int32: occurrences among the *generated* tokens only
  (presence / frequency penalties, OpenAI / vLLM semantics: the prompt does
  not count);
* `tokens` [R, P + width] int32 with `length` [R]: prompt + generated ids
  (n-gram bans, over prompt + generated as HF).

Each is allocated only when a processor needs it. Order (HF's
`_get_logits_processor`): repetition penalty, then presence / frequency
(not in HF; vLLM applies them after the repetition penalty too), then
no-repeat-ngram, then min-new-tokens; the warpers (temperature, top-k,
top-p, min-p) follow in `jaxlm.infer.sampling.sample`. For encoder-decoder
models the "prompt" is the decoder's start id, as HF's decoder input ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..errors import InputError


@dataclass(frozen=True)
class Processors:
    """The processors' settings of a call that gives every row the same ones."""
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already seen
    presence_penalty: float = 0.0  # logits - presence * (count > 0), generated tokens
    frequency_penalty: float = 0.0  # logits - frequency * count, generated tokens
    no_repeat_ngram_size: int = 0  # 0: off; bans any n-gram from occurring twice
    min_new_tokens: int = 0  # EOS ids masked until this many tokens were generated

    def shape(self) -> "ProcessorShape":
        return ProcessorShape.of([self])

    def rows(self, n: int) -> "Penalties":
        return Penalties.of(n, self)


@dataclass(frozen=True)
class ProcessorShape:
    """Which processors a compiled step runs (static), for rows that each carry their
    own values (`Penalties`): the history they need is allocated only when on."""
    seen: bool = False  # repetition penalty: [R, V] seen in prompt or output
    counts: bool = False  # presence / frequency: [R, V] counts of generated tokens
    ngram: int = 0  # the largest no_repeat_ngram_size: prompt + generated ids kept
    min_new: bool = False  # min_new_tokens

    @classmethod
    def of(cls, settings) -> "ProcessorShape":
        """settings: objects with the Processors fields (GenerateConfig, Processors)."""
        settings = list(settings)
        return cls(any(s.repetition_penalty != 1.0 for s in settings),
                   any(s.presence_penalty != 0.0 or s.frequency_penalty != 0.0
                       for s in settings),
                   max((s.no_repeat_ngram_size for s in settings), default=0),
                   any(s.min_new_tokens > 0 for s in settings))

    @property
    def any(self) -> bool:
        return self.seen or self.counts or bool(self.ngram) or self.min_new


class Penalties(NamedTuple):
    """Per-row processor values [R] (traced)."""
    repetition: jax.Array  # f32, 1 = off
    presence: jax.Array  # f32
    frequency: jax.Array  # f32
    ngram: jax.Array  # i32, 0 = off
    min_new: jax.Array  # i32, 0 = off

    @classmethod
    def of(cls, n: int, s) -> "Penalties":
        return cls.stack([s] * n)

    @classmethod
    def stack(cls, settings) -> "Penalties":
        """One row per settings object (GenerateConfig or Processors)."""
        col = lambda name, dt: jnp.asarray([getattr(s, name) for s in settings], dt)  # noqa
        return cls(col("repetition_penalty", jnp.float32), col("presence_penalty", jnp.float32),
                   col("frequency_penalty", jnp.float32), col("no_repeat_ngram_size", jnp.int32),
                   col("min_new_tokens", jnp.int32))


def check_processors(*, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                     no_repeat_ngram_size=0, min_new_tokens=0) -> Processors:
    """Validated settings, or a one-line InputError naming the argument."""
    if isinstance(repetition_penalty, bool) or not repetition_penalty > 0 \
            or not math.isfinite(repetition_penalty):
        raise InputError(f"repetition_penalty={repetition_penalty} must be a finite number > 0 "
                         "(1 = off)")
    for name, v in (("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        if isinstance(v, bool) or not -2.0 <= v <= 2.0:
            raise InputError(f"{name}={v} must be in [-2, 2] (0 = off)")
    for name, v in (("no_repeat_ngram_size", no_repeat_ngram_size),
                    ("min_new_tokens", min_new_tokens)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise InputError(f"{name}={v} must be an integer >= 0 (0 = off)")
    return Processors(float(repetition_penalty), float(presence_penalty),
                      float(frequency_penalty), int(no_repeat_ngram_size), int(min_new_tokens))


def eos_array(eos_id, vocab_size: int) -> jax.Array:
    """eos_id (None, an int or a list of ints) -> int32 [E], padded with -1 to a
    power of two >= 4 (so that 1..4 stop ids share one compiled loop)."""
    ids = [] if eos_id is None else [eos_id] if _is_int(eos_id) else list(eos_id)
    for i in ids:
        if not _is_int(i) or not 0 <= i < vocab_size:
            raise InputError(f"eos_id={i!r} is outside [0, {vocab_size}) "
                             f"(model.vocab_size={vocab_size})")
    size = max(4, 1 << max(len(ids) - 1, 0).bit_length())
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def count_eos(eos_id) -> int:
    return 0 if eos_id is None else 1 if _is_int(eos_id) else len(set(eos_id))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or hasattr(x, "dtype") and \
        jnp.issubdtype(getattr(x, "dtype"), jnp.integer) and getattr(x, "ndim", 0) == 0


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """tokens [...] int32, eos_ids [E] or per row [R, E] (-1 = unused) -> bool [...]."""
    return jnp.any((tokens[..., None] == eos_ids) & (eos_ids >= 0), axis=-1)


class History(NamedTuple):
    length: jax.Array  # [R] int32: prompt + generated tokens so far
    seen: Optional[jax.Array] = None  # [R, V] bool: in the prompt or generated
    counts: Optional[jax.Array] = None  # [R, V] int32: occurrences among generated tokens
    tokens: Optional[jax.Array] = None  # [R, P + width] int32: prompt + generated ids


def init_history(shape: ProcessorShape, prompt_tokens, prompt_lengths, vocab_size: int,
                 width: int) -> History:
    """Right-padded prompts [R, P] with lengths [R] -> the history before the first token."""
    r, p = prompt_tokens.shape
    valid = jnp.arange(p)[None] < prompt_lengths[:, None]  # [R, P]
    rows = jnp.arange(r)[:, None]
    seen = counts = tokens = None
    if shape.seen:
        seen = jnp.zeros((r, vocab_size), bool).at[rows, prompt_tokens].max(valid)
    if shape.counts:
        counts = jnp.zeros((r, vocab_size), jnp.int32)
    if shape.ngram:
        tokens = jnp.concatenate([jnp.where(valid, prompt_tokens, 0).astype(jnp.int32),
                                  jnp.zeros((r, width), jnp.int32)], axis=1)
    return History(jnp.asarray(prompt_lengths, jnp.int32), seen, counts, tokens)


def push(hist: History, token: jax.Array, live: jax.Array) -> History:
    """Append token [R] to the rows where live [R] (a stopped row's history stays)."""
    rows = jnp.arange(token.shape[0])
    tok = jnp.maximum(token, 0)
    seen, counts, tokens = hist.seen, hist.counts, hist.tokens
    if seen is not None:
        seen = seen.at[rows, tok].max(live)
    if counts is not None:
        counts = counts.at[rows, tok].add(live.astype(jnp.int32))
    if tokens is not None:
        tokens = tokens.at[rows, hist.length].set(jnp.where(live, tok, tokens[rows, hist.length]),
                                                  mode="drop")
    return History(hist.length + live.astype(jnp.int32), seen, counts, tokens)


def gather(hist: History, index: jax.Array) -> History:
    """Rows reordered: row i of the result is row index[i] (beam search)."""
    return jax.tree.map(lambda a: jnp.take(a, index, axis=0), hist)


def apply(shape: ProcessorShape, logits: jax.Array, hist: History, pen: Penalties, n_new,
          eos_ids) -> jax.Array:
    """Processed logits [R, V] (f32) for the next token, each row by its own values;
    n_new: tokens generated so far (a scalar or [R]); eos_ids [E] or [R, E]."""
    logits = logits.astype(jnp.float32)
    col = lambda x: jnp.asarray(x)[:, None]  # noqa: E731  [R] -> [R, 1]
    if shape.seen:  # HF RepetitionPenaltyLogitsProcessor
        penalised = jnp.where(logits < 0, logits * col(pen.repetition),
                              logits / col(pen.repetition))
        logits = jnp.where(hist.seen, penalised, logits)
    if shape.counts:  # OpenAI presence / frequency penalties
        logits = (logits - col(pen.presence) * (hist.counts > 0)
                  - col(pen.frequency) * hist.counts)
    if shape.ngram:
        logits = jnp.where(ngram_bans(hist.tokens, hist.length, pen.ngram, shape.ngram,
                                      logits.shape[-1]), -jnp.inf, logits)
    if shape.min_new:  # HF MinNewTokensLengthLogitsProcessor
        vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        eos = jnp.asarray(eos_ids)
        vocab_is_eos = is_eos(vocab[None] if eos.ndim == 1 else
                              jnp.broadcast_to(vocab, logits.shape), eos if eos.ndim == 1 else
                              eos[:, None, :])  # [1 or R, V]
        early = jnp.asarray(n_new) < pen.min_new  # [R]
        logits = jnp.where(vocab_is_eos & early[:, None], -jnp.inf, logits)
    return logits


def ngram_bans(tokens: jax.Array, length: jax.Array, n: jax.Array, n_max: int,
               vocab_size: int) -> jax.Array:
    """HF NoRepeatNGramLogitsProcessor: tokens [R, H] (valid up to length [R]), each
    row's n-gram size n [R] (0: off; at most the static n_max) -> banned [R, V] bool:
    the tokens that would complete an n-gram already present.

    The window starting at i bans tokens[i + n - 1] when its first n - 1 tokens
    equal the last n - 1 tokens; only complete windows (i + n <= length) count.
    """
    r, h = tokens.shape
    n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), (r,))
    padded = jnp.pad(tokens, ((0, 0), (0, n_max)))
    rows = jnp.arange(r)[:, None]
    starts = jnp.arange(h)[None]  # [1, H] window starts
    match = (starts + n[:, None] <= length[:, None]) & (n[:, None] >= 1)
    for j in range(n_max - 1):
        active = j < n - 1  # [R]: the row's prefix is longer than j
        prefix_j = tokens[rows[:, 0], jnp.clip(length - (n - 1) + j, 0, h - 1)]  # [R]
        match &= ~active[:, None] | (padded[:, j:j + h] == prefix_j[:, None])
    banned = jnp.take_along_axis(padded, starts + jnp.maximum(n - 1, 0)[:, None], axis=1)
    return jnp.zeros((r, vocab_size), bool).at[rows, banned].max(match)
