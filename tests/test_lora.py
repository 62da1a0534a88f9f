"""LoRA / QLoRA: adapters as specs, materialized per layer, frozen base, peft export,
and a sharded LoRA step against one device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.model import forward, model_specs  # noqa: E402
from jaxlm.model.adapters import (LoraWeight, QuantizedWeight, dequantize,  # noqa: E402
                                  materialize, quantize)
from jaxlm.config import (Config, DataConfig, DpoConfig, LoraConfig, MeshConfig,  # noqa: E402
                          TrainConfig)
from jaxlm.model.hf import load_hf  # noqa: E402
from jaxlm.model.params import LogicalAxes, logical_axes  # noqa: E402
from jaxlm.model.peft import save_lora_run  # noqa: E402
from jaxlm.sharding.mesh import make_mesh  # noqa: E402
from jaxlm.sharding.rules import named_sharding, partition_spec, use_mesh  # noqa: E402
from jaxlm.train.lora import apply_lora, lora_scale, lora_specs, merge_lora, split_lora  # noqa: E402
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxlm.train.state import create_lora_state, state_shardings  # noqa: E402
from jaxlm.train.step import compile_steps  # noqa: E402
from tiny_models import LLAMA  # noqa: E402

B, S, V = 4, 16, 96
TARGETS = "layers/(attn/(q|v|o)|mlp/(gate|up|down))"  # o: two input axes


def lm_batch(seed=0, b=B, s=S, vocab=V):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (b, s + 1)).astype(np.int32)
    seg = np.ones((b, s), np.int32)
    seg[1, s - 5:] = 0  # right padding
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": seg, "loss_mask": seg.astype(np.float32)}


@functools.partial(jax.jit, static_argnums=4)
def _logits(params, tokens, positions, segment_ids, mcfg):
    return forward(params, mcfg, tokens, positions, segment_ids)[0]


def logits_of(params, mcfg, batch):
    """One compile per params structure (plain, LoRA, int8), shared by the tests."""
    return np.asarray(_logits(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                              mcfg))


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("section, over, needle", [
    (LoraConfig, dict(rank=-1), "train.lora.rank"),
    (LoraConfig, dict(rank=4, targets="layers/(q"), "train.lora.targets"),
    (LoraConfig, dict(base_dtype="int8"), "train.lora.base_dtype"),
    (TrainConfig, dict(grad_accum_steps=0), "train.grad_accum_steps"),
    (DpoConfig, dict(loss="hinge"), "train.dpo.loss"),
])
def test_bad_settings_are_one_line_config_errors(section, over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        section(**over)


def test_targets_matching_no_weight_and_accum_not_dividing_batch():
    mcfg = LLAMA
    with pytest.raises(ConfigError, match="lora.targets='embed/tokens'"):
        lora_specs(mcfg, TrainConfig(lora=LoraConfig(rank=2, targets="embed/tokens")))
    with pytest.raises(ConfigError, match="lora.targets='layers/mlp/nothing'"):
        Config(model=mcfg, train=TrainConfig(lora=LoraConfig(rank=2,
                                                             targets="layers/mlp/nothing")))
    with pytest.raises(ConfigError, match="objective=dpo needs model.family=decoder"):
        Config(model=dataclasses.replace(mcfg, family="encoder", mlp="gelu"),
               train=TrainConfig(objective="dpo"))
    with pytest.raises(ConfigError, match="grad_accum_steps=3"):
        Config(train=TrainConfig(grad_accum_steps=3), data=DataConfig(batch_size=8))


# ------------------------------------------------------------------ nodes

def test_materialize_scan_slices_and_quantize():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8, 2, 4)).astype(np.float32)  # [L, in, H, hd]
    a = rng.normal(size=(3, 8, 2)).astype(np.float32)
    b = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    q = quantize(jnp.asarray(w), (1,))
    assert q.q.dtype == jnp.int8 and q.scale.shape == (3, 1, 2, 4)
    err = np.abs(np.asarray(dequantize(q)) - w)
    assert np.all(err <= np.asarray(q.scale) / 2 + 1e-7)
    node = LoraWeight(q, jnp.asarray(a), jnp.asarray(b), 0.5)
    want = np.asarray(dequantize(q)) + 0.5 * np.einsum("lir,lrhk->lihk", a, b)
    np.testing.assert_allclose(np.asarray(materialize(node)), want, rtol=1e-5, atol=1e-5)
    _, per_layer = jax.lax.scan(lambda c, layer: (c, materialize(layer)), None, {"w": node})
    np.testing.assert_allclose(np.asarray(per_layer["w"]), want, rtol=1e-5, atol=1e-5)
    plain = {"x": jnp.ones(3)}
    assert materialize(plain)["x"] is plain["x"]  # plain leaves pass through


# ------------------------------------------------------------------ tiny HF llama

@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    mcfg, params = load_hf(path)
    return path, model, mcfg, params


def lora_cfg(mcfg, **lora):
    # eps 1e-4: Adam's first steps stay smooth in gradients near 0 (see the sharded test)
    lora = LoraConfig(**{**dict(rank=4, alpha=8.0, targets=TARGETS), **lora})
    t = dict(steps=10, warmup_steps=0, learning_rate=3e-2, grad_clip=0.0, eps=1e-4)
    return Config(model=mcfg, train=TrainConfig(**t, lora=lora),
                  data=DataConfig(seq_len=S, batch_size=B), mesh=MeshConfig(devices=1))


def run_lora(cfg, base, steps, batch, devices=None, mesh_cfg=None):
    """(state before, state after `steps` steps, metrics of every step, params after
    the first step, the mesh)."""
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg) if mesh_cfg else cfg
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.train, lora_specs(cfg.model, cfg.train))
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_lora_state(cfg, mesh, tx, base, seed=0)
        start = jax.device_get(state)
        batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        train, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train),
                                 state_shardings(cfg, mesh, tx), batch_sh, 0, tcfg=cfg.train)
        batch = jax.device_put(batch, batch_sh)
        metrics, first = [], None
        for _ in range(steps):
            state, m = train(state, batch)
            metrics.append(jax.device_get(m))
            first = jax.device_get(state.params) if first is None else first
    return start, state, metrics, first, mesh


@pytest.fixture(scope="module")
def trained(hf_llama):
    _, _, mcfg, params = hf_llama
    cfg = lora_cfg(mcfg)
    start, state, metrics, first, _ = run_lora(cfg, params, 3, lm_batch())
    return cfg, start, state, metrics, first


def test_adapters_init_to_the_base_and_train_only_themselves(hf_llama, trained):
    _, _, mcfg, params = hf_llama
    cfg, start, state, _, _ = trained
    batch = lm_batch(1)
    scale = lora_scale(cfg.train)
    at_init = logits_of(apply_lora(start.frozen, start.params, scale), mcfg, batch)
    np.testing.assert_array_equal(at_init, logits_of(params, mcfg, batch))  # B = 0: exact
    # the frozen base is bit-identical after the steps; the optimizer holds adapters only
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # Adam mu, nu
    assert set(state.params["layers"]) == {"attn", "mlp"}
    assert sorted(state.params["layers"]["attn"]) == ["o", "q", "v"]
    assert np.abs(np.asarray(state.params["layers"]["attn"]["o"]["b"])).max() > 0  # B trained


def test_merged_equals_unmerged_and_peft_loads_the_export(hf_llama, trained, tmp_path):
    path, model, mcfg, _ = hf_llama
    cfg, _, state, _, _ = trained
    batch = lm_batch(2)
    unmerged = logits_of(apply_lora(state.frozen, state.params, lora_scale(cfg.train)), mcfg,
                         batch)
    merged_params = merge_lora(state.frozen, jax.device_get(state.params), cfg)
    merged = logits_of(merged_params, mcfg, batch)
    base = logits_of(state.frozen, mcfg, batch)
    assert np.abs(merged - base).max() > 1e-2  # the adapters changed something
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    base_view, adapters = split_lora(apply_lora(state.frozen, state.params, 1.0))
    assert jax.tree.structure(adapters) == jax.tree.structure(state.params)
    assert jax.tree.structure(base_view) == jax.tree.structure(state.frozen)

    save_lora_run(tmp_path / "adapter", cfg, jax.device_get(state.params), str(path))
    hf_base = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
    hf_lora = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = hf_lora(torch.tensor(batch["tokens"], dtype=torch.long),
                      attention_mask=torch.tensor(batch["segment_ids"])).logits.numpy()
    real = batch["segment_ids"].astype(bool)
    assert np.abs(ref[real] - merged[real]).max() <= 1e-4


def test_qlora_base_is_int8_and_steps_run(hf_llama):
    _, _, mcfg, params = hf_llama
    cfg = lora_cfg(mcfg, base_dtype="int8", targets="layers/attn/(q|k|v|o)")
    batch = lm_batch()
    start, state, metrics, _, _ = run_lora(cfg, params, 2, batch)
    q = start.frozen["layers"]["attn"]["q"]
    assert isinstance(q, QuantizedWeight) and q.q.dtype == np.int8
    assert q.scale.shape == (2, 1, 4, 8)  # per output channel (heads, head_dim)
    assert isinstance(start.frozen["layers"]["mlp"]["up"], QuantizedWeight)
    dequantized = materialize(start.frozen)
    # the step's forward is the dequantized model's: its loss at init equals theirs
    ours = logits_of(apply_lora(start.frozen, start.params, 1.0), mcfg, batch)
    np.testing.assert_allclose(ours, logits_of(dequantized, mcfg, batch), atol=1e-5, rtol=0)
    assert np.abs(ours - logits_of(params, mcfg, batch)).max() < 0.05 * np.abs(ours).max()
    assert np.isfinite(metrics[-1]["loss"])
    np.testing.assert_array_equal(np.asarray(state.frozen["layers"]["attn"]["q"].q),
                                  np.asarray(q.q))


@pytest.mark.parametrize("fmt", ["nf4"])  # int4's double-quantized form: test_qformats.py
def test_qlora_4bit_base_double_quantized_trains_and_exports_to_peft(hf_llama, fmt, tmp_path):
    """QLoRA's 4-bit base: packed codes in groups, scales double-quantized (uint8 codes, a
    float32 per block); bit-identical through training while the loss falls; the peft
    export over the dequantized base gives transformers our logits."""
    import jaxlm
    path, _, mcfg, params = hf_llama
    mcfg = dataclasses.replace(mcfg, quant_group=16)
    cfg = lora_cfg(mcfg, base_dtype=fmt)
    batch = lm_batch()
    start, state, metrics, _, _ = run_lora(cfg, params, 10, batch)
    up = start.frozen["layers"]["mlp"]["up"]  # [L, D, F] = [2, 32, 48]
    assert isinstance(up, QuantizedWeight) and up.fmt == fmt
    assert up.q.dtype == np.uint8 and up.q.shape == (2, 16, 48)  # two codes per byte
    assert up.scale.dtype == np.uint8 and up.scale.shape == (2, 2, 48)  # 8-bit scales
    assert up.scale2.dtype == np.float32 and up.scale2.shape == (2, 2, 1)  # per block
    for a, b in zip(jax.tree.leaves(start.frozen), jax.tree.leaves(state.frozen)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the base, bit-identical
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"], [m["loss"] for m in metrics]
    ours = logits_of(apply_lora(state.frozen, state.params, lora_scale(cfg.train)), mcfg, batch)
    deq = dataclasses.replace(mcfg, weight_dtype="")
    jaxlm.save(str(tmp_path / "base"), deq, materialize(state.frozen, jnp.float32), format="hf")
    save_lora_run(tmp_path / "adapter", cfg, jax.device_get(state.params), str(tmp_path / "base"))
    hf_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base",
                                                            attn_implementation="eager")
    hf_lora = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = hf_lora(torch.tensor(batch["tokens"], dtype=torch.long),
                      attention_mask=torch.tensor(batch["segment_ids"])).logits.numpy()
    real = batch["segment_ids"].astype(bool)
    assert np.abs(ref[real] - ours[real]).max() <= 1e-3
    assert np.abs(ours - logits_of(params, mcfg, batch)).max() > 1e-2  # not the float base


# ------------------------------------------------------------------ sharded

def test_sharded_lora_step_matches_one_device(hf_llama, trained):
    """(2 fsdp x 4 tensor) over 8 devices against the one-device run of `trained`."""
    _, _, _, params = hf_llama
    cfg, _, _, m_one, first_one = trained
    _, many, m_many, first_many, mesh = run_lora(cfg, params, 3, lm_batch(),
                                                 mesh_cfg=MeshConfig(data=1, fsdp=2, tensor=4))
    assert mesh.devices.size == 8
    for a, b in zip(m_many, m_one):  # every step's loss and gradient
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(first_many), jax.tree.leaves(first_one)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # the first update
    for a, b in zip(jax.tree.leaves(jax.device_get(many.params)),
                    jax.tree.leaves(jax.device_get(trained[2].params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # and the third
    rules = cfg.mesh.rules

    def check(arr, axes):
        want = partition_spec(axes, rules)
        assert arr.sharding.spec == want, (axes, arr.sharding.spec, want)
    jax.tree.map(check, many.params, logical_axes(lora_specs(cfg.model, cfg.train)),
                 is_leaf=lambda x: isinstance(x, LogicalAxes))
    jax.tree.map(check, many.frozen, logical_axes(model_specs(cfg.model)),
                 is_leaf=lambda x: isinstance(x, LogicalAxes))
    q_b = many.params["layers"]["attn"]["q"]["b"]  # (layers, None, heads, head_dim)
    assert q_b.sharding.spec == jax.sharding.PartitionSpec("stage", None, "tensor", None)
    o_a = many.params["layers"]["attn"]["o"]["a"]  # (layers, heads, head_dim, None)
    assert o_a.sharding.spec == jax.sharding.PartitionSpec("stage", "tensor", None, None)
