"""Projections that read the same input, concatenated into one weight for decoding.

At decode batch sizes a matmul is [B, D] @ [D, N] with a small B: XLA:CPU runs
each as its own kernel call with its own packing and thread hand-off, so three
(q, k, v) or two (gate, up) such calls cost more than one over the concatenated
output axis. `fuse_layer` makes the concatenated weights once per generate call
(outside the decode loop, beside `unstack_layers`); `project_qkv` and `mlp`
split the one product back. Same dot products, one kernel.

Weights that are plain arrays or `QuantizedWeight`s of one format (codes, scales
and zero points concatenated along the same output axis) fuse; LoRA-adapted ones do
not. Under a mesh that shards an output axis (heads, kv_heads, mlp) the layer
stays unfused: a concatenation of tensor-parallel shards is not a shard.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..adapters import QuantizedWeight, concatenate, is_node
from ...sharding.rules import active_mesh, partition_spec

QKV = ("q", "k", "v")
GATE_UP = ("gate", "up")


def _fusable(ws) -> bool:
    """All plain arrays or all QuantizedWeights of one format with one group size (no
    LoRA, no mix, no double-quantized scales: their blocks run along the output)."""
    if not any(is_node(w) for w in ws):
        return True
    return (all(isinstance(w, QuantizedWeight) and w.scale2 is None for w in ws)
            and len({(w.fmt, w.group, w.zero is None) for w in ws}) == 1)


def _outputs_replicated(*logical) -> bool:
    """Whether no active mesh axis of size > 1 shards these logical axes."""
    active = active_mesh()
    if active is None:
        return True
    mesh, rules = active
    for entry in partition_spec(logical, rules):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if any(mesh.shape[a] > 1 for a in names):
            return False
    return True


def fuse(p: dict, names, fused: str, axis: int, bias_axis: int) -> dict:
    """p with the weights `names` (and their `_bias`es, all or none) replaced by one
    `fused` weight concatenated along the output `axis` (biases along `bias_axis`)."""
    if not all(n in p for n in names) or not _fusable([p[n] for n in names]):
        return p
    out = {k: v for k, v in p.items() if k not in names and k.removesuffix("_bias") not in names}
    out[fused] = concatenate([p[n] for n in names], axis)
    biases = [n + "_bias" for n in names if n + "_bias" in p]
    if len(biases) == len(names):
        out[fused + "_bias"] = jnp.concatenate([p[b] for b in biases], bias_axis)
    elif biases:  # some biased, some not: keep the layer as it is
        return p
    return out


def fuse_layer(layer: dict, cfg) -> dict:
    """One layer's tree with q|k|v fused into attn "qkv" [D, H + 2 KVH, hd] and, for
    a gated dense MLP, gate|up into mlp "gate_up" [D, 2 F] (see the module doc)."""
    out = dict(layer)
    if _outputs_replicated("heads", "kv_heads"):
        out["attn"] = fuse(layer["attn"], QKV, "qkv", axis=1, bias_axis=0)
    if not cfg.moe.n_experts and _outputs_replicated("mlp"):
        out["mlp"] = fuse(layer["mlp"], GATE_UP, "gate_up", axis=1, bias_axis=0)
    return out
