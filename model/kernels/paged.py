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
* `pallas`: two lowerings of one algorithm (`jaxlm.model.kernels.backends`
  picks: the platform's own, on CPU interpreted, the GPU one unless
  $JAXLM_PALLAS_BACKEND=tpu). A program walks one sequence's pages in
  page-table order with an online softmax, reading only the pages below its
  length (and inside its window), each page once per GQA group. The pool is
  never a block: it stays where it is (`memory_space=pl.ANY`, HBM / global
  memory) and each page is read on its own, so the kernel does not depend on
  the pool's size.
  - GPU (Triton style, `_paged_gpu`): grid (B, KVH); a program takes the G
    query heads of one KV head (padded to 16 rows for tensor cores) and loads
    one page [ps, D] per step through the page table (a strided load of the
    pool in global memory: ps and D must be powers of two, as Triton loads).
  - TPU (Mosaic style, `_paged_tpu`, after jax's own TPU paged attention):
    `pltpu.PrefetchScalarGridSpec` with the page table and lengths as
    scalar-prefetch operands (SMEM), grid (B, P) over a sequence's page-table
    entries; step j copies page table[b, j] of k and v from HBM into a
    double-buffered VMEM page (`pltpu.make_async_copy`, the next visible page's
    copy started before the current one is used) and updates every KV head's
    group; running max / sum / accumulator in VMEM scratch.
  Both are tested against the reference in interpret mode (`interpret=True`;
  TPU interpret mode, `pltpu.InterpretParams`, for the TPU one). Neither has
  been compiled by Triton or Mosaic on hardware.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .blocks import (NEG, attend_block, attend_block_scratch, empty_carry,
                                        finish, visible)
from .mask import MaskSpec
from .reference import attention_reference



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
    from .dispatch import resolve_impl
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
                           softcap=None, window=None, interpret: Any = None,
                           backend: Optional[str] = None):
    """The Pallas kernel; backend gpu | tpu (default: the platform's own; on CPU
    the GPU one or $JAXLM_PALLAS_BACKEND), interpreted by default off GPU/TPU."""
    from .backends import resolve_backend
    backend, interpret = resolve_backend(backend, interpret)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    kw = dict(scale=scale, softcap=None if softcap is None else float(softcap), window=window,
              interpret=interpret)
    fn = _paged_tpu if backend == "tpu" else _paged_gpu
    return fn(q, k_pages, v_pages, page_table.astype(jnp.int32),
              jnp.asarray(lengths, jnp.int32), **kw)


def _visible_pages(n, page_size: int, window):
    """Pages [lo, hi) holding a key a query at position n - 1 may see."""
    hi = (n + page_size - 1) // page_size
    lo = 0 if window is None else jnp.maximum(n - window, 0) // page_size
    return lo, jnp.maximum(hi, lo)


def _paged_gpu(q, k_pages, v_pages, page_table, lengths, *, scale, softcap, window, interpret):
    b, h, d = q.shape
    n_pages, ps, kvh, _ = k_pages.shape
    g = h // kvh
    if not interpret and (ps & (ps - 1) or d & (d - 1)):
        raise ValueError(f"the GPU paged kernel loads [page_size, head_dim] = [{ps}, {d}] "
                         "tiles: both must be powers of two (Triton)")
    gp = max(16, 1 << max(0, (g - 1).bit_length()))  # tensor-core rows, as decode_gpu
    qg = jnp.pad(q.reshape(b, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    kern = functools.partial(_gpu_kernel, page_size=ps, scale=scale, softcap=softcap,
                             window=window)
    p = page_table.shape[1]
    pool = pl.BlockSpec(memory_space=pl.ANY)  # the whole pool, left in global memory
    out = pl.pallas_call(
        kern, grid=(b, kvh),
        in_specs=[pl.BlockSpec((None, None, gp, d), lambda b_, h_: (b_, h_, 0, 0)),
                  pool, pool,
                  pl.BlockSpec((None, p), lambda b_, h_: (b_, 0)),
                  pl.BlockSpec((None,), lambda b_, h_: (b_,))],
        out_specs=pl.BlockSpec((None, None, gp, d), lambda b_, h_: (b_, h_, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, gp, d), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="paged_decode_attention",
    )(qg, k_pages, v_pages, page_table, lengths)
    return out[:, :, :g].reshape(b, h, d).astype(q.dtype)


def _gpu_kernel(q_ref, k_ref, v_ref, pt_ref, len_ref, o_ref, *, page_size, scale, softcap,
                window):
    head = pl.program_id(1)
    q = q_ref[...]  # [Gp, D]
    n = len_ref[...]
    lo, hi = _visible_pages(n, page_size, window)
    rows = pl.ds(0, page_size)
    cols = pl.ds(0, q.shape[-1])

    def body(j, carry):
        page = pt_ref[j]
        k = k_ref[page, rows, head, cols].astype(q.dtype)  # one page [ps, D]
        v = v_ref[page, rows, head, cols].astype(q.dtype)
        k_idx = j * page_size + jnp.arange(page_size, dtype=jnp.int32)[None, :]
        ok = visible(n - 1, k_idx, causal=True, window=window, kv_len=n)
        return attend_block(q, k, v, ok, carry, scale, softcap)

    acc, m, l = lax.fori_loop(lo, hi, body, empty_carry(*q.shape))
    o_ref[...] = finish(acc, m, l)[0]


LANES = 128


def _paged_tpu(q, k_pages, v_pages, page_table, lengths, *, scale, softcap, window, interpret):
    from jax.experimental.pallas import tpu as pltpu
    b, h, d = q.shape
    n_pages, ps, kvh, _ = k_pages.shape
    g = h // kvh
    p = page_table.shape[1]
    qg = q.reshape(b, kvh, g, d)
    kern = functools.partial(_tpu_kernel, page_size=ps, n_pages=n_pages, scale=scale,
                             softcap=softcap, window=window, kvh=kvh)
    pool = pl.BlockSpec(memory_space=pl.ANY)  # HBM; pages copied in by the kernel
    out = pl.pallas_call(
        kern,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, p),
            in_specs=[pl.BlockSpec((None, kvh, g, d), lambda b_, j, *_: (b_, 0, 0, 0)),
                      pool, pool],
            out_specs=pl.BlockSpec((None, kvh, g, d), lambda b_, j, *_: (b_, 0, 0, 0)),
            scratch_shapes=[pltpu.VMEM((2, ps, kvh, d), k_pages.dtype),
                            pltpu.VMEM((2, ps, kvh, d), v_pages.dtype),
                            pltpu.SemaphoreType.DMA((2, 2)),
                            pltpu.VMEM((kvh, g, LANES), jnp.float32),
                            pltpu.VMEM((kvh, g, LANES), jnp.float32),
                            pltpu.VMEM((kvh, g, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, kvh, g, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="paged_decode_attention_tpu",
    )(page_table.reshape(-1), lengths, qg, k_pages, v_pages)
    return out.reshape(b, h, d).astype(q.dtype)


def _tpu_kernel(pt_ref, len_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sem, m_s, l_s,
                acc_s, *, page_size, n_pages, scale, softcap, window, kvh):
    from jax.experimental.pallas import tpu as pltpu
    b, j = pl.program_id(0), pl.program_id(1)
    n_entries = pl.num_programs(1)
    n = len_ref[b]
    lo, hi = _visible_pages(n, page_size, window)

    def copies(jj, slot):  # page table[b, jj] of k and v -> VMEM buffer `slot`
        page = jnp.minimum(pt_ref[b * n_entries + jj], n_pages - 1)
        return (pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot], sem.at[1, slot]))

    @pl.when(j == 0)
    def _init():
        m_s[...] = jnp.full(m_s.shape, NEG, jnp.float32)
        l_s[...] = jnp.zeros(l_s.shape, jnp.float32)
        acc_s[...] = jnp.zeros(acc_s.shape, jnp.float32)

    @pl.when((j == lo) & (lo < hi))
    def _first():  # the first visible page: nothing prefetched it
        for c in copies(j, j % 2):
            c.start()

    @pl.when((j >= lo) & (j < hi))
    def _step():
        slot = j % 2

        @pl.when(j + 1 < hi)
        def _prefetch():  # the next page streams in while this one is used
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        k_idx = j * page_size + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        ok = visible(n - 1, k_idx, causal=True, window=window, kv_len=n)  # [1, ps]
        for hh in range(kvh):
            q = q_ref[hh]  # [G, D] over this page's k, v [ps, D]
            attend_block_scratch(q, k_buf[slot, :, hh, :].astype(q.dtype),
                                 v_buf[slot, :, hh, :].astype(q.dtype), ok,
                                 m_s, l_s, acc_s, hh, scale, softcap)

    @pl.when(j == n_entries - 1)
    def _out():
        for hh in range(kvh):
            o_ref[hh] = finish(acc_s[hh], m_s[hh][:, :1], l_s[hh][:, :1])[0]
