"""A paged KV cache: a pool of fixed-size pages, a page table per sequence slot.

    pages = init_pages(cfg, n_pages, page_size, slots=S)   # {"k", "v": [L, N, ps, KVH, D]}
    pool = PagePool(n_pages, page_size, S, max_pages, shards=J)   # host-side allocator
    pool.grow(slot, n_positions)      # pages for positions [0, n_positions)
    pool.trim(slot, n_positions)      # give back pages past them
    pool.release(slot)                # the sequence finished
    pool.table                        # np.int32 [slots, max_pages]; unused entries = n_pages

Device side (`paged_step`): one decode step of the decoder family for every
slot at once, writing each live slot's new K/V at (page_table[s, len // ps],
len % ps) and attending over its pages (`jaxlm.model.kernels.paged`).
Writes of slots that are not live go to page index n_pages, out of range,
and are dropped; reads through unused page-table entries are clipped and
masked by the lengths.

Sharded (under `jaxlm.sharding.rules.use_mesh`): the pool is created in its
sharding (`pool_layout`, `init_pages`): kv_heads over the kv_heads rule's axes (tensor) and
the pages axis over the batch rule's axes (data), like the slots. Data
shard j of J owns the contiguous block of pages [j N/J, (j+1) N/J) and the
slots [j S/J, (j+1) S/J); `PagePool(..., shards=J)` allocates a slot's
pages only from its shard's block, so the page table holds global ids that
fall in the slot's own block. The write and the attention run under
`jax.shard_map` over the mesh (`paged_layer`, `write_prompt`): each shard
turns its slots' global ids into ids of its block and touches only its own
pages, so no step gathers the pool and no device holds more than its
1 / (J x tensor) of it.

Families: the decoder family (Llama, Mistral, Qwen2, GPT-2, Mixtral), with
RoPE or learned positions, sliding windows and soft-capping; position-bias
configs (ALiBi) and encoder(-decoder)s are refused with one line.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..errors import InputError
from ..model.adapters import layer_weights, materialize_outside_layers
from ..model.config import dtype_of
from ..model.families.decoder import _feed_forward, over_layers
from ..model.kernels.paged import paged_attention
from ..model.layers.attention import output_projection, project_qkv
from ..model.layers.embeddings import embed_tokens_and_positions, unembed
from ..model.layers.norms import norm
from ..sharding.rules import active_mesh, partition_spec


def check_paged_family(cfg) -> None:
    """One-line InputError for configs the paged engine does not run."""
    if cfg.family != "decoder":
        raise InputError(f"the continuous-batching engine runs decoder-only models; "
                         f"model.family={cfg.family!r} (use the static path: jaxlm.generate)")
    if cfg.positions not in ("rope", "learned", "sinusoidal", "none"):
        raise InputError(f"the continuous-batching engine does not support "
                         f"model.positions={cfg.positions!r} (a position bias); use the "
                         "static path (jaxlm.generate)")


def _rule_axes(mesh, rules, name, dims, used=()) -> tuple:
    """The mesh axes `rules` give logical axis `name`, fitted to dims (`fit_axes`)."""
    from .cache import fit_axes
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


def init_pages(cfg, n_pages: int, page_size: int, dtype=None, *, slots: int = 1) -> dict:
    """The page pool: k, v [layers, n_pages, page_size, kv_heads, head_dim] zeros;
    under an active mesh created in its sharding (`pool_layout` for `slots`),
    by one jitted zeros with out_shardings (no device holds the global pool)."""
    from .cache import _zeros_fn
    dtype = dtype or dtype_of(cfg.dtype)
    shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    layout = pool_layout(slots, n_pages, cfg.n_kv_heads)
    if layout is None:
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    sd = jax.ShapeDtypeStruct(shape, dtype)
    sh = NamedSharding(layout.mesh, layout.spec(*POOL_DIMS))
    k, v = _zeros_fn((sd, sd), (sh, sh))()
    return {"k": k, "v": v}


def constrain_pages(pages: dict, slots: int) -> dict:
    """Pin the pool to its `pool_layout` sharding (identity without a mesh)."""
    k = pages["k"]
    layout = pool_layout(slots, k.shape[1], k.shape[3])
    if layout is None:
        return pages
    sh = NamedSharding(layout.mesh, layout.spec(*POOL_DIMS))
    return {n: jax.lax.with_sharding_constraint(x, sh) for n, x in pages.items()}


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
    spec = lambda dims: tuple(layout.spec(*d) for d in dims)
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=spec(in_dims),
                         out_specs=spec(out_dims))


def pages_for(n_positions: int, page_size: int) -> int:
    return -(-int(n_positions) // page_size)


class PagePool:
    """Host-side free-page allocator and page tables of `slots` sequences.

    shards J (dividing slots and n_pages): slot s belongs to data shard
    s // (slots / J) and takes pages only from that shard's block
    [j n_pages / J, (j+1) n_pages / J) (see the module docstring)."""

    def __init__(self, n_pages: int, page_size: int, slots: int, max_pages: int,
                 shards: int = 1):
        if slots % shards or n_pages % shards:
            raise ValueError(f"shards={shards} must divide slots={slots} and n_pages={n_pages}")
        self.n_pages, self.page_size, self.shards = n_pages, page_size, shards
        block, self.slots_per_shard = n_pages // shards, slots // shards
        # pop() gives the lowest id of the block
        self.free = [list(range((j + 1) * block - 1, j * block - 1, -1)) for j in range(shards)]
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.table = np.full((slots, max_pages), n_pages, np.int32)

    def shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def n_free(self, shard: int) -> int:
        return len(self.free[shard])

    def grow(self, slot: int, n_positions: int) -> None:
        """Make slot hold the pages of positions [0, n_positions)."""
        want = pages_for(n_positions, self.page_size)
        held, free = self.held[slot], self.free[self.shard_of(slot)]
        if want > self.table.shape[1]:
            raise ValueError(f"slot {slot}: {want} pages > max_pages {self.table.shape[1]}")
        while len(held) < want:
            if not free:
                raise RuntimeError("page pool exhausted (admission control failed)")
            page = free.pop()
            self.table[slot, len(held)] = page
            held.append(page)

    def trim(self, slot: int, n_positions: int) -> None:
        """Give back the slot's pages past positions [0, n_positions)."""
        keep = pages_for(n_positions, self.page_size)
        held, free = self.held[slot], self.free[self.shard_of(slot)]
        while len(held) > keep:
            self.table[slot, len(held) - 1] = self.n_pages
            free.append(held.pop())

    def release(self, slot: int) -> None:
        self.trim(slot, 0)

    def in_use(self) -> int:
        return self.n_pages - sum(map(len, self.free))


def write_prompt(pages: dict, k, v, page_ids, slots: int = 1) -> dict:
    """Prefilled contiguous caches k/v [L, A, T, KVH, D] (T a multiple of the
    page size) -> row a's T / ps pages written at page_ids [A, T / ps] (global
    ids; n_pages: dropped). Under a mesh (`pool_layout` for `slots`) each data
    shard writes the rows' pages that fall in its block."""
    n_layers, a, t = k.shape[:3]
    ps = pages["k"].shape[2]
    layout = pool_layout(slots, pages["k"].shape[1], pages["k"].shape[3])

    def put(pk, pv, k, v, ids):
        ids = _localize(ids.reshape(-1), layout, pk.shape[1])

        def one(pool, x):
            x = x.reshape(n_layers, a * (t // ps), ps, *x.shape[3:]).astype(pool.dtype)
            return pool.at[:, ids].set(x, mode="drop")
        return one(pk, k), one(pv, v)

    kv = (None, None, None, "kv", None)
    pk, pv = _sharded(put, layout, (POOL_DIMS, POOL_DIMS, kv, kv, (None, None)),
                      (POOL_DIMS, POOL_DIMS))(pages["k"], pages["v"], k, v,
                                              jnp.asarray(page_ids, jnp.int32))
    return {"k": pk, "v": pv}


def paged_layer(pk, pv, i, q, k, v, page_table, lengths, page, offset, **attn):
    """Layer i of one decode step over the pool: write k, v [S, KVH, D] at
    (page [S], offset [S]) of pk, pv [L, N, ps, KVH, D], then attend q [S, H, D]
    over each slot's pages (page_table [S, P] global ids, lengths [S] keys
    before the new one). -> (pk, pv, out [S, H, D]). Under a mesh: per shard
    (`jax.shard_map`), over its own block of pages and its slots."""
    layout = pool_layout(q.shape[0], pk.shape[1], pk.shape[3])

    def local(pk, pv, i, q, k, v, page_table, lengths, page, offset):
        n_local = pk.shape[1]
        page = _localize(page, layout, n_local)
        page_table = _localize(page_table, layout, n_local)
        pk = pk.at[i, page, offset].set(k.astype(pk.dtype), mode="drop")
        pv = pv.at[i, page, offset].set(v.astype(pv.dtype), mode="drop")
        o = paged_attention(q, pk[i], pv[i], page_table, lengths + 1, **attn)
        return pk, pv, o

    heads = ("data", "kv", None)
    return _sharded(local, layout,
                    (POOL_DIMS, POOL_DIMS, (), heads, heads, heads, ("data", None), ("data",),
                     ("data",), ("data",)),
                    (POOL_DIMS, POOL_DIMS, heads))(
        pk, pv, jnp.asarray(i, jnp.int32), q, k, v, page_table, lengths, page, offset)


def paged_step(params, cfg, pages: dict, page_table, lengths, tokens, live):
    """One token per slot: tokens [S] at positions lengths [S] -> (logits [S, V]
    float32, pages with each live slot's K/V written). The decoder family's
    cached forward (`jaxlm.model.families.decoder`) over a paged cache; params
    with unstacked layers (`unstack_layers`, split once outside a decode loop)
    run the layers unrolled. Under a mesh each layer's write and attention run
    per data shard over its own pages (`paged_layer`)."""
    dtype = dtype_of(cfg.dtype)
    params = materialize_outside_layers(params, dtype)
    n_pages, ps = pages["k"].shape[1:3]
    positions = lengths[:, None]
    x = embed_tokens_and_positions(params, tokens[:, None], positions, cfg)
    page = jnp.take_along_axis(page_table, (lengths // ps)[:, None], axis=1, mode="clip")[:, 0]
    page = jnp.where(live, page, n_pages)  # not live: dropped
    offset = lengths % ps
    window = cfg.sliding_window or None

    def block(carry, layer_and_index):
        x, pk, pv = carry
        layer, i = layer_and_index
        layer = layer_weights(layer, dtype)
        q, k, v = project_qkv(layer["attn"], norm(layer["ln1"], x, cfg), positions, cfg)
        pk, pv, o = paged_layer(pk, pv, i, q[:, 0], k[:, 0], v[:, 0], page_table, lengths,
                                page, offset, impl=cfg.attention_impl,
                                scale=cfg.attn_scale or None,
                                softcap=cfg.attn_logit_softcap or None, window=window)
        x = x + output_projection(layer["attn"], o[:, None], cfg)
        y, _ = _feed_forward(layer, x, cfg, None)
        return (x + y, pk, pv), None

    (x, pk, pv), _ = over_layers(block, (x, pages["k"], pages["v"]), params["layers"])
    hidden = norm(params["final_ln"], x, cfg)
    return unembed(params, hidden, cfg)[:, 0], {"k": pk, "v": pv}
