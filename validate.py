"""Checks of the public API's concrete inputs, before anything is traced.

`jaxlm.forward`, `jaxlm.embed`, `jaxlm.classify`, `jaxlm.generate` and
`jaxlm.init_params` call these on their arguments: the config's type, the params'
tree against the config's parameter specs, and (for concrete token arrays only; a traced call
inside the user's `jax.jit` is not checked) the token ids' range and length.
Each failure is one-line `jaxlm` error naming the argument.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from .errors import CheckpointError, ConfigError, InputError


def check_model_cfg(cfg, where: str) -> None:
    """`cfg` must be a ModelConfig (a full Config: its .model)."""
    from .config import Config
    from .model.config import ModelConfig
    if isinstance(cfg, ModelConfig):
        return
    if isinstance(cfg, Config):
        raise ConfigError(f"{where}: cfg is a Config; pass its model section (cfg.model), "
                          "a ModelConfig")
    raise ConfigError(f"{where}: cfg must be a ModelConfig, got {type(cfg).__name__}")


@functools.lru_cache(maxsize=32)
def _expected_shapes(cfg) -> dict:
    from .model import abstract, model_specs
    leaves = jax.tree_util.tree_leaves_with_path(abstract(model_specs(cfg)))
    return {jax.tree_util.keystr(p): tuple(a.shape) for p, a in leaves}


def check_params(params, cfg, where: str) -> None:
    """Every parameter of `cfg` present in `params` with its shape (extra leaves,
    e.g. adapters, are allowed), or an InputError naming the first that is not."""
    if not isinstance(params, dict):
        raise InputError(f"{where}: params must be the dict of arrays from jaxlm.load or "
                         f"jaxlm.init_params, got {type(params).__name__}")
    from .model.adapters import is_node  # int8 / LoRA weights: one leaf of their shape
    got = {jax.tree_util.keystr(p): tuple(a.shape if is_node(a) else np.shape(a))
           for p, a in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_node)}
    for key, shape in _expected_shapes(cfg).items():
        if key not in got:
            raise InputError(f"{where}: params have no {key}: they are not params of this "
                             f"cfg ({cfg.family}, d_model={cfg.d_model}, n_layers={cfg.n_layers})")
        if got[key] != shape:
            raise InputError(f"{where}: params{key} has shape {got[key]}, cfg expects {shape}: "
                             "the params are of another config")


def check_model_args(params, cfg, where: str) -> None:
    check_model_cfg(cfg, where)
    check_params(params, cfg, where)


def missing_head(cfg) -> str:
    """What a base model (model.head=false) lacks, in Hugging Face's names."""
    if cfg.family == "decoder":
        return "lm_head.weight (a base model such as LlamaModel or GPT2Model)"
    if cfg.family == "encoder_decoder":
        return "lm_head.weight (a T5Model)"
    if cfg.positions == "t5_relative":
        return "the decoder and lm_head.weight (a T5EncoderModel)"
    return "the MLM head cls.predictions.* (a BertModel)"


def check_head(cfg, where: str) -> None:
    """Logits need the output head; a base model has none: CheckpointError naming it."""
    if not cfg.head:
        raise CheckpointError(f"{where}: this model has no output head: its checkpoint lacks "
                              f"{missing_head(cfg)}; use jaxlm.forward(..., return_hidden=True) "
                              "or jaxlm.embed")


def check_lm_head(cfg, where: str) -> None:
    """Token logits need the LM head: a base model (`check_head`) or a sequence
    classifier (a score head) has none."""
    check_head(cfg, where)
    if cfg.num_labels:
        raise ConfigError(f"{where}: this model is a sequence classifier (model.num_labels="
                          f"{cfg.num_labels}): its head scores labels, it has no LM head; use "
                          "jaxlm.classify")


def check_tokens(tokens, cfg, where: str, *, cached: bool = False) -> None:
    """Concrete token ids: integers in [0, vocab_size); with learned positions
    and no cache, at most model.max_seq_len of them per row. Traced: no check."""
    if isinstance(tokens, jax.core.Tracer):
        return
    try:
        arr = np.asarray(tokens)
    except (ValueError, TypeError):
        raise InputError(f"{where}: tokens must be an integer array [batch, seq]") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{where}: tokens must be integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError(f"{where}: tokens must be 2-D [batch, seq], got shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"{where}: tokens hold id {bad}, outside [0, {cfg.vocab_size}) "
                             f"(model.vocab_size={cfg.vocab_size})")
    if not cached and cfg.positions == "learned" and arr.shape[1] > cfg.max_seq_len:
        raise InputError(f"{where}: tokens have {arr.shape[1]} positions, more than "
                         f"model.max_seq_len={cfg.max_seq_len} (learned positions)")


def forward(params, cfg, tokens, *args, **kwargs):
    """`jaxlm.forward`: `jaxlm.model.forward` after the checks above."""
    from .model import forward as model_forward
    check_model_args(params, cfg, "forward")
    if not kwargs.get("return_hidden"):
        check_head(cfg, "forward")
    check_tokens(tokens, cfg, "forward", cached=kwargs.get("store") is not None)
    return model_forward(params, cfg, tokens, *args, **kwargs)


def texts_batch(texts, tokenizer, cfg, where: str, args=(), kwargs=None):
    """(tokens [B, S] int32, mask [B, S]) of a string or a list of strings, each encoded
    as transformers' `tokenizer(text)` encodes it (BERT's [CLS] ... [SEP], Llama's
    BOS) and padded on the right with the tokenizer's pad id."""
    if tokenizer is None:
        raise InputError(f"{where}: strings need tokenizer= (e.g. jaxlm.load_tokenizer(DIR))")
    if args or (kwargs or {}).get("mask") is not None:
        raise InputError(f"{where}: strings make their own mask; pass token ids to give one")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{where}: tokens must be token ids, or strings with tokenizer=")
    rows = tokenizer.encode_batch(texts, add_special_tokens=True)
    longest = max(map(len, rows))
    if cfg.positions == "learned" and longest > cfg.max_seq_len:
        i = max(range(len(rows)), key=lambda i: len(rows[i]))
        raise InputError(f"{where}: text {i} has {longest} tokens, more than "
                         f"model.max_seq_len={cfg.max_seq_len}")
    tokens = np.full((len(rows), max(longest, 1)), tokenizer.pad_id, np.int32)
    mask = np.zeros(tokens.shape, np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask


def _is_text(tokens) -> bool:
    return isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and bool(tokens)
                                       and all(isinstance(t, str) for t in tokens))


def embed(params, cfg, tokens, *args, tokenizer=None, **kwargs):
    """`jaxlm.embed`: `jaxlm.model.embed.embed` after the checks above. `tokens` may be
    a string or a list of strings, with `tokenizer=` (`texts_batch`)."""
    from .model.embed import embed as model_embed
    check_model_args(params, cfg, "embed")
    if _is_text(tokens):
        tokens, kwargs["mask"] = texts_batch(tokens, tokenizer, cfg, "embed", args, kwargs)
    check_tokens(tokens, cfg, "embed")
    return model_embed(params, cfg, tokens, *args, **kwargs)


def classify(params, cfg, tokens, *args, tokenizer=None, **kwargs):
    """`jaxlm.classify`: `jaxlm.model.classify.classify` after the checks above. `tokens`
    may be a string or a list of strings, with `tokenizer=` (`texts_batch`)."""
    from .model.classify import classify as model_classify
    check_model_args(params, cfg, "classify")
    if not cfg.num_labels:
        raise ConfigError("classify: this model has no score head (model.num_labels=0); a "
                          "Hugging Face *ForSequenceClassification checkpoint loads with one")
    if _is_text(tokens):
        tokens, kwargs["mask"] = texts_batch(tokens, tokenizer, cfg, "classify", args, kwargs)
    check_tokens(tokens, cfg, "classify")
    return model_classify(params, cfg, tokens, *args, **kwargs)


def init_params(cfg, key):
    """`jaxlm.init_params`: the config checked first."""
    from .model import init_params as model_init
    check_model_cfg(cfg, "init_params")
    return model_init(cfg, key)
