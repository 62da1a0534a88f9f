"""Decode attention (GPU kernel in interpret mode, TPU kernel in TPU interpret
mode) against the XLA reference, and the kernels inside the model: a forward
and a generation with attention_impl="pallas" equal the XLA ones.

Tolerances: float32 2e-5, bfloat16 3e-2 (reference in float32 on the same inputs).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.infer.generate import generate
from jaxlm.model import ModelConfig, forward, init_params
from jaxlm.model.kernels import MaskSpec
from jaxlm.model.kernels.decode import combine, decode_attention
from jaxlm.model.kernels.backends import ENV_BACKEND
from jaxlm.model.kernels.reference import attention_reference
from kernel_cases import INTERPRET, kernel_backends, packed_segments, random_qkv

BACKENDS = kernel_backends()
DECODE_CASES = {  # lengths 1 and max, GQA groups 1 / 4 / 8, head dims 64 / 128
    "gqa4_len1_and_max_3splits": dict(b=3, t=64, h=8, kvh=2, d=64, lengths=[1, 64, 30], splits=3),
    "mha_d128_window_kv_positions": dict(b=2, t=48, h=4, kvh=4, d=128, lengths=[48, 20], window=8,
                                         kv_positions=True, splits=2),
    "gqa8_softcap_odd_cache_len": dict(b=2, t=40, h=8, kvh=1, d=64, lengths=[1, 40], softcap=5.0),
    "empty_sequence": dict(b=2, t=32, h=2, kvh=1, d=64, lengths=[0, 7]),
    "bf16_gqa4": dict(b=2, t=64, h=4, kvh=1, d=128, lengths=[33, 64], splits=2, dtype=jnp.bfloat16),
}


def decode_case(p, key=jax.random.key(5)):
    lengths = jnp.asarray(p["lengths"], jnp.int32)
    q, k, v, _ = random_qkv(key, p["b"], 1, p["t"], p["h"], p["kvh"], p["d"],
                            p.get("dtype", jnp.float32))
    mask = MaskSpec(causal=True, q_positions=(lengths - 1)[:, None], kv_lengths=lengths,
                    window=p.get("window"),
                    kv_positions=jnp.arange(p["t"])[None] if p.get("kv_positions") else None)
    return q, k, v, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_reference(name, backend):
    p = DECODE_CASES[name]
    q, k, v, mask = decode_case(p)
    out = jax.jit(lambda q, k, v: decode_attention(
        q, k, v, mask, backend=backend, interpret=INTERPRET, block_k=16,
        num_splits=p.get("splits"), softcap=p.get("softcap")))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    ref = attention_reference(f32(q), f32(k), f32(v), mask, softcap=p.get("softcap"))
    tol = 3e-2 if q.dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol, rtol=tol)
    if p["lengths"][0] == 0:
        assert not np.asarray(out[0]).any()  # a sequence with no visible key: zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_reads_only_blocks_below_length(backend):
    """Cache blocks past each length hold NaN (reading one would poison the row)."""
    q, k, v, mask = decode_case(dict(b=2, t=64, h=4, kvh=2, d=64, lengths=[20, 5]))
    hidden = jnp.arange(64)[None, :, None, None] >= jnp.array([32, 16])[:, None, None, None]
    poison = lambda x: jnp.where(hidden, jnp.nan, x)
    out = decode_attention(q, poison(k), poison(v), mask, backend=backend, interpret=INTERPRET,
                           block_k=16, num_splits=2)
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask), atol=2e-5)


def test_combine_splits():
    """Split results merged by log-sum-exp equal one softmax over all keys; empty splits weigh 0."""
    s = jax.random.normal(jax.random.key(0), (2, 12))
    vals = jax.random.normal(jax.random.key(1), (12, 3))
    parts = s.reshape(2, 3, 4)  # 3 splits of 4 keys
    lse = jax.nn.logsumexp(parts, -1).at[:, 1].set(-jnp.inf)
    o = jnp.einsum("bsk,skd->bsd", jax.nn.softmax(parts, -1), vals.reshape(3, 4, 3))
    keep = jnp.concatenate([s[:, :4], s[:, 8:]], -1)
    want = jax.nn.softmax(keep, -1) @ jnp.concatenate([vals[:4], vals[8:]])
    got = combine(o[:, :, None], lse[:, :, None])[:, 0]  # G = 1
    np.testing.assert_allclose(got, want, atol=1e-6)


# ------------------------------------------------------------ inside the model

CFG = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_seq_len=128, init_std=0.2, dtype="float32", param_dtype="float32",
                  remat="full", attention_impl="xla")
PALLAS = dataclasses.replace(CFG, attention_impl="pallas")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_forward_pallas_matches_xla(params, backend, monkeypatch):
    """A packed batch (segments, restarting positions) through the decoder."""
    monkeypatch.setenv(ENV_BACKEND, backend)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, CFG.vocab_size)
    seg, pos = packed_segments(2, 40, [[15, 20], [40]])
    run = lambda cfg: jax.jit(lambda p, t: forward(p, cfg, t, pos, seg)[0])(params, tokens)
    np.testing.assert_allclose(run(PALLAS), run(CFG), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (CPU: forced host devices)")
def test_model_gradient_per_shard_under_mesh(params, monkeypatch):
    """Under a data x fsdp x tensor mesh the kernel runs in shard_map (batch and
    heads split), with the same gradient as the XLA reference."""
    from jaxlm.config import MeshConfig
    from jaxlm.model.kernels import per_shard
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import named_sharding, use_mesh
    from jaxlm.train.step import loss_fn

    specs = []
    real = jax.shard_map
    monkeypatch.setattr(per_shard.jax, "shard_map",
                        lambda *a, **kw: specs.append(kw["in_specs"][0]["q"]) or real(*a, **kw))
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.rules
    tokens = jax.random.randint(jax.random.key(3), (4, 40), 0, CFG.vocab_size)
    seg, pos = packed_segments(4, 40, [[15, 20], [40]])
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "positions": pos,
             "segment_ids": seg, "loss_mask": (seg > 0).astype(jnp.float32)}
    grads = []
    with use_mesh(mesh, rules):
        batch = jax.device_put(batch, named_sharding(mesh, ("batch", "seq"), rules))
        for cfg in (CFG, PALLAS):
            grads.append(jax.jit(jax.grad(lambda p, b: loss_fn(p, cfg, b)[0]))(params, batch))
    assert specs and specs[0][2] == "tensor" and "data" in specs[0][0]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_decode_gradient_is_the_reference_gradient():
    q, k, v, mask = decode_case(DECODE_CASES["gqa4_len1_and_max_3splits"])
    grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), (0, 1, 2))(q, k, v)
    got = grad(lambda q, k, v: decode_attention(q, k, v, mask, block_k=16))
    want = grad(lambda q, k, v: attention_reference(q, k, v, mask))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_generate_pallas_matches_xla(params):
    """Prefill (flash kernel with cache lengths) + decode loop (decode kernel)."""
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [40]]
    a = generate(params, CFG, prompts, max_new_tokens=8, return_logits=True)
    b = generate(params, PALLAS, prompts, max_new_tokens=8, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)
