"""Throughput accounting: the measured matmul peak, MFU, and the JSONL log."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(dtype="float32", n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on the default device: the MFU baseline.

    Best of several timed repetitions after a warm-up, so the number is the
    machine's attainable dense-matmul rate for `dtype`, not a datasheet value.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n ** 3 / best


class MetricsLog:
    """Appends one JSON object per line; each line is flushed as it is written."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict):
        # strict JSON: a non-finite number is written as null (never a bare NaN token)
        self._f.write(json.dumps({k: _plain(v) for k, v in record.items()},
                                 allow_nan=False) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


def _plain(v):
    if isinstance(v, (int, str, bool)):
        return v
    if hasattr(v, "ndim") and v.ndim > 0:  # e.g. the per-expert load
        return [_finite(round(float(x), 6)) for x in v.reshape(-1)]
    try:
        return _finite(float(v))
    except (TypeError, ValueError):
        return str(v)


def _finite(x: float):
    return x if math.isfinite(x) else None
