"""`jaxlm plan`: per-device bytes from abstract shapes and rules, no devices needed."""

import jax
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.model import model_specs
from jaxlm.model.config import load_config
from jaxlm.scripts.cli import main
from jaxlm.scripts.plan import parse_bytes, plan
from jaxlm.sharding.mesh import make_mesh
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import create_state

TINY = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=8",
        "model.n_kv_heads=4", "model.d_ff=128", "model.max_seq_len=32", "data.seq_len=16",
        "data.batch_size=8"]


def test_params_and_optimizer_bytes_match_real_shards():
    cfg = load_config(None, TINY + ["model.n_experts=4", "mesh.data=1", "mesh.fsdp=2",
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


def test_llama3_8b_on_256_devices_without_devices():
    cfg = load_config("llama3-8b", [])
    p = plan(cfg, n_devices=256)
    assert p["mesh"] == {"stage": 1, "data": 1, "fsdp": 256, "context": 1, "expert": 1, "tensor": 1}
    n_params = 8_030_261_248
    assert abs(p["params"] - n_params * 4 / 256) / p["params"] < 1e-3  # f32, fully sharded
    assert p["optimizer"] == pytest.approx(2 * p["params"], rel=1e-3)
    # kv cache: 2 * 32 layers * 256 batch (over fsdp) * 8256 * 8 kv heads * 128 * 2 bytes
    assert p["kv_cache"] == 2 * 32 * 1 * 8256 * 8 * 128 * 2


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
