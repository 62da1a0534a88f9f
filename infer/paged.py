"""A paged KV cache: a pool of fixed-size pages, a page table per sequence slot.

    pages = init_pages(cfg, n_pages, page_size)   # {"k", "v": [L, N, ps, KVH, D]}
    pool = PagePool(n_pages, page_size, slots, max_pages)   # host-side allocator
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

Families: the decoder family (Llama, Mistral, Qwen2, GPT-2, Mixtral), with
RoPE or learned positions, sliding windows and soft-capping; position-bias
configs (ALiBi) and encoder(-decoder)s are refused with one line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import InputError
from jaxlm.model.adapters import layer_weights, materialize_outside_layers
from jaxlm.model.config import dtype_of
from jaxlm.model.families.decoder import _feed_forward
from jaxlm.model.kernels.paged import paged_attention
from jaxlm.model.layers.attention import output_projection, project_qkv
from jaxlm.model.layers.embeddings import embed_tokens_and_positions, unembed
from jaxlm.model.layers.norms import norm


def check_paged_family(cfg) -> None:
    """One-line InputError for configs the paged engine does not run."""
    if cfg.family != "decoder":
        raise InputError(f"the continuous-batching engine runs decoder-only models; "
                         f"model.family={cfg.family!r} (use the static path: jaxlm.generate)")
    if cfg.positions not in ("rope", "learned", "sinusoidal", "none"):
        raise InputError(f"the continuous-batching engine does not support "
                         f"model.positions={cfg.positions!r} (a position bias); use the "
                         "static path (jaxlm.generate)")


def init_pages(cfg, n_pages: int, page_size: int, dtype=None) -> dict:
    """The page pool: k, v [layers, n_pages, page_size, kv_heads, head_dim]."""
    dtype = dtype or dtype_of(cfg.dtype)
    shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def pages_for(n_positions: int, page_size: int) -> int:
    return -(-int(n_positions) // page_size)


class PagePool:
    """Host-side free-page allocator and page tables of `slots` sequences."""

    def __init__(self, n_pages: int, page_size: int, slots: int, max_pages: int):
        self.n_pages, self.page_size = n_pages, page_size
        self.free = list(range(n_pages - 1, -1, -1))  # pop() gives the lowest id
        self.held: list[list[int]] = [[] for _ in range(slots)]
        self.table = np.full((slots, max_pages), n_pages, np.int32)

    def grow(self, slot: int, n_positions: int) -> None:
        """Make slot hold the pages of positions [0, n_positions)."""
        want = pages_for(n_positions, self.page_size)
        held = self.held[slot]
        if want > self.table.shape[1]:
            raise ValueError(f"slot {slot}: {want} pages > max_pages {self.table.shape[1]}")
        while len(held) < want:
            if not self.free:
                raise RuntimeError("page pool exhausted (admission control failed)")
            page = self.free.pop()
            self.table[slot, len(held)] = page
            held.append(page)

    def trim(self, slot: int, n_positions: int) -> None:
        """Give back the slot's pages past positions [0, n_positions)."""
        keep = pages_for(n_positions, self.page_size)
        held = self.held[slot]
        while len(held) > keep:
            self.table[slot, len(held) - 1] = self.n_pages
            self.free.append(held.pop())

    def release(self, slot: int) -> None:
        self.trim(slot, 0)

    def in_use(self) -> int:
        return self.n_pages - len(self.free)


def write_prompt(pages: dict, k, v, page_ids) -> dict:
    """A prefilled contiguous cache k/v [L, 1, T, KVH, D] (T a multiple of the
    page size) -> its T / ps pages written at page_ids [T / ps] (n_pages: dropped)."""
    n_layers, _, t = k.shape[:3]
    ps = pages["k"].shape[2]

    def put(pool, x):
        x = x.reshape(n_layers, t // ps, ps, *x.shape[3:]).astype(pool.dtype)
        return pool.at[:, page_ids].set(x, mode="drop")

    return {"k": put(pages["k"], k), "v": put(pages["v"], v)}


def paged_step(params, cfg, pages: dict, page_table, lengths, tokens, live):
    """One token per slot: tokens [S] at positions lengths [S] -> (logits [S, V]
    float32, pages with each live slot's K/V written). The decoder family's
    cached forward (`jaxlm.model.families.decoder`) over a paged cache; params
    with unstacked layers (`unstack_layers`, split once outside a decode loop)
    run the layers unrolled."""
    s = tokens.shape[0]
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
        pk = pk.at[i, page, offset].set(k[:, 0].astype(pk.dtype), mode="drop")
        pv = pv.at[i, page, offset].set(v[:, 0].astype(pv.dtype), mode="drop")
        o = paged_attention(q[:, 0], pk[i], pv[i], page_table, lengths + 1,
                            impl=cfg.attention_impl, scale=cfg.attn_scale or None,
                            softcap=cfg.attn_logit_softcap or None, window=window)
        x = x + output_projection(layer["attn"], o[:, None], cfg)
        y, _ = _feed_forward(layer, x, cfg, None)
        return (x + y, pk, pv), None

    carry = (x, pages["k"], pages["v"])
    if isinstance(params["layers"], (list, tuple)):  # unstacked (`unstack_layers`): unrolled
        for i, layer in enumerate(params["layers"]):
            carry, _ = block(carry, (layer, i))
        x, pk, pv = carry
    else:
        layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        (x, pk, pv), _ = jax.lax.scan(block, carry, (params["layers"], layer_ids))
    hidden = norm(params["final_ln"], x, cfg)
    return unembed(params, hidden, cfg)[:, 0], {"k": pk, "v": pv}
