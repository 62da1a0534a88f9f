"""Which Pallas lowering to use, and whether to interpret it (CPU)."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

BACKENDS = ("gpu", "tpu")
ENV_BACKEND = "JAXLM_PALLAS_BACKEND"  # on CPU: which kernel to interpret ("gpu" | "tpu")


def platform() -> str:
    """'cpu', 'gpu' or 'tpu' (the default backend jax places arrays on)."""
    return jax.default_backend()


def resolve_backend(backend: Optional[str], interpret: Any):
    """-> (backend, interpret) with defaults filled in.

    backend: default the platform's own lowering; on CPU the GPU kernel, or
    $JAXLM_PALLAS_BACKEND. interpret: default True on CPU; True for the TPU
    kernel means TPU interpret mode (`pltpu.InterpretParams()`), for the GPU
    kernel the generic `interpret=True` (HLO interpreter).
    """
    plat = platform()
    if backend is None:
        backend = plat if plat in BACKENDS else os.environ.get(ENV_BACKEND, "gpu")
    if backend not in BACKENDS:
        raise ValueError(f"pallas backend {backend!r} must be one of {BACKENDS}")
    if interpret is None:
        interpret = plat not in BACKENDS
    if interpret is True and backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        interpret = pltpu.InterpretParams()
    return backend, interpret
