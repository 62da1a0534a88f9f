"""Encoder-only family: BERT (post-norm) and pre-norm encoders from one block.

    x = embed(tokens) + positions + token_types; x = LN(x)           (post-norm)
    per layer (scanned over the stacked `layers` axis):
        post: x = LN1(x + attn(x));      x = LN2(x + mlp(x))
        pre:  x = x + attn(LN1(x));      x = x + mlp(LN2(x))    (+ final LN)
    (training with model.dropout: drop(x) after the embeddings, attn and mlp
    outputs dropped before their residual add)
    MLM head: logits = LN(act(x @ dense + b)) @ E^T + bias  (E: the tied
    word embeddings, or a separate head when tie_embeddings is false)

Attention is bidirectional: `segment_ids` (0 = padding) keep padding out and
packed sequences apart. BertForMaskedLM has no pooler, so an MLM model has none;
`jaxlm.embed` (model/embed.py) pools by a masked mean instead. A sequence
classifier (model.num_labels > 0, BertForSequenceClassification) has BERT's pooler
and classifier in place of the MLM head (model/layers/score.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...errors import ConfigError
from ..adapters import materialize_outside_layers
from ..block import BlockInputs, run_layers
from ..config import dtype_of
from ..kv import NO_CACHE, arange_positions, own_mask
from ..layers.attention import attention_specs, position_bias
from ..layers.relative import relative_bias_specs
from ..layers.dense import dense
from ..layers.dropout import EMBED, dropout, site_key
from ..layers.embeddings import (embed_tokens_and_positions, embedding_specs,
                                 head_specs, head_weights)
from ..layers.mlp import GATED, activation, mlp_specs
from ..layers.norms import norm, norm_specs
from ..layers.positions import learned_position_specs
from ..layers.score import score_specs
from ..params import Spec, normal, stack, zeros
from ...sharding.rules import constrain


def _check(cfg):
    # gated MLPs: T5 v1.1 encoders (T5EncoderModel) load as this family; the MLM
    # head (BERT) needs a plain one
    if cfg.moe.n_experts or cfg.sliding_window or (cfg.mlp in GATED and cfg.lm_head):
        raise ConfigError("model.family=encoder supports neither moe.n_experts, sliding_window "
                          "nor gated MLPs with the MLM head (got moe.n_experts="
                          f"{cfg.moe.n_experts}, "
                          f"sliding_window={cfg.sliding_window}, mlp={cfg.mlp!r}; use mlp=gelu "
                          "or relu)")


def mlm_head_specs(cfg):
    """The BERT prediction head: dense + act + LayerNorm, and a per-token output bias."""
    dt, d = cfg.param_dtype, cfg.d_model
    return {"dense": {"kernel": Spec((d, d), ("embed", None), normal(cfg.init_std), dt),
                      "bias": Spec((d,), (None,), zeros, dt)},
            "ln": norm_specs(cfg),
            "bias": Spec((cfg.vocab_size,), ("vocab",), zeros, dt)}


def encoder_specs(cfg):
    _check(cfg)
    post = cfg.norm_position == "post"
    layer = {"attn": attention_specs(cfg), "ln1": norm_specs(cfg), "mlp": mlp_specs(cfg),
             "ln2": norm_specs(cfg)}
    specs = {"embed": embedding_specs(cfg), "layers": stack(layer, cfg.n_layers)}
    if cfg.lm_head:  # a base model (HF BertModel, T5EncoderModel) has no MLM head
        specs["mlm"] = mlm_head_specs(cfg)
    if cfg.num_labels:  # a sequence classifier (BertForSequenceClassification): pooler + score
        specs.update(score_specs(cfg, pooler=True))
    specs["embed_ln" if post else "final_ln"] = norm_specs(cfg)
    if cfg.positions == "learned":
        specs["positions"] = learned_position_specs(cfg)
    if cfg.positions == "t5_relative":
        specs["relative"] = relative_bias_specs(cfg)
    if cfg.type_vocab_size:
        specs["token_types"] = {"table": Spec((cfg.type_vocab_size, cfg.d_model), (None, "embed"),
                                              normal(cfg.init_std), cfg.param_dtype)}
    if cfg.lm_head and not cfg.tie_embeddings:
        specs["head"] = head_specs(cfg)
    return specs


def encoder(params, cfg, tokens, positions=None, segment_ids=None, token_types=None,
            dropout_key=None):
    """tokens [B,S] -> (final hidden states [B,S,D] (before the MLM head: `mlm_logits`
    maps them to logits), aux {}).

    `segment_ids` [B,S]: 0 = padding (sees and is seen by nothing), tokens
    attend only within their own segment; None: every token sees every token.
    `positions` default to arange (right padding); `token_types` [B,S]
    default to type 0. `dropout_key` (training only): model.dropout on the
    embeddings (after the embedding LayerNorm) and on each attention / MLP
    output before its residual add, model.attention_dropout on the attention
    probabilities.
    """
    b, s = tokens.shape
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    if positions is None:
        positions = arange_positions(b, s)
    x = embed_tokens_and_positions(params, tokens, positions, cfg)
    if cfg.type_vocab_size:
        types = jnp.zeros((b, s), jnp.int32) if token_types is None else token_types
        x = x + jnp.take(params["token_types"]["table"], types, axis=0).astype(x.dtype)
    post = cfg.norm_position == "post"
    if post:
        x = norm(params["embed_ln"], x, cfg)
    x = dropout(x, cfg.dropout, site_key(dropout_key, EMBED))
    mask = own_mask(False, positions, segment_ids, None)
    inputs = BlockInputs(positions, mask, position_bias(params, mask, cfg, bidirectional=True),
                         dropout_key=dropout_key)
    x, _, _ = run_layers(params["layers"], cfg, x, NO_CACHE, inputs)
    if not post:
        x = norm(params["final_ln"], x, cfg)
    return x, {}


def mlm_transform(params, cfg, hidden):
    """The head's transform: LN(act(hidden @ dense + bias)), [B,S,D] -> [B,S,D]."""
    p = params["mlm"]
    h = dense(hidden, p["dense"]["kernel"].astype(hidden.dtype))
    h = activation(cfg.mlp, cfg)(h + p["dense"]["bias"].astype(hidden.dtype))
    return constrain(norm(p["ln"], h, cfg), ("batch", "seq", "embed"))


def mlm_logits(params, cfg, hidden):
    """Final hidden states [B,S,D] -> MLM logits [B,S,V] in float32."""
    h = mlm_transform(params, cfg, hidden)
    logits = dense(h, head_weights(params, cfg).astype(h.dtype), out_dtype=jnp.float32)
    logits = logits + params["mlm"]["bias"].astype(jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


def mlm_head_inputs(params, cfg, hidden):
    """(h [B,S,D+1], w [D+1,V]) with h @ w == the MLM logits, for the chunked loss.

    The output bias rides along as a last row of w against a column of ones.
    """
    h = mlm_transform(params, cfg, hidden)
    h = jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)
    w = jnp.concatenate([head_weights(params, cfg), params["mlm"]["bias"][None]], axis=0)
    return h, w.astype(h.dtype)
