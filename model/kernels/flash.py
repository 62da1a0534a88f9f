"""Flash attention (Pallas, GPU or TPU lowering) with a custom VJP.

    out = flash_attention(q, k, v, mask, bias, scale=..., softcap=...,
                          backend="gpu" | "tpu", interpret=..., block_sizes=...)

q [B,Sq,H,D], k/v [B,Sk,KVH,D] -> [B,Sq,H,D], the semantics of
`attention_reference` (rows with no visible key give 0). Every MaskSpec field
is supported. The forward saves the log-sum-exp per row; the backward
recomputes the probabilities block by block (never a [Sq, Sk] array). The
bias gradient ([B or 1, H, Sq, Sk]) is computed only when the bias is being
differentiated (custom_vjp symbolic zeros tell).

The kernels without the custom VJP, for callers that combine partial results
themselves (ring attention, `ring.py`):

    out, lse = flash_forward(q, k, v, mask, ...)          # lse [B,H,Sq] f32
    dq, dk, dv = flash_backward(q, k, v, mask, dout, lse, flash_delta(out, dout), ...)

flash_backward takes the lse and delta of the *whole* attention, so that on
one key chunk it gives that chunk's exact share of the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

from . import flash_gpu, flash_tpu
from .backends import resolve_backend
from .blocks import block_range, mask_arrays, round_up, visible_blocks
from .mask import MaskSpec


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes: forward (block_q, block_k), dq pass, dk/dv pass."""
    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int

    @classmethod
    def uniform(cls, block_q: int, block_k: Optional[int] = None) -> "BlockSizes":
        block_k = block_q if block_k is None else block_k
        return cls(block_q, block_k, block_q, block_k, block_q, block_k)

    def fit(self, sq: int, sk: int, quantum: int) -> "BlockSizes":
        """Shrink blocks longer than the (rounded-up) sequences."""
        fq = lambda b: min(b, max(quantum, _pow2_at_least(sq)))
        fk = lambda b: min(b, max(quantum, _pow2_at_least(sk)))
        return BlockSizes(fq(self.block_q), fk(self.block_k), fq(self.block_q_dq),
                          fk(self.block_k_dq), fq(self.block_q_dkv), fk(self.block_k_dkv))


DEFAULT_BLOCKS = {
    # H100-sized Triton tiles (fwd 128x64; backward 64x64).
    "gpu": BlockSizes(128, 64, 64, 64, 64, 64),
    # Mosaic: multiples of 128 (lane width); larger tiles amortise the grid steps.
    "tpu": BlockSizes(256, 512, 256, 256, 256, 256),
}
QUANTUM = {"gpu": 16, "tpu": 128}  # smallest block (Triton dot / TPU lanes)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels need that is not an array (hashable)."""
    backend: str
    interpret: Any
    blocks: BlockSizes
    causal: bool
    window: Optional[int]
    scale: float
    softcap: Optional[float]
    group: int  # query heads per KV head
    self_attn: bool  # q and kv: one sequence (same positions and segment ids)
    q_valid: Optional[int]  # true Sq when padded, else None
    k_valid: Optional[int]
    sq: int
    sk: int
    num_stages: int = 2


def flash_attention(q, k, v, mask: MaskSpec = MaskSpec(), bias=None, *,
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    backend: Optional[str] = None, interpret: Any = None,
                    block_sizes: Optional[BlockSizes] = None):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D], bias [B or 1,H,Sq,Sk] -> [B,Sq,H,D].

    backend: "gpu" (Triton) or "tpu" (Mosaic); default from the platform
    ("gpu" kernel on CPU). interpret: default True on CPU (TPU kernel: TPU
    interpret mode). block_sizes: default DEFAULT_BLOCKS[backend], shrunk to
    short sequences; sequences are padded to whole blocks.
    """
    d = q.shape[-1]
    c, (q, k, v, bias), arrs = _setup(q, k, v, mask, bias, scale, softcap, backend, interpret,
                                      block_sizes)
    return _from_kernel(c, _flash(c, q, k, v, bias, arrs), d)


def flash_forward(q, k, v, mask: MaskSpec = MaskSpec(), *, scale: Optional[float] = None,
                  softcap: Optional[float] = None, backend: Optional[str] = None,
                  interpret: Any = None, block_sizes: Optional[BlockSizes] = None):
    """The forward kernel alone: q [B,Sq,H,D], k/v [B,Sk,KVH,D] ->
    (out [B,Sq,H,D], lse [B,H,Sq] float32), lse = log sum_k exp(score[q, k])
    over the visible keys (-inf and out 0 for a row with none). Not
    differentiable: the backward is `flash_backward`. Arguments as in
    `flash_attention` (no bias).

    Partial results over disjoint key sets (ring attention's chunks) combine
    by log-sum-exp: lse = logaddexp(lse_a, lse_b),
    out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b."""
    d = q.shape[-1]
    c, (q, k, v, _), arrs = _setup(q, k, v, mask, None, scale, softcap, backend, interpret,
                                   block_sizes)
    out, lse = _forward(c, q, k, v, None, arrs)
    return _from_kernel(c, out, d), lse[:, :, :c.sq]


def flash_delta(out, dout):
    """out, dout [B,Sq,H,D] -> delta [B,H,Sq] float32: sum_d out * dout, the
    backward's row term (einsum "bqhd,bqhd->bhq")."""
    return jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))


def flash_backward(q, k, v, mask: MaskSpec, dout, lse, delta, *,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   backend: Optional[str] = None, interpret: Any = None,
                   block_sizes: Optional[BlockSizes] = None):
    """The backward kernels alone: -> (dq [B,Sq,H,D], dk, dv [B,Sk,KVH,D]).

    dout [B,Sq,H,D]; lse, delta [B,H,Sq] float32. With the lse of the whole
    attention (`flash_forward`'s, or the log-sum-exp combination over all key
    chunks) and delta = flash_delta(final out, dout), the probabilities are
    the final ones restricted to these keys, so the result is these keys'
    exact share: dq summed over the key chunks is the full dq, and dk / dv are
    exactly this chunk's gradients (what ring attention needs)."""
    d = q.shape[-1]
    c, (q, k, v, _), arrs = _setup(q, k, v, mask, None, scale, softcap, backend, interpret,
                                   block_sizes)
    sq_pad, _ = _seq_lens(c, q, k)
    (dout,) = _to_kernel(c, _pad(dout, sq_pad, (q.shape[-1] - d)))

    def rows(x):  # [B,H,Sq] -> [B,H,Sq_pad] f32 (padding rows are hidden in the kernels)
        return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, sq_pad - c.sq)))
    dq, dk, dv, _ = _backward(c, q, k, v, None, arrs, dout, rows(lse), rows(delta), False)
    return (_from_kernel(c, dq, d), _from_kernel(c, dk, d, c.sk), _from_kernel(c, dv, d, c.sk))


def _pad(x, s: int, d_extra: int):
    """[B,S0,N,D] -> [B,s,N,D + d_extra] (zeros)."""
    return jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0), (0, d_extra)))


def _to_kernel(c: Static, *xs):
    """Model layout [B,S,N,D] -> the kernel's (TPU: head-major [B,N,S,D])."""
    return tuple(x.transpose(0, 2, 1, 3) if c.backend == "tpu" else x for x in xs)


def _from_kernel(c: Static, x, d: int, s: Optional[int] = None):
    """The kernel's layout -> [B,S,N,D] cropped to the true length s (default
    Sq) and head_dim d."""
    (x,) = _to_kernel(c, x)
    return x[:, :c.sq if s is None else s, :, :d]


def _setup(q, k, v, mask: MaskSpec, bias, scale, softcap, backend, interpret, block_sizes):
    """-> (Static, (q, k, v, bias) padded to whole blocks in the kernel's layout,
    MaskArrays)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of kv heads {kvh}")
    backend, interpret = resolve_backend(backend, interpret)
    blocks = (block_sizes or DEFAULT_BLOCKS[backend]).fit(sq, sk, QUANTUM[backend])
    _check_blocks(blocks, backend, interpret)
    sq_pad = round_up(sq, max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv))
    sk_pad = round_up(sk, max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv))
    d_pad = _pow2_at_least(max(d, 16)) if backend == "gpu" else d
    c = Static(backend=backend, interpret=interpret, blocks=blocks, causal=bool(mask.causal),
               window=mask.window, scale=float(d ** -0.5 if scale is None else scale),
               softcap=None if softcap is None else float(softcap), group=h // kvh,
               self_attn=(sq == sk and mask.q_positions is mask.kv_positions
                          and mask.q_segment_ids is mask.kv_segment_ids),
               q_valid=sq if sq_pad != sq else None, k_valid=sk if sk_pad != sk else None,
               sq=sq, sk=sk)
    q, k, v = _pad(q, sq_pad, d_pad - d), _pad(k, sk_pad, d_pad - d), _pad(v, sk_pad, d_pad - d)
    if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, sq_pad - sq), (0, sk_pad - sk)))
    arrs = mask_arrays(mask, b, sq, sk, sq_pad, sk_pad)
    return c, (*_to_kernel(c, q, k, v), bias), arrs


def _check_blocks(blocks: BlockSizes, backend: str, interpret) -> None:
    if interpret:
        return
    for name, size in dataclasses.asdict(blocks).items():
        if backend == "gpu" and (size < 16 or size & (size - 1)):
            raise ValueError(f"GPU flash attention: {name}={size} must be a power of two >= 16")
        if backend == "tpu" and size % 128:
            raise ValueError(f"TPU flash attention: {name}={size} must be a multiple of 128")


def _kernels(c: Static):
    return flash_gpu if c.backend == "gpu" else flash_tpu


def _visible(c: Static, arrs, b: int, sq_pad: int, sk_pad: int, block_q: int, block_k: int):
    return visible_blocks(arrs, b=b, sq=c.sq, sk=c.sk, sq_pad=sq_pad, sk_pad=sk_pad,
                          block_q=block_q, block_k=block_k, causal=c.causal, window=c.window,
                          self_attn=c.self_attn)


def _seq_lens(c: Static, q, k):
    if c.backend == "tpu":
        return q.shape[2], k.shape[2]
    return q.shape[1], k.shape[1]


def _forward(c: Static, q, k, v, bias, arrs):
    sq_pad, sk_pad = _seq_lens(c, q, k)
    bl = c.blocks
    vis = _visible(c, arrs, q.shape[0], sq_pad, sk_pad, bl.block_q, bl.block_k)
    lo, hi = block_range(vis, axis=2)  # KV blocks per Q block
    return _kernels(c).forward(c, q, k, v, bias, arrs, lo, hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: Static, q, k, v, bias, arrs):
    return _forward(c, q, k, v, bias, arrs)[0]


def _flash_fwd(c: Static, q, k, v, bias, arrs):
    bias_grad = bias is not None and bias.perturbed
    q, k, v, bias, arrs = custom_vjp_primal_tree_values((q, k, v, bias, arrs))
    o, lse = _forward(c, q, k, v, bias, arrs)
    biases = (bias, None) if bias_grad else (None, bias)  # (differentiated, constant)
    return o, (q, k, v, biases, arrs, o, lse)


def _flash_bwd(c: Static, res, do):
    q, k, v, (bias_grad, bias_const), arrs, o, lse = res
    if type(do) is SymbolicZero:
        return None, None, None, None, None
    bias = bias_grad if bias_grad is not None else bias_const
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if c.backend == "gpu":
        delta = delta.transpose(0, 2, 1)  # [B,H,Sq]
    dq, dk, dv, dbias = _backward(c, q, k, v, bias, arrs, do, lse, delta, bias_grad is not None)
    if dbias is not None:
        if bias.shape[0] == 1 and q.shape[0] > 1:
            dbias = dbias.sum(0, keepdims=True)
        dbias = dbias.astype(bias.dtype)
    return dq, dk, dv, dbias, None


def _backward(c: Static, q, k, v, bias, arrs, do, lse, delta, need_dbias: bool):
    """The kernels' backward on padded, kernel-layout arrays; lse, delta
    [B,H,Sq_pad] f32 -> (dq, dk, dv, dbias or None)."""
    b = q.shape[0]
    sq_pad, sk_pad = _seq_lens(c, q, k)
    bl = c.blocks
    dq_range = block_range(_visible(c, arrs, b, sq_pad, sk_pad, bl.block_q_dq, bl.block_k_dq),
                           axis=2)  # KV blocks per Q block
    dkv_range = block_range(_visible(c, arrs, b, sq_pad, sk_pad, bl.block_q_dkv,
                                     bl.block_k_dkv), axis=1)  # Q blocks per KV block
    return _kernels(c).backward(c, q, k, v, bias, arrs, do, lse, delta, dq_range, dkv_range,
                                need_dbias=need_dbias)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)
