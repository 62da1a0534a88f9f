"""Ring attention: context (sequence) parallelism over the mesh's `context` axis.

When the active mesh's rules put the `seq` logical axis on mesh axes of size
c > 1 (`ring_axes`), `attention()` runs self-attention here instead of
gathering the sequence. Under `jax.shard_map` over those axes (and the batch /
heads axes, as `per_shard.py` does) each device holds one sequence chunk of
Q, K and V, with their positions and segment ids. The K/V chunks travel
around the ring with `lax.ppermute` (c steps, c - 1 hops); each step folds
the visiting chunk into the device's running softmax statistics, exactly as
the flash kernels combine blocks: (max m, sum l, output acc) by the online
softmax of `blocks.py`, `finish` giving the output and its log-sum-exp
(xla), or (output, lse) by log-sum-exp (pallas).

Per-chunk math, `impl` (dispatch's `ring_impl` of model.attention_impl):

- "pallas": the flash kernels, one `flash_forward` per visiting chunk giving
  (out, lse [b,h,n]); the device folds them by log-sum-exp (`_merge`, safe
  for rows that see nothing: 0 and -inf). Every MaskSpec field the ring
  passes (positions in any order, segment ids, window) is a flash mask array,
  so flash applies to every chunk; inside a chunk the kernels skip the
  blocks the mask hides, and a chunk hidden entirely is skipped by
  `lax.cond`. The platform's lowering (Triton / Mosaic), interpreted on CPU.
- "xla" (the CPU default, and `auto` until the kernels are measured): the
  XLA reference formulation (float32 scores, GQA grouped heads, soft cap,
  mask from positions / segment ids / window via `blocks.visible`), tiled
  into `block` x `block` query x key tiles so that no device holds more
  than one tile of scores; a tile the mask hides entirely is skipped
  (`lax.cond`).

Either way the skipping is what the causal load balancing
(`sharding/context.py`) pays off.

Gradients: a `custom_vjp` with the reverse ring (not autodiff through the
scan, which would save every visiting K/V chunk for the backward and so
materialise the whole K/V on each device). The backward recomputes the
probabilities from the saved lse (pallas: `flash_backward` per visiting chunk
with the final lse and delta, which gives exactly that chunk's share of dq
and its dk / dv); dK/dV accumulators travel with their K/V
chunk around the ring and arrive home after the c-th hop. Residuals per
device: its own q, k, v, out chunk and lse. At any time a device holds its
own K/V chunk, the visiting one and the one in flight.

Inside pipeline stages (sharding/pipeline.py) `active_mesh()` is the stage
body's abstract mesh, `stage` already manual: the shard_map here nests in
it and makes manual only the other axes.

Not supported: an additive bias (ALiBi, T5 relative: a ConfigError), a KV
cache (`kv_lengths`: such calls take the ordinary path), cross-attention.
Prefill into a fresh cache rings anyway: the decoder calls attention over the
prompt's own K/V (no `kv_lengths`), see `decoder(..., fresh_cache=True)`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ...errors import ConfigError
from . import flash
from .backends import resolve_backend
from .blocks import (NEG, MaskArrays, finish, logits, softmax_step, uncap,
                                        visible, visible_blocks)
from .mask import MaskSpec
from ...sharding.rules import active_mesh

BLOCK = 128  # query / key tile inside a chunk (flash-sized: bounds the scores held)


def _axes(rules, name):
    axes = dict(rules).get(name) or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def ring_axes(mesh, rules) -> tuple[str, ...]:
    """The mesh axes of size > 1 that the rules give the `seq` logical axis."""
    return tuple(a for a in _axes(rules, "seq") if a in mesh.shape and mesh.shape[a] > 1)


def ring_applies(q, k, mask: MaskSpec) -> bool:
    """Whether `attention()` should run the ring: a context mesh is active and
    this is self-attention over the full (not cached) sequence."""
    active = active_mesh()
    if active is None:
        return False
    mesh, rules = active
    axes = ring_axes(mesh, rules)
    if not axes or mask.kv_lengths is not None or q.shape[1] != k.shape[1]:
        return False
    c = math.prod(mesh.shape[a] for a in axes)
    if q.shape[1] % c:
        raise ConfigError(f"sequence length {q.shape[1]} does not divide over the context axis "
                          f"{'x'.join(axes)} of size {c}")
    return True


class Static(NamedTuple):
    axis: tuple  # the ring's mesh axes
    size: int  # c
    causal: bool
    window: Optional[int]
    scale: float
    softcap: Optional[float]
    block_q: int
    block_k: int
    flash: Optional[tuple] = None  # (backend, interpret, BlockSizes or None): Pallas per chunk


RING_IMPLS = ("xla", "pallas")


def ring_attention(q, k, v, mask: MaskSpec, bias=None, *, scale=None, softcap=None,
                   block: int = BLOCK, impl: str = "xla",
                   flash_blocks: Optional[flash.BlockSizes] = None):
    """q [B,S,H,D], k/v [B,S,KVH,D] -> [B,S,H,D] under the active context mesh.

    The semantics of `attention_reference` (rows with no visible key give 0).
    Positions default to 0..S-1 (the arrays' own order); after the causal
    load-balancing reorder they must be given (the original positions).

    impl: the per-chunk math. "xla": `block` x `block` XLA tiles. "pallas":
    the flash kernels (`flash_forward` / `flash_backward`; the platform's
    lowering, interpreted on CPU) with `flash_blocks` (default: flash's own,
    fitted to the chunk)."""
    if impl not in RING_IMPLS:
        raise ValueError(f"ring attention impl {impl!r} must be one of {RING_IMPLS}")
    if bias is not None:
        raise ConfigError("an additive attention bias (model.positions alibi / t5_relative) is "
                          "not supported under context parallelism (mesh.context > 1)")
    for name in ("causal", "window"):
        if isinstance(getattr(mask, name), jax.Array):
            raise ValueError(f"MaskSpec.{name} must be a Python value for ring attention")
    mesh, rules = active_mesh()
    b, s, h, d = q.shape
    kvh = k.shape[2]
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    ring = ring_axes(mesh, rules)
    c = size(ring)
    batch = tuple(a for a in _axes(rules, "batch") if a not in ring)
    batch = batch if b % size(batch) == 0 else ()
    heads, kv_heads = _axes(rules, "heads"), _axes(rules, "kv_heads")
    if (heads != kv_heads or h % size(heads) or kvh % size(heads)
            or set(heads) & (set(batch) | set(ring))):
        heads = ()
    bt, hd, sq = _entry(batch), _entry(heads), _entry(ring)

    def rows(x):
        return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, s))
    arange = jnp.arange(s, dtype=jnp.int32)[None]
    qpos = rows(arange if mask.q_positions is None else mask.q_positions)
    kpos = qpos if mask.kv_positions is mask.q_positions else rows(
        arange if mask.kv_positions is None else mask.kv_positions)
    segs = None
    if mask.q_segment_ids is not None:
        segs = (rows(mask.q_segment_ids), rows(mask.kv_segment_ids))
    chunk = s // c
    bq = block if chunk % block == 0 else chunk
    st = Static(axis=ring, size=c, causal=bool(mask.causal), window=mask.window,
                scale=float(d ** -0.5 if scale is None else scale),
                softcap=None if softcap is None else float(softcap), block_q=bq, block_k=bq,
                flash=(*resolve_backend(None, None), flash_blocks) if impl == "pallas" else None)
    x_spec, r_spec = P(bt, sq, hd, None), P(bt, sq)
    seg_spec = None if segs is None else (r_spec, r_spec)
    run = jax.shard_map(functools.partial(_ring, st), mesh=mesh,
                        in_specs=(x_spec, x_spec, x_spec, r_spec, r_spec, seg_spec),
                        out_specs=x_spec, check_vma=False)
    return run(q, k, v, qpos, kpos, segs)


# ---------------------------------------------------------------- one device
#
# Layouts are tiled once, kept through the ring and untiled once at the end:
# queries (and out, do, acc) [nq, b, kvh, g, bq, d], m / l / lse / delta
# [nq, b, kvh, g, bq, 1], keys / values [nk, b, kvh, bk, d], positions and
# segment ids [n, b, block]. Running statistics are updated tile by tile in
# place (fori_loop + dynamic_update_index), so each lives in one buffer.

def _tile_q(x, kvh, bq):
    """[b,s,h,d] -> [nq,b,kvh,g,bq,d]."""
    b, s, h, d = x.shape
    return x.reshape(b, s // bq, bq, kvh, h // kvh, d).transpose(1, 0, 3, 4, 2, 5)


def _untile_q(x):
    n, b, kvh, g, bq, d = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * bq, kvh * g, d)


def _tile_kv(x, bk):
    """[b,s,kvh,d] -> [nk,b,kvh,bk,d]."""
    b, s, kvh, d = x.shape
    return x.reshape(b, s // bk, bk, kvh, d).transpose(1, 0, 3, 2, 4)


def _untile_kv(x):
    n, b, kvh, bk, d = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * bk, kvh, d)


def _tile_rows(x, block):
    """[b,s] -> [n,b,block] (None stays None)."""
    if x is None:
        return None
    b, s = x.shape
    return x.reshape(b, s // block, block).transpose(1, 0, 2)


def _tile_mask(st: Static, qp, kp, qs, ks):
    """[b,1,1,bq,bk] bool for one tile from its rows' positions / segment ids."""
    qp, kp = qp[:, None, None, :, None], kp[:, None, None, None, :]
    if qs is not None:
        qs, ks = qs[:, None, None, :, None], ks[:, None, None, None, :]
    return visible(qp, kp, causal=st.causal, window=st.window, q_pos=qp, k_pos=kp,
                   q_seg=qs, k_seg=ks)


def _scores(st: Static, qt, kt):
    """q tile [b,kvh,g,bq,d] . k tile [b,kvh,bk,d] -> (scores f32, tanh of the cap)."""
    qk = jnp.einsum("bhgqd,bhkd->bhgqk", qt, kt, preferred_element_type=jnp.float32)
    return logits(qk, st.scale, st.softcap)


def _get(x, i):
    return None if x is None else jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _put(x, v, i):
    return jax.lax.dynamic_update_index_in_dim(x, v, i, 0)


def _chunk_forward(st: Static, q, qp, qs, kv, stats):
    """Fold one visiting K/V chunk into the running (m, l, acc) of this device's
    queries: a loop over query tiles, inside it a scan over key tiles; a tile
    the mask hides entirely is skipped."""
    k, v, kp, ks = kv

    def q_tile(i, stats):
        qt, qpt, qst = _get(q, i), _get(qp, i), _get(qs, i)

        def k_tile(carry, xs):
            kb, vb, kpb, ksb = xs
            ok = _tile_mask(st, qpt, kpb, qst, ksb)

            def update(carry):
                m, l, acc = carry
                sc, _ = _scores(st, qt, kb)
                p, alpha, m, l = softmax_step(sc, ok, m, l)
                pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vb.dtype), vb,
                                preferred_element_type=jnp.float32)
                return m, l, alpha * acc + pv
            return jax.lax.cond(jnp.any(ok), update, lambda c: c, carry), None

        tile, _ = jax.lax.scan(k_tile, tuple(_get(x, i) for x in stats), (k, v, kp, ks))
        return tuple(_put(x, y, i) for x, y in zip(stats, tile))

    return jax.lax.fori_loop(0, q.shape[0], q_tile, stats)


def _chunk_backward(st: Static, q, qp, qs, do, lse, delta, kv, dq, dkv):
    """Add one (query chunk, visiting K/V chunk) pair's gradients to dq and to
    the visiting chunk's (dk, dv), probabilities recomputed from the full lse.
    A loop over key tiles, inside it a scan over query tiles."""
    k, v, kp, ks = kv

    def k_tile(j, carry):
        dq, (dk_all, dv_all) = carry
        kb, vb, kpb, ksb = _get(k, j), _get(v, j), _get(kp, j), _get(ks, j)

        def q_tile(carry, ys):
            dk, dv = carry
            qb, dob, qpb, qsb, lseb, deltab, dqb = ys
            ok = _tile_mask(st, qpb, kpb, qsb, ksb)

            def grads(args):
                dk, dv, dqb = args
                sc, t = _scores(st, qb, kb)
                p = jnp.where(ok, jnp.exp(sc - jnp.where(ok, lseb, 0.0)), 0.0)
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
                ds = uncap(p * (dp - deltab), t) * st.scale
                dqb = dqb + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kb,
                                       preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb,
                                     preferred_element_type=jnp.float32)
                dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", p, dob,
                                     preferred_element_type=jnp.float32)
                return dk, dv, dqb
            dk, dv, dqb = jax.lax.cond(jnp.any(ok), grads, lambda a: a, (dk, dv, dqb))
            return (dk, dv), dqb

        (dk, dv), dq = jax.lax.scan(q_tile, (_get(dk_all, j), _get(dv_all, j)),
                                    (q, do, qp, qs, lse, delta, dq))
        return dq, (_put(dk_all, dk, j), _put(dv_all, dv, j))

    return jax.lax.fori_loop(0, k.shape[0], k_tile, (dq, dkv))


def _shift(st: Static, x):
    """Send to the next device on the ring (device i -> i + 1 mod c)."""
    perm = [(i, (i + 1) % st.size) for i in range(st.size)]
    return jax.lax.ppermute(x, st.axis, perm)


def _tiled(st: Static, q, k, v, qp, kp, segs):
    qs, ks = segs if segs is not None else (None, None)
    kvh = k.shape[2]
    return ((_tile_q(q, kvh, st.block_q), _tile_rows(qp, st.block_q), _tile_rows(qs, st.block_q)),
            (_tile_kv(k, st.block_k), _tile_kv(v, st.block_k), _tile_rows(kp, st.block_k),
             _tile_rows(ks, st.block_k)))


def _around(st: Static, kv, stats, fold):
    """The forward ring: fold(kv, stats) for each of the c K/V chunks in turn (the
    device's own first), the next one in flight while one is folded."""
    def step(carry, _):
        kv, stats = carry
        nxt = _shift(st, kv)  # in flight while this chunk is computed
        return (nxt, fold(kv, stats)), None

    (kv, stats), _ = jax.lax.scan(step, (kv, stats), None, length=st.size - 1)
    return fold(kv, stats)


def _around_grads(st: Static, kv, dkv, dq, add):
    """The backward ring: (dq, dkv) = add(kv, dq, dkv) for each visiting chunk, dkv
    travelling with its chunk; the c-th hop brings each chunk's dkv home."""
    def step(carry, _):
        kv, dkv, dq = carry
        dq, dkv = add(kv, dq, dkv)
        return (_shift(st, kv), _shift(st, dkv), dq), None

    (kv, dkv, dq), _ = jax.lax.scan(step, (kv, dkv, dq), None, length=st.size - 1)
    dq, dkv = add(kv, dq, dkv)
    return dq, _shift(st, dkv)


def _ring_forward(st: Static, q, k, v, qp, kp, segs):
    (qt, qpt, qst), kv = _tiled(st, q, k, v, qp, kp, segs)
    rows = qt.shape[:-1] + (1,)
    stats = (jnp.full(rows, NEG, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros(qt.shape, jnp.float32))
    m, l, acc = _around(st, kv, stats, lambda kv, s: _chunk_forward(st, qt, qpt, qst, kv, s))
    out, lse = finish(acc, m, l)
    return _untile_q(out).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: Static, q, k, v, qp, kp, segs):
    forward = _ring_forward if st.flash is None else _flash_ring_forward
    return forward(st, q, k, v, qp, kp, segs)[0]


def _ring_fwd(st: Static, q, k, v, qp, kp, segs):
    forward = _ring_forward if st.flash is None else _flash_ring_forward
    out, lse = forward(st, q, k, v, qp, kp, segs)
    return out, (q, k, v, qp, kp, segs, out, lse)


def _ring_bwd(st: Static, res, dout):
    if st.flash is not None:
        return _flash_ring_bwd(st, res, dout)
    q, k, v, qp, kp, segs, out, lse = res
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    (qt, qpt, qst), (kt, vt, kpt, kst) = _tiled(st, f32(q), f32(k), f32(v), qp, kp, segs)
    kvh = k.shape[2]
    dot = _tile_q(f32(dout), kvh, st.block_q)
    delta = jnp.sum(_tile_q(f32(out), kvh, st.block_q) * dot, axis=-1, keepdims=True)

    zeros = jnp.zeros(kt.shape, jnp.float32)
    dq, (dk, dv) = _around_grads(
        st, (kt, vt, kpt, kst), (zeros, zeros), jnp.zeros(qt.shape, jnp.float32),
        lambda kv, dq, dkv: _chunk_backward(st, qt, qpt, qst, dot, lse, delta, kv, dq, dkv))
    return (_untile_q(dq).astype(q.dtype), _untile_kv(dk).astype(k.dtype),
            _untile_kv(dv).astype(v.dtype), None, None, None)


# ---------------------------------------------------------------- flash per chunk
#
# impl="pallas": each visiting chunk is one flash_forward call on the untiled
# chunk ([b, n, h, d] against [b, n, kvh, d]; positions and segment ids as
# mask arrays, so the load-balanced order and packing need nothing special);
# the device keeps (out f32 [b,n,h,d], lse [b,h,n]) and folds each chunk in
# by log-sum-exp. The backward calls flash_backward per visiting chunk with
# the final lse and delta. Inside a chunk the kernels skip the hidden blocks;
# a chunk that is hidden entirely is skipped by lax.cond.

def _flash_kw(st: Static) -> dict:
    backend, interpret, blocks = st.flash
    return dict(scale=st.scale, softcap=st.softcap, backend=backend, interpret=interpret,
                block_sizes=blocks)


def _chunk_mask(st: Static, qp, kp, qs, ks) -> MaskSpec:
    return MaskSpec(causal=st.causal, window=st.window, q_positions=qp, kv_positions=kp,
                    q_segment_ids=qs, kv_segment_ids=ks)


def _chunk_visible(st: Static, qp, kp, qs, ks):
    """Scalar bool: may any query of this chunk see any key of the visiting one?
    (conservative: from the chunks' position and segment ranges)"""
    b, n = qp.shape
    vis = visible_blocks(MaskArrays(qp, kp, qs, ks, None), b=b, sq=n, sk=n, sq_pad=n, sk_pad=n,
                         block_q=n, block_k=n, causal=st.causal, window=st.window)
    return jnp.any(vis)


def _merge(a, b):
    """Two partial results over disjoint key sets, (out [b,n,h,d], lse [b,h,n])
    each -> their combination: lse = logaddexp, out weighted by e^(lse_x - lse).
    Rows empty in both stay (0, -inf): no -inf - -inf."""
    (oa, la), (ob, lb) = a, b
    m = jnp.maximum(la, lb)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    ea, eb = jnp.exp(la - m), jnp.exp(lb - m)
    total = ea + eb
    some = total > 0
    inv = 1.0 / jnp.where(some, total, 1.0)
    lse = jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)), -jnp.inf)
    col = lambda x: x.transpose(0, 2, 1)[..., None]  # noqa: E731  [b,h,n] -> [b,n,h,1]
    return col(ea * inv) * oa + col(eb * inv) * ob.astype(jnp.float32), lse


def _flash_ring_forward(st: Static, q, k, v, qp, kp, segs):
    """-> (out [b,n,h,d] in q's dtype, lse [b,h,n] f32) on one device."""
    qs, ks = segs if segs is not None else (None, None)
    kw = _flash_kw(st)

    def fold(kv, stats):
        k, v, kp, ks = kv

        def update(stats):
            part = flash.flash_forward(q, k, v, _chunk_mask(st, qp, kp, qs, ks), **kw)
            return _merge(stats, part)
        return jax.lax.cond(_chunk_visible(st, qp, kp, qs, ks), update, lambda x: x, stats)

    b, n, h, _ = q.shape
    stats = (jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, n), -jnp.inf, jnp.float32))
    out, lse = _around(st, (k, v, kp, ks), stats, fold)
    return out.astype(q.dtype), lse


def _flash_ring_bwd(st: Static, res, dout):
    q, k, v, qp, kp, segs, out, lse = res
    qs, ks = segs if segs is not None else (None, None)
    kw = _flash_kw(st)
    delta = flash.flash_delta(out, dout)  # [b,h,n] of the final output

    def add(kv, dq, dkv):
        k, v, kp, ks = kv

        def grads(acc):
            dq, (dk, dv) = acc
            gq, gk, gv = flash.flash_backward(q, k, v, _chunk_mask(st, qp, kp, qs, ks), dout,
                                              lse, delta, **kw)
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            return dq + f32(gq), (dk + f32(gk), dv + f32(gv))
        return jax.lax.cond(_chunk_visible(st, qp, kp, qs, ks), grads, lambda x: x, (dq, dkv))

    zeros = jnp.zeros(k.shape, jnp.float32)
    dq, (dk, dv) = _around_grads(st, (k, v, kp, ks), (zeros, zeros),
                                 jnp.zeros(q.shape, jnp.float32), add)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
