"""The host side of the paged KV cache: which pages each slot holds.

    pool = PagePool(n_pages, page_size, S, max_pages, shards=J)   # host-side allocator
    pool.grow(slot, n_positions)      # pages for positions [0, n_positions)
    pool.trim(slot, n_positions)      # give back pages past them
    pool.release(slot)                # the sequence finished
    pool.share(src, dst, n)           # dst's first n pages are src's (n samples of one prompt)
    pool.table                        # np.int32 [slots, max_pages]; unused entries = n_pages

The device side (the pool arrays, their sharding and the attention over them) is
the `Paged` KV store, `jaxlm.model.kv.paged`.
"""

from __future__ import annotations

import numpy as np

from ..model.kv.paged import pages_for


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
        self.refs = np.zeros(n_pages, np.int32)  # slots holding each page (shared: > 1)

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
            self.refs[page] = 1
            held.append(page)

    def share(self, src: int, dst: int, n: int) -> None:
        """Give the empty slot dst the first n pages of src (read-only to both: the
        full pages of a prompt that several samples continue)."""
        if self.held[dst] or self.shard_of(src) != self.shard_of(dst):
            raise ValueError(f"share: slot {dst} holds pages or is in another shard than {src}")
        for page in self.held[src][:n]:
            self.table[dst, len(self.held[dst])] = page
            self.refs[page] += 1
            self.held[dst].append(page)

    def trim(self, slot: int, n_positions: int) -> None:
        """Give back the slot's pages past positions [0, n_positions)."""
        keep = pages_for(n_positions, self.page_size)
        held, free = self.held[slot], self.free[self.shard_of(slot)]
        while len(held) > keep:
            self.table[slot, len(held) - 1] = self.n_pages
            page = held.pop()
            self.refs[page] -= 1
            if not self.refs[page]:
                free.append(page)

    def release(self, slot: int) -> None:
        self.trim(slot, 0)

    def in_use(self) -> int:
        return self.n_pages - sum(map(len, self.free))

