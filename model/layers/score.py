"""The sequence-classification head (model.num_labels > 0): hidden states -> label scores.

    decoder (HF GenericForSequenceClassification, GPT2ForSequenceClassification):
        scores = h @ score                              score [D, N], no bias
    encoder (HF BertForSequenceClassification: its pooler, then the classifier):
        scores = tanh(h @ pooler + b_p) @ score + b_s   pooler [D, D], score [D, N]

It maps each position's hidden state on its own, as the LM head does: `forward`
gives every position's scores [B, S, N]; `jaxlm.model.classify` picks the position
Hugging Face pools at (`pool_positions`) before the head, so only that row is scored.
(Dropout before the BERT classifier is not applied.)
"""

import jax.numpy as jnp

from .dense import dense
from ..params import Spec, normal, zeros
from ...sharding.rules import constrain


def score_specs(cfg, pooler: bool):
    """{"score": {"kernel" [D, N] (+ "bias" [N] with the pooler)}, "pooler": {...}}."""
    d, n, dt = cfg.d_model, cfg.num_labels, cfg.param_dtype
    specs = {"score": {"kernel": Spec((d, n), ("embed", None), normal(cfg.init_std), dt)}}
    if pooler:
        specs["pooler"] = {"kernel": Spec((d, d), ("embed", None), normal(cfg.init_std), dt),
                           "bias": Spec((d,), (None,), zeros, dt)}
        specs["score"]["bias"] = Spec((n,), (None,), zeros, dt)
    return specs


def score(params, hidden, cfg):
    """Label scores [..., N] float32 from hidden states [..., D]."""
    h = hidden
    if "pooler" in params:
        p = params["pooler"]
        h = jnp.tanh(dense(h, p["kernel"].astype(h.dtype)) + p["bias"].astype(h.dtype))
    s = params["score"]
    out = dense(h, s["kernel"].astype(h.dtype), out_dtype=jnp.float32)
    if "bias" in s:
        out = out + s["bias"].astype(jnp.float32)
    return constrain(out, ("batch", "seq", None)) if out.ndim == 3 else out


def pool_positions(tokens, mask, cfg):
    """[B] int32: the position whose hidden state a sequence classifier scores, as
    Hugging Face picks it. Encoder: 0 (BERT's [CLS]). Decoder: the rightmost position
    that `mask` [B, S] keeps (None: all) and whose token is not cfg.pad_token_id (-1:
    no such rule): HF's `argmax(arange(S) * non_pad)`, so 0 when no token qualifies."""
    b, s = tokens.shape
    if cfg.family == "encoder":
        return jnp.zeros((b,), jnp.int32)
    keep = jnp.ones((b, s), bool) if mask is None else mask > 0
    if cfg.pad_token_id >= 0:
        keep = keep & (tokens != cfg.pad_token_id)
    return jnp.argmax(jnp.arange(s, dtype=jnp.int32) * keep, axis=-1).astype(jnp.int32)


def pooled(hidden, positions):
    """hidden [B, S, D] at positions [B] -> [B, D]."""
    return jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]
