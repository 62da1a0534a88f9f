"""The quantized KV formats (`generate.kv_dtype`): one quantize / dequantize pair each,
used by every store (the contiguous cache, the page pool, an encoder-decoder's cross K/V).

Each format keeps a float32 scale per token and KV head (absmax over the head's D
values, so a scale leaf is the value leaf less its last dim): the group is the head,
64-576 values wide (the group size the field uses for 4-bit weights is 128), its
scale is one more leaf of the same layout as the values (sharded, paged and split per
layer alike), and a token written once is never re-quantized (a per-channel scale, as
KIVI keeps for keys, would change as tokens arrive).

* int8: q = round(x / s), s = absmax / 127, q in [-127, 127]; 1 byte + 4 / D.
* int4: q = round(x / s), s = absmax / 7, q in [-7, 7], stored as the nibble q + 8,
  two per uint8 byte (element 2j in the low nibble, 2j + 1 in the high one: XLA:CPU
  keeps jnp.int4 one byte per element); 0.5 byte + 4 / D.
* fp8: float8_e4m3fn of x / s, s = absmax / 448 (E4M3's largest finite value), so
  each token's head uses the whole range; 1 byte + 4 / D.

The storage dtype names the format (int8, uint8: int4, float8_e4m3fn: fp8), so a
store reads the format off its leaves (`format_of`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..config import KV_DTYPES
from ..qformat import FP8_MAX, pack, unpack


def _absmax_scale(x, top: float):
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    return jnp.where(scale > 0, scale, 1.0)


def quantize_int8(x):
    """x [..., D] -> (int8 [..., D], float32 scale [...]): x ~ q * scale."""
    x = x.astype(jnp.float32)
    scale = _absmax_scale(x, 127.0)
    return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def dequantize_int8(q, scale, dtype):
    return q.astype(dtype) * scale[..., None].astype(dtype)


def quantize_int4(x):
    """x [..., D] (D even) -> (uint8 [..., D / 2], float32 scale [...]): codes q + 8 in
    [1, 15], element 2j in the low nibble of byte j, 2j + 1 in the high one."""
    x = x.astype(jnp.float32)
    scale = _absmax_scale(x, 7.0)
    c = (jnp.clip(jnp.round(x / scale[..., None]), -7, 7) + 8).astype(jnp.uint8)
    return pack(c, -1), scale


def dequantize_int4(packed, scale, dtype):
    """uint8 [..., D / 2] and its scale [...] -> [..., D] in `dtype`."""
    codes = unpack(packed, -1)
    return (codes.astype(jnp.int8) - 8).astype(dtype) * scale[..., None].astype(dtype)


def quantize_fp8(x):
    """x [..., D] -> (float8_e4m3fn [..., D], float32 scale [...]): x ~ q * scale."""
    x = x.astype(jnp.float32)
    scale = _absmax_scale(x, FP8_MAX)
    q = jnp.clip(x / scale[..., None], -FP8_MAX, FP8_MAX)
    return q.astype(jnp.float8_e4m3fn), scale


def dequantize_fp8(q, scale, dtype):
    return q.astype(jnp.float32).astype(dtype) * scale[..., None].astype(dtype)


class KVFormat(NamedTuple):
    name: str
    dtype: object  # the storage dtype of the values
    per_byte: int  # values per stored element (int4: 2, packed)
    quantize: Callable
    dequantize: Callable

    @property
    def bytes_per_value(self) -> float:
        return jnp.dtype(self.dtype).itemsize / self.per_byte


FORMATS = {
    "int8": KVFormat("int8", jnp.int8, 1, quantize_int8, dequantize_int8),
    "int4": KVFormat("int4", jnp.uint8, 2, quantize_int4, dequantize_int4),
    "fp8": KVFormat("fp8", jnp.float8_e4m3fn, 1, quantize_fp8, dequantize_fp8),
}
assert set(FORMATS) == set(KV_DTYPES) - {"auto"}
_BY_DTYPE = {jnp.dtype(f.dtype): f for f in FORMATS.values()}


def format_of(dtype) -> KVFormat:
    """The format whose values are stored as `dtype` (a leaf's dtype)."""
    return _BY_DTYPE[jnp.dtype(dtype)]


def kv_dtype_of(tree: dict) -> str:
    """The kv_dtype of a cache / pool / cross K/V tree: "auto" without scales."""
    return format_of(tree["k"][0].dtype if isinstance(tree["k"], tuple) else tree["k"].dtype
                     ).name if "k_scale" in tree else "auto"


def quantize(x: jax.Array, kv_dtype: str):
    """x [..., D] -> (values [..., D / per_byte], float32 scale [...]) in format kv_dtype."""
    return FORMATS[kv_dtype].quantize(x)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Stored values and their scale -> [..., D] in `dtype` (the format read off q.dtype)."""
    return format_of(q.dtype).dequantize(q, scale, dtype)


def roundtrip(x: jax.Array, kv_dtype: str, dtype) -> jax.Array:
    """x as the cache holds it: dequantize(quantize(x)) in `dtype`."""
    return dequantize(*quantize(x, kv_dtype), dtype)
