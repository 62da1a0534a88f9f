"""Decoder-only family: Llama, Mistral, Qwen2, GPT-2 and Mixtral from one block.

    hidden, aux = decoder(params, cfg, tokens)                    # training: no cache
    hidden, aux = decoder(params, cfg, tokens, store=Contiguous(cache))   # cached
    logits = unembed(params, hidden, cfg)

Pre-norm residual blocks (`jaxlm.model.block`) over the stacked `layers` axis;
the config picks the norm, MLP (or mixture of experts), biases, positions and
window. The KV store (`jaxlm.model.kv`) decides what the tokens attend to and
where their K/V go; the decoder itself has no cache modes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...errors import ConfigError
from ..adapters import materialize_outside_layers
from ..block import BlockInputs, dense_layer_config, layer_mean, run_layers, run_stacks
from ..config import dtype_of
from ..kv import NO_CACHE, NoCache, own_mask
from ..layers.attention import attention_specs, position_bias
from ..layers.embeddings import embed_tokens_and_positions, embedding_specs, head_specs
from ..layers.fused import fuse_layer
from ..layers.mlp import mlp_specs
from ..layers.moe import moe_specs
from ..layers.norms import norm, norm_specs
from ..layers.positions import learned_position_specs
from ..layers.relative import relative_bias_specs
from ..layers.score import score_specs
from ..mtp import mtp_specs
from ..params import stack
from ...sharding.pipeline import pipelined_layers


def _layer_specs(cfg):
    layer = {"ln1": norm_specs(cfg), "attn": attention_specs(cfg), "ln2": norm_specs(cfg),
             "mlp": moe_specs(cfg) if cfg.moe.n_experts else mlp_specs(cfg)}
    if cfg.norm_position == "sandwich":  # the norms on the sublayers' outputs
        layer.update(ln1_post=norm_specs(cfg), ln2_post=norm_specs(cfg))
    return layer


def decoder_specs(cfg):
    k = cfg.moe.first_dense  # DeepSeek's first dense layers: their own stack
    specs = {"embed": embedding_specs(cfg), "layers": stack(_layer_specs(cfg), cfg.n_layers - k),
             "final_ln": norm_specs(cfg)}
    if k:
        specs["dense_layers"] = stack(_layer_specs(dense_layer_config(cfg)), k)
    if cfg.mtp_depth:  # multi-token prediction: one more layer of the MoE stack's kind each
        specs["mtp"] = mtp_specs(cfg, _layer_specs(cfg))
    if cfg.positions == "learned":
        specs["positions"] = learned_position_specs(cfg)
    if cfg.positions == "t5_relative":
        specs["relative"] = relative_bias_specs(cfg)
    if cfg.lm_head and not cfg.tie_embeddings:  # a base model (HF LlamaModel) has none
        specs["head"] = head_specs(cfg)
    if cfg.num_labels:  # a sequence classifier: the score head instead (no lm_head)
        specs.update(score_specs(cfg, pooler=False))
    return specs


def decoder(params, cfg, tokens, positions=None, segment_ids=None, store=None):
    """tokens [B,S] -> (final-norm hidden states [B,S,D], aux); `unembed` maps them
    to logits.

    store (`jaxlm.model.kv`; default NoCache): without a cache, a full causal
    pass, `segment_ids` (0 = padding) keeping packed documents from attending to
    each other and `positions` restarting per document. With a cache the tokens
    go at the store's positions (default: its lengths + [0, S)) and attend to
    what it holds; aux["store"] is the store with their K/V written and its
    lengths advanced by S. aux["moe"] holds the router stats averaged over
    layers (MoE configs). Params with unstacked layers (`unstack_layers`) run the
    layers unrolled."""
    b, s = tokens.shape
    store = NO_CACHE if store is None else store
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    x, inputs = decoder_inputs(params, cfg, tokens, positions, segment_ids, store)
    x, store, stats = run_stacks(params, cfg, x, store, inputs)
    aux = layer_mean(stats)
    if store is not NO_CACHE:
        aux["store"] = store.advance(s)
    return norm(params["final_ln"], x, cfg), aux


def decoder_inputs(params, cfg, tokens, positions=None, segment_ids=None, store=NO_CACHE):
    """What the layer stack reads: (the embedded tokens x [B,S,D], BlockInputs), for
    `decoder` and for running the layers one at a time (calibration). `params`
    outside the layers already materialized."""
    b, s = tokens.shape
    # default positions (arange) stay implicit in a no-cache mask, so that cuDNN /
    # splash attention can take the call (`kernels.dispatch.call_impl`); biases need them
    implicit = positions is None and isinstance(store, NoCache) \
        and cfg.positions not in ("alibi", "t5_relative")
    if positions is None:
        positions = store.positions(b, s)
    x = embed_tokens_and_positions(params, tokens, positions, cfg)
    mask = store.mask(True, None if implicit else positions, segment_ids,
                      cfg.sliding_window or None)
    inputs = BlockInputs(positions, mask, position_bias(params, mask, cfg, bidirectional=False),
                         None if segment_ids is None else segment_ids > 0)
    return x, inputs


def decoder_pipelined(params, cfg, tokens, positions, segment_ids, pipeline):
    """`decoder` without a cache with the layer stack pipelined over the `stage` mesh
    axis (`jaxlm.sharding.pipeline`, static `pipeline`): embedding and final norm
    outside, on every stage; no attention bias. aux["pipeline"] holds the busy
    stage-ticks and ticks."""
    b, s = tokens.shape
    if cfg.mtp_depth:
        raise ConfigError(f"model.mtp_depth={cfg.mtp_depth} does not run pipelined "
                          "(mesh.stage > 1)")
    if cfg.moe.first_dense:
        raise ConfigError(f"model.moe.first_dense={cfg.moe.first_dense} does not run pipelined "
                          "(mesh.stage > 1)")
    if cfg.layer_pattern:  # the stages would restart the pattern (`over_layers`)
        raise ConfigError(f"model.layer_pattern={cfg.layer_pattern!r} does not run pipelined "
                          "(mesh.stage > 1)")
    params = materialize_outside_layers(params, dtype_of(cfg.dtype))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = embed_tokens_and_positions(params, tokens, positions, cfg)
    window = cfg.sliding_window or None

    def stage_fn(layers, x, side):
        pos, seg = side
        inputs = BlockInputs(pos, own_mask(True, pos, seg, window), None,
                             None if seg is None else seg > 0)
        x, _, stats = run_layers(layers, cfg, x, NO_CACHE, inputs)
        return x, jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)

    x, stats, counts = pipelined_layers(stage_fn, params["layers"], x, (positions, segment_ids),
                                        pipeline)
    n = pipeline.microbatches * cfg.n_layers  # router stats: mean over layers and microbatches
    aux = {"moe": jax.tree.map(lambda a: a / n, stats)} if stats else {}
    return norm(params["final_ln"], x, cfg), {**aux, "pipeline": counts}


def unstack_layers(params):
    """params with the stacked `layers` [L, ...] split into a tuple of L per-layer trees.

    For a decode loop: split once outside the loop, each layer's weights are
    their own loop-invariant buffers that the step's matmuls read in place.
    Scanning the stacked weights instead makes XLA (CPU) copy every layer's
    weights out of the stack on every step (a dynamic slice of the stack
    feeding a dot is materialised), ~2x the weight bytes a step must read.
    The layer stack (`jaxlm.model.block.over_layers`) then runs unrolled (both stacks,
    with model.moe.first_dense)."""
    def split(layers):
        n = jax.tree.leaves(layers)[0].shape[0]
        return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))
    out = dict(params, layers=split(params["layers"]))
    if "dense_layers" in params:
        out["dense_layers"] = split(params["dense_layers"])
    return out


def fuse_projections(params, cfg):
    """Unstacked params (`unstack_layers`) with each layer's q|k|v and gate|up weights
    concatenated (`jaxlm.model.layers.fused.fuse_layer`): for a decode loop, made
    once before it, one matmul per group per step."""
    if cfg.mla.kv_lora_rank:  # latent attention has no q|k|v to fuse
        return params
    return dict(params, layers=tuple(fuse_layer(layer, cfg) for layer in params["layers"]))


__all__ = ["decoder", "decoder_pipelined", "decoder_specs", "unstack_layers",
           "fuse_projections", "layer_mean"]
