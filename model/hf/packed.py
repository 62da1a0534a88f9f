"""Hugging Face's packed int4 layouts: GPTQ and AWQ (GEMM), both ways, in numpy.

Both store one Linear (torch [out, in]) quantized group-wise along its input,
w[i, o] = (q[i, o] - zero[g(i), o]) * scale[g(i), o], as int32 words of eight
4-bit values (nibble k at bits 4k..4k+3):

GPTQ (AutoGPTQ / GPTQModel; config.json quantization_config.quant_method "gptq"):
  qweight [in / 8, out] int32   packed along the input: word [r, o] holds q[8r + k, o]
  qzeros  [G, out / 8] int32    packed along the output: word [g, c] holds zero[g, 8c + k],
                                stored minus 1 in checkpoint_format "gptq" (v1; a zero
                                of 0 does not survive it), as is in "gptq_v2"
  scales  [G, out] float16
  g_idx   [in] int32            each input row's group (i // group_size, unless desc_act
                                quantized in another order: then any map)
AWQ (AutoAWQ; quant_method "awq", version "gemm"):
  qweight [in, out / 8] int32   packed along the output, nibble k holding column
                                8c + AWQ_ORDER[k] (AutoAWQ's interleaving)
  qzeros  [G, out / 8] int32    packed the same way, zeros as is
  scales  [G, out] float16

`unpack_*` -> (codes [in, out] uint8, zero [G, out] int32, scale [G, out] float32,
g_idx [in]); `pack_gptq` is the reverse of `unpack_gptq` for contiguous groups.
"""

from __future__ import annotations

import numpy as np

from ...errors import CheckpointError
from .io import CONFIG_FILE

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k]
_SHIFTS = np.arange(8, dtype=np.uint32) * 4


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> uint8 [..., n, 8]: nibble k of each word at [..., k]."""
    w = np.asarray(words).astype(np.int64).astype(np.uint32)  # two's complement bits
    return ((w[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def _words(nib: np.ndarray) -> np.ndarray:
    """uint8 [..., n, 8] (values 0..15) -> int32 [..., n]."""
    w = np.bitwise_or.reduce(nib.astype(np.uint32) << _SHIFTS, axis=-1)
    return w.view(np.int32)


def unpack_gptq(qweight, qzeros, scales, g_idx=None, v1: bool = True):
    qweight, qzeros = np.asarray(qweight), np.asarray(qzeros)
    n_in, out = qweight.shape[0] * 8, qweight.shape[1]
    codes = _nibbles(qweight).transpose(0, 2, 1).reshape(n_in, out)  # [in/8, 8, out]
    zero = _nibbles(qzeros).reshape(qzeros.shape[0], out).astype(np.int32) + (1 if v1 else 0)
    scale = np.asarray(scales, np.float32)
    if g_idx is None:
        g_idx = np.arange(n_in) // (n_in // scale.shape[0])
    return codes, zero, scale, np.asarray(g_idx, np.int32)


def pack_gptq(codes, zero, scale, v1: bool = True) -> dict:
    """codes [in, out] (0..15), zero [G, out] (v1: 1..16 ... zeros of 0 need v1=False),
    scale [G, out] -> {"qweight", "qzeros", "scales", "g_idx"} with contiguous groups."""
    codes, zero = np.asarray(codes, np.uint8), np.asarray(zero, np.int64)
    n_in, out = codes.shape
    stored = zero - 1 if v1 else zero
    if stored.min() < 0 or stored.max() > 15:
        raise ValueError("zero points outside the format's 4 bits")
    qweight = _words(codes.reshape(n_in // 8, 8, out).transpose(0, 2, 1))
    qzeros = _words(stored.astype(np.uint8).reshape(zero.shape[0], out // 8, 8))
    group = n_in // zero.shape[0]
    return {"qweight": qweight, "qzeros": qzeros, "scales": np.asarray(scale, np.float16),
            "g_idx": (np.arange(n_in) // group).astype(np.int32)}


def unpack_awq(qweight, qzeros, scales):
    qweight, qzeros = np.asarray(qweight), np.asarray(qzeros)
    inverse = np.argsort(AWQ_ORDER)  # column j of a word's eight is nibble inverse[j]
    codes = _nibbles(qweight)[..., inverse].reshape(qweight.shape[0], -1)
    zero = _nibbles(qzeros)[..., inverse].reshape(qzeros.shape[0], -1).astype(np.int32)
    scale = np.asarray(scales, np.float32)
    n_in = codes.shape[0]
    return codes, zero, scale, (np.arange(n_in) // (n_in // scale.shape[0])).astype(np.int32)


def dequantize(codes, zero, scale, g_idx) -> np.ndarray:
    """-> w [in, out] float32."""
    return (codes.astype(np.float32) - zero[g_idx]) * scale[g_idx]


# ------------------------------------------------------------------ checkpoint dirs

METHODS = ("gptq", "awq")


def packed_config(hf: dict):
    """config.json's quantization_config -> (method, group, v1) for a GPTQ / AWQ int4
    checkpoint jaxlm reads, None without one; CheckpointError (one line) for any other
    method or setting, by name."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method not in METHODS:
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.quant_method={method!r} is "
                              f"not supported (jaxlm reads GPTQ and AWQ int4; dequantize the "
                              "checkpoint to bf16 first)")
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size"))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4:
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.bits={bits!r}: jaxlm reads "
                              f"{method} with 4 bits")
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.group_size={group!r}: jaxlm "
                              "reads group-wise int4 (a group size > 0)")
    if method == "awq" and version != "gemm":
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.version={version!r}: jaxlm "
                              "reads AWQ's GEMM layout")
    if method == "awq" and q.get("zero_point") is False:
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.zero_point=false: jaxlm "
                              "reads AWQ with zero points")
    fmt = q.get("checkpoint_format", "gptq")
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.checkpoint_format={fmt!r}: "
                              "jaxlm reads gptq and gptq_v2")
    return method, group, fmt == "gptq"


_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}
# the virtual tensors, in HF's Linear orientation [out, ...]: codes [out, in], scale and
# zero point [out, G]
VIRTUAL = {"weight": 0, "weight_scale": 2, "weight_zero": 1}


class PackedReader:
    """A `CheckpointReader` over a GPTQ / AWQ dir that shows each packed Linear P as
    float-layout tensors P.weight (codes, uint8 [out, in]), P.weight_scale (float32
    [out, G]) and P.weight_zero (uint8 [out, G]), unpacked on first read (one Linear
    held at a time), so the family's rules map them as they map P.weight."""

    def __init__(self, reader, method: str, v1: bool):
        self.reader, self.method, self.v1 = reader, method, v1
        self.used = reader.used
        self.directory = reader.directory
        self.prefixes = {k[:-len(".qweight")] for k in reader.keys() if k.endswith(".qweight")}
        self._cache = (None, None)

    def keys(self):
        own = {f"{p}.{part}" for p in self.prefixes for part in _PARTS[self.method]}
        return [k for k in self.reader.keys() if k not in own] + [
            f"{p}.{v}" for p in self.prefixes for v in VIRTUAL]

    def _split(self, name: str):
        for v in VIRTUAL:
            if name.endswith("." + v) and name[:-len(v) - 1] in self.prefixes:
                return name[:-len(v) - 1], v
        return None, None

    def __contains__(self, name: str) -> bool:
        return self._split(name)[0] is not None or name in self.reader

    def _unpacked(self, prefix: str):
        if self._cache[0] != prefix:
            r = self.reader
            names = [f"{prefix}.{part}" for part in _PARTS[self.method]]
            got = {}
            for n in names:
                if n not in r:
                    if n.endswith(".g_idx"):
                        continue
                    raise CheckpointError(f"tensor {n!r} is missing from the checkpoint in "
                                          f"{r.directory}")
                full = tuple(slice(None) for _ in r._file(r.where[n]).get_slice(n).get_shape())
                got[n.rsplit(".", 1)[1]] = r.read(n, full)
                r.used.add(n)
            if self.method == "gptq":
                c, z, s, g = unpack_gptq(got["qweight"], got["qzeros"], got["scales"],
                                         got.get("g_idx"), self.v1)
            else:
                c, z, s, g = unpack_awq(got["qweight"], got["qzeros"], got["scales"])
            group = c.shape[0] // s.shape[0]
            if not np.array_equal(g, np.arange(c.shape[0]) // group):
                raise CheckpointError(f"{prefix}: g_idx is not contiguous groups of {group} "
                                      "rows (desc_act / act-order without static groups); "
                                      "jaxlm's int4 keeps groups contiguous")
            if z.max() > 15:
                raise CheckpointError(f"{prefix}: a zero point of {z.max()} does not fit 4 bits")
            self._cache = (prefix, (c.T, z.T.astype(np.uint8), s.T))
        return self._cache[1]

    def resolve(self, names, expected_shape) -> str:
        for n in names:
            prefix, v = self._split(n)
            if prefix is not None:
                got = self._unpacked(prefix)[VIRTUAL[v]].shape
                if got != tuple(expected_shape):
                    raise CheckpointError(f"{prefix}: {v} has shape {list(got)} in the "
                                          f"checkpoint but the config implies "
                                          f"{list(expected_shape)} (model.quant_group?)")
                self.used.add(n)
                return n
        return self.reader.resolve(names, expected_shape)

    def read(self, name: str, index) -> np.ndarray:
        prefix, v = self._split(name)
        if prefix is None:
            return self.reader.read(name, index)
        return self._unpacked(prefix)[VIRTUAL[v]][tuple(index)]


def quantization_config(method: str, group: int, sym: bool, v1: bool) -> dict:
    """The quantization_config a GPTQ export writes into config.json."""
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
            "sym": sym, "checkpoint_format": "gptq" if v1 else "gptq_v2",
            "true_sequential": True, "damp_percent": 0.01}


__all__ = ["AWQ_ORDER", "METHODS", "unpack_gptq", "pack_gptq", "unpack_awq", "dequantize",
           "packed_config", "PackedReader", "quantization_config"]
