"""Self-attention block: projections (+ biases), RoPE, the attention call, output."""

import jax.numpy as jnp

from ..kernels import attention
from .dense import dense, operand
from .norms import norm, norm_specs, rmsnorm
from .positions import alibi_bias, mla_softmax_scale, rope
from .relative import relative_bias
from ..params import Spec, normal, ones, zeros
from ...sharding.rules import constrain


def attention_specs(cfg):
    if cfg.mla.kv_lora_rank:
        return mla_specs(cfg)
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
    if cfg.mla.kv_lora_rank:
        return project_mla(p, x, positions, cfg)
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


def mla_specs(cfg):
    """Latent attention's weights (HF DeepseekV3Attention's): q_a [D, Rq] -> q_a_norm ->
    q_b [Rq, H, hd] (or q [D, H, hd]); kv_a [D, Rkv + dr] (the latent, then the shared
    RoPE key part) -> kv_a_norm on the latent -> kv_b [Rkv, H, nope + dv]; o [H, dv, D]."""
    m, init, dt = cfg.mla, normal(cfg.init_std), cfg.param_dtype
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    specs = {
        "kv_a": Spec((d, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", None), init, dt),
        "kv_a_norm": {"scale": Spec((m.kv_lora_rank,), (None,), ones, dt)},
        "kv_b": Spec((m.kv_lora_rank, h, m.qk_nope_head_dim + m.v_head_dim),
                     (None, "heads", "head_dim"), init, dt),
        "o": Spec((h, m.v_head_dim, d), ("heads", "head_dim", "embed"), init, dt),
    }
    if m.q_lora_rank:
        specs["q_a"] = Spec((d, m.q_lora_rank), ("embed", None), init, dt)
        specs["q_a_norm"] = {"scale": Spec((m.q_lora_rank,), (None,), ones, dt)}
        specs["q_b"] = Spec((m.q_lora_rank, h, hd), (None, "heads", "head_dim"), init, dt)
    else:
        specs["q"] = Spec((d, h, hd), ("embed", "heads", "head_dim"), init, dt)
    return specs


_LATENT_EPS = 1e-6  # the latent norms' epsilon (HF's DeepseekV3RMSNorm default, not rms_norm_eps)


def _rope_part(x, positions, cfg):
    """RoPE on latent attention's rope part x [B,S,H,dr]; interleaved pairs (model.mla.
    rope_interleave) are first laid out as (evens, odds), which HF's rotation outputs too."""
    if cfg.mla.rope_interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    return rope(x, positions, cfg)


def mla_latent(p, x, positions, cfg):
    """x [B,S,D] -> (q [B,S,H,hd] (nope | roped part), latent [B,S,Rkv] after its norm,
    roped shared key part [B,S,dr]): what latent attention caches per token is the last
    two."""
    m = cfg.mla
    if "q_a" in p:
        q = dense(rmsnorm(p["q_a_norm"], dense(x, p["q_a"]), _LATENT_EPS), p["q_b"])
    else:
        q = dense(x, p["q"])
    q = jnp.concatenate([q[..., :m.qk_nope_head_dim],
                         _rope_part(q[..., m.qk_nope_head_dim:], positions, cfg)], axis=-1)
    kv = dense(x, p["kv_a"])
    latent = rmsnorm(p["kv_a_norm"], kv[..., :m.kv_lora_rank], _LATENT_EPS)
    k_rope = _rope_part(kv[..., None, m.kv_lora_rank:], positions, cfg)[:, :, 0]
    return constrain(q, ("batch", "seq", "heads", "head_dim")), latent, k_rope


def mla_expand(p, latent, k_rope, cfg):
    """The latent [B,S,Rkv] and shared key part [B,S,dr] -> full k [B,S,H,hd] and v
    [B,S,H,hd] (v_head_dim zero-padded to head_dim, so that every attention kernel takes
    it; `mla_output` drops the padding)."""
    m, h = cfg.mla, cfg.n_heads
    kv = dense(latent, p["kv_b"])  # [B,S,H,nope+dv]
    k_nope, v = kv[..., :m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(
        k_rope[:, :, None, :].astype(k_nope.dtype), (*k_nope.shape[:3], m.qk_rope_head_dim))],
        axis=-1)
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, cfg.head_dim - m.v_head_dim)])
    return (constrain(k, ("batch", "seq", "kv_heads", "head_dim")),
            constrain(v, ("batch", "seq", "kv_heads", "head_dim")))


def _kv_b(p, dtype):
    """kv_b [Rkv, H, nope + dv] as a float array (an int8 weight times its scales)."""
    w, scale = operand(p["kv_b"], dtype)
    return w if scale is None else w * scale.reshape(1, *w.shape[1:]).astype(dtype)


def mla_absorbed(p, x, positions, cfg):
    """Latent attention for a cache that holds the latent: -> (q [B,S,H,Rkv + dr], k
    [B,S,1,Rkv + dr]). k is what the cache keeps per token (the normed latent, then the
    roped shared key part), one head every query head attends to; q's nope part has
    kv_b's key up-projection folded in (q_nope . W_uk), so q . k equals the full form's
    scores. The values are the latent itself: attention over v = k, then
    `mla_absorbed_output` takes the first Rkv dims and applies kv_b's value part."""
    m = cfg.mla
    q, latent, k_rope = mla_latent(p, x, positions, cfg)
    w_uk = _kv_b(p, q.dtype)[..., :m.qk_nope_head_dim]  # [Rkv, H, nope]
    q_lat = jnp.einsum("bshn,rhn->bshr", q[..., :m.qk_nope_head_dim], w_uk)
    q = jnp.concatenate([q_lat, q[..., m.qk_nope_head_dim:]], axis=-1)
    k = jnp.concatenate([latent, k_rope.astype(latent.dtype)], axis=-1)[:, :, None, :]
    return constrain(q, ("batch", "seq", "heads", None)), k


def mla_absorbed_output(p, o, cfg):
    """Attention over the latent o [B,S,H,Rkv + dr] -> per-head values [B,S,H,dv]
    (its latent dims through kv_b's value up-projection W_uv)."""
    m = cfg.mla
    w_uv = _kv_b(p, o.dtype)[..., m.qk_nope_head_dim:]  # [Rkv, H, dv]
    return jnp.einsum("bshr,rhv->bshv", o[..., :m.kv_lora_rank], w_uv)


def project_mla(p, x, positions, cfg):
    """Latent attention's q, k, v [B,S,H,hd] (v zero-padded: `mla_expand`)."""
    q, latent, k_rope = mla_latent(p, x, positions, cfg)
    return (q, *mla_expand(p, latent, k_rope, cfg))


def output_projection(p, o, cfg):
    if cfg.mla.kv_lora_rank:
        o = o[..., :cfg.mla.v_head_dim]
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


def softmax_scale(cfg):
    """The scores' scale: model.attn_scale (None: head_dim ** -0.5); latent attention's
    with YaRN's mscale (`mla_softmax_scale`)."""
    return mla_softmax_scale(cfg) if cfg.mla.kv_lora_rank else cfg.attn_scale or None


def attend(q, k, v, mask, cfg, bias=None, dropout_key=None, kv_heads_major=False):
    """The attention call with this config's scale and an optional position bias;
    `dropout_key`: model.attention_dropout on the probabilities (training);
    `kv_heads_major`: k, v [B,KVH,Sk,D] (see `jaxlm.model.kernels.attention`)."""
    return attention(q, k, v, mask, bias, impl=cfg.attention_impl, scale=softmax_scale(cfg),
                     softcap=cfg.attn_logit_softcap or None,
                     dropout_rate=cfg.attention_dropout, dropout_key=dropout_key,
                     kv_heads_major=kv_heads_major)


def self_attention(p, x, positions, mask, cfg, bias=None, dropout_key=None):
    """x [B,S,D] -> [B,S,D]; mask is a MaskSpec over the same sequence."""
    q, k, v = project_qkv(p, x, positions, cfg)
    return output_projection(p, attend(q, k, v, mask, cfg, bias, dropout_key), cfg)
