"""Context parallelism: ring attention over `mesh.context` on 8 CPU devices
matches one device, the causal load-balancing order round-trips, and the
ring holds a fraction of the unsharded flash kernel's memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import (B, FAMILIES, S, _forward, assert_matches_reference,
                           assert_rule_shardings, reference, run_case,
                           synthetic_batch)

from jaxlm.errors import ConfigError
from jaxlm.config import Config, DataConfig, MeshConfig
from jaxlm.model.kernels import MaskSpec, attention, flash_attention
from jaxlm.model.kernels.reference import attention_reference
from jaxlm.sharding.context import (balanced_forward, balanced_order, context_reorder,
                                    context_restore, context_size)
from jaxlm.sharding.mesh import make_mesh
from jaxlm.sharding.rules import named_sharding, use_mesh

MESHES = {"context8": dict(data=1, context=8), "data2_context4": dict(data=2, context=4)}
CASES = [(f, m) for f in ("llama", "moe") for m in MESHES]
RULES = MeshConfig().rules


# One mesh per model runs by default (the ring itself is tested on data2 x context4 below);
# the other two are `-m slow`.
_SLOW = {("llama", "data2_context4"), ("moe", "context8")}


@pytest.mark.parametrize("family,mesh_name", [
    pytest.param(f, m, id=f"{f}-{m}", marks=[pytest.mark.slow] if (f, m) in _SLOW else [])
    for f, m in CASES])
def test_parity_and_seq_sharding(family, mesh_name):
    ref_logits, ref_metrics, ref_params = reference(family)
    sizes = MESHES[mesh_name]
    # logits: plain forward (ring in array order); the train step reorders the batch
    cfg, tx, logits, metrics, state, _ = run_case(family, sizes)
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape)["context"] == sizes["context"]
    assert_matches_reference(cfg, tx, logits, metrics, state, (ref_logits, ref_metrics, ref_params))

    # the load-balanced forward, with the logits put back in order (the stepped
    # params, against one device without a mesh)
    host_batch = synthetic_batch(cfg.model)
    want = jax.jit(_forward(cfg.model))(ref_params, host_batch)
    batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
    batch = jax.device_put(host_batch, batch_sh)
    params = state.params
    with use_mesh(mesh, cfg.mesh.rules):
        assert context_size() == sizes["context"]
        balanced = jax.jit(lambda p, b: balanced_forward(
            p, cfg.model, b["tokens"], b["positions"], b["segment_ids"])[0]).lower(
                params, batch).compile()
        np.testing.assert_allclose(balanced(params, batch), want, atol=1e-5, rtol=1e-5)
    hlo = balanced.as_text()
    # per device: batch / data rows, seq / context tokens, through every layer;
    # the K/V chunks move by collective-permute, the sequence is never gathered
    b_local, s_local, d = B // sizes["data"], S // sizes["context"], cfg.model.d_model
    assert "collective-permute" in hlo
    assert f"f32[{b_local},{s_local},{d}]" in hlo
    if not cfg.model.moe.n_experts:  # dropless MoE sorts all tokens by expert: XLA gathers them
        assert f"f32[{b_local},{S},{d}]" not in hlo and f"f32[{B},{S},{d}]" not in hlo


def _packed_mask(order, window):
    """Two packed documents per row (positions restart), row 1 ends in padding."""
    s = len(order)
    pos = np.tile(np.arange(s, dtype=np.int32), (2, 1))
    seg = np.ones((2, s), np.int32)
    seg[:, 20:], pos[:, 20:] = 2, pos[:, 20:] - 20
    seg[1, 28:] = 0
    pos, seg = jnp.asarray(pos[:, order]), jnp.asarray(seg[:, order])
    return MaskSpec(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                    kv_segment_ids=seg, window=window)


RING_MESHES = {**MESHES, "context4_tensor2": dict(data=1, context=4, tensor=2)}


@pytest.mark.parametrize("mesh_name", list(RING_MESHES))
def test_ring_packed_window_softcap_gqa(mesh_name):
    """Ring attention (fwd and grads) vs the XLA reference on one device, in the
    balanced order, with packed segments, a sliding window and a soft cap."""
    sizes = RING_MESHES[mesh_name]
    mesh = make_mesh(MeshConfig(**sizes))
    s, h, kvh, d = 32, 4, 2, 8
    order = balanced_order(s, sizes["context"])
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k1, (2, s, h, d))
    k, v = jax.random.normal(k2, (2, s, kvh, d)), jax.random.normal(k3, (2, s, kvh, d))
    w = jax.random.normal(k4, (2, s, h, d))
    for window in (None, 5):
        mask = _packed_mask(order, window)

        def loss(q, k, v, ring):
            if ring:
                with use_mesh(mesh, RULES):
                    o = attention(q, k, v, mask, impl="xla", softcap=3.0)
            else:
                o = attention_reference(q, k, v, mask, softcap=3.0)
            return jnp.sum(o * w), o
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a, True), (0, 1, 2),
                                                     has_aux=True))(q, k, v)
        (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(*a, False), (0, 1, 2),
                                                 has_aux=True)(q, k, v)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        np.testing.assert_array_equal(out[1, order >= 28], 0)  # padding rows see nothing
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=1e-5)


def test_balanced_order_round_trip_and_balance():
    s, c = 32, 4
    order = balanced_order(s, c)
    assert sorted(order.tolist()) == list(range(s))
    n = s // (2 * c)
    for i in range(c):  # device i: chunks i and 2c-1-i
        want = list(range(i * n, (i + 1) * n)) + list(range((2 * c - 1 - i) * n, (2 * c - i) * n))
        assert order[i * 2 * n:(i + 1) * 2 * n].tolist() == want
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 9, (3, s)), "targets": rng.integers(0, 9, (3, s)),
             "segment_ids": rng.integers(0, 3, (3, s)),
             "loss_mask": rng.random((3, s)).astype(np.float32)}
    moved = context_reorder(batch, c)
    np.testing.assert_array_equal(moved["positions"], np.tile(order, (3, 1)))  # original ones
    for key, x in batch.items():
        np.testing.assert_array_equal(moved[key], x[:, order])
        np.testing.assert_array_equal(context_restore(moved[key], c), x)
    assert context_reorder(batch, 1) is batch
    # causal work per device (visible (query, key) pairs of its queries): equal
    # in the balanced order, c-fold skewed in plain order
    def work(order):
        return [sum(int(p) + 1 for p in order[i * s // c:(i + 1) * s // c]) for i in range(c)]
    assert len(set(work(order))) == 1
    plain = work(np.arange(s))
    assert plain[-1] > 4 * plain[0]


def test_context_validation():
    llama = FAMILIES["llama"]
    with pytest.raises(ConfigError, match=r"data.seq_len=20 must divide by 2 x mesh.context=8"):
        Config(model=llama, data=DataConfig(seq_len=20), mesh=MeshConfig(context=4))
    for positions in ("alibi", "t5_relative"):
        with pytest.raises(ConfigError, match=f"model.positions='{positions}'.*context"):
            Config(model=dataclasses.replace(llama, positions=positions),
                   data=DataConfig(seq_len=16), mesh=MeshConfig(context=4))
    with pytest.raises(ConfigError, match="family='decoder' only"):
        Config(model=FAMILIES["bert"], data=DataConfig(seq_len=16), mesh=MeshConfig(context=2))
    Config(model=FAMILIES["moe"], data=DataConfig(seq_len=16), mesh=MeshConfig(context=4))
    with pytest.raises(ConfigError, match="sequence length 12 must divide by 2 x context = 8"):
        balanced_order(12, 4)
    mesh = make_mesh(MeshConfig(data=2, context=4))
    q = jnp.zeros((2, 16, 2, 8))
    with use_mesh(mesh, RULES), pytest.raises(ConfigError, match="not supported under context"):
        attention(q, q, q, MaskSpec(causal=True), jnp.zeros((1, 2, 16, 16)), impl="xla")


def test_ring_memory_8k_vs_unsharded_flash():
    """Training (value and grad) of one attention call at S = 8192: per-device
    compiled temp memory of the ring on 8 devices <= 1/4 of the unsharded flash
    kernel's (interpret mode on CPU), and no per-device array has the full
    sequence (only the device's chunks of K/V exist at once)."""
    s, h, kvh, d = 8192, 4, 2, 32
    mesh = make_mesh(MeshConfig(data=1, context=8))
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    mask = MaskSpec(causal=True, q_positions=pos, kv_positions=pos)

    def ring(q, k, v):
        with use_mesh(mesh, RULES):
            return jnp.sum(attention(q, k, v, mask, impl="xla"))

    def flash(q, k, v):
        return jnp.sum(flash_attention(q, k, v, MaskSpec(causal=True)))

    def compiled(f, sharding=None):
        args = [jax.ShapeDtypeStruct((1, s, n, d), jnp.float32, sharding=sharding)
                for n in (h, kvh, kvh)]
        return jax.jit(jax.value_and_grad(f, (0, 1, 2))).lower(*args).compile()
    ring_c = compiled(ring, NamedSharding(mesh, P(None, "context", None, None)))
    flash_c = compiled(flash)
    ring_temp = ring_c.memory_analysis().temp_size_in_bytes
    flash_temp = flash_c.memory_analysis().temp_size_in_bytes
    assert ring_temp <= flash_temp / 4, (ring_temp, flash_temp)
    text = ring_c.as_text()
    assert f",{s}," not in text and f"[1,{s}," not in text
    assert f"f32[1,{s // 8},{kvh},{d}]" in text


def test_plan_accounts_for_context(capsys):
    from jaxlm.config import load_config
    from jaxlm.scripts.cli import main
    from jaxlm.sharding.plan import plan
    base = plan(load_config("llama3-8b", ["mesh.fsdp=32", "mesh.data=8"]), n_devices=256)
    ctx = plan(load_config("llama3-8b", ["mesh.fsdp=32", "mesh.context=8", "mesh.data=1"]),
               n_devices=256)
    assert ctx["mesh"]["context"] == 8 and base["ring_kv"] == 0
    # same tokens per device (256 / 32 rows x 8192 / 8 vs 256 / 256 rows x 8192),
    # K/V chunks of 1024 tokens x 8 kv heads x 128 at bf16 (+ f32 dK/dV)
    assert ctx["ring_kv"] == 2 * 2 * 8 * 1024 * 8 * 128 * (2 + 4)
    # the s^2 scores of one layer are gone: a 128 x 128 f32 tile per head remains
    scores = 1 * 32 * 8192 * 8192 * 2 * 2
    tile = 8 * 32 * 128 * 128 * 2 * 4
    assert base["activations"] - ctx["activations"] == scores - tile
    assert ctx["train_total"] == 2 * ctx["params"] + ctx["optimizer"] + ctx["activations"] \
        + ctx["ring_kv"]
    assert main(["plan", "--config", "llama3-8b", "--devices", "256", "mesh.fsdp=32",
                 "mesh.context=8", "mesh.data=1"]) == 0
    assert "ring kv" in capsys.readouterr().out
