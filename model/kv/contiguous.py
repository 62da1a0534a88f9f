"""The preallocated KV cache: `k`, `v` [layers, batch, max_len, kv_heads, head_dim] + `lengths`.

`kv_dtype` int8 | int4 | fp8 (`quant.py`): k, v hold the format's values (int4:
two per byte, [..., head_dim / 2] uint8) with per-token, per-head float32 scales
`k_scale`, `v_scale` [layers, batch, max_len, kv_heads]; quantized on write,
dequantized on read (`write_kv`, `read_kv`).

Created with its sharding: under `jaxlm.sharding.rules.use_mesh` every leaf
comes out of one jitted `zeros` with `out_shardings` from `cache_axes`, so no
device ever holds the global cache; `constrain_cache` pins the same layout on
the cache that prefill and the decode loop carry, so XLA cannot re-layout it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from ...sharding.rules import active_mesh, partition_spec
from ..config import KV_DTYPES
from ..kernels import MaskSpec
from ..layers.attention import attend
from .quant import FORMATS, dequantize, format_of, kv_dtype_of, quantize, roundtrip

# max_len is the `seq` logical axis: under context parallelism (mesh.context > 1)
# each device holds a contiguous 1/c of every row's cache, so no device holds the
# whole cache; the prefill's ring writes each device's own prompt chunk into its
# own block (`write_kv_block`), and one decode query against the seq-sharded cache
# stays XLA-partitioned (its softmax max / sum and output are all-reduced over
# `context`). Without a context axis in the rules, max_len stays whole.
KV_AXES = ("layers", "batch", "seq", "kv_heads", None)
SCALE_AXES = KV_AXES[:-1]  # k_scale, v_scale [layers, batch, max_len, kv_heads]


def cache_axes() -> dict:
    """The logical-axes tree of a cache: k, v [layers, batch, max_len, kv_heads, head_dim],
    lengths [batch]."""
    from ..params import LogicalAxes
    return {"k": LogicalAxes(KV_AXES), "v": LogicalAxes(KV_AXES),
            "k_scale": LogicalAxes(SCALE_AXES), "v_scale": LogicalAxes(SCALE_AXES),
            "lengths": LogicalAxes(("batch",))}


def check_kv_dtype(kv_dtype: str, what: str = "generate.kv_dtype") -> str:
    from ...errors import ConfigError
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"{what}={kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    return kv_dtype


def kv_leaf_shapes(cfg, lead: tuple, dtype, kv_dtype: str) -> dict:
    """{"k", "v"} (latent attention: "k") of shape lead + (KV heads, head size) as
    ShapeDtypeStructs at `dtype` (auto), or in format kv_dtype: its values (int4: the
    head size halved, packed) + float32 "k_scale", "v_scale" of shape lead + (KV heads,)."""
    from ...errors import ConfigError
    check_kv_dtype(kv_dtype)
    kvh, hd, names = kv_layout(cfg)
    if kv_dtype == "auto":
        return {n: jax.ShapeDtypeStruct(lead + (kvh, hd), dtype) for n in names}
    fmt = FORMATS[kv_dtype]
    if hd % fmt.per_byte:
        raise ConfigError(f"generate.kv_dtype={kv_dtype} packs {fmt.per_byte} values per byte: "
                          f"the cached head size {hd} must divide by it")
    out = {n: jax.ShapeDtypeStruct(lead + (kvh, hd // fmt.per_byte), fmt.dtype) for n in names}
    out.update({n + "_scale": jax.ShapeDtypeStruct(lead + (kvh,), jnp.float32) for n in names})
    return out


def cache_shapes(cfg, batch: int, max_len: int, dtype=None, kv_dtype: str = "auto",
                 layers: int | None = None) -> dict:
    """The abstract cache: a tree of jax.ShapeDtypeStruct (+ the scales of a quantized
    kv_dtype). `layers`: default cfg.n_layers (an encoder-decoder's decoder passes its own)."""
    from ..config import dtype_of
    out = kv_leaf_shapes(cfg, (layers or cfg.n_layers, batch, max_len),
                         dtype or dtype_of(cfg.dtype), kv_dtype)
    out["lengths"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


def kv_layout(cfg) -> tuple:
    """(KV heads, head size, leaves) a cache keeps per token and layer: "k" and "v" of
    n_kv_heads x head_dim; latent attention (model.mla): one "k" of one head of
    kv_lora_rank + qk_rope_head_dim (the normed latent and the roped shared key part),
    which is also what its queries attend over as values (`Contiguous.attend` with
    v None: v is k)."""
    m = cfg.mla
    if m.kv_lora_rank:
        return 1, m.kv_lora_rank + m.qk_rope_head_dim, ("k",)
    return cfg.n_kv_heads, cfg.head_dim, ("k", "v")


def fit_axes(mesh, entry, dims, used=()) -> tuple:
    """The mesh axes of one partition-spec entry, in order, keeping each (not in
    `used`) while the product of those kept divides every one of dims."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for a in names:
        n = mesh.shape.get(a, 0)
        if a not in used and n and all(d % (size * n) == 0 for d in dims):
            kept.append(a)
            size *= n
    return tuple(kept)


def fitted_spec(mesh, axes, rules, shape) -> PartitionSpec:
    """partition_spec(axes, rules) without the mesh axes a dim does not divide by
    (a batch of 3 on 4 data devices stays whole rather than failing)."""
    out = []
    for entry, n in zip(partition_spec(axes, rules), shape):
        kept = fit_axes(mesh, entry, (n,))
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def cache_shardings(mesh, rules, shapes: dict) -> dict:
    """NamedSharding per cache leaf (`cache_axes` under `rules`, fitted to the shapes)."""
    axes = cache_axes()
    return {n: NamedSharding(mesh, fitted_spec(mesh, axes[n], rules, s.shape))
            for n, s in shapes.items()}


@functools.lru_cache(maxsize=64)
def _zeros_fn(shapes: tuple, shardings: tuple):
    """A jitted () -> tuple of zeros, each created in its sharding (one per (shapes, shardings))."""
    return jax.jit(lambda: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes),
                   out_shardings=shardings)


def init_cache(cfg, batch: int, max_len: int, dtype=None, kv_dtype: str = "auto",
               layers: int | None = None) -> dict:
    """The empty cache {"k", "v": [L, B, max_len, KVH, D] zeros, "lengths": [B] zeros}
    (+ "k_scale", "v_scale" [L, B, max_len, KVH] with a quantized kv_dtype); under an
    active mesh created sharded (see `cache_axes`). layers: default cfg.n_layers."""
    shapes = cache_shapes(cfg, batch, max_len, dtype, kv_dtype, layers)
    active = active_mesh()
    if active is None:
        return {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    mesh, rules = active
    names = tuple(shapes)
    sh = cache_shardings(mesh, rules, shapes)
    leaves = _zeros_fn(tuple(shapes[n] for n in names), tuple(sh[n] for n in names))()
    return dict(zip(names, leaves))


def constrain_cache(cache: dict) -> dict:
    """Pin the cache's leaves to their `cache_axes` shardings (identity without a mesh);
    per-layer leaves (`split_layers`) to the same axes less `layers`, head-major."""
    active = active_mesh()
    if active is None:
        return cache
    mesh, rules = active
    axes = cache_axes()

    def pin(x, ax):
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, fitted_spec(mesh, ax, rules, x.shape)))

    out = {}
    for n, x in cache.items():
        if n not in axes:
            out[n] = x
        elif isinstance(x, tuple):
            out[n] = tuple(pin(a, _heads_major(axes[n][1:])) for a in x)
        else:
            out[n] = pin(x, axes[n])
    return out


def split_layers(cache: dict) -> dict:
    """The cache with each per-layer leaf (k, v [L, B, T, KVH, D], the scales
    [L, B, T, KVH]) split into a tuple of L per-layer head-major buffers
    ([B, KVH, T, D], [B, KVH, T]); `lengths` unchanged.

    What a decode loop carries (over weights split by `unstack_layers`): each layer's
    attention then reads its own buffer, and its write updates that buffer in place.
    Slicing layer i out of the stacked carry instead makes XLA:CPU copy the slice that
    feeds the attention matmuls, every layer of every step; head-major, each (row,
    KV head) is one contiguous [T, D] panel that the attention's batched matmuls
    read in place (`read_kv`; token-major, the one-query form must score every
    query head against every KV head). Both copies (this split, `stack_layers`)
    happen once per loop (issue 9)."""
    return {n: x if n == "lengths" else tuple(jnp.swapaxes(x[i], 1, 2) for i in range(x.shape[0]))
            for n, x in cache.items()}


def stack_layers(cache: dict) -> dict:
    """The inverse of `split_layers`: per-layer head-major tuples back to [L, ...] leaves."""
    return {n: jnp.stack([jnp.swapaxes(a, 1, 2) for a in x]) if isinstance(x, tuple) else x
            for n, x in cache.items()}


def _heads_major(axes: tuple) -> tuple:
    """Per-layer token-major axes (batch, seq, kv_heads, ...) -> head-major (`split_layers`)."""
    return (axes[0], axes[2], axes[1]) + tuple(axes[3:])


def is_split(cache: dict) -> bool:
    """Whether the cache is split per layer, head-major (`split_layers`)."""
    return isinstance(cache["k"], tuple)


def cache_length(cache: dict) -> int:
    """T, the cache's max_len, from a stacked or a split (`split_layers`) cache."""
    return cache["k"][0].shape[2] if is_split(cache) else cache["k"].shape[2]


def quantize_kv(kv: dict, kv_dtype: str) -> dict:
    """{"k", "v": [..., D]} -> "k", "v" in format kv_dtype + float32 "k_scale", "v_scale"
    [...] (per token and head); other leaves kept. "auto": kv unchanged."""
    if kv_dtype == "auto":
        return kv
    out = dict(kv)
    for name in ("k", "v"):
        out[name], out[name + "_scale"] = quantize(kv[name], kv_dtype)
    return out


def quantize_like(x, leaf):
    """x [..., D] in the format of a cache leaf (its dtype names it)."""
    if isinstance(leaf, tuple):
        leaf = leaf[0]
    return quantize(x, format_of(leaf.dtype).name)


def as_stored(cache: dict, k, v, dtype):
    """A fresh call's own (k, v) as a store of `cache`'s leaves holds them (quantized:
    dequantize(quantize(x)), in `dtype`), so that a prompt attends to the values its
    later tokens (and a prefix-cache hit) read; v None (latent attention): (k, k)."""
    if "k_scale" in cache:
        kv_dtype = kv_dtype_of(cache)
        k = roundtrip(k, kv_dtype, dtype)
        v = None if v is None else roundtrip(v, kv_dtype, dtype)
    return k, k if v is None else v


def write_kv(cache: dict, i, rows, positions, k, v) -> dict:
    """The cache's per-layer leaves ({"k", "v": [L, B, T, KVH, D]}, + quantized "k_scale",
    "v_scale" [L, B, T, KVH]; or tuples of L head-major buffers, see `split_layers`,
    with a Python int i) with layer i's k, v [B, S, KVH, D] written at
    [i, rows, positions] (quantized in the cache's format): an in-place scatter into
    the carry."""
    def put(name, x):
        c = cache[name]
        if isinstance(c, tuple):  # [B, KVH, T(, D)]: the indexed dims come first in x
            return c[:i] + (c[i].at[rows, :, positions].set(x.astype(c[i].dtype), mode="drop"),) \
                + c[i + 1:]
        return c.at[i, rows, positions].set(x.astype(c.dtype), mode="drop")

    out = dict(cache)
    for name, x in (("k", k), ("v", v)) if v is not None else (("k", k),):
        if name + "_scale" in cache:
            x, scale = quantize_like(x, cache[name])
            out[name + "_scale"] = put(name + "_scale", scale)
        out[name] = put(name, x)
    return out


def write_kv_block(cache: dict, i, k, v) -> dict:
    """`write_kv` of k, v [B, S, KVH, D] at positions 0..S-1 of every row of layer i,
    as one dynamic_update_slice of the whole layer (a fresh cache's prefill: zeros
    after S). With S equal
    to the cache length and both seq-sharded alike, every device writes its own block."""
    out = dict(cache)
    for name, x in (("k", k), ("v", v)) if v is not None else (("k", k),):
        if name + "_scale" in cache:
            x, scale = quantize_like(x, cache[name])
            out[name + "_scale"] = jax.lax.dynamic_update_index_in_dim(
                cache[name + "_scale"], _pad_to(scale, cache[name + "_scale"]), i, 0)
        c = cache[name]
        out[name] = jax.lax.dynamic_update_index_in_dim(c, _pad_to(x.astype(c.dtype), c), i, 0)
    return out


def _pad_to(x, cache_leaf):
    """x [B, S, ...] -> [B, T, ...] (zeros after S) for a cache leaf [L, B, T, ...]."""
    t = cache_leaf.shape[2]
    if x.shape[1] == t:
        return x
    return jnp.pad(x, [(0, 0), (0, t - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def read_kv(cache: dict, i, dtype):
    """Layer i's (k, v) [B, T, KVH, D] in `dtype` (dequantized when quantized); of a split
    cache (`split_layers`) its head-major buffers [B, KVH, T, D] as they are (the
    attention takes them with kv_heads_major=True). A latent cache (no "v"): (k, k)."""
    def read(name):
        if name + "_scale" in cache:
            return dequantize(cache[name][i], cache[name + "_scale"][i], dtype)
        return cache[name][i].astype(dtype)
    k = read("k")
    return k, read("v") if "v" in cache else k  # latent attention: the values are k


def cache_bytes(cache: dict) -> int:
    """Global bytes of a cache's leaves."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))


def read_cross(cross: dict, dtype):
    """One layer's cached encoder K/V {"k", "v": [B, S, KVH, D]} (+ scales) of an
    encoder-decoder's cross-attention -> (k, v) in `dtype`."""
    if "k_scale" in cross:
        return (dequantize(cross["k"], cross["k_scale"], dtype),
                dequantize(cross["v"], cross["v_scale"], dtype))
    return cross["k"].astype(dtype), cross["v"].astype(dtype)


def own_mask(causal: bool, positions, segment_ids, window) -> MaskSpec:
    """The mask of a call whose tokens attend only to each other (positions None:
    the implicit arange, which cuDNN / splash attention can take)."""
    return MaskSpec(causal=causal, q_positions=positions, kv_positions=positions,
                    q_segment_ids=segment_ids, kv_segment_ids=segment_ids, window=window)


def after(lengths, s: int):
    """Positions [R, S] of S tokens written after each row's lengths [R]."""
    return lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None]


def cache_mask(fresh: bool, positions, segment_ids, window, lengths, span: int) -> MaskSpec:
    """What a cached call's tokens see: fresh (a prompt into empty rows), each other
    (`own_mask`, causal); else every key of the row's [0, span) positions up to its
    lengths + S, causally (and within the window)."""
    if fresh:
        return own_mask(True, positions, segment_ids, window)
    return MaskSpec(causal=True, q_positions=positions,
                    kv_positions=jnp.arange(span, dtype=jnp.int32)[None],
                    kv_lengths=lengths + positions.shape[1], window=window)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Contiguous:
    """The preallocated cache as a KV store (see `jaxlm.model.kv`). kv: {"k", "v":
    [L, B, T, KVH, D]} (+ quantized: "k_scale", "v_scale"), or split per layer head-major
    (`split_layers`, for a decode loop over unstacked weights); lengths [R]: the
    tokens already in the call's rows; rows [R]: the call's rows of the cache (None:
    all of them, in order); live [R] bool: the rows whose writes are kept (None:
    all). A call's S tokens go at positions lengths + [0, S) and attend to
    everything before them (`kv_lengths`); `advance` moves lengths on.

    fresh (static): the call's rows are empty (lengths 0: a prompt); its tokens
    attend to each other (the call's own mask: segment ids keep a row's padding
    out), over what the cache stores of them (quantized: dequantized). Under a context
    mesh that is ring attention in the prompt's array order (contiguous chunks,
    so that each device's chunk is its own block of the seq-sharded cache,
    written in place by `write_kv_block`; the call then covers every row) instead
    of attending over the whole cache, which would gather the sequence."""
    kv: dict
    lengths: jax.Array
    rows: Optional[jax.Array] = None
    live: Optional[jax.Array] = None
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def of(cls, cache: dict, fresh: bool = False) -> "Contiguous":
        """The store of an `init_cache` dict (its "lengths" the store's)."""
        return cls({n: a for n, a in cache.items() if n != "lengths"}, cache["lengths"],
                   fresh=fresh)

    def cache(self) -> dict:
        """The `init_cache`-style dict: kv and lengths."""
        return dict(self.kv, lengths=self.lengths)

    def _ring(self) -> bool:
        from ...sharding.context import context_size
        return self.fresh and context_size() > 1

    def positions(self, b: int, s: int):
        return after(self.lengths, s)

    def mask(self, causal: bool, positions, segment_ids, window) -> MaskSpec:
        return cache_mask(self.fresh, positions, segment_ids, window, self.lengths,
                          cache_length(self.kv))

    def attend(self, i, q, k, v, mask, bias, cfg, dropout_key=None):
        """v None: latent attention's cache (`kv_layout`): k is stored alone and
        attended over as the values too."""
        b, s = q.shape[:2]
        kv = self.kv
        if self._ring():  # every row, from position 0: one block write per layer
            kv = write_kv_block(kv, i, k, v)
            o = attend(q, *(c[:, :s] for c in read_kv(kv, i, q.dtype)), mask, cfg, bias)
            return dataclasses.replace(self, kv=kv), o
        at = after(self.lengths, s)
        if self.live is not None:
            at = jnp.where(self.live[:, None], at, cache_length(kv))  # dropped
        rows = jnp.arange(b) if self.rows is None else self.rows
        kv = write_kv(kv, i, rows[:, None], at, k, v)
        if self.fresh:  # the prompt's own K/V, as the cache holds them
            return dataclasses.replace(self, kv=kv), attend(q, *as_stored(kv, k, v, q.dtype),
                                                            mask, cfg, bias)
        ks, vs = read_kv(kv, i, q.dtype)
        if self.rows is not None:
            ks = jnp.take(ks, self.rows, axis=0, mode="clip")
            vs = ks if v is None else jnp.take(vs, self.rows, axis=0, mode="clip")
        o = attend(q, ks, vs, mask, cfg, bias, kv_heads_major=is_split(kv))
        return dataclasses.replace(self, kv=kv), o

    def advance(self, s: int):
        return dataclasses.replace(self, kv=constrain_cache(self.kv), lengths=self.lengths + s)
