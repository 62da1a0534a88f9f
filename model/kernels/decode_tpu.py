"""Decode attention, Pallas TPU (Mosaic): one query token per sequence.

Grid (B, splits, blocks per split). A step loads one KV block of the cache
for all KV heads at once ([KVH, bk, D] of the head-major cache, no copy) and
updates the G query heads of every group against it; running max / sum /
accumulator live in VMEM scratch. Blocks outside a sequence's visible range
are neither computed nor fetched (clamped index map, scalar-prefetched
ranges). Per-split results are combined by the caller (`decode.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .blocks import NEG, attend_block_scratch, finish, visible

LANES, SUBLANES = 128, 8


def _kernel(lo_ref, hi_ref, qpos_ref, len_ref, r, o_ref, lse_ref, m_s, l_s, acc_s, *, c, kvh):
    b, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk, bps = c.block_k, c.blocks_per_split
    blk = s * bps + j

    @pl.when(j == 0)
    def _init():
        m_s[...] = jnp.full(m_s.shape, NEG, jnp.float32)
        l_s[...] = jnp.zeros(l_s.shape, jnp.float32)
        acc_s[...] = jnp.zeros(acc_s.shape, jnp.float32)

    @pl.when((blk >= lo_ref[b]) & (blk < hi_ref[b]))
    def _step():
        k_pos = None if r["k_pos"] is None else r["k_pos"][:1, :]
        k_idx = blk * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = visible(qpos_ref[b], k_idx, k_pos=k_pos, causal=c.causal, window=c.window,
                     kv_len=len_ref[b])  # [1, bk], the same for every head
        for h in range(kvh):  # q [G, D] over k, v [bk, D]
            attend_block_scratch(r["q"][h], r["k"][h], r["v"][h], ok, m_s, l_s,
                                 acc_s, h, c.scale, c.softcap)

    @pl.when(j == bps - 1)
    def _out():
        for h in range(kvh):
            o, lse = finish(acc_s[h], m_s[h][:, :1], l_s[h][:, :1])
            o_ref[h] = o
            lse_ref[h] = jnp.broadcast_to(lse, lse_ref.shape[1:])


def decode(c, q, k, v, k_pos, q_pos, kv_len, lo, hi):
    """q [B,KVH,G,D], k/v [B,KVH,T,D] -> per split (o [B,KVH,S,G,D] f32, lse [B,KVH,S,G])."""
    b, kvh, g, d = q.shape
    bk, bps, ns = c.block_k, c.blocks_per_split, c.num_splits

    def kv_block(b_, s_, j, lo_, hi_):
        return jnp.minimum(jnp.maximum(s_ * bps + j, lo_[b_]), jnp.maximum(hi_[b_] - 1, 0))

    bkp = k_pos is not None and k_pos.shape[0] > 1
    kv_spec = pl.BlockSpec((None, kvh, bk, d), lambda b_, s_, j, lo_, hi_, *_: (
        b_, 0, kv_block(b_, s_, j, lo_, hi_), 0))
    ins = {"q": q, "k": k, "v": v, "k_pos": None if k_pos is None else jnp.broadcast_to(
        k_pos[:, None, :], (k_pos.shape[0], SUBLANES, k_pos.shape[1]))}
    specs = {
        "q": pl.BlockSpec((None, kvh, g, d), lambda b_, *_: (b_, 0, 0, 0)),
        "k": kv_spec, "v": kv_spec,
        "k_pos": None if k_pos is None else pl.BlockSpec(
            (None, SUBLANES, bk), lambda b_, s_, j, lo_, hi_, *_: (
                b_ if bkp else 0, 0, kv_block(b_, s_, j, lo_, hi_))),
    }
    out_map = lambda b_, s_, *_: (b_, s_, 0, 0, 0)
    o, lse = pl.pallas_call(
        lambda *refs: _kernel(*refs, c=c, kvh=kvh),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, ns, bps), in_specs=[specs],
            out_specs=[pl.BlockSpec((None, None, kvh, g, d), out_map),
                       pl.BlockSpec((None, None, kvh, g, LANES), out_map)],
            scratch_shapes=[pltpu.VMEM((kvh, g, LANES), jnp.float32),
                            pltpu.VMEM((kvh, g, LANES), jnp.float32),
                            pltpu.VMEM((kvh, g, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, ns, kvh, g, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, ns, kvh, g, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=c.interpret, name="decode_attention_tpu",
    )(lo, hi, q_pos, kv_len, ins)
    return o.transpose(0, 2, 1, 3, 4), lse[..., 0].transpose(0, 2, 1, 3)
