"""Feed-forward blocks."""

import jax

from jaxlm.model.layers.dense import dense
from jaxlm.model.params import Spec, normal
from jaxlm.sharding.rules import constrain


def mlp_specs(cfg):
    init = normal(cfg.init_std)
    return {
        "gate": Spec((cfg.d_model, cfg.d_ff), ("embed", "mlp"), init, cfg.param_dtype),
        "up": Spec((cfg.d_model, cfg.d_ff), ("embed", "mlp"), init, cfg.param_dtype),
        "down": Spec((cfg.d_ff, cfg.d_model), ("mlp", "embed"), init, cfg.param_dtype),
    }


def mlp(p, x, cfg):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""
    dt = x.dtype
    gate = dense(x, p["gate"].astype(dt))  # btd,df->btf
    up = dense(x, p["up"].astype(dt))
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return constrain(dense(h, p["down"].astype(dt)), ("batch", "seq", "embed"))  # btf,fd->btd
