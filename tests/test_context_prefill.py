"""Prefill under context parallelism: `jaxlm.generate` on (8 context) and (2 data x 4
context) rings the prompt (seq-sharded through every layer, K/V written into each
device's own block of the seq-sharded cache) and decodes against the sharded cache,
with the greedy ids and every step's logits of one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.infer import engine
from jaxlm.infer import generate as gen
from jaxlm.model.kv.contiguous import init_cache
from jaxlm.model import ModelConfig, init_params
from jaxlm.config import MeshConfig
from jaxlm.sharding.mesh import make_mesh
from jaxlm.sharding.rules import use_mesh

T, B, NEW = 64, 4, 8  # cache length (= the padded prompt under context), rows, new tokens
_BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
             max_seq_len=T, init_std=0.2, dtype="float32", param_dtype="float32")
MODELS = {"llama": ModelConfig(**_BASE), "window": ModelConfig(**_BASE, sliding_window=3)}
MESHES = {"context8": dict(data=1, context=8), "data2_context4": dict(data=2, context=4)}
PROMPTS = [[1 + i, 2, 3 + 2 * i, 9, 11, 4][: 2 + i % 5] + [7] * (i % 4) for i in range(B)]
RULES = MeshConfig().rules
_REF = {}


def reference(model):
    """(params, one-device generate output with every step's logits)."""
    if model not in _REF:
        cfg = MODELS[model]
        params = init_params(cfg, jax.random.PRNGKey(0))
        _REF[model] = params, gen.generate(params, cfg, PROMPTS, max_new_tokens=NEW,
                                           max_len=T, return_logits=True)
    return _REF[model]


def _f32_shapes(hlo):
    return set(re.findall(r"f32\[([\d,]*)\]", hlo))


@pytest.mark.parametrize("model,mesh_name", [(m, n) for m in MODELS for n in MESHES])
def test_prefill_rings_and_generate_matches_one_device(model, mesh_name, monkeypatch):
    cfg = MODELS[model]
    params, want = reference(model)
    sizes = MESHES[mesh_name]
    c, rows = sizes["context"], B // sizes["data"]
    kv = f"{cfg.n_kv_heads},{cfg.head_dim}"
    hlos = []
    real = engine._admit
    monkeypatch.setattr(engine, "_admit",  # the prefill generate runs, compiled for its HLO
                        lambda *a, **kw: hlos.append(real.lower(*a, **kw).compile().as_text())
                        or real(*a, **kw))
    with use_mesh(make_mesh(MeshConfig(**sizes)), RULES):
        cache = init_cache(cfg, B, T)
        assert cache["k"].sharding.spec[2] == "context"  # no device holds the whole cache
        out = gen.generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=T,
                           return_logits=True)
    hlo, = hlos  # one admission: every prompt padded to the cache length
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_array_equal(out.lengths, want.lengths)
    # step 0 is the prefill's next-token logits, the rest the decode's
    np.testing.assert_allclose(out.logits[:, 0], want.logits[:, 0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    # per device: T / c tokens of hidden states and of K/V in every layer, the K/V
    # chunks move by collective-permute (the ring); no array holds the whole sequence
    shapes = _f32_shapes(hlo)
    assert "collective-permute" in hlo and "all-gather" not in hlo
    assert f"{rows},{T // c},{cfg.d_model}" in shapes and f"{rows},{T // c},{kv}" in shapes
    for b in (rows, B):
        assert f"{b},{T},{cfg.d_model}" not in shapes and f"{b},{T},{kv}" not in shapes
        assert f"{cfg.n_layers},{b},{T},{kv}" not in shapes


def test_decode_against_the_seq_sharded_cache_stays_partitioned():
    """One query against the cache sharded over context: XLA partitions the softmax
    (all-reduces), never gathers the cache; the greedy ids are one device's."""
    cfg = MODELS["llama"]
    params, want = reference("llama")
    hlos = []
    real = engine._run
    with use_mesh(make_mesh(MeshConfig(data=1, context=8)), RULES), pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_run",  # the decode loop generate runs, compiled for its HLO
                   lambda *a, **kw: hlos.append(real.lower(*a, **kw).compile().as_text())
                   or real(*a, **kw))
        out = gen.generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=T)
    hlo = hlos[0]
    kv = f"{cfg.n_kv_heads},{cfg.head_dim}"
    shapes = _f32_shapes(hlo)
    assert f"{cfg.n_layers},{B},{T // 8},{kv}" in shapes  # each device: 1/8 of the cache
    assert "all-reduce" in hlo and "all-gather" not in hlo
    assert not any(f",{T},{kv}" in s or s.startswith(f"{B},{T},") for s in shapes), shapes
    np.testing.assert_array_equal(out.tokens, want.tokens)


def test_cache_length_not_dividing_over_context_is_one_line():
    cfg = MODELS["llama"]
    params, _ = reference("llama")
    with use_mesh(make_mesh(MeshConfig(data=1, context=8)), RULES), pytest.raises(
            ConfigError, match=r"max_len=60 does not divide over mesh.context=8"):
        gen.generate(params, cfg, PROMPTS, max_new_tokens=NEW, max_len=60)


def test_int8_cache_prefilled_by_the_ring():
    """kv_dtype=int8: the ring attends the dequantized K/V its layer wrote (as the
    ordinary prefill does), so the greedy ids and logits are one device's."""
    cfg = MODELS["llama"]
    params, _ = reference("llama")
    kw = dict(max_new_tokens=NEW, max_len=T, return_logits=True, kv_dtype="int8")
    want = gen.generate(params, cfg, PROMPTS, **kw)
    with use_mesh(make_mesh(MeshConfig(data=2, context=4)), RULES):
        out = gen.generate(params, cfg, PROMPTS, **kw)
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_allclose(out.logits, want.logits, atol=1e-5, rtol=1e-5)
