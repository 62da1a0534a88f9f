"""Hugging Face T5 checkpoints <-> (ModelConfig, params), encoder-decoder family.

* `config_from_hf(config_json_dict) -> ModelConfig`, `hf_config(cfg) -> dict`
  (a T5ForConditionalGeneration that `transformers` loads).
* `rules(cfg, hf, keys)`: the table of `jaxlm.model.hf.rules.Rule`s.

A T5EncoderModel checkpoint (`architectures`; only `shared` and `encoder.*`)
loads as the encoder family with `head: false`: its hidden states equal
transformers' `last_hidden_state` (`jaxlm.forward(..., return_hidden=True)`,
`jaxlm.embed`). A T5Model checkpoint (encoder + decoder, no lm_head) loads as
the encoder_decoder family with `head: false`: `jaxlm.forward(tokens,
decoder_tokens, return_hidden=True)` is its decoder's `last_hidden_state`,
`jaxlm.embed` the mean of its encoder's; logits and generation are a
CheckpointError. Even a v1.0 config (`tie_word_embeddings`, where
T5ForConditionalGeneration would use the shared embedding, times d_model ** -0.5,
as the head) gets no head: as LlamaModel / GPT2Model dirs with tied embeddings,
a base class's dir holds no head, and none is made up.

Variants (`feed_forward_proj`): "relu" (T5 v1.0: `wi`, `wo`), "gated-gelu"
(T5 v1.1 / mT5 / Flan-T5: `wi_0` the gelu_new gate, `wi_1` the linear part,
`wo`); also "gelu", "gelu_new", "gated-silu", "gated-gelu_new".

Head: T5 v1.0 ties the head to the shared embedding and scales the decoder
output by d_model ** -0.5 (our `tie_embeddings: true`); v1.1 has a separate
`lm_head` and no scaling (`tie_embeddings: false`). Hugging Face decides the
scaling from `tie_word_embeddings` (transformers < 5) or the saved
`scale_decoder_outputs` (transformers 5, which always ties in memory and
writes `tie_word_embeddings: true` even for v1.1): an unscaled checkpoint
without an `lm_head.weight` loads as an untied head copied from the
embedding, which is what Hugging Face computes.

Names (HF Linear weights are [out, in], ours [in, out]; q/k/v [D, H*Dk] ->
[D, H, Dk], o [H*Dk, D] -> [H, Dk, D]):
    shared.weight                                        embed.tokens
    lm_head.weight                                       head.kernel (untied)
    {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                         {stack}.relative.table
    {stack}.block.N.layer.0.SelfAttention.{q,k,v,o}      {stack}.layers.attn.*
    {stack}.block.N.layer.0.layer_norm                   {stack}.layers.ln1
    decoder.block.N.layer.1.EncDecAttention.{q,k,v,o}    decoder.layers.cross.*
    decoder.block.N.layer.1.layer_norm                   decoder.layers.ln_cross
    {stack}.block.N.layer.F.DenseReluDense.{wi|wi_0,wi_1,wo}  {stack}.layers.mlp.{up|gate,up,down}
    {stack}.block.N.layer.F.layer_norm                   {stack}.layers.ln2   (F: 1 enc, 2 dec)
    {stack}.final_layer_norm.weight                      {stack}.final_ln.scale
"""

from __future__ import annotations

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig
from ..families.encoder_decoder import decoder_layers
from .rules import Rule, linear

MODEL_TYPES = ("t5", "mt5")
# feed_forward_proj -> (our mlp, gelu_approximate). HF maps "gated-gelu" to gelu_new.
_ACTS = {"relu": ("relu", False), "gelu": ("gelu", False), "gelu_new": ("gelu", True),
         "gated-gelu": ("geglu", True), "gated-gelu_new": ("geglu", True),
         "gated-silu": ("swiglu", False), "gated-swish": ("swiglu", False)}


# ------------------------------------------------------------------ configs

def _scaled_head(hf: dict) -> bool:
    """Whether HF scales the decoder output before the head (= T5 v1.0 tied head)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf: dict) -> ModelConfig:
    """A `config.json` dict of a T5 / mT5 checkpoint -> ModelConfig (family encoder_decoder,
    float32)."""
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a T5 model "
                              f"(supported: {', '.join(MODEL_TYPES)})")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTS:
        raise CheckpointError(f"config.json: feed_forward_proj={proj!r} is not supported "
                              f"({', '.join(_ACTS)})")
    mlp, approximate = _ACTS[proj]
    try:
        n_layers = int(hf["num_layers"])
        fields = dict(
            family="encoder_decoder", vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]), n_layers=n_layers,
            n_decoder_layers=int(hf.get("num_decoder_layers") or n_layers),
            n_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), d_ff=int(hf["d_ff"]),
            max_seq_len=int(hf.get("n_positions") or 512), norm="rmsnorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), norm_position="pre",
            mlp=mlp, gelu_approximate=approximate, positions="t5_relative",
            relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            attn_scale=1.0, tie_embeddings=_scaled_head(hf))
    except KeyError as e:
        raise CheckpointError(f"config.json: required key {e.args[0]!r} is missing") from None
    architectures = hf.get("architectures") or ()
    if "T5EncoderModel" in architectures:  # the encoder stack alone
        fields.update(family="encoder", head=False, n_decoder_layers=0, tie_embeddings=True)
    elif "T5Model" in architectures:  # both stacks, no head (a base model class)
        fields.update(head=False, tie_embeddings=True)
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"config.json: {e}") from None


def _export_problems(cfg: ModelConfig) -> list[str]:
    p = []
    if cfg.family != "encoder_decoder":
        p.append(f"model.family={cfg.family!r} (needs 'encoder_decoder')")
    if cfg.positions != "t5_relative":
        p.append(f"model.positions={cfg.positions!r} (T5 has 't5_relative')")
    if cfg.norm != "rmsnorm" or cfg.norm_position != "pre":
        p.append("T5 has pre-norm rmsnorm")
    if cfg.attn_scale != 1.0:
        p.append(f"model.attn_scale={cfg.attn_scale} (T5 has 1.0)")
    if cfg.n_kv_heads != cfg.n_heads:
        p.append("T5 has no grouped-query attention (n_kv_heads must equal n_heads)")
    if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        p.append("T5 has no biases")
    if cfg.mlp == "geglu" and not cfg.gelu_approximate:
        p.append("exact-GELU geglu has no feed_forward_proj (HF's 'gated-gelu' is tanh GELU)")
    return p


def _feed_forward_proj(cfg: ModelConfig) -> str:
    return {"relu": "relu", "gelu": "gelu_new" if cfg.gelu_approximate else "gelu",
            "geglu": "gated-gelu", "swiglu": "gated-silu"}[cfg.mlp]


def hf_config(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """ModelConfig -> a `config.json` dict for T5ForConditionalGeneration (T5Model with
    `head: false`)."""
    problems = _export_problems(cfg)
    if problems:
        raise ConfigError("cannot export as T5: " + "; ".join(problems))
    return {
        "architectures": ["T5ForConditionalGeneration" if cfg.head else "T5Model"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff, "num_layers": cfg.n_layers, "num_decoder_layers": decoder_layers(cfg),
        "num_heads": cfg.n_heads, "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": _feed_forward_proj(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings,
        "dropout_rate": 0.0, "initializer_factor": 1.0, "is_encoder_decoder": True,
        "n_positions": cfg.max_seq_len, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "use_cache": True,
        "torch_dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------ name table

def rules(cfg: ModelConfig, hf: dict | None = None, keys=frozenset()) -> list[Rule]:
    """Every leaf of our tree <-> its HF tensor (same table both ways)."""
    gated = cfg.mlp in ("geglu", "swiglu")
    lin, lin_o = linear(1, 3), linear(2, 3)  # q/k/v [H*Dk, D] -> [D, H, Dk]; o [D, H*Dk]
    r = {"embed/tokens": Rule((), "shared.weight")}
    if not cfg.tie_embeddings:
        # transformers 5 writes a tied-in-memory, unscaled head as shared.weight only
        tied = (hf or {}).get("tie_word_embeddings", True) is not False
        r["head/kernel"] = Rule((), "lm_head.weight", linear(1, 2),
                                aliases=("shared.weight",) if tied else ())
    for stack in ("encoder", "decoder"):
        block = f"{stack}.block.{{i}}.layer."
        r[f"{stack}/relative/table"] = Rule(
            (), f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        r[f"{stack}/final_ln/scale"] = Rule((), f"{stack}.final_layer_norm.weight")
        attn = [("attn", "0.SelfAttention", "ln1", "0.layer_norm")]
        if stack == "decoder":
            attn.append(("cross", "1.EncDecAttention", "ln_cross", "1.layer_norm"))
        for ours, theirs, ln, ln_theirs in attn:
            for w in "qkv":
                r[f"{stack}/layers/{ours}/{w}"] = Rule((), f"{block}{theirs}.{w}.weight", lin)
            r[f"{stack}/layers/{ours}/o"] = Rule((), f"{block}{theirs}.o.weight", lin_o)
            r[f"{stack}/layers/{ln}/scale"] = Rule((), f"{block}{ln_theirs}.weight")
        ff = f"{block}{1 if stack == 'encoder' else 2}."
        r[f"{stack}/layers/ln2/scale"] = Rule((), f"{ff}layer_norm.weight")
        dense = f"{ff}DenseReluDense."
        mlp = [("gate", "wi_0"), ("up", "wi_1")] if gated else [("up", "wi")]
        for ours, theirs in mlp + [("down", "wo")]:
            r[f"{stack}/layers/mlp/{ours}"] = Rule((), f"{dense}{theirs}.weight", linear(1, 2))
    if cfg.family == "encoder":  # T5EncoderModel: the encoder stack, at the top of our tree
        r = {k[len("encoder/"):]: v for k, v in r.items() if k.startswith("encoder/")}
        r["embed/tokens"] = Rule((), "shared.weight", aliases=("encoder.embed_tokens.weight",))
    return [rule._replace(path=tuple(path.split("/"))) for path, rule in r.items()]


unused_ok = None  # not checked (as before the merge of the HF modules)

__all__ = ["MODEL_TYPES", "config_from_hf", "hf_config", "rules"]
