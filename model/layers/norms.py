"""Normalisation layers: RMSNorm (no mean, no bias) and LayerNorm."""

import jax
import jax.numpy as jnp

from ..params import Spec, ones, zeros


def norm_specs(cfg, size: int = 0, axis: str = "embed"):
    """A norm over the last axis of `size` features (default d_model). With
    model.norm_unit_offset the scale starts at 0 (it multiplies by 1 + scale)."""
    size = size or cfg.d_model
    specs = {"scale": Spec((size,), (axis,), zeros if cfg.norm_unit_offset else ones,
                           cfg.param_dtype)}
    if cfg.norm == "layernorm":
        specs["bias"] = Spec((size,), (axis,), zeros, cfg.param_dtype)
    return specs


def rmsnorm(p, x, eps: float, unit_offset: bool = False):
    """x * rsqrt(mean(x^2) + eps) * scale, computed in float32; unit_offset: times
    (1 + scale) in float32 before the cast back (Gemma's)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    return y.astype(x.dtype) * p["scale"].astype(x.dtype)


def layernorm(p, x, eps: float):
    """(x - mean) * rsqrt(var + eps) * scale + bias, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def norm(p, x, cfg):
    if cfg.norm == "layernorm":
        return layernorm(p, x, cfg.norm_eps)
    return rmsnorm(p, x, cfg.norm_eps, cfg.norm_unit_offset)
