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


__all__ = ["AWQ_ORDER", "unpack_gptq", "pack_gptq", "unpack_awq", "dequantize"]
