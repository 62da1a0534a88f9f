"""Position encodings: RoPE (with long-context scaling), learned, sinusoidal, ALiBi.

RoPE scaling (`model.rope.scaling`), with Hugging Face's semantics
(transformers' modeling_rope_utils):

* `llama3`: Llama 3.1's banded interpolation of the low frequencies.
* `linear`: position interpolation, every frequency divided by the factor.
* `dynamic`: dynamic NTK. Past `rope.original_max_len` (HF's
  max_position_embeddings) the base grows with the current length L:
  theta * (factor * L / orig - (factor - 1)) ** (d / (d - 2)). L is the largest
  position in the call + 1, over the whole batch, as HF takes max(position_ids)
  + 1. In cached decoding each call (the prefill, then every decode step)
  rotates its own new keys with its own L, and the cached keys keep the
  rotation they were written with: HF's behaviour with a cache on a fresh model
  (HF also keeps a grown base for later, shorter calls; jaxlm, a pure function,
  does not).
* `yarn`: NTK-by-parts interpolation between the original and the scaled
  frequencies over the dimensions whose wavelengths fall between beta_fast and
  beta_slow rotations of the original context (bounds floored/ceiled unless
  `rope.yarn.truncate` is false), and cos/sin multiplied by the attention
  factor (`rope.attention_factor`, or 0.1 * ln(factor) + 1, or the ratio of
  the two mscales when both `rope.yarn.mscale` and `rope.yarn.mscale_all_dim`
  are set).
* `longrope` (Phi-3, HF's "su" / "longrope"): every frequency divided by its own
  factor, `rope.long_factor` for a row whose largest position in the call is past
  `rope.original_max_len`, else `rope.short_factor`; cos/sin multiplied by the
  attention factor (`rope.attention_factor`, or sqrt(1 + ln(factor) /
  ln(original_max_len))). HF decides over the whole batch (max(position_ids));
  jaxlm per row, so that requests sharing the engine do not change each other.
  Cached keys keep the rotation they were written with (HF's Phi-3 generate
  recomputes its cache once when a sequence crosses original_max_len; jaxlm does
  not).
"""

import math

import jax.numpy as jnp

from ...errors import CheckpointError
from ..config import YarnConfig
from ..params import Spec, normal

SCALED_ROPE = ("linear", "dynamic", "yarn", "longrope")  # besides llama3


def _base_frequencies(theta, d: int):
    return 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))


def _llama3(inv_freq, cfg):
    factor, old_len = cfg.rope.factor, cfg.rope.original_max_len
    low, high = cfg.rope.low_freq_factor, cfg.rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rotary_dim(cfg) -> int:
    """The dimensions RoPE turns: head_dim, or latent attention's qk_rope_head_dim."""
    return cfg.mla.qk_rope_head_dim if cfg.mla.kv_lora_rank else cfg.head_dim


def mla_softmax_scale(cfg) -> float:
    """Latent attention's softmax scale: head_dim ** -0.5 (or model.attn_scale) times
    mscale(factor, mscale_all_dim) ** 2 under yarn with rope.yarn.mscale_all_dim set
    (DeepSeek's: the non-rotary dims scaled as the rotary ones)."""
    scale = cfg.attn_scale or cfg.head_dim ** -0.5
    m = cfg.rope.yarn.mscale_all_dim
    if cfg.rope.scaling == "yarn" and m and cfg.rope.factor > 1:
        scale *= (0.1 * m * math.log(cfg.rope.factor) + 1.0) ** 2
    return scale


def _yarn(cfg):
    d, theta, factor = rotary_dim(cfg), cfg.rope.theta, cfg.rope.factor

    def correction_dim(rotations):  # the dimension that turns `rotations` times in the context
        return d * math.log(cfg.rope.original_max_len / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(cfg.rope.yarn.beta_fast), correction_dim(cfg.rope.yarn.beta_slow)
    if cfg.rope.yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = _base_frequencies(theta, d)
    interpolation = extrapolation / factor
    return interpolation * ramp + extrapolation * (1 - ramp)


def rope_attention_factor(cfg) -> float:
    """What cos and sin are multiplied by (yarn's mscale, longrope's factor; 1 otherwise)."""
    if cfg.rope.scaling not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope.attention_factor:
        return cfg.rope.attention_factor
    if cfg.rope.scaling == "longrope":
        f = cfg.rope.factor
        return 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(cfg.rope.original_max_len))

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = cfg.rope.factor
    if cfg.rope.yarn.mscale and cfg.rope.yarn.mscale_all_dim:
        return mscale(factor, cfg.rope.yarn.mscale) / mscale(factor, cfg.rope.yarn.mscale_all_dim)
    return mscale(factor)


def rope_frequencies(cfg, seq_len=None):
    """Inverse frequencies [head_dim/2] under cfg.rope.scaling. seq_len (dynamic
    only; may be traced): the current length L; None means the original length."""
    d, kind = rotary_dim(cfg), cfg.rope.scaling
    if kind == "yarn":
        return _yarn(cfg)
    if kind == "dynamic":
        orig, factor = cfg.rope.original_max_len, cfg.rope.factor
        length = orig if seq_len is None else jnp.maximum(seq_len, orig).astype(jnp.float32)
        theta = cfg.rope.theta * (factor * length / orig - (factor - 1)) ** (d / (d - 2))
        return _base_frequencies(theta, d)
    inv_freq = _base_frequencies(cfg.rope.theta, d)
    if kind == "longrope":  # the short factors (`rope` picks per row)
        return inv_freq / jnp.asarray(cfg.rope.short_factor, jnp.float32)
    if kind == "linear":
        return inv_freq / cfg.rope.factor
    if kind == "llama3":
        return _llama3(inv_freq, cfg)
    return inv_freq


def _longrope(cfg, positions):
    """Per-row inverse frequencies [B, 1, D/2]: the long factors for a row reaching past
    original_max_len, else the short ones."""
    base = _base_frequencies(cfg.rope.theta, cfg.head_dim)
    long = jnp.max(positions, axis=1, keepdims=True)[..., None] + 1 > cfg.rope.original_max_len
    factors = jnp.where(long, jnp.asarray(cfg.rope.long_factor, jnp.float32),
                        jnp.asarray(cfg.rope.short_factor, jnp.float32))
    return base / factors


def rope(x, positions, cfg):
    """Rotate x [B,S,H,D] by positions [B,S]; pairs are (i, i + D/2) (Llama layout)."""
    if cfg.rope.scaling == "longrope":
        inv_freq = _longrope(cfg, positions)
    else:
        seq_len = jnp.max(positions) + 1 if cfg.rope.scaling == "dynamic" else None
        inv_freq = rope_frequencies(cfg, seq_len)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,S,D/2]
    scale = rope_attention_factor(cfg)
    cos = (jnp.cos(angles) * scale)[:, :, None, :]
    sin = (jnp.sin(angles) * scale)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rope_fields_from_hf(kind: str, params: dict, max_position_embeddings: int) -> dict:
    """RopeConfig fields (model.rope.*, theta aside) for a Hugging Face
    rope_parameters dict of type linear, dynamic or yarn (transformers' defaults for
    the keys it leaves out)."""
    if kind == "longrope":
        return _longrope_fields(params, max_position_embeddings)
    if not isinstance(params.get("factor"), (int, float)):
        raise CheckpointError(f"config.json: rope_parameters of type {kind!r} needs a numeric "
                              f"'factor', not {params.get('factor')!r}")
    fields = {"scaling": kind, "factor": float(params["factor"])}
    if kind == "dynamic":  # HF: the NTK base grows past max_position_embeddings
        fields["original_max_len"] = int(max_position_embeddings)
    if kind == "yarn":
        fields.update(
            original_max_len=int(params.get("original_max_position_embeddings")
                                 or max_position_embeddings),
            attention_factor=float(params.get("attention_factor") or 0.0),
            yarn=YarnConfig(beta_fast=float(params.get("beta_fast") or 32.0),
                            beta_slow=float(params.get("beta_slow") or 1.0),
                            mscale=float(params.get("mscale") or 0.0),
                            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                            truncate=bool(params.get("truncate", True))))
    return fields


def _longrope_fields(params: dict, max_position_embeddings: int) -> dict:
    orig = params.get("original_max_position_embeddings")
    if not isinstance(orig, int) or orig <= 0:
        raise CheckpointError("config.json: longrope needs original_max_position_embeddings, "
                              f"not {orig!r}")
    factor = params.get("factor") or max_position_embeddings / orig
    return {"scaling": "longrope", "factor": max(float(factor), 1.0), "original_max_len": orig,
            "attention_factor": float(params.get("attention_factor") or 0.0),
            "short_factor": tuple(params.get("short_factor") or ()),
            "long_factor": tuple(params.get("long_factor") or ())}


def rope_parameters_to_hf(cfg) -> dict:
    """The inverse of rope_fields_from_hf: HF rope_parameters entries (empty
    unless cfg.rope.scaling is linear, dynamic or yarn)."""
    if cfg.rope.scaling not in SCALED_ROPE:
        return {}
    out = {"rope_type": cfg.rope.scaling, "factor": cfg.rope.factor}
    if cfg.rope.scaling == "longrope":
        out.update(short_factor=list(cfg.rope.short_factor),
                   long_factor=list(cfg.rope.long_factor),
                   original_max_position_embeddings=cfg.rope.original_max_len)
        if cfg.rope.attention_factor:
            out["attention_factor"] = cfg.rope.attention_factor
    if cfg.rope.scaling == "yarn":
        out.update(original_max_position_embeddings=cfg.rope.original_max_len,
                   beta_fast=cfg.rope.yarn.beta_fast, beta_slow=cfg.rope.yarn.beta_slow,
                   truncate=cfg.rope.yarn.truncate)
        for key, value in (("mscale", cfg.rope.yarn.mscale),
                           ("mscale_all_dim", cfg.rope.yarn.mscale_all_dim),
                           ("attention_factor", cfg.rope.attention_factor)):
            if value:
                out[key] = value
    return out


def learned_position_specs(cfg):
    return {"table": Spec((cfg.max_seq_len, cfg.d_model), (None, "embed"),
                          normal(cfg.init_std), cfg.param_dtype)}


def sinusoidal(positions, d_model: int, dtype):
    """The original Transformer's table: sin on even, cos on odd features."""
    i = jnp.arange(d_model // 2, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] / (10000.0 ** (2 * i / d_model))
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return table.reshape(*positions.shape, d_model).astype(dtype)


def absolute_positions(params, positions, cfg, dtype):
    """What a family adds to the token embeddings, or None (rope, alibi)."""
    if cfg.positions == "learned":
        return jnp.take(params["positions"]["table"], positions, axis=0).astype(dtype)
    if cfg.positions == "sinusoidal":
        return sinusoidal(positions, cfg.d_model, dtype)
    return None


def alibi_slopes(n_heads: int):
    """Per-head slopes (Press et al.), with the interleaved extras for non-powers of 2."""
    def powers(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][:n_heads - closest]
    return jnp.array(slopes, jnp.float32)


def alibi_bias(q_positions, kv_positions, n_heads: int, bidirectional: bool = False):
    """[B, H, Sq, Sk] additive bias -slope * |q_pos - k_pos| (causal: k_pos <= q_pos)."""
    distance = kv_positions[:, None, :] - q_positions[:, :, None]  # [B,Sq,Sk], <= 0 when causal
    if bidirectional:
        distance = -jnp.abs(distance)
    return alibi_slopes(n_heads)[None, :, None, None] * distance[:, None].astype(jnp.float32)
