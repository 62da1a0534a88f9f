"""Token embedding and the output head (tied or untied)."""

import jax.numpy as jnp

from ..config import dtype_of
from .dense import dense
from .positions import absolute_positions
from ..params import Spec, normal
from ...sharding.rules import constrain


def embedding_specs(cfg):
    return {"tokens": Spec((cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           normal(cfg.init_std), cfg.param_dtype)}


def head_specs(cfg):
    return {"kernel": Spec((cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           normal(cfg.init_std), cfg.param_dtype)}


def embed(p, tokens, cfg):
    x = jnp.take(p["tokens"], tokens, axis=0)
    if cfg.scale_embeddings:  # sqrt(d_model) rounded to the weights' dtype, as HF's Gemma
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    return constrain(x.astype(dtype_of(cfg.dtype)), ("batch", "seq", "embed"))


def cap_logits(logits, cfg):
    """model.final_logit_softcap c > 0: c * tanh(logits / c) (Gemma 2); else logits."""
    c = cfg.final_logit_softcap
    return logits if not c else c * jnp.tanh(logits / c)


def head_weights(params, cfg):
    """The output head as [d_model, vocab]: the tied embedding or the separate head."""
    if cfg.tie_embeddings:
        return params["embed"]["tokens"].T
    return params["head"]["kernel"]


def embed_tokens_and_positions(params, tokens, positions, cfg):
    """Token embeddings plus the absolute position embeddings, if the config has them."""
    x = embed(params["embed"], tokens, cfg)
    extra = absolute_positions(params, positions, cfg, x.dtype)
    return x if extra is None else x + extra


def unembed(params, x, cfg):
    """Logits in float32 from hidden states [..., D]."""
    logits = dense(x, head_weights(params, cfg).astype(x.dtype), out_dtype=jnp.float32)
    return constrain(cap_logits(logits, cfg), ("batch", "seq", "vocab"))
