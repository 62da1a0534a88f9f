"""One attention call for every family; `impl` picks the implementation."""

from __future__ import annotations

import jax

from jaxlm.errors import ConfigError
from jaxlm.model.kernels.mask import MaskSpec
from jaxlm.model.kernels.reference import attention_reference


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "xla"  # the Pallas kernels (TPU/GPU) plug in here
    if impl in ("pallas", "cudnn"):
        raise ConfigError(f"model.attention_impl={impl!r} is not available yet; use 'xla' or 'auto'")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec = MaskSpec(),
              bias: jax.Array | None = None, *, impl: str = "auto", scale: float | None = None):
    """q [B,Sq,H,D], k/v [B,Sk,KVH,D] (KVH divides H) -> [B,Sq,H,D]."""
    impl = resolve_impl(impl)
    return attention_reference(q, k, v, mask, bias=bias, scale=scale)
