"""`jaxlm.embed`: pooled sentence vectors from an encoder's final hidden states."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from .families import forward


@functools.partial(jax.jit, static_argnums=1)
def embed(params, cfg, tokens, mask=None, token_types=None):
    """[B, D] float32: the mean of the final hidden states over `mask` [B, S] (1 = token).

    Masked tokens (padding) are kept out of attention too (segment id 0), so a
    sentence's vector does not depend on how much padding follows it.
    Positions are arange(S): pad on the right. Encoder family (decoders also
    work, pooling their causal hidden states; encoder-decoders pool their
    encoder's output, as sentence-T5).
    """
    if cfg.family not in ("encoder", "decoder", "encoder_decoder"):
        raise ConfigError(f"jaxlm.embed: model.family={cfg.family!r} is not supported "
                          "(encoder, decoder or encoder_decoder)")
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    segment_ids = (mask > 0).astype(jnp.int32)
    if cfg.family == "encoder_decoder":
        from .families.encoder_decoder import encode
        hidden = encode(params, cfg, tokens, segment_ids)
    else:
        extra = {} if token_types is None else {"token_types": token_types}
        hidden, _ = forward(params, cfg, tokens, None, segment_ids, return_hidden=True, **extra)
    weights = segment_ids.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
