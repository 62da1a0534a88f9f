"""Ring attention with the Pallas flash kernels per chunk (impl=pallas; GPU
lowering in interpret mode here) against the XLA ring and the single-device
XLA reference, forward and gradients; and the flash pair that it is built on
(`flash_forward` -> (out, lse), `flash_backward` with the global lse / delta)
against the reference, split over key chunks as the ring splits them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import MeshConfig
from jaxlm.model.kernels import MaskSpec, attention, flash
from jaxlm.model.kernels.dispatch import ring_impl
from jaxlm.model.kernels.flash import BlockSizes, flash_backward, flash_delta, flash_forward
from jaxlm.model.kernels.reference import attention_reference
from jaxlm.model.kernels.ring import _merge, ring_attention
from kernel_cases import (INTERPRET, kernel_backends, packed_segments,
                                         random_qkv)
from jaxlm.sharding.context import balanced_order
from jaxlm.sharding.mesh import make_mesh
from jaxlm.sharding.rules import use_mesh

RULES = MeshConfig().rules
TOL = 1e-5  # float32, inputs ~ N(0, 1)


def _reference_lse(q, k, mask, softcap):
    """[B,H,Sq] log-sum-exp of the reference's scores over the visible keys
    (numpy, float64; -inf for a row with none)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    g = q.shape[2] // k.shape[2]
    s = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, g, axis=2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    ok = np.asarray(mask.visible(q.shape[1], k.shape[1]))[:, None]
    s = np.where(ok, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(s - m).sum(-1, keepdims=True)) + m)[..., 0]


@pytest.mark.parametrize("backend", kernel_backends())
def test_flash_pair_over_key_chunks_matches_reference(backend):
    """flash_forward's lse is the reference's log-sum-exp; two key chunks folded
    by `_merge` give the reference output; flash_backward per chunk with the
    global lse and delta gives dq summed over the chunks and each chunk's
    dk / dv exactly. Packed documents, a padding tail (rows that see nothing:
    out 0, lse -inf, no NaN), GQA, a soft cap; the chunk cut (24) is not a
    multiple of the blocks (GPU 16, TPU 128), so the chunks are padded inside
    the kernels. Both lowerings (the TPU one is head-major inside)."""
    b, s, h, kvh, d, cut, softcap = 2, 40, 2, 1, 16, 24, 3.0
    q, k, v, do = random_qkv(jax.random.key(0), b, s, s, h, kvh, d)
    seg, pos = packed_segments(b, s, [[20, 20], [12, 16]])  # row 1: padding from 28 on
    mask = MaskSpec(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                    kv_segment_ids=seg)
    kw = dict(softcap=softcap, backend=backend, interpret=INTERPRET,  # Mosaic: 128-multiples
              block_sizes=BlockSizes.uniform(128 if backend == "tpu" else 16))
    chunks = [slice(0, cut), slice(cut, s)]

    def chunk_mask(sl):
        return mask._replace(kv_positions=pos[:, sl], kv_segment_ids=seg[:, sl])

    @jax.jit
    def run(q, k, v, do):
        whole = flash_forward(q, k, v, mask, **kw)
        parts = [flash_forward(q, k[:, sl], v[:, sl], chunk_mask(sl), **kw) for sl in chunks]
        out, lse = _merge(*parts)
        delta = flash_delta(out, do)
        grads = [flash_backward(q, k[:, sl], v[:, sl], chunk_mask(sl), do, lse, delta, **kw)
                 for sl in chunks]
        dq = grads[0][0] + grads[1][0]
        dk, dv = (jnp.concatenate([g[i] for g in grads], axis=1) for i in (1, 2))
        return whole, (out, lse), (dq, dk, dv)

    (w_out, w_lse), (out, lse), grads = run(q, k, v, do)
    ref, pull = jax.vjp(lambda q, k, v: attention_reference(q, k, v, mask, softcap=softcap),
                        q, k, v)
    want_lse = _reference_lse(q, k, mask, softcap)
    assert w_lse.shape == (b, h, s) and w_lse.dtype == jnp.float32
    assert np.isneginf(want_lse[1, :, 28:]).all()
    for got_out, got_lse in ((w_out, w_lse), (out, lse)):
        np.testing.assert_allclose(got_out, ref, atol=TOL)
        np.testing.assert_allclose(got_lse, want_lse, atol=TOL)  # -inf where want is
        np.testing.assert_array_equal(got_out[1, 28:], 0)
    for name, g, r in zip(("dq", "dk", "dv"), grads, pull(do)):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, atol=TOL, err_msg=name)


def _balanced_packed_mask(s, context, window):
    """Packed documents with a padding tail on row 1, in the load-balanced order."""
    seg, pos = packed_segments(2, s, [[50, 60, 18], [40, 70]])  # row 1: padding from 110
    order = balanced_order(s, context)
    pos, seg = pos[:, order], seg[:, order]
    return MaskSpec(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                    kv_segment_ids=seg, window=window)


def _balanced_causal_mask(s, context):
    pos = jnp.asarray(balanced_order(s, context))[None].repeat(2, 0)
    return MaskSpec(causal=True, q_positions=pos, kv_positions=pos)


# name -> (sequence, mask, soft cap, flash blocks: None = through attention(impl=...))
CASES = {
    # attention() dispatch, the load-balanced causal order, one flash block per chunk
    "causal_balanced": lambda: (64, _balanced_causal_mask(64, 4), None, None),
    # array order: the chunks above a device's own are hidden entirely (lax.cond skips them)
    "causal_array_order": lambda: (64, MaskSpec(causal=True), None, None),
    # packed + padding + window + soft cap, 16-blocks inside 32-chunks (in-chunk skipping)
    "packed_window_softcap": lambda: (128, _balanced_packed_mask(128, 4, 24), 3.0,
                                      BlockSizes.uniform(16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ring_flash_matches_xla_ring_and_reference(name, monkeypatch):
    """On data 2 x context 4: the flash ring's output and dq / dk / dv equal the
    XLA ring's and one device's (<= 1e-5), and the flash kernels really run
    per chunk (counted while tracing) on the pallas path and only there."""
    s, mask, softcap, blocks = CASES[name]()
    mesh = make_mesh(MeshConfig(data=2, context=4))
    q, k, v, w = random_qkv(jax.random.key(1), 2, s, s, 2, 1, 16)
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = flash.flash_forward, flash.flash_backward

    def counted(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(flash, "flash_forward", counted("fwd", real_fwd))
    monkeypatch.setattr(flash, "flash_backward", counted("bwd", real_bwd))

    def loss(q, k, v, impl):
        if impl == "reference":
            o = attention_reference(q, k, v, mask, softcap=softcap)
        else:
            with use_mesh(mesh, RULES):
                if blocks is None or impl == "xla":
                    o = attention(q, k, v, mask, impl=impl, softcap=softcap)
                else:
                    o = ring_attention(q, k, v, mask, softcap=softcap, impl=impl,
                                       flash_blocks=blocks)
        return jnp.sum(o * w), o

    results = {}
    for impl in ("reference", "xla", "pallas"):
        before = dict(calls)
        (_, out), grads = jax.jit(jax.value_and_grad(
            lambda *a: loss(*a, impl), (0, 1, 2), has_aux=True))(q, k, v)
        results[impl] = (out, *grads)
        ran = calls["fwd"] > before["fwd"] and calls["bwd"] > before["bwd"]
        assert ran == (impl == "pallas"), (impl, calls)
    for impl in ("xla", "pallas"):
        for what, got, want in zip(("out", "dq", "dk", "dv"), results[impl],
                                   results["reference"]):
            assert np.isfinite(got).all(), (impl, what)
            np.testing.assert_allclose(got, want, atol=TOL, err_msg=f"{impl} {what}")
    np.testing.assert_allclose(results["pallas"][0], results["xla"][0], atol=TOL)


def test_ring_impl_follows_attention_impl():
    """pallas (and an explicit cudnn, which falls back to it) -> flash per chunk;
    xla, and auto on CPU -> the XLA tiles."""
    assert ring_impl("pallas") == "pallas"
    assert ring_impl("xla") == "xla" and ring_impl("auto") == "xla"
    with pytest.raises(ValueError, match="ring attention impl"):
        ring_attention(*random_qkv(jax.random.key(2), 1, 8, 8, 1, 1, 8)[:3], MaskSpec(),
                       impl="cudnn")
