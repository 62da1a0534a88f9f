"""Quantized weight formats: one pytree node, its storage, rounding and dequantization.

A layer matmul weight w [*lead, *in, *out] (`lead`: stacked axes such as layers and
experts; `in`: the contracted axes; `out`: the rest) is held as a `QuantizedWeight`:

* int8: q int8 of w's shape, a float32 absmax scale per output channel;
  w = q * scale (the format jaxlm has always written; its checkpoints load as is).
* fp8: q float8_e4m3fn of w's shape, a float32 scale per output channel (absmax / 448);
  w = q * scale.
* int4: 4-bit codes c in 0..15 per group of `group` input rows and output channel, with
  a float32 scale and a uint8 zero point; w = (c - zero) * scale. Round-to-nearest
  writes the symmetric case (zero 8, scale absmax / 7); GPTQ / AWQ write their own
  zero points (asymmetric) into the same node.
* nf4: 4-bit codes into QLoRA's 16-value NormalFloat table, times a per-group absmax
  scale; w = NF4[c] * scale. With double quantization (QLoRA's frozen base) the scales
  themselves are uint8 codes times a float32 second-level scale per block of 256 scales
  (`scale2`): scale = code * scale2.

Groups run over the flattened input axes (K = prod(in); `group` 0: one group, i.e. per
output channel). The scale (and zero) keep w's rank: [*lead, 1, .., 1, G, *out] with
G = K / group in the last input axis, so per-channel scales are the G = 1 case and
`lax.scan` / `vmap` over the lead axes slice every child alike. 4-bit codes are stored
two per byte (uint8) along the last input axis (row 2i in the low nibble, 2i + 1 in the
high one): XLA:CPU keeps jnp.int4 arrays one byte per element, and pairs of adjacent
rows keep a sharded input axis's shards whole. `n_in` / `n_out` (static) count w's
input and output axes from the end, which stays true under slicing of the lead axes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "nf4", "fp8")
PACKED = ("int4", "nf4")  # two 4-bit codes per byte
PER_CHANNEL = ("int8", "fp8")  # one scale per output channel, no groups
DOUBLE_BLOCK = 256  # scales per second-level scale under double quantization (QLoRA)
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value

# QLoRA's NormalFloat-4 values (Dettmers et al. 2023, appendix E; bitsandbytes' table)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    q: jax.Array  # codes: int8 | float8_e4m3fn of w's shape; uint8 (two 4-bit) for int4 / nf4
    scale: jax.Array  # float32 [*lead, 1.., G, *out]; uint8 codes under double quantization
    zero: jax.Array | None = None  # int4: uint8 zero points, the scale's shape; else None
    scale2: jax.Array | None = None  # double quantization: float32 [*lead, 1.., G, blocks]
    fmt: str = dataclasses.field(metadata=dict(static=True), default="int8")
    n_in: int = dataclasses.field(metadata=dict(static=True), default=1)  # input axes
    n_out: int = dataclasses.field(metadata=dict(static=True), default=1)  # output axes

    @property
    def shape(self):
        """The weight's (unpacked) shape."""
        s = self.q.shape
        if self.fmt in PACKED:
            i = len(s) - self.n_out - 1
            s = (*s[:i], 2 * s[i], *s[i + 1:])
        return s

    @property
    def group(self) -> int:
        """Input rows per scale (K when per channel)."""
        s = self.shape
        k = math.prod(s[len(s) - self.n_out - self.n_in:len(s) - self.n_out])
        return k // self.scale.shape[len(s) - self.n_out - 1]


def pack(codes, axis: int):
    """4-bit codes (uint8 values 0..15) -> uint8, two per byte along `axis` (even rows
    in the low nibble)."""
    codes = jnp.asarray(codes, jnp.uint8)
    axis %= codes.ndim
    lo = jax.lax.slice_in_dim(codes, 0, None, 2, axis)
    hi = jax.lax.slice_in_dim(codes, 1, None, 2, axis)
    return lo | (hi << 4)


def unpack(q, axis: int):
    """`pack`'s inverse: uint8 [.., K/2, ..] -> codes uint8 [.., K, ..] along `axis`."""
    axis %= q.ndim
    both = jnp.stack([q & 15, q >> 4], axis=axis + 1)
    return both.reshape(*q.shape[:axis], 2 * q.shape[axis], *q.shape[axis + 1:])


def codes(w: QuantizedWeight):
    """The unpacked codes of `w` (w's shape)."""
    return unpack(w.q, -w.n_out - 1) if w.fmt in PACKED else w.q


def scales(w: QuantizedWeight):
    """float32 scales [*lead, 1.., G, *out] (second-level scales applied)."""
    if w.scale2 is None:
        return w.scale
    lead = w.scale.shape[:w.scale.ndim - w.n_out]
    nb = w.scale2.shape[-1]
    s = w.scale.astype(jnp.float32).reshape(*lead, nb, -1) * w.scale2[..., None]
    return s.reshape(w.scale.shape)


def _grouped(x, n_in: int, n_out: int, groups: int):
    """x [*lead, *in, *out] -> [*lead, G, K / G, *out]."""
    s = x.shape
    lead, out = s[:len(s) - n_in - n_out], s[len(s) - n_out:]
    return x.reshape(*lead, groups, -1, *out)


def dequantize(w: QuantizedWeight, dtype=jnp.float32):
    """The weight as a plain array in `dtype` (float32 arithmetic, then cast)."""
    c = codes(w)
    if w.fmt == "nf4":
        v = jnp.asarray(NF4)[c.astype(jnp.int32)]
    else:
        v = c.astype(jnp.float32)
    s = scales(w).astype(jnp.float32)
    if w.fmt in PER_CHANNEL and w.zero is None:
        return (v * s).astype(dtype)
    groups = s.shape[s.ndim - w.n_out - 1]
    vg = _grouped(v, w.n_in, w.n_out, groups)
    sg = _grouped(s, w.n_in, w.n_out, groups)  # [*lead, G, 1, *out]
    if w.zero is not None:
        vg = vg - _grouped(w.zero, w.n_in, w.n_out, groups).astype(jnp.float32)
    return (vg * sg).reshape(v.shape).astype(dtype)


def scale_shape(shape, n_in: int, n_out: int, groups: int) -> tuple[int, ...]:
    """[*lead, 1.., G, *out] for a weight of `shape`."""
    nd = len(shape)
    return (*shape[:nd - n_in - n_out], *([1] * (n_in - 1)), groups, *shape[nd - n_out:])


def n_groups(shape, n_in: int, n_out: int, group: int) -> int:
    """G = K / group (1 for group 0); ValueError if group does not divide K."""
    nd = len(shape)
    k = math.prod(shape[nd - n_in - n_out:nd - n_out])
    if group <= 0:
        return 1
    if k % group:
        raise ValueError(f"the group size {group} does not divide the input dimension {k}")
    return k // group


def double_blocks(shape, n_out: int) -> int:
    """Second-level blocks per group row of a scale [*lead, 1.., G, *out]: the flattened
    out axes in blocks of 256 (one block when 256 does not divide them)."""
    n = math.prod(shape[len(shape) - n_out:])
    return n // DOUBLE_BLOCK if n % DOUBLE_BLOCK == 0 else 1


def _absmax(x, n_in, n_out, groups):
    """max |x| per group: [*lead, 1.., G, *out] float32."""
    xg = _grouped(x, n_in, n_out, groups)
    amax = jnp.max(jnp.abs(xg), axis=xg.ndim - n_out - 1)
    return amax.reshape(scale_shape(x.shape, n_in, n_out, groups))


def nf4_codes(x):
    """Nearest NormalFloat-4 code of each x in [-1, 1] (ties to the lower code)."""
    mid = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    return jnp.searchsorted(mid, x, side="left").astype(jnp.uint8)


def quantize(w, n_in: int, n_out: int, fmt: str = "int8", group: int = 0,
             double: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of w [*lead, *in, *out] (symmetric absmax scales:
    per output channel for int8 / fp8, per `group` input rows for int4 / nf4). `double`:
    nf4 / int4 scales double-quantized (uint8 codes times a float32 per 256 scales)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r} (one of {', '.join(FORMATS)})")
    w32 = jnp.asarray(w).astype(jnp.float32)
    groups = 1 if fmt in PER_CHANNEL else n_groups(w32.shape, n_in, n_out, group)
    amax = _absmax(w32, n_in, n_out, groups)
    bound = {"int8": 127.0, "fp8": FP8_MAX, "int4": 7.0, "nf4": 1.0}[fmt]
    scale = jnp.where(amax > 0, amax / bound, 1.0)
    sg = _grouped(scale, n_in, n_out, groups)
    x = (_grouped(w32, n_in, n_out, groups) / sg).reshape(w32.shape)
    zero = None
    if fmt == "int8":
        q = jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
    elif fmt == "fp8":
        q = jnp.clip(x, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    elif fmt == "int4":
        q = (jnp.clip(jnp.round(x), -8, 7) + 8).astype(jnp.uint8)
        zero = jnp.full(scale.shape, 8, jnp.uint8)
    else:
        q = nf4_codes(jnp.clip(x, -1.0, 1.0))
    if fmt in PACKED:
        q = pack(q, -n_out - 1)
    scale2 = None
    if double:
        scale, scale2 = double_quantize(scale, n_out)
    return QuantizedWeight(q=q, scale=scale, zero=zero, scale2=scale2, fmt=fmt, n_in=n_in,
                           n_out=n_out)


def double_quantize(scale, n_out: int):
    """float32 scales [*lead, 1.., G, *out] (all > 0) -> (uint8 codes of the same shape,
    float32 second-level scales [*lead, 1.., G, blocks]): code = round(s / (blockmax /
    255)), at least 1 so that no group's scale becomes 0. Linear 8 bits over [0, max]
    (scales are positive); QLoRA subtracts the mean and uses bitsandbytes' signed
    dynamic 8-bit map, to the same end: 8 bits a scale and a float32 per 256."""
    lead = scale.shape[:scale.ndim - n_out]
    nb = double_blocks(scale.shape, n_out)
    blocks = scale.reshape(*lead, nb, -1)
    s2 = jnp.max(blocks, axis=-1) / 255.0
    s2 = jnp.where(s2 > 0, s2, 1.0)
    q = jnp.clip(jnp.round(blocks / s2[..., None]), 1, 255).astype(jnp.uint8)
    return q.reshape(scale.shape), s2


def from_codes(c, scale, zero=None, *, fmt: str, n_in: int = 1, n_out: int = 1,
               scale2=None) -> QuantizedWeight:
    """A node from unpacked codes (GPTQ / AWQ / HF loaders): int4 c uint8 0..15 with
    scale and zero [*lead, 1.., G, *out]; nf4 codes; int8 / fp8 q as stored."""
    q = pack(c, -n_out - 1) if fmt in PACKED else c
    return QuantizedWeight(q=q, scale=jnp.asarray(scale), zero=None if zero is None
                           else jnp.asarray(zero, jnp.uint8), scale2=scale2, fmt=fmt,
                           n_in=n_in, n_out=n_out)


__all__ = ["FORMATS", "PACKED", "PER_CHANNEL", "NF4", "QuantizedWeight", "pack", "unpack",
           "codes", "scales", "dequantize", "quantize", "double_quantize", "from_codes",
           "scale_shape", "n_groups", "double_blocks", "nf4_codes"]
