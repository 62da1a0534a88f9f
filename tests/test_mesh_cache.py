"""The explicit mesh (jit keys on mesh and rules) and the KV cache created sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.infer import engine
from jaxlm.infer import generate as gen
from jaxlm.model.kv.contiguous import _zeros_fn, cache_bytes, cache_shapes, cache_shardings, init_cache
from tiny_models import LLAMA as CFG
from jaxlm.sharding.rules import active_mesh, constrain, use_mesh

RULES = (("batch", ("data",)), ("embed", ("tensor",)), ("kv_heads", ("tensor",)),
         ("heads", ("tensor",)))
PROMPTS = [[1 + i, 2, 3 + 2 * i][: 1 + i % 3] + [7] * (i % 4) for i in range(8)]
NEW = 12


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))


def _spec(x):
    return x.sharding.spec if isinstance(x.sharding, NamedSharding) else None


def test_jit_keys_on_the_mesh_and_the_rules(mesh):
    traces = []

    @jax.jit
    def f(x):
        traces.append(active_mesh() is not None)
        return constrain(x * 2, ("batch", "embed"))

    x = jnp.ones((8, 4))
    assert _spec(f(x)) in (None, P())  # traced outside: no constraint
    with use_mesh(mesh, RULES):
        assert _spec(f(x)) == P("data", "tensor")  # same jit object: retraced inside
        assert _spec(f(x)) == P("data", "tensor")
    with use_mesh(mesh, RULES[:1]):  # same mesh, other rules: retraced
        assert _spec(f(x)) == P("data")
    assert _spec(f(x)) in (None, P())
    assert traces == [False, True, True]  # the outside trace is reused, not re-made

    g = jax.jit(lambda x: constrain(x + 1, ("batch", "embed")))
    with use_mesh(mesh, RULES):  # the reverse: traced inside first
        assert _spec(g(x)) == P("data", "tensor")
    y = g(x)
    assert _spec(y) in (None, P()) and len(y.sharding.device_set) == 1
    np.testing.assert_array_equal(y, x + 1)


def _assert_eighths(cache):
    for name in ("k", "v"):
        leaf = cache[name]
        shards = leaf.addressable_shards
        assert len(shards) == 8
        assert {s.data.nbytes for s in shards} == {leaf.nbytes // 8}, name


@pytest.fixture(scope="module")
def params(tiny_llama):
    return tiny_llama.params


def test_cache_is_created_prefilled_and_decoded_sharded(mesh, params, monkeypatch):
    single = gen.generate(params, CFG, PROMPTS, max_new_tokens=NEW)
    checked = []  # the engine's cache after its admission (the prefill) and its decode loop
    admit, run = engine._admit, engine._run

    def check(state):  # before the next call takes (donates) it
        _assert_eighths(state.kv)
        checked.append(state)
        return state

    monkeypatch.setattr(engine, "_admit", lambda *a, **kw: check(admit(*a, **kw)))
    monkeypatch.setattr(engine, "_run", lambda *a, **kw: (lambda out: (check(out[0]),
                                                                        *out[1:]))(run(*a, **kw)))
    with use_mesh(mesh, RULES):
        cache = init_cache(CFG, len(PROMPTS), 128)
        _assert_eighths(cache)
        assert cache["k"].sharding.spec == P(None, "data", None, "tensor", None)
        sharded = gen.generate(params, CFG, PROMPTS, max_new_tokens=NEW)
    assert len(checked) == 2  # one prefill, one decode loop
    np.testing.assert_array_equal(sharded.tokens, single.tokens)


def test_no_device_allocates_the_global_cache(mesh):
    shapes = cache_shapes(CFG, 8, 128)
    with use_mesh(mesh, RULES):
        sh = cache_shardings(mesh, RULES, shapes)
    names = tuple(shapes)
    fn = _zeros_fn(tuple(shapes[n] for n in names), tuple(sh[n] for n in names))
    mem = fn.lower().compile().memory_analysis()
    kv_global = cache_bytes({n: shapes[n] for n in ("k", "v")})
    # per device: its eighth of k and v (+ its lengths shard and slack), no global buffer
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes <= kv_global // 8 + 1024
    # an odd batch keeps the batch whole rather than failing (3 rows on 4 data devices)
    with use_mesh(mesh, RULES):
        odd = init_cache(CFG, 3, 128)
    assert odd["k"].sharding.spec == P(None, None, None, "tensor", None)


def test_int8_kv_cache_bytes_and_bad_kv_dtype(params):
    """The int8 cache's global bytes; decoding over it (and int4, fp8) against the float
    cache: tests/test_kv_quant.py."""
    from jaxlm.errors import ConfigError
    from jaxlm.config import GenerateConfig
    f32, i8 = init_cache(CFG, 4, 128), init_cache(CFG, 4, 128, kv_dtype="int8")
    assert i8["k"].dtype == jnp.int8 and i8["k_scale"].shape == (2, 4, 128, 2)
    slots = CFG.n_layers * 4 * 128 * CFG.n_kv_heads  # (layer, row, position, head)
    assert cache_bytes(f32) == 2 * slots * CFG.head_dim * 4 + 4 * 4
    assert cache_bytes(i8) == 2 * slots * (CFG.head_dim + 4) + 4 * 4  # int8 + f32 scale
    with pytest.raises(ConfigError, match="generate.kv_dtype='fp16' is not one of auto, int8, "
                                          "int4, fp8"):
        GenerateConfig(kv_dtype="fp16")
    with pytest.raises(ConfigError, match="generate.kv_dtype"):
        gen.generate(params, CFG, PROMPTS[:1], max_new_tokens=2, kv_dtype="int2")
