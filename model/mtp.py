"""Multi-token prediction (DeepSeek-V3): model.mtp_depth sequential modules after the model.

Module k (1..D) at position i reads the hidden state of the depth before, h_{k-1}[i]
(the model's final-norm hidden state for k = 1, module k - 1's output otherwise),
and the embedding of token i + k:

    x = eh_proj([enorm(embed(t[i + k])), hnorm(h_{k-1}[i])])     # [2D] -> [D]
    h_k = block(x)              # one layer of the model's own kind (model/block.py)
    logits_k[i] = head(norm(h_k[i]))                             # predicts t[i + k + 1]

The embedding and the output head are the model's (shared). Each module's block
attends causally over positions i, through a KV store like any layer (store layer
k - 1): training passes NoCache; speculative decoding (`jaxlm.infer.speculative`,
generate draft="mtp") a cache of model.mtp_depth layers. params["mtp"] holds the
modules stacked [D, ...]: {"enorm", "hnorm", "eh_proj", "block", "norm"}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .block import BlockInputs, block, remat
from .kv import NO_CACHE, NoCache
from .layers.dense import dense
from .layers.embeddings import embed
from .layers.norms import norm, norm_specs
from .params import Spec, normal, stack


def mtp_specs(cfg, layer_specs):
    """The model.mtp_depth modules, stacked; `layer_specs`: one layer of the model's."""
    one = {"enorm": norm_specs(cfg), "hnorm": norm_specs(cfg),
           "eh_proj": Spec((2 * cfg.d_model, cfg.d_model), (None, "embed"),
                           normal(cfg.init_std), cfg.param_dtype),
           "block": layer_specs, "norm": norm_specs(cfg)}
    return stack(one, cfg.mtp_depth)


def module_params(params, k: int):
    """Module k's weights (k from 0) out of the stack."""
    return jax.tree.map(lambda a: a[k], params["mtp"])


def mtp_module(params, cfg, k: int, hidden, tokens, store, inputs: BlockInputs):
    """Module k (from 0): hidden [B, S, D] (depth k's input), tokens [B, S] (t[i + k + 1])
    -> (its output [B, S, D] before its norm, store, router stats)."""
    m = module_params(params, k)
    e = norm(m["enorm"], embed(params["embed"], tokens, cfg), cfg)
    x = jnp.concatenate([e, norm(m["hnorm"], hidden, cfg).astype(e.dtype)], axis=-1)
    x = dense(x, m["eh_proj"])  # "bs(2d),(2d)d->bsd"

    def run(x, store):
        x, store, stats = block(m["block"], x, store, k, inputs, cfg)
        return x, store, stats
    if type(store) is NoCache:
        run = remat(run, cfg)
    return run(x, store)


def mtp_normed(params, h, k: int, cfg):
    """Module k's output as its head reads it (shared_head.norm)."""
    return norm(module_params(params, k)["norm"], h, cfg)


def shifted(x, k: int, fill=0):
    """x [B, S, ...] moved left by k along seq: out[:, i] = x[:, i + k], `fill` past the end."""
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_batch(batch, depth: int):
    """The inputs of every module, by position i of the model's batch (so that they travel
    with it, e.g. through the context-parallel reorder): "mtp_tokens" [B, S, D] t[i + k]
    (module k's input), "mtp_targets" [B, S, D] targets[i + k] (t[i + k + 1]) and
    "mtp_mask" [B, S, D] (the target counted: inside the row and the same document)."""
    tokens, targets = batch["tokens"], batch["targets"]
    mask = batch["loss_mask"].astype(jnp.float32)
    seg = batch.get("segment_ids")
    cols = {"mtp_tokens": [], "mtp_targets": [], "mtp_mask": []}
    for k in range(1, depth + 1):
        m = shifted(mask, k)
        if seg is not None:
            m = m * (shifted(seg, k, -1) == seg)
        cols["mtp_tokens"].append(shifted(tokens, k))
        cols["mtp_targets"].append(shifted(targets, k))
        cols["mtp_mask"].append(m)
    return {**batch, **{n: jnp.stack(v, axis=-1) for n, v in cols.items()}}


def mtp_hiddens(params, cfg, hidden, batch, dropout_key=None):
    """Training: every module over the batch (`mtp_batch`'s columns), each from the
    previous depth's output -> [model.mtp_depth normed hidden states [B, S, D]]."""
    positions = batch.get("positions")
    seg = batch.get("segment_ids")
    b, s = batch["tokens"].shape
    if positions is None:
        positions = NO_CACHE.positions(b, s)
    mask = NO_CACHE.mask(True, positions, seg, cfg.sliding_window or None)
    inputs = BlockInputs(positions, mask, None, None if seg is None else seg > 0,
                         dropout_key=dropout_key)
    out, h = [], hidden
    for k in range(cfg.mtp_depth):
        h, _, _ = mtp_module(params, cfg, k, h, batch["mtp_tokens"][..., k], NO_CACHE, inputs)
        out.append(mtp_normed(params, h, k, cfg))
    return out


__all__ = ["mtp_specs", "mtp_module", "mtp_normed", "mtp_batch", "mtp_hiddens", "shifted"]
