"""int8 weights (`model.weight_dtype=int8`, `jaxlm quantize`): every family's forward
equals the float model run on numpy-dequantized weights; on a trained tiny-llama the
greedy tokens and held-out perplexity stay close to float32; the CLI round trip;
bad input gets one line."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import ConfigError
from jaxlm.model import forward, init_params
from jaxlm.model.adapters import QuantizedWeight
from jaxlm.config import load_config
from jaxlm.model.config import ModelConfig
from jaxlm.model.quantize import quantize_params
from jaxlm.scripts import cli
from jaxlm.sharding.plan import plan
from jaxlm.train.data import load_documents
from jaxlm.train.loop import train

SMALL = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32"]
FAMILIES = {"tiny-llama": ["model.n_kv_heads=1"], "tiny-gpt2": [],
            "tiny-mixtral": ["model.n_kv_heads=1"], "tiny-bert": [], "tiny-t5": []}
# the oracle's own table: weight name -> number of input (contracted) axes after
# the stacked ones (layers, experts); everything else stays float
IN_AXES = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("cross", "q"): 1, ("cross", "k"): 1, ("cross", "v"): 1, ("cross", "o"): 2,
           ("mlp", "up"): 1, ("mlp", "gate"): 1, ("mlp", "down"): 1}


def numpy_quantize(params, n_experts: int):
    """(int8 q per quantized path, float params with those weights dequantized)."""
    qs = {}

    def one(path, w):
        keys = tuple(k.key for k in path)
        n_in = IN_AXES.get(keys[-2:]) if "layers" in keys else None
        if n_in is None:
            return w
        w = np.asarray(w, np.float32)
        lead = 1 + (1 if n_experts and keys[-2] == "mlp" else 0)
        axes = tuple(range(lead, lead + n_in))
        amax = np.abs(w).max(axis=axes, keepdims=True)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        qs[keys] = q
        return jnp.asarray(q.astype(np.float32) * scale)
    return qs, jax.tree_util.tree_map_with_path(one, params)


def _run_forward(params, cfg, tokens):
    if cfg.family == "encoder_decoder":
        return forward(params, cfg, tokens, tokens[:, ::-1])[0]
    return forward(params, cfg, tokens)[0]


run_forward = jax.jit(_run_forward, static_argnums=1)  # float and oracle params share a trace


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_forward_equals_dequantized_float_model(preset):
    cfg = load_config(preset, SMALL + FAMILIES[preset]).model
    params = init_params(cfg, jax.random.key(1))
    qcfg = dataclasses.replace(cfg, weight_dtype="int8")
    qparams = quantize_params(params, qcfg)
    expected_q, oracle_params = numpy_quantize(params, cfg.moe.n_experts)
    got_q = {tuple(k.key for k in path): np.asarray(w.q) for path, w in
             jax.tree_util.tree_flatten_with_path(
                 qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
             if isinstance(w, QuantizedWeight)}
    assert got_q.keys() == expected_q.keys()  # exactly the layer matmul weights
    for k, q in expected_q.items():
        assert got_q[k].dtype == np.int8
        np.testing.assert_array_equal(got_q[k], q, err_msg=str(k))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 16)),
                         jnp.int32)
    want = np.asarray(run_forward(oracle_params, cfg, tokens))
    got = np.asarray(run_forward(qparams, qcfg, tokens))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(got - np.asarray(run_forward(params, cfg, tokens))).max() > 0  # not a no-op


def test_weight_dtype_validated():
    with pytest.raises(ConfigError, match="model.weight_dtype='int3'"):
        ModelConfig(weight_dtype="int3")


def test_plan_reports_bytes_per_weight_dtype():
    cfg = load_config("tiny-llama", SMALL + ["mesh.devices=1", "model.quant_group=16"])
    params = init_params(cfg.model, jax.random.key(0))
    p = plan(cfg, n_devices=1)
    for fmt in ("int8", "int4", "nf4", "fp8"):
        qparams = quantize_params(params, dataclasses.replace(cfg.model, weight_dtype=fmt))
        assert p["params_by_dtype"][fmt] == sum(x.nbytes for x in jax.tree.leaves(qparams))
    assert p["params_int8"] == p["params_by_dtype"]["int8"] < p["params"]
    assert p["params_by_dtype"]["nf4"] < p["params_by_dtype"]["int4"] < p["params_int8"]
    wide = plan(load_config("tiny-llama", SMALL + ["mesh.devices=1"]), n_devices=1)
    assert wide["params_by_dtype"]["int4"] is None  # quant_group 128 > d_model 32


# ---------------------------------------------------------- a trained tiny-llama

TRAIN = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
         "model.n_kv_heads=1", "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=64",
         "data.batch_size=4", "data.max_docs=20", "train.steps=30", "train.warmup_steps=3",
         "train.eval_every=30", "train.eval_batches=1", "train.checkpoint_every=30",
         "train.log_every=30", "mesh.devices=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sp_tokenizer_file):
    run_dir = str(tmp_path_factory.mktemp("quant") / "run")
    train(load_config("tiny-llama", TRAIN + [f"data.tokenizer={sp_tokenizer_file}",
                                             f"run_dir={run_dir}"]), progress=False)
    return run_dir


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "int8")
    assert cli.main(["quantize", "--checkpoint", trained, "--out", out]) == 0
    return out


def held_out(tok, n: int, length: int):
    """n token windows of `length` from stdlib documents the run never saw."""
    docs = load_documents("stdlib", max_docs=200)[100:]
    rows = []
    for d in docs:
        ids = tok.encode(d)
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return np.asarray(rows, np.int32)


def perplexity(params, cfg, rows):
    logits = np.asarray(run_forward(params, cfg, jnp.asarray(rows)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], rows[:, 1:, None], -1).mean()
    return float(np.exp(nll)), logits


def test_quantized_run_keeps_quality(trained, quantized):
    cfg, fparams = jaxlm.load(trained)
    qcfg, qparams = jaxlm.load(quantized)
    assert qcfg.weight_dtype == "int8"
    assert isinstance(qparams["layers"]["mlp"]["up"], QuantizedWeight)
    assert qparams["layers"]["mlp"]["up"].q.dtype == jnp.int8
    tok = jaxlm.load_tokenizer(trained)
    rows = held_out(tok, 16, 64)
    ppl_f, logits_f = perplexity(fparams, cfg, rows)
    ppl_q, logits_q = perplexity(qparams, qcfg, rows)
    assert ppl_q <= 1.02 * ppl_f, (ppl_f, ppl_q)
    assert np.abs(logits_q - logits_f).max() > 0
    prompts = [r[:12].tolist() for r in rows]
    f = jaxlm.generate(fparams, cfg, prompts, max_new_tokens=16).tokens
    q = jaxlm.generate(qparams, qcfg, prompts, max_new_tokens=16).tokens
    agree = np.mean([(a == b).all() for a, b in zip(f, q)])
    assert agree >= 0.8, agree
    # an int8 run loaded as float: its dequantized weights, exactly
    _, deq = jaxlm.load(quantized, cfg=dataclasses.replace(qcfg, weight_dtype=""))
    w = qparams["layers"]["attn"]["o"]
    np.testing.assert_array_equal(np.asarray(deq["layers"]["attn"]["o"]),
                                  np.asarray(w.q, np.float32) * np.asarray(w.scale))


def test_cli_round_trip_generates_text(quantized, capsys):
    assert cli.main(["generate", "--checkpoint", quantized, "--prompt", "def ",
                     "generate.max_new_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== prompt: 'def '") and len(out.splitlines()[1]) > len("def ")


def test_bad_input_is_one_line(trained, quantized, tmp_path, capsys):
    before = sorted(os.listdir(quantized))
    cases = [(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a")],
              "does not exist"),
             (["--checkpoint", trained, "--out", str(tmp_path / "b"), "--weight-dtype", "int3"],
              "int3"),
             (["--checkpoint", trained, "--out", str(tmp_path / "b"), "--dtype", "int4"],
              "model.quant_group=128 does not divide the input dimension 64"),
             (["--checkpoint", trained, "--out", str(tmp_path / "b"), "--dtype", "int4",
               "--method", "gptq"], "GPTQ without calibration data"),
             (["--checkpoint", trained, "--out", str(tmp_path / "b"), "--calibration", "x.txt"],
              "--method rtn"),
             (["--checkpoint", trained, "--out", quantized], "not empty"),
             (["--checkpoint", quantized, "--out", str(tmp_path / "c")], "already int8")]
    for args, needle in cases:
        assert cli.main(["quantize", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert sorted(os.listdir(quantized)) == before  # the existing dir is untouched
    assert not [n for n in os.listdir(tmp_path) if n != "missing"]  # no temp dir left
    with pytest.raises(ConfigError, match="weight_dtype=int8 is for inference"):
        train(load_config("tiny-llama", TRAIN + ["model.weight_dtype=int8",
                                                 f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_cli_nf4_run_keeps_quality(trained, tmp_path, capsys):
    """`jaxlm quantize --dtype nf4 --group 32`: a run of packed NF4 codes whose held-out
    perplexity stays near float32's (the quality per format is recorded in BENCHMARKS.md)."""
    out = str(tmp_path / "nf4")
    assert cli.main(["quantize", "--checkpoint", trained, "--out", out, "--dtype", "nf4",
                     "--group", "32"]) == 0
    assert "wrote nf4 checkpoint" in capsys.readouterr().out
    cfg, fparams = jaxlm.load(trained)
    qcfg, qparams = jaxlm.load(out)
    assert (qcfg.weight_dtype, qcfg.quant_group) == ("nf4", 32)
    up = qparams["layers"]["mlp"]["up"]
    assert up.fmt == "nf4" and up.q.dtype == jnp.uint8 and up.q.shape[1] * 2 == cfg.d_model
    rows = held_out(jaxlm.load_tokenizer(trained), 8, 64)
    ppl_f, _ = perplexity(fparams, cfg, rows)
    ppl_q, _ = perplexity(qparams, qcfg, rows)
    assert ppl_q <= 1.1 * ppl_f, (ppl_f, ppl_q)


def test_int8_loads_sharded(trained, quantized):
    from jaxlm.config import MeshConfig
    from jaxlm.sharding.mesh import make_mesh
    mesh = make_mesh(MeshConfig(fsdp=4, devices=4))  # (n_kv_heads=1 cannot go over tensor)
    _, ref = jaxlm.load(quantized)
    _, from_int8 = jaxlm.load(quantized, mesh=mesh)  # restored straight into shardings
    qcfg = jaxlm.model_config_of(quantized)
    _, from_float = jaxlm.load(trained, cfg=qcfg, mesh=mesh)  # quantized into them
    for params in (from_int8, from_float):
        w = params["layers"]["mlp"]["up"]  # [layers, embed, mlp]: embed over fsdp
        assert isinstance(w, QuantizedWeight) and w.q.dtype == jnp.int8
        assert w.q.addressable_shards[0].data.size == w.q.size // 4
        assert w.scale.addressable_shards[0].data.size == w.scale.size  # [layers, 1, mlp]
        jax.tree.map(np.testing.assert_array_equal, params, ref)
