"""A paged KV cache: a pool of fixed-size pages and a page table per row, as a KV store.

    pages = init_pages(cfg, n_pages, page_size, slots=S)   # {"k", "v": [L, N, ps, KVH, D]}
    store = Paged(pages, page_table, lengths, live, slots=S)   # page_table [R, P] int32
    hidden, aux = decoder(params, cfg, tokens, store=store)    # aux["store"].kv: written

Row r's t-th token of a call goes at index lengths[r] + t of its sequence: page
page_table[r, (lengths[r] + t) // ps], offset (lengths[r] + t) % ps. Writes of rows
that are not `live`, and through page-table entries that are unused (n_pages: out
of range), are dropped; reads through unused entries are clipped and masked by
the lengths. One token per row with the Pallas impl is the paged decode kernel
(`jaxlm.model.kernels.paged`); otherwise each row's pages are gathered into a
dense [R, P * ps, KVH, D] view and the call is the model's usual attention with
the cache's mask (kv_lengths, causal, window) and bias (ALiBi, T5 relative).
`fresh` (a packed prefill: page_table [J, W / ps] holds each pack row's pages,
lengths 0): the tokens attend to each other by the call's own mask (segment ids
keep the packed prompts apart) and their K/V are written into the pages.

kv_dtype int8 | int4 | fp8: k, v in that format (`quant.py`, int4 packed two per
byte) with per-token, per-head float32 scales, quantized on write and dequantized on
read by the same functions as the contiguous cache; the gather path reads them.

Sharded (under `jaxlm.sharding.rules.use_mesh`): the pool is created in its
sharding (`pool_layout`, `init_pages`): kv_heads over the kv_heads rule's axes
(tensor) and the pages axis over the batch rule's axes (data), like the slots.
Data shard j of J owns the contiguous block of pages [j N/J, (j+1) N/J) and the
slots [j S/J, (j+1) S/J); the host allocator (`jaxlm.infer.pages.PagePool`)
gives a slot pages only from its shard's block, so the page table holds global
ids that fall in the slot's own block. The writes, the gather and the decode
kernel run under `jax.shard_map` over the mesh: each shard turns its rows'
global ids into ids of its block and touches only its own pages, so no step
gathers the pool and no device holds more than its 1 / (J x tensor) of it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ..config import dtype_of
from ..kernels.paged import gather_pages, paged_attention
from ..layers.attention import attend, softmax_scale
from ...sharding.rules import active_mesh, partition_spec
from ..kernels import MaskSpec
from .contiguous import after, as_stored, cache_mask, kv_layout, kv_leaf_shapes, quantize_like
from .quant import dequantize


def _rule_axes(mesh, rules, name, dims, used=()) -> tuple:
    """The mesh axes `rules` give logical axis `name`, fitted to dims (`fit_axes`)."""
    from .contiguous import fit_axes
    return fit_axes(mesh, partition_spec((name,), rules)[0], dims, used)


class Layout(NamedTuple):
    """How a pool [L, N, ps, KVH, D] and its slots [S] are split over a mesh:
    data: the mesh axes of the pages and the slots (the batch rule's, fitted to
    N and S); kv: the mesh axes of kv_heads (and of the query heads)."""
    mesh: object
    data: tuple
    kv: tuple

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.data)

    def spec(self, *dims) -> PartitionSpec:
        """dims: "data", "kv" or None per array dim."""
        pick = {"data": self.data, "kv": self.kv, None: ()}
        return PartitionSpec(*(pick[d] or None for d in dims))


def pool_layout(slots: int, n_pages: int, n_kv_heads: int) -> Optional[Layout]:
    """The active mesh's Layout of a pool of n_pages for `slots` slots, or None
    without a mesh (or when nothing is split)."""
    active = active_mesh()
    if active is None:
        return None
    mesh, rules = active
    data = _rule_axes(mesh, rules, "batch", (slots, n_pages))
    kv = _rule_axes(mesh, rules, "kv_heads", (n_kv_heads,), used=data)
    return Layout(mesh, data, kv) if data or kv else None


POOL_DIMS = (None, "data", None, "kv", None)  # [layers, pages, page_tokens, kv_heads, head_dim]


def pool_shapes(cfg, n_pages: int, page_size: int, dtype=None, kv_dtype: str = "auto",
                layers: int | None = None) -> dict:
    """The abstract pool: k, v [layers, n_pages, page_size, kv_heads, head_dim] (+ the
    float32 scales [layers, n_pages, page_size, kv_heads] of a quantized kv_dtype; int4:
    head_dim / 2 bytes)."""
    return kv_leaf_shapes(cfg, (layers or cfg.n_layers, n_pages, page_size),
                          dtype or dtype_of(cfg.dtype), kv_dtype)


def init_pages(cfg, n_pages: int, page_size: int, dtype=None, *, slots: int = 1,
               kv_dtype: str = "auto", layers: int | None = None) -> dict:
    """The page pool (`pool_shapes`) of zeros; under an active mesh created in its
    sharding (`pool_layout` for `slots`), by one jitted zeros with out_shardings (no
    device holds the global pool)."""
    from .contiguous import _zeros_fn
    shapes = pool_shapes(cfg, n_pages, page_size, dtype, kv_dtype, layers)
    layout = pool_layout(slots, n_pages, kv_layout(cfg)[0])
    if layout is None:
        return {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    names = tuple(shapes)
    sh = tuple(NamedSharding(layout.mesh, layout.spec(*_dims(shapes[n]))) for n in names)
    return dict(zip(names, _zeros_fn(tuple(shapes[n] for n in names), sh)()))


def _dims(x) -> tuple:
    """The layout dims of a pool leaf: [layers, pages, page_tokens, kv_heads(, head_dim)]."""
    return POOL_DIMS[:x.ndim]


def constrain_pages(pages: dict, slots: int) -> dict:
    """Pin the pool to its `pool_layout` sharding (identity without a mesh)."""
    k = pages["k"]
    layout = pool_layout(slots, k.shape[1], k.shape[3])
    if layout is None:
        return pages
    return {n: jax.lax.with_sharding_constraint(
        x, NamedSharding(layout.mesh, layout.spec(*_dims(x)))) for n, x in pages.items()}


def _localize(ids, layout: Optional[Layout], n_local: int):
    """Global page ids -> ids in this shard's block [0, n_local); ids outside it
    (another shard's, or the unused marker) -> n_local (dropped / masked)."""
    if layout is None or not layout.data:
        return ids
    lo = jax.lax.axis_index(layout.data) * n_local
    return jnp.where((ids >= lo) & (ids < lo + n_local), ids - lo, n_local)


def _sharded(fn, layout: Optional[Layout], in_dims, out_dims):
    """fn under jax.shard_map over the layout's mesh (fn itself without one)."""
    if layout is None:
        return fn
    def spec(dims):  # a tuple of per-dim names is one array's; a tuple of those, a tuple's
        if all(d is None or isinstance(d, str) for d in dims):
            return layout.spec(*dims)
        return tuple(spec(d) for d in dims)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=spec(in_dims),
                         out_specs=spec(out_dims))


def pages_for(n_positions: int, page_size: int) -> int:
    return -(-int(n_positions) // page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Paged:
    """The pool as a KV store (see the module docstring). kv: {"k", "v": [L, N, ps,
    KVH, D]} (+ scales when quantized); page_table [R, P] int32 global page ids; lengths [R]:
    tokens already in row r's pages; live [R] bool: the rows whose writes are kept
    (None: all). Static: fresh (a packed prefill) and slots (the rows the pool's
    layout is fitted to: the engine's slot count)."""
    kv: dict
    page_table: jax.Array
    lengths: jax.Array
    live: Optional[jax.Array] = None
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))
    slots: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def page_size(self) -> int:
        return self.kv["k"].shape[2]

    def _layout(self):
        k = self.kv["k"]
        return pool_layout(self.slots, k.shape[1], k.shape[3])

    def positions(self, b: int, s: int):
        return after(self.lengths, s)

    def mask(self, causal: bool, positions, segment_ids, window) -> MaskSpec:
        return cache_mask(self.fresh, positions, segment_ids, window, self.lengths,
                          self.page_table.shape[1] * self.page_size)

    def attend(self, i, q, k, v, mask, bias, cfg, dropout_key=None):
        """v None: latent attention's pool ("k" alone, attended over as the values)."""
        r, s = q.shape[:2]
        ps = self.page_size
        n_pages = self.kv["k"].shape[1]
        at = after(self.lengths, s)  # [R, S]
        page = jnp.take_along_axis(self.page_table, at // ps, axis=1, mode="clip")
        ok = at // ps < self.page_table.shape[1]
        if self.live is not None:
            ok = ok & self.live[:, None]
        page = jnp.where(ok, page, n_pages)  # dropped
        pages = _write(self.kv, i, k, v, page, at % ps, self._layout())
        store = dataclasses.replace(self, kv=pages)
        if self.fresh:
            return store, attend(q, *as_stored(pages, k, v, q.dtype), mask, cfg, bias)
        opts = dict(scale=softmax_scale(cfg), softcap=cfg.attn_logit_softcap or None)
        if s == 1 and bias is None and "k_scale" not in pages and _kernel(cfg):
            o = _decode_kernel(pages, i, q[:, 0], self.page_table, self.lengths,
                               self._layout(), impl=cfg.attention_impl,
                               window=cfg.sliding_window or None, **opts)
            return store, o[:, None]
        kd, vd = _gather(pages, i, self.page_table, self._layout(), q.dtype)
        return store, attend(q, kd, vd, mask, cfg, bias)

    def advance(self, s: int):
        return dataclasses.replace(self, kv=constrain_pages(self.kv, self.slots),
                                   lengths=self.lengths + s)


def _kernel(cfg) -> bool:
    """Whether one-query paged attention runs the Pallas decode kernel (else the gather)."""
    from ..kernels.dispatch import resolve_impl
    return resolve_impl(cfg.attention_impl) not in ("xla",)


def _write(pages: dict, i, k, v, page, offset, layout) -> dict:
    """Layer i of the pool with k, v [R, S, KVH, D] written at (page, offset) [R, S]
    (page n_pages: dropped); quantized in the pool's format. Per data shard."""
    names = tuple(pages)

    def local(pages, i, k, v, page, offset):
        pages = dict(zip(names, pages))
        page = _localize(page, layout, pages["k"].shape[1])
        out = dict(pages)
        for name, x in (("k", k), ("v", v)) if "v" in pages else (("k", k),):
            if name + "_scale" in pages:
                x, scale = quantize_like(x, pages[name])
                sc = pages[name + "_scale"]
                out[name + "_scale"] = sc.at[i, page, offset].set(scale, mode="drop")
            out[name] = pages[name].at[i, page, offset].set(x.astype(pages[name].dtype),
                                                            mode="drop")
        return tuple(out[n] for n in names)

    rows = ("data", None, "kv", None)
    dims = tuple(_dims(pages[n]) for n in names)
    out = _sharded(local, layout, (dims, (), rows, rows, ("data", None), ("data", None)),
                   dims)(tuple(pages[n] for n in names), jnp.asarray(i, jnp.int32), k,
                         k if v is None else v, page, offset)
    return dict(zip(names, out))


def _gather(pages: dict, i, page_table, layout, dtype):
    """Each row's pages of layer i as dense k, v [R, P * ps, KVH, D] in `dtype`
    (dequantized when quantized); per data shard, from its own block."""
    names = tuple(pages)

    def local(pages, i, table):
        pages = dict(zip(names, pages))
        table = _localize(table, layout, pages["k"].shape[1])
        out = []
        for name in ("k", "v") if "v" in pages else ("k",):
            x = gather_pages(pages[name][i], table)
            if name + "_scale" in pages:
                x = dequantize(x, gather_pages(pages[name + "_scale"][i][..., None],
                                               table)[..., 0], dtype)
            out.append(x.astype(dtype))
        return tuple(out)

    dims = tuple(_dims(pages[n]) for n in names)
    rows = ("data", None, "kv", None)
    n_out = 2 if "v" in pages else 1
    out = _sharded(local, layout, (dims, (), ("data", None)), (rows,) * n_out)(
        tuple(pages[n] for n in names), jnp.asarray(i, jnp.int32), page_table)
    return tuple(out) if n_out == 2 else (out[0], out[0])  # latent attention: v is k


def _decode_kernel(pages, i, q, page_table, lengths, layout, **attn):
    """One query per row [R, H, D] over layer i's pages by `paged_attention` (the
    Pallas kernel), per data shard -> [R, H, D]."""
    def local(pk, pv, i, q, table, lengths):
        table = _localize(table, layout, pk.shape[1])
        return paged_attention(q, pk[i], pv[i], table, lengths + 1, **attn)

    heads = ("data", "kv", None)
    return _sharded(local, layout,
                    (POOL_DIMS, POOL_DIMS, (), heads, ("data", None), ("data",)), heads)(
        pages["k"], pages.get("v", pages["k"]), jnp.asarray(i, jnp.int32), q, page_table,
        lengths)
