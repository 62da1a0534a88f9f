"""Decoder-only family: Llama, Mistral, Qwen2, GPT-2 and Mixtral from one block.

Pre-norm residual blocks scanned over the stacked `layers` axis; the config
picks the norm, MLP (or mixture of experts), biases, positions and window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...infer.cache import (cache_length, constrain_cache, is_split, read_kv, write_kv,
                              write_kv_block)
from ..adapters import layer_weights, materialize_outside_layers
from ..config import dtype_of
from ..kernels import MaskSpec
from ..layers.attention import (attend, attention_specs, output_projection,
                                          position_bias, project_qkv)
from ..layers.embeddings import (embed_tokens_and_positions, embedding_specs,
                                           head_specs, unembed)
from ..layers.fused import fuse_layer
from ..layers.mlp import mlp, mlp_specs
from ..layers.moe import moe, moe_specs
from ..layers.norms import norm, norm_specs
from ..layers.positions import learned_position_specs
from ..layers.relative import relative_bias_specs
from ..params import stack
from ...sharding.context import context_size
from ...sharding.pipeline import pipelined_layers, stage_count

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decoder_specs(cfg):
    layer = {"ln1": norm_specs(cfg), "attn": attention_specs(cfg), "ln2": norm_specs(cfg),
             "mlp": moe_specs(cfg) if cfg.moe.n_experts else mlp_specs(cfg)}
    specs = {"embed": embedding_specs(cfg), "layers": stack(layer, cfg.n_layers),
             "final_ln": norm_specs(cfg)}
    if cfg.positions == "learned":
        specs["positions"] = learned_position_specs(cfg)
    if cfg.positions == "t5_relative":
        specs["relative"] = relative_bias_specs(cfg)
    if cfg.head and not cfg.tie_embeddings:  # a base model (HF LlamaModel) has none
        specs["head"] = head_specs(cfg)
    return specs


def remat(fn, cfg):
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=False)


def _feed_forward(layer, x, cfg, token_mask):
    """MLP or MoE on the normed input; MoE also returns its router stats."""
    h = norm(layer["ln2"], x, cfg)
    if cfg.moe.n_experts:
        return moe(layer["mlp"], h, cfg, token_mask)
    return mlp(layer["mlp"], h, cfg), {}


def decoder(params, cfg, tokens, positions=None, segment_ids=None, cache=None,
            return_hidden=False, pipeline=None, fresh_cache=False, return_kv=False):
    """tokens [B,S] -> (logits [B,S,V] float32, aux).

    Without a cache: a full causal pass; `segment_ids` (0 = padding) keep
    packed documents from attending to each other, `positions` restart per
    document. With a cache ({"k", "v": [L,B,T,KVH,D], "lengths": [B]}): the
    tokens are written at positions lengths[b] + i, attend to everything
    before them in the cache, and aux["cache"] is the updated cache with
    lengths advanced by S. aux["moe"] holds the router stats averaged over
    layers (MoE configs). `return_hidden`: return the final-norm hidden states
    [B,S,D] instead of logits (`jaxlm.model.unembed` maps them to logits).
    `pipeline` (a `jaxlm.sharding.pipeline.Pipeline`, static): under a mesh with
    `stage` > 1 the layer stack runs pipelined over the stages (embedding and head
    outside, on every stage); aux["pipeline"] holds the busy stage-ticks and ticks.
    `fresh_cache` (static): the caller guarantees the cache is empty (lengths 0),
    so the tokens attend only to each other; under a context mesh their attention
    is then ring attention over their own K/V (see `_cached_layers`).
    `return_kv` (static; without a cache, not pipelined): aux["kv"] = {"k", "v":
    [L,B,S,KVH,D]}, each layer's keys (after RoPE) and values, as a cache holds
    them (a packed prefill writes them into a paged cache, `jaxlm.infer.engine`).
    Params with unstacked layers (`unstack_layers`) run the layers unrolled.
    """
    b, s = tokens.shape
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    # default positions (arange) stay implicit in the mask, so that cuDNN / splash
    # attention can take the call (`kernels.dispatch.call_impl`); biases need them
    implicit = positions is None and cfg.positions not in ("alibi", "t5_relative")
    if cache is not None:
        positions = cache["lengths"][:, None] + jnp.arange(s, dtype=jnp.int32)[None]
    elif positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = embed_tokens_and_positions(params, tokens, positions, cfg)
    window = cfg.sliding_window or None
    if cache is None:
        at = None if implicit else positions
        mask = MaskSpec(causal=True, q_positions=at, kv_positions=at,
                        q_segment_ids=segment_ids, kv_segment_ids=segment_ids, window=window)
        if pipeline is not None and stage_count() > 1:
            if return_kv:
                raise ValueError("return_kv is not available on a pipelined forward")
            x, aux = _pipelined_layers(params, cfg, x, positions, segment_ids, pipeline)
        else:
            x, aux = _layers(params, cfg, x, positions, mask, segment_ids, return_kv)
    else:
        x, aux = _cached_layers(params, cfg, x, positions, cache, window, fresh_cache)
    hidden = norm(params["final_ln"], x, cfg)
    return (hidden if return_hidden else unembed(params, hidden, cfg)), aux


def _layers(params, cfg, x, positions, mask, segment_ids, return_kv=False):
    bias = position_bias(params, mask, cfg, bidirectional=False)
    x, per_layer = _scan_layers(params["layers"], cfg, x, positions, mask, segment_ids, bias,
                                return_kv)
    if not return_kv:
        return x, _layer_mean(per_layer)
    stats, (k, v) = per_layer
    return x, dict(_layer_mean(stats), kv={"k": k, "v": v})


def _pipelined_layers(params, cfg, x, positions, segment_ids, pipeline):
    """`_layers` over the pipeline stages (sharding/pipeline.py); no attention bias."""
    window = cfg.sliding_window or None

    def stage_fn(layers, x, side):
        pos, seg = side
        mask = MaskSpec(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                        kv_segment_ids=seg, window=window)
        x, stats = _scan_layers(layers, cfg, x, pos, mask, seg, None)
        return x, jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)

    x, stats, counts = pipelined_layers(stage_fn, params["layers"], x, (positions, segment_ids),
                                        pipeline)
    n = pipeline.microbatches * cfg.n_layers  # router stats: mean over layers and microbatches
    aux = {"moe": jax.tree.map(lambda a: a / n, stats)} if stats else {}
    return x, {**aux, "pipeline": counts}


def _scan_layers(layers, cfg, x, positions, mask, segment_ids, bias, return_kv=False):
    """(x after the stacked `layers` [L, ...], per-layer stats [L, ...]; with
    return_kv, (stats, (k, v [L, B, S, KVH, D]))). Unstacked layers (a tuple,
    `unstack_layers`) run unrolled."""
    token_mask = None if segment_ids is None else segment_ids > 0

    def block(x, layer):
        layer = layer_weights(layer, dtype_of(cfg.dtype))  # LoRA merged; int8 stays int8 (dense)
        h = norm(layer["ln1"], x, cfg)
        q, k, v = project_qkv(layer["attn"], h, positions, cfg)
        x = x + output_projection(layer["attn"], attend(q, k, v, mask, cfg, bias), cfg)
        y, stats = _feed_forward(layer, x, cfg, token_mask)
        return x + y, ((stats, (k, v)) if return_kv else stats)

    block = remat(block, cfg)
    return over_layers(lambda x, layer_and_index: block(x, layer_and_index[0]), x, layers)


def over_layers(block, carry, layers):
    """block(carry, (layer, i)) -> (carry, out) over the layers: `lax.scan` over
    stacked layers [L, ...] (i an int32 array), or unrolled over unstacked ones
    (a tuple of per-layer trees, `unstack_layers`; i a Python int). -> (carry,
    the outs stacked [L, ...])."""
    if isinstance(layers, (list, tuple)):
        outs = []
        for i, layer in enumerate(layers):
            carry, out = block(carry, (layer, i))
            outs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    ids = jnp.arange(jax.tree.leaves(layers)[0].shape[0], dtype=jnp.int32)
    return jax.lax.scan(block, carry, (layers, ids))


def _cached_layers(params, cfg, x, positions, cache, window, fresh=False):
    """The layers over a KV cache. `fresh` under a context mesh (a prompt prefilled
    into an empty cache): self-attention over the prompt's own seq-sharded K/V, i.e.
    the ring (in the prompt's array order: contiguous chunks, so that each device's
    chunk is its own block of the seq-sharded cache, written in place by
    `write_kv_block`), instead of attending over the whole cache, which would gather
    the sequence."""
    b, s = x.shape[:2]
    lengths = cache["lengths"]
    max_len = cache_length(cache)
    ring = fresh and context_size() > 1
    if ring:
        mask = MaskSpec(causal=True, q_positions=positions, kv_positions=positions,
                        window=window)
    else:
        mask = MaskSpec(causal=True, q_positions=positions,
                        kv_positions=jnp.arange(max_len, dtype=jnp.int32)[None],
                        kv_lengths=lengths + s, window=window)
    rows = jnp.arange(b)[:, None]
    bias = position_bias(params, mask, cfg, bidirectional=False)
    split = is_split(cache)

    # The cache (k, v and, when int8, their scales) rides in the carry; each
    # layer scatters its new K/V in place and attends over its slice (its own
    # buffer when the cache is split per layer, `infer.cache.split_layers`).
    def block(carry, layer_and_index):
        x, kv = carry
        layer, i = layer_and_index
        layer = layer_weights(layer, dtype_of(cfg.dtype))
        q, k, v = project_qkv(layer["attn"], norm(layer["ln1"], x, cfg), positions, cfg)
        if ring:
            kv = write_kv_block(kv, i, k, v)  # attend what the cache holds (int8: dequantized)
            o = attend(q, *(c[:, :s] for c in read_kv(kv, i, q.dtype)), mask, cfg, bias)
        else:  # a split cache is head-major (`split_layers`)
            kv = write_kv(kv, i, rows, positions, k, v)
            o = attend(q, *read_kv(kv, i, q.dtype), mask, cfg, bias, kv_heads_major=split)
        x = x + output_projection(layer["attn"], o, cfg)
        y, stats = _feed_forward(layer, x, cfg, None)
        return (x + y, kv), stats

    per_layer = {n: a for n, a in cache.items() if n != "lengths"}
    if split and not isinstance(params["layers"], (list, tuple)):
        raise ValueError("a cache split per layer (split_layers) needs unstacked layers "
                         "(unstack_layers)")
    (x, kv), stats = over_layers(block, (x, per_layer), params["layers"])
    aux = _layer_mean(stats)
    aux["cache"] = constrain_cache(dict(kv, lengths=lengths + s))
    return x, aux


def unstack_layers(params):
    """params with the stacked `layers` [L, ...] split into a tuple of L per-layer trees.

    For a decode loop: split once outside the loop, each layer's weights are
    their own loop-invariant buffers that the step's matmuls read in place.
    Scanning the stacked weights instead makes XLA (CPU) copy every layer's
    weights out of the stack on every step (a dynamic slice of the stack
    feeding a dot is materialised), ~2x the weight bytes a step must read.
    The cached forward (`decoder(..., cache=...)`) then runs the layers as an
    unrolled Python loop."""
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return dict(params, layers=tuple(jax.tree.map(lambda a, i=i: a[i], layers)
                                     for i in range(n)))


def fuse_projections(params, cfg):
    """Unstacked params (`unstack_layers`) with each layer's q|k|v and gate|up weights
    concatenated (`jaxlm.model.layers.fused.fuse_layer`): for a decode loop, made
    once before it, one matmul per group per step."""
    return dict(params, layers=tuple(fuse_layer(layer, cfg) for layer in params["layers"]))


def _layer_mean(stats):
    return {"moe": jax.tree.map(lambda a: jnp.mean(a, axis=0), stats)} if stats else {}
