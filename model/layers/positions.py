"""Position encodings: RoPE (Llama-3 scaling optional), learned, sinusoidal, ALiBi."""

import math

import jax.numpy as jnp

from jaxlm.model.params import Spec, normal


def rope_frequencies(cfg):
    """Inverse frequencies [head_dim/2], with the Llama-3 long-context scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_scaling != "llama3":
        return inv_freq
    factor, old_len = cfg.rope_scaling_factor, cfg.rope_original_max_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope(x, positions, cfg):
    """Rotate x [B,S,H,D] by positions [B,S]; pairs are (i, i + D/2) (Llama layout)."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)  # [B,S,D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


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
