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
(`ring.py`); per chunk it runs the flash kernels where the impl runs them
(`ring_impl`: pallas, or an explicit cudnn, which falls back to them), else
the XLA math.
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"), GPU only.
            Calls it cannot express exactly (explicit positions, segment
            ids, kv_lengths, a window without causal, soft-capping, float32)
            go to the pallas kernels instead.
    auto    the fastest path validated on the platform (`call_impl`), until
            jaxlm's own Pallas kernels have been compiled and measured on
            hardware: cudnn on GPU, jax's own splash-attention kernel
            (`jax.experimental.pallas.ops.tpu.splash_attention`) on TPU, and
            xla for every call those cannot express exactly (a bias: ALiBi,
            T5; explicit positions, segment ids, kv_lengths; ...); xla on CPU.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ...errors import ConfigError
from . import decode, flash
from .backends import platform
from .mask import MaskSpec
from .per_shard import per_shard
from .reference import attention_reference
from .ring import ring_applies, ring_attention

IMPLS = ("xla", "pallas", "cudnn", "auto")


# what `auto` means per platform (the call may still fall back to xla: `call_impl`)
AUTO = {"gpu": "cudnn", "tpu": "splash"}
SPLASH_BLOCK = 128  # the splash kernel's default block sizes (q and kv)


def resolve_impl(impl: str) -> str:
    """'auto' -> the platform's choice (AUTO; xla elsewhere); 'cudnn' off GPU is a
    ConfigError."""
    plat = platform()
    if impl not in IMPLS:
        raise ConfigError(f"model.attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        return AUTO.get(plat, "xla")
    if impl == "cudnn" and plat != "gpu":
        raise ConfigError(f"model.attention_impl='cudnn' needs a GPU (this platform is {plat!r}); "
                          "use 'auto', 'pallas' or 'xla'")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec = MaskSpec(),
              bias: jax.Array | None = None, *, impl: str = "auto", scale: float | None = None,
              softcap: float | None = None, dropout_rate: float = 0.0, dropout_key=None,
              kv_heads_major: bool = False):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D] (KVH divides H) -> [B,Sq,H,D].

    kv_heads_major: k/v come as [B,KVH,Sk,D] (a decode loop's per-layer cache,
    `jaxlm.infer.cache.split_layers`): the XLA reference reads them in place; the
    kernels take their [B,Sk,KVH,D] view (the decode kernel's own head-major
    transpose cancels it; the others copy).

    bias [B or 1, H, Sq, Sk] is added to the scores; softcap: scores become
    softcap * tanh(scores / softcap) (before the bias). `dropout_key` with
    `dropout_rate` > 0: dropout on the probabilities (training), in the XLA
    reference only: any other path is a ConfigError."""
    requested, impl = impl, resolve_impl(impl)
    heads_major = (k, v) if kv_heads_major else None
    if kv_heads_major:  # every path but the reference takes the token-major view
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if dropout_key is not None and dropout_rate:
        if impl != "xla" or ring_applies(q, k, mask):
            raise ConfigError(f"model.attention_dropout={dropout_rate} needs the XLA reference "
                              f"attention (model.attention_impl=xla, no context parallelism); "
                              f"this call resolves to {impl!r}")
        return attention_reference(q, k, v, mask, bias=bias, scale=scale, softcap=softcap,
                                   dropout_rate=dropout_rate, dropout_key=dropout_key)
    if ring_applies(q, k, mask):  # context parallelism
        return ring_attention(q, k, v, mask, bias, scale=scale, softcap=softcap,
                              impl=ring_impl(requested))
    if impl != "xla":
        _check_static(mask)
    impl = call_impl(requested, q, k, mask, bias, softcap)
    if impl == "xla":
        return attention_reference(q, *(heads_major or (k, v)), mask, bias=bias, scale=scale,
                                   softcap=softcap, kv_heads_major=kv_heads_major)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask, bias, scale)
    if impl == "splash":
        return per_shard(lambda q, k, v, mask, bias: _splash(q, k, v, mask, scale, softcap),
                         q, k, v, mask, bias)
    if decode.supports(mask, bias, q.shape[1]):
        def kernel(q, k, v, mask, bias):
            return decode.decode_attention(q, k, v, mask, scale=scale, softcap=softcap)
    else:
        def kernel(q, k, v, mask, bias):
            return flash.flash_attention(q, k, v, mask, bias, scale=scale, softcap=softcap)
    return per_shard(kernel, q, k, v, mask, bias)


def ring_impl(impl: str) -> str:
    """Ring attention's per-chunk math for model.attention_impl=impl: "pallas"
    (the flash kernels) where a call with explicit positions, as every ring
    chunk has, would run them (impl pallas; an explicit cudnn falls back to
    them, see `call_impl`), else "xla" (auto: cuDNN and splash take no
    explicit positions, so such calls are xla)."""
    resolved = resolve_impl(impl)
    return "pallas" if resolved == "pallas" or (resolved == "cudnn" and impl == "cudnn") else "xla"


def call_impl(impl: str, q, k, mask: MaskSpec, bias, softcap: Optional[float]) -> str:
    """The implementation one call runs: "xla", "cudnn", "splash" or "pallas".

    impl is the configured model.attention_impl. "auto" takes the platform's
    choice (AUTO) where that kernel computes exactly this call, else "xla";
    an explicit "cudnn" falls back to the pallas kernels (as before); "pallas"
    and "xla" are what they say. q [B,Sq,H,D], k [B,Sk,KVH,D].
    """
    resolved = resolve_impl(impl)
    if resolved == "cudnn":
        if cudnn_supports(q, mask, softcap) and (impl != "auto" or (
                bias is None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)):
            return "cudnn"
        return "xla" if impl == "auto" else "pallas"
    if resolved == "splash":
        return "splash" if splash_supports(q, k, mask, bias) else "xla"
    return resolved


def splash_supports(q, k, mask: MaskSpec, bias) -> bool:
    """Whether jax's TPU splash-attention kernel computes exactly this call: no bias,
    no explicit positions / segment ids / kv_lengths (causal, window and full masks
    only), both sequence lengths multiples of its 128 blocks."""
    return (bias is None and mask.q_positions is None and mask.kv_positions is None
            and mask.q_segment_ids is None and mask.kv_segment_ids is None
            and mask.kv_lengths is None and not isinstance(mask.causal, jax.Array)
            and q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0)


def _splash(q, k, v, mask: MaskSpec, scale, softcap, interpret: bool = False):
    """jax's splash attention (TPU; interpret=True runs it on CPU, for tests).

    q [B,Sq,H,D], k/v [B,Sk,KVH,D] -> [B,Sq,H,D]: KV heads repeated to H, q
    pre-scaled (the kernel does not scale), vmapped over the batch; the mask
    is the kernel's CausalMask / LocalMask / FullMask for every head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as masks)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if mask.window is not None:
        one = masks.LocalMask((sq, sk), (mask.window - 1, 0 if mask.causal else None), offset=0)
    elif mask.causal:
        one = masks.CausalMask((sq, sk))
    else:
        one = masks.FullMask((sq, sk))
    kernel = splash.make_splash_mha_single_device(
        mask=masks.MultiHeadMask([one] * h), attn_logits_soft_cap=softcap, interpret=interpret)
    scale = d ** -0.5 if scale is None else scale
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B,S,H,D] -> [B,H,S,D]
    rep = h // k.shape[2]
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)),
                           heads_first(jnp.repeat(k, rep, axis=2)),
                           heads_first(jnp.repeat(v, rep, axis=2)))
    return heads_first(out).astype(q.dtype)


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
