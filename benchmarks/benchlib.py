"""Shared pieces of the accelerator benchmarks: timing, the two ceilings
(bf16 matmul rate, HBM copy bandwidth), the device line, the JSON output.

Run from benchmarks/ (its folder is on sys.path when a script there runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp


def timed(fn, *args, iters: int) -> float:
    """Median seconds per call of a jitted fn (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(iters: int, n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s (n^3, random data: zeros run faster)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / timed(f, a, b, iters=iters)


def copy_bandwidth(iters: int, nbytes: int = 2 ** 31) -> float:
    """Measured device-memory bandwidth in bytes/s: a jitted elementwise pass
    over an nbytes bf16 array (reads nbytes, writes nbytes), counting both.
    The array is many times the L2 (60 MB on an H200) at the default 2 GiB."""
    n = nbytes // 2
    x = jax.random.uniform(jax.random.key(2), (n,), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)  # one read and one write per element
    return 2 * nbytes / timed(f, x, iters=iters)


def device_info() -> dict:
    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def peak_memory_bytes():
    """Peak device memory in use so far (GPU/TPU), else None (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def error_of(e: BaseException) -> str:
    """One short line for a failure recorded in the JSON."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def guarded(row: dict, fn) -> dict:
    """Run fn() -> dict into row; an exception becomes row['error'] (+ a traceback tail)."""
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        row["error"] = error_of(e)
        row["traceback"] = traceback.format_exc()[-1500:]
    return row


def write_json(path, result: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=float)
