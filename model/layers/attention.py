"""Self-attention block: projections, RoPE, the attention call, output projection."""

from jaxlm.model.kernels import attention
from jaxlm.model.layers.dense import dense
from jaxlm.model.layers.positions import rope
from jaxlm.model.params import Spec, normal
from jaxlm.sharding.rules import constrain


def attention_specs(cfg):
    init = normal(cfg.init_std)
    d, h, kvh, hd, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    return {
        "q": Spec((d, h, hd), ("embed", "heads", "head_dim"), init, dt),
        "k": Spec((d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, dt),
        "v": Spec((d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, dt),
        "o": Spec((h, hd, d), ("heads", "head_dim", "embed"), init, dt),
    }


def project_qkv(p, x, positions, cfg):
    dt = x.dtype
    q = dense(x, p["q"].astype(dt))  # btd,dhk->bthk
    k = dense(x, p["k"].astype(dt))
    v = dense(x, p["v"].astype(dt))
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def output_projection(p, o, cfg):
    out = dense(o, p["o"].astype(o.dtype), 2)  # bthk,hkd->btd
    return constrain(out, ("batch", "seq", "embed"))


def self_attention(p, x, positions, mask, cfg):
    """x [B,S,D] -> [B,S,D]; mask is a MaskSpec over the same sequence."""
    q, k, v = project_qkv(p, x, positions, cfg)
    o = attention(q, k, v, mask, impl=cfg.attention_impl)
    return output_projection(p, o, cfg)
