"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM (random weights, odd shapes):
latent attention (q low-rank path, the K/V latent, the decoupled RoPE key part,
interleaved RoPE), the DeepSeek MoE (sigmoid scores, bias-corrected group-limited
selection, shared experts, routed scale, dense first layers in their own stack) and YaRN
with its mscale on the softmax scale, past the original context; export back."""

import json

import jax

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_oracle import oracles  # noqa: E402
from jaxlm.errors import CheckpointError  # noqa: E402
from jaxlm.model.hf import config_from_hf, load_hf, save_hf  # noqa: E402

V = 97
# 3 layers: one dense, two MoE (a scanned stack each); 6 experts in 3 groups of 2, each
# token in its 2 best groups; YaRN from 16 to 64 positions with both mscales
CONFIG = dict(
    vocab_size=V, hidden_size=40, intermediate_size=24, moe_intermediate_size=12,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12,
    kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
    n_routed_experts=6, num_experts_per_tok=2, n_group=3, topk_group=2, n_shared_experts=1,
    routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
    max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
    pad_token_id=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.8, "mscale_all_dim": 0.6})
T = 22  # past the original 16
TOKENS = np.random.default_rng(0).integers(0, V, (2, T))
MASK = np.array([[1] * T, [1] * (T - 4) + [0] * 4])


def hf_model(**changes):
    config = transformers.DeepseekV3Config(**{**CONFIG, **changes},
                                           attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # weights ~0.1, norms near 1, routers large, selection biases
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.3)
            elif p.is_floating_point() and "inv_freq" not in name:
                p.normal_(0, 0.1)
    return model


torch_logits, jax_logits, assert_close = oracles(TOKENS, MASK)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(HF model, its dir, our cfg, our params)."""
    path = tmp_path_factory.mktemp("deepseek") / "hf"
    model = hf_model()
    model.save_pretrained(path)
    cfg, params = load_hf(path)
    return model, path, cfg, params


def test_forward_and_export_equal_transformers(deepseek, tmp_path):
    model, path, cfg, params = deepseek
    assert (cfg.mla.kv_lora_rank, cfg.head_dim, cfg.moe.first_dense, cfg.moe.n_groups,
            cfg.rope.scaling) == (10, 10, 1, 3, "yarn")
    assert jnp.shape(params["dense_layers"]["mlp"]["up"]) == (1, 40, 24)
    assert jnp.shape(params["layers"]["mlp"]["gate"]) == (2, 6, 40, 12)
    ours = jax_logits(cfg, params)
    assert_close(ours, torch_logits(model))

    save_hf(tmp_path / "out", cfg, params)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["DeepseekV3ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             attn_implementation="eager")
    assert_close(torch_logits(back.eval()), ours)
    assert config_from_hf(written) == cfg

    # no q low-rank path, RoPE pairs (i, i + d/2), no group limit, no dense layers
    other = hf_model(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                     first_k_dense_replace=0, norm_topk_prob=False)
    other.save_pretrained(tmp_path / "other")
    cfg2, params2 = load_hf(tmp_path / "other")
    assert not cfg2.mla.q_lora_rank and "dense_layers" not in params2
    assert_close(jax_logits(cfg2, params2), torch_logits(other))


def test_mtp_modules_export_and_load_back(deepseek, tmp_path):
    """transformers' save_pretrained drops the MTP layers (num_nextn_predict_layers=1 in
    its config.json, none in its weights): that dir loads with model.mtp_depth=0. With
    modules (mtp_depth=1, random weights) export writes model.layers.{n}.* (enorm, hnorm,
    eh_proj, shared_head.norm / head, embed_tokens, a MoE layer), import reads them back
    exactly, and transformers, which ignores them, gives our main model's logits."""
    import dataclasses
    from safetensors import safe_open
    from jaxlm.model import model_specs
    from jaxlm.model.hf import model_config
    from jaxlm.model.params import initialize
    model, path, cfg, params = deepseek
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert cfg.mtp_depth == 0 and "mtp" not in params and model_config(path).mtp_depth == 0
    cfg1 = dataclasses.replace(cfg, mtp_depth=1)
    mtp = initialize(model_specs(cfg1), jax.random.key(5))["mtp"]
    params1 = {**params, "mtp": mtp}
    save_hf(tmp_path / "out", cfg1, params1)
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        keys = set(f.keys())
        np.testing.assert_array_equal(f.get_tensor("model.layers.3.eh_proj.weight"),
                                      np.asarray(mtp["eh_proj"][0]).T)
        np.testing.assert_array_equal(f.get_tensor("model.layers.3.shared_head.head.weight"),
                                      f.get_tensor("lm_head.weight"))
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head",
                 "embed_tokens", "input_layernorm", "self_attn.kv_b_proj",
                 "mlp.gate.e_score_correction_bias", "mlp.experts.5.down_proj",
                 "mlp.shared_experts.up_proj"):
        assert f"model.layers.3.{name}.weight" in keys or \
            f"model.layers.3.{name}" in keys, name
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "num_nextn_predict_layers"] == 1
    cfg2, params2 = load_hf(tmp_path / "out")
    assert cfg2.mtp_depth == 1 and model_config(tmp_path / "out").mtp_depth == 1
    jax.tree.map(np.testing.assert_array_equal, params2, params1)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             attn_implementation="eager")
    assert_close(torch_logits(back.eval()), jax_logits(cfg2, params2))


@pytest.mark.parametrize("change, words", [
    ({"attention_bias": True}, "attention_bias=True"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"topk_method": "greedy"}, "topk_method='greedy'"),
])
def test_unbuilt_keys_are_refused_in_one_line(change, words):
    hf = {"model_type": "deepseek_v3", **{k: v for k, v in CONFIG.items() if v is not None},
          **change}
    with pytest.raises(CheckpointError, match=words):
        config_from_hf(hf)


def test_greedy_generate_equals_transformers(deepseek):
    """Through the contiguous cache and the paged engine (both still hold full K/V)."""
    import jaxlm
    model, _, cfg, params = deepseek
    prompt = [int(t) for t in TOKENS[0, :12]]  # decoding runs past the original 16
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=8, do_sample=False,
            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    for cache in ("contiguous", "paged"):
        got = jaxlm.generate(params, cfg, [prompt], max_new_tokens=8, cache=cache, page_size=4)
        assert got.sequences()[0] == ref, cache


def test_the_cache_holds_the_latent_and_decodes_absorbed(deepseek):
    """Per token and layer the cache holds kv_lora_rank + qk_rope_head_dim values (no
    full K/V, no "v"), in the contiguous and the paged store; the absorbed decode's
    logits (prefill, then one token at a time) equal the full forward's; the latent
    cache is created sharded over batch under a mesh; `plan` counts the same bytes."""
    from jaxlm.model.kv import cache_shapes, init_cache, init_pages
    from jaxlm.model.kv.contiguous import Contiguous
    from jaxlm.model.families.decoder import decoder
    from jaxlm.model.layers.embeddings import unembed
    _, _, cfg, params = deepseek
    per_token = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim  # 14, full K/V: 2 * 4 * 10
    cache = init_cache(cfg, 2, 24)
    assert set(cache) == {"k", "lengths"} and cache["k"].shape == (3, 2, 24, 1, per_token)
    assert cache["k"].nbytes == 3 * 2 * 24 * per_token * 4
    pages = init_pages(cfg, 5, 4)
    assert set(pages) == {"k"} and pages["k"].nbytes == 3 * 5 * 4 * per_token * 4
    int8 = cache_shapes(cfg, 2, 24, kv_dtype="int8")
    assert int8["k"].shape[-1] == per_token and int8["k_scale"].shape == (3, 2, 24, 1)

    from jaxlm.config import load_config
    from jaxlm.sharding.plan import plan
    real = load_config("deepseek-v3", ["mesh.devices=1"])  # bf16: 61 layers of (512 + 64) * 2 B
    assert plan(real, 1, cache_len=1000, batch=3)["kv_cache"] == 61 * 3 * 1000 * 576 * 2

    full = jax_logits(cfg, params, TOKENS[:, :T], np.ones((2, T), int))
    @jax.jit
    def call(tokens, store):
        hidden, aux = decoder(params, cfg, tokens, store=store)
        return unembed(params, hidden, cfg), aux["store"]

    logits, store = call(jnp.array(TOKENS[:, :9]), Contiguous.of(cache, fresh=True))
    steps, store = [logits], Contiguous(store.kv, store.lengths)
    for t in range(9, T):  # one token at a time past the original 16
        logits, store = call(jnp.array(TOKENS[:, t:t + 1]), store)
        steps.append(logits)
    got = np.concatenate([np.asarray(x) for x in steps], axis=1)
    assert np.abs(got - full).max() <= 1e-5

    from jaxlm.config import MeshConfig
    from jaxlm.sharding.rules import use_mesh
    mesh = jax.make_mesh((8,), ("data",))
    with use_mesh(mesh, MeshConfig().rules):
        sharded = init_cache(cfg, 8, 16)["k"]
    assert sharded.sharding.spec[1] == "data"
    assert sorted(s.index[1].start for s in sharded.addressable_shards) == list(range(8))


def test_sharded_train_step_equals_one_device():
    """(2 data x 2 expert x 2 tensor): loss, grad norm, the MTP loss and params after one
    step equal one device (<= 1e-5), with the dense and the MoE stack and one MTP module,
    every leaf sharded as the rules say."""
    from test_families_2025 import one_step
    from test_sharding import assert_rule_shardings
    from jaxlm.model.config import MlaConfig, ModelConfig, MoeConfig, RopeConfig, YarnConfig
    mcfg = ModelConfig(
        vocab_size=128, d_model=64, n_layers=2, n_heads=8, d_ff=32, max_seq_len=32,
        mla=MlaConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8),
        moe=MoeConfig(n_experts=4, experts_per_token=2, router="sigmoid", n_groups=2,
                      topk_groups=1, n_shared=1, first_dense=1, dense_d_ff=48,
                      routed_scale=2.5),
        rope=RopeConfig(scaling="yarn", factor=4.0, original_max_len=8,
                        yarn=YarnConfig(mscale=1.0, mscale_all_dim=1.0)), mtp_depth=1)
    ref_metrics, ref_state, _, _ = one_step(mcfg, dict(data=1), jax.devices()[:1])
    metrics, state, cfg, tx = one_step(mcfg, dict(data=2, expert=2, tensor=2))
    assert metrics["mtp_loss"] > 0  # the MTP module's loss, train.mtp_loss_weight 0.3
    for k in ("loss", "grad_norm", "mtp_loss"):
        np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    assert_rule_shardings(cfg, tx, state)
    assert state.params["layers"]["mlp"]["gate"].sharding.spec[1] == "expert"
    assert state.params["mtp"]["block"]["mlp"]["gate"].sharding.spec[1] == "expert"
    assert not state.params["layers"]["attn"]["kv_b"].sharding.is_fully_replicated


PUBLISHED = {  # deepseek-ai/DeepSeek-V3's config.json as published (no rope_interleave)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
    "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280}


def test_published_config_the_written_one_and_the_preset_agree():
    """The published config.json, transformers 5's rewrite of it (rope_parameters,
    rope_interleave written out) and configs/deepseek-v3.yaml are one model; its fp8
    quantization_config is refused in one line."""
    import dataclasses
    from jaxlm.config import load_config
    a = config_from_hf(PUBLISHED)
    written = transformers.DeepseekV3Config(**{k: v for k, v in PUBLISHED.items()
                                               if k not in ("model_type", "architectures")})
    assert config_from_hf({**written.to_dict(), "model_type": "deepseek_v3"}) == a
    assert a.mla.rope_interleave and a.head_dim == 192 and a.rope.factor == 40
    preset = load_config("deepseek-v3", []).model
    assert dataclasses.replace(preset, dtype="float32", remat="none") == a
    # jaxlm plan's weights: the hub's 684.53B tensor elements of deepseek-ai/DeepSeek-V3
    # (its MTP layer and that layer's copies of the embedding and head included; its fp8
    # block scales, about 0.006%, too)
    from jaxlm.model import model_specs
    from jaxlm.model.params import count
    assert a.mtp_depth == 1
    total = count(model_specs(a)) + 2 * a.vocab_size * a.d_model
    assert abs(total / 684.53e9 - 1) < 1e-4, total
    with pytest.raises(CheckpointError, match="quant_method='fp8'"):
        config_from_hf({**PUBLISHED, "quantization_config": {"quant_method": "fp8"}})


def test_flops_count_the_latent_projections_and_both_stacks():
    """model_flops_per_token's matmul part is 6 x the matmul weights one token runs
    through: every layer weight but norms, biases, router bias (of the experts: the k
    routed ones), plus the head (a numpy count of the spec tree)."""
    import math
    from jaxlm.config import load_config
    from jaxlm.model import model_specs
    from jaxlm.model.config import model_flops_per_token
    from jaxlm.model.params import is_spec
    cfg = load_config("tiny-deepseek", []).model
    total = 0
    for path, s in jax.tree_util.tree_flatten_with_path(model_specs(cfg), is_leaf=is_spec)[0]:
        keys = [getattr(k, "key", "") for k in path]
        if keys[0] not in ("layers", "dense_layers", "head") or len(s.shape) < 2 + (
                keys[0] != "head") or "norm" in "".join(keys):
            continue
        n = math.prod(s.shape)
        if "experts" in s.axes:
            n = n * cfg.moe.experts_per_token // cfg.moe.n_experts
        total += n
    attn = 12.0 * cfg.n_layers * 64 * cfg.n_heads * cfg.head_dim / 2
    assert model_flops_per_token(cfg, 64) == 6.0 * total + attn
