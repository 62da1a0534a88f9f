"""int8 weight-only quantization (`model.weight_dtype=int8`, `jaxlm quantize`).

Which weights: every layer matmul weight of every family, i.e. attention
q/k/v/o (and T5's cross-attention), the MLP's up/gate/down and Mixtral's
expert weights (`adapters.matmul_in_axes`). Each becomes an int8
`QuantizedWeight` with one float32 absmax scale per output channel (reduced
over the weight's input axes: `embed` for q/k/v/up/gate, `heads, head_dim` for
o, `mlp` for down; per expert for experts), dequantized in the matmul
(`jaxlm.model.layers.dense`: y = (x @ q.astype(x.dtype)) * scale, the scale on
the dot's output), so no float copy of a layer's weights is made by jaxlm and
the activations stay float. Whether the backend then reads the int8 bytes inside
the dot depends on it: XLA:CPU does only with YNNPACK's dot + eltwise fusions and
batch > 1 (BENCHMARKS.md, int8 weights; tests/test_quantize_matmul.py).

Stay float: norms and biases (tiny; they set the scale of everything after
them), the MoE router (tiny, and an int8 rounding flips top-k choices), the
token / position embeddings and the LM head (and BERT's MLM head): a gather
gains nothing from int8, a tied head is the embedding itself, and the head's
rounding goes straight into every logit. On the bench-cpu shape this keeps
the 32000 x 256 embedding and head float; see `param_bytes` and `jaxlm plan`.

On disk (a jaxlm run dir) a quantized weight is the dict {"q": int8, "scale":
float32} (`storable` / `from_storable`): plain orbax leaves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .adapters import QuantizedWeight, is_node, materialize, matmul_in_axes, quantize
from .params import Spec, abstract, is_spec, logical_axes

WEIGHT_DTYPES = ("", "int8")  # "": the weights are stored at model.param_dtype


def _path(keys) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in keys)


def quantized_in_axes(specs) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: input axes} of the weights int8 quantizes in a spec tree (all layer
    matmul weights, the MoE router excepted)."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    out = {}
    for keys, spec in flat:
        path = _path(keys)
        axes = matmul_in_axes(path, spec)
        if axes is not None and path[-1] != "router":
            out[path] = axes
    return out


def _scale_spec(s: Spec, in_axes) -> Spec:
    return Spec(tuple(1 if i in in_axes else n for i, n in enumerate(s.shape)),
                tuple(None if i in in_axes else a for i, a in enumerate(s.axes)), s.init,
                "float32")


def quantized_specs(specs):
    """The spec tree with each quantized weight a QuantizedWeight(q: int8 Spec, scale:
    float32 Spec with its input axes of size 1 and logical axis None)."""
    in_axes = quantized_in_axes(specs)

    def one(keys, s):
        axes = in_axes.get(_path(keys))
        if axes is None:
            return s
        return QuantizedWeight(q=Spec(s.shape, s.axes, s.init, "int8"), scale=_scale_spec(s, axes))
    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def params_specs(cfg):
    """The spec tree of `cfg`'s params as stored: `model_specs`, quantized when
    cfg.weight_dtype == "int8"."""
    from .families import model_specs
    specs = model_specs(cfg)
    return quantized_specs(specs) if cfg.weight_dtype == "int8" else specs


def params_abstract(cfg):
    """jax.ShapeDtypeStruct tree (QuantizedWeight nodes under int8)."""
    return abstract(params_specs(cfg))


def params_logical_axes(cfg):
    """LogicalAxes tree matching `params_abstract(cfg)`."""
    return logical_axes(params_specs(cfg))


def quantize_params(params, cfg):
    """Float params -> the same tree with each quantized weight an int8
    QuantizedWeight (symmetric absmax, per output channel). Idempotent."""
    from .families import model_specs
    in_axes = quantized_in_axes(model_specs(cfg))

    def one(keys, w):
        axes = in_axes.get(_path(keys))
        return w if axes is None or isinstance(w, QuantizedWeight) else quantize(w, axes)
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def dequantize_params(params, dtype=jnp.float32):
    """Every QuantizedWeight as a plain array in `dtype`."""
    return materialize(params, dtype)


def storable(params):
    """QuantizedWeight nodes as {"q", "scale"} dicts: plain leaves for orbax."""
    return jax.tree.map(lambda x: {"q": x.q, "scale": x.scale} if isinstance(x, QuantizedWeight)
                        else x, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def from_storable(tree, specs):
    """The reverse of `storable`, guided by a spec tree from `params_specs`."""
    def walk(t, s):
        if isinstance(s, QuantizedWeight):
            return QuantizedWeight(q=t["q"], scale=t["scale"])
        if isinstance(s, dict):
            return {k: walk(t[k], s[k]) for k in s}
        return t
    return walk(tree, specs)


def param_bytes(cfg) -> dict[str, int]:
    """Global parameter bytes: {"float": every param at param_dtype, "int8": the
    quantized weights as int8 + their float32 scales and the rest at param_dtype,
    "quantized_params": how many params are int8}."""
    import dataclasses

    from .families import model_specs
    specs = model_specs(dataclasses.replace(cfg, weight_dtype=""))
    item = jnp.dtype(cfg.param_dtype).itemsize
    in_axes = quantized_in_axes(specs)
    total = int8 = n_q = 0
    for keys, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        n = math.prod(s.shape)
        total += n * item
        axes = in_axes.get(_path(keys))
        if axes is None:
            int8 += n * item
        else:
            n_q += n
            int8 += n + 4 * math.prod(_scale_spec(s, axes).shape)
    return {"float": total, "int8": int8, "quantized_params": n_q}


__all__ = ["WEIGHT_DTYPES", "quantized_in_axes", "quantized_specs", "params_specs",
           "params_abstract", "params_logical_axes", "quantize_params", "dequantize_params",
           "storable", "from_storable", "param_bytes"]
