"""Continuous batching over a paged KV cache (jaxlm.infer.engine) and paged decode
attention (jaxlm.model.kernels.paged) against independent oracles."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import InputError
from jaxlm.infer import engine
from jaxlm.infer.generate import generate_many
from jaxlm.infer.generate import generate
from jaxlm.model import ModelConfig, init_params
from jaxlm.model.config import MoeConfig
from jaxlm.model.kernels.paged import paged_attention_pallas, paged_attention_reference
from jaxlm.train.data import load_documents

# init_std 0.2: peaked logits, so greedy choices are not near-ties; byte tokens
CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=128, init_std=0.2, dtype="float32", param_dtype="float32")
SLOTS, PAGE = 4, 8
N_PAGES = 12  # < SLOTS x the longest request's 7 pages: sequences share the pool


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def workload():
    """32 stdlib snippets (bytes): prompt lengths 3..30 and max_new_tokens 2..20 (10x each)."""
    docs = [d.encode("utf-8") for d in load_documents("stdlib", max_docs=4)]
    rng = np.random.default_rng(0)
    prompts, news = [], []
    for i in range(32):
        data, n = docs[i % len(docs)], int(rng.integers(3, 31))
        off = (97 * i) % max(1, len(data) - n)
        prompts.append(list(data[off:off + n]))
        news.append(int(rng.integers(2, 21)))
    assert min(map(len, prompts)) * 6 <= max(map(len, prompts)) and max(news) >= 6 * min(news)
    return prompts, news


def per_prompt(params, prompts, news, **kw):
    """jaxlm.generate's row of each prompt, cut to its own max_new_tokens: one
    batched call with row_seeds (a row does not depend on its batch, as
    test_generate checks), plus the first two prompts alone as an anchor."""
    seeds = kw.pop("row_seeds", list(range(len(prompts))))
    out = generate(params, CFG, prompts, max_new_tokens=max(news), row_seeds=seeds, **kw)
    rows = [s[:m] for s, m in zip(out.sequences(include_eos=True), news)]
    for i in range(2):
        alone = generate(params, CFG, [prompts[i]], max_new_tokens=news[i],
                         row_seeds=[seeds[i]], **kw).sequences(include_eos=True)[0]
        assert alone == rows[i]
    return rows


def run_engine(params, prompts, news, **kw):
    infos = []
    out = generate_many(params, CFG, prompts, max_new_tokens=news, slots=SLOTS, page_size=PAGE,
                        steps_per_call=8, n_pages=N_PAGES, on_refill=infos.append, **kw)
    return out, infos


def check_pages(infos):
    """At every refill: pages in use <= what the live sequences need (rounded up
    to a page) and each page's reference count is the number of live slots holding
    it (prompts sharing a cached prefix share its pages); a refill happened while
    other slots were mid-sequence, and one left a slot empty for want of pages."""
    assert len(infos) > 2
    mid = 0
    for info in infos:
        assert info["pages_in_use"] <= info["pages_needed"], info
        assert info["pages_in_use"] <= N_PAGES
        held = [p for s in np.flatnonzero(info["live"]) for p in info["table"][s]
                if p < info["n_pages"]]
        assert len(set(held)) == info["pages_in_use"]
        assert all(info["refs"][p] == held.count(p) for p in set(held))
        mid += bool(info["admitted"]) and info["live"].sum() > len(info["admitted"])
    assert mid > 0  # a prompt took a finished row's slot while the other rows went on
    assert any(i["waiting"] and not i["live"].all() for i in infos)  # waited for pages


@pytest.fixture(scope="module")
def greedy(params, workload):
    """(stop id, per-prompt greedy generate rows): the stop id is the commonest
    non-final greedy token, so that rows stop on it."""
    prompts, news = workload
    free = generate(params, CFG, prompts, max_new_tokens=max(news),
                    row_seeds=list(range(len(prompts)))).sequences()
    eos = int(np.bincount([t for s, m in zip(free, news) for t in s[:m - 1]]).argmax())
    return eos, per_prompt(params, prompts, news, eos_id=eos)


def test_greedy_equals_per_prompt_generate(params, workload, greedy, traces):
    prompts, news = workload
    eos, want = greedy
    before = traces.copy()
    out, infos = run_engine(params, prompts, news, eos_id=eos)
    got = out.sequences(include_eos=True)
    assert got == want
    assert [len(s) for s in got] == list(out.lengths)
    assert any(len(s) < m for s, m in zip(got, news))  # some rows stopped on EOS
    check_pages(infos)
    assert traces["_run"] - before["_run"] == 1  # one compiled loop
    # batched admission: one packed prefill per refill that admitted, several prompts in
    # one; compilations bounded by the pack-width buckets (4 prompts of <= 4 pages: 16, 24,
    # 32, 48, 64, 96, 128)
    calls = [len(i["admitted"]) for i in infos if i["admitted"]]
    assert max(calls) > 1 and len(calls) < len(prompts)
    assert traces["_admit"] - before["_admit"] <= 7


def test_refill_batch_waits_for_several_finishes(params, workload, greedy):
    """refill_batch=2: the device loop returns once two slots finished (or the
    last waiting prompt's one): fewer round trips, the same tokens, the same
    page accounting."""
    prompts, news = workload
    eos, want = greedy
    out, infos = run_engine(params, prompts, news, eos_id=eos, refill_batch=2)
    assert out.sequences(include_eos=True) == want
    check_pages(infos)
    _, every = run_engine(params, prompts, news, eos_id=eos, refill_batch=1)
    assert len(infos) < len(every)  # fewer round trips
    admitted = lambda infos: [len(i["admitted"]) for i in infos[1:] if i["admitted"]]
    assert np.mean(admitted(infos)) > np.mean(admitted(every))  # more prompts per prefill
    with pytest.raises(InputError, match="refill_batch=0"):
        run_engine(params, prompts, news, refill_batch=0)


def test_sampled_equals_per_prompt_generate_with_seeds(params, workload):
    prompts, news = workload
    seeds = [(7919 * i + 13) % 2 ** 32 for i in range(len(prompts))]
    kw = dict(temperature=0.9, top_k=40, seed=5, row_seeds=seeds)
    out, infos = run_engine(params, prompts, news, **kw)
    assert out.sequences(include_eos=True) == per_prompt(params, prompts, news, **kw)
    check_pages(infos)


def test_packs_split_at_pack_tokens(params, workload, greedy, monkeypatch):
    """A refill's prompts beyond PACK_TOKENS go to further packs (one call each),
    a prompt longer than PACK_TOKENS into a pack of its own: the same tokens."""
    prompts, news = workload
    eos, want = greedy
    monkeypatch.setattr(engine, "PACK_TOKENS", 2 * PAGE)
    calls = []
    real = engine._admit
    monkeypatch.setattr(engine, "_admit",  # the pack (argument 5)'s width
                        lambda *a, **kw: calls.append(a[5].tokens.shape[1]) or real(*a, **kw))
    out, infos = run_engine(params, prompts, news, eos_id=eos)
    assert out.sequences(include_eos=True) == want
    check_pages(infos)
    assert len(calls) > sum(bool(i["admitted"]) for i in infos)  # some refills took 2+ packs
    assert max(calls) > 2 * PAGE  # a long prompt alone, wider than PACK_TOKENS


@pytest.mark.parametrize("overrides", [
    dict(positions="learned", norm="layernorm", mlp="gelu", n_kv_heads=0, qkv_bias=True,
         out_bias=True, mlp_bias=True, tie_embeddings=True),
    dict(sliding_window=5),
    dict(moe=MoeConfig(n_experts=4, experts_per_token=2)),
    dict(positions="alibi"),
], ids=["gpt2", "window", "moe", "alibi"])
def test_families_equal_per_prompt_generate(workload, overrides):
    """Learned positions, a window shorter than the prompts (and than a page), a
    mixture of experts, ALiBi (a position bias over the pages' positions): the packed
    prefill (prompts sharing one row, segment
    masks, positions restarting) and the paged steps give generate's tokens."""
    cfg = dataclasses.replace(CFG, **overrides)
    params = init_params(cfg, jax.random.PRNGKey(1))
    prompts, news = (x[:12] for x in workload)
    want = generate(params, cfg, prompts, max_new_tokens=max(news),
                    row_seeds=list(range(len(prompts)))).sequences()
    out = generate_many(params, cfg, prompts, max_new_tokens=news, slots=SLOTS,
                        page_size=PAGE, steps_per_call=8, n_pages=N_PAGES)
    assert out.sequences() == [s[:m] for s, m in zip(want, news)]


def test_too_small_pool_is_one_line(params, workload):
    prompts, news = workload
    need = max(-(-(len(p) + m - 1) // PAGE) for p, m in zip(prompts, news))
    with pytest.raises(InputError, match=f"needs {need} pages") as e:
        generate_many(params, CFG, prompts, max_new_tokens=news, page_size=PAGE,
                      n_pages=need - 1)
    assert "\n" not in str(e.value)


def _naive_paged(q, kp, vp, table, lengths, window=None):
    """Dense numpy recomputation, sequence by sequence, from its pages."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, kp, vp))
    b, h, d = q.shape
    kvh = kp.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        n = int(lengths[i])
        k = np.concatenate([kp[p] for p in table[i]])[:n]  # [n, KVH, D]
        v = np.concatenate([vp[p] for p in table[i]])[:n]
        lo = 0 if window is None else max(0, n - window)
        for j in range(h):
            g = j // (h // kvh)
            s = k[lo:, g] @ q[i, j] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ v[lo:, g]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_pallas_reference_naive(window):
    b, h, kvh, d, ps, n_pages, per_seq = 5, 4, 2, 16, 4, 32, 5
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(ks[0], (b, h, d))
    kp = jax.random.normal(ks[1], (n_pages, ps, kvh, d))
    vp = jax.random.normal(ks[2], (n_pages, ps, kvh, d))
    table = np.random.default_rng(0).permutation(n_pages)[:b * per_seq].reshape(b, per_seq)
    lengths = np.array([1, 4, 5, 13, 20], np.int32)  # ragged: 1 key, a full page, ...
    table = table.astype(np.int32)
    naive = _naive_paged(q, kp, vp, table, lengths, window)
    ref = paged_attention_reference(q, kp, vp, jnp.asarray(table), jnp.asarray(lengths),
                                    window=window)
    np.testing.assert_allclose(np.asarray(ref), naive, atol=1e-5, rtol=1e-5)
    for backend in ("gpu", "tpu"):  # interpret=True: TPU interpret mode for the TPU kernel
        pal = paged_attention_pallas(q, kp, vp, jnp.asarray(table), jnp.asarray(lengths),
                                     window=window, interpret=True, backend=backend)
        np.testing.assert_allclose(np.asarray(pal), np.asarray(ref), atol=1e-5, rtol=1e-5,
                                   err_msg=backend)


MESH_RULES = (("batch", ("data",)), ("embed", ("tensor",)), ("kv_heads", ("tensor",)),
              ("heads", ("tensor",)))


def _pool_shard_bytes(pages):
    """{per-device bytes} of the pool's k and v, and their global bytes."""
    return ({s.data.nbytes for x in pages.values() for s in x.addressable_shards},
            {x.nbytes for x in pages.values()})


def test_sharded_pool_stays_an_eighth_and_outputs_equal_generate(params, workload, greedy):
    """(4 data x 2 tensor): the pool is created, admitted into and decoded in
    eighths (pages over data, kv_heads over tensor); each slot's pages lie in its
    data shard's block; outputs equal per-prompt generate."""
    from jax.sharding import Mesh
    from jaxlm.model.kv.paged import init_pages, pool_layout
    from jaxlm.sharding.rules import use_mesh
    prompts, news = workload
    eos, want = greedy
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    slots, n_pages = 8, 40  # 2 slots and 10 pages per data shard (the longest takes 7)
    seen = []

    def on_refill(info):
        seen.append(_pool_shard_bytes(info["pool"]))
        block = n_pages // 4
        for s in np.flatnonzero(info["live"]):
            ids = info["table"][s][info["table"][s] < n_pages]
            assert ((ids // block) == s // (slots // 4)).all(), (s, ids)
        assert info["pages_in_use"] <= info["pages_needed"]

    with use_mesh(mesh, MESH_RULES):
        layout = pool_layout(slots, n_pages, CFG.n_kv_heads)
        assert (layout.data, layout.kv, layout.shards) == (("data",), ("tensor",), 4)
        pool = init_pages(CFG, n_pages, PAGE, slots=slots)
        assert pool["k"].sharding.spec == jax.sharding.PartitionSpec(
            None, "data", None, "tensor", None)
        out = generate_many(params, CFG, prompts[:16], max_new_tokens=news[:16], slots=slots,
                            page_size=PAGE, steps_per_call=8, n_pages=n_pages, eos_id=eos,
                            on_refill=on_refill)
    assert out.sequences(include_eos=True) == want[:16]
    created = _pool_shard_bytes(pool)
    assert len(seen) > 2
    for per_device, global_ in [created] + seen:  # creation, every admission and decode
        assert len(global_) == 1 and per_device == {global_.pop() // 8}
    # the compiled init allocates no global pool: each device its eighth of k and v
    from jaxlm.model.kv.contiguous import _zeros_fn
    sd = jax.ShapeDtypeStruct(pool["k"].shape, pool["k"].dtype)
    mem = _zeros_fn((sd, sd), (pool["k"].sharding,) * 2).lower().compile().memory_analysis()
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes <= 2 * pool["k"].nbytes // 8 + 1024
    # a pool that each data shard cannot fit the longest request into: one line
    need = max(-(-(len(p) + m - 1) // PAGE) for p, m in zip(prompts, news))
    with use_mesh(mesh, MESH_RULES), pytest.raises(InputError, match=f"n_pages >= {4 * need}"):
        generate_many(params, CFG, prompts, max_new_tokens=news, slots=slots, page_size=PAGE,
                      n_pages=4 * need - 1)


def test_paged_kernels_lower_for_gpu_and_tpu():
    """Both kernels lower on this CPU for their hardware (Pallas -> Triton IR for
    cuda; -> Mosaic MLIR for a TPU v5e, named by an abstract device): the
    lowering's own checks (power-of-two loads, block shapes, DMA refs) pass.
    Not a compilation by Triton / Mosaic: that needs the hardware."""
    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
    except ImportError:  # the private names moved: nothing to lower against
        pytest.skip("jax._src.mesh.AbstractDevice not found in this jax")
    b, h, kvh, d, ps, n_pages, p = 4, 16, 8, 128, 16, 64, 8
    args = (jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16),
            *[jax.ShapeDtypeStruct((n_pages, ps, kvh, d), jnp.bfloat16)] * 2,
            jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    for backend, platform, marker in (("gpu", "cuda", "triton"), ("tpu", "tpu", "tpu_custom_call")):
        f = jax.jit(lambda *a: paged_attention_pallas(*a, backend=backend, interpret=False))
        tpu = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
            device_kind="TPU v5 lite", num_cores=1, platform="tpu"))
        with jax.sharding.use_abstract_mesh(tpu) if backend == "tpu" else contextlib.nullcontext():
            text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert marker in text, backend
