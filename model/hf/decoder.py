"""Hugging Face decoder-only families: llama (Llama 1-3, incl. Llama-3 rope
scaling), mistral, qwen2, mixtral, gpt2.

* `config_from_hf(config_json_dict) -> ModelConfig`, `hf_config_from(cfg)`.
* `rules(cfg, hf, keys)`: the table (`jaxlm.model.hf.rules.Rule`) mapping every
  leaf of our tree to its HF tensor name ("{i}" layer, "{e}" expert) and layout;
  for fused HF tensors (GPT-2 `c_attn`, Mixtral `gate_up_proj`) which chunk is
  ours. Import and export read the same table. HF Linear weights are [out, in]
  (transposed to ours); GPT-2's Conv1D weights are [in, out] (our layout already).
  RoPE: our rotation pairs (i, i + D/2) like HF's `rotate_half`, so q/k need no
  permutation.

Mixtral experts come in two layouts, detected per checkpoint:
  per-expert (what `save_pretrained` writes by default, and older versions):
    model.layers.N.block_sparse_moe.gate.weight [E, D]
    model.layers.N.block_sparse_moe.experts.E.w1/w3/w2.weight  gate/up [F, D], down [D, F]
  fused (transformers 5 in memory; `save_pretrained(..., save_original_format=False)`):
    model.layers.N.mlp.gate.weight [E, D]
    model.layers.N.mlp.experts.gate_up_proj [E, 2F, D]  (gate rows first, then up)
    model.layers.N.mlp.experts.down_proj [E, D, F]
Export writes the per-expert layout.

Sequence classifiers (`LlamaForSequenceClassification`, ...,
`GPT2ForSequenceClassification`: `score.weight` [N, D] in place of `lm_head.weight`)
load as model.num_labels = N (hf/labels.py), and export as such.
"""

from __future__ import annotations

import json
import re

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig, MoeConfig, RopeConfig
from .io import CONFIG_FILE
from .labels import hf_label_fields, label_fields
from .rules import Rule, linear, merged
from ..layers.positions import SCALED_ROPE, rope_fields_from_hf, rope_parameters_to_hf

MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "gpt2")
SUPPORTED = MODEL_TYPES
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
# base model classes (no lm_head; keys without the `model.` / `transformer.` prefix):
# they load as model.head=false (hidden states only)
BASE_ARCHITECTURES = {"llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model",
                      "mixtral": "MixtralModel", "gpt2": "GPT2Model"}
# sequence classifiers (a score head, no lm_head): model.num_labels > 0 (hf/labels.py)
CLASSIFIER_ARCHITECTURES = {"llama": "LlamaForSequenceClassification",
                            "mistral": "MistralForSequenceClassification",
                            "qwen2": "Qwen2ForSequenceClassification",
                            "mixtral": "MixtralForSequenceClassification",
                            "gpt2": "GPT2ForSequenceClassification"}
_DEFAULT_THETA = {"mixtral": 1e6}  # else 10000
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


def _rope(hf: dict, model_type: str, max_len: int) -> RopeConfig:
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
        return RopeConfig(theta=float(theta))
    if kind == "llama3":
        return RopeConfig(theta=float(theta), scaling="llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                          high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                          original_max_len=int(params.get("original_max_position_embeddings")
                                               or max_len))
    if kind in SCALED_ROPE:
        return RopeConfig(theta=float(theta), **rope_fields_from_hf(kind, params, max_len))
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
        rope=_rope(hf, model_type, max_len))
    if model_type == "llama":
        bias = bool(_get(hf, "attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(_get(hf, "mlp_bias", False)))
    elif model_type == "qwen2":
        fields.update(qkv_bias=True)
    elif model_type == "mixtral":
        fields.update(moe=MoeConfig(
            n_experts=_get(hf, "num_local_experts", required=True),
            experts_per_token=_get(hf, "num_experts_per_tok", 2),
            aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001)), capacity_factor=0.0))
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

    param_dtype and dtype are float32 whatever the checkpoint's dtype (master weights;
    bf16 -> f32 is exact): callers that want bf16 ask for it.
    """
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{CONFIG_FILE}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    fields = _gpt2(hf_config) if model_type == "gpt2" else _llama_like(hf_config, model_type)
    fields["head"] = BASE_ARCHITECTURES[model_type] not in (hf_config.get("architectures") or ())
    fields.update(label_fields(hf_config))
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF family a config exports as."""
    if cfg.positions == "learned" and cfg.norm == "layernorm":
        return "gpt2"
    if cfg.moe.n_experts:
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
        need(not cfg.sliding_window and not cfg.moe.n_experts, "no sliding_window, no experts")
        return bad
    need(cfg.norm == "rmsnorm", "norm=rmsnorm")
    need(cfg.positions == "rope", "positions=rope")
    need(cfg.mlp in ("swiglu", "geglu") if model_type != "mixtral" else cfg.mlp == "swiglu",
         "mlp=swiglu" + ("" if model_type == "mixtral" else " or geglu"))
    need(bool(cfg.moe.n_experts) == (model_type == "mixtral"),
         "moe.n_experts > 0" if model_type == "mixtral" else "moe.n_experts=0")
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
    arch = (CLASSIFIER_ARCHITECTURES if cfg.num_labels else
            ARCHITECTURES if cfg.head else BASE_ARCHITECTURES)[model_type]
    common = {"architectures": [arch], "model_type": model_type,
              "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "use_cache": True, **hf_label_fields(cfg)}
    if model_type == "gpt2":
        act = {"relu": "relu"}.get(cfg.mlp, "gelu_new" if cfg.gelu_approximate else "gelu")
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "layer_norm_epsilon": cfg.norm_eps, "activation_function": act,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    act = "silu" if cfg.mlp == "swiglu" else ("gelu_pytorch_tanh" if cfg.gelu_approximate
                                             else "gelu")
    rope = {"rope_type": "default", "rope_theta": cfg.rope.theta}
    if cfg.rope.scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope.factor,
                    low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_len)
    rope.update(rope_parameters_to_hf(cfg))  # linear, dynamic, yarn
    out = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": act, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "attention_dropout": 0.0,
           # transformers 5 reads rope_parameters; 4.x reads rope_theta/rope_scaling
           "rope_parameters": rope, "rope_theta": cfg.rope.theta,
           "rope_scaling": rope if cfg.rope.scaling != "none" else None}
    window = cfg.sliding_window or None
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "qwen2":
        out.update(use_sliding_window=bool(window), sliding_window=window,
                   max_window_layers=0 if window else cfg.n_layers)
    else:
        out.update(sliding_window=window)
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.moe.n_experts,
                   num_experts_per_tok=cfg.moe.experts_per_token,
                   router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False,
                   router_jitter_noise=0.0)
    return out


# ------------------------------------------------------------------ the mapping

def rules(cfg: ModelConfig, hf: dict, keys=frozenset()) -> list[Rule]:
    """The table of cfg as hf["model_type"]; `keys` (the checkpoint's names) picks a
    prefix/layout on import."""
    if hf["model_type"] == "gpt2":
        return _gpt2_rules(cfg, keys)
    return _llama_rules(cfg, keys)


def _llama_rules(cfg, keys):
    pre = "" if ("embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys) \
        else "model."
    layer = pre + "layers.{i}."
    att = layer + "self_attn."
    heads = linear(1, 3)  # [n*hd, D] <-> [D, n, hd]
    head_bias = merged(2)  # [n*hd] <-> [n, hd]
    rules = [
        Rule(("embed", "tokens"), pre + "embed_tokens.weight"),
        Rule(("final_ln", "scale"), pre + "norm.weight"),
        Rule(("layers", "ln1", "scale"), layer + "input_layernorm.weight"),
        Rule(("layers", "ln2", "scale"), layer + "post_attention_layernorm.weight"),
        Rule(("layers", "attn", "q"), att + "q_proj.weight", heads),
        Rule(("layers", "attn", "k"), att + "k_proj.weight", heads),
        Rule(("layers", "attn", "v"), att + "v_proj.weight", heads),
        Rule(("layers", "attn", "o"), att + "o_proj.weight", linear(2, 3)),  # [D, H*hd]
    ]
    rules += _head_rules(cfg)
    if cfg.qkv_bias:
        rules += [Rule(("layers", "attn", w + "_bias"), att + f"{w}_proj.bias", head_bias)
                  for w in "qkv"]
    if cfg.out_bias:
        rules.append(Rule(("layers", "attn", "o_bias"), att + "o_proj.bias"))
    if cfg.moe.n_experts:
        return rules + _mixtral_expert_rules(layer, keys)
    for name in ("gate", "up", "down") if cfg.mlp in ("swiglu", "geglu") else ("up", "down"):
        rules.append(Rule(("layers", "mlp", name), layer + f"mlp.{name}_proj.weight",
                          linear(1, 2)))
        if cfg.mlp_bias:
            rules.append(Rule(("layers", "mlp", name + "_bias"), layer + f"mlp.{name}_proj.bias"))
    return rules


def _mixtral_expert_rules(layer, keys):
    if layer.format(i=0) + "mlp.experts.gate_up_proj" in keys:  # fused: [E, 2F, D], [E, D, F]
        experts = layer + "mlp.experts."
        swap = ((0,), (2,), (1,))  # HF [E, F, D] <-> ours [E, D, F]
        return [
            Rule(("layers", "mlp", "router"), layer + "mlp.gate.weight", linear(1, 2)),
            Rule(("layers", "mlp", "gate"), experts + "gate_up_proj", swap, (1, 0, 2)),
            Rule(("layers", "mlp", "up"), experts + "gate_up_proj", swap, (1, 1, 2)),
            Rule(("layers", "mlp", "down"), experts + "down_proj", swap),
        ]
    moe = layer + "block_sparse_moe."
    return [
        Rule(("layers", "mlp", "router"), moe + "gate.weight", linear(1, 2)),
        Rule(("layers", "mlp", "gate"), moe + "experts.{e}.w1.weight", linear(1, 2)),
        Rule(("layers", "mlp", "up"), moe + "experts.{e}.w3.weight", linear(1, 2)),
        Rule(("layers", "mlp", "down"), moe + "experts.{e}.w2.weight", linear(1, 2)),
    ]


def _gpt2_rules(cfg, keys):
    pre = "" if ("wte.weight" in keys and "transformer.wte.weight" not in keys) \
        else "transformer."
    layer = pre + "h.{i}."
    rules = [
        Rule(("embed", "tokens"), pre + "wte.weight"),
        Rule(("positions", "table"), pre + "wpe.weight"),
        Rule(("final_ln", "scale"), pre + "ln_f.weight"),
        Rule(("final_ln", "bias"), pre + "ln_f.bias"),
        Rule(("layers", "attn", "o"), layer + "attn.c_proj.weight", merged(2, 1)),
        Rule(("layers", "attn", "o_bias"), layer + "attn.c_proj.bias"),
        Rule(("layers", "mlp", "up"), layer + "mlp.c_fc.weight"),  # Conv1D [in, out]: ours
        Rule(("layers", "mlp", "up_bias"), layer + "mlp.c_fc.bias"),
        Rule(("layers", "mlp", "down"), layer + "mlp.c_proj.weight"),
        Rule(("layers", "mlp", "down_bias"), layer + "mlp.c_proj.bias"),
    ]
    for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
        rules += [Rule(("layers", ours, "scale"), layer + theirs + ".weight"),
                  Rule(("layers", ours, "bias"), layer + theirs + ".bias")]
    for j, name in enumerate("qkv"):  # c_attn [D, 3*H*hd], [3*H*hd]: q, k, v chunks
        rules += [Rule(("layers", "attn", name), layer + "attn.c_attn.weight", merged(1, 2),
                       (1, j, 3)),
                  Rule(("layers", "attn", name + "_bias"), layer + "attn.c_attn.bias",
                       merged(2), (0, j, 3))]
    return rules + _head_rules(cfg)


def _head_rules(cfg):
    """lm_head [V, D] <-> head [D, V] (untied LM heads); a classifier's score [N, D]."""
    if cfg.num_labels:
        return [Rule(("score", "kernel"), "score.weight", linear(1, 2))]
    if cfg.head and not cfg.tie_embeddings:
        return [Rule(("head", "kernel"), "lm_head.weight", linear(1, 2))]
    return []


def unused_ok(name: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that no config reads (buffers, a tied head)."""
    return bool(_IGNORED.search(name)) or (cfg.tie_embeddings and name.endswith("lm_head.weight"))


hf_config = hf_config_from

__all__ = ["MODEL_TYPES", "config_from_hf", "hf_config_from", "hf_config", "infer_model_type",
           "rules", "unused_ok"]
