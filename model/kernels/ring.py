"""Ring attention: context (sequence) parallelism over the mesh's `context` axis.

When the active mesh's rules put the `seq` logical axis on mesh axes of size
c > 1 (`ring_axes`), `attention()` runs self-attention here instead of
gathering the sequence. Under `jax.shard_map` over those axes (and the batch /
heads axes, as `per_shard.py` does) each device holds one sequence chunk of
Q, K and V, with their positions and segment ids. The K/V chunks travel
around the ring with `lax.ppermute` (c steps, c - 1 hops); each step folds
the visiting chunk into the device's running (max m, sum l, output acc) by
the online softmax of `blocks.py`, exactly as the flash kernels combine
blocks, and `finish` turns them into the output and its log-sum-exp.

Per-chunk math: the XLA reference formulation (float32 scores, GQA grouped
heads, soft cap, mask from positions / segment ids / window via
`blocks.visible`), tiled into `block` x `block` query x key tiles so that
no device holds more than one tile of scores; a tile the mask hides entirely
is skipped (`lax.cond`), which is what the causal load balancing
(`sharding/context.py`) pays off. This is the math on every platform for now:
the Pallas flash kernels do not expose their per-row lse, so they are not
used per chunk.

Gradients: a `custom_vjp` with the reverse ring (not autodiff through the
scan, which would save every visiting K/V chunk for the backward and so
materialise the whole K/V on each device). The backward recomputes the
probabilities from the saved lse; dK/dV accumulators travel with their K/V
chunk around the ring and arrive home after the c-th hop. Residuals per
device: its own q, k, v, out chunk and lse. At any time a device holds its
own K/V chunk, the visiting one and the one in flight.

Not supported: an additive bias (ALiBi, T5 relative: a ConfigError), a KV
cache (`kv_lengths`: such calls take the ordinary path), cross-attention.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError
from jaxlm.model.kernels.blocks import NEG, finish, logits, softmax_step, uncap, visible
from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.sharding.rules import active_mesh

BLOCK = 512  # query / key tile inside a chunk


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


def ring_attention(q, k, v, mask: MaskSpec, bias=None, *, scale=None, softcap=None,
                   block: int = BLOCK):
    """q [B,S,H,D], k/v [B,S,KVH,D] -> [B,S,H,D] under the active context mesh.

    The semantics of `attention_reference` (rows with no visible key give 0).
    Positions default to 0..S-1 (the arrays' own order); after the causal
    load-balancing reorder they must be given (the original positions)."""
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
                softcap=None if softcap is None else float(softcap), block_q=bq, block_k=bq)
    x_spec, r_spec = P(bt, sq, hd, None), P(bt, sq)
    seg_spec = None if segs is None else (r_spec, r_spec)
    run = jax.shard_map(functools.partial(_ring, st), mesh=mesh,
                        in_specs=(x_spec, x_spec, x_spec, r_spec, r_spec, seg_spec),
                        out_specs=x_spec, check_vma=False)
    return run(q, k, v, qpos, kpos, segs)


# ---------------------------------------------------------------- one device

def _heads_major(q, k, v):
    """[b,s,h,d] / [b,s,kvh,d] -> q [b,kvh,g,s,d], k/v [b,kvh,s,d]."""
    b, s, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _tiles(x, axis, n):
    """Split `axis` into n tiles and move the tile index to the front."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _untile(x, axis):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


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


def _chunk_forward(st: Static, q, qp, qs, k, v, kp, ks, stats):
    """Fold one K/V chunk into the running (m, l, acc) of this device's queries.

    q [b,kvh,g,S,d], k/v [b,kvh,S,d]; qp/kp/qs/ks [b,S]; stats: m, l
    [b,kvh,g,S,1] and acc [b,kvh,g,S,d] float32. Tiled: a lax.map over query
    tiles, inside it a scan over key tiles."""
    s = q.shape[3]
    nq, nk = s // st.block_q, s // st.block_k
    kt, vt, kpt = _tiles(k, 2, nk), _tiles(v, 2, nk), _tiles(kp, 1, nk)
    kst = None if ks is None else _tiles(ks, 1, nk)

    def q_tile(args):
        qt, qpt, qst, m, l, acc = args

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

        (m, l, acc), _ = jax.lax.scan(k_tile, (m, l, acc), (kt, vt, kpt, kst))
        return m, l, acc

    m, l, acc = stats
    qst = None if qs is None else _tiles(qs, 1, nq)
    out = jax.lax.map(q_tile, (_tiles(q, 3, nq), _tiles(qp, 1, nq), qst,
                               _tiles(m, 3, nq), _tiles(l, 3, nq), _tiles(acc, 3, nq)))
    return tuple(_untile(x, 3) for x in out)


def _chunk_backward(st: Static, q, qp, qs, do, lse, delta, k, v, kp, ks, dq):
    """Gradients of one (query chunk, K/V chunk) pair, probabilities recomputed
    from the full lse: returns (dq + this chunk's part, dk, dv).

    q/do/dq [b,kvh,g,S,d], lse/delta [b,kvh,g,S,1], k/v [b,kvh,S,d]. A scan
    over key tiles carrying dq, inside it a scan over query tiles carrying
    the key tile's dk / dv."""
    s = q.shape[3]
    nq, nk = s // st.block_q, s // st.block_k
    qt, dot, qpt = _tiles(q, 3, nq), _tiles(do, 3, nq), _tiles(qp, 1, nq)
    lset, deltat = _tiles(lse, 3, nq), _tiles(delta, 3, nq)
    qst = None if qs is None else _tiles(qs, 1, nq)

    def k_tile(dq_tiles, xs):
        kb, vb, kpb, ksb = xs

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

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), dq_tiles = jax.lax.scan(
            q_tile, (zeros, zeros), (qt, dot, qpt, qst, lset, deltat, dq_tiles))
        return dq_tiles, (dk, dv)

    kst = None if ks is None else _tiles(ks, 1, nk)
    dq_tiles, (dk, dv) = jax.lax.scan(
        k_tile, _tiles(dq, 3, nq), (_tiles(k, 2, nk), _tiles(v, 2, nk), _tiles(kp, 1, nk), kst))
    return _untile(dq_tiles, 3), _untile(dk, 2), _untile(dv, 2)


def _shift(st: Static, x):
    """Send to the next device on the ring (device i -> i + 1 mod c)."""
    perm = [(i, (i + 1) % st.size) for i in range(st.size)]
    return jax.lax.ppermute(x, st.axis, perm)


def _ring_forward(st: Static, q, k, v, qp, kp, segs):
    qs, ks = segs if segs is not None else (None, None)
    qg, kt, vt = _heads_major(q, k, v)
    b, kvh, g, s, d = qg.shape
    stats = (jnp.full((b, kvh, g, s, 1), NEG, jnp.float32), jnp.zeros((b, kvh, g, s, 1)),
             jnp.zeros((b, kvh, g, s, d), jnp.float32))

    def step(carry, _):
        kv, stats = carry
        nxt = _shift(st, kv)  # in flight while this chunk is computed
        return (nxt, _chunk_forward(st, qg, qp, qs, *kv, stats)), None

    kv = (kt, vt, kp, ks)
    (kv, stats), _ = jax.lax.scan(step, (kv, stats), None, length=st.size - 1)
    m, l, acc = _chunk_forward(st, qg, qp, qs, *kv, stats)
    out, lse = finish(acc, m, l)
    out = out.transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: Static, q, k, v, qp, kp, segs):
    return _ring_forward(st, q, k, v, qp, kp, segs)[0]


def _ring_fwd(st: Static, q, k, v, qp, kp, segs):
    out, lse = _ring_forward(st, q, k, v, qp, kp, segs)
    return out, (q, k, v, qp, kp, segs, out, lse)


def _ring_bwd(st: Static, res, dout):
    q, k, v, qp, kp, segs, out, lse = res
    qs, ks = segs if segs is not None else (None, None)
    qg, kt, vt = _heads_major(q, k, v)
    dog = _heads_major(dout, k, v)[0].astype(jnp.float32)
    og = _heads_major(out, k, v)[0].astype(jnp.float32)
    delta = jnp.sum(og * dog, axis=-1, keepdims=True)
    qf = qg.astype(jnp.float32)

    def step(carry, _):
        kv, dkv, dq = carry
        dq, dk, dv = _chunk_backward(st, qf, qp, qs, dog, lse, delta,
                                     kv[0].astype(jnp.float32), kv[1].astype(jnp.float32),
                                     kv[2], kv[3], dq)
        dkv = (dkv[0] + dk, dkv[1] + dv)
        return (_shift(st, kv), _shift(st, dkv), dq), None

    zeros = jnp.zeros(kt.shape, jnp.float32)
    carry = ((kt, vt, kp, ks), (zeros, zeros), jnp.zeros(qg.shape, jnp.float32))
    carry, _ = jax.lax.scan(step, carry, None, length=st.size - 1)
    kv, dkv, dq = carry
    dq, dk, dv = _chunk_backward(st, qf, qp, qs, dog, lse, delta, kv[0].astype(jnp.float32),
                                 kv[1].astype(jnp.float32), kv[2], kv[3], dq)
    dk, dv = _shift(st, (dkv[0] + dk, dkv[1] + dv))  # the c-th hop brings them home
    b, s, h, d = q.shape
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3).astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3).astype(v.dtype)
    return dq, dk, dv, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
