"""The one block body and the layer stack every family runs.

    x, store, aux = run_layers(params["layers"], cfg, x, store, BlockInputs(positions, mask))

A block is attention (through the KV store, `jaxlm.model.kv`), then, in an
encoder-decoder's decoder, cross-attention over the encoder's K/V, then the
feed-forward (an MLP, or a mixture of experts), each a residual branch:

    pre-norm  (GPT-2, Llama, T5):  x = x + attn(ln1(x)); [x = x + cross(ln_cross(x))];
                                   x = x + ffn(ln2(x))
    post-norm (BERT):              x = ln1(x + attn(x)); x = ln2(x + ffn(x))

with model.dropout on each branch's output and model.attention_dropout on the
probabilities when `BlockInputs.dropout_key` is given (training). The store is
an argument and rides in the stack's carry, so the same block serves training
(`NoCache`), a prefill or a decode step over a contiguous or a paged cache, and
a recording of every layer's K/V. `over_layers` is the one place that chooses a
scan over stacked layers or an unrolled loop over unstacked ones.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..sharding.rules import constrain
from .adapters import layer_weights
from .config import dtype_of
from .kernels import MaskSpec, attention
from .kv import NoCache, read_cross
from .layers.attention import output_projection, project_qkv
from .layers.dense import dense
from .layers.dropout import ATTN_OUT, ATTN_PROBS, CROSS_OUT, CROSS_PROBS, MLP_OUT, dropout, \
    site_key
from .layers.mlp import mlp
from .layers.moe import moe
from .layers.norms import norm

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockInputs(NamedTuple):
    """What every layer of one call reads besides its weights (a pytree)."""
    positions: jax.Array  # [B, S] the tokens' positions (RoPE)
    mask: MaskSpec  # what the tokens see (`store.mask`)
    bias: Optional[jax.Array] = None  # [B or 1, H, S, Sk] ALiBi / T5 relative
    token_mask: Optional[jax.Array] = None  # [B, S] bool: real tokens (MoE capacity)
    cross_mask: Optional[MaskSpec] = None  # encoder-decoder: decoder -> encoder positions
    dropout_key: Optional[jax.Array] = None  # training: model.dropout / attention_dropout


def remat(fn, cfg):
    if cfg.remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT[cfg.remat], prevent_cse=False)


def feed_forward(layer, h, cfg, token_mask=None):
    """MLP or MoE on the normed input h -> (output, router stats ({} for an MLP))."""
    if cfg.moe.n_experts:
        return moe(layer["mlp"], h, cfg, token_mask)
    return mlp(layer["mlp"], h, cfg), {}


def block(layer, x, store, i, inp: BlockInputs, cfg, cross=None):
    """One layer: x [B, S, D] -> (x, store, router stats). `cross`: this layer's
    cached encoder K/V {"k", "v": [B, Sk, KVH, D]} (+ int8 scales), for the
    cross-attention sublayer of an encoder-decoder's decoder."""
    layer = layer_weights(layer, dtype_of(cfg.dtype))  # LoRA merged; int8 stays int8 (dense)
    key = site_key(inp.dropout_key, i)  # this layer's (None: no dropout)
    drop = lambda y, site: dropout(y, cfg.dropout, site_key(key, site))  # noqa: E731
    post = cfg.norm_position == "post"

    q, k, v = project_qkv(layer["attn"], x if post else norm(layer["ln1"], x, cfg),
                          inp.positions, cfg)
    store, o = store.attend(i, q, k, v, inp.mask, inp.bias, cfg, site_key(key, ATTN_PROBS))
    y = drop(output_projection(layer["attn"], o, cfg), ATTN_OUT)
    x = norm(layer["ln1"], x + y, cfg) if post else x + y
    if cross is not None:
        q = constrain(dense(norm(layer["ln_cross"], x, cfg), layer["cross"]["q"]),
                      ("batch", "seq", "heads", "head_dim"))
        o = attention(q, *read_cross(cross, q.dtype), inp.cross_mask, None,
                      impl=cfg.attention_impl, scale=cfg.attn_scale or None,
                      dropout_rate=cfg.attention_dropout,
                      dropout_key=site_key(key, CROSS_PROBS))
        x = x + drop(output_projection(layer["cross"], o, cfg), CROSS_OUT)
    y, stats = feed_forward(layer, x if post else norm(layer["ln2"], x, cfg), cfg,
                            inp.token_mask)
    y = drop(y, MLP_OUT)
    return (norm(layer["ln2"], x + y, cfg) if post else x + y), store, stats


def run_layers(layers, cfg, x, store, inp: BlockInputs, cross=None):
    """The block over every layer: -> (x, store, router stats per layer [L, ...] ({}
    without experts; `layer_mean` averages them)). `layers` stacked [L, ...] or unstacked (a tuple,
    `unstack_layers`); `cross`: every layer's encoder K/V stacked [L, ...]. Without
    a cache (training) each block is rematerialized by model.remat."""
    def body(carry, xs):
        x, store = carry
        layer, i, cross_i = xs
        x, store, stats = block(layer, x, store, i, inp, cfg, cross_i)
        return (x, store), stats

    if type(store) is NoCache:
        body = remat(body, cfg)
    (x, store), stats = over_layers(body, (x, store), layers, cross)
    return x, store, stats


def over_layers(fn, carry, layers, extra=None):
    """fn(carry, (layer, i, extra_i)) -> (carry, out) over the layers: `lax.scan`
    over stacked layers [L, ...] (i an int32 array), or unrolled over unstacked
    ones (a tuple of per-layer trees, `unstack_layers`; i a Python int). `extra`:
    a tree with a leading layer axis [L, ...] (or None) sliced alongside.
    -> (carry, the outs stacked [L, ...])."""
    if isinstance(layers, (list, tuple)):
        outs = []
        for i, layer in enumerate(layers):
            extra_i = None if extra is None else jax.tree.map(lambda a, i=i: a[i], extra)
            carry, out = fn(carry, (layer, i, extra_i))
            outs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    ids = jnp.arange(jax.tree.leaves(layers)[0].shape[0], dtype=jnp.int32)
    return jax.lax.scan(fn, carry, (layers, ids, extra))


def layer_mean(stats) -> dict:
    """Per-layer router stats [L, ...] -> {"moe": their mean over layers} ({} for none)."""
    return {"moe": jax.tree.map(lambda a: jnp.mean(a, axis=0), stats)} if stats else {}
