"""Decode attention over a paged KV cache (PagedAttention): one query per sequence.

    out = paged_attention(q, k_pages, v_pages, page_table, lengths, impl="xla" | "pallas",
                          scale=..., softcap=..., window=...)

q [B,H,D] (the new token of each sequence), one layer's pages k/v
[N_pages, page_size, KVH, D], page_table [B, P] int32 (sequence b's i-th
page is k_pages[page_table[b, i]]), lengths [B]: valid keys per sequence,
the new token's included (its position is lengths - 1). Keys past a
sequence's length (the tail of its last page, the unused page-table
entries) are masked; a sequence of length 0 returns zeros.

* `xla`: the reference. Gathers each sequence's pages through its page table
  into a dense [B, P * page_size, KVH, D] view and calls the dense reference
  attention with the same mask the contiguous cache uses (kv_lengths, causal,
  window): the oracle of the kernel.
* `pallas`: a kernel in the style of the GPU decode kernel (`decode_gpu.py`):
  grid (B, KVH), a program takes the G query heads of one KV head and walks
  the sequence's pages in page-table order with an online softmax, reading
  only the pages below its length (and inside its window), each page once
  per GQA group. Runs in interpret mode on CPU (tests); not yet compiled by
  Triton/Mosaic on hardware. As in ragged paged attention (jax-ml
  tpu-inference), the page table and lengths are the kernel's only
  indirection; a TPU lowering would take them as scalar-prefetch operands and
  double-buffer the page copies from HBM: not written yet.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlm.model.kernels.blocks import attend_block, empty_carry, finish, visible
from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.model.kernels.reference import attention_reference



def gather_pages(pages, page_table):
    """pages [N, ps, KVH, D], page_table [B, P] -> dense [B, P * ps, KVH, D]."""
    g = jnp.take(pages, page_table, axis=0, mode="clip")  # [B, P, ps, KVH, D]
    return g.reshape(g.shape[0], -1, *g.shape[3:])


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, impl: str = "xla",
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    window: Optional[int] = None, interpret: Any = None):
    """q [B,H,D] -> [B,H,D]; see the module docstring. impl: xla | pallas | auto
    (resolved as the dispatcher does: pallas on GPU/TPU, xla on CPU; cudnn has
    no paged form and takes the pallas kernel)."""
    from jaxlm.model.kernels.dispatch import resolve_impl
    impl = resolve_impl(impl)
    if impl == "xla":
        return paged_attention_reference(q, k_pages, v_pages, page_table, lengths,
                                         scale=scale, softcap=softcap, window=window)
    return paged_attention_pallas(q, k_pages, v_pages, page_table, lengths, scale=scale,
                                  softcap=softcap, window=window, interpret=interpret)


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *,
                              scale=None, softcap=None, window=None):
    """The XLA reference: pages gathered via the page table, the dense reference."""
    k = gather_pages(k_pages, page_table).astype(q.dtype)
    v = gather_pages(v_pages, page_table).astype(q.dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    mask = MaskSpec(causal=True, q_positions=(lengths - 1)[:, None],
                    kv_positions=jnp.arange(k.shape[1], dtype=jnp.int32)[None],
                    kv_lengths=lengths, window=window)
    return attention_reference(q[:, None], k, v, mask, scale=scale, softcap=softcap)[:, 0]


def paged_attention_pallas(q, k_pages, v_pages, page_table, lengths, *, scale=None,
                           softcap=None, window=None, interpret: Any = None):
    """The Pallas kernel (GPU-style lowering; interpret mode by default off GPU)."""
    b, h, d = q.shape
    n_pages, ps, kvh, _ = k_pages.shape
    g = h // kvh
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    scale = d ** -0.5 if scale is None else float(scale)
    gp = max(16, 1 << max(0, (g - 1).bit_length()))  # tensor-core rows, as decode_gpu
    qg = jnp.pad(q.reshape(b, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    lengths = jnp.asarray(lengths, jnp.int32)
    kern = functools.partial(_kernel, page_size=ps, scale=scale,
                             softcap=None if softcap is None else float(softcap),
                             window=window)
    p = page_table.shape[1]
    out = pl.pallas_call(
        kern, grid=(b, kvh),
        in_specs=[pl.BlockSpec((None, None, gp, d), lambda b_, h_: (b_, h_, 0, 0)),
                  pl.BlockSpec((n_pages, ps, None, d), lambda b_, h_: (0, 0, h_, 0)),
                  pl.BlockSpec((n_pages, ps, None, d), lambda b_, h_: (0, 0, h_, 0)),
                  pl.BlockSpec((None, p), lambda b_, h_: (b_, 0)),
                  pl.BlockSpec((None,), lambda b_, h_: (b_,))],
        out_specs=pl.BlockSpec((None, None, gp, d), lambda b_, h_: (b_, h_, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, gp, d), jnp.float32),
        interpret=interpret, name="paged_decode_attention",
    )(qg, k_pages, v_pages, page_table.astype(jnp.int32), lengths)
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


def _kernel(q_ref, k_ref, v_ref, pt_ref, len_ref, o_ref, *, page_size, scale, softcap, window):
    q = q_ref[...]  # [Gp, D]
    n = len_ref[...]
    q_pos = n - 1
    hi = (n + page_size - 1) // page_size  # pages holding a key below the length
    lo = 0 if window is None else jnp.maximum(q_pos - window + 1, 0) // page_size

    def body(j, carry):
        page = pt_ref[j]
        k = k_ref[page].astype(q.dtype)  # [ps, D]
        v = v_ref[page].astype(q.dtype)
        k_idx = j * page_size + jnp.arange(page_size, dtype=jnp.int32)[None, :]
        ok = visible(q_pos, k_idx, causal=True, window=window, kv_len=n)
        return attend_block(q, k, v, ok, carry, scale, softcap)

    init = empty_carry(*q.shape)
    acc, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    o_ref[...] = finish(acc, m, l)[0]
