"""Training throughput of the 1B preset on one accelerator: tokens/s and MFU.

    python benchmarks/train_gpu.py --impl pallas [--dry-run] [--steps N] [--out f.json] [k=v ...]

Runs `configs/llama-1b.yaml` (bf16 compute, f32 master weights, AdamW, seq
2048) on synthetic batches through the library's own compiled train step
(scripts/bench.py `bench_train`: 2 warm-up steps, then `--steps` timed), with
`model.attention_impl` set to `--impl` (pallas | cudnn | xla | auto). MFU is per
device (train/metrics.py `mfu`) against the datasheet bf16 peak
(`mfu_datasheet`) and against the bf16 matmul rate measured here
(`mfu_measured`). FLOPs per token: MaxText's count (model/config.py
`model_flops_per_token`). `key=value` arguments override the preset
(`model.remat=none data.batch_size=16`).

--dry-run: a tiny model (1 layer, d_model 64, seq 64) on any platform, the same
JSON keys.
"""

from __future__ import annotations

import argparse
import sys

import jax

from benchlib import device_info, guarded, matmul_peak, peak_memory_bytes, write_json
from jaxlm.model import model_specs
from jaxlm.config import load_config
from jaxlm.model.config import model_flops_per_token
from jaxlm.model.params import count
from jaxlm.train.metrics import datasheet_peak, mfu

DRY = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=1", "model.n_heads=2",
       "model.n_kv_heads=1", "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=64",
       "data.batch_size=2", "train.warmup_steps=1"]


def run(impl: str, steps: int, overrides=(), dry: bool = False) -> dict:
    from jaxlm.scripts.bench import bench_train
    cfg = load_config("llama-1b", [*(DRY if dry else []), *overrides,
                                   f"model.attention_impl={impl}"])
    m = cfg.model
    fpt = model_flops_per_token(m, cfg.data.seq_len)
    row = {"impl": impl, "params": count(model_specs(m)), "seq_len": cfg.data.seq_len,
           "batch_size": cfg.data.batch_size, "remat": m.remat, "dtype": m.dtype,
           "param_dtype": m.param_dtype, "flops_per_token": fpt, "steps": steps}

    def bench():
        tps = bench_train(cfg, steps=steps)
        n = jax.device_count()
        sheet = datasheet_peak(jax.devices()[0].device_kind)
        measured = matmul_peak(3, n=256 if dry else 8192)
        return {"tokens_per_s": tps,
                "step_s": cfg.data.batch_size * cfg.data.seq_len / tps,
                "tflops_per_device": tps * fpt / n / 1e12,
                "datasheet_peak_tflops": sheet and sheet / 1e12,
                "measured_peak_tflops": measured / 1e12,
                "mfu_datasheet": sheet and mfu(tps, fpt, n, sheet),
                "mfu_measured": mfu(tps, fpt, n, measured),
                "peak_memory_gib": (peak_memory_bytes() or 0) / 2 ** 30 or None}
    return guarded(row, bench)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="auto", choices=["pallas", "cudnn", "xla", "auto"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    row = run(args.impl, 1 if args.dry_run else args.steps, args.overrides, args.dry_run)
    result = {**device_info(), "mode": "dry" if args.dry_run else "full", **row}
    print({k: v for k, v in result.items() if k != "traceback"})
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
