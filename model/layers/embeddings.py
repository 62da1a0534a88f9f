"""Token embedding and the output head (tied or untied)."""

import jax.numpy as jnp

from jaxlm.model.config import dtype_of
from jaxlm.model.params import Spec, normal
from jaxlm.sharding.rules import constrain


def embedding_specs(cfg):
    return {"tokens": Spec((cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           normal(cfg.init_std), cfg.param_dtype)}


def head_specs(cfg):
    return {"kernel": Spec((cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                           normal(cfg.init_std), cfg.param_dtype)}


def embed(p, tokens, cfg):
    x = jnp.take(p["tokens"], tokens, axis=0).astype(dtype_of(cfg.dtype))
    return constrain(x, ("batch", "seq", "embed"))


def unembed(params, x, cfg):
    """Logits in float32, from the tied embedding or the separate head."""
    if cfg.tie_embeddings:
        w = params["embed"]["tokens"].astype(x.dtype)
        logits = jnp.einsum("btd,vd->btv", x, w, preferred_element_type=jnp.float32)
    else:
        w = params["head"]["kernel"].astype(x.dtype)
        logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))
