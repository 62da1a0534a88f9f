"""Decoder-only family (Llama style): pre-norm blocks scanned over layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.model.kernels import MaskSpec, attention
from jaxlm.model.layers.attention import attention_specs, output_projection, project_qkv, self_attention
from jaxlm.model.layers.embeddings import embed, embedding_specs, head_specs, unembed
from jaxlm.model.layers.mlp import mlp, mlp_specs
from jaxlm.model.layers.norms import norm, norm_specs
from jaxlm.model.params import stack

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decoder_specs(cfg):
    layer = {"ln1": norm_specs(cfg), "attn": attention_specs(cfg),
             "ln2": norm_specs(cfg), "mlp": mlp_specs(cfg)}
    specs = {"embed": embedding_specs(cfg), "layers": stack(layer, cfg.n_layers),
             "final_ln": norm_specs(cfg)}
    if not cfg.tie_embeddings:
        specs["head"] = head_specs(cfg)
    return specs


def remat(fn, cfg):
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=False)


def decoder(params, cfg, tokens, positions=None, segment_ids=None, cache=None,
            return_hidden=False):
    """tokens [B,S] -> (logits [B,S,V] float32, aux).

    `return_hidden`: return the final-norm hidden states [B,S,D] instead of
    logits (`jaxlm.model.unembed` maps them to logits; the chunked loss and
    prefill use it to skip logits they do not need).

    Without a cache: a full causal pass; `segment_ids` (0 = padding) keep
    packed documents from attending to each other, `positions` restart per
    document. With a cache ({"k", "v": [L,B,T,KVH,D], "lengths": [B]}): the
    tokens are written at positions lengths[b] + i, attend to everything
    before them in the cache, and aux["cache"] is the updated cache with
    lengths advanced by S.
    """
    b, s = tokens.shape
    x = embed(params["embed"], tokens, cfg)
    if cache is None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = MaskSpec(causal=True, q_positions=positions, kv_positions=positions,
                        q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        if segment_ids is None:  # positions are plain aranges: default causal mask
            mask = MaskSpec(causal=True)

        def block(x, layer):
            x = x + self_attention(layer["attn"], norm(layer["ln1"], x, cfg), positions, mask, cfg)
            return x + mlp(layer["mlp"], norm(layer["ln2"], x, cfg), cfg), None

        x, _ = jax.lax.scan(remat(block, cfg), x, params["layers"])
        aux = {}
    else:
        x, cache = _decode_layers(params, cfg, x, cache)
        aux = {"cache": cache}
    hidden = norm(params["final_ln"], x, cfg)
    return (hidden if return_hidden else unembed(params, hidden, cfg)), aux


def _decode_layers(params, cfg, x, cache):
    b, s = x.shape[:2]
    lengths = cache["lengths"]
    positions = lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None]  # [B,S]
    max_len = cache["k"].shape[2]
    mask = MaskSpec(causal=True, q_positions=positions,
                    kv_positions=jnp.arange(max_len, dtype=jnp.int32)[None],
                    kv_lengths=lengths + s)
    rows = jnp.arange(b)[:, None]

    def block(carry, layer_and_index):
        x, ck, cv = carry
        layer, i = layer_and_index
        p = layer["attn"]
        q, k, v = project_qkv(p, norm(layer["ln1"], x, cfg), positions, cfg)
        ck = ck.at[i, rows, positions].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[i, rows, positions].set(v.astype(cv.dtype), mode="drop")
        o = attention(q, ck[i].astype(q.dtype), cv[i].astype(q.dtype), mask,
                      impl=cfg.attention_impl)
        x = x + output_projection(p, o, cfg)
        x = x + mlp(layer["mlp"], norm(layer["ln2"], x, cfg), cfg)
        return (x, ck, cv), None

    layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    (x, ck, cv), _ = jax.lax.scan(block, (x, cache["k"], cache["v"]), (params["layers"], layer_ids))
    return x, {"k": ck, "v": cv, "lengths": lengths + s}
