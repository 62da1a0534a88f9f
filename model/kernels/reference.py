"""The XLA reference attention: the oracle every kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.model.layers.dropout import dropout


def attention_reference(q, k, v, mask: MaskSpec, bias=None, scale=None, softcap=None,
                        dropout_rate: float = 0.0, dropout_key=None):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D] -> [B,Sq,H,D].

    GQA/MQA: query heads are grouped over their KV head (no repeated K/V).
    Scores and softmax in float32. Rows with no visible key return zeros.
    Scores = softcap * tanh(scale * q.k / softcap) + bias: the soft cap (if
    any) applies to the scaled dot products, before the bias and the mask.
    `dropout_key` (with `dropout_rate` > 0): inverted dropout on the
    probabilities (training only; None: none).
    """
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    # Head-major operands: the two matmuls become plain batched GEMMs on
    # every backend (the transposes are small next to the scores).
    qg = q.reshape(b, sq, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B,KVH,G,Sq,D]
    kt = k.transpose(0, 2, 1, 3)  # [B,KVH,Sk,D]
    vt = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg * scale, kt, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:  # [B or 1, H, Sq, Sk]
        scores = scores + bias.reshape(bias.shape[0], kvh, g, sq, -1).astype(jnp.float32)
    visible = mask.visible(sq, k.shape[1])  # [B or 1, Sq, Sk]
    visible = visible[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
    probs = dropout(probs, dropout_rate, dropout_key)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(v.dtype), vt,
                     preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, d).astype(q.dtype)
