"""Prefix caching in the paged engine: the same tokens with the cache on and off (shared
system prompts, n > 1 samples, a multi-turn chat whose next prompt holds the last
answer, a repetition penalty that reads the whole prompt), fewer prompt tokens
computed with it on, LRU eviction in a tight pool, and the pool whole afterwards."""

import numpy as np
import pytest

from jaxlm.config import GenerateConfig
from jaxlm.infer.engine import Engine

PAGE = 8


def _run(tiny, on: bool, n_pages=None, slots=4):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    system = list(rng.integers(3, cfg.vocab_size, 37))
    g = GenerateConfig(max_new_tokens=12, prefix_cache=on, repetition_penalty=1.3)
    eng = Engine(params, cfg, settings=g, slots=slots, max_prompt_len=80, max_new_tokens=12,
                 page_size=PAGE, n_pages=n_pages)
    first = [eng.add(system + list(rng.integers(3, cfg.vocab_size, int(k))),
                     num_return_sequences=2 if i % 3 == 0 else 1)
             for i, k in enumerate(rng.integers(1, 20, 6))]
    eng.run()
    # the next turn of each chat: its prompt, its answer, a new message
    second = [eng.add(list(r.prompt) + r.outputs[0].tokens + [5, 6, 7]) for r in first]
    eng.run()
    pool = eng.pool
    assert pool.in_use() == 0 and not pool.refs.any()
    assert sum(map(len, pool.free)) + pool.n_cached() == pool.n_pages
    return [[o.tokens for o in r.outputs] for r in first + second], eng


@pytest.fixture(scope="module")
def cache_off(tiny_llama):
    return _run(tiny_llama, False)


def test_prefix_cache_same_tokens_fewer_prefill_tokens(tiny_llama, cache_off):
    off, eng_off = cache_off
    on, eng_on = _run(tiny_llama, True)
    assert on == off
    s_on, s_off = eng_on.stats, eng_off.stats
    assert s_on["prompt_tokens"] == s_off["prompt_tokens"] == s_off["prefill_tokens"]
    assert s_on["prefill_tokens"] + s_on["cached_tokens"] == s_on["prompt_tokens"]
    # every request after the first reads the system prompt's 4 full pages; each second
    # turn reads at least its first turn's full pages
    assert s_on["cached_tokens"] >= 5 * 4 * PAGE + 6 * 4 * PAGE
    assert eng_on.prefix_hit_rate() > 0.5 and eng_off.prefix_hit_rate() == 0
    assert eng_on.pool.n_cached() > 0 and eng_off.pool.n_cached() == 0


def test_prefix_cache_evicts_least_recently_used_in_a_tight_pool(tiny_llama, cache_off):
    off, _ = cache_off
    on, eng = _run(tiny_llama, True, n_pages=24)
    assert on == off
    assert eng.pool.evictions > 0 and eng.stats["cached_tokens"] > 0


def test_prefix_cache_on_a_sharded_pool(tiny_llama, cache_off):
    """4 data x 2 tensor: the pool's pages split over data (each data shard caches the
    prefixes its slots wrote), its KV heads over tensor; the same tokens as one device
    without the cache, and the pool whole afterwards (`_run`)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from jaxlm.sharding.rules import use_mesh
    off, _ = cache_off
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    rules = (("batch", ("data",)), ("embed", ("tensor",)), ("kv_heads", ("tensor",)),
             ("heads", ("tensor",)))
    with use_mesh(mesh, rules):
        on, eng = _run(tiny_llama, True, slots=8)
    assert on == off
    assert eng.pool.shards == 4 and eng.stats["cached_tokens"] >= 6 * 4 * PAGE
    pages_heads = NamedSharding(mesh, PartitionSpec(None, "data", None, "tensor", None))
    for x in (eng.state.kv["k"], eng.state.kv["v"]):  # [layers, pages, page, kv heads, dim]
        assert x.ndim == 5 and x.sharding.is_equivalent_to(pages_heads, 5), x.sharding
        assert {s.data.nbytes for s in x.addressable_shards} == {x.nbytes // 8}
