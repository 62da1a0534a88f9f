"""One attention call for every family; `impl` picks the implementation.

    xla     the reference (`reference.py`): the oracle of every kernel.
    pallas  decode shape (one query per sequence, mask.kv_lengths, no segment
            ids, no bias) -> the decode kernel; anything else -> flash
            attention. On TPU the Mosaic kernels, on GPU the Triton ones; on
            CPU the GPU kernels run in interpret mode (slow, for tests), or
            the TPU kernels in TPU interpret mode with JAXLM_PALLAS_BACKEND=tpu.
            Under an active mesh the kernel runs per shard (`per_shard.py`).

Whatever the impl: under an active mesh whose rules put `seq` on a context
axis of size > 1, self-attention without a KV cache is ring attention
(`ring.py`, XLA math per chunk).
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"), GPU only.
            Calls it cannot express exactly (explicit positions, segment
            ids, kv_lengths, a window without causal, soft-capping, float32)
            go to the pallas kernels instead.
    auto    pallas on TPU/GPU, xla on CPU.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.model.kernels import decode, flash
from jaxlm.model.kernels.backends import platform
from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.model.kernels.per_shard import per_shard
from jaxlm.model.kernels.reference import attention_reference
from jaxlm.model.kernels.ring import ring_applies, ring_attention

IMPLS = ("xla", "pallas", "cudnn", "auto")


def resolve_impl(impl: str) -> str:
    """'auto' -> the platform's choice; 'cudnn' off GPU is a ConfigError."""
    plat = platform()
    if impl not in IMPLS:
        raise ConfigError(f"model.attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if plat in ("gpu", "tpu") else "xla"
    if impl == "cudnn" and plat != "gpu":
        raise ConfigError(f"model.attention_impl='cudnn' needs a GPU (this platform is {plat!r}); "
                          "use 'auto', 'pallas' or 'xla'")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec = MaskSpec(),
              bias: jax.Array | None = None, *, impl: str = "auto", scale: float | None = None,
              softcap: float | None = None, dropout_rate: float = 0.0, dropout_key=None):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D] (KVH divides H) -> [B,Sq,H,D].

    bias [B or 1, H, Sq, Sk] is added to the scores; softcap: scores become
    softcap * tanh(scores / softcap) (before the bias). `dropout_key` with
    `dropout_rate` > 0: dropout on the probabilities (training), in the XLA
    reference only: any other path is a ConfigError."""
    impl = resolve_impl(impl)
    if dropout_key is not None and dropout_rate:
        if impl != "xla" or ring_applies(q, k, mask):
            raise ConfigError(f"model.attention_dropout={dropout_rate} needs the XLA reference "
                              f"attention (model.attention_impl=xla, no context parallelism); "
                              f"this call resolves to {impl!r}")
        return attention_reference(q, k, v, mask, bias=bias, scale=scale, softcap=softcap,
                                   dropout_rate=dropout_rate, dropout_key=dropout_key)
    if ring_applies(q, k, mask):  # context parallelism
        return ring_attention(q, k, v, mask, bias, scale=scale, softcap=softcap)
    if impl == "xla":
        return attention_reference(q, k, v, mask, bias=bias, scale=scale, softcap=softcap)
    _check_static(mask)
    if impl == "cudnn" and cudnn_supports(q, mask, softcap):
        return _cudnn(q, k, v, mask, bias, scale)
    if decode.supports(mask, bias, q.shape[1]):
        def kernel(q, k, v, mask, bias):
            return decode.decode_attention(q, k, v, mask, scale=scale, softcap=softcap)
    else:
        def kernel(q, k, v, mask, bias):
            return flash.flash_attention(q, k, v, mask, bias, scale=scale, softcap=softcap)
    return per_shard(kernel, q, k, v, mask, bias)


def _check_static(mask: MaskSpec) -> None:
    for name in ("causal", "window"):
        if isinstance(getattr(mask, name), jax.Array):
            raise ValueError(f"MaskSpec.{name} must be a Python value for the kernels, got an "
                             "array (build the MaskSpec inside the jitted function)")


def cudnn_supports(q, mask: MaskSpec, softcap: Optional[float]) -> bool:
    """Whether jax.nn.dot_product_attention(cudnn) computes exactly this call."""
    return (q.dtype in (jnp.bfloat16, jnp.float16) and softcap is None
            and mask.q_positions is None and mask.kv_positions is None
            and mask.q_segment_ids is None and mask.kv_lengths is None
            and (mask.window is None or mask.causal))


def _cudnn(q, k, v, mask: MaskSpec, bias, scale):
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=scale,
        is_causal=bool(mask.causal), local_window_size=window, implementation="cudnn")
