"""The XLA reference attention: the oracle every kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .mask import MaskSpec
from ..layers.dropout import dropout


def attention_reference(q, k, v, mask: MaskSpec, bias=None, scale=None, softcap=None,
                        dropout_rate: float = 0.0, dropout_key=None,
                        kv_heads_major: bool = False):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D] -> [B,Sq,H,D]; kv_heads_major: k/v [B,KVH,Sk,D]
    (a decode loop's per-layer cache, `jaxlm.infer.cache.split_layers`), read in place.

    GQA/MQA: query heads are grouped over their KV head (no repeated K/V).
    Scores and softmax in float32. Rows with no visible key return zeros.
    Scores = softcap * tanh(scale * q.k / softcap) + bias: the soft cap (if
    any) applies to the scaled dot products, before the bias and the mask.
    `dropout_key` (with `dropout_rate` > 0): inverted dropout on the
    probabilities (training only; None: none).
    """
    b, sq, h, d = q.shape
    kvh = k.shape[1 if kv_heads_major else 2]
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    dropping = dropout_key is not None and dropout_rate
    if sq == 1 and not dropping and not kv_heads_major and (kvh - 1) * g <= 8:
        return _one_query(q, k, v, mask, bias, scale, softcap)
    # Head-major operands: the two matmuls become plain batched GEMMs on
    # every backend (the transposes are small next to the scores).
    qg = q.reshape(b, sq, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B,KVH,G,Sq,D]
    kt, vt = (k, v) if kv_heads_major else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    if sq == 1:  # the keys as the dot's left operand: ~2x faster on XLA:CPU at batch 16
        scores = jnp.einsum("bhkd,bhgqd->bhgqk", kt, qg * scale,
                            preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg * scale, kt,
                            preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:  # [B or 1, H, Sq, Sk]
        scores = scores + bias.reshape(bias.shape[0], kvh, g, sq, -1).astype(jnp.float32)
    visible = mask.visible(sq, kt.shape[2])  # [B or 1, Sq, Sk]
    visible = visible[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
    probs = dropout(probs, dropout_rate, dropout_key)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(v.dtype), vt,
                     preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, d).astype(q.dtype)


def _one_query(q, k, v, mask: MaskSpec, bias, scale, softcap):
    """attention_reference for one query per row, reading k/v [B,Sk,KVH,D] in their
    own layout: both matmuls take k, v as [B, Sk*KVH, D] (a reshape, no copy), so
    XLA feeds a KV cache to the dot in place instead of materialising the
    head-major transpose of it (decode steps read each layer's cache once).

    The price: every query head is scored against every KV head,
    scores_all "bnd,bhd->bnh" (n = (k, kv head)), then the own-group diagonal
    is kept; the output "bhn,bnd->bhd" takes probabilities zeroed off it.
    That is KVH x the attention FLOPs, so `attention_reference` takes this path
    only for (KVH - 1) * G <= 8 (a copy of the cache costs about that much)."""
    b, _, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    own = jnp.eye(kvh, dtype=bool)[None, :, None, None, :]  # [1,KVH,1,1,KVH]
    kf, vf = k.reshape(b, sk * kvh, d), v.reshape(b, sk * kvh, d)
    # scores_all as "bnd,bhd->bnh": the cache is the dot's left operand in its own
    # row-major layout and only the small q is transposed for the right one
    # ("bhd,bnd->bhn", the cache as a transposed right operand, ran ~3x slower on
    # XLA:CPU at batch 16: ~0.4 ms a layer a step, issue 9)
    s_all = jnp.einsum("bnd,bhd->bnh", kf, q[:, 0] * scale, preferred_element_type=jnp.float32)
    s_all = s_all.reshape(b, sk, kvh, kvh, g)  # [B, Sk, KVH (k's), KVH (q's), G]
    own_t = jnp.eye(kvh, dtype=bool)[None, None, :, :, None]
    scores = jnp.sum(jnp.where(own_t, s_all, 0.0), axis=2).transpose(0, 2, 3, 1)  # [B,KVH,G,Sk]
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:  # [B or 1, H, 1, Sk]
        scores = scores + bias.reshape(bias.shape[0], kvh, g, -1).astype(jnp.float32)
    visible = mask.visible(1, sk)[:, None]  # [B or 1, 1, 1, Sk]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
    p_all = jnp.where(own, probs[..., None], 0.0).reshape(b, h, sk * kvh)
    out = jnp.einsum("bhn,bnd->bhd", p_all.astype(v.dtype), vf,
                     preferred_element_type=jnp.float32)
    return out[:, None].astype(q.dtype)
