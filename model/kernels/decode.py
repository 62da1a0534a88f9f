"""Decode attention: one new query token per sequence against a KV cache.

    out = decode_attention(q, k_cache, v_cache, mask, scale=..., softcap=...,
                           backend="gpu" | "tpu", interpret=..., block_k=..., num_splits=...)

q [B,1,H,D], cache k/v [B,T,KVH,D] (the kernels take them head-major, [B,KVH,T,D]:
the view of a head-major KV cache, `jaxlm.infer.cache`, is read in place), mask
with kv_lengths
[B] (plus optional causal / window / q_positions / kv_positions). Only the
KV blocks below each sequence's length (and inside its window) are read;
each block is read once per GQA group. Long caches are split over the
sequence (flash-decoding): the splits run in parallel and their partial
results are combined here with their log-sum-exps.

Not supported (the dispatcher routes these to the flash kernel): segment
ids, a bias. A quantized KV cache (generate.kv_dtype) reaches the kernel
dequantized by its store (`jaxlm.model.kv.quant`). Gradients (rare:
decode is inference) come from the XLA reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from . import decode_gpu, decode_tpu
from .backends import resolve_backend
from .blocks import round_up
from .mask import MaskSpec
from .reference import attention_reference

DEFAULT_BLOCK_K = {"gpu": 64, "tpu": 512}
MIN_BLOCK_K = {"gpu": 16, "tpu": 8}
GPU_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
    backend: str
    interpret: Any
    block_k: int
    num_splits: int
    blocks_per_split: int
    causal: bool
    window: Optional[int]
    scale: Optional[float]  # None: head_dim ** -0.5
    softcap: Optional[float]


def supports(mask: MaskSpec, bias, q_len: int) -> bool:
    """Whether the decode kernel computes exactly this call."""
    return (q_len == 1 and mask.kv_lengths is not None and mask.q_segment_ids is None
            and bias is None)


def decode_attention(q, k, v, mask: MaskSpec, *, scale: Optional[float] = None,
                     softcap: Optional[float] = None, backend: Optional[str] = None,
                     interpret: Any = None, block_k: Optional[int] = None,
                     num_splits: Optional[int] = None):
    """q [B,1,H,D], k/v [B,T,KVH,D], mask.kv_lengths [B] -> [B,1,H,D]."""
    b, sq, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if not supports(mask, None, sq):
        raise ValueError("decode_attention needs one query per sequence, mask.kv_lengths, "
                         "and no segment ids")
    backend, interpret = resolve_backend(backend, interpret)
    bk = _fit_block(t, block_k or DEFAULT_BLOCK_K[backend], MIN_BLOCK_K[backend])
    nk = -(-t // bk)
    ns = max(1, min(nk, num_splits or _default_splits(backend, b * kvh, nk)))
    c = DecodeStatic(backend, interpret, bk, ns, -(-nk // ns), bool(mask.causal), mask.window,
                     None if scale is None else float(scale),
                     None if softcap is None else float(softcap))
    return _decode(c, q, k, v, (mask.q_positions, mask.kv_positions, mask.kv_lengths))


def _mask(c: DecodeStatic, arrays) -> MaskSpec:
    q_positions, kv_positions, kv_lengths = arrays
    return MaskSpec(causal=c.causal, window=c.window, q_positions=q_positions,
                    kv_positions=kv_positions, kv_lengths=kv_lengths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(c: DecodeStatic, q, k, v, arrays):
    """The kernel; differentiating it (rare: decode is inference) takes the
    reference's gradient, exact for the same function."""
    b, _, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g, bk = h // kvh, c.block_k
    t_pad = round_up(t, bk)
    d_pad = _pow2(max(d, 16)) if c.backend == "gpu" else d
    # [B,KVH,T,D]: cancels the transpose of a head-major cache's view (no copy)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if t_pad != t or d_pad != d:  # a copy of the cache: only for odd cache shapes
        pad = ((0, 0), (0, 0), (0, t_pad - t), (0, d_pad - d))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    mask = _mask(c, arrays)
    kv_len = jnp.minimum(jnp.broadcast_to(jnp.asarray(mask.kv_lengths, jnp.int32), (b,)), t)
    q_pos = (jnp.zeros((b,), jnp.int32) if mask.q_positions is None
             else jnp.broadcast_to(jnp.asarray(mask.q_positions, jnp.int32), (b, 1))[:, 0])
    k_pos = None
    if mask.kv_positions is not None:
        k_pos = jnp.asarray(mask.kv_positions, jnp.int32)
        k_pos = jnp.pad(k_pos, ((0, 0), (0, t_pad - t)), mode="edge")
    lo, hi = _block_range(c, k_pos, q_pos, kv_len, b, t_pad // bk)

    kc = dataclasses.replace(c, scale=d ** -0.5 if c.scale is None else c.scale)
    qg = q.reshape(b, kvh, g, d)  # q head h = kvh * G + g
    if c.backend == "gpu":
        gp = max(16, _pow2(g))  # tensor-core rows
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, d_pad - d)))
        o, lse = decode_gpu.decode(kc, qg, k, v, k_pos, q_pos, kv_len, lo, hi)
    else:
        o, lse = decode_tpu.decode(kc, qg, k, v, k_pos, q_pos, kv_len, lo, hi)
    out = combine(o[:, :, :, :g, :d], lse[:, :, :, :g])  # [B,KVH,G,D]
    return out.reshape(b, 1, h, d).astype(q.dtype)


def _decode_fwd(c, q, k, v, arrays):
    return _decode(c, q, k, v, arrays), (q, k, v, arrays)


def _decode_bwd(c, res, do):
    q, k, v, arrays = res
    ref = functools.partial(attention_reference, mask=_mask(c, arrays), scale=c.scale,
                            softcap=c.softcap)
    return (*jax.vjp(ref, q, k, v)[1](do), None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def combine(o, lse):
    """Merge per-split results: o [..., S, G, D] (normalised), lse [..., S, G] -> [..., G, D].

    Empty splits have lse = -inf and weigh 0; a row empty everywhere gives 0."""
    m = jnp.max(lse, axis=-2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # [..., S, G]
    total = jnp.sum(w, axis=-2)
    out = jnp.sum(w[..., None] * o, axis=-3)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]


def _block_range(c: DecodeStatic, k_pos, q_pos, kv_len, b: int, nk: int):
    """[lo, hi) of the KV blocks each sequence may see (conservative), int32 [B]."""
    starts = jnp.arange(nk, dtype=jnp.int32) * c.block_k
    if k_pos is None:
        kmin, kmax = starts[None], (starts + c.block_k - 1)[None]
    else:
        blocks = k_pos.reshape(k_pos.shape[0], nk, c.block_k)
        kmin, kmax = blocks.min(-1), blocks.max(-1)
    ok = starts[None] < kv_len[:, None]
    if c.causal:
        ok = ok & (kmin <= q_pos[:, None])
    if c.window is not None:
        ok = ok & (kmax > q_pos[:, None] - c.window)
    anyv = ok.any(-1)
    lo = jnp.where(anyv, jnp.argmax(ok, -1), 0).astype(jnp.int32)
    hi = jnp.where(anyv, nk - jnp.argmax(ok[:, ::-1], -1), 0).astype(jnp.int32)
    return lo, hi


def _default_splits(backend: str, programs: int, nk: int) -> int:
    if backend == "gpu":
        return -(-GPU_TARGET_PROGRAMS // programs)
    return 2 if nk >= 8 else 1  # megacore TPUs run the two halves on two cores


def _fit_block(t: int, block: int, minimum: int) -> int:
    """The largest power-of-two block <= `block` dividing t (>= minimum), so the
    cache is read in place; `minimum` (with padding) when none divides."""
    block = min(block, max(minimum, _pow2(t)))
    while block > minimum and t % block:
        block //= 2
    return block


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
