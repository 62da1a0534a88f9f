"""One mapping-rule type for every Hugging Face family, one leaf loader, one exporter.

A `Rule` ties one leaf of our param tree to its HF tensor(s). Our layouts differ
from HF's only by transposes and by reshapes that split or merge adjacent axes
(HF q_proj [H*hd, D] is ours [D, H, hd]), declared as data (`groups`), so a
block of our leaf maps back to a block of the HF tensor. That is what lets
`load_leaf` build a sharded `jax.Array` device by device, each device's block
read from the safetensors files on its own (only its slice of each tensor).

    Rule(("layers", "attn", "q"), "model.layers.{i}.self_attn.q_proj.weight",
         linear(1, 3))        # HF [H*hd, D] (Linear [out, in]) <-> ours [L, D, H, hd]
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .io import CheckpointReader, named_leaves

Index = tuple  # one slice per axis


# ------------------------------------------------------------------ layouts

def linear(n_in: int, ndim: int) -> tuple:
    """An HF Linear weight [out, in] whose `in` is our first n_in axes (ours are
    [in..., out...]): groups ((n_in, ..., ndim-1), (0, ..., n_in-1))."""
    return (tuple(range(n_in, ndim)), tuple(range(n_in)))


def merged(*sizes: int) -> tuple:
    """HF axes each holding `size` adjacent axes of ours, in our order (no transpose):
    merged(2, 1) is HF [H*hd, D] <-> ours [H, hd, D] (GPT-2's Conv1D [in, out])."""
    out, k = [], 0
    for n in sizes:
        out.append(tuple(range(k, k + n)))
        k += n
    return tuple(out)


class Rule(NamedTuple):
    """One leaf of our tree <-> its HF tensor(s).

    path: the leaf's keys in our tree, ("layers", "attn", "q").
    key: the HF name; "{i}" is the layer (our leaf stacked on axis 0), "{e}" the
      expert (axis 1): one HF tensor per slot. A slot is our leaf without those axes.
    groups: for each HF axis, the slot axes it holds, outer to inner (None: the same
      axes): ours = hf.reshape(split).transpose(perm). ((1, 2), (0,)) is HF
      [H*hd, D] <-> ours [D, H, hd].
    part: (hf_axis, index, count): ours is chunk `index` of `count` equal chunks of
      the HF tensor along hf_axis (fused tensors: GPT-2 c_attn, Mixtral gate_up_proj);
      count may be a tuple of the chunks' relative sizes (Phi-3's qkv_proj with GQA:
      (H, KVH, KVH)).
    aliases: other names (templates like key) the tensor may have, tried in order.
    first: the HF layer number of our slot 0 (a second layer stack: DeepSeek's MoE
      layers after its dense ones).
    """
    path: tuple
    key: str
    groups: tuple | None = None
    part: tuple | None = None
    aliases: tuple = ()
    first: int = 0

    @property
    def depth(self) -> int:
        """How many leading axes of our leaf are slots: 0, 1 (layer), 2 (layer, expert)."""
        return ("{i}" in self.key) + ("{e}" in self.key)

    def _groups(self, ndim: int) -> tuple:
        return self.groups if self.groups is not None else tuple((k,) for k in range(ndim))

    def _span(self, size: int) -> tuple[int, int]:
        """(offset, total) along the fused axis of our chunk of `size` rows."""
        _, index, count = self.part
        weights = (1,) * count if isinstance(count, int) else tuple(count)
        unit = size // weights[index]
        return unit * sum(weights[:index]), unit * sum(weights)

    def chunk_shape(self, slot: tuple) -> tuple:
        """Shape of our part of one HF tensor (the whole tensor unless fused)."""
        return tuple(math.prod(slot[k] for k in g) for g in self._groups(len(slot)))

    def hf_shape(self, slot: tuple) -> tuple:
        """Shape of the whole HF tensor one slot of shape `slot` comes from."""
        shape = list(self.chunk_shape(slot))
        if self.part:
            shape[self.part[0]] = self._span(shape[self.part[0]])[1]
        return tuple(shape)

    def _order(self, ndim: int) -> tuple:
        """Our axes in HF order (the groups flattened)."""
        return tuple(k for g in self._groups(ndim) for k in g)

    def to_ours(self, chunk: np.ndarray, slot: tuple) -> np.ndarray:
        """Our slot from our chunk of the HF tensor."""
        order = self._order(len(slot))
        return chunk.reshape([slot[k] for k in order]).transpose(np.argsort(order))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our chunk of the HF tensor from our slot `x`."""
        return x.transpose(self._order(x.ndim)).reshape(self.chunk_shape(x.shape))

    def names(self, i: int = 0, e: int = 0) -> list[str]:
        return [k.format(i=i + self.first, e=e) for k in (self.key, *self.aliases)]

    def slots(self, shape: tuple) -> list[tuple]:
        """(i,), (i, e) or () for every HF tensor of a leaf of `shape`."""
        if self.depth == 0:
            return [()]
        if self.depth == 1:
            return [(i,) for i in range(shape[0])]
        return [(i, e) for i in range(shape[0]) for e in range(shape[1])]

    def hf_block(self, index: Index, slot: tuple) -> tuple[Index, tuple, Index]:
        """Where a block of our slot lives in the HF tensor.

        index: one slice per slot axis. Returns (hf_index, wide, within): read
        hf_index (one slice per HF axis), reshape/transpose it with `to_ours` into a
        block of ours of shape `wide`, take `within` of it. Exact (within is all of
        wide) unless a group of merged axes is cut in a way that is not one
        contiguous range of the merged HF axis, e.g. ours [D, H, hd] split on both
        H and hd: then the smallest enclosing slab is read (the cut inner axes
        widened to full), never more than that.
        """
        spans = [s.indices(n)[:2] for s, n in zip(index, slot)]
        wide = list(spans)
        hf_index = []
        for h, group in enumerate(self._groups(len(slot))):
            for pos in reversed(range(len(group))):  # inner to outer
                k = group[pos]
                cut = wide[k] != (0, slot[k])
                if cut and any(wide[j][1] - wide[j][0] > 1 for j in group[:pos]):
                    wide[k] = (0, slot[k])  # not contiguous: read the enclosing slab
            sizes = [slot[k] for k in group]
            first = np.ravel_multi_index([wide[k][0] for k in group], sizes) if sizes else 0
            last = np.ravel_multi_index([wide[k][1] - 1 for k in group], sizes) if sizes else 0
            offset = 0
            if self.part and self.part[0] == h:
                offset = self._span(math.prod(sizes))[0]
            hf_index.append(slice(offset + int(first), offset + int(last) + 1))
        within = tuple(slice(a - w0, b - w0) for (a, b), (w0, _) in zip(spans, wide))
        return tuple(hf_index), tuple(b - a for a, b in wide), within


# ------------------------------------------------------------------ loading

def check_table(rules: Sequence[Rule], paths: Sequence[tuple]):
    ruled = [r.path for r in rules]
    if sorted(ruled) != sorted(paths):  # a bug in a family's table, not in the checkpoint
        raise AssertionError(f"hf table does not cover the param tree: "
                             f"{set(ruled) ^ set(paths)}")


def _read_block(reader: CheckpointReader, rule: Rule, spec, names: dict, index: Index
                ) -> np.ndarray:
    """The block `index` of our leaf `spec`, read slot by slot (only slots in range)."""
    d = rule.depth
    slot = tuple(spec.shape[d:])
    ranges = [range(*s.indices(n)) for s, n in zip(index[:d], spec.shape[:d])]
    hf_index, wide, within = rule.hf_block(index[d:], slot)
    inner = tuple(len(range(*s.indices(n))) for s, n in zip(index[d:], slot))
    out = np.empty(tuple(len(r) for r in ranges) + inner, spec.dtype)
    for at in np.ndindex(*(len(r) for r in ranges)):
        ids = tuple(r[j] for r, j in zip(ranges, at))
        raw = reader.read(names[ids], hf_index)
        out[at] = rule.to_ours(raw, wide)[within]  # casts to the param dtype
    return out


def load_leaf(reader: CheckpointReader, rule: Rule, spec: jax.ShapeDtypeStruct,
              sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """The leaf `spec` (shape, dtype) read through `rule`.

    Every HF tensor is checked for presence and shape first (metadata only).
    Without a sharding: one host buffer of the whole leaf, made a jax array.
    With one: the block of each addressable device is read on its own (only the
    layers in its range, only its slice of each tensor), put on that device, and
    dropped before the next is read; devices that hold the same block (replicas)
    share one read. So a process holds at most one block of a sharded leaf on the
    host. (`jax.make_array_from_callback` would hold every addressable block at
    once before placing them: the whole leaf on a single host; hence
    `make_array_from_single_device_arrays`, with the same per-device callback.)
    """
    slot = tuple(spec.shape[rule.depth:])
    hf_shape = rule.hf_shape(slot)
    names = {ids: reader.resolve(rule.names(*ids), hf_shape)
             for ids in rule.slots(spec.shape)}
    if sharding is None:
        full = tuple(slice(None) for _ in spec.shape)
        return jnp.asarray(_read_block(reader, rule, spec, names, full))
    where = sharding.addressable_devices_indices_map(spec.shape)
    replicas: dict[tuple, list] = {}
    for device, index in where.items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, spec.shape))
        replicas.setdefault(key, []).append((device, index))
    on_device = {}
    for group in replicas.values():
        block = _read_block(reader, rule, spec, names, group[0][1])
        for device, _ in group:
            on_device[device] = jax.device_put(block, device)
        del block
    return jax.make_array_from_single_device_arrays(spec.shape, sharding,
                                                    [on_device[d] for d in where])


# ------------------------------------------------------------------ exporting

def export_tensors(rules: Sequence[Rule], params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous numpy tensor) pairs, one at a time; fused parts concatenated.
    A leaf (or the leaves of one fused tensor) is copied to the host whole."""
    leaves = dict(named_leaves(params, sep=None)[0])
    check_table(rules, list(leaves))
    by_key: dict[tuple, list[Rule]] = {}
    for r in rules:
        by_key.setdefault((r.key, r.first), []).append(r)
    for group in by_key.values():
        group.sort(key=lambda r: r.part[1] if r.part else 0)
        host = [np.asarray(jax.device_get(leaves[r.path])) for r in group]
        for ids in group[0].slots(host[0].shape):
            pieces = [r.to_hf(a[ids]) for r, a in zip(group, host)]
            tensor = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, group[0].part[0])
            yield group[0].names(ids[0] if ids else 0, ids[1] if len(ids) > 1 else 0)[0], \
                np.ascontiguousarray(tensor)


__all__ = ["Rule", "linear", "merged", "check_table", "load_leaf", "export_tensors"]
