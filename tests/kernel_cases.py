"""Helpers to check a kernel against the XLA reference (used by tests and benchmarks)."""

from __future__ import annotations

import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.model.kernels.reference import attention_reference

# Kernel tests pass `interpret=INTERPRET`. By default that is True: the kernels
# run in interpret mode everywhere (CI, CPU). With JAXLM_KERNELS_COMPILED=1 it is
# None, which resolve_backend turns into "compile on the platform's own
# lowering, interpret only on CPU": the same tests then run the compiled
# Triton / Mosaic kernels on a GPU / TPU (benchmarks/gpu_check.sh sets it).
COMPILED_ENV = "JAXLM_KERNELS_COMPILED"
COMPILED = os.environ.get(COMPILED_ENV) == "1"
INTERPRET = None if COMPILED else True


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def kernel_backends() -> list[str]:
    """The Pallas lowerings a test can run here: both (interpreted) on CPU, the
    platform's own on a GPU or TPU (the other lowering cannot run there)."""
    return [jax.default_backend()] if on_accelerator() else ["gpu", "tpu"]


# (output atol, output rtol, gradient atol, gradient rtol), inputs ~ N(0, 1)
TOLERANCE = {
    jnp.dtype(jnp.float32): (2e-5, 2e-5, 1e-4, 1e-4),
    jnp.dtype(jnp.bfloat16): (3e-2, 3e-2, 1e-1, 5e-2),
}


def random_qkv(key, b, sq, sk, h, kvh, d, dtype=jnp.float32):
    kq, kk, kv, ko = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, sq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, sk, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, sk, kvh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ko, (b, sq, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def packed_segments(b: int, s: int, lengths) -> tuple[jax.Array, jax.Array]:
    """Segment ids [B,S] (1, 2, ... per document, 0 = padding after the last
    document) and positions restarting at 0 in every document."""
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        start = 0
        for n, length in enumerate(lengths[r % len(lengths)], 1):
            seg[r, start:start + length] = n
            pos[r, start:start + length] = np.arange(length)
            start += length
        pos[r, start:] = np.arange(s - start)
    return jnp.asarray(seg), jnp.asarray(pos)


def vjp_both(fn, q, k, v, do, bias=None, mask: MaskSpec = MaskSpec(), **kw):
    """(kernel out, kernel grads, reference out, reference grads), each side one
    jitted forward + backward; the reference runs in float32 on the same
    (rounded) inputs."""
    def kernel(q, k, v, bias):
        return fn(q, k, v, mask, bias, **kw)

    def ref(q, k, v, bias):
        return attention_reference(q, k, v, mask, bias=bias, scale=kw.get("scale"),
                                   softcap=kw.get("softcap"))

    def run(f, args, do):
        out, pull = jax.vjp(f, *args)
        return out, pull(do)

    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    out, grads = jax.jit(lambda a, do: run(kernel, a, do))((q, k, v, bias), do)
    r_out, r_grads = jax.jit(lambda a, do: run(ref, a, do))(f32((q, k, v, bias)),
                                                            do.astype(jnp.float32))
    return out, grads, r_out, r_grads


def assert_close(out, grads, r_out, r_grads, dtype, names=("dq", "dk", "dv", "dbias")):
    oa, orl, ga, grl = TOLERANCE[jnp.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(r_out), atol=oa, rtol=orl,
                               err_msg="output")
    for name, g, r in zip(names, grads, r_grads):
        if g is None and r is None:
            continue
        g, r = np.asarray(g, np.float32), np.asarray(r)
        assert np.isfinite(g).all(), f"{name} has non-finite values"
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, atol=ga * scale, rtol=grl, err_msg=name)


# Shared case table of the kernel tests: shapes with odd lengths (1, 37, 130),
# head dims 64 / 128, GQA groups 1 / 2 / 4 / 8, windows, packed segments with
# padding, cross attention, biases, soft-capping, fill levels.
FLASH_CASES = {
    "causal_len37_mha_d64": dict(b=2, sq=37, sk=37, h=2, kvh=2, d=64, causal=True),
    "causal_len130_gqa8_d128": dict(b=1, sq=130, sk=130, h=8, kvh=1, d=128, causal=True),
    "full_len1_gqa4": dict(b=2, sq=1, sk=37, h=4, kvh=1, d=64),
    "window9_gqa4": dict(b=1, sq=70, sk=70, h=4, kvh=1, d=64, causal=True, window=9),
    "packed_segments_gqa2": dict(b=2, sq=64, sk=64, h=4, kvh=2, d=64, causal=True,
                                 packed=[[20, 30], [64]]),
    "cross_segments": dict(b=2, sq=37, sk=70, h=2, kvh=2, d=64, cross=True),
    "bias_grad_window": dict(b=2, sq=37, sk=37, h=4, kvh=2, d=64, causal=True, window=16,
                             bias=1),
    "bias_per_batch_softcap": dict(b=2, sq=40, sk=40, h=2, kvh=1, d=64, bias=2, softcap=5.0),
    "prefill_fill_levels": dict(b=3, sq=16, sk=64, h=4, kvh=1, d=64, prefill=[0, 10, 48]),
    "empty_rows_kv_lengths": dict(b=2, sq=37, sk=70, h=2, kvh=2, d=64, kv_lengths=[0, 50]),
    "bf16_causal_gqa4_d128": dict(b=1, sq=130, sk=130, h=4, kvh=1, d=128, causal=True,
                                  dtype=jnp.bfloat16),
}


def flash_case(name: str, key=None):
    """-> (q, k, v, do, bias, mask, kwargs) of a FLASH_CASES entry."""
    p = FLASH_CASES[name]
    b, sq, sk, h = p["b"], p["sq"], p["sk"], p["h"]
    key = jax.random.key(zlib.crc32(name.encode())) if key is None else key
    q, k, v, do = random_qkv(key, b, sq, sk, h, p["kvh"], p["d"], p.get("dtype", jnp.float32))
    mask = MaskSpec(causal=p.get("causal", False), window=p.get("window"))
    if "packed" in p:
        seg, pos = packed_segments(b, sq, p["packed"])
        mask = mask._replace(q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                             kv_segment_ids=seg)
    if p.get("cross"):  # encoder-decoder style: segment ids on both sides, different lengths
        q_seg, _ = packed_segments(b, sq, [[20, 17], [30]])
        k_seg, _ = packed_segments(b, sk, [[40, 30], [50]])
        mask = mask._replace(q_segment_ids=q_seg, kv_segment_ids=k_seg)
    if "prefill" in p:  # a chunk of sq tokens written after `fill` cached ones
        fill = jnp.asarray(p["prefill"], jnp.int32)
        mask = MaskSpec(causal=True, q_positions=fill[:, None] + jnp.arange(sq)[None],
                        kv_positions=jnp.arange(sk)[None], kv_lengths=fill + sq)
    if "kv_lengths" in p:
        mask = mask._replace(kv_lengths=jnp.asarray(p["kv_lengths"], jnp.int32))
    bias = None
    if "bias" in p:
        bias = jax.random.normal(jax.random.fold_in(key, 7), (p["bias"], h, sq, sk), jnp.float32)
    kwargs = {"softcap": p["softcap"]} if "softcap" in p else {}
    return q, k, v, do, bias, mask, kwargs
