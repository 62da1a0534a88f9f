"""Beam search inside one compiled `lax.while_loop`, with Hugging Face's semantics.

The caller prefills once per prompt and tiles the state (KV cache, logits,
processor history) to B * K rows, row b * K + j being beam j of prompt b.
Each step then follows transformers 5's `_beam_search`:

1. log_softmax of the next-token logits, the logit processors (on the
   log-probabilities, as HF), plus each beam's running score: [B, K * V];
2. the top C = max(2, 1 + n_eos) * K candidates of each prompt;
3. a candidate "hits" when its token is an EOS id or the length reaches
   max_new_tokens; the best K candidates that do not hit run on (the cache
   rows, history and tokens are reordered by a gather along the batch axis);
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
from .processors import History, Processors

NEG = -1.0e9  # HF's "impossible" score


class _Beams(NamedTuple):
    step: jax.Array  # tokens generated so far
    state: object  # the model state, B * K rows
    logits: jax.Array  # [B * K, V] next-token logits of the running beams
    history: History  # processor history, B * K rows
    run_tokens: jax.Array  # [B, K, width]
    run_scores: jax.Array  # [B, K] summed log-probs (sorted, best first)
    fin_tokens: jax.Array  # [B, K, width]
    fin_scores: jax.Array  # [B, K] length-penalised
    fin_lengths: jax.Array  # [B, K]
    fin_done: jax.Array  # [B, K] bool: a finished hypothesis sits in this slot
    improvable: jax.Array  # [B] bool: HF's is_early_stop_heuristic_unsatisfied
    go_on: jax.Array  # [] bool


def beam_knobs(length_penalty: float, early_stopping) -> dict:
    """The traced beam settings (changing them does not recompile): length_penalty
    f32 [], early_stopping (True / False / "never") as two bool [] flags."""
    return {"length_penalty": jnp.float32(length_penalty),
            "stop_when_full": jnp.bool_(early_stopping is True),
            "never": jnp.bool_(early_stopping == "never")}


def beam_loop(step_fn, reorder_fn, state, logits, history: History, max_new_tokens, eos_ids,
              knobs: dict, *, num_beams: int, n_candidates: int, width: int,
              processors: Processors, pad_id: int = -1):
    """Beam search over state (B * K rows, see the module docstring); knobs: `beam_knobs`.

    step_fn(state, tokens [B*K]) -> (logits [B*K, V], state); reorder_fn(state,
    rows [B*K]) -> state with row i taken from rows[i]. Returns a dict of
    tokens [B, K, width] (pad_id after the end), scores [B, K], lengths [B, K]
    (best first) and the final state.
    """
    k, c = num_beams, n_candidates
    bk, v = logits.shape
    b = bk // k
    length_penalty = knobs["length_penalty"]
    when_full = knobs["stop_when_full"]

    def emit(s: _Beams) -> _Beams:
        logp = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        logp = lp.apply(processors, logp, s.history, s.step, eos_ids)
        acc = (logp.reshape(b, k, v) + s.run_scores[..., None]).reshape(b, k * v)
        top_lp, top_idx = jax.lax.top_k(acc, c)  # [B, C]
        src, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        cand = jnp.take_along_axis(s.run_tokens, src[..., None], axis=1)  # [B, C, width]
        cand = jax.lax.dynamic_update_slice_in_dim(cand, tok[..., None], s.step, axis=2)
        hits = lp.is_eos(tok, eos_ids) | (s.step + 1 >= max_new_tokens)  # [B, C]

        # the best K candidates that did not hit run on
        run_lp = top_lp + jnp.where(hits, NEG, 0.0)
        run_scores, keep = jax.lax.top_k(run_lp, k)  # [B, K]
        run_tokens = jnp.take_along_axis(cand, keep[..., None], axis=1)
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(src, keep, axis=1)).reshape(-1)

        # hits among the first K candidates join the finished hypotheses
        length = s.step + 1
        fin_lp = top_lp / (length.astype(jnp.float32) ** length_penalty)
        full = jnp.all(s.fin_done, axis=-1, keepdims=True) & when_full
        just = hits & (jnp.arange(c) < k)[None]
        fin_lp = (fin_lp + jnp.where(full, NEG, 0.0) + jnp.where(s.improvable[:, None], 0.0, NEG)
                  + jnp.where(just, 0.0, NEG))
        m_scores = jnp.concatenate([s.fin_scores, fin_lp], axis=1)  # [B, K + C]
        fin_scores, best = jax.lax.top_k(m_scores, k)
        pick = lambda a: jnp.take_along_axis(a, best if a.ndim == 2 else best[..., None], axis=1)
        fin_tokens = pick(jnp.concatenate([s.fin_tokens, cand], axis=1))
        fin_lengths = pick(jnp.concatenate(
            [s.fin_lengths, jnp.broadcast_to(length, (b, c)).astype(jnp.int32)], axis=1))
        fin_done = pick(jnp.concatenate([s.fin_done, just], axis=1))

        # HF's early-stopping heuristic and loop condition, after the step
        best_len = jnp.where(knobs["never"] & (length_penalty > 0.0),
                             jnp.asarray(max_new_tokens, jnp.float32), length.astype(jnp.float32))
        best_running = run_scores[:, :1] / best_len ** length_penalty
        worst = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
        improvable = s.improvable & jnp.any(best_running > worst, axis=1)
        go_on = (jnp.any(improvable) & ~(jnp.all(fin_done) & when_full)
                 & ~jnp.all(hits))

        state = reorder_fn(s.state, rows)
        history = lp.push(processors, lp.gather(s.history, rows), run_tokens[:, :, s.step]
                          .reshape(-1), jnp.ones((bk,), bool))
        return s._replace(step=length, state=state, history=history, run_tokens=run_tokens,
                          run_scores=run_scores, fin_tokens=fin_tokens, fin_scores=fin_scores,
                          fin_lengths=fin_lengths, fin_done=fin_done, improvable=improvable,
                          go_on=go_on)

    def body(s: _Beams) -> _Beams:
        last = jax.lax.dynamic_index_in_dim(s.run_tokens, s.step - 1, axis=2, keepdims=False)
        logits, state = step_fn(s.state, last.reshape(-1))
        return emit(s._replace(logits=logits, state=state))

    init = _Beams(
        step=jnp.int32(0), state=state, logits=logits, history=history,
        run_tokens=jnp.full((b, k, width), pad_id, jnp.int32),
        run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
        fin_tokens=jnp.full((b, k, width), pad_id, jnp.int32),
        fin_scores=jnp.full((b, k), NEG, jnp.float32),
        fin_lengths=jnp.zeros((b, k), jnp.int32), fin_done=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool), go_on=jnp.bool_(True))
    s = jax.lax.while_loop(lambda s: s.go_on, body, emit(init))
    ends = jnp.arange(width)[None, None] < s.fin_lengths[..., None]
    return {"tokens": jnp.where(ends, s.fin_tokens, pad_id), "scores": s.fin_scores,
            "lengths": s.fin_lengths, "state": s.state}
