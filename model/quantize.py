"""Weight-only quantization (`model.weight_dtype` = int8 | int4 | nf4 | fp8, `jaxlm quantize`).

Which weights: every layer matmul weight of every family, i.e. attention
q/k/v/o (and T5's cross-attention, latent attention's projections), the MLP's
up/gate/down, the experts' and shared experts' weights (`adapters.matmul_in_axes`).
Each becomes a `QuantizedWeight` (model/qformat.py: the formats, their storage and
rounding) whose scales are reduced over the weight's input axes (`embed` for
q/k/v/up/gate, `heads, head_dim` for o, `mlp` for down; per expert for experts):
one per output channel for int8 and fp8, one per model.quant_group input rows for
int4 and nf4. Dequantized in the matmul (`jaxlm.model.layers.dense`): int8 / fp8 as
y = (x @ q.astype(x.dtype)) * scale, the scale on the dot's output; int4 / nf4 with
the dequantized weight as the dot's operand (group scales vary along the contracted
axis). No float copy of the whole model is made; a layer's operands exist per layer
inside the scan. Whether the backend reads the narrow bytes inside the dot depends
on it: XLA:CPU does for int8 only with YNNPACK's dot + eltwise fusions and batch > 1
(BENCHMARKS.md; tests/test_quantize_matmul.py).

Stay float: norms and biases (tiny; they set the scale of everything after
them), the MoE router (tiny, and a rounding flips top-k choices), the
token / position embeddings and the LM head (and BERT's MLM head): a gather
gains nothing from narrow codes, a tied head is the embedding itself, and the head's
rounding goes straight into every logit. On the bench-cpu shape this keeps
the 32000 x 256 embedding and head float; see `param_bytes` and `jaxlm plan`.

On disk (a jaxlm run dir) a quantized weight is the dict {"q", "scale"} (int8 and
fp8; + "zero" for int4; + "scale2" for double-quantized scales) (`storable` /
`from_storable`): plain orbax leaves, read leaf by leaf into their shardings (the
codes shard like the float weight; the packed axis halves with it). int8 runs
written before the other formats existed have exactly this layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from . import qformat
from .adapters import QuantizedWeight, is_node, materialize, matmul_in_axes, quantize
from .params import Spec, abstract, is_spec, logical_axes

WEIGHT_DTYPES = ("", *qformat.FORMATS)  # "": the weights are stored at model.param_dtype
_CODE_DTYPE = {"int8": "int8", "fp8": "float8_e4m3fn", "int4": "uint8", "nf4": "uint8"}


def _path(keys) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in keys)


def quantized_in_axes(specs) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: input axes} of the weights that are quantized in a spec tree (all layer
    matmul weights, the MoE router excepted)."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    out = {}
    for keys, spec in flat:
        path = _path(keys)
        axes = matmul_in_axes(path, spec)
        if axes is not None and path[-1] != "router":
            out[path] = axes
    return out


def _groups(path, s: Spec, in_axes, fmt: str, group: int) -> int:
    """G of one weight (1 for per-channel formats); ConfigError naming the weight when
    the group does not divide its input dimension or a 4-bit pair cannot be packed."""
    if fmt in qformat.PER_CHANNEL:
        return 1
    n_out = len(s.shape) - in_axes[-1] - 1
    if s.shape[in_axes[-1]] % 2:
        raise ConfigError(f"{'/'.join(path)}: {fmt} packs two codes per byte along its input "
                          f"axis, whose size {s.shape[in_axes[-1]]} is odd")
    try:
        return qformat.n_groups(s.shape, len(in_axes), n_out, group)
    except ValueError:
        k = math.prod(s.shape[i] for i in in_axes)
        raise ConfigError(f"model.quant_group={group} does not divide the input dimension {k} "
                          f"of {'/'.join(path)} (use a divisor of it, or 0: per channel)") from None


def quantized_spec(path, s: Spec, in_axes, fmt: str, group: int = 0,
                   double: bool = False) -> QuantizedWeight:
    """The QuantizedWeight of Specs that stores weight `s` in `fmt` (model/qformat.py):
    codes with the weight's logical axes (4-bit: half the last input axis), scales (and
    int4 zero points) [*lead, 1.., G, *out] with logical axis None on the input axes,
    double-quantized scales' second level [*lead, 1.., G, blocks] unsharded past lead."""
    n_in, n_out = len(in_axes), len(s.shape) - in_axes[-1] - 1
    g = _groups(path, s, in_axes, fmt, group)
    shape = list(s.shape)
    if fmt in qformat.PACKED:
        shape[in_axes[-1]] //= 2
    q = Spec(tuple(shape), s.axes, s.init, _CODE_DTYPE[fmt])
    sshape = qformat.scale_shape(s.shape, n_in, n_out, g)
    saxes = tuple(None if i in in_axes else a for i, a in enumerate(s.axes))
    scale = Spec(sshape, saxes, s.init, "uint8" if double else "float32")
    zero = Spec(sshape, saxes, s.init, "uint8") if fmt == "int4" else None
    scale2 = None
    if double:
        lead = len(s.shape) - n_in - n_out
        scale2 = Spec((*sshape[:in_axes[-1] + 1], qformat.double_blocks(sshape, n_out)),
                      (*s.axes[:lead], *([None] * (n_in + 1))), s.init, "float32")
    return QuantizedWeight(q=q, scale=scale, zero=zero, scale2=scale2, fmt=fmt, n_in=n_in,
                           n_out=n_out)


def quantized_specs(specs, fmt: str = "int8", group: int = 0, double: bool = False):
    """The spec tree with each quantized weight a QuantizedWeight of Specs
    (`quantized_spec`)."""
    in_axes = quantized_in_axes(specs)

    def one(keys, s):
        path = _path(keys)
        axes = in_axes.get(path)
        return s if axes is None else quantized_spec(path, s, axes, fmt, group, double)
    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def params_specs(cfg):
    """The spec tree of `cfg`'s params as stored: `model_specs`, quantized when
    cfg.weight_dtype is set (model.quant_group for int4 / nf4)."""
    from .families import model_specs
    specs = model_specs(cfg)
    if not cfg.weight_dtype:
        return specs
    return quantized_specs(specs, cfg.weight_dtype, cfg.quant_group)


def params_abstract(cfg):
    """jax.ShapeDtypeStruct tree (QuantizedWeight nodes when quantized)."""
    return abstract(params_specs(cfg))


def params_logical_axes(cfg):
    """LogicalAxes tree matching `params_abstract(cfg)`."""
    return logical_axes(params_specs(cfg))


def quantize_params(params, cfg, fmt: str | None = None, double: bool = False):
    """Float params -> the same tree with each quantized weight a QuantizedWeight of
    `fmt` (default cfg.weight_dtype), round-to-nearest (model/qformat.py), groups of
    cfg.quant_group for int4 / nf4. Weights already quantized are kept."""
    from .families import model_specs
    fmt = fmt or cfg.weight_dtype or "int8"
    specs = model_specs(cfg)
    in_axes = quantized_in_axes(specs)
    flat = dict((_path(k), s) for k, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=is_spec)[0])

    def one(keys, w):
        path = _path(keys)
        axes = in_axes.get(path)
        if axes is None or isinstance(w, QuantizedWeight):
            return w
        _groups(path, flat[path], axes, fmt, cfg.quant_group)  # one clear line, first
        return quantize(w, axes, fmt, cfg.quant_group, double)
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def dequantize_params(params, dtype=jnp.float32):
    """Every QuantizedWeight as a plain array in `dtype`."""
    return materialize(params, dtype)


_PARTS = ("q", "scale", "zero", "scale2")


def storable(params):
    """QuantizedWeight nodes as {"q", "scale"[, "zero"][, "scale2"]} dicts: plain leaves
    for orbax (an int8 weight: {"q", "scale"}, as jaxlm has always stored it)."""
    def one(x):
        if not isinstance(x, QuantizedWeight):
            return x
        return {k: getattr(x, k) for k in _PARTS if getattr(x, k) is not None}
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def from_storable(tree, specs):
    """The reverse of `storable`, guided by a spec tree from `params_specs` (its nodes
    give the format and axis counts)."""
    def walk(t, s):
        if isinstance(s, QuantizedWeight):
            return dataclasses.replace(s, **{k: t.get(k) for k in _PARTS})
        if isinstance(s, dict):
            return {k: walk(t[k], s[k]) for k in s}
        return t
    return walk(tree, specs)


def bytes_per_param(fmt: str, group: int, double: bool = False) -> float:
    """The format's storage per weight element, scales (and zero points) included, with
    `group` input rows per scale (per-channel formats: the weight's input dimension;
    `double`: QLoRA's double-quantized scales, blocks of 256 filled)."""
    code = {"int8": 1.0, "fp8": 1.0, "int4": 0.5, "nf4": 0.5}[fmt]
    scale = 1 + 4 / qformat.DOUBLE_BLOCK if double else 4
    return code + (scale + (1 if fmt == "int4" else 0)) / group


def param_bytes(cfg) -> dict[str, int]:
    """Global parameter bytes: {"float": every param at param_dtype, each weight dtype
    (int8, int4, nf4, fp8): the quantized weights' codes + scales (+ zero points) and
    the rest at param_dtype, "quantized_params": how many params are quantized}."""
    from .families import model_specs
    specs = model_specs(dataclasses.replace(cfg, weight_dtype=""))
    item = jnp.dtype(cfg.param_dtype).itemsize
    in_axes = quantized_in_axes(specs)
    out = {"float": 0, **{f: 0 for f in qformat.FORMATS}, "quantized_params": 0}
    for keys, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        n = math.prod(s.shape)
        out["float"] += n * item
        path = _path(keys)
        axes = in_axes.get(path)
        if axes is None:
            for f in qformat.FORMATS:
                out[f] += n * item
            continue
        out["quantized_params"] += n
        for f in qformat.FORMATS:
            try:
                node = quantized_spec(path, s, axes, f, cfg.quant_group)
            except ConfigError:  # this group size does not fit: per channel
                node = quantized_spec(path, s, axes, f, 0) if f in qformat.PER_CHANNEL or \
                    s.shape[axes[-1]] % 2 == 0 else None
            if node is None:
                out[f] += n * item
                continue
            out[f] += sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize
                          for p in jax.tree.leaves(node, is_leaf=is_spec))
    return out


__all__ = ["WEIGHT_DTYPES", "quantized_in_axes", "quantized_specs", "params_specs",
           "params_abstract", "params_logical_axes", "quantize_params", "dequantize_params",
           "storable", "from_storable", "param_bytes", "quantized_spec", "bytes_per_param"]
