"""Flash attention, Pallas TPU (Mosaic): forward, dq and dk/dv kernels.

Layout: q/o [B,H,Sq,D], k/v [B,KVH,Sk,D] (head-major: Mosaic tiles the last
two dims), sequences padded to whole blocks by `flash.py`. The KV (or Q)
blocks are the last, sequential grid axis; scratch VMEM carries the running
max / sum / accumulator across it. The block range [lo, hi) of each row of
the grid comes in by scalar prefetch: outside it the kernel body is skipped
and the index map repeats the previous block index, so nothing is fetched.

Mask arrays follow the splash-attention layouts: an array indexed by the
rows of the scores is broadcast over 128 lanes ([B, S, 128]), one indexed by
the columns over 8 sublanes ([B, 8, S]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .blocks import NEG, finish, logits, softmax_step, uncap, visible

NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))
LANES, SUBLANES = 128, 8


def _dot(a, b, dims=NN):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lanes(x):  # [B, S] -> [B, S, 128]: read as a column [bs, 1]
    return None if x is None else jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))


def _sublanes(x):  # [B, S] -> [B, 8, S]: read as a row [1, bs]
    if x is None:
        return None
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))


def _div(a, n):  # lax.div/rem: Mosaic lowers jnp's floor division via sign(), which needs a TPU
    return lax.div(a, jnp.int32(n))


def _mod(a, n):
    return lax.rem(a, jnp.int32(n))


def _spec(x, block, index_map):
    return None if x is None else pl.BlockSpec(block, index_map)


def _clamp(n, lo, hi):
    """Block index n kept inside [lo, hi): skipped steps re-use a fetched block."""
    return jnp.minimum(jnp.maximum(n, lo), jnp.maximum(hi - 1, 0))


def _scalars(arrs, lo, hi):
    """Scalar-prefetch operands: flat block ranges and the KV fill levels."""
    kv_len = arrs.kv_len if arrs.kv_len is not None else jnp.zeros((lo.shape[0],), jnp.int32)
    return lo.reshape(-1), hi.reshape(-1), kv_len


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _mask_kw(c, has_len, len_ref, b):
    return dict(causal=c.causal, window=c.window, q_valid=c.q_valid, k_valid=c.k_valid,
                kv_len=len_ref[b] if has_len else None)


# ------------------------------------------------------------ forward

def _fwd_kernel(lo_ref, hi_ref, len_ref, r, o_ref, lse_ref, m_s, l_s, acc_s, *,
                c, has_len, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = c.blocks.block_q, c.blocks.block_k

    @pl.when(j == 0)
    def _init():
        m_s[...] = jnp.full(m_s.shape, NEG, jnp.float32)
        l_s[...] = jnp.zeros(l_s.shape, jnp.float32)
        acc_s[...] = jnp.zeros(acc_s.shape, jnp.float32)

    row = b * nq + i

    @pl.when((j >= lo_ref[row]) & (j < hi_ref[row]))
    def _step():
        q, k, v = r["q"][...], r["k"][...], r["v"][...]
        bias = None if r["bias"] is None else r["bias"][...]
        s, _ = logits(_dot(q, k, NT), c.scale, c.softcap, bias)  # [bq, bk]
        ok = visible(i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0),
                     j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1),
                     **_row_col(r, "q", "k"), **_mask_kw(c, has_len, len_ref, b))
        p, alpha, m, l = softmax_step(s, ok, m_s[:, :1], l_s[:, :1])
        m_s[...] = jnp.broadcast_to(m, m_s.shape)
        l_s[...] = jnp.broadcast_to(l, l_s.shape)
        acc_s[...] = alpha * acc_s[...] + _dot(p.astype(v.dtype), v)

    @pl.when(j == nk - 1)
    def _out():
        o, lse = finish(acc_s[...], m_s[:, :1], l_s[:, :1])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _row_col(r, rows: str, cols: str):
    """Mask operands: `rows` side as columns [n,1], `cols` side as rows [1,n]."""
    out = {}
    for side, as_col in ((rows, True), (cols, False)):
        for kind in ("pos", "seg"):
            ref = r[f"{side}_{kind}"]
            out[f"{side}_{kind}"] = None if ref is None else (ref[:, :1] if as_col else ref[:1, :])
    return out


def _q_row_specs(c, arrs, bias, nq: int, bq: int, bk: int, d: int):
    """BlockSpecs of a (B, H, nq, nk) grid (forward, dq): a Q block stays, KV blocks
    stream; outside [lo, hi) the KV-side index repeats a fetched block."""
    g = c.group
    bb = bias is not None and bias.shape[0] > 1

    def kv(b, i, j, lo, hi):
        return _clamp(j, lo[b * nq + i], hi[b * nq + i])

    q_map = lambda b, h, i, j, *_: (b, h, i, 0)
    kv_map = lambda b, h, i, j, lo, hi, _: (b, _div(h, g), kv(b, i, j, lo, hi), 0)
    bias_map = lambda b, h, i, j, lo, hi, _: (b if bb else 0, h, i, kv(b, i, j, lo, hi))
    rows_map = lambda b, h, i, j, *_: (b, i, 0)  # q-side mask arrays, [B, Sq, 128]
    cols_map = lambda b, h, i, j, lo, hi, _: (b, 0, kv(b, i, j, lo, hi))  # kv-side, [B, 8, Sk]
    return {
        "q": pl.BlockSpec((None, None, bq, d), q_map),
        "do": pl.BlockSpec((None, None, bq, d), q_map),
        "k": pl.BlockSpec((None, None, bk, d), kv_map),
        "v": pl.BlockSpec((None, None, bk, d), kv_map),
        "bias": _spec(bias, (None, None, bq, bk), bias_map),
        "q_pos": _spec(arrs.q_pos, (None, bq, LANES), rows_map),
        "q_seg": _spec(arrs.q_seg, (None, bq, LANES), rows_map),
        "k_pos": _spec(arrs.k_pos, (None, SUBLANES, bk), cols_map),
        "k_seg": _spec(arrs.k_seg, (None, SUBLANES, bk), cols_map),
    }


def _q_row_inputs(q, k, v, bias, arrs, **more):
    return dict(q=q, k=k, v=v, bias=bias, q_pos=_lanes(arrs.q_pos), q_seg=_lanes(arrs.q_seg),
                k_pos=_sublanes(arrs.k_pos), k_seg=_sublanes(arrs.k_seg), **more)


def forward(c, q, k, v, bias, arrs, lo, hi):
    """-> (o [B,H,Sq,D], lse [B,H,Sq] f32). lo/hi [B, nq]: KV block range per Q block."""
    b, h, sq, d = q.shape
    bq, bk = c.blocks.block_q, c.blocks.block_k
    nq, nk = sq // bq, k.shape[2] // bk
    assert lo.shape == hi.shape == (b, nq)
    specs = _q_row_specs(c, arrs, bias, nq, bq, bk, d)
    del specs["do"]
    out_map = lambda b_, h_, i, j, *_: (b_, h_, i, 0)
    kernel = functools.partial(_fwd_kernel, c=c, has_len=arrs.kv_len is not None, nq=nq, nk=nk)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=[specs],
            out_specs=[pl.BlockSpec((None, None, bq, d), out_map),
                       pl.BlockSpec((None, None, bq, LANES), out_map)],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),  # running max
                            pltpu.VMEM((bq, LANES), jnp.float32),  # running sum
                            pltpu.VMEM((bq, d), jnp.float32)]),  # accumulator
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq, LANES), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=c.interpret, name="flash_fwd_tpu",
    )(*_scalars(arrs, lo, hi), _q_row_inputs(q, k, v, bias, arrs))
    return o, lse[..., 0]


# ------------------------------------------------------------ backward: dq (+ dbias)

def _dq_kernel(lo_ref, hi_ref, len_ref, r, dq_ref, *rest, c, has_len, nq, nk):
    dbias_ref = rest[0] if len(rest) == 2 else None
    acc_s = rest[-1]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq

    @pl.when(j == 0)
    def _init():
        acc_s[...] = jnp.zeros(acc_s.shape, jnp.float32)

    row = b * nq + i
    run = (j >= lo_ref[row]) & (j < hi_ref[row])

    @pl.when(run)
    def _step():
        q, k, v, do = r["q"][...], r["k"][...], r["v"][...], r["do"][...]
        lse = jnp.expand_dims(r["lse"][0], -1)  # [bq, 1]
        delta = jnp.expand_dims(r["delta"][0], -1)
        bias = None if r["bias"] is None else r["bias"][...]
        s, t = logits(_dot(q, k, NT), c.scale, c.softcap, bias)
        ok = visible(i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0),
                     j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1),
                     **_row_col(r, "q", "k"), **_mask_kw(c, has_len, len_ref, b))
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v, NT) - delta)
        if dbias_ref is not None:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)
        acc_s[...] += _dot(uncap(ds, t).astype(k.dtype), k)

    if dbias_ref is not None:
        @pl.when(jnp.logical_not(run))
        def _zero():
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

    @pl.when(j == nk - 1)
    def _out():
        dq_ref[...] = (acc_s[...] * c.scale).astype(dq_ref.dtype)


def _backward_dq(c, q, k, v, bias, arrs, do, lse, delta, lo, hi, need_dbias):
    b, h, sq, d = q.shape
    bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
    nq, nk = sq // bq, k.shape[2] // bk
    assert lo.shape == hi.shape == (b, nq)
    vec_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, *_: (b_, h_, 0, i))
    specs = dict(_q_row_specs(c, arrs, bias, nq, bq, bk, d), lse=vec_spec, delta=vec_spec)
    out_specs = [specs["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if need_dbias:  # every (i, j) block is written: ds, or zeros where skipped
        dbias_map = lambda b_, h_, i, j, *_: (b_, h_, i, j)
        out_specs.append(pl.BlockSpec((None, None, bq, bk), dbias_map))
        out_shape.append(jax.ShapeDtypeStruct((b, h, sq, k.shape[2]), jnp.float32))
    kernel = functools.partial(_dq_kernel, c=c, has_len=arrs.kv_len is not None, nq=nq, nk=nk)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=[specs], out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=out_shape,
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=c.interpret, name="flash_bwd_dq_tpu",
    )(*_scalars(arrs, lo, hi), _q_row_inputs(q, k, v, bias, arrs, do=do, lse=lse[:, :, None],
                                             delta=delta[:, :, None]))
    return out[0], (out[1] if need_dbias else None)


# ------------------------------------------------------------ backward: dk, dv

def _dkv_kernel(lo_ref, hi_ref, len_ref, r, dk_ref, dv_ref, dk_s, dv_s, *,
                c, has_len, nq, nk):
    """Scores transposed ([bk, bq]): lse/delta are rows, k-side mask operands columns."""
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
    i = _mod(t, nq)

    @pl.when(t == 0)
    def _init():
        dk_s[...] = jnp.zeros(dk_s.shape, jnp.float32)
        dv_s[...] = jnp.zeros(dv_s.shape, jnp.float32)

    col = b * nk + j

    @pl.when((i >= lo_ref[col]) & (i < hi_ref[col]))
    def _step():
        q, k, v, do = r["q"][...], r["k"][...], r["v"][...], r["do"][...]
        lse, delta = r["lse"][:1, :], r["delta"][:1, :]  # [1, bq]
        bias = None if r["bias"] is None else r["bias"][...].astype(jnp.float32).T
        s, tc = logits(_dot(k, q, NT), c.scale, c.softcap, bias)  # [bk, bq]
        ok = visible(i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1),
                     j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0),
                     **_row_col(r, "k", "q"), **_mask_kw(c, has_len, len_ref, b))
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)
        dv_s[...] += _dot(p.astype(do.dtype), do)
        ds = p * (_dot(v, do, NT) - delta)
        dk_s[...] += _dot(uncap(ds, tc).astype(q.dtype), q)

    @pl.when(t == c.group * nq - 1)
    def _out():
        dk_ref[...] = (dk_s[...] * c.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_s[...].astype(dv_ref.dtype)


def _backward_dkv(c, q, k, v, bias, arrs, do, lse, delta, lo, hi):
    """Grid (B, KVH, nk, G * nq): a KV block stays; the Q blocks of its G query
    heads stream (outside [lo, hi) the Q-side index repeats a fetched block)."""
    b, h, sq, d = q.shape
    kvh, sk = k.shape[1], k.shape[2]
    g, bq, bk = c.group, c.blocks.block_q_dkv, c.blocks.block_k_dkv
    nq, nk = sq // bq, sk // bk
    assert lo.shape == hi.shape == (b, nk)
    bb = bias is not None and bias.shape[0] > 1

    def qi(b_, j, t, lo_, hi_):
        return _clamp(_mod(t, nq), lo_[b_ * nk + j], hi_[b_ * nk + j])

    head = lambda h_, t: h_ * g + _div(t, nq)  # the query head of step t
    q_map = lambda b_, h_, j, t, lo_, hi_, _: (b_, head(h_, t), qi(b_, j, t, lo_, hi_), 0)
    vec_map = lambda b_, h_, j, t, lo_, hi_, _: (b_, head(h_, t), 0, qi(b_, j, t, lo_, hi_))
    bias_map = lambda b_, h_, j, t, lo_, hi_, _: (
        b_ if bb else 0, head(h_, t), qi(b_, j, t, lo_, hi_), j)
    kv_map = lambda b_, h_, j, t, *_: (b_, h_, j, 0)
    rows_map = lambda b_, h_, j, t, *_: (b_, j, 0)  # kv-side mask arrays, [B, Sk, 128]
    cols_map = lambda b_, h_, j, t, lo_, hi_, _: (b_, 0, qi(b_, j, t, lo_, hi_))  # [B, 8, Sq]
    specs = {
        "q": pl.BlockSpec((None, None, bq, d), q_map),
        "do": pl.BlockSpec((None, None, bq, d), q_map),
        "k": pl.BlockSpec((None, None, bk, d), kv_map),
        "v": pl.BlockSpec((None, None, bk, d), kv_map),
        "lse": pl.BlockSpec((None, None, SUBLANES, bq), vec_map),
        "delta": pl.BlockSpec((None, None, SUBLANES, bq), vec_map),
        "bias": _spec(bias, (None, None, bq, bk), bias_map),
        "q_pos": _spec(arrs.q_pos, (None, SUBLANES, bq), cols_map),
        "q_seg": _spec(arrs.q_seg, (None, SUBLANES, bq), cols_map),
        "k_pos": _spec(arrs.k_pos, (None, bk, LANES), rows_map),
        "k_seg": _spec(arrs.k_seg, (None, bk, LANES), rows_map),
    }
    rows8 = lambda x: jnp.broadcast_to(x[:, :, None], (b, h, SUBLANES, sq))
    ins = dict(q=q, k=k, v=v, do=do, bias=bias, lse=rows8(lse), delta=rows8(delta),
               q_pos=_sublanes(arrs.q_pos), q_seg=_sublanes(arrs.q_seg),
               k_pos=_lanes(arrs.k_pos), k_seg=_lanes(arrs.k_seg))
    kernel = functools.partial(_dkv_kernel, c=c, has_len=arrs.kv_len is not None, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, kvh, nk, g * nq), in_specs=[specs],
            out_specs=[pl.BlockSpec((None, None, bk, d), kv_map)] * 2,
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=c.interpret, name="flash_bwd_dkv_tpu",
    )(*_scalars(arrs, lo, hi), ins)


def backward(c, q, k, v, bias, arrs, do, lse, delta, dq_range, dkv_range, need_dbias):
    """-> (dq, dk, dv, dbias [B,H,Sq,Sk] f32 or None); lse/delta [B,H,Sq]."""
    dq, dbias = _backward_dq(c, q, k, v, bias, arrs, do, lse, delta, *dq_range, need_dbias)
    dk, dv = _backward_dkv(c, q, k, v, bias, arrs, do, lse, delta, *dkv_range)
    return dq, dk, dv, dbias
