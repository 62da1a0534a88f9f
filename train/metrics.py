"""Throughput accounting: the per-device peak, MFU, and the metrics logs."""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(dtype="float32", n: int = 1024, seconds: float = 0.25) -> float:
    """FLOP/s of a square [n, n] matmul on the default device: the MFU baseline.

    Best of at least 5 timed repetitions (and `seconds` of them) after a warm-up, so
    the number is the machine's attainable dense-matmul rate for `dtype`, not a
    datasheet value. Measured once per process for each (dtype, n, device kind):
    a later run in the same process (a notebook, a sweep) reuses it.
    """
    return _measured_peak(str(dtype), n, seconds, jax.devices()[0].device_kind)


@functools.lru_cache(maxsize=None)
def _measured_peak(dtype: str, n: int, seconds: float, device_kind: str) -> float:
    a = jnp.ones((n, n), dtype)  # the values do not change the rate
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n ** 3 / best


# Datasheet dense bf16 FLOP/s per chip (no sparsity), keyed by a lower-case
# fragment of `jax.Device.device_kind`; the first match wins, so the more
# specific names come first. NVIDIA H100/H200 SXM: 989.4 TFLOP/s (H100 PCIe 756,
# NVL 835); Google Cloud TPU docs: v4 275, v5e 197, v5p 459, v6e 918.
DATASHEET_BF16_PEAK = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("h200", 989e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("tpu v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("tpu v4", 275e12),
)


def datasheet_peak(device_kind: str):
    """Per-device dense bf16 peak FLOP/s of a known accelerator, else None."""
    kind = device_kind.lower()
    return next((flops for key, flops in DATASHEET_BF16_PEAK if key in kind), None)


def device_peak(dtype: str = "float32", override: float = 0.0, seconds: float = 1.0,
                sharing: int = 1):
    """-> (per-device peak FLOP/s, where it came from: "config" | "datasheet" | "measured").

    `override` (train.peak_flops) wins; then the datasheet table for the
    default device's kind; on anything else (CPU) the measured matmul rate,
    divided among the `sharing` devices of this process that the run uses
    (forced host devices share the cores the matmul was measured on).
    """
    if override:
        return float(override), "config"
    sheet = datasheet_peak(jax.devices()[0].device_kind)
    if sheet is not None:
        return sheet, "datasheet"
    return measure_matmul_peak(dtype, seconds=seconds) / max(sharing, 1), "measured"


def mesh_devices(mesh) -> tuple[int, int]:
    """(devices in the mesh, those of them on this process)."""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return mesh.devices.size, local


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int,
        peak_per_device: float) -> float:
    """Model FLOPs utilisation of each device: global model FLOP/s over
    (devices x per-device peak). `tokens_per_s` is the global throughput."""
    return tokens_per_s * flops_per_token / (n_devices * peak_per_device)


class MetricsLog:
    """Appends one JSON object per line; each line is flushed as it is written.

    With `tensorboard_dir`, the same records also go to TensorBoard event files
    there (tensorboardX; the run dir, beside metrics.jsonl): every number but
    `step` as a scalar under its own key at that step (loss, lr, grad_norm,
    tokens_per_s, mfu, eval_loss, router and skip counters when present), and
    each element i of a vector (the per-expert load) as `key/i`. The caller
    passes a directory on one process only (process 0).
    """

    def __init__(self, path: str, tensorboard_dir: str | None = None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir:
            self._tb = _summary_writer()(logdir=tensorboard_dir, flush_secs=30)

    def write(self, record: dict):
        plain = {k: _plain(v) for k, v in record.items()}
        # strict JSON: a non-finite number is written as null (never a bare NaN token)
        self._f.write(json.dumps(plain, allow_nan=False) + "\n")
        self._f.flush()
        if self._tb is not None and isinstance(plain.get("step"), int):
            for tag, value in _scalars(plain):
                self._tb.add_scalar(tag, value, plain["step"])

    def close(self):
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch
    whenever it is installed (~3 s of every run's start) only to accept torch tensors,
    and this log writes floats. A torch the process already imported is left as is."""
    import sys
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _scalars(record: dict):
    """(tag, float) for every number in a plain record except the step."""
    for key, value in record.items():
        if key == "step" or isinstance(value, (str, bool)):
            continue
        if isinstance(value, list):
            yield from ((f"{key}/{i}", float(x)) for i, x in enumerate(value) if x is not None)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            yield key, float(value)


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
