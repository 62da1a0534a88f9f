"""Calibrated 4-bit weight quantization: GPTQ and AWQ as pure functions on arrays.

Every function here takes one matmul weight as a 2-D float array `w [in, out]`
(jaxlm's x @ w orientation: rows are input channels) and the Hessian of its
layer's output error `h [in, in] = sum over calibration tokens of x x^T`
(`hessian`), and returns the asymmetric group-wise int4 form GPTQ / AWQ
checkpoints store: codes [in, out] in 0..15, and per (group of `group`
input rows, output channel) a float scale and an integer zero point, so that

    w ~= (codes - zero[g]) * scale[g]        g = row // group

* `rtn`: round to nearest with each group's min/max (AutoGPTQ's quantizer:
  the range always holds 0; `sym` centres it, zero = 8).
* `gptq`: GPTQ (Frantar et al. 2022): the rows (input channels) are quantized
  one at a time and each one's rounding error is spread over the rows not yet
  quantized through the inverse Hessian's Cholesky factor, so the output
  error ||x w - x w_q|| rather than the weight error is minimised. Dampened by
  `damp` x the mean diagonal; a group's scale and zero are taken from the
  updated weights when its first row comes up. `act_order` quantizes rows in
  order of decreasing Hessian diagonal, with static groups (scales from the
  original weight, AutoGPTQ's static_groups) so that groups stay contiguous.
* `awq_scale`: AWQ (Lin et al. 2023): one scale per input channel,
  s = mean|x|^alpha normalised, alpha searched on a grid for the least output
  error of the weights that share the input (q|k|v, gate|up side by side) as
  rtn(w * s) / s. The error is measured exactly from the Hessian:
  ||x dw||^2 = tr(dw^T h dw). The caller folds 1/s into the op before
  (`model/calibration.py`).

The error of a quantized weight on the calibration data is `output_error`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..errors import ConfigError

MAXQ = 15  # 4 bits


def hessian(x) -> jax.Array:
    """x [..., in] -> sum over tokens of x x^T [in, in] in float32."""
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x2.T @ x2


def group_params(w, sym: bool = False):
    """w [n, out] (one group of rows) -> (scale [out], zero [out] float, integral):
    min/max over the group with 0 inside the range; a constant column gets [-1, 1]."""
    wmin = jnp.minimum(jnp.min(w, axis=0), 0.0)
    wmax = jnp.maximum(jnp.max(w, axis=0), 0.0)
    if sym:
        wmax = jnp.maximum(-wmin, wmax)
        wmin = jnp.where(wmin < 0, -wmax, wmin)
    flat = (wmin == 0) & (wmax == 0)
    wmin, wmax = jnp.where(flat, -1.0, wmin), jnp.where(flat, 1.0, wmax)
    scale = (wmax - wmin) / MAXQ
    zero = jnp.full_like(scale, (MAXQ + 1) / 2) if sym else jnp.round(-wmin / scale)
    return scale, zero


def quantize_rows(w, scale, zero):
    """w [..., out] with its scale / zero [..., out] -> codes (float, 0..15)."""
    return jnp.clip(jnp.round(w / scale) + zero, 0, MAXQ)


def dequantize(codes, scale, zero, group: int):
    """codes [in, out], scale / zero [in / group, out] -> w [in, out] float32."""
    s = jnp.repeat(scale, group, axis=0)
    z = jnp.repeat(zero, group, axis=0)
    return (codes.astype(jnp.float32) - z) * s


def _check_group(n: int, group: int) -> None:
    if group <= 0 or n % group:
        raise ConfigError(f"model.quant_group={group} does not divide the input dimension {n}")


@functools.partial(jax.jit, static_argnames=("group", "sym"))
def rtn(w, group: int = 128, sym: bool = False):
    """Round to nearest: w [in, out] -> (codes [in, out] uint8, scale, zero [in/group, out])."""
    n, out = w.shape
    _check_group(n, group)
    wg = w.astype(jnp.float32).reshape(n // group, group, out)
    scale, zero = jax.vmap(lambda g: group_params(g, sym))(wg)
    codes = quantize_rows(wg, scale[:, None], zero[:, None]).reshape(n, out)
    return codes.astype(jnp.uint8), scale, zero


@functools.partial(jax.jit, static_argnames=("group", "sym", "act_order"))
def gptq(w, h, group: int = 128, damp: float = 0.01, sym: bool = False, act_order: bool = False):
    """GPTQ: w [in, out], h [in, in] -> (codes [in, out] uint8, scale, zero [in/group, out])."""
    n, out = w.shape
    _check_group(n, group)
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0  # inputs never seen: their rows do not matter
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[:, None], 0.0, w)
    groups = jnp.arange(n) // group
    if act_order:  # static groups: from the original weight, before any update
        _, scale0, zero0 = rtn(w, group, sym)
        perm = jnp.argsort(-jnp.diag(h), stable=True)
    else:
        scale0 = zero0 = jnp.zeros((n // group, out), jnp.float32)
        perm = jnp.arange(n)
    w, h, groups = w[perm], h[perm][:, perm], groups[perm]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=h.dtype)
    # the upper Cholesky factor of h^-1: row i holds how row i's error moves rows > i
    hinv = jnp.linalg.cholesky(jnp.linalg.inv(h), upper=True)

    def step(i, carry):
        w, codes, scale, zero = carry
        if not act_order:  # a group's first row: its scale / zero from the updated rows
            fresh_s, fresh_z = group_params(jax.lax.dynamic_slice_in_dim(w, i, group), sym)
            new = i % group == 0
            g = i // group
            scale = scale.at[g].set(jnp.where(new, fresh_s, scale[g]))
            zero = zero.at[g].set(jnp.where(new, fresh_z, zero[g]))
        g = groups[i]
        q = quantize_rows(w[i], scale[g], zero[g])
        err = (w[i] - (q - zero[g]) * scale[g]) / hinv[i, i]
        w = w - hinv[i][:, None] * err[None, :]  # rows <= i: hinv is 0 below, i is done
        return w, codes.at[i].set(q), scale, zero

    codes = jnp.zeros((n, out), jnp.float32)
    _, codes, scale, zero = jax.lax.fori_loop(0, n, step, (w, codes, scale0, zero0))
    codes = codes[jnp.argsort(perm)]
    return codes.astype(jnp.uint8), scale, zero


def output_error(w, w_q, h) -> jax.Array:
    """||x w - x w_q||^2 over the calibration tokens, from h = sum x x^T."""
    d = (w - w_q).astype(jnp.float32)
    return jnp.sum(d * (h @ d))


@functools.partial(jax.jit, static_argnames=("group", "grid"))
def awq_scale(w, h, x_abs_mean, group: int = 128, grid: int = 20):
    """AWQ's per-input-channel scale for w [in, out] (the weights that share one input
    side by side, e.g. q | k | v): s = x_abs_mean^alpha / sqrt(max * min), alpha in
    {0, 1/grid, ..., (grid-1)/grid} with the least output error of rtn(w * s) / s.
    alpha = 0 (s = 1) is plain RTN, so AWQ is never worse on h. -> s [in] float32."""
    xm = jnp.maximum(x_abs_mean.astype(jnp.float32), 1e-8)
    w = w.astype(jnp.float32)

    def loss(alpha):
        s = xm ** alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        codes, scale, zero = rtn(w * s[:, None], group)
        return output_error(w, dequantize(codes, scale, zero, group) / s[:, None], h), s

    losses, scales = jax.lax.map(loss, jnp.arange(grid, dtype=jnp.float32) / grid)
    return scales[jnp.argmin(losses)]


__all__ = ["MAXQ", "hessian", "group_params", "quantize_rows", "dequantize", "rtn", "gptq",
           "output_error", "awq_scale"]
