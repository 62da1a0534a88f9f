"""generate.kv_dtype = int8 | int4 | fp8: each format against a numpy reference of it,
decoding over each close to the float cache with the contiguous cache and the paged pool
giving the same tokens, the latent cache (model.mla) over each, and the bytes per cached
value asserted on the sharded arrays."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxlm
from jaxlm.errors import ConfigError
from jaxlm.model.kv import init_cache, init_pages
from jaxlm.model.kv.quant import FORMATS, dequantize, quantize
from jaxlm.sharding.rules import use_mesh
from tiny_models import GPT2, LLAMA

FMTS = ("int8", "int4", "fp8")
TOP = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def np_quantize(x, fmt, s=None):
    """The numpy reference: symmetric absmax per last-dim vector; int4 as nibbles
    q + 8, element 2j low, 2j + 1 high; fp8 by ml_dtypes' float8_e4m3fn cast.
    s: the scales to use (default absmax / top, 1 for a zero vector)."""
    x = np.asarray(x, np.float32)
    if s is None:
        s = (np.abs(x).max(-1) / np.float32(TOP[fmt])).astype(np.float32)
        s[s == 0] = 1
    y = x / s[..., None]
    if fmt == "fp8":
        return y.astype(ml_dtypes.float8_e4m3fn), s
    q = np.clip(np.rint(y), -TOP[fmt], TOP[fmt])
    if fmt == "int8":
        return q.astype(np.int8), s
    c = (q + 8).astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8), s


def np_dequantize(q, s, fmt):
    q = np.asarray(q)
    if fmt == "int4":
        codes = np.empty(q.shape[:-1] + (2 * q.shape[-1],), np.float32)
        codes[..., 0::2], codes[..., 1::2] = q & 15, q >> 4
        return (codes - 8) * s[..., None]
    return q.astype(np.float32) * s[..., None]


@pytest.mark.parametrize("fmt", FMTS)
def test_each_format_equals_its_numpy_reference(fmt):
    """quantize gives numpy's scales (to an ulp: XLA divides by 127 as a product with
    its reciprocal; a zero vector: scale 1) and, given them, numpy's values bit for
    bit; dequantize of every storable value equals numpy's unpacking times the scale."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 2, 16)).astype(np.float32) * rng.uniform(0.01, 50, (3, 5, 2, 1))
    x[0, 0, 0] = 0
    x[1, 1, 1, 3] = 1e4  # one outlier: the rest of its vector rounds to small codes
    q, s = quantize(jnp.asarray(x), fmt)
    assert q.dtype == FORMATS[fmt].dtype and q.shape == x.shape[:-1] + (16 // FORMATS[fmt].per_byte,)
    np.testing.assert_allclose(np.asarray(s), np_quantize(x, fmt)[1], rtol=2e-7)
    want_q, want_s = np_quantize(x, fmt, np.asarray(s))
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))
    if fmt == "fp8":  # every finite E4M3 value
        every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        stored = every[np.isfinite(every.astype(np.float32))].reshape(-1, 2)
    else:  # every byte (int4: each nibble pair, 0 = -8 included)
        stored = np.arange(-128 if fmt == "int8" else 0, 128 if fmt == "int8" else 256
                           ).astype(FORMATS[fmt].dtype).reshape(-1, 2)
    scale = rng.uniform(0.1, 3, stored.shape[0]).astype(np.float32)
    got = dequantize(jnp.asarray(stored), jnp.asarray(scale), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np_dequantize(stored, scale, fmt))
    # and the round trip is within the format's step of x
    back = np.asarray(dequantize(q, s, jnp.float32))
    step = {"int8": 0.5, "int4": 0.5, "fp8": 16.0}[fmt]  # E4M3 near 448: steps of 32
    assert np.all(np.abs(back - x) <= step * want_s[..., None] * (1 + 1e-6))


P8 = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [3, 3, 3, 3, 5, 6]]
NEW = 12
# the largest logit error before greedy paths part, relative to the largest |logit|, and
# the share of greedy tokens equal to the float cache's (tiny random models, a scale
# per 8 or 16 values; measured, jax 0.10.2 CPU: int8 <= 2.3% and 1.0, fp8 <= 10% and
# >= 0.70, int4 <= 22% and >= 0.37: 15 levels per vector part greedy paths early)
LIMITS = {"int8": (0.03, 0.75), "fp8": (0.15, 0.5), "int4": (0.3, 0.3)}


@pytest.fixture(scope="module")
def llama():
    params = jaxlm.init_params(LLAMA, jax.random.key(0))
    ref = jaxlm.generate(params, LLAMA, P8, max_new_tokens=NEW, return_logits=True)
    return params, ref


def _close(out, ref, limits):
    err, share = limits
    for r in range(len(P8)):  # the steps whose contexts are still the same tokens
        parted = np.flatnonzero(ref.tokens[r] != out.tokens[r])
        n = NEW if parted.size == 0 else int(parted[0]) + 1
        e = np.max(np.abs(out.logits[r, :n] - ref.logits[r, :n]))
        assert e <= err * np.max(np.abs(ref.logits[r, :n])), (r, e)
    assert np.mean(out.tokens == ref.tokens) >= share


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_close_to_float_and_paged_equals_contiguous(llama, fmt):
    """The engine over each kv_dtype stays close to the float cache (LIMITS), and its
    paged pool (pages of 4, 2 slots: rows admitted as others finish) gives the
    contiguous cache's tokens and logits: the same values written, the same read."""
    params, ref = llama
    kw = dict(max_new_tokens=NEW, return_logits=True, kv_dtype=fmt)
    contiguous = jaxlm.generate(params, LLAMA, P8, **kw)
    _close(contiguous, ref, LIMITS[fmt])
    paged = jaxlm.generate(params, LLAMA, P8, cache="paged", slots=2, page_size=4, **kw)
    assert paged.tokens.tolist() == contiguous.tokens.tolist()
    np.testing.assert_allclose(paged.logits, contiguous.logits, atol=1e-5)


@pytest.fixture(scope="module")
def mla():
    from jaxlm.model.config import MlaConfig
    cfg = dataclasses.replace(LLAMA, n_kv_heads=4, head_dim=12, mla=MlaConfig(
        q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    params = jaxlm.init_params(cfg, jax.random.key(1))
    return cfg, params, jaxlm.generate(params, cfg, P8, max_new_tokens=NEW, return_logits=True)


@pytest.mark.parametrize("fmt,cache", [("int8", "paged"), ("int4", "contiguous"),
                                       ("fp8", "paged")])
def test_latent_cache_in_each_format(mla, fmt, cache):
    """Latent attention's cache (one "k" of kv_lora_rank + qk_rope_head_dim per token)
    in each format, quantized as one vector per token: close to the float cache."""
    cfg, params, ref = mla
    out = jaxlm.generate(params, cfg, P8, max_new_tokens=NEW, return_logits=True,
                         kv_dtype=fmt, cache=cache, slots=2, page_size=4)
    _close(out, ref, LIMITS[fmt])


def _bytes(tree) -> int:
    """Bytes on the devices: every addressable shard of every leaf."""
    return sum(s.data.nbytes for x in tree.values() for s in x.addressable_shards)


def test_bytes_per_value_on_eight_devices():
    """Contiguous cache and page pool on 4 data x 2 tensor devices: the K/V values and
    scales sharded over batch / pages (data) and kv_heads (tensor) as the rules say,
    nothing replicated, and bytes per cached value within 2% of the format's
    (values + a float32 scale per D = 64 values)."""
    cfg = dataclasses.replace(LLAMA, head_dim=64)
    assert cfg.head_dim == 64
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    rules = (("batch", ("data",)), ("kv_heads", ("tensor",)))
    values = 2 * cfg.n_layers * 8 * 32 * cfg.n_kv_heads * cfg.head_dim  # k and v
    with use_mesh(mesh, rules):
        for fmt in ("auto",) + FMTS:
            want = 4.0 if fmt == "auto" else FORMATS[fmt].bytes_per_value + 4 / cfg.head_dim
            cache = init_cache(cfg, 8, 32, kv_dtype=fmt)
            pool = init_pages(cfg, 8 * 32 // 4, 4, slots=8, kv_dtype=fmt)
            for tree in (cache, pool):  # [layers, batch | pages, seq | page, kv_heads(, D)]
                for n in ("k", "v") + (("k_scale", "v_scale") if fmt != "auto" else ()):
                    spec = tuple(tree[n].sharding.spec) + (None,) * 5
                    assert spec[:5] == (None, "data", None, "tensor", None), (fmt, n, spec)
                    assert len(tree[n].addressable_shards) == 8
                kv = {n: x for n, x in tree.items() if n != "lengths"}
                got = _bytes(kv) / values
                assert abs(got - want) <= 0.02 * want, (fmt, got, want)
            if fmt == "int4":
                assert cache["k"].dtype == jnp.uint8 and cache["k"].shape[-1] == 32


def test_bad_kv_dtype_is_one_line():
    from jaxlm.config import GenerateConfig
    with pytest.raises(ConfigError, match=r"^generate.kv_dtype='int2' is not one of auto, int8, "
                                          r"int4, fp8 \(did you mean 'int8'\?\)$"):
        GenerateConfig(kv_dtype="int2")
    with pytest.raises(ConfigError, match="generate.kv_dtype='int3' is not one of"):
        init_cache(LLAMA, 1, 8, kv_dtype="int3")
    odd = dataclasses.replace(GPT2, head_dim=9)  # learned positions: any head size
    with pytest.raises(ConfigError, match="kv_dtype=int4 packs 2 values per byte: the cached "
                                          "head size 9"):
        init_pages(odd, 4, 4, kv_dtype="int4")
