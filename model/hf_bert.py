"""Hugging Face BERT checkpoints <-> (ModelConfig, params) of the encoder family.

* `bert_config_from_hf(config_json_dict) -> ModelConfig`, `hf_bert_config(cfg) -> dict`.
* `load_bert(dir) -> (cfg, params)` reads `config.json` and the safetensors
  (`model.safetensors`, or the shards of `model.safetensors.index.json`)
  with numpy, no torch, one parameter leaf at a time (its per-layer tensors
  stacked, transposed, cast, made a jax array).
* `save_bert(dir, cfg, params)` writes `config.json` + `model.safetensors`
  that `transformers.BertForMaskedLM.from_pretrained` loads.

Accepted checkpoints: BertForMaskedLM / BertForPreTraining (keys under
`bert.` and `cls.predictions.`). Old names (`LayerNorm.gamma/beta`) and the
tied `cls.predictions.decoder.bias` are read too; tensors the MLM model does
not use (pooler, next-sentence head, position_ids buffers) are ignored.

One table (`_rules`) maps each leaf of our tree to its HF tensor: HF Linear
weights are [out, in]; ours are [in..., out...] (q: [D, H, hd], o: [H, hd, D]).
"""

from __future__ import annotations

import contextlib
import pathlib

import jax
import numpy as np

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.model.families import model_specs
from jaxlm.model.hf_io import (CONFIG_FILE, CheckpointReader, Rule, export_leaf, load_leaf,
                               named_leaves, read_config, write_checkpoint)
from jaxlm.model.params import abstract

# HF hidden_act -> (our mlp, gelu_approximate)
_ACTS = {"gelu": ("gelu", False), "gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
         "relu": ("relu", False)}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ------------------------------------------------------------------ configs

def bert_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a BERT `config.json` dict; CheckpointError if unsupported."""
    def get(key, default=None):
        value = hf.get(key, default)
        if value is None:
            raise CheckpointError(f"{CONFIG_FILE}: missing {key!r}")
        return value

    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{CONFIG_FILE}: model_type {hf.get('model_type')!r} is not bert")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError(f"{CONFIG_FILE}: BERT as a decoder (is_decoder, "
                              "add_cross_attention) is not supported")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(f"{CONFIG_FILE}: position_embedding_type {kind!r} is not supported "
                              "(supported: absolute)")
    act = get("hidden_act", "gelu")
    if act not in _ACTS:
        raise CheckpointError(f"{CONFIG_FILE}: hidden_act {act!r} is not supported "
                              f"(supported: {', '.join(_ACTS)})")
    mlp, approximate = _ACTS[act]
    dtype = _DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
                        .replace("torch.", ""), "float32")
    try:
        return ModelConfig(
            family="encoder", vocab_size=get("vocab_size"), d_model=get("hidden_size", 768),
            n_layers=get("num_hidden_layers", 12), n_heads=get("num_attention_heads", 12),
            d_ff=get("intermediate_size", 3072),
            max_seq_len=get("max_position_embeddings", 512),
            type_vocab_size=get("type_vocab_size", 2), norm="layernorm",
            norm_eps=float(get("layer_norm_eps", 1e-12)), norm_position="post", mlp=mlp,
            gelu_approximate=approximate, positions="learned", qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


def hf_bert_config(cfg: ModelConfig) -> dict:
    """The `config.json` of cfg as a BertForMaskedLM; ConfigError naming what BERT lacks."""
    bad = [what for ok, what in (
        (cfg.family == "encoder", "family=encoder"),
        (cfg.norm_position == "post", "norm_position=post"),
        (cfg.norm == "layernorm", "norm=layernorm"),
        (cfg.positions == "learned", "positions=learned"),
        (cfg.mlp in ("gelu", "relu"), "mlp=gelu or relu"),
        (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "qkv_bias, out_bias, mlp_bias all true"),
        (cfg.n_kv_heads == cfg.n_heads, "n_kv_heads == n_heads"),
        (cfg.head_dim * cfg.n_heads == cfg.d_model, "head_dim * n_heads == d_model"),
        (cfg.attn_scale in (0.0, cfg.head_dim ** -0.5), "attn_scale=0"),
        (cfg.type_vocab_size > 0, "type_vocab_size > 0")) if not ok]
    if bad:
        raise ConfigError(f"save_bert: the config is not a BERT; it needs {', '.join(bad)}")
    act = "relu" if cfg.mlp == "relu" else ("gelu_new" if cfg.gelu_approximate else "gelu")
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": 0, "dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------ the table

def _rules(cfg: ModelConfig) -> dict[str, Rule]:
    """Our leaf path ("layers/attn/q") -> its HF tensor."""
    emb, layer, head = "bert.embeddings.", "bert.encoder.layer.{i}.", "cls.predictions."
    rules = {"embed/tokens": Rule(emb + "word_embeddings.weight"),
             "positions/table": Rule(emb + "position_embeddings.weight"),
             "token_types/table": Rule(emb + "token_type_embeddings.weight"),
             "mlm/dense/kernel": Rule(head + "transform.dense.weight", 1),
             "mlm/dense/bias": Rule(head + "transform.dense.bias"),
             "mlm/bias": Rule(head + "bias"),
             "head/kernel": Rule(head + "decoder.weight", 1)}
    norms = {"embed_ln": emb + "LayerNorm", "layers/ln1": layer + "attention.output.LayerNorm",
             "layers/ln2": layer + "output.LayerNorm", "mlm/ln": head + "transform.LayerNorm"}
    for ours, hf in norms.items():
        rules[ours + "/scale"], rules[ours + "/bias"] = Rule(hf + ".weight"), Rule(hf + ".bias")
    linears = {"attn/q": ("attention.self.query", 1), "attn/k": ("attention.self.key", 1),
               "attn/v": ("attention.self.value", 1), "attn/o": ("attention.output.dense", 2),
               "mlp/up": ("intermediate.dense", 1), "mlp/down": ("output.dense", 1)}
    for ours, (hf, n_in) in linears.items():
        rules["layers/" + ours] = Rule(layer + hf + ".weight", n_in)
        rules["layers/" + ours + "_bias"] = Rule(layer + hf + ".bias", flat=True)
    return rules


def _aliases(key: str) -> list[str]:
    """Names a tensor may have in a checkpoint: as written by save_pretrained, older
    TF-era names (LayerNorm gamma/beta), the tied decoder bias, no `bert.` prefix."""
    names = [key]
    if key.endswith("LayerNorm.weight"):
        names.append(key[:-len("weight")] + "gamma")
    if key.endswith("LayerNorm.bias"):
        names.append(key[:-len("bias")] + "beta")
    if key == "cls.predictions.bias":
        names.append("cls.predictions.decoder.bias")
    return names + [n[len("bert."):] for n in names if n.startswith("bert.")]


# ------------------------------------------------------------------ reading

def load_bert(directory) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF BERT checkpoint directory."""
    cfg = bert_config_from_hf(read_config(directory))
    rules = _rules(cfg)
    named, treedef = named_leaves(abstract(model_specs(cfg)))
    with contextlib.ExitStack() as stack:
        reader = CheckpointReader(directory, stack, aliases=_aliases)
        leaves = [load_leaf(reader, rules[name], spec) for name, spec in named]
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------ writing

def save_bert(directory, cfg: ModelConfig, params) -> pathlib.Path:
    """Write cfg + params as an HF BertForMaskedLM checkpoint dir; returns it.

    Weights keep the param dtype. Refuses a directory that exists and is not
    empty; writes a temporary directory next to it and renames it at the end.
    """
    hf = hf_bert_config(cfg)
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(cfg)))
    if jax.tree.map(lambda a: tuple(np.shape(a)), params) != expected:
        raise ConfigError("save_bert: params do not match the config's parameter shapes")
    rules = _rules(cfg)
    tensors = (pair for name, leaf in named_leaves(params)[0]
               for pair in export_leaf(rules[name], leaf))
    return write_checkpoint(directory, hf, tensors, who="save_bert")


__all__ = ["bert_config_from_hf", "hf_bert_config", "load_bert", "save_bert"]
