"""Qwen3, Qwen3-MoE, Phi-3 (with and without LongRoPE), Gemma 2 and Gemma 3 (text)
against transformers: logits past the sliding window and past LongRoPE's original
length, greedy decoding through the contiguous cache and the paged engine, export
back to a dir transformers loads; the config spellings of published checkpoints;
refusals of what is not built; compile time of patterned layers; sharded train steps."""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from hf_oracle import oracles  # noqa: E402
from jaxlm.errors import CheckpointError, ConfigError  # noqa: E402
from jaxlm.model import abstract, forward, model_specs  # noqa: E402
from jaxlm.model.config import ModelConfig  # noqa: E402
from jaxlm.model.hf import config_from_hf, load_hf, save_hf  # noqa: E402

V = 97
# odd shapes: d_model 40 with head_dim 10 (not d_model / heads), GQA 4:2, 2 layers (the
# decode loops unroll them: compile time)
COMMON = dict(vocab_size=V, hidden_size=40, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=10,
              max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
SHORT = [1.0 + 0.1 * i for i in range(5)]  # head_dim / 2 LongRoPE factors
LONG = [1.5 + 0.7 * i for i in range(5)]
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=500.0)),
    # norm_topk_prob false: the top-k probabilities as they are (Qwen3-MoE's default)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=5, num_experts_per_tok=2, moe_intermediate_size=12, norm_topk_prob=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=7)),
    # LongRoPE from 16 to 64 positions; the sequences below pass 16
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})),
    # window 5, soft caps small enough to bite, query_pre_attn_scalar not head_dim
    # 3 layers: one group of the pattern "lg", then a tail layer
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=7, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.0)),
    # pattern "llg"; linear scaling on the global layers, another base on the local ones
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, sliding_window=5, query_pre_attn_scalar=7,
        sliding_window_pattern=3, rope_theta=300.0, rope_local_base_freq=50.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
T = 22  # past every window and past LongRoPE's 16
TOKENS = np.random.default_rng(0).integers(0, V, (2, T))
MASK = np.array([[1] * T, [1] * (T - 4) + [0] * 4])  # right padding in row 1


def hf_model(family, **changes):
    config_cls, model_cls, kw = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **kw, **changes},
                                               attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # weights ~0.1, norm scales near their unit, routers large
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0 if "gemma" in family else 1) + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.1)
    return model


torch_logits, jax_logits, assert_close = oracles(TOKENS, MASK)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_generation_and_export(family, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    ours = jax_logits(cfg, params)
    assert_close(ours, torch_logits(model))
    expect = {"qwen3": dict(qk_norm=True), "qwen3_moe": dict(qk_norm=True),
              "phi3": dict(sliding_window=7),
              "gemma2": dict(layer_pattern="lg", norm_position="sandwich"),
              "gemma3": dict(layer_pattern="llg", qk_norm=True)}.get(family, {})
    assert {k: getattr(cfg, k) for k in expect} == expect
    if family == "qwen3_moe":
        assert not cfg.moe.normalize_top_k and cfg.moe.n_experts == 5
    if family == "phi3_longrope":
        assert cfg.rope.scaling == "longrope" and cfg.rope.original_max_len == 16
    if family == "gemma3":
        assert cfg.rope.local_theta == 50.0 and cfg.rope.scaling == "linear"
    if "gemma" in family:  # the window and the soft caps matter here
        flat = jax_logits(dataclasses.replace(cfg, layer_pattern="", sliding_window=0), params)
        assert np.abs(flat - ours)[:, 6:].max() > 1e-3

    # greedy decoding: transformers' tokens, through the contiguous cache and the paged
    # engine (Phi-3 without LongRoPE decodes as phi3_longrope does, bar the rotation)
    n_prompt = 18 if family == "phi3_longrope" else 4  # LongRoPE: long from the prompt on
    prompt = [int(t) for t in TOKENS[0, :n_prompt]]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, n_prompt,
                                                                              dtype=torch.long),
                             max_new_tokens=9, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, n_prompt:].tolist()
    for cache in ("contiguous", "paged") if family != "phi3" else ():
        got = jaxlm.generate(params, cfg, [prompt], max_new_tokens=9, cache=cache, page_size=4)
        assert got.sequences()[0] == ref, cache

    # export: transformers loads the dir with equal logits (Phi-3 re-fused)
    model_type = {"phi3": "phi3"}.get(family)
    save_hf(tmp_path / "out", cfg, params, model_type=model_type)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [FAMILIES[family][1]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             attn_implementation="eager")
    assert_close(torch_logits(back.eval()), ours)
    assert config_from_hf(written) == cfg


def gemma3_hf(**extra):
    base = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            **{k: v for k, v in COMMON.items() if v is not None}, "num_hidden_layers": 12,
            "sliding_window": 8, "query_pre_attn_scalar": 10}
    return {**base, **extra}


def test_config_spellings_load_to_the_same_model():
    """Gemma 3's published keys (rope_local_base_freq, sliding_window_pattern, rope_scaling)
    and transformers 5's nested rope_parameters / layer_types; Phi-3's "su" and "longrope"."""
    legacy = gemma3_hf(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
                       rope_scaling={"rope_type": "linear", "factor": 8.0})
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(12)]
    nested = gemma3_hf(layer_types=types, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    a, b = config_from_hf(legacy), config_from_hf(nested)
    assert a == b and a.layer_pattern == "lllllg" and a.rope.local_theta == 1e4
    assert config_from_hf(gemma3_hf()).rope.theta == 1e6  # HF's default bases
    written = transformers.Gemma3TextConfig(**{k: v for k, v in legacy.items()
                                               if k not in ("model_type", "architectures")})
    assert config_from_hf(written.to_dict()) == a

    # google/gemma-3-1b-it's config.json as published (transformers 4.50): 26 layers, so
    # four groups of the pattern and two local layers after them
    published = {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
        "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
        "vocab_size": 262144}
    one_b = config_from_hf(published)
    assert (one_b.layer_pattern, one_b.sliding_window, one_b.rope.theta, one_b.rope.local_theta,
            one_b.attn_scale, one_b.attn_logit_softcap, one_b.tie_embeddings) == (
        "lllllg", 512, 1e6, 1e4, 1 / 16, 0.0, True)
    reread = transformers.Gemma3TextConfig(**{k: v for k, v in published.items()
                                              if k not in ("model_type", "architectures")})
    assert config_from_hf(reread.to_dict()) == one_b

    phi = {"model_type": "phi3", **{k: v for k, v in COMMON.items() if v is not None},
           "original_max_position_embeddings": 16}
    su = config_from_hf({**phi, "rope_scaling": {"type": "su", "short_factor": SHORT,
                                                 "long_factor": LONG}})
    longrope = config_from_hf({**phi, "rope_parameters": {
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}})
    assert su == longrope and su.rope.factor == 4.0


@pytest.mark.parametrize("change, words", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"layer_types": ["full_attention"] * 11 + ["sliding_attention"]}, "layer_types="),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding_attention.rope_type='linear'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
])
def test_unbuilt_gemma3_features_are_refused(change, words):
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(")) as e:
        config_from_hf(gemma3_hf(**change))
    assert "\n" not in str(e.value)


def test_unbuilt_qwen3_moe_and_phi3_features_are_refused():
    moe = {"model_type": "qwen3_moe", **{k: v for k, v in COMMON.items() if v is not None},
           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    assert config_from_hf(moe).moe.n_experts == 4
    for change, words in (({"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
                          ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
                          ({"shared_expert_intermediate_size": 8},
                           "shared_expert_intermediate_size=8")):
        with pytest.raises(CheckpointError, match=words.replace("[", r"\[")):
            config_from_hf({**moe, **change})
    windowed = config_from_hf({**moe, "use_sliding_window": True, "sliding_window": 6})
    assert (windowed.sliding_window, windowed.layer_pattern) == (6, "")  # HF: every layer
    phi = {"model_type": "phi3", **{k: v for k, v in COMMON.items() if v is not None},
           "rope_scaling": {"type": "longrope", "short_factor": SHORT[:2], "long_factor": LONG}}
    with pytest.raises(CheckpointError, match="short_factor"):
        config_from_hf(phi)
    with pytest.raises(ConfigError, match="layer_pattern='lx'"):
        ModelConfig(layer_pattern="lx", sliding_window=4)
    with pytest.raises(ConfigError, match="model.sliding_window > 0"):
        ModelConfig(layer_pattern="lg")


def _compile_seconds(n_layers, vocab=64):
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=n_layers, n_heads=2, head_dim=16,
                      d_ff=48, max_seq_len=32, sliding_window=4, layer_pattern="lg",
                      norm_position="sandwich", norm_unit_offset=True, qk_norm=True,
                      scale_embeddings=True, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                      mlp="geglu", gelu_approximate=True, tie_embeddings=True)
    shapes = abstract(model_specs(cfg))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    start = time.perf_counter()
    jax.jit(lambda p, t: forward(p, cfg, t)[0]).lower(shapes, tokens).compile()
    return time.perf_counter() - start


def test_compile_time_is_independent_of_depth():
    """Alternating local / global layers still scan: 32 layers compile in <= 1.5x the
    time of 4 (the scan body is one group of the pattern)."""
    # the best of two programs each (another vocab: no compilation-cache hit), against noise
    # (and the first compile's warm-up)
    four = min(_compile_seconds(4, v) for v in (64, 66))
    thirty_two = min(_compile_seconds(32, v) for v in (64, 66))
    assert thirty_two <= 1.5 * four, (four, thirty_two)


SHARDED = {
    "gemma2": (dict(data=4, tensor=2), dict(
        vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
        d_ff=128, max_seq_len=32, sliding_window=4, layer_pattern="lg",
        norm_position="sandwich", norm_unit_offset=True, qk_norm=True, scale_embeddings=True,
        attn_logit_softcap=5.0, final_logit_softcap=3.0, mlp="geglu", gelu_approximate=True,
        tie_embeddings=True, attn_scale=0.3)),
    "qwen3_moe": (dict(data=2, expert=2, tensor=2), dict(
        vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
        d_ff=32, max_seq_len=32, qk_norm=True)),
}


def one_step(mcfg, mesh_sizes, devices=None):
    """(metrics, state, cfg, tx) after one train step of mcfg on a mesh (test_sharding's)."""
    from test_sharding import B, S, synthetic_batch
    from jaxlm.config import Config, DataConfig, MeshConfig, TrainConfig
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import named_sharding, use_mesh
    from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
    from jaxlm.train.state import create_state, state_shardings
    from jaxlm.train.step import compile_steps
    cfg = Config(model=mcfg, data=DataConfig(seq_len=S, batch_size=B),
                 train=TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-3, eps=1e-3,
                                   loss_vocab_chunk=64), mesh=MeshConfig(**mesh_sizes))
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.train, model_specs(mcfg))
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, seed=0)
        batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        batch = jax.device_put(synthetic_batch(mcfg), batch_sh)
        step, _ = compile_steps(mcfg, tx, learning_rate_schedule(cfg.train),
                                state_shardings(cfg, mesh, tx), batch_sh,
                                cfg.train.loss_vocab_chunk)
        state, metrics = step(state, batch)
    return jax.device_get(metrics), state, cfg, tx


@pytest.mark.parametrize("family", list(SHARDED))
def test_sharded_train_step_equals_one_device(family):
    """(4 data x 2 tensor) for a dense family, (2 data x 2 expert x 2 tensor) for
    Qwen3-MoE: loss, grad norm and params after one step equal one device (<= 1e-5),
    every param and moment sharded as the rules say."""
    from test_sharding import assert_rule_shardings
    from jaxlm.model.config import MoeConfig
    mesh, fields = SHARDED[family]
    if family == "qwen3_moe":
        fields = dict(fields, moe=MoeConfig(n_experts=4, experts_per_token=2,
                                            normalize_top_k=False))
    mcfg = ModelConfig(**fields)
    ref_metrics, ref_state, _, _ = one_step(mcfg, dict(data=1), jax.devices()[:1])
    metrics, state, cfg, tx = one_step(mcfg, mesh)
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    assert_rule_shardings(cfg, tx, state)
    split = [a for a in jax.tree.leaves(state.params) if not a.sharding.is_fully_replicated]
    assert split and len(jax.devices()) == 8


@pytest.mark.parametrize("name, layers, kv_heads", [
    ("qwen3-8b", 36, 8), ("qwen3-30b-a3b", 48, 4), ("gemma2-9b", 42, 8), ("gemma3-4b", 34, 4),
    ("phi3-mini", 32, 32)])
def test_real_size_presets_plan(name, layers, kv_heads):
    """`jaxlm plan` of each preset on 256 devices (none needed): the params fully sharded
    (float32) and a bfloat16 KV cache of every layer at its head_dim."""
    from jaxlm.config import load_config
    from jaxlm.model.params import count
    from jaxlm.sharding.plan import plan
    cfg = load_config(name, [])
    p = plan(cfg, n_devices=256)
    assert abs(p["params"] - count(model_specs(cfg.model)) * 4 / 256) / p["params"] < 2e-3
    head_dim = cfg.model.head_dim
    assert p["kv_cache"] == 2 * layers * 1 * (cfg.data.seq_len + 64) * kv_heads * head_dim * 2


def test_vocab_chunked_loss_applies_the_final_soft_cap():
    """The train step's vocab-chunked loss (its own backward) equals the loss of the capped
    logits, and so do its gradients (jax autodiff of the plain loss as the oracle)."""
    from jaxlm.train.objectives import causal_lm_loss, chunked_lm_loss
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 37)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (2, 5)))
    mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)

    def plain(h, w):
        logits = 2.0 * jnp.tanh((h @ w) / 2.0)
        return causal_lm_loss(logits, targets, mask)[0]
    chunked = lambda h, w: chunked_lm_loss(h, w, targets, mask, 10, 2.0)[0]  # noqa: E731
    grads = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))(h, w)  # noqa: E731
    want, got = grads(plain), grads(chunked)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert abs(float(chunked_lm_loss(h, w, targets, mask, 10)[0]) - float(want[0])) > 1e-2
