"""Decode attention, Pallas GPU (Triton lowering): one query token per sequence.

Grid (B, KVH, splits): a program takes the G query heads of one KV head
(padded to >= 16 rows for the tensor cores) and loops over its split of the
KV blocks that are visible ([lo, hi) per sequence, so nothing past a
sequence's length is read); every KV block is loaded once for the whole
group. Per-split outputs are normalised, with their log-sum-exp, and
combined by the caller (`decode.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .blocks import attend_block, empty_carry, finish, visible



def _kernel(r, o_ref, lse_ref, *, c):
    bk, bps = c.block_k, c.blocks_per_split
    s = pl.program_id(2)
    lo = jnp.maximum(r["lo"][...], s * bps)
    hi = jnp.minimum(r["hi"][...], (s + 1) * bps)
    q = r["q"][...]  # [Gp, D]
    q_pos = r["q_pos"][...]
    kv_len = r["kv_len"][...]

    def body(j, carry):
        ks = pl.multiple_of(j * bk, bk)
        sl = pl.ds(ks, bk)
        k, v = r["k"][sl, :], r["v"][sl, :]  # [bk, D]
        k_pos = None if r["k_pos"] is None else r["k_pos"][sl][None, :]
        ok = visible(q_pos, ks + jnp.arange(bk, dtype=jnp.int32)[None, :], k_pos=k_pos,
                     causal=c.causal, window=c.window, kv_len=kv_len)
        return attend_block(q, k, v, ok, carry, c.scale, c.softcap)

    rows = q.shape[0]
    acc, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, empty_carry(*q.shape))
    o, lse = finish(acc, m, l)
    o_ref[...] = o
    lse_ref[...] = lse.reshape(rows)


def decode(c, q, k, v, k_pos, q_pos, kv_len, lo, hi):
    """q [B,KVH,Gp,D], k/v [B,KVH,T,D] -> per split (o [B,KVH,S,Gp,D] f32, lse [B,KVH,S,Gp])."""
    b, kvh, gp, d = q.shape
    t = k.shape[2]
    ns = c.num_splits
    scalar = pl.BlockSpec((None,), lambda b_, h_, s_: (b_,))
    bkp = k_pos is not None and k_pos.shape[0] > 1
    ins = dict(q=q, k=k, v=v, k_pos=k_pos, q_pos=q_pos, kv_len=kv_len, lo=lo, hi=hi)
    specs = {
        "q": pl.BlockSpec((None, None, gp, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
        "k": pl.BlockSpec((None, None, t, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
        "v": pl.BlockSpec((None, None, t, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
        "k_pos": None if k_pos is None else pl.BlockSpec(
            (None, t), lambda b_, h_, s_: (b_ if bkp else 0, 0)),
        "q_pos": scalar, "kv_len": scalar, "lo": scalar, "hi": scalar,
    }
    return pl.pallas_call(
        lambda r, o_ref, lse_ref: _kernel(r, o_ref, lse_ref, c=c),
        grid=(b, kvh, ns), in_specs=[specs],
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda b_, h_, s_: (b_, h_, s_, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, ns, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, ns, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=c.interpret, name="decode_attention",
    )(ins)
