"""Flash attention, Pallas GPU (Triton lowering): forward, dq and dk/dv kernels.

Layout: q/o [B,Sq,H,D], k/v [B,Sk,KVH,D] (sequence-major, as the model has
them), sequences padded to whole blocks and D to a power of two by the
caller (`flash.py`). A program holds one Q (or KV) block and loops over the
range of KV (or Q) blocks that the mask may leave visible ([lo, hi),
computed outside); the other blocks are never loaded. GQA: a query head
reads its KV head (h // G) in place; the dk/dv program of a KV head loops
over the Q blocks of the G query heads of its group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .blocks import NEG, finish, logits, softmax_step, uncap, visible

NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))


def _dot(a, b, dims=NN):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _iota(n):
    return jnp.arange(n, dtype=jnp.int32)


def _load(ref, index=..., expand=None):
    """Load an optional ref (None stays None), optionally adding an axis."""
    if ref is None:
        return None
    x = ref[index]
    return x if expand is None else jnp.expand_dims(x, expand)


def _spec(x, block, index_map):
    return None if x is None else pl.BlockSpec(block, index_map)


def _params(c, d: int):
    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=c.num_stages)


def _mask_kw(c, r):
    return dict(causal=c.causal, window=c.window, kv_len=_load(r["kv_len"]),
                q_valid=c.q_valid, k_valid=c.k_valid)


# ------------------------------------------------------------ forward

def _fwd_kernel(r, o_ref, lse_ref, *, c):
    bq, bk = c.blocks.block_q, c.blocks.block_k
    q = r["q"][...]  # [bq, D]
    q_idx = pl.program_id(0) * bq + _iota(bq)[:, None]
    q_side = dict(q_pos=_load(r["q_pos"], expand=1), q_seg=_load(r["q_seg"], expand=1))
    kw = _mask_kw(c, r)

    def body(j, carry):
        acc, m, l = carry
        ks = pl.multiple_of(j * bk, bk)
        sl = pl.ds(ks, bk)
        k, v = r["k"][sl, :], r["v"][sl, :]  # [bk, D]
        s, _ = logits(_dot(q, k, NT), c.scale, c.softcap, _load(r["bias"], (slice(None), sl)))
        ok = visible(q_idx, ks + _iota(bk)[None, :], k_pos=_load(r["k_pos"], sl, 0),
                     k_seg=_load(r["k_seg"], sl, 0), **q_side, **kw)  # [bq, bk]
        p, alpha, m, l = softmax_step(s, ok, m, l)
        return alpha * acc + _dot(p.astype(v.dtype), v), m, l

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq, 1), NEG, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = lax.fori_loop(r["lo"][...], r["hi"][...], body, init)
    o, lse = finish(acc, m, l)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(bq)


def _q_row_specs(c, arrs, bias, bq: int, sk: int, d: int):
    """BlockSpecs of a (nq, B, H) grid (forward, dq): one Q block, all KV rows."""
    g = c.group
    bb = bias is not None and bias.shape[0] > 1
    q_map = lambda i, b, h: (b, i, h, 0)
    kv_map = lambda i, b, h: (b, 0, h // g, 0)
    row = lambda i, b, h: (b, i)
    return {
        "q": pl.BlockSpec((None, bq, None, d), q_map),
        "do": pl.BlockSpec((None, bq, None, d), q_map),
        "k": pl.BlockSpec((None, sk, None, d), kv_map),
        "v": pl.BlockSpec((None, sk, None, d), kv_map),
        "bias": _spec(bias, (None, None, bq, sk), lambda i, b, h: (b if bb else 0, h, i, 0)),
        "q_pos": _spec(arrs.q_pos, (None, bq), row),
        "q_seg": _spec(arrs.q_seg, (None, bq), row),
        "k_pos": _spec(arrs.k_pos, (None, sk), lambda i, b, h: (b, 0)),
        "k_seg": _spec(arrs.k_seg, (None, sk), lambda i, b, h: (b, 0)),
        "kv_len": _spec(arrs.kv_len, (None,), lambda i, b, h: (b,)),
        "lo": pl.BlockSpec((None, None), row),
        "hi": pl.BlockSpec((None, None), row),
        "lse": pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        "delta": pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    }


def _inputs(q, k, v, bias, arrs, lo, hi, **more):
    return dict(q=q, k=k, v=v, bias=bias, q_pos=arrs.q_pos, q_seg=arrs.q_seg, k_pos=arrs.k_pos,
                k_seg=arrs.k_seg, kv_len=arrs.kv_len, lo=lo, hi=hi, **more)


def forward(c, q, k, v, bias, arrs, lo, hi):
    """-> (o [B,Sq,H,D], lse [B,H,Sq] f32). lo/hi [B, nq]: KV block range per Q block."""
    b, sq, h, d = q.shape
    bq = c.blocks.block_q
    assert lo.shape == hi.shape == (b, sq // bq)
    ins = _inputs(q, k, v, bias, arrs, lo, hi)
    all_specs = _q_row_specs(c, arrs, bias, bq, k.shape[1], d)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, c=c),
        grid=(sq // bq, b, h), in_specs=[{name: all_specs[name] for name in ins}],
        out_specs=[all_specs["q"], all_specs["lse"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sq), jnp.float32)],
        compiler_params=_params(c, d), interpret=c.interpret, name="flash_fwd",
    )(ins)


# ------------------------------------------------------------ backward: dq (+ dbias)

def _dq_kernel(r, dq_ref, dbias_ref=None, *, c):
    bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
    q, do = r["q"][...], r["do"][...]  # [bq, D]
    lse, delta = r["lse"][...][:, None], r["delta"][...][:, None]  # [bq, 1]
    q_idx = pl.program_id(0) * bq + _iota(bq)[:, None]
    q_side = dict(q_pos=_load(r["q_pos"], expand=1), q_seg=_load(r["q_seg"], expand=1))
    kw = _mask_kw(c, r)

    def body(j, dq):
        ks = pl.multiple_of(j * bk, bk)
        sl = pl.ds(ks, bk)
        k, v = r["k"][sl, :], r["v"][sl, :]
        s, t = logits(_dot(q, k, NT), c.scale, c.softcap, _load(r["bias"], (slice(None), sl)))
        ok = visible(q_idx, ks + _iota(bk)[None, :], k_pos=_load(r["k_pos"], sl, 0),
                     k_seg=_load(r["k_seg"], sl, 0), **q_side, **kw)
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v, NT) - delta)  # d loss / d scores
        if dbias_ref is not None:
            dbias_ref[:, sl] = ds.astype(dbias_ref.dtype)
        return dq + _dot(uncap(ds, t).astype(k.dtype), k)

    dq = lax.fori_loop(r["lo"][...], r["hi"][...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def backward_dq(c, q, k, v, bias, arrs, do, lse, delta, lo, hi, dbias_zeros):
    """-> (dq [B,Sq,H,D], dbias [B,H,Sq,Sk] f32 or None). dbias_zeros: a zero
    buffer aliased to the dbias output (blocks the mask hides stay zero)."""
    b, sq, h, d = q.shape
    sk, bq = k.shape[1], c.blocks.block_q_dq
    assert lo.shape == hi.shape == (b, sq // bq)
    ins = _inputs(q, k, v, bias, arrs, lo, hi, do=do, lse=lse, delta=delta, dbias=dbias_zeros)
    specs = dict(_q_row_specs(c, arrs, bias, bq, sk, d),
                 dbias=_spec(dbias_zeros, (None, None, bq, sk), lambda i, b_, h_: (b_, h_, i, 0)))
    out_specs, out_shape = [specs["q"]], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    aliases = {}
    if dbias_zeros is not None:
        out_specs.append(specs["dbias"])
        out_shape.append(jax.ShapeDtypeStruct(dbias_zeros.shape, dbias_zeros.dtype))
        aliases = {_flat_index(ins, "dbias"): 1}
    out = pl.pallas_call(
        functools.partial(_dq_kernel, c=c),
        grid=(sq // bq, b, h), in_specs=[specs], out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases, compiler_params=_params(c, d), interpret=c.interpret,
        name="flash_bwd_dq",
    )(ins)
    return out[0], (out[1] if dbias_zeros is not None else None)


def _flat_index(tree, key):
    """Position of tree[key] among the flattened (non-None) leaves of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return next(n for n, (path, _) in enumerate(leaves) if path[0].key == key)


# ------------------------------------------------------------ backward: dk, dv

def _dkv_kernel(r, dk_ref, dv_ref, *, c):
    """Scores are computed transposed ([bk, bq]) so lse/delta broadcast as rows."""
    bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
    k, v = r["k"][...], r["v"][...]  # [bk, D]
    k_idx = pl.program_id(0) * bk + _iota(bk)[:, None]
    k_side = dict(k_pos=_load(r["k_pos"], expand=1), k_seg=_load(r["k_seg"], expand=1))
    kw = _mask_kw(c, r)
    lo, hi = r["lo"][...], r["hi"][...]
    n = jnp.maximum(hi - lo, 1)

    def body(t, carry):  # step t: query head g = t // n of the group, Q block lo + t % n
        dk, dv = carry
        g, qs = t // n, pl.multiple_of((lo + t % n) * bq, bq)
        sl = pl.ds(qs, bq)
        q, do = r["q"][sl, g, :], r["do"][sl, g, :]  # [bq, D]
        lse, delta = r["lse"][g, sl][None, :], r["delta"][g, sl][None, :]  # [1, bq]
        bias = None if r["bias"] is None else r["bias"][g, sl, :].T
        s, tc = logits(_dot(k, q, NT), c.scale, c.softcap, bias)  # [bk, bq]
        ok = visible(qs + _iota(bq)[None, :], k_idx, q_pos=_load(r["q_pos"], sl, 0),
                     q_seg=_load(r["q_seg"], sl, 0), **k_side, **kw)
        p = jnp.where(ok, jnp.exp(s - lse), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do)
        ds = p * (_dot(v, do, NT) - delta)
        return dk + _dot(uncap(ds, tc).astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, c.group * (hi - lo), body, (zeros, zeros))
    dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(c, q, k, v, bias, arrs, do, lse, delta, lo, hi):
    """-> (dk, dv) [B,Sk,KVH,D]. lo/hi [B, nk]: Q block range per KV block. Grid
    (nk, B, KVH); q, do, lse, delta of the G query heads of a group, whole."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g, bk = c.group, c.blocks.block_k_dkv
    assert lo.shape == hi.shape == (b, sk // bk)
    bb = bias is not None and bias.shape[0] > 1
    kv_map = lambda j, b_, h_: (b_, j, h_, 0)
    group_map = lambda j, b_, h_: (b_, 0, h_, 0)  # heads h_*G .. h_*G + G-1
    vec_map = lambda j, b_, h_: (b_, h_, 0)
    col = lambda j, b_, h_: (b_, j)
    specs = {
        "q": pl.BlockSpec((None, sq, g, d), group_map),
        "do": pl.BlockSpec((None, sq, g, d), group_map),
        "k": pl.BlockSpec((None, bk, None, d), kv_map),
        "v": pl.BlockSpec((None, bk, None, d), kv_map),
        "lse": pl.BlockSpec((None, g, sq), vec_map),
        "delta": pl.BlockSpec((None, g, sq), vec_map),
        "bias": _spec(bias, (None, g, sq, bk), lambda j, b_, h_: (b_ if bb else 0, h_, 0, j)),
        "q_pos": _spec(arrs.q_pos, (None, sq), lambda j, b_, h_: (b_, 0)),
        "q_seg": _spec(arrs.q_seg, (None, sq), lambda j, b_, h_: (b_, 0)),
        "k_pos": _spec(arrs.k_pos, (None, bk), col),
        "k_seg": _spec(arrs.k_seg, (None, bk), col),
        "kv_len": _spec(arrs.kv_len, (None,), lambda j, b_, h_: (b_,)),
        "lo": pl.BlockSpec((None, None), col),
        "hi": pl.BlockSpec((None, None), col),
    }
    return pl.pallas_call(
        functools.partial(_dkv_kernel, c=c),
        grid=(sk // bk, b, kvh), in_specs=[specs],
        out_specs=[specs["k"], specs["v"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(c, d), interpret=c.interpret, name="flash_bwd_dkv",
    )(_inputs(q, k, v, bias, arrs, lo, hi, do=do, lse=lse, delta=delta))


def backward(c, q, k, v, bias, arrs, do, lse, delta, dq_range, dkv_range, need_dbias):
    """-> (dq, dk, dv, dbias [B,H,Sq,Sk] f32 or None)."""
    zeros = None
    if need_dbias:
        zeros = jnp.zeros((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), jnp.float32)
    dq, dbias = backward_dq(c, q, k, v, bias, arrs, do, lse, delta, *dq_range, zeros)
    dk, dv = backward_dkv(c, q, k, v, bias, arrs, do, lse, delta, *dkv_range)
    return dq, dk, dv, dbias
