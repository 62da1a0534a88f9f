"""Greedy decode of the 1B preset on one accelerator: tokens/s and memory-bandwidth use.

    python benchmarks/decode_gpu.py [--impl auto] [--batches 1 64] [--dry-run] [--out f.json]

`jaxlm.generate` (one prefill + the compiled decode loop) with bf16 weights and
cache, greedy, no EOS. The per-step time is a difference, so prefill and
compilation drop out: (t(n2 new tokens) - t(n1)) / (n2 - n1), both lengths in one
width bucket (one compiled loop), each the median of 3 timed calls after a
warm-up. Bytes read per step = the weights (bf16) + the KV cache up to the mean
context of those steps (useful bytes: a kernel that reads the whole
preallocated cache moves more). Memory-bandwidth utilisation (`mbu`) = bytes per
step / step time / the HBM copy bandwidth measured here (benchlib).

--dry-run: the tiny model on any platform, the same JSON keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import numpy as np

from benchlib import copy_bandwidth, device_info, guarded, write_json
from jaxlm.model import init_params, model_specs
from jaxlm.config import load_config
from jaxlm.model.params import count

DRY_MODEL = dict(vocab_size=128, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128,
                 max_seq_len=256)


def _seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up (compiles on the first call)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_batch(params, cfg, batch: int, prompt_len: int, n1: int, n2: int, hbm: float) -> dict:
    from jaxlm.infer.generate import generate
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    max_len = prompt_len + n2
    row = {"batch": batch, "prompt_len": prompt_len, "new_tokens": [n1, n2], "max_len": max_len}

    def bench():
        t1, t2 = (_seconds(lambda n=n: generate(params, cfg, prompts, max_new_tokens=n,
                                                max_len=max_len).tokens) for n in (n1, n2))
        step = (t2 - t1) / (n2 - n1)
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        ctx = prompt_len + (n1 + n2) / 2
        kv_bytes = batch * ctx * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 2  # bf16
        nbytes = weight_bytes + kv_bytes
        return {"step_ms": step * 1e3, "tokens_per_s": batch / step,
                "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                "bytes_per_step": nbytes, "gbps": nbytes / step / 1e9,
                "mbu": nbytes / step / hbm, "t_n1_s": t1, "t_n2_s": t2}
    return guarded(row, bench)


def run(impl: str, batches, dry: bool = False) -> dict:
    cfg = load_config("llama-1b").model
    if dry:
        cfg = dataclasses.replace(cfg, **DRY_MODEL)
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16", remat="none",
                              attention_impl=impl)
    hbm = copy_bandwidth(3 if dry else 10, nbytes=2 ** 23 if dry else 2 ** 31)
    params = init_params(cfg, jax.random.key(0))
    prompt_len, n1, n2 = (8, 2, 34) if dry else (128, 8, 64)  # one width bucket (64)
    rows = [bench_batch(params, cfg, b, prompt_len, n1, n2, hbm) for b in batches]
    return {"impl": impl, "params": count(model_specs(cfg)), "copy_bandwidth_gbps": hbm / 1e9,
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="auto", choices=["pallas", "cudnn", "xla", "auto"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {**device_info(), "mode": "dry" if args.dry_run else "full",
              **run(args.impl, args.batches, args.dry_run)}
    for r in result["rows"]:
        print({k: v for k, v in r.items() if k != "traceback"})
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
