"""Self-attention block: projections (+ biases), RoPE, the attention call, output."""

from ..kernels import attention
from .dense import dense
from .norms import norm, norm_specs
from .positions import alibi_bias, rope
from .relative import relative_bias
from ..params import Spec, normal, zeros
from ...sharding.rules import constrain


def attention_specs(cfg):
    init = normal(cfg.init_std)
    d, h, kvh, hd, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    specs = {
        "q": Spec((d, h, hd), ("embed", "heads", "head_dim"), init, dt),
        "k": Spec((d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, dt),
        "v": Spec((d, kvh, hd), ("embed", "kv_heads", "head_dim"), init, dt),
        "o": Spec((h, hd, d), ("heads", "head_dim", "embed"), init, dt),
    }
    if cfg.qkv_bias:
        specs["q_bias"] = Spec((h, hd), ("heads", "head_dim"), zeros, dt)
        specs["k_bias"] = Spec((kvh, hd), ("kv_heads", "head_dim"), zeros, dt)
        specs["v_bias"] = Spec((kvh, hd), ("kv_heads", "head_dim"), zeros, dt)
    if cfg.out_bias:
        specs["o_bias"] = Spec((d,), ("embed",), zeros, dt)
    if cfg.qk_norm:  # one scale over head_dim, shared by the heads
        specs["q_norm"] = norm_specs(cfg, hd, "head_dim")
        specs["k_norm"] = norm_specs(cfg, hd, "head_dim")
    return specs


def _project(p, x, name):
    y = dense(x, p[name])  # btd,dhk->bthk
    if name + "_bias" in p:
        y = y + p[name + "_bias"].astype(x.dtype)
    return y


def project_qkv(p, x, positions, cfg):
    if "qkv" in p:  # fused (layers/fused.py): btd,dhk->bthk over h = H + 2 KVH, then split
        qkv, h, kvh = _project(p, x, "qkv"), cfg.n_heads, cfg.n_kv_heads
        q, k, v = qkv[..., :h, :], qkv[..., h:h + kvh, :], qkv[..., h + kvh:, :]
    else:
        q, k, v = (_project(p, x, n) for n in ("q", "k", "v"))
    if cfg.qk_norm:
        q, k = norm(p["q_norm"], q, cfg), norm(p["k_norm"], k, cfg)
    if cfg.positions == "rope":
        q, k = rope(q, positions, cfg), rope(k, positions, cfg)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def output_projection(p, o, cfg):
    out = dense(o, p["o"], 2)  # bthk,hkd->btd
    if "o_bias" in p:
        out = out + p["o_bias"].astype(out.dtype)
    return constrain(out, ("batch", "seq", "embed"))


def position_bias(params, mask, cfg, *, bidirectional: bool):
    """The additive bias of position-bias configs (ALiBi, T5 relative) or None.

    Computed once per forward from the mask's positions and shared by every
    layer: [B or 1, H, Sq, Sk] float32.
    """
    kv_positions = mask.kv_positions if mask.kv_positions is not None else mask.q_positions
    if cfg.positions == "alibi":
        return alibi_bias(mask.q_positions, kv_positions, cfg.n_heads, bidirectional=bidirectional)
    if cfg.positions == "t5_relative":
        return relative_bias(params["relative"], mask.q_positions, kv_positions, cfg,
                             bidirectional=bidirectional)
    return None


def attend(q, k, v, mask, cfg, bias=None, dropout_key=None, kv_heads_major=False):
    """The attention call with this config's scale and an optional position bias;
    `dropout_key`: model.attention_dropout on the probabilities (training);
    `kv_heads_major`: k, v [B,KVH,Sk,D] (see `jaxlm.model.kernels.attention`)."""
    return attention(q, k, v, mask, bias, impl=cfg.attention_impl, scale=cfg.attn_scale or None,
                     softcap=cfg.attn_logit_softcap or None,
                     dropout_rate=cfg.attention_dropout, dropout_key=dropout_key,
                     kv_heads_major=kv_heads_major)


def self_attention(p, x, positions, mask, cfg, bias=None, dropout_key=None):
    """x [B,S,D] -> [B,S,D]; mask is a MaskSpec over the same sequence."""
    q, k, v = project_qkv(p, x, positions, cfg)
    return output_projection(p, attend(q, k, v, mask, cfg, bias, dropout_key), cfg)
