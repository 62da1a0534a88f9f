"""Distillation (train.objective=distill): the student matches a frozen teacher's
next-token distributions on the loss tokens (Hinton et al. 2015; GKD, Agarwal et al. 2024).

The teacher is the run's frozen tree (train/state.py: never donated, never updated),
read with `jaxlm.api.load_params` straight into the shardings its logical axes ask
for, and run in the same jitted step as the student, under stop_gradient. Per loss
token, with temperature T, student log-probs s = log_softmax(z_S / T) and teacher
log-probs t = log_softmax(z_T / T) over the shared vocabulary (TRL 1.16's
`GKDTrainer.generalized_jsd_loss`, summed over the vocab, meaned over the tokens):

    forward_kl  (beta 0)  KL(T || S) = sum_v p_T (t - s)
    reverse_kl  (beta 1)  KL(S || T) = sum_v p_S (s - t)
    jsd         m = log(beta p_T + (1 - beta) p_S):  beta KL(T || M) + (1 - beta) KL(S || M)

train.distill.alpha mixes in the data's hard-label cross-entropy (at temperature 1):
(1 - alpha) divergence + alpha CE.

Memory: with train.loss_vocab_chunk > 0 neither side's [B, S, V] logits exist; each
vocab chunk's student and teacher logits are made from the hidden states and the
heads twice (a log-sum-exp pass, then the divergence pass; both rematerialised in the
backward pass), so the head matmuls cost about 3x a plain forward's for each model,
and the step holds [tokens, chunk] floats per side. With loss_vocab_chunk=0 both
[B, S, V] float32 logits are held (plus their log-softmaxes in the backward pass).

On-policy data (train.distill.on_policy = TRL's lmbda) is in train/onpolicy.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..model import forward, head_weights
from ..model.adapters import materialize_outside_layers
from ..model.config import dtype_of
from ..sharding.context import context_reorder, context_size
from .objectives import _chunking, _chunks, causal_lm_loss, chunked_lm_loss

METRICS = ("distill_loss", "ce_loss")  # sums over the loss tokens, like loss_sum
_PAD_LOGIT = -1e30  # a padded vocab column: finite, so no NaN reaches a gradient


# ---------------------------------------------------------------- the teacher


def teacher_config(tcfg):
    """The teacher's ModelConfig (from its config.yaml / config.json; no weights read)."""
    from ..api import model_config_of
    return model_config_of(tcfg.distill.teacher)


def check_teacher(cfg) -> None:
    """One-line ConfigError unless train.distill.teacher is a decoder with the student's
    vocabulary, and unless on-policy sampling has prompts to sample from (SFT data);
    called before the run dir is written."""
    if cfg.train.objective != "distill":
        return
    path = cfg.train.distill.teacher
    if not path:
        raise ConfigError("train.objective=distill needs a teacher: train.distill.teacher=PATH "
                          "(a jaxlm run dir or a Hugging Face dir)")
    if not os.path.isdir(path):
        raise ConfigError(f"train.distill.teacher={path} is not a directory (a jaxlm run dir "
                          "or a Hugging Face dir)")
    teacher = teacher_config(cfg.train)
    if teacher.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"train.distill.teacher={path} has a vocabulary of {teacher.vocab_size} tokens, the "
            f"student {cfg.model.vocab_size} (model.vocab_size): distillation compares their "
            "distributions token by token, so both need the same vocabulary")
    if teacher.family != "decoder" or teacher.num_labels:
        raise ConfigError(f"train.distill.teacher={path} is not a decoder language model "
                          f"(model.family={teacher.family}, num_labels={teacher.num_labels})")
    if cfg.train.distill.on_policy and data_kind(cfg.data) != "sft":
        raise ConfigError(f"train.distill.on_policy={cfg.train.distill.on_policy} samples "
                          "completions for prompts: data.corpus must hold prompt/completion or "
                          "messages records (JSONL), not raw text")


def teacher_shardings(cfg, mesh):
    """The teacher's param shardings: its logical axes through the run's rules."""
    from ..model import model_specs
    from ..model.params import logical_axes
    from ..sharding.rules import tree_shardings
    return tree_shardings(mesh, logical_axes(model_specs(teacher_config(cfg.train))),
                          cfg.mesh.rules)


def load_teacher(cfg, mesh, step: int | None = None):
    """The teacher's params (a jaxlm teacher's checkpoint `step`, default its latest),
    each leaf read straight into its sharding."""
    from ..api import load_params
    return load_params(cfg.train.distill.teacher, teacher_config(cfg.train),
                       teacher_shardings(cfg, mesh), step)


def data_kind(dcfg) -> str:
    """"sft" when data.corpus holds prompt/completion or messages records (JSONL, or
    stdlib-sft): the loss on the completion tokens; "clm" (raw text: every token)
    otherwise."""
    import json
    from .sft import STDLIB_SFT, source_files
    if dcfg.sources:
        return "clm"
    if dcfg.corpus == STDLIB_SFT:
        return "sft"
    if not all(str(p).endswith(".jsonl") for p in str(dcfg.corpus).split(",") if p.strip()):
        return "clm"
    try:
        first = source_files(dcfg.corpus)[0]
        with open(first, encoding="utf-8") as f:
            line = next((x for x in f if x.strip()), "{}")
        record = json.loads(line)
    except (OSError, ValueError, StopIteration):
        return "clm"  # the text reader names the problem
    return "sft" if isinstance(record, dict) and ("messages" in record or "prompt" in record) \
        else "clm"


# ---------------------------------------------------------------- the losses


def divergence_terms(s, t, beta: float):
    """Per-entry terms [..., V] (summed over V: the per-token divergence) from student
    and teacher log-probs s, t [..., V]; `beta` a Python float, as TRL's
    generalized_jsd_loss (F.kl_div(a, b, log_target=True) = exp(b) (b - a))."""
    if beta == 0.0:
        return jnp.exp(t) * (t - s)
    if beta == 1.0:
        return jnp.exp(s) * (s - t)
    m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
    return beta * jnp.exp(t) * (t - m) + (1.0 - beta) * jnp.exp(s) * (s - m)


def divergence_loss(student_logits, teacher_logits, mask, *, beta: float,
                    temperature: float = 1.0):
    """(sum over masked tokens of the per-token divergence, token count) from logits
    [..., V] and mask [...]. (TRL's loss is the sum over the count.)"""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    per_token = jnp.sum(divergence_terms(s, t, beta), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(mask)


def chunked_divergence_loss(xs, ws, xt, wt, mask, *, beta: float, temperature: float,
                            chunk: int):
    """`divergence_loss` from hidden states and heads, over vocab chunks of about
    `chunk` columns: student xs [..., Ds] @ ws [Ds, V], teacher xt [..., Dt] @ wt [Dt, V].
    No [..., V] logits exist: a first pass keeps each side's log-sum-exp per token, a
    second sums the chunk's divergence terms; both are rematerialised in the backward
    pass (jax.checkpoint), so the gradient holds one chunk at a time too."""
    vocab = ws.shape[1]
    if wt.shape[1] != vocab:
        raise ConfigError(f"distillation: student vocabulary {vocab} != teacher {wt.shape[1]}")
    n, size = _chunking(vocab, chunk)
    chunks = (jnp.arange(n), _chunks(ws, n, size), _chunks(wt, n, size))

    def logits(x, w_c, c):
        z = jnp.matmul(x, w_c, preferred_element_type=jnp.float32) / temperature
        valid = c * size + jnp.arange(size) < vocab
        return jnp.where(valid, z, _PAD_LOGIT), valid

    @jax.checkpoint
    def lse_of(_, cw):
        c, ws_c, wt_c = cw
        return None, (jax.nn.logsumexp(logits(xs, ws_c, c)[0], axis=-1),
                      jax.nn.logsumexp(logits(xt, wt_c, c)[0], axis=-1))

    _, (lse_s, lse_t) = jax.lax.scan(lse_of, None, chunks)
    lse_s, lse_t = jax.nn.logsumexp(lse_s, axis=0), jax.nn.logsumexp(lse_t, axis=0)

    @jax.checkpoint
    def terms_of(total, cw):
        c, ws_c, wt_c = cw
        zs, valid = logits(xs, ws_c, c)
        zt, _ = logits(xt, wt_c, c)
        terms = divergence_terms(zs - lse_s[..., None], zt - lse_t[..., None], beta)
        return total + jnp.sum(jnp.where(valid, terms, 0.0), axis=-1), None

    per_token, _ = jax.lax.scan(terms_of, jnp.zeros(xs.shape[:-1], jnp.float32), chunks)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask), jnp.sum(mask)


# ---------------------------------------------------------------- in the train step


def _hidden_and_head(params, cfg, batch, dropout_key=None):
    """(final hidden states [B, S, D], the head [D, V] at the compute dtype, aux)."""
    keyed = {} if dropout_key is None else {"dropout_key": dropout_key}
    hidden, aux = forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                          return_hidden=True, **keyed)
    top = materialize_outside_layers(params, dtype_of(cfg.dtype))
    return hidden, head_weights(top, cfg).astype(hidden.dtype), aux


def distill_sums(student, teacher, mcfg, teacher_cfg, batch, tcfg, vocab_chunk: int = 0,
                 dropout_key=None):
    """(loss sum, loss-token count, metric sums {distill_loss, ce_loss}, the student's
    aux) of one batch; the teacher (params `teacher`, config `teacher_cfg`) under
    stop_gradient. The loss sum is (1 - alpha) divergence + alpha cross-entropy."""
    d = tcfg.distill
    batch = context_reorder(batch, context_size())
    mask = batch["loss_mask"]
    if mcfg.final_logit_softcap or teacher_cfg.final_logit_softcap:
        vocab_chunk = 0  # the chunked divergence has no soft cap: the full logits
    if vocab_chunk > 0:
        hs, ws, aux = _hidden_and_head(student, mcfg, batch, dropout_key)
        ht, wt, _ = jax.lax.stop_gradient(_hidden_and_head(teacher, teacher_cfg, batch))
        xs, xt, flat_mask = hs, ht, mask
        if context_size() == 1:  # one GEMM over all tokens (as chunked_lm_loss)
            xs, xt, flat_mask = (hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]),
                                 mask.reshape(-1))
        div, count = chunked_divergence_loss(xs, ws, xt, wt, flat_mask, beta=d.jsd_beta,
                                             temperature=d.temperature, chunk=vocab_chunk)
        ce = (chunked_lm_loss(hs, ws, batch["targets"], mask, vocab_chunk)[0]
              if d.alpha else 0.0)
    else:
        keyed = {} if dropout_key is None else {"dropout_key": dropout_key}
        zs, aux = forward(student, mcfg, batch["tokens"], batch["positions"],
                          batch["segment_ids"], **keyed)
        zt, _ = jax.lax.stop_gradient(forward(teacher, teacher_cfg, batch["tokens"],
                                              batch["positions"], batch["segment_ids"]))
        div, count = divergence_loss(zs, zt, mask, beta=d.jsd_beta, temperature=d.temperature)
        ce = causal_lm_loss(zs, batch["targets"], mask)[0] if d.alpha else 0.0
    loss = (1.0 - d.alpha) * div + d.alpha * ce
    return loss, count, {"distill_loss": div, "ce_loss": jnp.asarray(ce, jnp.float32)}, aux
