"""GPTQ / AWQ on single weights (model/calibrate.py) against numpy oracles."""

import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.model import calibrate as C


def np_gptq(w, h, group, damp=0.01):
    """The GPTQ update written from the paper in float64 numpy, row by row (rows are
    input channels: x @ w), asymmetric min/max groups from the updated rows."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    n, out = w.shape
    h = h + damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: u.T @ u = h^-1
    codes = np.zeros((n, out))
    scale, zero = np.zeros((n // group, out)), np.zeros((n // group, out))
    for i in range(n):
        g = i // group
        if i % group == 0:
            lo, hi = np.minimum(w[i:i + group].min(0), 0), np.maximum(w[i:i + group].max(0), 0)
            scale[g] = (hi - lo) / 15
            zero[g] = np.round(-lo / scale[g])
        codes[i] = np.clip(np.round(w[i] / scale[g]) + zero[g], 0, 15)
        err = (w[i] - (codes[i] - zero[g]) * scale[g]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return codes, scale, zero


def _layer(n=64, out=24, tokens=512, seed=0):
    rng = np.random.default_rng(seed)
    # correlated inputs with a few loud channels, as a layer's activations are
    x = rng.normal(size=(tokens, n)) @ rng.normal(size=(n, n)) * 0.3
    x[:, :4] *= 8
    return x.astype(np.float32), rng.normal(size=(n, out)).astype(np.float32)


def test_gptq_equals_numpy_reference():
    x, w = _layer(n=16, out=6, tokens=64)
    h = np.asarray(C.hessian(x))
    codes, scale, zero = C.gptq(w, h, group=8)
    rc, rs, rz = np_gptq(w, h, 8)
    np.testing.assert_allclose(np.asarray(scale), rs, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), rz)
    assert (np.asarray(codes) != rc).mean() < 0.02  # float32 vs 64: a rare tie flips
    np.testing.assert_allclose(np.asarray(C.dequantize(codes, scale, zero, 8)),
                               (rc - np.repeat(rz, 8, 0)) * np.repeat(rs, 8, 0), atol=0.2)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_and_awq_beat_rtn_on_output_error(act_order):
    x, w = _layer()
    h = C.hessian(x)
    err = lambda c, s, z: float(C.output_error(w, C.dequantize(c, s, z, 32), h))  # noqa: E731
    e_rtn = err(*C.rtn(w, 32))
    e_gptq = err(*C.gptq(w, h, group=32, act_order=act_order))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    if not act_order:
        s = np.asarray(C.awq_scale(w, h, np.abs(x).mean(0), group=32))
        c, sc, z = C.rtn(w * s[:, None], 32)
        e_awq = float(C.output_error(w, C.dequantize(c, sc, z, 32) / s[:, None], h))
        assert e_awq < e_rtn and not np.allclose(s, s[0])


def test_rtn_is_numpy_minmax_and_group_must_divide():
    _, w = _layer(n=16, out=4)
    codes, scale, zero = C.rtn(w, 8)
    g = w.reshape(2, 8, 4)
    lo, hi = np.minimum(g.min(1), 0), np.maximum(g.max(1), 0)
    np.testing.assert_allclose(np.asarray(scale), (hi - lo) / 15, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), np.round(-lo / ((hi - lo) / 15)))
    ref = np.clip(np.round(g / np.asarray(scale)[:, None]) + np.asarray(zero)[:, None], 0, 15)
    np.testing.assert_array_equal(np.asarray(codes), ref.reshape(16, 4))
    with pytest.raises(ConfigError, match="does not divide"):
        C.rtn(w, 12)
