"""Encoder-decoder family: T5 v1.0 (ReLU, tied head) and v1.1 (gated GELU, untied head).

    logits, aux = encoder_decoder(params, cfg, tokens, decoder_tokens,
                                  segment_ids=enc_mask, decoder_segment_ids=dec_mask)

Both stacks are pre-norm residual blocks scanned over a stacked `layers`
axis, built from the shared layers (RMS norm without mean, the attention
projections, the MLP), dropout-free:

* encoder block: self-attention (bidirectional) -> MLP;
* decoder block: causal self-attention -> cross-attention over the encoder
  output -> MLP.

Positions are T5 relative buckets (`model.positions: t5_relative`): one
[buckets, heads] table per stack, turned into a bias once and shared by every
layer of that stack (as in Hugging Face T5); cross-attention has no bias.
T5 does not scale scores by 1/sqrt(head_dim): set `model.attn_scale: 1.0`
(0 keeps the usual scale). One embedding table is shared by the encoder, the
decoder and, with `tie_embeddings`, the head: a tied head (T5 v1.0) sees the
decoder output scaled by d_model ** -0.5; an untied one (v1.1) sees it as is.
`head: false` (a Hugging Face T5Model dir: encoder + decoder, no lm_head) has no
head at all: hidden states only, never scaled (T5Model's last_hidden_state).

Masks: `segment_ids` [B,S] and `decoder_segment_ids` [B,T] follow MaskSpec
(0 = padding; equal ids see each other, so packed examples stay apart). The
decoder's position t of segment k cross-attends to the encoder positions of
segment k; when only one side has ids, every non-padding position of one side
sees every non-padding position of the other.

Generation uses the pieces separately: `encode` once, `cross_kv` once (the
cross-attention keys/values of every decoder layer, {"k", "v": [L,B,S,H,D]}),
then `decode` with a self-attention KV cache (see jaxlm.infer.seq2seq). Either
may be quantized with per-token, per-head scales (`generate.kv_dtype` int8, int4,
fp8): the cache is quantized on write and both are dequantized on read, by the
decoder-only stores' functions (jaxlm.model.kv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...errors import ConfigError
from ..adapters import layer_weights, materialize_outside_layers
from ..block import BlockInputs, run_layers
from ..config import dtype_of
from ..kv import NO_CACHE, own_mask, quantize_kv
from ..layers.attention import attention_specs, position_bias
from ..layers.dense import dense
from ..layers.dropout import EMBED, FINAL, dropout, site_key
from ..layers.embeddings import embed, embedding_specs, head_specs
from ..layers.mlp import mlp_specs
from ..layers.norms import norm, norm_specs
from ..layers.relative import relative_bias_specs
from ..kernels import MaskSpec
from ..params import stack
from ...sharding.rules import constrain


def decoder_layers(cfg) -> int:
    return cfg.n_decoder_layers or cfg.n_layers


def _check(cfg):
    if cfg.positions not in ("t5_relative", "none"):
        raise ConfigError(f"model.positions={cfg.positions!r}: the encoder_decoder family "
                          "supports 't5_relative' or 'none'")
    if cfg.moe.n_experts:
        raise ConfigError("model.moe.n_experts: the encoder_decoder family has dense MLPs only")
    if cfg.positions == "t5_relative" and cfg.relative_buckets < 4:
        raise ConfigError(f"model.relative_buckets={cfg.relative_buckets} must be >= 4")


def encoder_decoder_specs(cfg):
    _check(cfg)
    enc_layer = {"ln1": norm_specs(cfg), "attn": attention_specs(cfg), "ln2": norm_specs(cfg),
                 "mlp": mlp_specs(cfg)}
    dec_layer = {"ln1": norm_specs(cfg), "attn": attention_specs(cfg),
                 "ln_cross": norm_specs(cfg), "cross": attention_specs(cfg),
                 "ln2": norm_specs(cfg), "mlp": mlp_specs(cfg)}
    encoder = {"layers": stack(enc_layer, cfg.n_layers), "final_ln": norm_specs(cfg)}
    decoder = {"layers": stack(dec_layer, decoder_layers(cfg)), "final_ln": norm_specs(cfg)}
    if cfg.positions == "t5_relative":
        encoder["relative"] = relative_bias_specs(cfg)
        decoder["relative"] = relative_bias_specs(cfg)
    specs = {"embed": embedding_specs(cfg), "encoder": encoder, "decoder": decoder}
    if cfg.head and not cfg.tie_embeddings:
        specs["head"] = head_specs(cfg)
    return specs


# ------------------------------------------------------------------ pieces

def _drop(x, cfg, key, site):
    """model.dropout at `site` of `key` (None: the identity)."""
    return dropout(x, cfg.dropout, site_key(key, site))


def _arange(n):
    return jnp.arange(n, dtype=jnp.int32)[None]


def _cross_segments(q_seg, kv_seg, b, sq, sk):
    """Cross-attention segment ids: raw when both sides have them, else 0/1 validity."""
    if q_seg is not None and kv_seg is not None:
        return q_seg, kv_seg
    if q_seg is None and kv_seg is None:
        return None, None
    ones = lambda s: jnp.ones((b, s), jnp.int32)
    q = ones(sq) if q_seg is None else (q_seg > 0).astype(jnp.int32)
    kv = ones(sk) if kv_seg is None else (kv_seg > 0).astype(jnp.int32)
    return q, kv


def encode(params, cfg, tokens, segment_ids=None, positions=None, dropout_key=None):
    """Encoder tokens [B,S] -> final-norm hidden states [B,S,D]. `dropout_key`
    (training only): T5's dropout on the embeddings, each sublayer's output
    and the final norm's output; attention_dropout on the probabilities."""
    s = tokens.shape[1]
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    positions = _arange(s) if positions is None else positions
    x = _drop(embed(params["embed"], tokens, cfg), cfg, dropout_key, EMBED)
    p = params["encoder"]
    mask = own_mask(False, positions, segment_ids, None)
    inputs = BlockInputs(positions, mask, position_bias(p, mask, cfg, bidirectional=True),
                         dropout_key=dropout_key)
    x, _, _ = run_layers(p["layers"], cfg, x, NO_CACHE, inputs)
    return _drop(norm(p["final_ln"], x, cfg), cfg, dropout_key, FINAL)


def cross_kv(params, cfg, encoded, kv_dtype: str = "auto"):
    """Encoder output [B,S,D] -> the cross-attention {"k", "v": [L_dec,B,S,KVH,D]};
    a quantized kv_dtype: k, v in its format + float32 "k_scale", "v_scale" [L_dec,B,S,KVH]."""
    def project(_, cross):
        cross = layer_weights(cross, dtype_of(cfg.dtype))
        k = dense(encoded, cross["k"])  # bsd,dhk->bshk
        v = dense(encoded, cross["v"])
        axes = ("batch", "seq", "kv_heads", "head_dim")
        return None, (constrain(k, axes), constrain(v, axes))

    _, (k, v) = jax.lax.scan(project, None, params["decoder"]["layers"]["cross"])
    return quantize_kv({"k": k, "v": v}, kv_dtype)


def decode(params, cfg, decoder_tokens, cross, *, segment_ids=None,
           decoder_segment_ids=None, positions=None, store=None, dropout_key=None):
    """Decoder tokens [B,T] over cached cross-attention K/V (`cross_kv`'s dict) ->
    (the hidden states the head sees [B,T,D], aux): the final norm, times
    d_model ** -0.5 when the head is tied (T5 v1.0); a base model without a head
    (`model.head: false`) gets the final norm's output. `unembed` maps them to logits.

    `segment_ids` are the encoder's [B,S] (0 = padding). Without a store: a full
    causal pass (`decoder_segment_ids` for the decoder's padding / packing,
    `positions` restarting per packed example). With a KV store (`jaxlm.model.kv`)
    the tokens go at its positions and attend to what it holds; aux["store"] is
    the store advanced by T. `dropout_key` (training only, no cache): dropout as
    in `encode`.
    """
    b, t = decoder_tokens.shape
    sk = cross["k"].shape[2]
    store = NO_CACHE if store is None else store
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    if positions is None:
        positions = _arange(t) if store is NO_CACHE else store.positions(b, t)
    x = _drop(embed(params["embed"], decoder_tokens, cfg), cfg, dropout_key, EMBED)
    p = params["decoder"]
    fresh = store is NO_CACHE
    q_seg, kv_seg = _cross_segments(decoder_segment_ids if fresh else None, segment_ids, b, t,
                                    sk)
    mask = store.mask(True, positions, decoder_segment_ids if fresh else None, None)
    inputs = BlockInputs(positions, mask, position_bias(p, mask, cfg, bidirectional=False),
                         cross_mask=MaskSpec(q_segment_ids=q_seg, kv_segment_ids=kv_seg),
                         dropout_key=dropout_key)
    x, store, _ = run_layers(p["layers"], cfg, x, store, inputs, cross)
    hidden = _drop(norm(p["final_ln"], x, cfg), cfg, dropout_key, FINAL)
    if cfg.head and cfg.tie_embeddings:  # T5 v1.0: rescale before the tied head
        hidden = hidden * jnp.asarray(cfg.d_model ** -0.5, hidden.dtype)
    return hidden, ({} if fresh else {"store": store.advance(t)})


def encoder_decoder(params, cfg, tokens, decoder_tokens, segment_ids=None,
                    decoder_segment_ids=None, positions=None, decoder_positions=None,
                    dropout_key=None):
    """tokens [B,S], decoder_tokens [B,T] -> (the hidden states the head sees
    [B,T,D], aux) (`decode`; `unembed` maps them to logits).

    Teacher forcing: decoder_tokens are the targets shifted right behind the
    start id (T5: pad = 0). `segment_ids` / `decoder_segment_ids`: 0 = padding
    (see the module docstring for packing). `positions` / `decoder_positions`
    (default arange) feed the relative buckets. `dropout_key` (training only):
    model.dropout / attention_dropout in both stacks (encoder and decoder keys
    folded apart).
    """
    encoded = encode(params, cfg, tokens, segment_ids, positions,
                     dropout_key=site_key(dropout_key, 0))
    return decode(params, cfg, decoder_tokens, cross_kv(params, cfg, encoded),
                  segment_ids=segment_ids,
                  decoder_segment_ids=decoder_segment_ids, positions=decoder_positions,
                  dropout_key=site_key(dropout_key, 1))
