"""Normalisation layers."""

import jax
import jax.numpy as jnp

from jaxlm.model.params import Spec, ones


def norm_specs(cfg):
    return {"scale": Spec((cfg.d_model,), ("embed",), ones, cfg.param_dtype)}


def rmsnorm(p, x, eps: float):
    """x * rsqrt(mean(x^2) + eps) * scale, computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y.astype(x.dtype) * p["scale"].astype(x.dtype))


def norm(p, x, cfg):
    return rmsnorm(p, x, cfg.norm_eps)
