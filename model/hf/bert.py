"""Hugging Face BERT checkpoints <-> the encoder family.

* `config_from_hf(config_json_dict) -> ModelConfig`, `hf_config(cfg) -> dict`
  (a BertForMaskedLM, BertModel or BertForSequenceClassification that `transformers`
  loads).
* `rules(cfg, hf, keys)`: the table of `jaxlm.model.hf.rules.Rule`s.

Accepted checkpoints: BertForMaskedLM / BertForPreTraining (keys under
`bert.` and `cls.predictions.`), BertModel (no `bert.` prefix, no head:
it loads as `head: false`, hidden states only), and BertForSequenceClassification
(`bert.pooler.dense` + `classifier`: model.num_labels > 0, hf/labels.py). Old names
(`LayerNorm.gamma/beta`) and the tied `cls.predictions.decoder.bias` are read too
(aliases); tensors the model does not use (an MLM model's pooler, the next-sentence
head, position_ids buffers) are ignored.

HF Linear weights are [out, in]; ours are [in..., out...] (q: [D, H, hd], o: [H, hd, D]).
"""

from __future__ import annotations

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig
from .io import CONFIG_FILE
from .labels import hf_label_fields, label_fields
from .rules import Rule, linear, merged

MODEL_TYPES = ("bert",)

# HF hidden_act -> (our mlp, gelu_approximate)
_ACTS = {"gelu": ("gelu", False), "gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
         "relu": ("relu", False)}


# ------------------------------------------------------------------ configs

def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a BERT `config.json` dict (float32); CheckpointError if unsupported."""
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
            init_std=float(get("initializer_range", 0.02)),
            head="BertModel" not in (hf.get("architectures") or ()),  # base: no cls.*
            **label_fields(hf))
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


def hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict:
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
        raise ConfigError(f"hf export: the config is not a BERT; it needs {', '.join(bad)}")
    act = "relu" if cfg.mlp == "relu" else ("gelu_new" if cfg.gelu_approximate else "gelu")
    arch = ("BertForSequenceClassification" if cfg.num_labels else
            "BertForMaskedLM" if cfg.head else "BertModel")
    return {
        "architectures": [arch], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": 0, "dtype": cfg.param_dtype, **hf_label_fields(cfg),
    }


# ------------------------------------------------------------------ the table

def rules(cfg: ModelConfig, hf: dict | None = None, keys=frozenset()) -> list[Rule]:
    """Every leaf of our tree <-> its HF tensor (same table both ways)."""
    emb, layer, head = "bert.embeddings.", "bert.encoder.layer.{i}.", "cls.predictions."
    table = {"embed/tokens": (emb + "word_embeddings.weight", None),
             "positions/table": (emb + "position_embeddings.weight", None),
             "token_types/table": (emb + "token_type_embeddings.weight", None),
             "mlm/dense/kernel": (head + "transform.dense.weight", linear(1, 2)),
             "mlm/dense/bias": (head + "transform.dense.bias", None),
             "mlm/bias": (head + "bias", None),
             "head/kernel": (head + "decoder.weight", linear(1, 2)),
             "pooler/kernel": ("bert.pooler.dense.weight", linear(1, 2)),
             "pooler/bias": ("bert.pooler.dense.bias", None),
             "score/kernel": ("classifier.weight", linear(1, 2)),
             "score/bias": ("classifier.bias", None)}
    norms = {"embed_ln": emb + "LayerNorm", "layers/ln1": layer + "attention.output.LayerNorm",
             "layers/ln2": layer + "output.LayerNorm", "mlm/ln": head + "transform.LayerNorm"}
    for ours, theirs in norms.items():
        table[ours + "/scale"], table[ours + "/bias"] = (theirs + ".weight", None), \
            (theirs + ".bias", None)
    linears = {"attn/q": ("attention.self.query", 1, 3), "attn/k": ("attention.self.key", 1, 3),
               "attn/v": ("attention.self.value", 1, 3),
               "attn/o": ("attention.output.dense", 2, 3),
               "mlp/up": ("intermediate.dense", 1, 2), "mlp/down": ("output.dense", 1, 2)}
    for ours, (theirs, n_in, ndim) in linears.items():
        table["layers/" + ours] = (layer + theirs + ".weight", linear(n_in, ndim))
        # q/k/v biases are [H*hd] in HF, [H, hd] here
        table["layers/" + ours + "_bias"] = (layer + theirs + ".bias",
                                             merged(2) if ours[-1] in "qkv" else None)
    if cfg.tie_embeddings or not cfg.lm_head:
        del table["head/kernel"]
    if not cfg.lm_head:  # BertModel, BertForSequenceClassification: no cls.predictions.*
        table = {k: v for k, v in table.items() if not k.startswith("mlm/")}
    if not cfg.num_labels:  # the pooler and classifier of BertForSequenceClassification
        table = {k: v for k, v in table.items() if not k.startswith(("pooler/", "score/"))}
    return [Rule(tuple(path.split("/")), key, groups, aliases=tuple(_aliases(key)[1:]))
            for path, (key, groups) in table.items()]


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


unused_ok = None  # not checked: pretraining checkpoints carry heads the MLM model ignores

__all__ = ["MODEL_TYPES", "config_from_hf", "hf_config", "rules"]
