"""GPTQ / AWQ over a decoder's layers, one layer at a time on calibration tokens.

    windows = calibration_windows(docs, seq_len=256, n=256)      # [N, S] token ids
    params, codes = calibrate(params, cfg, windows, method="gptq", group=128)

The calibration tokens are embedded once (`decoder_inputs`), then each layer of
each stack runs THE block (`model.block.block`) over them, its calibrated
weights wrapped in `Tap`s so that `dense` hands their inputs to a host sink
that sums the Hessian x x^T and mean |x| per input (model/tap.py). The layer's
quantized (dequantized to float) weights then produce the next layer's inputs,
so later layers are calibrated on what the quantized earlier ones compute, as
GPTQ does. The weights of a layer, in the order they run:

    q | k | v   (input: ln1's output)      o     (input: attention's output)
    gate | up   (input: ln2's output)      down  (input: act(gate) * up)

* gptq: in that order, each set's Hessian taken with the sets before it already
  quantized (AutoGPTQ's true-sequential), each weight by `calibrate.gptq`.
* awq: one pass of the float layer; each set's per-input-channel scale s by
  `calibrate.awq_scale` (all of them before any rounding, as AutoAWQ), folded into
  the op before it so that no input scale is
  stored (as AutoAWQ does, and as HF's AWQ / GPTQ layouts need): the weights'
  input rows times s, and ln1 / ln2's scale (and LayerNorm's bias) / s for
  q|k|v and gate|up, v's output (and bias) / s for o (s shared by the query
  heads of one KV head, so that it folds under GQA), up's output (and bias) / s
  for down (gated MLPs only: GPT-2's GELU is not homogeneous); then RTN. A set
  with nothing to fold into (post-norm layers) keeps s = 1: plain RTN.

What is not a dense weight of these sets (experts, latent attention, the
router) is left float in `params` and absent from `codes`: the caller rounds
it to nearest. -> (params: float, AWQ scales folded in, the calibrated weights
replaced by their dequantized values; codes: {(stack, sub, name): (codes
[L, in, out] uint8, scale [L, in/g, out], zero [L, in/g, out])}) with in / out
the weight's input / output axes flattened.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError, InputError
from . import calibrate as C
from .adapters import materialize_outside_layers
from .block import _layer_inputs, block, dense_layer_config, layer_config
from .config import dtype_of
from .kv import NO_CACHE
from .tap import Tap

# (sub-tree, the weights that share one input, the op their input scale folds into)
SETS = (("attn", ("q", "k", "v"), "ln1"), ("attn", ("o",), "v"),
        ("mlp", ("gate", "up"), "ln2"), ("mlp", ("down",), "up"))
METHODS = ("gptq", "awq")


def calibration_windows(docs, seq_len: int, n: int) -> np.ndarray:
    """Token-id documents -> [N, seq_len] int32: the documents joined into one stream
    and cut into windows, up to `n` of them spread evenly over the stream."""
    stream = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0)
    total = len(stream) // seq_len
    if total == 0:
        raise InputError(f"--calibration: {len(stream)} tokens, fewer than one window of "
                         f"{seq_len}")
    pick = np.linspace(0, total - 1, min(n, total)).round().astype(int)
    return stream[:total * seq_len].reshape(total, seq_len)[pick]


class _Sink:
    """Host-side sums per tapped input: x^T x (float64), sum |x|, token count. One per
    `calibrate` call, reset before each pass: the compiled layer calls the sink it
    was traced with (a Tap's static field)."""

    def reset(self, sizes: dict):
        self.sizes = sizes
        self.h = {k: np.zeros((n, n)) for k, n in sizes.items()}
        self.abs = {k: np.zeros(n) for k, n in sizes.items()}
        self.n = dict.fromkeys(sizes, 0)

    def __call__(self, name, x):
        if name not in self.sizes:
            return
        x = np.asarray(x, np.float32).reshape(-1, self.sizes[name])
        self.h[name] += x.T @ x
        self.abs[name] += np.abs(x).sum(0)
        self.n[name] += x.shape[0]


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def _run_layer(layer, x, i, outer, tokens, cfg, lcfg):
    """One layer (config `lcfg`) over x [B, S, D]; its inputs (mask, positions, bias)
    as the decoder makes them for `tokens` (the embedding itself is dead code)."""
    from .families.decoder import decoder_inputs
    _, inp = decoder_inputs(outer, cfg, tokens)
    inp = _layer_inputs(inp, lcfg) if cfg.layer_pattern else inp
    return block(layer, x, NO_CACHE, i, inp, lcfg)[0]


def _sets(layer) -> list:
    """The SETS this layer has as dense weights (not experts, not latent attention)."""
    out = []
    for sub, names, prev in SETS:
        p = layer.get(sub, {})
        have = tuple(n for n in names if n in p)
        if not have or "router" in p:  # a mixture of experts: rounded to nearest
            continue
        if sub == "attn" and not {"q", "k", "v", "o"} <= set(p):  # latent attention
            continue
        out.append((sub, have, prev))
    return out


def _n_in(sub, name) -> int:
    return 2 if (sub, name) == ("attn", "o") else 1


def _as_2d(w, n_in):
    k = math.prod(w.shape[:n_in])
    return w.reshape(k, -1).astype(jnp.float32)


def _fold(layer, sub, prev, s, cfg):
    """The inputs of (sub, set) are divided by s [in] at the op before them."""
    if prev in ("ln1", "ln2"):
        p = dict(layer[prev])
        sc = p["scale"].astype(jnp.float32)
        p["scale"] = (((1.0 + sc) / s - 1.0) if cfg.norm_unit_offset else sc / s).astype(
            p["scale"].dtype)
        if "bias" in p:
            p["bias"] = (p["bias"].astype(jnp.float32) / s).astype(p["bias"].dtype)
        return {**layer, prev: p}
    p = dict(layer[sub])
    src = p[prev]  # v [D, KVH, hd] or up [D, F]
    s = s.reshape(src.shape[1:])
    p[prev] = (src.astype(jnp.float32) / s).astype(src.dtype)
    if prev + "_bias" in p:
        p[prev + "_bias"] = (p[prev + "_bias"].astype(jnp.float32) / s).astype(src.dtype)
    return {**layer, sub: p}


def _foldable(layer, sub, prev, cfg) -> bool:
    if prev in ("ln1", "ln2"):
        return cfg.norm_position != "post"
    return prev in layer[sub] and (prev != "up" or "gate" in layer[sub])


def _awq(layer, sub, names, prev, sink, group: int, cfg):
    """AWQ's scale s of one set from the sink's float-layer statistics, folded: the
    set's weights' input rows times s, the op before divided by s."""
    key = f"{sub}/{names[0]}"
    xm = sink.abs[key] / max(sink.n[key], 1)
    if prev == "v":  # one scale per KV head's channel, shared by the heads over it
        kvh = layer["attn"]["v"].shape[1]
        rep = xm.size // (kvh * cfg.head_dim)
        xm = np.repeat(xm.reshape(kvh, rep, cfg.head_dim).mean(1, keepdims=True), rep,
                       1).reshape(-1)
    ws = [_as_2d(layer[sub][nm], _n_in(sub, nm)) for nm in names]
    s = C.awq_scale(jnp.concatenate(ws, 1), jnp.asarray(sink.h[key], jnp.float32),
                    jnp.asarray(xm), group)
    prev_s = s.reshape(kvh, rep, cfg.head_dim)[:, 0].reshape(-1) if prev == "v" else s
    layer = _fold(layer, sub, prev, prev_s, cfg)
    p = dict(layer[sub])
    for nm, w2 in zip(names, ws):
        p[nm] = (w2 * s[:, None]).reshape(p[nm].shape).astype(p[nm].dtype)
    return {**layer, sub: p}


def calibrate(params, cfg, windows, method: str, group: int = 128, *, damp: float = 0.01,
              act_order: bool = False, batch_size: int = 16, progress=None):
    """See the module docstring. `windows` [N, S] int32 token ids; `progress(msg)`
    is called once per layer."""
    from .families.decoder import decoder_inputs
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r}: one of {', '.join(METHODS)}")
    if cfg.family != "decoder":
        raise ConfigError(f"--method {method} calibrates decoder-only models; "
                          f"{cfg.family} quantizes with --method rtn")
    dt = dtype_of(cfg.dtype)
    outer = materialize_outside_layers(params, dt)
    windows = np.asarray(windows, np.int32)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    batches = [jnp.asarray(b) for b in batches]
    xs = [decoder_inputs(outer, cfg, b)[0] for b in batches]
    stacks = [("layers", cfg, cfg.moe.first_dense)]
    if "dense_layers" in params:
        stacks.insert(0, ("dense_layers", dense_layer_config(cfg), 0))
    params = dict(params)
    codes = {}
    sink = _Sink()
    for stack, scfg, first in stacks:
        layers = params[stack]
        n = jax.tree.leaves(layers)[0].shape[0]
        done = []
        for li in range(n):
            lcfg = layer_config(scfg, li % scfg.layer_period)
            layer = jax.tree.map(lambda a: a[li], layers)
            sets = _sets(layer)

            def run(lay, wanted=(), sets=sets, lcfg=lcfg, li=li):
                """The layer over every batch; the inputs of the sets in `wanted` summed
                into the sink (every set is tapped, so that one program serves each pass)."""
                sink.reset({f"{sub}/{names[0]}": math.prod(lay[sub][names[0]].shape[
                    :_n_in(sub, names[0])]) for sub, names, _ in wanted})
                tapped = {**lay}
                for sub, names, _ in sets:
                    tapped[sub] = {**tapped[sub], names[0]: Tap(lay[sub][names[0]],
                                                                f"{sub}/{names[0]}", sink)}
                return jax.block_until_ready([_run_layer(tapped, x, first + li, outer, b, scfg,
                                                         lcfg) for x, b in zip(xs, batches)])

            out = {}
            if method == "awq":  # every set's scale from the float layer, folded first
                run(layer, sets)
                for sub, names, prev in sets:
                    if _foldable(layer, sub, prev, lcfg):
                        layer = _awq(layer, sub, names, prev, sink, group, lcfg)
            for sub, names, prev in sets:
                if method == "gptq":
                    run(layer, [(sub, names, prev)])
                    h = jnp.asarray(sink.h[f"{sub}/{names[0]}"], jnp.float32)
                p = dict(layer[sub])
                for nm in names:
                    w = p[nm]
                    w2 = _as_2d(w, _n_in(sub, nm))
                    if w2.shape[0] % group:
                        raise ConfigError(f"model.quant_group={group} does not divide the "
                                          f"input dimension {w2.shape[0]} of {sub}/{nm}")
                    if method == "gptq":
                        c, sc, z = C.gptq(w2, h, group, damp, act_order=act_order)
                    else:
                        c, sc, z = C.rtn(w2, group)
                    out[(sub, nm)] = (c, sc, z)
                    p[nm] = C.dequantize(c, sc, z, group).reshape(w.shape).astype(w.dtype)
                layer = {**layer, sub: p}
            xs = run(layer)
            done.append(layer)
            for k, v in out.items():
                codes.setdefault((stack, *k), []).append(v)
            if progress:
                progress(f"{method}: {stack} {li + 1}/{n}")
        params[stack] = jax.tree.map(lambda *a: jnp.stack(a), *done)
    codes = {k: tuple(jnp.stack(parts) for parts in zip(*v)) for k, v in codes.items()}
    return params, codes


def quantized_params(params, cfg, codes, group: int = 128):
    """`calibrate`'s (params, codes) -> params with every layer matmul weight an int4
    QuantizedWeight (model/qformat.py): the calibrated ones from their codes, scales and
    zero points; the rest (experts, latent attention) rounded to nearest."""
    import dataclasses

    from . import qformat
    from .quantize import quantize_params
    params = dict(params)
    for (stack, sub, name), (c, scale, zero) in codes.items():
        w = params[stack][sub][name]
        n_in = _n_in(sub, name)
        n_out = w.ndim - 1 - n_in
        sshape = qformat.scale_shape(w.shape, n_in, n_out, scale.shape[1])
        node = qformat.from_codes(c.reshape(w.shape), scale.reshape(sshape),
                                  zero.astype(jnp.uint8).reshape(sshape), fmt="int4",
                                  n_in=n_in, n_out=n_out)
        params[stack] = {**params[stack], sub: {**params[stack][sub], name: node}}
    return quantize_params(params, dataclasses.replace(cfg, weight_dtype="int4",
                                                       quant_group=group))


__all__ = ["SETS", "METHODS", "calibration_windows", "calibrate", "quantized_params"]
