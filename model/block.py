"""The one block body and the layer stack every family runs.

    x, store, aux = run_layers(params["layers"], cfg, x, store, BlockInputs(positions, mask))

A block is attention (through the KV store, `jaxlm.model.kv`), then, in an
encoder-decoder's decoder, cross-attention over the encoder's K/V, then the
feed-forward (an MLP, or a mixture of experts), each a residual branch:

    pre-norm  (GPT-2, Llama, T5):  x = x + attn(ln1(x)); [x = x + cross(ln_cross(x))];
                                   x = x + ffn(ln2(x))
    post-norm (BERT):              x = ln1(x + attn(x)); x = ln2(x + ffn(x))
    sandwich  (Gemma 2, 3):        x = x + ln1_post(attn(ln1(x))); x = x + ln2_post(ffn(ln2(x)))

with model.dropout on each branch's output and model.attention_dropout on the
probabilities when `BlockInputs.dropout_key` is given (training). The store is
an argument and rides in the stack's carry, so the same block serves training
(`NoCache`), a prefill or a decode step over a contiguous or a paged cache, and
a recording of every layer's K/V. `over_layers` is the one place that chooses a
scan over stacked layers or an unrolled loop over unstacked ones.

Local / global layers (model.layer_pattern, e.g. Gemma 2's "lg"): the scan runs
over groups of the pattern, one body of len(pattern) layers, each with its own
static config (`layer_config`: its window and RoPE base), so compile time stays
independent of depth and every attention kernel sees a static window; the
layers past the last whole group run unrolled after the scan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ..sharding.rules import constrain
from .adapters import layer_weights
from .config import RopeConfig, dtype_of
from .kernels import MaskSpec, attention
from .kv import NoCache, read_cross
from .layers.attention import mla_absorbed, mla_absorbed_output, output_projection, \
    project_qkv
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
    sandwich = cfg.norm_position == "sandwich"

    h = x if post else norm(layer["ln1"], x, cfg)
    if cfg.mla.kv_lora_rank and not isinstance(store, NoCache):  # the cache holds the latent
        q, k = mla_absorbed(layer["attn"], h, inp.positions, cfg)
        store, o = store.attend(i, q, k, None, inp.mask, inp.bias, cfg)
        o = mla_absorbed_output(layer["attn"], o, cfg)
    else:
        q, k, v = project_qkv(layer["attn"], h, inp.positions, cfg)
        store, o = store.attend(i, q, k, v, inp.mask, inp.bias, cfg, site_key(key, ATTN_PROBS))
    y = drop(output_projection(layer["attn"], o, cfg), ATTN_OUT)
    if sandwich:
        y = norm(layer["ln1_post"], y, cfg)
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
    if sandwich:
        y = norm(layer["ln2_post"], y, cfg)
    return (norm(layer["ln2"], x + y, cfg) if post else x + y), store, stats


@functools.lru_cache(maxsize=256)
def layer_config(cfg, j: int):
    """The config of the layers at place j of model.layer_pattern: a local layer keeps
    model.sliding_window and takes model.rope.local_theta (when set, unscaled); a global
    one has no window. cfg itself without a pattern."""
    if not cfg.layer_pattern:
        return cfg
    if cfg.layer_pattern[j % len(cfg.layer_pattern)] == "g":
        return dataclasses.replace(cfg, layer_pattern="", sliding_window=0)
    rope = RopeConfig(theta=cfg.rope.local_theta) if cfg.rope.local_theta else cfg.rope
    return dataclasses.replace(cfg, layer_pattern="", rope=rope)


@functools.lru_cache(maxsize=64)
def dense_layer_config(cfg):
    """The config of the first model.moe.first_dense layers (their own stack,
    "dense_layers"): a dense MLP of model.moe.dense_d_ff (or d_ff)."""
    m = cfg.moe
    return dataclasses.replace(cfg, d_ff=m.dense_d_ff or cfg.d_ff, moe=dataclasses.replace(
        m, n_experts=0, n_shared=0, first_dense=0, n_groups=1, topk_groups=1))


def run_stacks(params, cfg, x, store, inp: BlockInputs):
    """`run_layers` over the model's stacks: params["dense_layers"] (model.moe.first_dense
    dense layers, when present) and then params["layers"]; -> (x, store, the router stats
    of the experts' stack)."""
    first = 0
    if "dense_layers" in params:
        x, store, _ = run_layers(params["dense_layers"], dense_layer_config(cfg), x, store, inp)
        first = cfg.moe.first_dense
    return run_layers(params["layers"], cfg, x, store, inp, first=first)


def _layer_inputs(inp: BlockInputs, cfg) -> BlockInputs:
    """inp with its mask's window set to this layer config's (patterned layers)."""
    return inp._replace(mask=inp.mask._replace(window=cfg.sliding_window or None))


def run_layers(layers, cfg, x, store, inp: BlockInputs, cross=None, first: int = 0):
    """The block over every layer: -> (x, store, router stats per layer [L, ...] ({}
    without experts; `layer_mean` averages them)). `layers` stacked [L, ...] or unstacked (a tuple,
    `unstack_layers`); `cross`: every layer's encoder K/V stacked [L, ...]; `first`: the
    model's index of the first of these layers (a second stack: the store's layer i).
    Without a cache (training) each block is rematerialized by model.remat."""
    def body_of(j):  # the layers at place j of model.layer_pattern (static config)
        lcfg = layer_config(cfg, j)
        linp = _layer_inputs(inp, lcfg) if cfg.layer_pattern else inp

        def body(carry, xs):
            x, store = carry
            layer, i, cross_i = xs
            x, store, stats = block(layer, x, store, i, linp, lcfg, cross_i)
            return (x, store), stats
        return remat(body, cfg) if type(store) is NoCache else body

    bodies = [body_of(j) for j in range(cfg.layer_period)]
    (x, store), stats = over_layers(lambda c, xs, j: bodies[j](c, xs), (x, store), layers,
                                    cross, cfg.layer_period, first)
    return x, store, stats


def over_layers(fn, carry, layers, extra=None, period: int = 1, first: int = 0):
    """fn(carry, (layer, i, extra_i), j) -> (carry, out) over the layers, j = i % period
    (a Python int: the layer's place in the pattern): `lax.scan` over stacked layers
    [L, ...] (i an int32 array) in groups of `period` layers (the body unrolls one
    group; the L % period layers after the last group run unrolled), or unrolled
    over unstacked ones (a tuple of per-layer trees, `unstack_layers`; i a Python
    int). `extra`: a tree with a leading layer axis [L, ...] (or None) sliced
    alongside; `first` is added to i. -> (carry, the outs stacked [L, ...])."""
    take = lambda tree, i: None if tree is None else jax.tree.map(lambda a: a[i], tree)  # noqa
    if isinstance(layers, (list, tuple)):
        outs = []
        for i, layer in enumerate(layers):
            carry, out = fn(carry, (layer, first + i, take(extra, i)), i % period)
            outs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    n = jax.tree.leaves(layers)[0].shape[0]
    ids = jnp.arange(first, first + n, dtype=jnp.int32)
    if period == 1:
        return jax.lax.scan(lambda c, xs: fn(c, xs, 0), carry, (layers, ids, extra))
    groups = n // period
    whole = groups * period
    group = lambda a: (a if whole == n else a[:whole]).reshape(groups, period, *a.shape[1:])  # noqa

    def body(carry, xs):
        outs = []
        for j in range(period):
            carry, out = fn(carry, take(xs, j), j)
            outs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    outs = []
    if groups:
        carry, out = jax.lax.scan(body, carry, jax.tree.map(group, (layers, ids, extra)))
        outs.append(jax.tree.map(lambda a: a.reshape(whole, *a.shape[2:]), out))
    for i in range(whole, n):  # the tail: fewer than `period` layers
        carry, out = fn(carry, take((layers, ids, extra), i), i % period)
        outs.append(jax.tree.map(lambda a: a[None], out))
    return carry, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def layer_mean(stats) -> dict:
    """Per-layer router stats [L, ...] -> {"moe": their mean over layers} ({} for none)."""
    return {"moe": jax.tree.map(lambda a: jnp.mean(a, axis=0), stats)} if stats else {}
