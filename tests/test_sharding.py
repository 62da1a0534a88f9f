"""Sharding: every family on 8 CPU devices matches one device, and every
param / optimizer-state array carries the sharding the rules ask for."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from jaxlm.errors import ConfigError
from jaxlm.model import forward, model_specs
from jaxlm.config import Config, DataConfig, MeshConfig, TrainConfig
from jaxlm.model.config import ModelConfig, MoeConfig
from jaxlm.model.params import LogicalAxes, logical_axes
from jaxlm.sharding.mesh import check_divisible, make_mesh, mesh_shape, model_dims
from jaxlm.sharding.rules import named_sharding, partition_spec, use_mesh
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.train.state import create_state, state_shardings
from jaxlm.train.step import compile_steps

B, S, T = 8, 16, 8  # batch (divides every mesh below), encoder / decoder lengths

_LLAMA = dict(family="decoder", vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
              d_ff=128, max_seq_len=32)
FAMILIES = {
    "llama": ModelConfig(**_LLAMA),
    "gpt2": ModelConfig(family="decoder", vocab_size=128, d_model=64, n_layers=2, n_heads=8,
                        d_ff=128, max_seq_len=32, norm="layernorm", mlp="gelu",
                        gelu_approximate=True, positions="learned", qkv_bias=True,
                        out_bias=True, mlp_bias=True, tie_embeddings=True),
    "moe": ModelConfig(**_LLAMA, moe=MoeConfig(n_experts=8, experts_per_token=2)),
    # capacity = c * tokens * k / experts = all local tokens: nothing dropped, so
    # the expert-parallel all-to-all path must equal the dropless single device
    "moe_ep": ModelConfig(**_LLAMA, moe=MoeConfig(n_experts=8, experts_per_token=2,
                                                capacity_factor=4.0)),
    "bert": ModelConfig(family="encoder", vocab_size=128, d_model=64, n_layers=2, n_heads=8,
                        d_ff=128, max_seq_len=32, type_vocab_size=2, norm="layernorm",
                        norm_eps=1e-12, norm_position="post", mlp="gelu", positions="learned",
                        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True),
    "t5": ModelConfig(family="encoder_decoder", vocab_size=128, d_model=64, n_layers=2,
                      n_decoder_layers=2, n_heads=8, head_dim=8, d_ff=128, max_seq_len=32,
                      norm_eps=1e-6, mlp="geglu", gelu_approximate=True, positions="t5_relative",
                      relative_buckets=8, relative_max_distance=16, attn_scale=1.0),
}
MESHES = {"data8": dict(data=8), "data2_fsdp4": dict(data=2, fsdp=4),
          "fsdp2_tensor4": dict(data=1, fsdp=2, tensor=4)}
MOE_MESHES = {"data2_tensor2_expert2": dict(data=2, tensor=2, expert=2),
              "expert8": dict(data=1, expert=8)}
CASES = ([(f, m) for f in FAMILIES if f != "moe_ep" for m in MESHES]
         + [(f, m) for f in ("moe", "moe_ep") for m in MOE_MESHES])


def make_cfg(family, mesh):
    # warmup 0: the first step moves the params; eps 1e-3 keeps Adam's first
    # update a smooth function of the gradient (no sign flips of ~0 grads).
    return Config(model=FAMILIES[family], data=DataConfig(seq_len=S, batch_size=B),
                  train=TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3, eps=1e-3,
                                    loss_vocab_chunk=64),
                  mesh=MeshConfig(**mesh))


def synthetic_batch(mcfg):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, mcfg.vocab_size, (B, S + 1), dtype=np.int32)
    seg = np.ones((B, S), np.int32)
    seg[:, S - 3:] = 2  # two packed documents per row
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)), "segment_ids": seg,
             "loss_mask": np.ones((B, S), np.float32)}
    if mcfg.family == "encoder_decoder":
        targets = rng.integers(1, mcfg.vocab_size, (B, T), dtype=np.int32)
        batch.update(targets=targets, loss_mask=np.ones((B, T), np.float32),
                     decoder_tokens=np.concatenate([np.zeros((B, 1), np.int32),
                                                    targets[:, :-1]], 1),
                     decoder_segment_ids=np.ones((B, T), np.int32))
    return batch


def _forward(mcfg):
    def run(params, batch):
        if mcfg.family == "encoder_decoder":
            return forward(params, mcfg, batch["tokens"], batch["decoder_tokens"],
                           batch["segment_ids"], batch["decoder_segment_ids"])[0]
        return forward(params, mcfg, batch["tokens"], batch["positions"], batch["segment_ids"])[0]
    return run


def run_case(family, mesh_sizes, devices=None):
    """(logits, metrics, state after one step) of one family on one mesh."""
    cfg = make_cfg(family, mesh_sizes)
    mesh = make_mesh(cfg.mesh, devices)
    check_divisible(mesh, cfg.mesh.rules, model_dims(cfg))
    tx = make_optimizer(cfg.train, model_specs(cfg.model))
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, seed=0)
        sh = state_shardings(cfg, mesh, tx)
        batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        batch = jax.device_put(synthetic_batch(cfg.model), batch_sh)
        logits = jax.jit(_forward(cfg.model), in_shardings=(sh.params, batch_sh))(state.params,
                                                                                   batch)
        step, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train), sh, batch_sh,
                                cfg.train.loss_vocab_chunk)
        state, metrics = step(state, batch)
        hlo = step.lower(state, batch).as_text() if family == "moe_ep" else ""
    return cfg, tx, np.asarray(logits), jax.device_get(metrics), state, hlo


_REFERENCE = {}


def reference(family):
    if family not in _REFERENCE:
        _, _, logits, metrics, state, _ = run_case(family, dict(data=1), jax.devices()[:1])
        _REFERENCE[family] = logits, metrics, jax.device_get(state.params)
    return _REFERENCE[family]


def _norm(spec, ndim):
    entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
    return tuple(entries + [()] * (ndim - len(entries)))


def assert_rule_shardings(cfg, tx, state):
    rules = cfg.mesh.rules
    axes = logical_axes(model_specs(cfg.model))
    is_axes = lambda x: isinstance(x, LogicalAxes)  # noqa: E731

    def check(arr, ax):
        want = _norm(partition_spec(ax, rules), arr.ndim)
        assert _norm(arr.sharding.spec, arr.ndim) == want, (ax, arr.sharding.spec, want)
    jax.tree.map(check, state.params, axes, is_leaf=is_axes)
    checked = []

    def check_moment(arr, ax):
        check(arr, ax)
        checked.append(1)
        return arr
    optax.tree_map_params(tx, check_moment, state.opt_state, axes, is_leaf=is_axes,
                          transform_non_params=lambda x: x)
    assert len(checked) == 2 * len(jax.tree.leaves(state.params))  # Adam mu and nu


# Pure data parallelism (data8) is also inside data2_fsdp4 and every other mesh, and
# every family's fsdp2_tensor4 case shards over fsdp too (llama keeps data2_fsdp4): run
# those only under `-m slow` to keep `make test` within its time budget. The MoE
# families' expert8 parity runs there too: data2_tensor2_expert2 shards the experts
# (with data and tensor), and the expert8 layouts keep their own fast tests below.
_SLOW_CASES = ({(f, "data8") for f in FAMILIES}
               | {(f, "data2_fsdp4") for f in FAMILIES if f != "llama"}
               | {("moe", "expert8"), ("moe_ep", "expert8")})


def assert_matches_reference(cfg, tx, logits, metrics, state, ref):
    """Logits, loss, grad norm and params after one step within 1e-5 of the single-device
    `reference(family)`, and every param / moment with the sharding its rules ask for."""
    ref_logits, ref_metrics, ref_params = ref
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 jax.device_get(state.params), ref_params)
    assert_rule_shardings(cfg, tx, state)


def _case(f, m):
    marks = [pytest.mark.slow] if (f, m) in _SLOW_CASES else []
    return pytest.param(f, m, id=f"{f}-{m}", marks=marks)


@pytest.mark.parametrize("family,mesh_name", [_case(f, m) for f, m in CASES])
def test_parity_and_shardings(family, mesh_name):
    ref_logits, ref_metrics, ref_params = reference(family)
    cfg, tx, logits, metrics, state, hlo = run_case(family, {**MESHES, **MOE_MESHES}[mesh_name])
    if family == "moe_ep":  # tokens travel by all-to-all over the expert axis
        assert "all_to_all" in hlo
    assert dict(make_mesh(cfg.mesh).shape) == {"stage": 1, "data": 1, "fsdp": 1, "context": 1,
                                               "expert": 1, "tensor": 1,
                                               **{**MESHES, **MOE_MESHES}[mesh_name]}
    assert_matches_reference(cfg, tx, logits, metrics, state, (ref_logits, ref_metrics, ref_params))


def test_expert_axis_shards_experts_and_batch():
    cfg = make_cfg("moe", MOE_MESHES["expert8"])
    rules = cfg.mesh.rules
    assert partition_spec(("experts", "embed", "mlp"), rules) == jax.sharding.PartitionSpec(
        "expert", "fsdp", "tensor")
    assert partition_spec(("batch", "seq"), rules)[0] == ("data", "fsdp", "expert")


def test_mesh_sizes_and_errors():
    assert mesh_shape(MeshConfig(expert=2, tensor=2), 8) == dict(stage=1, data=2, fsdp=1,
                                                                 context=1,
                                                                 expert=2, tensor=2)
    assert mesh_shape(MeshConfig(data=2, expert=-1), 8)["expert"] == 4
    with pytest.raises(ConfigError, match="at most one axis"):
        MeshConfig(data=-1, expert=-1)
    with pytest.raises(ConfigError, match="needs a multiple of 16 devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, expert=2, tensor=2), 8)
    with pytest.raises(ConfigError, match="uses 4 devices, but there are 8"):
        mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="needs a multiple of 3"):
        mesh_shape(MeshConfig(expert=3), 8)
    with pytest.raises(ConfigError, match="dcn_data=3 does not divide mesh.data=4"):
        MeshConfig(data=4, dcn_data=3)
    with pytest.raises(ConfigError, match="dcn_data=3 does not divide mesh.data=8"):
        mesh_shape(MeshConfig(dcn_data=3), 8)
    with pytest.raises(ConfigError, match="unknown mesh axis 'experts'"):
        MeshConfig(rules=(("experts", "experts"),))
    cfg = dataclasses.replace(make_cfg("moe", dict(data=1, expert=8)), model=dataclasses.replace(
        FAMILIES["moe"], moe=MoeConfig(n_experts=4)))
    with pytest.raises(ConfigError, match="experts=4 is sharded over mesh axes expert of size 8"):
        check_divisible(make_mesh(cfg.mesh), cfg.mesh.rules, model_dims(cfg))


def test_dcn_mesh_is_validated_and_slice_major():
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, dcn_data=2))
    assert dict(mesh.shape) == {"stage": 1, "data": 4, "fsdp": 2, "context": 1, "expert": 1,
                                "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[0, :, :, 0, 0]
    # data rows 0-1 come from the first "slice" (devices 0-3), rows 2-3 from the second
    assert set(ids[:2].ravel()) == {0, 1, 2, 3} and set(ids[2:].ravel()) == {4, 5, 6, 7}


def test_expert_parallel_capacity_is_per_device():
    """With drops, the all-to-all path equals running each device's tokens alone."""
    from jaxlm.model.layers.moe import expert_parallel_plan, moe, moe_specs
    from jaxlm.model.params import initialize
    mcfg = dataclasses.replace(FAMILIES["moe_ep"], moe=dataclasses.replace(FAMILIES["moe_ep"].moe,
                                                                         capacity_factor=0.5))
    cfg = make_cfg("moe_ep", MOE_MESHES["expert8"])
    p = initialize(moe_specs(mcfg), jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (B, S, mcfg.d_model))
    mesh = make_mesh(cfg.mesh)
    with use_mesh(mesh, cfg.mesh.rules):
        assert expert_parallel_plan(mcfg, B * S) is not None
        y, aux = jax.jit(lambda p, x: moe(p, x, mcfg))(p, x)
    assert expert_parallel_plan(mcfg, B * S) is None  # no mesh: the grouped path
    blocks = [moe(p, x[i:i + 1], mcfg) for i in range(B)]  # one device's rows each
    np.testing.assert_allclose(y, np.concatenate([b[0] for b in blocks]), atol=1e-5)
    dropped = np.mean([float(b[1]["dropped_fraction"]) for b in blocks])
    assert dropped > 0.1
    np.testing.assert_allclose(aux["dropped_fraction"], dropped, rtol=1e-6)
