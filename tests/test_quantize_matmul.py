"""int8 weights dequantized in the matmul (`jaxlm.model.layers.dense`): the helpers equal
a numpy matmul over the dequantized weight; concatenated int8 weights (fused q|k|v)
equal their parts; and in a tiny Llama's compiled decode step XLA:CPU (with YNNPACK's
dot + eltwise fusion, batch > 1) reads the int8 weights inside the dot's fusion instead
of materialising float32 copies of them."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.kv.contiguous import init_cache
from jaxlm.infer.engine import model_step
from jaxlm.model import init_params
from jaxlm.model.adapters import QuantizedWeight, concatenate, quantize
from jaxlm.config import load_config
from jaxlm.model.families.decoder import unstack_layers
from jaxlm.model.layers.dense import dense, expert_einsum, grouped
from jaxlm.model.quantize import quantize_params

RNG = np.random.default_rng(0)


def _q(shape, n_in, lead=0):
    w = jnp.asarray(RNG.normal(size=shape), jnp.float32)
    return quantize(w, tuple(range(lead, lead + n_in)))


def _np(w: QuantizedWeight):
    return np.asarray(w.q, np.float64) * np.asarray(w.scale, np.float64)


def test_dense_equals_numpy_on_dequantized_weight():
    x = RNG.normal(size=(3, 5, 4, 8)).astype(np.float32)
    for w, n in ((_q((8, 2, 6), 1), 1), (_q((4, 8, 6), 2), 2)):  # btd,dhk->bthk ; bthk,hkd->btd
        got = np.asarray(dense(jnp.asarray(x), w, n))
        k = math.prod(w.shape[:n])
        want = (x.reshape(-1, k) @ _np(w).reshape(k, -1)).reshape(*x.shape[:4 - n], *w.shape[n:])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_matmuls_equal_numpy():
    e, d, f = 3, 8, 6
    w = _q((e, d, f), 1, lead=1)  # one scale per expert and output channel
    sizes = np.array([2, 0, 3], np.int32)
    row_expert = np.repeat(np.arange(e), sizes)
    rows = RNG.normal(size=(int(sizes.sum()), d)).astype(np.float32)
    got = np.asarray(grouped(jnp.asarray(rows), w, jnp.asarray(sizes), jnp.asarray(row_expert)))
    want = np.stack([rows[i] @ _np(w)[g] for i, g in enumerate(row_expert)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    buf = RNG.normal(size=(2, e, 4, d)).astype(np.float32)  # [source, expert, capacity, d]
    got = np.asarray(expert_einsum("secd,edf->secf", jnp.asarray(buf), w))
    np.testing.assert_allclose(got, np.einsum("secd,edf->secf", buf, _np(w)), rtol=1e-5,
                               atol=1e-5)


def test_concatenated_int8_weights_equal_their_parts():
    x = jnp.asarray(RNG.normal(size=(5, 8)), jnp.float32)
    parts = [_q((8, h, 4), 1) for h in (2, 1, 1)]  # q | k | v along the heads axis
    fused = concatenate(parts, axis=1)
    assert fused.q.dtype == jnp.int8 and fused.scale.shape == (1, 4, 4)
    want = np.concatenate([np.asarray(dense(x, p)) for p in parts], axis=1)
    # the same products; a wider output may take another dot kernel (the AMD EPYC VM's
    # YNNPACK accumulates the 8 terms in another order): float32 rounding apart
    np.testing.assert_allclose(np.asarray(dense(x, fused)), want, rtol=1e-6, atol=1e-6)


# XLA:CPU fuses an operand's convert into the dot only through YNNPACK's fusions, and
# only for matrix-matrix dots (batch > 1): a batch-1 step is a GEMV that XLA runs
# itself, after a float copy of the weight (see BENCHMARKS.md, int8 weights).
YNN = {"xla_cpu_experimental_ynn_fusion_type":
       "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def _weight_shapes(params) -> set:
    """Every int8 weight's shape, stacked and per layer, and their 2-D flattenings."""
    shapes = set()
    for leaf in jax.tree.leaves(params):
        if leaf.dtype == jnp.int8:
            for s in (leaf.shape, leaf.shape[1:]):  # [layers, *in, *out], [*in, *out]
                shapes.add(s)
                shapes.update((math.prod(s[:n]), math.prod(s[n:])) for n in range(1, len(s)))
    return shapes


def _float_buffers(hlo: str, shapes: set) -> list[str]:
    """The top-level (unfused) float32 values of the entry computation shaped like a weight."""
    entry = hlo.split("\nENTRY ")[1].split("\n}")[0]
    found = []
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]", line)
        if m and tuple(int(d) for d in m.group(2).split(",") if d) in shapes:
            found.append(m.group(1))
    return found


def _weight_multiplies(hlo: str, shapes: set) -> list[str]:
    """Float multiplies shaped like a weight anywhere (fused or not): a dequantized weight."""
    return [m.group(1) for m in re.finditer(r"%(\S+) = f32\[([\d,]*)\]\S* multiply\(", hlo)
            if tuple(int(d) for d in m.group(2).split(",") if d) in shapes]


def test_decode_step_reads_int8_weights_inside_the_dot():
    over = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=1", "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32"]
    cfg = load_config("tiny-llama", over).model
    qcfg = dataclasses.replace(cfg, weight_dtype="int8")
    params = quantize_params(init_params(cfg, jax.random.key(0)), qcfg)
    shapes = _weight_shapes(params)
    batch = 3  # no activation of this step is shaped like a weight
    step = jax.jit(lambda p, c, t: model_step(unstack_layers(p), qcfg, "contiguous", c, t[:, None],
                                              jnp.zeros((batch,), jnp.int32), None, None))
    kv = {n: a for n, a in init_cache(qcfg, batch, 24).items() if n != "lengths"}
    hlo = step.lower(params, kv, jnp.ones((batch,), jnp.int32)).compile(
        compiler_options=YNN).as_text()
    assert re.search(r"s8\[[\d,]+\]", hlo) and "__ynn_fusion" in hlo  # int8 reaches the dots
    assert _float_buffers(hlo, shapes) == []
    assert _weight_multiplies(hlo, shapes) == []  # the scales multiply the dots' outputs
    # the detector sees a float copy of a weight where one is made
    w = params["layers"]["mlp"]["up"].q[0]
    copy = jax.jit(lambda q: q.astype(jnp.float32) * 2).lower(w).compile().as_text()
    assert _float_buffers(copy, shapes) and _weight_multiplies(copy, shapes)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_all_to_all_equal_the_dequantized_grouped_path(fmt):
    """Expert parallelism (shard_map + all_to_all over `expert`) carries quantized experts
    with their scales (int4: packed codes, group scales, zero points): equal to the
    single-device grouped path on the dequantized weights."""
    from jaxlm.model.adapters import materialize
    from jaxlm.config import MeshConfig
    from jaxlm.model.config import ModelConfig, MoeConfig
    from jaxlm.model.layers.moe import expert_parallel_plan, moe, moe_specs
    from jaxlm.model.params import initialize
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import use_mesh
    cfg = ModelConfig(family="decoder", vocab_size=128, d_model=32, n_layers=1, n_heads=2,
                      d_ff=64, max_seq_len=16, init_std=0.3,
                      moe=MoeConfig(n_experts=8, experts_per_token=2,
                                    capacity_factor=4.0))  # capacity: nothing dropped
    p = initialize(moe_specs(cfg), jax.random.key(1))
    qp = {k: (w if k == "router" else quantize(w, (1,), fmt, 16)) for k, w in p.items()}
    x = jax.random.normal(jax.random.key(2), (8, 4, cfg.d_model))
    mcfg = MeshConfig(data=1, expert=8)
    with use_mesh(make_mesh(mcfg), mcfg.rules):
        assert expert_parallel_plan(cfg, 8 * 4) is not None
        y, _ = jax.jit(lambda p, x: moe(p, x, cfg))(qp, x)
    want, _ = moe(materialize(qp), x, cfg)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-5, rtol=1e-5)
