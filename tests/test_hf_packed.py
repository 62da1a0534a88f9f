"""GPTQ / AWQ packed int4 layouts (model/hf/packed.py) against loop-by-loop packers
written from AutoGPTQ's and AutoAWQ's documented packing."""

import numpy as np
import pytest

from jaxlm.model.hf import packed as P


def ref_pack_gptq(codes, zeros):
    """AutoGPTQ QuantLinear.pack: qweight packs 8 input rows per word (row j - i at
    bits 4 (j - i)); qzeros packs 8 output columns per word, zeros stored minus 1."""
    n_in, out = codes.shape
    qweight = np.zeros((n_in // 8, out), np.uint32)
    for row in range(n_in // 8):
        for k in range(8):
            qweight[row] |= codes[row * 8 + k].astype(np.uint32) << (4 * k)
    z = (zeros.astype(np.int64) - 1).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], out // 8), np.uint32)
    for col in range(out // 8):
        for k in range(8):
            qzeros[:, col] |= z[:, col * 8 + k] << (4 * k)
    return qweight.astype(np.int32), qzeros.astype(np.int32)


def ref_pack_awq(codes, zeros):
    """AutoAWQ WQLinear_GEMM.from_linear: 8 output columns per word, nibble i holding
    column order_map[i], order_map = [0, 2, 4, 6, 1, 3, 5, 7]; zeros as is."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]

    def pack(x):
        q = np.zeros((x.shape[0], x.shape[1] // 8), np.uint32)
        for col in range(x.shape[1] // 8):
            for i in range(8):
                q[:, col] |= x[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
        return q.astype(np.int32)
    return pack(codes), pack(zeros)


@pytest.fixture
def quantized():
    rng = np.random.default_rng(0)
    n_in, out, group = 64, 24, 16
    codes = rng.integers(0, 16, (n_in, out)).astype(np.uint8)
    zeros = rng.integers(1, 16, (n_in // group, out))
    scales = rng.uniform(0.01, 0.1, (n_in // group, out)).astype(np.float16)
    return codes, zeros, scales, group


def test_gptq_unpack_and_pack_match_autogptq_layout(quantized):
    codes, zeros, scales, group = quantized
    qweight, qzeros = ref_pack_gptq(codes, zeros)
    assert qweight.shape == (8, 24) and qzeros.shape == (4, 3) and (qweight < 0).any()
    c, z, s, g = P.unpack_gptq(qweight, qzeros, scales)
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(z, zeros)
    np.testing.assert_array_equal(g, np.arange(64) // group)
    w = P.dequantize(c, z, s, g)
    np.testing.assert_array_equal(w, (codes.astype(np.float32) - np.repeat(zeros, group, 0))
                                  * np.repeat(scales.astype(np.float32), group, 0))
    out = P.pack_gptq(codes, zeros, scales)
    np.testing.assert_array_equal(out["qweight"], qweight)
    np.testing.assert_array_equal(out["qzeros"], qzeros)
    # v2 keeps a zero of 0 (v1's minus-1 cannot)
    zeros[0, 0] = 0
    with pytest.raises(ValueError):
        P.pack_gptq(codes, zeros, scales)
    v2 = P.pack_gptq(codes, zeros, scales, v1=False)
    np.testing.assert_array_equal(P.unpack_gptq(v2["qweight"], v2["qzeros"], scales,
                                                v1=False)[1], zeros)


def test_awq_unpack_matches_autoawq_layout(quantized):
    codes, zeros, scales, group = quantized
    qweight, qzeros = ref_pack_awq(codes, zeros)
    assert qweight.shape == (64, 3)
    c, z, s, g = P.unpack_awq(qweight, qzeros, scales)
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(z, zeros)
    np.testing.assert_array_equal(g, np.arange(64) // group)
