"""Hugging Face checkpoints <-> (ModelConfig, params), decoder-only families.

Families (`model_type`): llama (Llama 1-3, incl. Llama-3 rope scaling),
mistral, qwen2, mixtral, gpt2.

* `config_from_hf(config_json_dict) -> ModelConfig`, `hf_config_from(cfg)`.
* `load_hf(dir) -> (cfg, params)` reads `config.json` and the safetensors
  (`model.safetensors`, or shards listed in `model.safetensors.index.json`)
  with numpy: no torch. Each parameter leaf is built on its own (its per-layer
  tensors stacked, transposed, cast to the param dtype, made a jax array), so
  host memory peaks at about one model plus one leaf.
* `save_hf(dir, cfg, params)` writes `config.json` + safetensors (sharded past
  `max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained`
  loads; into a temporary directory renamed at the end.

One table per family (`_rules`) maps every leaf of our tree to its HF tensor
name ("{i}" layer, "{e}" expert), the transform both ways, and for fused HF
tensors (GPT-2 `c_attn`, Mixtral `gate_up_proj`) which chunk is ours. Import
and export read the same table. HF Linear weights are [out, in] (transposed to
ours); GPT-2's Conv1D weights are [in, out] (our layout already). RoPE: our
rotation pairs (i, i + D/2) like HF's `rotate_half`, so q/k need no permutation.

Mixtral experts come in two layouts, detected per checkpoint:
  per-expert (what `save_pretrained` writes by default, and older versions):
    model.layers.N.block_sparse_moe.gate.weight [E, D]
    model.layers.N.block_sparse_moe.experts.E.w1/w3/w2.weight  gate/up [F, D], down [D, F]
  fused (transformers 5 in memory; `save_pretrained(..., save_original_format=False)`):
    model.layers.N.mlp.gate.weight [E, D]
    model.layers.N.mlp.experts.gate_up_proj [E, 2F, D]  (gate rows first, then up)
    model.layers.N.mlp.experts.down_proj [E, D, F]
Export writes the per-expert layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.model.families import model_specs
from jaxlm.model.hf_io import (CONFIG_FILE, CheckpointReader, named_leaves, read_config,
                               write_checkpoint)
from jaxlm.model.layers.positions import SCALED_ROPE, rope_fields_from_hf, rope_parameters_to_hf
from jaxlm.model.params import abstract

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
_DEFAULT_THETA = {"mixtral": 1e6}  # else 10000
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "float": "float32"}
# llama-style hidden_act -> (our gated mlp, gelu_approximate)
_GATED_ACTS = {"silu": ("swiglu", False), "swish": ("swiglu", False), "gelu": ("geglu", False),
               "gelu_pytorch_tanh": ("geglu", True), "gelu_new": ("geglu", True)}
# gpt2 activation_function -> (our mlp, gelu_approximate)
_PLAIN_ACTS = {"gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
               "gelu_fast": ("gelu", True), "gelu": ("gelu", False), "relu": ("relu", False)}
# Tensors a checkpoint may hold that no config reads (buffers, not weights).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


# ------------------------------------------------------------------ configs

def _get(hf: dict, key: str, default=None, required=False):
    value = hf.get(key)
    if value is None:
        if required:
            raise CheckpointError(f"{CONFIG_FILE}: missing {key!r} (needed for model_type "
                                  f"{hf.get('model_type')!r})")
        return default
    return value


def _dtype_of(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), "float32")


def _rope_fields(hf: dict, model_type: str, max_len: int) -> dict:
    # transformers 4 writes rope_theta + rope_scaling; 5 writes rope_parameters
    # (rope_theta inside). Like transformers 5, a legacy rope_scaling wins.
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type
        kinds = {json.dumps(v, sort_keys=True) for v in params.values() if v}
        if len(kinds) > 1:
            raise CheckpointError(f"{CONFIG_FILE}: different rope_parameters per layer type "
                                  "are not supported")
        params = next(v for v in params.values() if v)
    theta = params.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_THETA.get(model_type, 1e4)
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise CheckpointError(f"{CONFIG_FILE}: partial_rotary_factor={partial} is not supported")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind == "llama3":
        return {"rope_theta": float(theta), "rope_scaling": "llama3",
                "rope_scaling_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(params.get("high_freq_factor", 4.0)),
                "rope_original_max_len": int(params.get("original_max_position_embeddings")
                                             or max_len)}
    if kind in SCALED_ROPE:
        return {"rope_theta": float(theta), **rope_fields_from_hf(kind, params, max_len)}
    raise CheckpointError(f"{CONFIG_FILE}: rope_type {kind!r} is not supported "
                          f"(supported: default, llama3, {', '.join(SCALED_ROPE)})")


def _window(hf: dict, model_type: str, n_layers: int) -> int:
    window = hf.get("sliding_window") or 0
    if model_type in ("mistral", "mixtral"):
        return int(window)
    if model_type != "qwen2":
        return 0
    # qwen2: a window only where use_sliding_window, on layers >= max_window_layers
    if not hf.get("use_sliding_window") or not window:
        return 0
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)]
    if all(t == "full_attention" for t in types):
        return 0
    if all(t == "sliding_attention" for t in types):
        return int(window)
    raise CheckpointError(f"{CONFIG_FILE}: a sliding window on some layers only (layer_types "
                          f"{types}) is not supported; the window must cover all layers or none")


def _llama_like(hf: dict, model_type: str) -> dict:
    d = _get(hf, "hidden_size", required=True)
    heads = _get(hf, "num_attention_heads", required=True)
    n_layers = _get(hf, "num_hidden_layers", required=True)
    max_len = _get(hf, "max_position_embeddings", 2048)
    act = _get(hf, "hidden_act", "silu")
    if act not in _GATED_ACTS or (model_type == "mixtral" and act not in ("silu", "swish")):
        raise CheckpointError(f"{CONFIG_FILE}: hidden_act {act!r} is not supported for "
                              f"{model_type} (supported: silu"
                              + ("" if model_type == "mixtral" else ", gelu, gelu_pytorch_tanh")
                              + ")")
    mlp, approximate = _GATED_ACTS[act]
    fields = dict(
        vocab_size=_get(hf, "vocab_size", required=True), d_model=d, n_layers=n_layers,
        n_heads=heads, n_kv_heads=_get(hf, "num_key_value_heads", heads),
        head_dim=_get(hf, "head_dim", 0), d_ff=_get(hf, "intermediate_size", required=True),
        max_seq_len=max_len, norm="rmsnorm", norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        mlp=mlp, gelu_approximate=approximate, positions="rope",
        sliding_window=_window(hf, model_type, n_layers),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        init_std=float(_get(hf, "initializer_range", 0.02)),
        **_rope_fields(hf, model_type, max_len))
    if model_type == "llama":
        bias = bool(_get(hf, "attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(_get(hf, "mlp_bias", False)))
    elif model_type == "qwen2":
        fields.update(qkv_bias=True)
    elif model_type == "mixtral":
        fields.update(n_experts=_get(hf, "num_local_experts", required=True),
                      experts_per_token=_get(hf, "num_experts_per_tok", 2),
                      router_aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001)),
                      moe_capacity_factor=0.0)
    return fields


def _gpt2(hf: dict) -> dict:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if key in hf and bool(hf[key]) != ok:
            raise CheckpointError(f"{CONFIG_FILE}: gpt2 with {key}={hf[key]} is not supported")
    act = _get(hf, "activation_function", "gelu_new")
    if act not in _PLAIN_ACTS:
        raise CheckpointError(f"{CONFIG_FILE}: activation_function {act!r} is not supported "
                              f"(supported: {', '.join(_PLAIN_ACTS)})")
    mlp, approximate = _PLAIN_ACTS[act]
    d = _get(hf, "n_embd", 768)
    return dict(
        vocab_size=_get(hf, "vocab_size", 50257), d_model=d, n_layers=_get(hf, "n_layer", 12),
        n_heads=_get(hf, "n_head", 12), d_ff=_get(hf, "n_inner") or 4 * d,
        max_seq_len=_get(hf, "n_positions", 1024), norm="layernorm",
        norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), mlp=mlp,
        gelu_approximate=approximate, positions="learned", qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        init_std=float(_get(hf, "initializer_range", 0.02)))


def config_from_hf(hf_config: dict) -> ModelConfig:
    """The ModelConfig of an HF `config.json` (as a dict); CheckpointError if unsupported.

    param_dtype and dtype are the checkpoint's `dtype` (`torch_dtype`), else float32.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{CONFIG_FILE}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    fields = _gpt2(hf_config) if model_type == "gpt2" else _llama_like(hf_config, model_type)
    dtype = _dtype_of(hf_config)
    try:
        return ModelConfig(dtype=dtype, param_dtype=dtype, **fields)
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF family a config exports as."""
    if cfg.positions == "learned" and cfg.norm == "layernorm":
        return "gpt2"
    if cfg.n_experts:
        return "mixtral"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    if cfg.sliding_window:
        return "mistral"
    return "llama"


def _export_problems(cfg: ModelConfig, model_type: str) -> list[str]:
    bad = []
    def need(ok, what):
        if not ok:
            bad.append(what)
    need(cfg.family == "decoder", "family=decoder")
    need(getattr(cfg, "norm_position", "pre") == "pre", "norm_position=pre")
    need(getattr(cfg, "attn_scale", 0.0) in (0.0, cfg.head_dim ** -0.5), "attn_scale=0")
    need(not getattr(cfg, "type_vocab_size", 0), "type_vocab_size=0")
    if model_type == "gpt2":
        need(cfg.norm == "layernorm", "norm=layernorm")
        need(cfg.positions == "learned", "positions=learned")
        need(cfg.mlp in ("gelu", "relu"), "mlp=gelu or relu")
        need(cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias,
             "qkv_bias, out_bias and mlp_bias true")
        need(cfg.n_kv_heads == cfg.n_heads, "n_kv_heads == n_heads")
        need(cfg.head_dim * cfg.n_heads == cfg.d_model, "head_dim * n_heads == d_model")
        need(not cfg.sliding_window and not cfg.n_experts, "no sliding_window, no experts")
        return bad
    need(cfg.norm == "rmsnorm", "norm=rmsnorm")
    need(cfg.positions == "rope", "positions=rope")
    need(cfg.mlp in ("swiglu", "geglu") if model_type != "mixtral" else cfg.mlp == "swiglu",
         "mlp=swiglu" + ("" if model_type == "mixtral" else " or geglu"))
    need(bool(cfg.n_experts) == (model_type == "mixtral"),
         "n_experts > 0" if model_type == "mixtral" else "n_experts=0")
    if model_type == "llama":
        need(cfg.qkv_bias == cfg.out_bias, "qkv_bias == out_bias (attention_bias)")
        need(not cfg.sliding_window, "sliding_window=0")
    elif model_type == "qwen2":
        need(cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias,
             "qkv_bias=true, out_bias=false, mlp_bias=false")
    else:
        need(not (cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias), "no biases")
    return bad


def hf_config_from(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """The HF `config.json` dict of cfg (model_type inferred when None); ConfigError if
    cfg cannot be expressed in that family."""
    model_type = model_type or infer_model_type(cfg)
    if model_type not in SUPPORTED:
        raise ConfigError(f"hf export: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED)})")
    bad = _export_problems(cfg, model_type)
    if bad:
        raise ConfigError(f"hf export: this config cannot be written as {model_type}; "
                          f"it needs {'; '.join(bad)}")
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
              "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "use_cache": True}
    if model_type == "gpt2":
        act = {"relu": "relu"}.get(cfg.mlp, "gelu_new" if cfg.gelu_approximate else "gelu")
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": act,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    act = "silu" if cfg.mlp == "swiglu" else ("gelu_pytorch_tanh" if cfg.gelu_approximate
                                             else "gelu")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    rope.update(rope_parameters_to_hf(cfg))  # linear, dynamic, yarn
    out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": act, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "attention_dropout": 0.0,
           # transformers 5 reads rope_parameters; 4.x reads rope_theta/rope_scaling
           "rope_parameters": rope, "rope_theta": cfg.rope_theta,
           "rope_scaling": rope if cfg.rope_scaling != "none" else None}
    window = cfg.sliding_window or None
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "qwen2":
        out.update(use_sliding_window=bool(window), sliding_window=window,
                   max_window_layers=0 if window else cfg.n_layers)
    else:
        out.update(sliding_window=window)
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                   router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False,
                   router_jitter_noise=0.0)
    return out


# ------------------------------------------------------------------ the mapping

class Rule(NamedTuple):
    """One leaf of our tree <-> HF tensors.

    key: HF name; "{i}" is the layer (leaf stacked on axis 0), "{e}" the
    expert (axis 1). to_ours / to_hf: one layer's (expert's) tensor both ways,
    using only `.T`, `.reshape`, `.transpose` (so shapes come from
    jax.eval_shape). part (axis, index, count): ours is chunk `index` of
    `count` equal chunks of the HF tensor along `axis` (fused tensors).
    """
    path: tuple
    key: str
    to_ours: Callable
    to_hf: Callable
    part: tuple | None = None


def _same(w):
    return w


def _transposed(w):
    return w.T


def _rules(cfg: ModelConfig, model_type: str, keys=frozenset()) -> list[Rule]:
    """The table for cfg; `keys` (the checkpoint's names) picks a prefix/layout on import."""
    if model_type == "gpt2":
        return _gpt2_rules(cfg, keys)
    return _llama_rules(cfg, model_type, keys)


def _llama_rules(cfg, model_type, keys):
    d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pre = "" if ("embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys) \
        else "model."
    layer = pre + "layers.{i}."
    att = layer + "self_attn."

    def heads(n):  # [n*hd, D] <-> [D, n, hd]
        return (lambda w: w.T.reshape(d, n, hd)), (lambda w: w.reshape(d, n * hd).T)

    def head_bias(n):
        return (lambda b: b.reshape(n, hd)), (lambda b: b.reshape(n * hd))

    rules = [
        Rule(("embed", "tokens"), pre + "embed_tokens.weight", _same, _same),
        Rule(("final_ln", "scale"), pre + "norm.weight", _same, _same),
        Rule(("layers", "ln1", "scale"), layer + "input_layernorm.weight", _same, _same),
        Rule(("layers", "ln2", "scale"), layer + "post_attention_layernorm.weight", _same, _same),
        Rule(("layers", "attn", "q"), att + "q_proj.weight", *heads(h)),
        Rule(("layers", "attn", "k"), att + "k_proj.weight", *heads(kvh)),
        Rule(("layers", "attn", "v"), att + "v_proj.weight", *heads(kvh)),
        Rule(("layers", "attn", "o"), att + "o_proj.weight",
             lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule(("head", "kernel"), "lm_head.weight", _transposed, _transposed))
    if cfg.qkv_bias:
        rules += [Rule(("layers", "attn", "q_bias"), att + "q_proj.bias", *head_bias(h)),
                  Rule(("layers", "attn", "k_bias"), att + "k_proj.bias", *head_bias(kvh)),
                  Rule(("layers", "attn", "v_bias"), att + "v_proj.bias", *head_bias(kvh))]
    if cfg.out_bias:
        rules.append(Rule(("layers", "attn", "o_bias"), att + "o_proj.bias", _same, _same))
    if cfg.n_experts:
        return rules + _mixtral_expert_rules(cfg, layer, keys)
    for name in ("gate", "up", "down") if cfg.mlp in ("swiglu", "geglu") else ("up", "down"):
        rules.append(Rule(("layers", "mlp", name), layer + f"mlp.{name}_proj.weight",
                          _transposed, _transposed))
        if cfg.mlp_bias:
            rules.append(Rule(("layers", "mlp", name + "_bias"), layer + f"mlp.{name}_proj.bias",
                              _same, _same))
    return rules


def _mixtral_expert_rules(cfg, layer, keys):
    fused = layer.format(i=0) + "mlp.experts.gate_up_proj" in keys
    if fused:
        experts = layer + "mlp.experts."
        swap = lambda w: w.transpose(0, 2, 1)  # noqa: E731  [E,F,D] <-> [E,D,F]
        return [
            Rule(("layers", "mlp", "router"), layer + "mlp.gate.weight", _transposed, _transposed),
            Rule(("layers", "mlp", "gate"), experts + "gate_up_proj", swap, swap, (1, 0, 2)),
            Rule(("layers", "mlp", "up"), experts + "gate_up_proj", swap, swap, (1, 1, 2)),
            Rule(("layers", "mlp", "down"), experts + "down_proj", swap, swap),
        ]
    moe = layer + "block_sparse_moe."
    return [
        Rule(("layers", "mlp", "router"), moe + "gate.weight", _transposed, _transposed),
        Rule(("layers", "mlp", "gate"), moe + "experts.{e}.w1.weight", _transposed, _transposed),
        Rule(("layers", "mlp", "up"), moe + "experts.{e}.w3.weight", _transposed, _transposed),
        Rule(("layers", "mlp", "down"), moe + "experts.{e}.w2.weight", _transposed, _transposed),
    ]


def _gpt2_rules(cfg, keys):
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    pre = "" if ("wte.weight" in keys and "transformer.wte.weight" not in keys) \
        else "transformer."
    layer = pre + "h.{i}."
    heads = (lambda w: w.reshape(d, h, hd)), (lambda w: w.reshape(d, h * hd))  # Conv1D [in, out]
    head_bias = (lambda b: b.reshape(h, hd)), (lambda b: b.reshape(h * hd))
    rules = [
        Rule(("embed", "tokens"), pre + "wte.weight", _same, _same),
        Rule(("positions", "table"), pre + "wpe.weight", _same, _same),
        Rule(("final_ln", "scale"), pre + "ln_f.weight", _same, _same),
        Rule(("final_ln", "bias"), pre + "ln_f.bias", _same, _same),
        Rule(("layers", "attn", "o"), layer + "attn.c_proj.weight",
             lambda w: w.reshape(h, hd, d), lambda w: w.reshape(h * hd, d)),
        Rule(("layers", "attn", "o_bias"), layer + "attn.c_proj.bias", _same, _same),
        Rule(("layers", "mlp", "up"), layer + "mlp.c_fc.weight", _same, _same),
        Rule(("layers", "mlp", "up_bias"), layer + "mlp.c_fc.bias", _same, _same),
        Rule(("layers", "mlp", "down"), layer + "mlp.c_proj.weight", _same, _same),
        Rule(("layers", "mlp", "down_bias"), layer + "mlp.c_proj.bias", _same, _same),
    ]
    for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
        rules += [Rule(("layers", ours, "scale"), layer + theirs + ".weight", _same, _same),
                  Rule(("layers", ours, "bias"), layer + theirs + ".bias", _same, _same)]
    for j, name in enumerate("qkv"):
        rules += [Rule(("layers", "attn", name), layer + "attn.c_attn.weight", *heads, (1, j, 3)),
                  Rule(("layers", "attn", name + "_bias"), layer + "attn.c_attn.bias",
                       *head_bias, (0, j, 3))]
    if not cfg.tie_embeddings:
        rules.append(Rule(("head", "kernel"), "lm_head.weight", _transposed, _transposed))
    return rules


def _slots(rule: Rule, shape: tuple):
    """(index into our leaf, HF tensor name) for every HF tensor of the leaf."""
    if rule.path[0] != "layers":
        return [((), rule.key)]
    if "{e}" in rule.key:
        return [((i, e), rule.key.format(i=i, e=e)) for i in range(shape[0])
                for e in range(shape[1])]
    return [((i,), rule.key.format(i=i)) for i in range(shape[0])]


def _hf_shape(rule: Rule, slot_shape: tuple) -> tuple:
    """Shape of the full HF tensor that one slot of our leaf comes from."""
    shape = list(jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(slot_shape, jnp.float32)).shape)
    if rule.part:
        axis, _, count = rule.part
        shape[axis] *= count
    return tuple(shape)


def _check_table(rules, names):
    ruled = [r.path for r in rules]
    if sorted(ruled) != sorted(names):  # a bug in this file, not in the checkpoint
        raise AssertionError(f"hf table does not cover the param tree: "
                             f"{set(ruled) ^ set(names)}")


# ------------------------------------------------------------------ reading

def is_hf_checkpoint(path) -> bool:
    """A directory with an HF config.json naming a model_type."""
    config = pathlib.Path(os.fspath(path)) / CONFIG_FILE
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_hf(directory, *, dtype: str | None = None,
            param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF checkpoint directory (config.json + safetensors).

    dtype / param_dtype override the checkpoint's dtype (activations / weights).
    """
    directory = pathlib.Path(os.fspath(directory))
    hf = read_config(directory)
    cfg = config_from_hf(hf)
    try:
        cfg = dataclasses.replace(cfg, dtype=dtype or cfg.dtype,
                                  param_dtype=param_dtype or cfg.param_dtype)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with contextlib.ExitStack() as stack:
        reader = CheckpointReader(directory, stack)
        rules = {r.path: r for r in _rules(cfg, hf["model_type"], frozenset(reader.keys()))}
        named, treedef = named_leaves(abstract(model_specs(cfg)), sep=None)
        _check_table(rules.values(), [n for n, _ in named])
        leaves = [_load_leaf(reader, rules[name], spec) for name, spec in named]
        unused = sorted(k for k in reader.keys() if k not in reader.used
                        and not _IGNORED.search(k)
                        and not (cfg.tie_embeddings and k.endswith("lm_head.weight")))
    if unused:
        raise CheckpointError(
            f"{len(unused)} tensors in {directory} are not used by its {CONFIG_FILE} "
            f"({hf['model_type']}): {', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


def _load_leaf(reader: CheckpointReader, rule: Rule, spec: jax.ShapeDtypeStruct) -> jax.Array:
    slots = _slots(rule, spec.shape)
    depth = len(slots[0][0])
    hf_shape = _hf_shape(rule, spec.shape[depth:])
    buf = np.empty(spec.shape, spec.dtype)
    for index, key in slots:
        buf[index] = rule.to_ours(reader.read(key, hf_shape, rule.part))  # casts to param dtype
    out = jnp.asarray(buf)
    del buf
    return out


# ------------------------------------------------------------------ writing

def _export_tensors(cfg: ModelConfig, params: dict, model_type: str):
    """(HF name, numpy tensor) pairs, one at a time, fused parts concatenated."""
    rules = _rules(cfg, model_type)
    named, _ = named_leaves(params, sep=None)
    leaves = dict(named)
    _check_table(rules, list(leaves))
    groups: dict[str, list[Rule]] = {}
    for r in rules:
        groups.setdefault(r.key, []).append(r)
    for template, group in groups.items():
        group.sort(key=lambda r: r.part[1] if r.part else 0)
        host = [np.asarray(leaves[r.path]) for r in group]
        for index, key in _slots(group[0], host[0].shape):
            pieces = [np.asarray(r.to_hf(a[index])) for r, a in zip(group, host)]
            tensor = (pieces[0] if len(pieces) == 1
                      else np.concatenate(pieces, axis=group[0].part[0]))
            yield key, np.ascontiguousarray(tensor)


def _check_params(cfg: ModelConfig, params):
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(cfg)))
    try:
        got = jax.tree.map(lambda a: tuple(a.shape), params)
    except AttributeError:
        got = None
    if expected != got:
        raise ConfigError("save_hf: params do not match the config's parameter shapes")


def save_hf(directory, cfg: ModelConfig, params, model_type: str | None = None, *,
            max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Write cfg + params as an HF checkpoint dir; returns it.

    model_type: inferred from cfg when None (see `infer_model_type`). Weights
    keep the param dtype. Past `max_shard_bytes`, weights go into shards
    `model-0000k-of-0000n.safetensors` listed in `model.safetensors.index.json`.
    Refuses a directory that exists and is not empty; writes a temporary
    directory next to it and renames it at the end.
    """
    model_type = model_type or infer_model_type(cfg)
    hf = hf_config_from(cfg, model_type)
    _check_params(cfg, params)
    return write_checkpoint(directory, hf, _export_tensors(cfg, params, model_type),
                            max_shard_bytes, who="save_hf")


__all__ = ["SUPPORTED", "config_from_hf", "hf_config_from", "infer_model_type", "load_hf",
           "save_hf", "is_hf_checkpoint"]
