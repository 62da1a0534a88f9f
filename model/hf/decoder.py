"""Hugging Face decoder-only families: llama (Llama 1-3, incl. Llama-3 rope
scaling), mistral, qwen2, mixtral, gpt2, qwen3, qwen3_moe, phi3 (incl. LongRoPE),
gemma2, gemma3_text (Gemma 3's text model, `Gemma3ForCausalLM`), deepseek_v3.

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
Export writes the per-expert layout. Qwen3-MoE's experts are
`mlp.experts.E.{gate,up,down}_proj.weight` (or the same fused layout) with the router
`mlp.gate.weight`.

Phi-3's fused `qkv_proj` [(H + 2 KVH) * hd, D] and `gate_up_proj` [2F, D] load as
our separate q, k, v and gate, up (`Rule.part`) and export fused again. Gemma's
sandwich norms: input_layernorm -> ln1, post_attention_layernorm -> ln1_post,
pre_feedforward_layernorm -> ln2, post_feedforward_layernorm -> ln2_post; their
scales are stored zero-centred (model.norm_unit_offset), as HF's.

DeepSeek-V3: latent attention's q_a_proj / q_a_layernorm / q_b_proj (or q_proj),
kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj map to our q_a, q_b, kv_a, kv_b leaves
as they are (rope_interleave stays a config key: the model de-interleaves at run time);
the first first_k_dense_replace layers load into "dense_layers", the rest into
"layers" with `Rule.first` = first_k_dense_replace; the router's
`mlp.gate.e_score_correction_bias` is our `router_bias`, `mlp.shared_experts.*` our
`mlp.shared`. The MTP modules (model.layers.{num_hidden_layers + i}, num_nextn_predict_layers:
model.mtp_depth) load into "mtp" (enorm, hnorm, eh_proj, shared_head.norm and the usual
layer keys); their copies of the shared embed_tokens / shared_head.head are not read,
and export writes them back. A checkpoint without them (transformers' save_pretrained
drops them) loads with model.mtp_depth=0 (`fit_to_weights`).

Sequence classifiers (`LlamaForSequenceClassification`, ...,
`GPT2ForSequenceClassification`: `score.weight` [N, D] in place of `lm_head.weight`)
load as model.num_labels = N (hf/labels.py), and export as such.
"""

from __future__ import annotations

import dataclasses
import json
import re

from ...errors import CheckpointError, ConfigError
from ..config import MlaConfig, ModelConfig, MoeConfig, RopeConfig
from .io import CONFIG_FILE
from .labels import hf_label_fields, label_fields
from .rules import Rule, linear, merged
from ..layers.positions import SCALED_ROPE, rope_fields_from_hf, rope_parameters_to_hf

_CLASSES = {  # model_type: HF class prefix
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "mixtral": "Mixtral",
    "gpt2": "GPT2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "phi3": "Phi3",
    "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "deepseek_v3": "DeepseekV3"}
MODEL_TYPES = tuple(_CLASSES)
SUPPORTED = MODEL_TYPES
ARCHITECTURES = {t: f"{c}ForCausalLM" for t, c in _CLASSES.items()}
ARCHITECTURES.update(gpt2="GPT2LMHeadModel", gemma3_text="Gemma3ForCausalLM")
# base model classes (no lm_head; keys without the `model.` / `transformer.` prefix):
# they load as model.head=false (hidden states only)
BASE_ARCHITECTURES = {t: f"{c}Model" for t, c in _CLASSES.items()}
# sequence classifiers (a score head, no lm_head): model.num_labels > 0 (hf/labels.py)
CLASSIFIER_ARCHITECTURES = {t: f"{c}ForSequenceClassification" for t, c in _CLASSES.items()}
QWEN3 = ("qwen3", "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
_DEFAULT_THETA = {"mixtral": 1e6, "gemma3_text": 1e6}  # else 10000
# llama-style hidden_act -> (our gated mlp, gelu_approximate)
_GATED_ACTS = {"silu": ("swiglu", False), "swish": ("swiglu", False), "gelu": ("geglu", False),
               "gelu_pytorch_tanh": ("geglu", True), "gelu_new": ("geglu", True)}
# gpt2 activation_function -> (our mlp, gelu_approximate)
_PLAIN_ACTS = {"gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
               "gelu_fast": ("gelu", True), "gelu": ("gelu", False), "relu": ("relu", False)}
# Tensors a checkpoint may hold that no config reads (buffers, not weights).
_MTP_COPIES = re.compile(r"\.(embed_tokens|shared_head\.head)\.weight$")
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
    if model_type == "phi3" and kind in ("su", "yarn", "longrope"):  # HF's Phi-3 reads all three
        kind = "longrope"  # as LongRoPE, its pretraining length the top-level key's (HF: 4096)
        params = {**params, "original_max_position_embeddings": hf.get(
            "original_max_position_embeddings") or params.get(
            "original_max_position_embeddings") or 4096}
    elif kind in ("su", "longrope"):  # built and checked against transformers for Phi-3 only
        raise CheckpointError(f"{CONFIG_FILE}: rope_type {kind!r} is supported for model_type "
                              f"phi3 only, not {model_type!r}")
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


_GEMMA_PERIOD = {"gemma2": 2, "gemma3_text": 6}  # HF's default layer_types


def _window(hf: dict, model_type: str, n_layers: int) -> tuple[int, str]:
    """(model.sliding_window, model.layer_pattern) of the config."""
    window = hf.get("sliding_window") or 0
    if model_type in ("mistral", "mixtral", "phi3"):
        return int(window), ""
    if model_type == "qwen3_moe":  # every layer, where use_sliding_window
        return (int(window), "") if hf.get("use_sliding_window") else (0, "")
    if model_type in GEMMA:  # local layers by layer_types, else every P-th layer global
        period = hf.get("sliding_window_pattern") or _GEMMA_PERIOD[model_type]
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % period else "full_attention"
            for i in range(n_layers)]
    elif model_type in ("qwen2", "qwen3"):
        # a window only where use_sliding_window, on layers >= max_window_layers
        if not hf.get("use_sliding_window") or not window:
            return 0, ""
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layers)]
    else:
        return 0, ""
    return _pattern(types, int(window), n_layers)


def _pattern(types: list, window: int, n_layers: int) -> tuple[int, str]:
    """layer_types -> (sliding_window, layer_pattern): the shortest repeating pattern."""
    kinds = {"sliding_attention": "l", "full_attention": "g"}
    if len(types) != n_layers or set(types) - set(kinds):
        raise CheckpointError(f"{CONFIG_FILE}: layer_types={types} is not supported (one of "
                              f"{', '.join(kinds)} per layer, {n_layers} layers)")
    chars = "".join(kinds[t] for t in types)
    if "l" not in chars or not window:
        return 0, ""
    if "g" not in chars:
        return window, ""
    period = next(p for p in range(1, n_layers + 1)
                  if all(chars[i] == chars[i % p] for i in range(n_layers)))
    if period > max(8, n_layers // 2):  # no repeating pattern: the scan would unroll the stack
        raise CheckpointError(f"{CONFIG_FILE}: layer_types={types} is not supported: sliding "
                              "and full layers must repeat a pattern (at least twice)")
    return window, chars[:period]


def _llama_like(hf: dict, model_type: str) -> dict:
    d = _get(hf, "hidden_size", required=True)
    heads = _get(hf, "num_attention_heads", required=True)
    n_layers = _get(hf, "num_hidden_layers", required=True)
    max_len = _get(hf, "max_position_embeddings", 2048)
    act_key = "hidden_activation" if model_type in GEMMA else "hidden_act"  # Gemma: only this
    act = _get(hf, act_key, "gelu_pytorch_tanh" if model_type in GEMMA else "silu")
    moe_silu = model_type in ("mixtral", "qwen3_moe", "deepseek_v3")
    if act not in _GATED_ACTS or (moe_silu and act not in ("silu", "swish")):
        raise CheckpointError(f"{CONFIG_FILE}: {act_key} {act!r} is not supported for "
                              f"{model_type} (supported: silu"
                              + ("" if moe_silu else ", gelu, gelu_pytorch_tanh")
                              + ")")
    _refuse_unbuilt(hf, model_type)
    mlp, approximate = _GATED_ACTS[act]
    window, pattern = _window(hf, model_type, n_layers)
    fields = dict(
        vocab_size=_get(hf, "vocab_size", required=True), d_model=d, n_layers=n_layers,
        n_heads=heads, n_kv_heads=_get(hf, "num_key_value_heads", heads),
        head_dim=_get(hf, "head_dim", 0), d_ff=_get(hf, "intermediate_size", required=True),
        max_seq_len=max_len, norm="rmsnorm", norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        mlp=mlp, gelu_approximate=approximate, positions="rope",
        sliding_window=window, layer_pattern=pattern,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", model_type in GEMMA)),
        init_std=float(_get(hf, "initializer_range", 0.02)),
        rope=_gemma3_rope(hf, max_len) if model_type == "gemma3_text"
        else _rope(hf, model_type, max_len))
    if model_type in ("llama", *QWEN3, *GEMMA):
        bias = bool(_get(hf, "attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(_get(hf, "mlp_bias", False)))
    if model_type in QWEN3 or model_type == "gemma3_text":
        fields.update(qk_norm=True)
    if model_type in GEMMA:
        attn_cap, final_cap = (50.0, 30.0) if model_type == "gemma2" else (None, None)
        fields.update(norm_position="sandwich", norm_unit_offset=True, scale_embeddings=True,
                      attn_scale=float(_get(hf, "query_pre_attn_scalar", 256)) ** -0.5,
                      attn_logit_softcap=float(hf.get("attn_logit_softcapping", attn_cap) or 0),
                      final_logit_softcap=float(hf.get("final_logit_softcapping", final_cap)
                                                or 0))
    if model_type == "qwen3_moe" and _get(hf, "num_experts", hf.get("num_local_experts", 128)):
        fields.update(d_ff=_get(hf, "moe_intermediate_size", 768), moe=MoeConfig(
            n_experts=_get(hf, "num_experts", hf.get("num_local_experts", 128)),
            experts_per_token=_get(hf, "num_experts_per_tok", 8),
            normalize_top_k=bool(_get(hf, "norm_topk_prob", False)),
            aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001)), capacity_factor=0.0))
    elif model_type == "deepseek_v3":
        fields.update(_deepseek(hf))
    elif model_type == "qwen2":
        fields.update(qkv_bias=True)
    elif model_type == "mixtral":
        fields.update(moe=MoeConfig(
            n_experts=_get(hf, "num_local_experts", required=True),
            experts_per_token=_get(hf, "num_experts_per_tok", 2),
            aux_loss_coef=float(_get(hf, "router_aux_loss_coef", 0.001)), capacity_factor=0.0))
    return fields


def _deepseek(hf: dict) -> dict:
    """DeepSeek-V3's latent attention and MoE (HF DeepseekV3Config's defaults), and its
    MTP modules (num_nextn_predict_layers: model.layers.{num_hidden_layers + i}, which
    transformers drops; `fit_to_weights` drops them too where the weights hold none)."""
    g = lambda key, default: _get(hf, key, default)  # noqa: E731
    return dict(
        mtp_depth=int(g("num_nextn_predict_layers", 0) or 0),
        head_dim=0, n_kv_heads=0, d_ff=g("moe_intermediate_size", 2048),
        mla=MlaConfig(q_lora_rank=g("q_lora_rank", 0) or 0,
                      kv_lora_rank=g("kv_lora_rank", 512),
                      qk_nope_head_dim=g("qk_nope_head_dim", 128),
                      qk_rope_head_dim=g("qk_rope_head_dim", 64),
                      v_head_dim=g("v_head_dim", 128),
                      rope_interleave=bool(g("rope_interleave", True))),
        moe=MoeConfig(n_experts=g("n_routed_experts", 256),
                      experts_per_token=g("num_experts_per_tok", 8),
                      normalize_top_k=bool(g("norm_topk_prob", True)), router="sigmoid",
                      n_groups=g("n_group", 8), topk_groups=g("topk_group", 4),
                      routed_scale=float(g("routed_scaling_factor", 2.5)),
                      n_shared=g("n_shared_experts", 1),
                      first_dense=g("first_k_dense_replace", 3),
                      dense_d_ff=g("intermediate_size", 18432),
                      aux_loss_coef=float(g("aux_loss_alpha", 0.001)), capacity_factor=0.0))


def _refuse_unbuilt(hf: dict, model_type: str):
    """One line naming a config.json key whose value changes the forward in a way not
    built here (the keys these families read are mapped in `_llama_like`)."""
    def refuse(key, why=""):
        raise CheckpointError(f"{CONFIG_FILE}: {key}={hf[key]!r} is not supported for "
                              f"{model_type}{why}")
    if hf.get("quantization_config"):  # e.g. DeepSeek-V3's fp8 blocks (weight_scale_inv)
        q = hf["quantization_config"]
        raise CheckpointError(f"{CONFIG_FILE}: quantization_config.quant_method="
                              f"{q.get('quant_method') if isinstance(q, dict) else q!r} is not "
                              "supported (dequantize the checkpoint to bf16 first)")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", " (causal attention only)")
    if model_type == "qwen3_moe":
        if hf.get("mlp_only_layers"):
            refuse("mlp_only_layers", " (every layer a mixture of experts)")
        if hf.get("decoder_sparse_step", 1) != 1:
            refuse("decoder_sparse_step", " (every layer a mixture of experts: 1)")
    if model_type == "deepseek_v3":
        for key, ok in (("attention_bias", False), ("scoring_func", "sigmoid"),
                        ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
            if hf.get(key, ok) != ok:
                refuse(key, f" (only {ok!r})")
        return
    for key in ("shared_expert_intermediate_size", "n_shared_experts"):
        if hf.get(key):
            refuse(key, " (no shared experts)")


def _gemma3_rope(hf: dict, max_len: int) -> RopeConfig:
    """Gemma 3's two rotary embeddings: the global layers' (rope_theta, rope_scaling) and
    the local layers' base (rope_local_base_freq; transformers 5: rope_parameters nested
    by layer type)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if hf.get("rope_scaling"):
            full.update(hf["rope_scaling"])
    else:
        full = dict(hf.get("rope_scaling") or {})
        local = {}
    full.setdefault("rope_theta", hf.get("rope_theta") or 1e6)
    if hf.get("partial_rotary_factor") is not None:
        full.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 1e4)
    kind = local.get("rope_type", local.get("type")) or "default"
    if kind != "default":
        raise CheckpointError(f"{CONFIG_FILE}: rope_parameters.sliding_attention.rope_type="
                              f"{kind!r} is not supported (the local layers' RoPE is unscaled)")
    rope = _rope({"rope_parameters": full}, "gemma3_text", max_len)
    return dataclasses.replace(rope, local_theta=float(local["rope_theta"]))


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
    if cfg.mla.kv_lora_rank:
        return "deepseek_v3"
    if cfg.norm_position == "sandwich":
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.qk_norm:
        return "qwen3_moe" if cfg.moe.n_experts else "qwen3"
    if cfg.rope.scaling == "longrope":
        return "phi3"
    if cfg.moe.n_experts:
        return "mixtral"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    if cfg.sliding_window:
        return "mistral"
    return "llama"


def fit_to_weights(cfg: ModelConfig, hf: dict, keys) -> ModelConfig:
    """cfg as the checkpoint's tensors `keys` hold it: a DeepSeek-V3 config.json whose
    num_nextn_predict_layers says MTP modules that the weights lack (what transformers'
    save_pretrained writes: it drops them) loads without them (model.mtp_depth=0)."""
    if not cfg.mtp_depth:
        return cfg
    pre = "" if ("embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys) \
        else "model."
    if f"{pre}layers.{cfg.n_layers}.eh_proj.weight" in keys:
        return cfg
    return dataclasses.replace(cfg, mtp_depth=0)


def extra_tensors(cfg: ModelConfig, params):
    """(name, tensor) pairs an export writes beside the table's: DeepSeek-V3's MTP layers
    each hold a copy of the shared embedding and output head (embed_tokens,
    shared_head.head), as the published checkpoints do."""
    import jax
    import numpy as np
    for i in range(cfg.mtp_depth):
        layer = f"model.layers.{cfg.n_layers + i}."
        yield layer + "embed_tokens.weight", np.asarray(jax.device_get(params["embed"]["tokens"]))
        head = params["embed"]["tokens"] if cfg.tie_embeddings else params["head"]["kernel"].T
        yield layer + "shared_head.head.weight", np.ascontiguousarray(jax.device_get(head))


def _export_problems(cfg: ModelConfig, model_type: str) -> list[str]:
    bad = []
    def need(ok, what):
        if not ok:
            bad.append(what)
    gemma = model_type in GEMMA
    need(cfg.family == "decoder", "family=decoder")
    need(cfg.norm_position == ("sandwich" if gemma else "pre"),
         "norm_position=" + ("sandwich" if gemma else "pre"))
    need(gemma or cfg.attn_scale in (0.0, cfg.head_dim ** -0.5), "attn_scale=0")
    need(not getattr(cfg, "type_vocab_size", 0), "type_vocab_size=0")
    need(cfg.norm_unit_offset == gemma and cfg.scale_embeddings == gemma,
         f"norm_unit_offset={gemma} and scale_embeddings={gemma}")
    need(gemma or not (cfg.attn_logit_softcap or cfg.final_logit_softcap),
         "attn_logit_softcap=0 and final_logit_softcap=0")
    qk = model_type in ("gemma3_text", *QWEN3)
    need(cfg.qk_norm == qk, f"qk_norm={qk}")
    need(not cfg.layer_pattern or model_type in ("qwen2", "qwen3", *GEMMA), "layer_pattern=''")
    need(not cfg.rope.local_theta or model_type == "gemma3_text", "rope.local_theta=0")
    need(model_type != "gemma3_text" or "l" not in cfg.layer_pattern or cfg.rope.local_theta
         or cfg.rope.scaling == "none", "rope.local_theta > 0 (the local layers' unscaled base)")
    need(cfg.rope.scaling != "longrope" or model_type == "phi3", "rope.scaling other than longrope")
    ds = model_type == "deepseek_v3"
    need(cfg.moe.normalize_top_k or model_type in ("qwen3_moe", "deepseek_v3"),
         "moe.normalize_top_k=true")
    need(bool(cfg.mla.kv_lora_rank) == ds, "mla.kv_lora_rank > 0" if ds else "mla.kv_lora_rank=0")
    need(ds or not cfg.mtp_depth, "mtp_depth=0 (MTP modules: deepseek_v3 only)")
    need((cfg.moe.router == "sigmoid") == ds, f"moe.router={'sigmoid' if ds else 'softmax'}")
    need(ds or not (cfg.moe.n_shared or cfg.moe.first_dense or cfg.moe.routed_scale != 1),
         "moe.n_shared=0, moe.first_dense=0, moe.routed_scale=1")
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
    moe = model_type in ("mixtral", "qwen3_moe", "deepseek_v3")
    need(cfg.mlp in ("swiglu", "geglu") if not moe else cfg.mlp == "swiglu",
         "mlp=swiglu" + ("" if moe else " or geglu"))
    need(bool(cfg.moe.n_experts) == moe, "moe.n_experts > 0" if moe else "moe.n_experts=0")
    if model_type in ("llama", *QWEN3, *GEMMA):
        need(cfg.qkv_bias == cfg.out_bias, "qkv_bias == out_bias (attention_bias)")
        need(model_type != "llama" or not cfg.sliding_window, "sliding_window=0")
        need(model_type == "llama" or not cfg.mlp_bias, "mlp_bias=false")
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
    if model_type == "phi3":
        rope["partial_rotary_factor"] = 1.0
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
    types = _layer_types(cfg)
    if model_type in ("llama", *QWEN3, *GEMMA):
        out.update(attention_bias=cfg.qkv_bias)
    if model_type == "llama":
        out.update(mlp_bias=cfg.mlp_bias)
    elif model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=bool(window), sliding_window=window,
                   max_window_layers=0 if window else cfg.n_layers, layer_types=types)
    elif model_type == "qwen3_moe":
        out.update(use_sliding_window=bool(window), sliding_window=window)
    elif model_type in GEMMA:
        out.update(sliding_window=window or cfg.max_seq_len, layer_types=types,
                   hidden_activation=act,
                   query_pre_attn_scalar=_pre_attn_scalar(cfg),
                   attn_logit_softcapping=cfg.attn_logit_softcap or None,
                   final_logit_softcapping=cfg.final_logit_softcap or None,
                   use_bidirectional_attention=False)
    else:
        out.update(sliding_window=window)
    if model_type == "gemma3_text":  # transformers 5's nested rope_parameters, and 4's keys
        local = {"rope_type": "default", "rope_theta": cfg.rope.local_theta or cfg.rope.theta}
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                   rope_local_base_freq=local["rope_theta"])
    if model_type == "phi3":
        out.update(original_max_position_embeddings=cfg.rope.original_max_len
                   if cfg.rope.scaling == "longrope" else cfg.max_seq_len,
                   resid_pdrop=0.0, embd_pdrop=0.0)
    if model_type == "qwen3_moe":
        out.update(num_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.experts_per_token,
                   moe_intermediate_size=cfg.d_ff, norm_topk_prob=cfg.moe.normalize_top_k,
                   decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False)
    if model_type == "deepseek_v3":
        m, e = cfg.mla, cfg.moe
        out.update(num_key_value_heads=cfg.n_heads, head_dim=m.qk_rope_head_dim,
                   attention_bias=False, q_lora_rank=m.q_lora_rank or None,
                   kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                   qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
                   rope_interleave=m.rope_interleave, n_routed_experts=e.n_experts,
                   num_experts_per_tok=e.experts_per_token, norm_topk_prob=e.normalize_top_k,
                   n_group=e.n_groups, topk_group=e.topk_groups,
                   routed_scaling_factor=e.routed_scale, n_shared_experts=e.n_shared,
                   first_k_dense_replace=e.first_dense, moe_intermediate_size=cfg.d_ff,
                   intermediate_size=e.dense_d_ff or cfg.d_ff,
                   num_nextn_predict_layers=cfg.mtp_depth)
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.moe.n_experts,
                   num_experts_per_tok=cfg.moe.experts_per_token,
                   router_aux_loss_coef=cfg.moe.aux_loss_coef, output_router_logits=False,
                   router_jitter_noise=0.0)
    return out


def _layer_types(cfg: ModelConfig) -> list:
    """HF layer_types of cfg: its pattern (or its one kind) repeated over the layers."""
    pattern = cfg.layer_pattern or ("l" if cfg.sliding_window else "g")
    return ["sliding_attention" if pattern[i % len(pattern)] == "l" else "full_attention"
            for i in range(cfg.n_layers)]


def _pre_attn_scalar(cfg: ModelConfig):
    """Gemma's query_pre_attn_scalar of model.attn_scale (its -2 power; whole when close)."""
    value = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
    return round(value) if abs(value - round(value)) < 1e-6 * value else value


# ------------------------------------------------------------------ the mapping

def rules(cfg: ModelConfig, hf: dict, keys=frozenset()) -> list[Rule]:
    """The table of cfg as hf["model_type"]; `keys` (the checkpoint's names) picks a
    prefix/layout on import."""
    if hf["model_type"] == "gpt2":
        return _gpt2_rules(cfg, keys)
    if hf["model_type"] == "deepseek_v3":
        return _deepseek_rules(cfg, keys)
    return _llama_rules(cfg, keys, hf["model_type"])


def _deepseek_rules(cfg, keys):
    """DeepSeek-V3: the first model.moe.first_dense layers ("dense_layers": a dense MLP),
    then the MoE layers ("layers", HF numbers from first_dense on); latent attention."""
    pre = "" if ("embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys) \
        else "model."
    layer = pre + "layers.{i}."
    att = layer + "self_attn."
    k = cfg.moe.first_dense
    rules = [Rule(("embed", "tokens"), pre + "embed_tokens.weight"),
             Rule(("final_ln", "scale"), pre + "norm.weight")] + _head_rules(cfg)
    fused = layer.format(i=k) + "mlp.experts.gate_up_proj" in keys
    stacks = [(("dense_layers",), 0), (("layers",), k)] if k else [(("layers",), 0)]
    if cfg.mtp_depth:  # the MTP modules: model.layers.{n_layers + i}, a MoE layer each
        stacks.append((("mtp", "block"), cfg.n_layers))
        n = cfg.n_layers
        rules += [Rule(("mtp", "enorm", "scale"), layer + "enorm.weight", first=n),
                  Rule(("mtp", "hnorm", "scale"), layer + "hnorm.weight", first=n),
                  Rule(("mtp", "eh_proj"), layer + "eh_proj.weight", linear(1, 2), first=n),
                  Rule(("mtp", "norm", "scale"), layer + "shared_head.norm.weight", first=n)]
    for stack, first in stacks:
        r = lambda path, key, groups=None, part=None: Rule(  # noqa: E731
            (*stack, *path), key, groups, part, first=first)
        rules += [r(("ln1", "scale"), layer + "input_layernorm.weight"),
                  r(("ln2", "scale"), layer + "post_attention_layernorm.weight"),
                  r(("attn", "o"), att + "o_proj.weight", linear(2, 3)),
                  r(("attn", "kv_a"), att + "kv_a_proj_with_mqa.weight", linear(1, 2)),
                  r(("attn", "kv_a_norm", "scale"), att + "kv_a_layernorm.weight"),
                  r(("attn", "kv_b"), att + "kv_b_proj.weight", linear(1, 3))]
        if cfg.mla.q_lora_rank:
            rules += [r(("attn", "q_a"), att + "q_a_proj.weight", linear(1, 2)),
                      r(("attn", "q_a_norm", "scale"), att + "q_a_layernorm.weight"),
                      r(("attn", "q_b"), att + "q_b_proj.weight", linear(1, 3))]
        else:
            rules.append(r(("attn", "q"), att + "q_proj.weight", linear(1, 3)))
        if stack == ("dense_layers",):
            rules += [r(("mlp", w), layer + f"mlp.{w}_proj.weight", linear(1, 2))
                      for w in ("gate", "up", "down")]
            continue
        rules += [r(("mlp", "router"), layer + "mlp.gate.weight", linear(1, 2)),
                  r(("mlp", "router_bias"), layer + "mlp.gate.e_score_correction_bias")]
        rules += [r(("mlp", "shared", w), layer + f"mlp.shared_experts.{w}_proj.weight",
                    linear(1, 2)) for w in ("gate", "up", "down")]
        if fused:  # [E, 2F, D], [E, D, F]
            swap = ((0,), (2,), (1,))
            rules += [r(("mlp", "gate"), layer + "mlp.experts.gate_up_proj", swap, (1, 0, 2)),
                      r(("mlp", "up"), layer + "mlp.experts.gate_up_proj", swap, (1, 1, 2)),
                      r(("mlp", "down"), layer + "mlp.experts.down_proj", swap)]
        else:
            rules += [r(("mlp", w), layer + f"mlp.experts.{{e}}.{w}_proj.weight", linear(1, 2))
                      for w in ("gate", "up", "down")]
    return rules


def _llama_rules(cfg, keys, model_type):
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
        Rule(("layers", "attn", "o"), att + "o_proj.weight", linear(2, 3)),  # [D, H*hd]
    ]
    if model_type in GEMMA:
        rules += [Rule(("layers", "ln1_post", "scale"), layer + "post_attention_layernorm.weight"),
                  Rule(("layers", "ln2", "scale"), layer + "pre_feedforward_layernorm.weight"),
                  Rule(("layers", "ln2_post", "scale"),
                       layer + "post_feedforward_layernorm.weight")]
    else:
        rules.append(Rule(("layers", "ln2", "scale"), layer + "post_attention_layernorm.weight"))
    if model_type == "phi3":  # qkv_proj [(H + 2 KVH) * hd, D]: q, k, v chunks
        sizes = (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
        rules += [Rule(("layers", "attn", w), att + "qkv_proj.weight", heads, (0, j, sizes))
                  for j, w in enumerate("qkv")]
    else:
        rules += [Rule(("layers", "attn", w), att + f"{w}_proj.weight", heads) for w in "qkv"]
    if cfg.qk_norm:
        rules += [Rule(("layers", "attn", f"{w}_norm", "scale"), att + f"{w}_norm.weight")
                  for w in "qk"]
    rules += _head_rules(cfg)
    if cfg.qkv_bias:
        rules += [Rule(("layers", "attn", w + "_bias"), att + f"{w}_proj.bias", head_bias)
                  for w in "qkv"]
    if cfg.out_bias:
        rules.append(Rule(("layers", "attn", "o_bias"), att + "o_proj.bias"))
    if cfg.moe.n_experts:
        return rules + _expert_rules(layer, keys, model_type)
    if model_type == "phi3":  # gate_up_proj [2F, D]: gate rows first, then up
        return rules + [
            Rule(("layers", "mlp", "gate"), layer + "mlp.gate_up_proj.weight", linear(1, 2),
                 (0, 0, 2)),
            Rule(("layers", "mlp", "up"), layer + "mlp.gate_up_proj.weight", linear(1, 2),
                 (0, 1, 2)),
            Rule(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", linear(1, 2))]
    for name in ("gate", "up", "down") if cfg.mlp in ("swiglu", "geglu") else ("up", "down"):
        rules.append(Rule(("layers", "mlp", name), layer + f"mlp.{name}_proj.weight",
                          linear(1, 2)))
        if cfg.mlp_bias:
            rules.append(Rule(("layers", "mlp", name + "_bias"), layer + f"mlp.{name}_proj.bias"))
    return rules


def _expert_rules(layer, keys, model_type):
    if layer.format(i=0) + "mlp.experts.gate_up_proj" in keys:  # fused: [E, 2F, D], [E, D, F]
        experts = layer + "mlp.experts."
        swap = ((0,), (2,), (1,))  # HF [E, F, D] <-> ours [E, D, F]
        return [
            Rule(("layers", "mlp", "router"), layer + "mlp.gate.weight", linear(1, 2)),
            Rule(("layers", "mlp", "gate"), experts + "gate_up_proj", swap, (1, 0, 2)),
            Rule(("layers", "mlp", "up"), experts + "gate_up_proj", swap, (1, 1, 2)),
            Rule(("layers", "mlp", "down"), experts + "down_proj", swap),
        ]
    if model_type == "qwen3_moe":
        return [Rule(("layers", "mlp", "router"), layer + "mlp.gate.weight", linear(1, 2))] + [
            Rule(("layers", "mlp", w), layer + f"mlp.experts.{{e}}.{w}_proj.weight", linear(1, 2))
            for w in ("gate", "up", "down")]
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
    """Tensors a checkpoint may hold that no config reads (buffers, a tied head; DeepSeek-V3's
    MTP modules past model.mtp_depth, and the MTP layers' copies of the shared embedding
    and head)."""
    if cfg.mla.kv_lora_rank:
        m = re.search(r"layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= cfg.n_layers + cfg.mtp_depth:
            return True
        if m and int(m.group(1)) >= cfg.n_layers and _MTP_COPIES.search(name):
            return True
    return bool(_IGNORED.search(name)) or (cfg.tie_embeddings and name.endswith("lm_head.weight"))


hf_config = hf_config_from

__all__ = ["MODEL_TYPES", "fit_to_weights", "extra_tensors", "config_from_hf", "hf_config_from", "hf_config", "infer_model_type",
           "rules", "unused_ok"]
