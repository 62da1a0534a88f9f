"""Encoder-decoder generation: encode once, then one compiled decode loop.

    out = generate_seq2seq(params, cfg, [[5, 7, 9], [3, 4]], max_new_tokens=32, eos_id=1)
    out.tokens / out.lengths / out.finished / out.sequences()   # as jaxlm.generate

Two jitted functions, `cfg` and the sampler settings static:

* `start(params, cfg, tokens, segment_ids, cache_len, decoder_start_id, kv_dtype)`:
  runs the encoder once on the right-padded inputs [B, S] (segment ids 1 / 0 =
  padding), projects the cross-attention keys/values of every decoder layer
  once ([L, B, S, H, D], kept for the whole loop), allocates the decoder's
  self-attention KV cache [L, B, cache_len, H, D] and feeds the start id
  (T5: pad = 0); returns the first next-token logits and the state.
  kv_dtype="int8": both the self-attention cache and the cross K/V are int8
  with per-token, per-head float32 scales (jaxlm.infer.cache): the cross K/V
  are read on every step and, for inputs longer than the output, are the larger
  of the two, so they are quantized too (once, after the projection).
* `decode(...)`: the shared sampling `lax.while_loop` (`infer.generate.sampling_loop`),
  writes the token, feeds it back through the cached decoder (self-attention
  over the cache, cross-attention over the cached encoder K/V) and stops when
  every row has emitted eos_id or max_new_tokens is reached. The state is
  donated; `max_new_tokens` and `eos_id` are traced values.

Shapes are bucketed like `jaxlm.generate` (inputs to a power of two >= 16,
output width to a multiple of 64, cache to a multiple of 128), and row r
samples with fold_in(fold_in(key(seed), r), step), so sampled runs are
reproducible and independent of the other rows.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .beam import beam_knobs, beam_loop
from .cache import cache_shapes, check_kv_dtype, constrain_cache
from .generate import (CACHE_BUCKET, PAD_ID, WIDTH_BUCKET, GenerateOutput,
                                  _check_args, _check_prompts, _prompt_bucket, _round_up,
                                  beam_settings, check_decoding, fetch_beams, fetch_output,
                                  gather_cache, row_keys, sampling_loop)
from .processors import (History, Processors, eos_array, gather as gather_history,
                                    init_history)
from ..model.config import dtype_of
from ..model.families.encoder_decoder import cross_kv, decode as decode_tokens, \
    decoder_layers, encode

# Python-side trace counters (incremented while tracing): tests check that the
# decode step is compiled once.
TRACE_COUNTS = {"start": 0, "decode_step": 0, "beam_step": 0}


class Seq2SeqState(NamedTuple):
    cache: dict  # decoder self-attention: k, v [L,B,T,KVH,D], lengths [B] (+ int8 scales)
    cross: dict  # cross-attention k, v [L,B,S,KVH,D] (+ int8 k_scale, v_scale [L,B,S,KVH])
    segment_ids: jax.Array  # [B,S] encoder padding (0)


def generate_seq2seq(params, cfg, inputs, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     eos_id=None, decoder_start_id: int = 0,
                     max_len: Optional[int] = None, return_logits: bool = False,
                     min_p: float = 0.0, repetition_penalty: float = 1.0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
                     num_beams: int = 1, length_penalty: float = 1.0, early_stopping=False,
                     num_return_sequences: int = 1, row_seeds=None,
                     kv_dtype: str = "auto") -> GenerateOutput:
    """Generate up to max_new_tokens decoder tokens for each input (a list of
    token-id lists, or a 2-D int array); a row stops after emitting eos_id (an
    id or a list of ids).

    decoder_start_id: the first decoder input (T5: the pad id, 0). max_len:
    decoder cache length (default max_new_tokens rounded up to 128; relative
    positions have no length limit). return_logits: also return the
    [B, max_new_tokens, V] next-token logits of every step. The logit
    processors and beam search are `jaxlm.generate`'s; the processors see the
    decoder's tokens (the start id + generated, as HF's decoder_input_ids).
    With beams the encoder runs once per input; its K/V are tiled to the beams.
    kv_dtype: "auto" (the model's dtype) or "int8" (the decoder's cache and the
    cross K/V, per-token, per-head scales; see the module docstring).
    """
    if cfg.family != "encoder_decoder":
        raise InputError(f"generate_seq2seq needs an encoder_decoder model, not {cfg.family!r}")
    check_kv_dtype(kv_dtype)
    rows = _check_prompts(inputs, cfg.vocab_size)
    _check_args(cfg, max_new_tokens, temperature, top_k, top_p, eos_id)
    eos_ids = eos_array(eos_id, cfg.vocab_size)
    proc, beams = check_decoding(
        temperature=temperature, return_logits=return_logits, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, num_return_sequences=num_return_sequences)
    n_samples = 1 if beams else num_return_sequences
    rows = [r for r in rows for _ in range(n_samples)]
    if not 0 <= decoder_start_id < cfg.vocab_size:
        raise InputError(f"decoder_start_id={decoder_start_id} is outside [0, {cfg.vocab_size})")
    if max_len is None:
        max_len = _round_up(max_new_tokens, CACHE_BUCKET)
    elif int(max_len) != max_len or max_len < max_new_tokens:
        raise InputError(f"max_len={max_len} must be an integer >= max_new_tokens="
                         f"{max_new_tokens}")
    longest = max(len(r) for r in rows)
    tokens, segment_ids = _pad_inputs(rows, _prompt_bucket(longest))
    logits, state = start(params, cfg, tokens, segment_ids, int(max_len), int(decoder_start_id),
                          kv_dtype)
    width = min(_round_up(max_new_tokens, WIDTH_BUCKET), int(max_len))
    b = len(rows)
    history = init_history(proc, jnp.full((b, 1), decoder_start_id, jnp.int32),
                           jnp.ones((b,), jnp.int32), cfg.vocab_size, width)
    if beams:
        out = beam_decode(params, cfg, state, logits, history, jnp.int32(max_new_tokens),
                          eos_ids, beam_knobs(**beams["knobs"]), width=width,
                          **beam_settings(beams, eos_id, proc))
        return fetch_beams(out, max_new_tokens, num_return_sequences, eos_ids)
    out = decode(params, cfg, state.cache, state._replace(cache=None), logits,
                 row_keys(seed, b // n_samples, row_seeds, n_samples), jnp.int32(max_new_tokens), eos_ids,
                 width=width, temperature=float(temperature), top_k=int(top_k),
                 top_p=float(top_p), return_logits=return_logits, min_p=float(min_p),
                 processors=proc, history=history)
    return fetch_output(out, max_new_tokens, return_logits)


# ------------------------------------------------------------ compiled parts

@partial(jax.jit, static_argnames=("cfg", "cache_len", "decoder_start_id", "kv_dtype"))
def start(params, cfg, tokens, segment_ids, cache_len: int, decoder_start_id: int,
          kv_dtype: str = "auto"):
    """Encode once, project cross K/V once, allocate the cache, feed the start id.

    Returns (logits [B, V] for the first generated token, Seq2SeqState)."""
    TRACE_COUNTS["start"] += 1
    b = tokens.shape[0]
    encoded = encode(params, cfg, tokens, segment_ids)
    cross = cross_kv(params, cfg, encoded, kv_dtype)
    shapes = cache_shapes(cfg, b, cache_len, dtype_of(cfg.dtype), kv_dtype,
                          layers=decoder_layers(cfg))
    cache = constrain_cache({n: jnp.zeros(s.shape, s.dtype)
                             for n, s in shapes.items()})  # created sharded
    state = Seq2SeqState(cache, cross, segment_ids)
    return decode_step(params, cfg, state, jnp.full((b,), decoder_start_id, jnp.int32))


def decode_step(params, cfg, state: Seq2SeqState, tokens):
    """One decoder token per row: tokens [B] -> (logits [B, V], state with the cache advanced)."""
    logits, aux = decode_tokens(params, cfg, tokens[:, None], state.cross,
                                segment_ids=state.segment_ids, cache=state.cache)
    return logits[:, 0], state._replace(cache=aux["cache"])


@partial(jax.jit, static_argnames=("cfg", "width", "temperature", "top_k", "top_p", "min_p",
                                   "processors", "return_logits"), donate_argnames=("cache",))
def decode(params, cfg, cache, encoder: Seq2SeqState, logits, keys, max_new_tokens, eos_id, *,
           width: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           return_logits: bool = False, min_p: float = 0.0,
           processors: Processors = Processors(), history: Optional[History] = None):
    """The decoder's loop (`jaxlm.infer.generate.sampling_loop`): `cache` (donated)
    is the decoder's self-attention cache, `encoder` the rest of the state (the
    cross-attention K/V and the encoder padding)."""
    def step(state, tokens):
        TRACE_COUNTS["decode_step"] += 1
        return decode_step(params, cfg, state, tokens)

    out = sampling_loop(step, encoder._replace(cache=cache), logits, keys, max_new_tokens,
                        eos_id, width=width, temperature=temperature, top_k=top_k, top_p=top_p,
                        return_logits=return_logits, min_p=min_p, processors=processors,
                        history=history)
    out["cache"] = out.pop("state").cache
    return out


@partial(jax.jit, static_argnames=("cfg", "width", "num_beams", "n_candidates",
                                   "processors"))
def beam_decode(params, cfg, state: Seq2SeqState, logits, history, max_new_tokens, eos_ids,
                knobs, *, width: int, num_beams: int, n_candidates: int,
                processors: Processors):
    """Beam search (`jaxlm.infer.beam`): the encoder ran once per input in `start`;
    its cross K/V, padding, decoder cache and first logits are tiled to
    B * num_beams rows here. Each step reorders only the self-attention cache
    (a prompt's beams share its encoder rows)."""
    def step(state, tokens):
        TRACE_COUNTS["beam_step"] += 1
        return decode_step(params, cfg, state, tokens)

    def reorder(state, rows):
        return state._replace(cache=gather_cache(state.cache, rows))

    tile = jnp.repeat(jnp.arange(logits.shape[0]), num_beams)
    tiled = Seq2SeqState(gather_cache(state.cache, tile),
                         {n: jnp.take(a, tile, axis=1) for n, a in state.cross.items()},
                         jnp.take(state.segment_ids, tile, axis=0))
    return beam_loop(step, reorder, tiled, logits[tile], gather_history(history, tile),
                     max_new_tokens, eos_ids, knobs, num_beams=num_beams,
                     n_candidates=n_candidates, width=width, processors=processors,
                     pad_id=PAD_ID)


def _pad_inputs(rows, length: int):
    tokens = np.zeros((len(rows), length), np.int32)
    segments = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        segments[i, :len(r)] = 1
    return jnp.asarray(tokens), jnp.asarray(segments)


__all__ = ["generate_seq2seq", "start", "decode", "beam_decode", "decode_step", "TRACE_COUNTS"]
