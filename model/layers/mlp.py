"""Feed-forward blocks: gated (SwiGLU, GeGLU) or plain (GELU, ReLU), biases optional."""

import jax

from .dense import dense
from ..params import Spec, normal, zeros
from ...sharding.rules import constrain

GATED = ("swiglu", "geglu")


def activation(name: str, cfg):
    if name in ("swiglu",):
        return jax.nn.silu
    if name in ("geglu", "gelu"):
        return lambda x: jax.nn.gelu(x, approximate=cfg.gelu_approximate)
    return jax.nn.relu


def mlp_specs(cfg):
    init, dt = normal(cfg.init_std), cfg.param_dtype
    specs = {
        "up": Spec((cfg.d_model, cfg.d_ff), ("embed", "mlp"), init, dt),
        "down": Spec((cfg.d_ff, cfg.d_model), ("mlp", "embed"), init, dt),
    }
    if cfg.mlp in GATED:
        specs["gate"] = Spec((cfg.d_model, cfg.d_ff), ("embed", "mlp"), init, dt)
    if cfg.mlp_bias:
        specs["up_bias"] = Spec((cfg.d_ff,), ("mlp",), zeros, dt)
        specs["down_bias"] = Spec((cfg.d_model,), ("embed",), zeros, dt)
        if cfg.mlp in GATED:
            specs["gate_bias"] = Spec((cfg.d_ff,), ("mlp",), zeros, dt)
    return specs


def _linear(p, x, name):
    y = dense(x, p[name])
    return y + p[name + "_bias"].astype(x.dtype) if name + "_bias" in p else y


def mlp(p, x, cfg):
    """Gated: down(act(x @ gate) * (x @ up)); plain: down(act(x @ up))."""
    act = activation(cfg.mlp, cfg)
    if "gate_up" in p:  # fused (layers/fused.py): btd,df->btf over f = 2 F, then split
        gate_up = _linear(p, x, "gate_up")
        f = gate_up.shape[-1] // 2
        h = act(gate_up[..., :f]) * gate_up[..., f:]
    elif cfg.mlp in GATED:
        h = act(_linear(p, x, "gate")) * _linear(p, x, "up")
    else:
        h = act(_linear(p, x, "up"))
    h = constrain(h, ("batch", "seq", "mlp"))
    return constrain(_linear(p, h, "down"), ("batch", "seq", "embed"))
