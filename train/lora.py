"""LoRA and QLoRA: low-rank adapters declared as specs beside a frozen base.

For each targeted weight W [L, *in, *out] (`in`: the axes `dense` contracts:
two for attention `o` [H, hd, D], one for q/k/v [D, H, hd] and MLP weights)
the adapters are

    A [L, *in, r]   logical axes (layers, *in_axes, None)   kaiming-uniform init
    B [L, r, *out]  logical axes (layers, None, *out_axes)  zeros

so they shard like their weight, and the model sees W + (alpha / r) * A @ B
(`LoraWeight`, merged per layer inside the scanned block). B = 0 at init, so
a fresh adapter leaves the logits exactly the base's. Targets: the paths
("layers/attn/q", "decoder/layers/cross/o", ...) that `re.fullmatch`
`train.lora.targets`; MoE expert weights, routers, embeddings and heads are
never targets. QLoRA (`train.lora.base_dtype=int8|int4|nf4`): the frozen base's
layer matmul weights (experts included, routers not) are quantized
(`QuantizedWeight`, model/qformat.py): int8 with per-output-channel absmax scales, or
4-bit NF4 / int4 codes in groups of model.quant_group whose scales are themselves
double-quantized (uint8 per scale, a float32 per 256 scales), as QLoRA does;
dequantized per layer right before use.

The adapter tree mirrors the params: {"layers": {"attn": {"q": {"a", "b"}}}}.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..model import model_specs
from ..model.adapters import LoraWeight, _lead, materialize, matmul_in_axes
from ..model.qformat import PACKED
from ..model.config import dtype_of
from ..model.params import Spec, is_spec, zeros


def lora_scale(tcfg) -> float:
    """alpha / r (alpha 0: 2 * r, i.e. a scale of 2)."""
    return (tcfg.lora.alpha or 2.0 * tcfg.lora.rank) / tcfg.lora.rank


def _named_specs(specs):
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    return [(tuple(k.key for k in path), s) for path, s in flat]


def lora_targets(mcfg, tcfg) -> dict[tuple[str, ...], tuple[Spec, int]]:
    """{path: (weight spec, number of input axes)} of the weights LoRA adapts."""
    pattern = re.compile(tcfg.lora.targets)
    out = {}
    for path, spec in _named_specs(model_specs(mcfg)):
        in_axes = matmul_in_axes(path, spec)
        if (in_axes is None or "experts" in spec.axes or path[-1] == "router"
                or not pattern.fullmatch("/".join(path))):
            continue
        out[path] = (spec, len(in_axes))
    if not out:
        raise ConfigError(f"train.lora.targets={tcfg.lora.targets!r} matches no layer matmul "
                          "weight (paths look like layers/attn/q, layers/mlp/up)")
    return out


def _kaiming_uniform(n_lead: int):
    """peft's A init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    def init(key, shape, dtype):
        bound = 1.0 / math.sqrt(math.prod(shape[n_lead:-1]))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def lora_specs(mcfg, tcfg):
    """The adapter spec tree: {"a": Spec [L, *in, r], "b": Spec [L, r, *out]} per target."""
    r = tcfg.lora.rank
    tree: dict = {}
    for path, (w, n_in) in lora_targets(mcfg, tcfg).items():
        lead = _lead(w.axes)
        cut = lead + n_in
        a = Spec((*w.shape[:cut], r), (*w.axes[:cut], None), _kaiming_uniform(lead), "float32")
        b = Spec((*w.shape[:lead], r, *w.shape[cut:]), (*w.axes[:lead], None, *w.axes[cut:]),
                 zeros, "float32")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"a": a, "b": b}
    return tree


def trainable_specs(cfg):
    """The specs the optimizer sees: the adapters of a LoRA run, else the model's; PPO:
    {"policy": those, "value": the value model's}."""
    specs = lora_specs(cfg.model, cfg.train) if cfg.train.lora.rank else model_specs(cfg.model)
    if cfg.train.objective == "ppo":
        from .ppo import value_config
        return {"policy": specs, "value": model_specs(value_config(cfg))}
    return specs


def apply_lora(base, adapters, scale: float):
    """The base tree with each adapted weight a LoraWeight(base, a, b, scale)."""
    def walk(p, a):
        if set(a) == {"a", "b"}:
            return LoraWeight(p, a["a"], a["b"], scale)
        return {k: (walk(v, a[k]) if k in a else v) for k, v in p.items()}
    return walk(base, adapters)


def split_lora(tree):
    """The reverse view: a tree with LoraWeight nodes -> (base tree, adapter tree)."""
    def walk(p):
        if isinstance(p, LoraWeight):
            return p.base, {"a": p.a, "b": p.b}
        if not isinstance(p, dict):
            return p, None
        base, adapters = {}, {}
        for k, v in p.items():
            base[k], sub = walk(v)
            if sub:
                adapters[k] = sub
        return base, adapters
    return walk(tree)


def merge_lora(base, adapters, cfg):
    """Plain params (base dequantized, + scale * A @ B, in model.param_dtype):
    what `jaxlm.save` / export of a LoRA run writes."""
    merged = materialize(apply_lora(base, adapters, lora_scale(cfg.train)), jnp.float32)
    dt = dtype_of(cfg.model.param_dtype)
    return jax.tree.map(lambda x: x.astype(dt), merged)


def quantize_base(params, mcfg, fmt: str = "int8"):
    """QLoRA's frozen base: each layer matmul weight (the MoE router excepted) as a
    `fmt` QuantizedWeight; int4 / nf4 in groups of model.quant_group with
    double-quantized scales, as QLoRA does."""
    from ..model.quantize import quantize_params
    return quantize_params(params, mcfg, fmt, double=fmt in PACKED)


def frozen_axes(mcfg, tcfg):
    """Logical axes of the frozen base (with QuantizedWeight nodes under QLoRA)."""
    from ..model.params import logical_axes
    from ..model.quantize import quantized_specs
    specs = model_specs(mcfg)
    fmt = tcfg.lora.base_dtype
    if fmt != "same":
        specs = quantized_specs(specs, fmt, mcfg.quant_group, double=fmt in PACKED)
    return logical_axes(specs)
