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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_awq_folding_keeps_the_float_model(family, request):
    """AWQ's scales folded into the op before (ln1 / ln2 incl. LayerNorm's bias, v under
    GQA, up) and multiplied into the weights' rows: before rounding, the same model."""
    import jax
    import jax.numpy as jnp

    from jaxlm.model import calibration as CB
    from jaxlm.model.families import forward
    cfg, params = request.getfixturevalue(f"tiny_{family}")
    rng = np.random.default_rng(0)

    class Sink:  # statistics that give every set a scale far from 1
        h, abs, n = {}, {}, {}
    layers = []
    n = params["layers"]["attn"]["q"].shape[0]
    folded_sets = set()
    for i in range(n):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        for sub, names, prev in CB._sets(layer):
            k = int(np.prod(layer[sub][names[0]].shape[:CB._n_in(sub, names[0])]))
            key = f"{sub}/{names[0]}"
            x = rng.normal(size=(64, k)) * rng.uniform(0.1, 10, k)
            Sink.h[key], Sink.abs[key], Sink.n[key] = x.T @ x, np.abs(x).sum(0), 64
            if CB._foldable(layer, sub, prev, cfg):
                before = layer
                layer = CB._awq(layer, sub, names, prev, Sink, 16, cfg)
                assert not np.allclose(layer[sub][names[0]], before[sub][names[0]])
                folded_sets.add(prev)
        layers.append(layer)
    # GPT-2's GELU MLP: nothing to fold down's scale into
    assert folded_sets == {"ln1", "v", "ln2", "up"} - ({"up"} if family == "gpt2" else set())
    folded = {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    np.testing.assert_allclose(np.asarray(forward(folded, cfg, tokens)[0]),
                               np.asarray(forward(params, cfg, tokens)[0]), rtol=2e-4, atol=2e-4)
