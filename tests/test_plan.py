"""`jaxlm plan`: per-device bytes from abstract shapes and rules, no devices needed."""

import jax
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.model.config import KV_DTYPES
from jaxlm.model import model_specs
from jaxlm.config import load_config
from jaxlm.scripts.cli import main
from jaxlm.sharding.plan import parse_bytes, plan
from jaxlm.sharding.mesh import make_mesh
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import create_state

TINY = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=8",
        "model.n_kv_heads=4", "model.d_ff=128", "model.max_seq_len=32", "data.seq_len=16",
        "data.batch_size=8"]


def test_params_and_optimizer_bytes_match_real_shards():
    cfg = load_config(None, TINY + ["model.moe.n_experts=4", "mesh.data=1", "mesh.fsdp=2",
                                    "mesh.expert=2", "mesh.tensor=2"])
    p = plan(cfg)
    assert p["devices"] == 8
    mesh = make_mesh(cfg.mesh)
    state = create_state(cfg, mesh, make_optimizer(cfg.train, model_specs(cfg.model)), 0)
    dev = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
                   if s.device == dev)
    assert p["params"] == on_device(state.params)
    assert p["optimizer"] == on_device(state.opt_state)


@pytest.mark.parametrize("extra", [["train.lora.rank=4", "train.lora.base_dtype=int8"],
                                   ["train.objective=dpo"]])
def test_fine_tuning_runs_count_what_they_hold(extra):
    """LoRA (QLoRA): gradients and optimizer state of the adapters alone, the base frozen
    in int8; full-weight DPO: a frozen reference copy. Each equals the bytes of the real
    state's shards on one device."""
    from jaxlm.train.lora import trainable_specs
    cfg = load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *extra])
    p = plan(cfg)
    mesh = make_mesh(cfg.mesh)
    state = create_state(cfg, mesh, make_optimizer(cfg.train, trainable_specs(cfg)), 0)
    dev = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
                   if s.device == dev)
    assert p["trained"] == p["gradients"] == on_device(state.params)
    assert p["optimizer"] == on_device(state.opt_state)
    assert p["frozen"] == on_device(state.frozen) > 0
    if cfg.train.lora.rank:
        assert p["frozen"] == p["params_int8"] and p["trained"] < p["params"] // 10
    else:
        assert p["frozen"] == p["params"] == p["trained"]
    assert p["train_total"] == (2 * p["trained"] + p["frozen"] + p["optimizer"]
                                + p["activations"])


def test_lora_on_llama3_8b_holds_a_sliver_of_the_optimizer_state(capsys):
    # (8-way FSDP: each adapter's B [L, r, out] is not sharded over fsdp, whose axis
    # maps "embed"; at 256-way FSDP it is 17% of the full run's per-device share)
    full = plan(load_config("llama3-8b", []), n_devices=8)
    lora = plan(load_config("llama3-8b", ["train.lora.rank=16"]), n_devices=8)
    assert lora["optimizer"] < 0.01 * full["optimizer"]
    assert lora["gradients"] < 0.01 * full["gradients"]
    assert lora["frozen"] == full["params"]  # the base, at param_dtype
    assert main(["plan", "--config", "llama3-8b", "--devices", "8",
                 "train.lora.rank=16"]) == 0
    out = capsys.readouterr().out
    assert "the LoRA adapters, trained" in out and "frozen" in out


def test_llama3_8b_on_256_devices_without_devices():
    cfg = load_config("llama3-8b", [])
    p = plan(cfg, n_devices=256)
    assert p["mesh"] == {"stage": 1, "data": 1, "fsdp": 256, "context": 1, "expert": 1, "tensor": 1}
    n_params = 8_030_261_248
    assert abs(p["params"] - n_params * 4 / 256) / p["params"] < 1e-3  # f32, fully sharded
    assert p["optimizer"] == pytest.approx(2 * p["params"], rel=1e-3)
    # kv cache: 2 * 32 layers * 256 batch (over fsdp) * 8256 * 8 kv heads * 128 * 2 bytes
    assert p["kv_cache"] == 2 * 32 * 1 * 8256 * 8 * 128 * 2
    # int8: 1-byte values + a float32 scale per (layer, row, position, kv head)
    assert p["kv_cache_int8"] == 2 * 32 * 1 * 8256 * 8 * (128 + 4)


def test_mixtral_does_not_fit_exits_non_zero(capsys):
    rc = main(["plan", "--config", "mixtral-8x7b", "--devices", "256", "--device-memory", "16GiB",
               "mesh.expert=8", "mesh.fsdp=-1"])
    out = capsys.readouterr().out
    assert rc == 1 and "does not fit" in out and "expert=8" in out
    assert main(["plan", "--config", "mixtral-8x7b", "--devices", "256",
                 "--device-memory", "1TiB", "mesh.expert=8", "mesh.fsdp=-1"]) == 0


def test_plan_errors():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("80GB") == 80e9
    with pytest.raises(ConfigError, match="expected a size"):
        parse_bytes("lots")
    with pytest.raises(ConfigError, match="experts=8 is sharded over mesh axes expert of size 16"):
        plan(load_config("mixtral-8x7b", ["mesh.expert=16", "mesh.fsdp=-1"]), n_devices=256)
    assert np.isfinite(plan(load_config("tiny-t5", []), n_devices=8)["activations"])


def test_quantized_kv_and_cross_kv_bytes_match_the_real_trees(capsys):
    """kv_cache / kv_cache_int8 / _int4 / _fp8 are the bytes of the cache generate
    allocates (float and each generate.kv_dtype); an encoder-decoder's cross K/V those
    of `cross_kv`'s tree."""
    from jaxlm.model.kv.contiguous import cache_bytes, cache_shapes
    from jaxlm.model import init_params
    from jaxlm.model.families.encoder_decoder import cross_kv
    for preset in ("tiny-llama", "tiny-t5"):
        cfg = load_config(preset, ["mesh.data=1"])
        m, b, s = cfg.model, cfg.data.batch_size, cfg.data.seq_len
        p = plan(cfg, n_devices=1)
        layers = m.n_decoder_layers or m.n_layers
        for kv_dtype in KV_DTYPES:
            key = "kv_cache" if kv_dtype == "auto" else f"kv_cache_{kv_dtype}"
            tree = cache_shapes(m, b, p["cache_len"], kv_dtype=kv_dtype, layers=layers)
            assert p[key] == cache_bytes({n: tree[n] for n in tree if n != "lengths"}), key
        assert p["kv_cache_int8"] == p["kv_cache_fp8"] < 0.4 * p["kv_cache"]
        # int4: half the values' bytes, the same float32 scales
        scales = p["kv_cache_int8"] - p["kv_cache"] // 4
        assert p["kv_cache_int4"] == p["kv_cache"] // 8 + scales
        if m.family == "encoder_decoder":
            params = jax.eval_shape(lambda: init_params(m, jax.random.key(0)))
            encoded = jax.ShapeDtypeStruct((b, s, m.d_model), np.float32)
            for key, kv_dtype in (("cross_kv", "auto"), ("cross_kv_int8", "int8")):
                tree = jax.eval_shape(lambda p, e: cross_kv(p, m, e, kv_dtype), params, encoded)
                assert p[key] == cache_bytes(tree), key
        else:
            assert p["cross_kv"] == 0
        assert main(["plan", "--config", preset, "mesh.data=1", "generate.kv_dtype=int4"]) == 0
        out = capsys.readouterr().out
        for kv_dtype in KV_DTYPES[1:]:
            assert f"{kv_dtype} kv" in out and f"generate.kv_dtype={kv_dtype}: saves" in out
        assert "(float weights, int4 kv)" in out
