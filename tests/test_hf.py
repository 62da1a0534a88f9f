"""Hugging Face interop: logits parity with transformers for every decoder family,
export round trips, sharded and Mixtral layouts, dtypes, errors, HFTokenizer."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from hf_oracle import oracles  # noqa: E402
from jaxlm.errors import CheckpointError, ConfigError  # noqa: E402
from jaxlm.model import abstract, model_specs  # noqa: E402
from jaxlm.model.config import ModelConfig, MoeConfig, RopeConfig  # noqa: E402
from jaxlm.model.hf import (config_from_hf, hf_config_from, infer_model_type,  # noqa: E402
                            is_hf_checkpoint, load_hf, save_hf)

V = 99  # not a multiple of anything convenient
TOKENS = np.random.default_rng(0).integers(0, V, (2, 12))
MASK = np.array([[1] * 12, [1] * 8 + [0] * 4])  # right padding in row 1
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

FAMILIES = {
    # head_dim 12 (not d_model / heads), GQA, all biases, Llama-3 rope scaling
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=64, rms_norm_eps=1e-6)),
    # one KV head, tied head
    "llama_mqa_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
        tie_word_embeddings=True, max_position_embeddings=64)),
    # window 4 < sequence 12
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=4, max_position_embeddings=64)),
    # head_dim 12, one KV head, q/k/v biases
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=64)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
    # head_dim 9 (odd), n_inner None -> 4 * n_embd, tied head
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        n_embd=36, n_head=4, n_positions=32, bos_token_id=None, eos_token_id=None)),
}


def hf_model(family, **changes):
    config_cls, model_cls, kw = FAMILIES[family]
    layers = {"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2}
    config = config_cls(vocab_size=V, attn_implementation="eager", **layers, **{**kw, **changes})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    randomize(model)
    return model


def randomize(model):
    """Random weights everywhere (norm scales near 1), routers large: no near-tie top-k."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # Mixtral router [E, D]
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.1)


torch_logits, jax_logits, assert_close = oracles(TOKENS, MASK)


def random_params(cfg, seed=0):
    """jaxlm params of a useful size: weights ~0.1, norm scales ~1, routers ~1.

    Drawn with numpy over the spec tree (the shapes `init_params` makes):
    per-leaf jax RNG would compile once per shape, seconds per config on CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        name = jax.tree_util.keystr(path)
        z = rng.standard_normal(spec.shape).astype(np.float32)
        out = 1 + 0.1 * z if "scale" in name else (z if "router" in name else 0.1 * z)
        return jnp.asarray(out, spec.dtype)
    return jax.tree_util.tree_map_with_path(draw, abstract(model_specs(cfg)))


def rewrite(src, dst, change):
    """Copy a single-file checkpoint, passing its tensors dict through `change`."""
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------ import parity

@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    assert is_hf_checkpoint(tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg.vocab_size == V and params["embed"]["tokens"].shape == (V, cfg.d_model)
    ours = jax_logits(cfg, params)
    assert_close(ours, torch_logits(model))
    if family == "mistral":  # the window matters here, so the parity above tests it
        assert cfg.sliding_window == 4
        no_window = jax_logits(dataclasses.replace(cfg, sliding_window=0), params)
        assert np.abs(no_window - ours)[:, 4:].max() > 1e-3
    if family == "llama":
        assert cfg.rope.scaling == "llama3" and cfg.head_dim == 12 and cfg.out_bias
    if family == "gpt2":
        assert (cfg.head_dim, cfg.d_ff, cfg.tie_embeddings) == (9, 144, True)


def test_bfloat16_checkpoint_loads_into_float32_masters(tmp_path):
    model = hf_model("llama_mqa_tied").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    cfg, params = load_hf(tmp_path)  # default: float32 masters, bf16 -> f32 exactly
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "float32")
    assert params["layers"]["attn"]["q"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"][0]).reshape(48, -1),
                                  q0.T)
    cfg16, params16 = load_hf(tmp_path, dtype="bfloat16", param_dtype="bfloat16")  # kept bf16
    assert cfg16.param_dtype == "bfloat16" and params16["embed"]["tokens"].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b),
                 params16, params)
    # a fresh float32 model: `.float()` would keep the rotary inv_freq rounded to bf16
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert_close(jax_logits(cfg, params), torch_logits(reference))


def test_sharded_checkpoint_loads(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    _, one = load_hf(tmp_path / "one")
    _, sharded = load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, one, sharded)


def fused_from_per_expert(tensors, n_layers, n_experts):
    """The transformers-5 fused Mixtral layout, built with numpy from per-expert tensors."""
    out = {k: v for k, v in tensors.items() if "block_sparse_moe" not in k}
    for i in range(n_layers):
        moe = f"model.layers.{i}.block_sparse_moe."
        expert = lambda e, w: tensors[f"{moe}experts.{e}.{w}.weight"]  # noqa: E731
        out[f"model.layers.{i}.mlp.gate.weight"] = tensors[moe + "gate.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([expert(e, "w1"), expert(e, "w3")]) for e in range(n_experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(
            [expert(e, "w2") for e in range(n_experts)])
    return out


def test_mixtral_per_expert_and_fused_layouts_agree(tmp_path):
    model = hf_model("mixtral")
    model.save_pretrained(tmp_path / "per_expert")  # what save_pretrained writes by default
    with safe_open(str(tmp_path / "per_expert" / "model.safetensors"), "numpy") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()
    rewrite(tmp_path / "per_expert", tmp_path / "fused",
            lambda t: fused_from_per_expert(t, n_layers=2, n_experts=4))
    _, per_expert = load_hf(tmp_path / "per_expert")
    _, fused = load_hf(tmp_path / "fused")
    jax.tree.map(np.testing.assert_array_equal, per_expert, fused)
    try:  # transformers >= 5 can write its in-memory (fused) layout itself
        model.save_pretrained(tmp_path / "hf_fused", save_original_format=False)
    except TypeError:
        return
    with safe_open(str(tmp_path / "hf_fused" / "model.safetensors"), "numpy") as f, \
            safe_open(str(tmp_path / "fused" / "model.safetensors"), "numpy") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for k in f.keys():
            np.testing.assert_array_equal(f.get_tensor(k), g.get_tensor(k))


# ------------------------------------------------------------------ export

EXPORTS = {
    "llama": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=12, d_ff=40, max_seq_len=64,
                         rope=RopeConfig(theta=500.0, scaling="llama3", factor=4.0,
                                         original_max_len=32), norm_eps=1e-6),
    "gpt2": ModelConfig(vocab_size=V, d_model=36, n_layers=2, n_heads=4, d_ff=50, max_seq_len=32,
                        norm="layernorm", mlp="gelu", gelu_approximate=True,
                        positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                        tie_embeddings=True),
    "mixtral": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                           d_ff=40, max_seq_len=64,
                           moe=MoeConfig(n_experts=4, experts_per_token=2), sliding_window=5),
    "qwen2": ModelConfig(vocab_size=V, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40,
                         max_seq_len=64, qkv_bias=True, tie_embeddings=True),
    "mistral": ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=40, max_seq_len=64, sliding_window=4),
}


@pytest.mark.parametrize("family", list(EXPORTS))
def test_export_loads_in_transformers(family, tmp_path):
    cfg = EXPORTS[family]
    assert infer_model_type(cfg) == family
    params = random_params(cfg)
    shard = 30_000 if family == "llama" else 5 * 2**30  # llama: a sharded export
    save_hf(tmp_path / "out", cfg, params, max_shard_bytes=shard)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == (family == "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager").eval()
    assert type(model).__name__ == transformers.AutoModelForCausalLM._model_mapping[
        type(model.config)].__name__
    assert model.config.model_type == family
    assert_close(jax_logits(cfg, params), torch_logits(model))
    cfg2, params2 = load_hf(tmp_path / "out")  # and back, bit for bit
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_keeps_bfloat16(tmp_path):
    cfg = dataclasses.replace(EXPORTS["mixtral"], param_dtype="bfloat16", dtype="bfloat16")
    params = random_params(cfg)
    save_hf(tmp_path / "bf16", cfg, params)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    cfg2, params2 = load_hf(tmp_path / "bf16", param_dtype="bfloat16", dtype="bfloat16")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    cfg32, params32 = load_hf(tmp_path / "bf16")  # the default: float32 masters
    assert cfg32 == dataclasses.replace(cfg, param_dtype="float32", dtype="float32")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b),
                 params, params32)


def test_save_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path, monkeypatch):
    cfg = EXPORTS["qwen2"]
    params = random_params(cfg)
    save_hf(tmp_path / "ckpt", cfg, params)
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf(tmp_path / "ckpt", cfg, params)
    import safetensors.numpy
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(tmp_path / "crashed", cfg, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written dir
    with pytest.raises(ConfigError, match="cannot be written as mistral"):
        save_hf(tmp_path / "x", cfg, params, model_type="mistral")  # qkv biases
    with pytest.raises(ConfigError, match="do not match"):
        save_hf(tmp_path / "x", dataclasses.replace(cfg, d_ff=64), params)


# ------------------------------------------------------------------ configs

def test_config_mapping_transformers5_and_legacy_rope():
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, max_position_embeddings=128,
                                  rope_parameters=dict(LLAMA3_ROPE, rope_theta=5e5)).to_dict()
    cfg = config_from_hf(hf)
    assert (cfg.rope.scaling, cfg.rope.theta, cfg.rope.factor,
            cfg.rope.original_max_len) == ("llama3", 5e5, 4.0, 32)
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy.update(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 4.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})
    assert config_from_hf(legacy) == cfg
    with pytest.raises(CheckpointError, match="rope_type 'longrope'"):
        config_from_hf({**legacy, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    exported = hf_config_from(cfg)
    assert exported["rope_parameters"]["rope_type"] == "llama3"
    assert config_from_hf(exported) == cfg


def test_config_mapping_windows_and_gpt2():
    qwen = transformers.Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=40).to_dict()
    assert config_from_hf(qwen).sliding_window == 0  # use_sliding_window false
    everywhere = {**qwen, "use_sliding_window": True, "sliding_window": 16,
                  "max_window_layers": 0, "layer_types": None}
    assert config_from_hf(everywhere).sliding_window == 16
    half = config_from_hf({**everywhere, "max_window_layers": 1})  # layers 1, 3, ...: windowed
    assert (half.sliding_window, half.layer_pattern) == (16, "gl")
    with pytest.raises(CheckpointError, match="must repeat a pattern"):  # 15 full, then 5
        config_from_hf({**everywhere, "num_hidden_layers": 20, "max_window_layers": 15})
    mistral = transformers.MistralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=40, sliding_window=None).to_dict()
    assert config_from_hf(mistral).sliding_window == 0
    gpt2 = config_from_hf({"model_type": "gpt2", "vocab_size": V, "n_embd": 32, "n_layer": 2,
                           "n_head": 4, "n_positions": 64, "n_inner": None,
                           "activation_function": "gelu"})
    assert (gpt2.d_ff, gpt2.mlp, gpt2.gelu_approximate, gpt2.positions, gpt2.norm) == (
        128, "gelu", False, "learned", "layernorm")
    with pytest.raises(ConfigError, match="cannot be written as llama"):
        hf_config_from(EXPORTS["mixtral"], "llama")


# ------------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(path)
    return path


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = rewrite(llama_dir, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=f"'{name}' is missing"):
        load_hf(bad)


def test_shape_mismatch_names_tensor_and_both_shapes(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = rewrite(llama_dir, tmp_path / "bad",
                  lambda t: {**t, name: np.zeros((20, 32), np.float32)})
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[20, 32\].*\[24, 32\]"):
        load_hf(bad)
    edited = tmp_path / "edited"
    shutil.copytree(llama_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "intermediate_size": 44}))
    with pytest.raises(CheckpointError, match=r"mlp.down_proj.weight' has shape \[32, 40\].*"
                                              r"\[32, 44\]"):
        load_hf(edited)


def test_unsupported_and_incomplete_checkpoints(llama_dir, tmp_path):
    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(CheckpointError,
                       match="'bloom' is not supported.*llama, mistral, qwen2, mixtral, gpt2"):
        load_hf(bloom)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nowhere")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(llama_dir / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_hf(no_weights)
    extra = rewrite(llama_dir, tmp_path / "extra",
                    lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(12, "f4")})
    with pytest.raises(CheckpointError, match="not used.*q_norm"):
        load_hf(extra)
    (no_weights / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hf(no_weights)


def test_gpt2_without_transformer_prefix(tmp_path):
    """Hub GPT-2 checkpoints name tensors `h.0.attn...`, `wte.weight` (no prefix)."""
    model = hf_model("gpt2")
    model.save_pretrained(tmp_path / "prefixed")
    rewrite(tmp_path / "prefixed", tmp_path / "bare",
            lambda t: {k.removeprefix("transformer."): v for k, v in t.items()})
    _, a = load_hf(tmp_path / "prefixed")
    _, b = load_hf(tmp_path / "bare")
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------ tokenizer

def train_tiny_bpe(special=("<|endoftext|>", "<pad>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = ["def f(x):\n    return x + 1\n", "class A:\n\tpass\n", "print('hello world')\n"]
    tok.train_from_iterator(text * 20, trainer)
    return tok


def test_hf_tokenizer_round_trip_and_special_ids(tmp_path):
    from jaxlm.model.tokenizer import HFTokenizer, load_tokenizer
    train_tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == train_tiny_bpe().get_vocab_size() > 250
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)  # GPT-2 style: bos = eos
    for text in ["def f(x):\n    return x + 1\n", "  two  spaces\t\ttabs \n\n",
                 "unicode é 中文 😀", "literal <|endoftext|> stays text", ""]:
        ids = tok.encode(text, split_special_tokens=True)
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids  # split_special_tokens: special strings in text are text
    assert tok.encode("a <|endoftext|>") == tok.encode("a ") + [tok.eos_id]  # as transformers
    assert tok.encode_batch(["a b", "def"]) == [tok.encode("a b"), tok.encode("def")]
    ids = tok.encode("return x")
    assert tok.decode([tok.eos_id] + ids + [tok.pad_id, tok.pad_id]) == "return x"
    saved = tok.save(tmp_path / "copy")
    assert saved.name == "tokenizer.json"
    again = load_tokenizer(saved)
    assert again.encode("print(x)") == tok.encode("print(x)")
    assert (again.bos_id, again.eos_id, again.pad_id) == (0, 0, 1)


def test_hf_tokenizer_special_ids_from_tokenizer_config(tmp_path):
    from jaxlm.errors import InputError
    from jaxlm.model.tokenizer import load_tokenizer, require_eos
    train_tiny_bpe(("<unk>", "<s>", "</s>")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": None}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # pad falls back to unk
    again = load_tokenizer(tok.save(tmp_path / "copy").parent)
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    train_tiny_bpe(("<pad>",)).save(str(no_eos / "tokenizer.json"))
    tok = load_tokenizer(no_eos)  # allowed: generation then stops at max_new_tokens
    assert tok.eos_id is None and tok.pad_id == 0
    with pytest.raises(InputError, match="sft needs an EOS token"):
        require_eos(tok, "sft")
    (no_eos / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid tokenizer.json"):
        load_tokenizer(no_eos)


@pytest.mark.parametrize("family", ["llama", "mixtral", "mistral"])
def test_greedy_generation_matches_transformers(family, tmp_path):
    """jaxlm's compiled decode loop emits transformers' greedy tokens, token for token."""
    from jaxlm.infer.generate import generate
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(str(tmp_path))
    prompt = [int(t) for t in TOKENS[0, :5]]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                             max_new_tokens=10, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0)
    expected = ref[0, 5:].tolist()
    got = generate(params, cfg, [prompt], max_new_tokens=10)
    assert got.sequences()[0] == expected
