"""The host side of the paged KV cache: which pages each slot holds.

    pool = PagePool(n_pages, page_size, S, max_pages, shards=J)   # host-side allocator
    pool.grow(slot, n_positions)      # pages for positions [0, n_positions)
    pool.trim(slot, n_positions)      # give back pages past them
    pool.release(slot)                # the sequence finished
    pool.share(src, dst, n)           # dst's first n pages are src's (n samples of one prompt)
    pool.table                        # np.int32 [slots, max_pages]; unused entries = n_pages

Prefix caching: a full page of a sequence is named by a hash chain over its tokens
and every token before it (`chain`). `remember(slot, keys)` records the slot's first
len(keys) pages under those names (pages written and never written again: a
prompt's full pages, a finished sequence's); `lookup(slot, keys)` finds the longest
run of them still in the pool and `attach` gives them to an empty slot (reference
counted, read-only, as `share`). A remembered page that no slot holds stays cached
until the pool is short: `grow` then takes free pages first, then evicts cached ones
least recently used first. free + cached-unheld + held = n_pages (`in_use`, `n_cached`).

The device side (the pool arrays, their sharding and the attention over them) is
the `Paged` KV store, `jaxlm.model.kv.paged`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

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
        # prefix caching, per data shard: chain key -> page; the cached pages no slot
        # holds, least recently used first
        self.cached: list[dict] = [{} for _ in range(shards)]
        self.key_of: dict[int, bytes] = {}
        self.idle: list[OrderedDict] = [OrderedDict() for _ in range(shards)]
        self.evictions = 0  # cached pages taken back for new ones

    def shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def n_free(self, shard: int) -> int:
        """Pages a slot of `shard` can still take: free ones and cached ones no slot holds."""
        return len(self.free[shard]) + len(self.idle[shard])

    def n_available(self) -> int:
        return sum(self.n_free(j) for j in range(self.shards))

    def n_cached(self) -> int:
        """Cached pages no slot holds (evictable)."""
        return sum(map(len, self.idle))

    def _new_page(self, shard: int) -> int:
        if self.free[shard]:
            return self.free[shard].pop()
        if not self.idle[shard]:
            raise RuntimeError("page pool exhausted (admission control failed)")
        page, _ = self.idle[shard].popitem(last=False)  # the least recently used
        self.evictions += 1
        del self.cached[shard][self.key_of.pop(page)]
        return page

    def chain(self, tokens) -> list:
        """The chain keys of tokens' full pages: key i names pages 0..i's tokens."""
        ps, keys, prev = self.page_size, [], b""
        data = np.asarray(tokens, np.int32)
        for i in range(len(data) // ps):
            prev = hashlib.blake2b(prev + data[i * ps:(i + 1) * ps].tobytes(),
                                   digest_size=16).digest()
            keys.append(prev)
        return keys

    def lookup(self, slot: int, keys) -> list:
        """The pages of the longest run of keys cached in slot's shard."""
        cached, out = self.cached[self.shard_of(slot)], []
        for key in keys:
            page = cached.get(key)
            if page is None:
                break
            out.append(page)
        return out

    def attach(self, slot: int, pages) -> None:
        """Give the empty slot these cached pages (read-only, reference counted)."""
        if self.held[slot]:
            raise ValueError(f"attach: slot {slot} holds pages")
        idle = self.idle[self.shard_of(slot)]
        for page in pages:
            idle.pop(page, None)
            self.table[slot, len(self.held[slot])] = page
            self.refs[page] += 1
            self.held[slot].append(page)

    def remember(self, slot: int, keys) -> None:
        """Cache the slot's first len(keys) pages under keys (a name already cached, or
        a page already named, is left as it is)."""
        cached = self.cached[self.shard_of(slot)]
        for key, page in zip(keys, self.held[slot]):
            if key not in cached and page not in self.key_of:
                cached[key] = page
                self.key_of[page] = key

    def grow(self, slot: int, n_positions: int) -> None:
        """Make slot hold the pages of positions [0, n_positions)."""
        want = pages_for(n_positions, self.page_size)
        held = self.held[slot]
        if want > self.table.shape[1]:
            raise ValueError(f"slot {slot}: {want} pages > max_pages {self.table.shape[1]}")
        while len(held) < want:
            page = self._new_page(self.shard_of(slot))
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
                if page in self.key_of:  # cached: kept until the pool is short
                    self.idle[self.shard_of(slot)][page] = None
                else:
                    free.append(page)

    def release(self, slot: int) -> None:
        self.trim(slot, 0)

    def in_use(self) -> int:
        """Pages some slot holds."""
        return self.n_pages - sum(map(len, self.free)) - self.n_cached()

