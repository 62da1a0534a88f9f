"""Training objectives: losses over logits (or hidden states) with a loss mask.

Losses return (sum over counted tokens, number of counted tokens), so callers
can average over any number of batches exactly; a classifier's loss counts rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..sharding.context import context_size


def is_token_cross_entropy(objective: str) -> bool:
    """Whether the objective's loss is a mean token cross-entropy (clm, sft, mlm, span),
    so that exp(loss) is a perplexity; a preference loss (dpo, kto, reward), a
    classifier's loss (classify), a divergence from a teacher (distill) and a policy
    gradient loss (grpo, ppo) are not."""
    return objective not in ("dpo", "kto", "reward", "classify", "distill", "grpo", "ppo")


def causal_lm_loss(logits, targets, loss_mask):
    """Token cross-entropy from logits [B,S,V] float32, targets [B,S], loss_mask [B,S]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def classification_loss(scores, labels, weights):
    """(loss sum, row count, {"accuracy": correct rows} or {}) of a sequence classifier's
    pooled scores [B, N] float32 against labels [B] (float: class ids, or N == 1 the
    regression targets); `weights` [B] 1 for a labelled row, 0 for padding. N > 1: the
    cross-entropy of HF's single_label_classification; N == 1: squared error (HF's
    regression, MSE)."""
    w = weights.astype(jnp.float32)
    if scores.shape[-1] == 1:
        return jnp.sum(jnp.square(scores[:, 0] - labels) * w), jnp.sum(w), {}
    ids = labels.astype(jnp.int32)
    target = jnp.take_along_axis(scores, ids[:, None], axis=-1)[:, 0]
    per_row = jax.nn.logsumexp(scores, axis=-1) - target
    correct = (jnp.argmax(scores, axis=-1) == ids).astype(jnp.float32)
    return jnp.sum(per_row * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def labelled_rows(batch):
    """[B] bool: the rows of a classify batch that hold an example (any segment id > 0)."""
    return jnp.any(batch["segment_ids"] > 0, axis=-1)


def chunked_lm_loss(hidden, w, targets, loss_mask, chunk: int, softcap: float = 0.0):
    """The same loss from hidden states [B,S,D] and the head w [D,V], computed
    over vocab chunks of about `chunk` columns ([B*S] rows, or [B,S] under a
    context mesh). softcap c > 0: the logits are c * tanh(logits / c) (the
    model's final_logit_softcap), in both passes.

    The [B,S,V] logits are never materialised: the forward pass keeps a
    running log-sum-exp per token; the backward pass recomputes each chunk's
    logits and turns them straight into that chunk's gradient. Each chunk's
    logits stay in cache, which on CPU makes the head's matmuls nearly twice
    as fast, and on any device saves the largest activation of the step.
    """
    mask = loss_mask.astype(jnp.float32)
    targets = targets.astype(jnp.int32)
    if context_size() == 1:  # one GEMM over all tokens; under context parallelism
        # flattening [B, S] would gather the sequence, so the leading axes stay apart
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets, mask = targets.reshape(-1), mask.reshape(-1)
    loss = _chunked_ce(hidden, w, targets, mask, (*_chunking(w.shape[1], chunk), softcap))
    return loss, jnp.sum(mask)


def _chunking(vocab: int, chunk: int) -> tuple[int, int]:
    n = max(1, math.ceil(vocab / chunk))
    return n, math.ceil(vocab / n)


def _chunks(w, n, size):
    """[D, V] -> [n, D, size], zero-padded past V."""
    d, v = w.shape
    w = jnp.pad(w, ((0, 0), (0, n * size - v)))
    return w.reshape(d, n, size).transpose(1, 0, 2)


def _chunk_logits(x, w_c, c, size, vocab, softcap=0.0):
    """(logits, cols, d logits / d raw logits (1 without a soft cap)) of one chunk."""
    logits = jnp.matmul(x, w_c, preferred_element_type=jnp.float32)
    slope = 1.0
    if softcap:
        th = jnp.tanh(logits / softcap)
        logits, slope = softcap * th, 1.0 - th * th
    cols = c * size + jnp.arange(size)
    return jnp.where(cols < vocab, logits, -jnp.inf), cols, slope


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_ce(x, w, targets, mask, chunking):
    return _chunked_ce_fwd(x, w, targets, mask, chunking)[0]


def _chunked_ce_fwd(x, w, targets, mask, chunking):
    n, size, softcap = chunking
    vocab = w.shape[1]

    def step(carry, c_and_w):
        m, s, t = carry
        c, w_c = c_and_w
        logits, cols, _ = _chunk_logits(x, w_c, c, size, vocab, softcap)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        t = t + jnp.sum(jnp.where(cols == targets[..., None], logits, 0.0), axis=-1)
        return (m_new, s, t), None

    rows = x.shape[:-1]
    init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(rows))
    (m, s, t), _ = jax.lax.scan(step, init, (jnp.arange(n), _chunks(w, n, size)))
    lse = m + jnp.log(s)
    return jnp.sum((lse - t) * mask), (x, w, targets, mask, lse)


def _chunked_ce_bwd(chunking, res, g):
    x, w, targets, mask, lse = res
    n, size, softcap = chunking
    vocab = w.shape[1]
    coef = g * mask

    def step(dx, c_and_w):
        c, w_c = c_and_w
        logits, cols, slope = _chunk_logits(x, w_c, c, size, vocab, softcap)
        dlogits = jnp.exp(logits - lse[..., None]) * coef[..., None]
        dlogits = dlogits - jnp.where(cols == targets[..., None], coef[..., None], 0.0)
        dlogits = (dlogits * slope).astype(x.dtype)
        dx = dx + jnp.matmul(dlogits, w_c.T, preferred_element_type=jnp.float32)
        lead = tuple(range(x.ndim - 1))  # x [..., D], dlogits [..., size] -> [D, size]
        return dx, jnp.tensordot(x, dlogits, (lead, lead), preferred_element_type=jnp.float32)

    dx, dw = jax.lax.scan(step, jnp.zeros(x.shape, jnp.float32), (jnp.arange(n), _chunks(w, n, size)))
    dw = dw.transpose(1, 0, 2).reshape(w.shape[0], n * size)[:, :vocab]
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


# ---------------------------------------------------------------- masked LM
#
# BERT's corruption, done inside the jitted steps with a key derived from
# (train.seed, step), so a resumed run masks exactly as a straight one.
# [MASK] is the tokenizer's own `mask_id` when it has one; otherwise the last
# id of the model vocab is reserved for it (jaxlm trains its sentencepiece
# tokenizer with vocab_size - 1 pieces for mlm runs, so no text maps to it).

_MLM_TRAIN_STREAM, _MLM_EVAL_STREAM = 0x6D6C6D00, 0x6D6C6D01  # "mlm" + 0/1: fold_in tags


MASK_PIECES = ("[MASK]", "<mask>")  # BERT's WordPiece, RoBERTa-style BPE


def mlm_mask_id(tokenizer, vocab_size: int) -> int:
    """The [MASK] id for a tokenizer and a model vocab: the tokenizer's `mask_id`,
    else its piece named [MASK] or <mask> (an HF BERT tokenizer.json), else the
    reserved last model id (see above)."""
    own = getattr(tokenizer, "mask_id", None)
    if own is not None:
        return int(own)
    piece = getattr(tokenizer, "id_to_piece", None)
    if piece is not None:
        found = [i for i in range(tokenizer.vocab_size) if piece(i) in MASK_PIECES]
        if found:
            return found[0]
    if tokenizer.vocab_size >= vocab_size:
        raise ConfigError(
            f"train.objective=mlm: the tokenizer has no mask token and uses all "
            f"model.vocab_size={vocab_size} ids; set model.vocab_size={tokenizer.vocab_size + 1} "
            "to reserve the last id as [MASK]")
    return vocab_size - 1


def mlm_corrupt(tokens, segment_ids, key, *, probability: float, mask_id: int,
                random_vocab: int, special_ids=()):
    """(inputs, chosen) from tokens [B,S]: each real token (segment id > 0, not one
    of `special_ids`) is chosen with `probability`; a chosen token becomes
    `mask_id` (80%), a uniform random id in [0, random_vocab) (10%), or stays (10%)."""
    k_choose, k_how, k_random = jax.random.split(key, 3)
    real = segment_ids > 0
    for special in special_ids:
        real = real & (tokens != special)
    chosen = real & (jax.random.uniform(k_choose, tokens.shape) < probability)
    how = jax.random.uniform(k_how, tokens.shape)
    random_ids = jax.random.randint(k_random, tokens.shape, 0, random_vocab, tokens.dtype)
    inputs = jnp.where(chosen & (how < 0.8), jnp.asarray(mask_id, tokens.dtype), tokens)
    inputs = jnp.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, chosen


def mlm_key(seed: int, step=None):
    """The masking key of a train step (a traced int is fine), or the fixed eval key."""
    base = jax.random.key(seed)
    if step is None:
        return jax.random.fold_in(base, _MLM_EVAL_STREAM)
    return jax.random.fold_in(jax.random.fold_in(base, _MLM_TRAIN_STREAM), step)


def mlm_batch(batch, key, **corrupt):
    """A data batch as an MLM batch: corrupted tokens in, the originals as targets,
    the loss on the chosen tokens only."""
    inputs, chosen = mlm_corrupt(batch["tokens"], batch["segment_ids"], key, **corrupt)
    return {**batch, "tokens": inputs, "targets": batch["tokens"],
            "loss_mask": chosen.astype(jnp.float32)}


def check_objective(tcfg, mcfg) -> None:
    """ConfigError when train.objective does not fit the model (its family, its head)."""
    if tcfg.objective == "reward":
        if mcfg.num_labels != 1:
            raise ConfigError(
                f"train.objective=reward needs a one-score head (model.num_labels=1), not "
                f"model.num_labels={mcfg.num_labels}: start from a causal LM (a fresh score "
                "head is made) or a *ForSequenceClassification checkpoint with num_labels=1")
        if mcfg.family == "encoder_decoder":
            raise ConfigError("train.objective=reward does not fit model.family=encoder_decoder")
        return
    if mcfg.num_labels and tcfg.objective != "classify":
        raise ConfigError(f"train.objective={tcfg.objective!r} needs an LM head, but this model "
                          f"is a sequence classifier (model.num_labels={mcfg.num_labels}); use "
                          "train.objective=classify (or reward, with one score)")
    if tcfg.objective == "classify":
        if not mcfg.num_labels:
            raise ConfigError("train.objective=classify needs a model with a score head "
                              "(model.num_labels > 0): start from a *ForSequenceClassification "
                              "checkpoint (train.init_from) or set model.num_labels")
        return
    if mcfg.family == "encoder" and tcfg.objective != "mlm":
        raise ConfigError(f"train.objective={tcfg.objective!r} does not fit model.family=encoder "
                          "(bidirectional attention sees its targets); use train.objective=mlm "
                          "(or classify, with a score head)")
    if (mcfg.family == "encoder_decoder") != (tcfg.objective == "span"):
        raise ConfigError(f"train.objective={tcfg.objective!r} does not fit model.family="
                          f"{mcfg.family} (span corruption is the encoder_decoder objective)")


def batch_objective(tcfg, mcfg, tokenizer):
    """`(batch, step) -> batch`: train.objective's batch transform for the jitted
    steps (step None: eval, a fixed key), or None when batches are used as they
    come (clm, sft, dpo, classify). ConfigError when the objective does not fit the
    model (`check_objective`)."""
    check_objective(tcfg, mcfg)
    if tcfg.objective != "mlm":  # span: corrupted on the host (jaxlm.train.span)
        return None
    corrupt = dict(probability=tcfg.mlm_probability,
                   mask_id=mlm_mask_id(tokenizer, mcfg.vocab_size),
                   random_vocab=min(tokenizer.vocab_size, mcfg.vocab_size),
                   special_ids=tuple(i for i in (tokenizer.bos_id, tokenizer.eos_id)
                                     if i is not None))

    def apply(batch, step):
        return mlm_batch(batch, mlm_key(tcfg.seed, step), **corrupt)
    return apply
