"""Pieces shared by the Pallas attention kernels (GPU and TPU lowerings).

In-kernel: the per-block mask (`visible`), score capping and the online
softmax step. Outside the kernels (plain XLA, O(S) + O(blocks^2) work): padding the
mask arrays to whole blocks and the ranges of possibly visible blocks,
so that the kernels skip the blocks that the mask fully hides.

Conventions: scores are float32; a hidden score is `NEG` (finite, so that
`NEG - NEG` is 0, never NaN) and its probability is forced to exactly 0, so a
row with no visible key has l = 0, output 0 and lse = -inf.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from .mask import MaskSpec

NEG = -0.7 * float(np.finfo(np.float32).max)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------ inside kernels

def visible(q_idx, k_idx, *, causal: bool, window: Optional[int], q_pos=None, k_pos=None,
            q_seg=None, k_seg=None, kv_len=None, q_valid: Optional[int] = None,
            k_valid: Optional[int] = None):
    """MaskSpec.visible for one block, by broadcasting q-side against kv-side.

    q_idx / k_idx: global row / key indices (e.g. [bq,1] and [1,bk], or the
    transposed orientation). q_pos / k_pos default to the indices. kv_len: the
    dynamic fill level (keys at index >= kv_len are hidden). q_valid / k_valid:
    static true lengths when the arrays were padded to whole blocks.
    """
    qp = q_idx if q_pos is None else q_pos
    kp = k_idx if k_pos is None else k_pos
    ok = None

    def conj(a, b):
        return b if a is None else a & b

    if causal:
        ok = conj(ok, kp <= qp)
    if window is not None:
        ok = conj(ok, kp > qp - window)
    if q_seg is not None:
        ok = conj(ok, (q_seg == k_seg) & (q_seg != 0))
    if kv_len is not None:
        ok = conj(ok, k_idx < kv_len)
    if k_valid is not None:
        ok = conj(ok, k_idx < k_valid)
    if q_valid is not None:
        ok = conj(ok, q_idx < q_valid)
    if ok is None:
        ok = (q_idx >= 0) & (k_idx >= 0)  # all visible, at the broadcast shape
    return ok


def logits(qk, scale: float, softcap: Optional[float], bias=None):
    """Raw dot products (f32) -> (scores, tanh of the cap or None).

    scores = softcap * tanh(scale * qk / softcap) + bias (cap, then bias)."""
    s = qk * scale
    t = None
    if softcap is not None:
        t = jnp.tanh(s / softcap)
        s = softcap * t
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    return s, t


def uncap(ds, t):
    """Gradient w.r.t. the scores -> gradient w.r.t. scale * qk."""
    return ds if t is None else ds * (1.0 - t * t)


def softmax_step(s, ok, m_prev, l_prev):
    """One online-softmax update over a [rows, keys] block, keys on the last axis.

    m_prev / l_prev: [rows, 1]. Returns (p, alpha, m_next, l_next) where p are
    the unnormalised probabilities (0 where hidden) and alpha rescales the
    previous accumulator."""
    s = jnp.where(ok, s, NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(ok, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    return p, alpha, m_next, l_next


NT = (((1,), (1,)), ((), ()))  # dot_general: a @ b.T
NN = (((1,), (0,)), ((), ()))  # dot_general: a @ b


def empty_carry(rows: int, d: int):
    """The online-softmax carry before any key: (acc [rows, D], m, l [rows, 1])."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), NEG, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def attend_block(q, k, v, ok, carry, scale: float, softcap: Optional[float]):
    """One key block of a decode kernel: q [rows, D] over k, v [keys, D] with
    visibility ok [rows, keys]; carry (acc, m, l) -> the next carry (f32)."""
    acc, m, l = carry
    qk = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
    sc, _ = logits(qk, scale, softcap)  # [rows, keys]
    p, alpha, m, l = softmax_step(sc, ok, m, l)
    pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
    return alpha * acc + pv, m, l


def attend_block_scratch(q, k, v, ok, m_s, l_s, acc_s, h: int, scale: float,
                         softcap: Optional[float]):
    """`attend_block` for TPU kernels whose carry lives in VMEM scratch, per KV head
    h: m_s, l_s [KVH, rows, 128] (lane-broadcast), acc_s [KVH, rows, D]. q [rows, D],
    k, v [keys, D], ok [1, keys] (the same for every row)."""
    qk = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
    sc, _ = logits(qk, scale, softcap)
    p, alpha, m, l = softmax_step(sc, jnp.broadcast_to(ok, sc.shape), m_s[h][:, :1],
                                  l_s[h][:, :1])
    m_s[h] = jnp.broadcast_to(m, m_s.shape[1:])
    l_s[h] = jnp.broadcast_to(l, l_s.shape[1:])
    pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
    acc_s[h] = alpha * acc_s[h] + pv


def finish(acc, m, l):
    """(acc [rows, D], m, l [rows, 1]) -> (output, lse); empty rows: 0 and -inf."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return jnp.where(empty, 0.0, out), lse


# ------------------------------------------------------------ outside kernels

class MaskArrays(NamedTuple):
    """The mask as per-row arrays, padded to whole blocks (None: not used).

    q_pos [B,Sq'] / k_pos [B,Sk'] int32 (None: positions are indices);
    q_seg / k_seg int32 (padding rows get segment 0); kv_len [B] int32 or None.
    """
    q_pos: Optional[jax.Array]
    k_pos: Optional[jax.Array]
    q_seg: Optional[jax.Array]
    k_seg: Optional[jax.Array]
    kv_len: Optional[jax.Array]


def mask_arrays(mask: MaskSpec, b: int, sq: int, sk: int, sq_pad: int, sk_pad: int) -> MaskArrays:
    """Broadcast and pad the MaskSpec arrays (positions edge-padded, segments 0)."""
    def rows(x, n, n_pad, mode):
        x = jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, n))
        if n_pad == n:
            return x
        if mode == "edge":
            return jnp.pad(x, ((0, 0), (0, n_pad - n)), mode="edge")
        return jnp.pad(x, ((0, 0), (0, n_pad - n)))

    q_pos = None if mask.q_positions is None else rows(mask.q_positions, sq, sq_pad, "edge")
    k_pos = None if mask.kv_positions is None else rows(mask.kv_positions, sk, sk_pad, "edge")
    q_seg = k_seg = None
    if mask.q_segment_ids is not None:
        q_seg = rows(mask.q_segment_ids, sq, sq_pad, "zero")
        k_seg = rows(mask.kv_segment_ids, sk, sk_pad, "zero")
    kv_len = None
    if mask.kv_lengths is not None:
        kv_len = jnp.minimum(jnp.broadcast_to(jnp.asarray(mask.kv_lengths, jnp.int32), (b,)), sk)
    return MaskArrays(q_pos, k_pos, q_seg, k_seg, kv_len)


def _stats(pos, seg, n: int, block: int, b: int):
    """Per-block (pos min, pos max, seg min, seg max) over real rows: [B, n/block] each.

    Segment 0 (padding) is left out of the segment range (it sees nothing)."""
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    p = pos.reshape(b, n // block, block)
    out = [p.min(-1), p.max(-1)]
    if seg is not None:
        s = seg.reshape(b, n // block, block)
        big = jnp.iinfo(jnp.int32).max
        out += [jnp.where(s == 0, big, s).min(-1), s.max(-1)]
    return out


def visible_blocks(arr: MaskArrays, *, b: int, sq: int, sk: int, sq_pad: int, sk_pad: int,
                   block_q: int, block_k: int, causal: bool, window: Optional[int],
                   self_attn: bool = False):
    """[B, nq, nk] bool: may block pair (i, j) hold a visible entry? (conservative)

    From per-block min/max of positions and segment ids. Padding rows/keys are
    hidden in the kernels, so the stats use the real rows only (positions were
    edge-padded, which keeps the range tight). self_attn: q and kv are the same
    sequence (same position and segment arrays); where positions increase
    within each segment (packed documents), position-causal implies
    index-causal, which bounds blocks that straddle a document start.
    """
    q_pos = arr.q_pos if arr.q_pos is not None else jnp.minimum(
        jnp.arange(sq_pad, dtype=jnp.int32), sq - 1)[None].repeat(b, 0)
    k_pos = arr.k_pos if arr.k_pos is not None else jnp.minimum(
        jnp.arange(sk_pad, dtype=jnp.int32), sk - 1)[None].repeat(b, 0)
    qs = _stats(q_pos, arr.q_seg, sq_pad, block_q, b)
    ks = _stats(k_pos, arr.k_seg, sk_pad, block_k, b)
    qmin, qmax = qs[0][:, :, None], qs[1][:, :, None]
    kmin, kmax = ks[0][:, None, :], ks[1][:, None, :]
    nq, nk = sq_pad // block_q, sk_pad // block_k
    q_start = (jnp.arange(nq, dtype=jnp.int32) * block_q)[None, :, None]
    k_start = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, None, :]
    q_end = jnp.minimum(q_start + block_q, sq) - 1
    k_end = jnp.minimum(k_start + block_k, sk) - 1
    ok = (k_start < sk) & (q_start < sq)
    if causal:
        ok = ok & (kmin <= qmax)
    if window is not None:
        ok = ok & (kmax > qmin - window)
    if self_attn and (causal or window is not None):
        increasing, consecutive = _position_steps(arr.q_pos, arr.q_seg, sq, b)
        if causal:
            ok = ok & ((k_start <= q_end) | ~increasing[:, None, None])
        if window is not None:
            ok = ok & ((k_end > q_start - window) | ~consecutive[:, None, None])
    if arr.q_seg is not None:
        qsmin, qsmax = qs[2][:, :, None], qs[3][:, :, None]
        ksmin, ksmax = ks[2][:, None, :], ks[3][:, None, :]
        ok = ok & (qsmin <= ksmax) & (ksmin <= qsmax)
    if arr.kv_len is not None:
        ok = ok & (k_start < arr.kv_len[:, None, None])
    return jnp.broadcast_to(ok, (b, nq, nk))


def _position_steps(pos, seg, n: int, b: int):
    """([B] positions strictly increase, [B] they increase by exactly 1) between
    neighbours of one (non-padding) segment; plain aranges: both True."""
    if pos is None:
        return jnp.ones((b,), bool), jnp.ones((b,), bool)
    step = pos[:, 1:n] - pos[:, :n - 1]
    same = jnp.ones_like(step, bool)
    if seg is not None:
        same = (seg[:, 1:n] == seg[:, :n - 1]) & (seg[:, 1:n] != 0)
    return (jnp.where(same, step >= 1, True).all(-1),
            jnp.where(same, step == 1, True).all(-1))


def block_range(vis, axis: int):
    """First and one-past-last True index along `axis` (both 0 if none), int32."""
    n = vis.shape[axis]
    anyv = vis.any(axis)
    first = jnp.argmax(vis, axis)
    last = n - jnp.argmax(jnp.flip(vis, axis), axis)
    lo = jnp.where(anyv, first, 0).astype(jnp.int32)
    hi = jnp.where(anyv, last, 0).astype(jnp.int32)
    return lo, hi
