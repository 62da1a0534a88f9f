"""Weights that are not plain arrays: LoRA-adapted and quantized, as pytree nodes.

Each family calls `layer_weights` on one layer's slice at the top of its
scanned block (so only one layer's merged LoRA weights exist at a time) and
`materialize_outside_layers` on the rest at the top of its forward. Quantized
weights stay quantized through `layer_weights`: the matmul helpers of
`jaxlm.model.layers.dense` take a QuantizedWeight and dequantize in the matmul.
Plain arrays pass through untouched, so plain params cost nothing.

* `QuantizedWeight(q, scale, zero, scale2)`: int8 / fp8 / int4 / nf4 codes and their
  scales, shaped like the weight (model/qformat.py: the formats, packing, rounding and
  dequantization; `lax.scan` slices every child alike).
* `LoraWeight(base, a, b, scale)`: the weight `base + scale * a @ b`, with
  `a [..., *in, r]`, `b [..., r, *out]` (`...`: stacked axes such as
  `layers`) and the static `scale = alpha / r`. `base` may be quantized.

Both are registered pytree dataclasses whose children are arrays stacked
like their weight, so `lax.scan` over params slices them per layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import qformat
from .qformat import QuantizedWeight, dequantize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    base: jax.Array | QuantizedWeight
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)

    @property
    def shape(self):
        return self.base.shape


def is_node(x) -> bool:
    return isinstance(x, (LoraWeight, QuantizedWeight))


def quantize(w, in_axes: tuple[int, ...], fmt: str = "int8", group: int = 0,
             double: bool = False) -> QuantizedWeight:
    """Round-to-nearest `fmt` weights (model/qformat.py) over the contracted `in_axes`
    (contiguous, followed by the output axes): per output channel for int8 / fp8,
    per `group` input rows for int4 / nf4 (0: per channel); `double`: double-quantized
    scales (QLoRA)."""
    return qformat.quantize(w, len(in_axes), w.ndim - in_axes[-1] - 1, fmt, group, double)


# latent attention's projections (q_a, q_b, kv_a, kv_b) are attention matmuls too
_QKV, _ATTN, _MLP = ("q", "k", "v", "q_a", "q_b", "kv_a", "kv_b"), ("attn", "cross"), \
    ("up", "gate", "down")
# the layer stacks (DeepSeek's dense first layers, its multi-token prediction modules)
STACKS = ("layers", "dense_layers", "mtp")


def _lead(axes) -> int:
    """Number of stacked leading axes (`layers`, then `experts`)."""
    n = 0
    while n < len(axes) and axes[n] in ("layers", "experts"):
        n += 1
    return n


def matmul_in_axes(path: tuple[str, ...], spec) -> tuple[int, ...] | None:
    """The input (contracted) axes of a layer matmul weight (attention q/k/v/o and
    cross-attention, MLP up/gate/down, expert weights, the MoE router), or None if
    `path` (e.g. ("layers", "attn", "q")) with Spec `spec` is not one."""
    if not set(STACKS) & set(path) or len(path) < 2:
        return None
    parent, name = path[-2], path[-1]
    lead = _lead(spec.axes)
    if parent in _ATTN and name in _QKV:
        n_in = 1
    elif parent in _ATTN and name == "o":
        n_in = 2
    elif (parent == "mlp" and (name in _MLP or name == "router")) or (
            parent == "shared" and name in _MLP):  # the MoE's shared experts
        n_in = 1
    else:
        return None
    return tuple(range(lead, lead + n_in)) if len(spec.shape) >= lead + 2 else None


def lora_delta(a, b, base_ndim: int, dtype=None):
    """a [*lead, *in, r] @ b [*lead, r, *out] -> [*lead, *in, *out] (batched over lead)."""
    r = a.shape[-1]
    n_lead = a.ndim + b.ndim - 2 - base_ndim
    lead = a.shape[:n_lead]
    dtype = dtype or a.dtype
    k = math.prod(a.shape[n_lead:-1])
    a2 = a.astype(dtype).reshape(*lead, k, r)
    b2 = b.astype(dtype).reshape(*lead, r, -1)
    return jnp.matmul(a2, b2).reshape(*lead, *a.shape[n_lead:-1], *b.shape[n_lead + 1:])


def _plain(x, dtype):
    if isinstance(x, QuantizedWeight):
        return dequantize(x, dtype or jnp.float32)
    if isinstance(x, LoraWeight):
        base = _plain(x.base, dtype)
        dt = dtype or base.dtype
        delta = lora_delta(x.a, x.b, base.ndim, dt)
        return base.astype(dt) + jnp.asarray(x.scale, dt) * delta
    return x


def materialize(tree, dtype=None):
    """Every LoraWeight / QuantizedWeight in `tree` as a plain array (in `dtype`,
    default: the base's dtype, float32 for int8 bases); plain leaves unchanged."""
    return jax.tree.map(lambda x: _plain(x, dtype), tree, is_leaf=is_node)


def layer_weights(tree, dtype=None):
    """One layer's weights as its matmuls take them: each LoraWeight merged into a
    plain array (in `dtype`; over an int8 base too), each QuantizedWeight kept
    (`dense.dense` dequantizes it in the matmul); plain leaves unchanged."""
    return jax.tree.map(lambda x: x if isinstance(x, QuantizedWeight) else _plain(x, dtype),
                        tree, is_leaf=is_node)


def concatenate(ws, axis: int):
    """Weights (plain arrays or QuantizedWeights, not mixed) joined along an output
    `axis` (e.g. q|k|v along heads): an int8 weight's scales join along the same axis."""
    if isinstance(ws[0], QuantizedWeight):  # q, scale and zero share the output axes
        join = lambda name: None if getattr(ws[0], name) is None else jnp.concatenate(  # noqa: E731
            [getattr(w, name) for w in ws], axis)
        return dataclasses.replace(ws[0], q=join("q"), scale=join("scale"), zero=join("zero"))
    return jnp.concatenate(ws, axis)


def materialize_outside_layers(params, dtype=None):
    """`materialize` on everything but `layers` subtrees (materialized per layer
    inside the scanned blocks)."""
    if not isinstance(params, dict):
        return materialize(params, dtype)
    return {k: (v if k in STACKS else materialize_outside_layers(v, dtype))
            for k, v in params.items()}


def strip_adapters(tree):
    """The tree with each LoraWeight replaced by its base (adapters switched off)."""
    return jax.tree.map(lambda x: x.base if isinstance(x, LoraWeight) else x, tree,
                        is_leaf=lambda x: isinstance(x, LoraWeight))
