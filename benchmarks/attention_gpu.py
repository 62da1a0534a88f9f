"""Attention kernels on one GPU: flash fwd+bwd TFLOP/s and decode GB/s.

    python benchmarks/attention_gpu.py [--quick | --dry-run] [--out results.json]

Flash attention (causal, bf16, head dim 128, 16 heads, 16k tokens per batch):
sequence 2k / 4k / 8k, forward and forward+backward, for the Pallas kernel
(`impl=pallas`), cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`)
and the XLA reference. FLOPs count the causal half only: forward
2 * 2 * B*H*S^2*D / 2, backward 2.5x the forward (the FlashAttention-2 convention).
MFU is against the bf16 matmul peak measured here, in the same run; each
Pallas row also gets `vs_cudnn` (its fwd+bwd TFLOP/s over cuDNN's at that seq).

Decode attention (bf16, 32 query heads over 8 KV heads, head dim 128, every
sequence filled to the cache length): cache length 1k..32k, batch 1..64, the
Pallas decode kernel against the XLA reference. GB/s = bytes of K and V read
(2 * B * T * KVH * D * 2) over the time; `hbm_fraction` = that over the HBM
copy bandwidth measured in the same run (benchlib.copy_bandwidth).

--dry-run: tiny shapes on any platform (CPU: the kernels interpreted), the same
JSON keys; it checks the plumbing, not the speed (benchmarks/gpu_check.sh --dry-run).

Each configuration is first checked against the XLA reference (max abs
difference printed); timings are medians over --iters runs after a warm-up.
Prints a table, then one JSON document (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from benchlib import copy_bandwidth, device_info, error_of, matmul_peak, timed, write_json
from jaxlm.model.kernels import MaskSpec, attention
from jaxlm.model.kernels.reference import attention_reference


def _err(x, y) -> float:
    return float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))


# ------------------------------------------------------------ flash

def bench_flash(seq: int, impl: str, iters: int, tokens: int = 16384, heads: int = 16,
                head_dim: int = 128) -> dict:
    b = max(1, tokens // seq)
    key = jax.random.split(jax.random.key(0), 4)
    shape = (b, seq, heads, head_dim)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in key)
    mask = MaskSpec(causal=True)

    def fwd(q, k, v):
        return attention(q, k, v, mask, impl=impl)

    def fwd_bwd(q, k, v, do):
        out, pull = jax.vjp(fwd, q, k, v)
        return out, pull(do)

    fwd_j, fwd_bwd_j = jax.jit(fwd), jax.jit(fwd_bwd)
    row = {"kind": "flash", "impl": impl, "seq": seq, "batch": b, "heads": heads,
           "head_dim": head_dim}
    try:
        ref = jax.jit(lambda q, k, v: attention_reference(q, k, v, mask))(q, k, v)
        row["max_abs_err"] = _err(fwd_j(q, k, v), ref)
        del ref
        t_f = timed(fwd_j, q, k, v, iters=iters)
        t_fb = timed(fwd_bwd_j, q, k, v, do, iters=iters)
    except Exception as e:  # OOM (the reference at 8k) or an unsupported shape
        row["error"] = error_of(e)
        return row
    flops_f = 4 * b * heads * seq * seq * head_dim / 2
    row.update(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
               fwd_tflops=flops_f / t_f / 1e12, fwd_bwd_tflops=3.5 * flops_f / t_fb / 1e12)
    return row


# ------------------------------------------------------------ decode

def bench_decode(cache_len: int, batch: int, impl: str, iters: int, heads: int = 32,
                 kv_heads: int = 8, head_dim: int = 128) -> dict:
    key = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(key[0], (batch, 1, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(key[1], (batch, cache_len, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(key[2], (batch, cache_len, kv_heads, head_dim), jnp.bfloat16)
    lengths = jnp.full((batch,), cache_len, jnp.int32)

    def mask_of(lengths):
        return MaskSpec(causal=True, q_positions=(lengths - 1)[:, None], kv_lengths=lengths)

    f = jax.jit(lambda q, k, v, lengths: attention(q, k, v, mask_of(lengths), impl=impl))
    ref = jax.jit(lambda q, k, v, lengths: attention_reference(q, k, v, mask_of(lengths)))
    row = {"kind": "decode", "impl": impl, "cache_len": cache_len, "batch": batch,
           "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    try:
        row["max_abs_err"] = _err(f(q, k, v, lengths), ref(q, k, v, lengths))
        t = timed(f, q, k, v, lengths, iters=iters)
    except Exception as e:
        row["error"] = error_of(e)
        return row
    nbytes = 2 * batch * cache_len * kv_heads * head_dim * 2
    row.update(ms=t * 1e3, gbps=nbytes / t / 1e9)
    return row


# ------------------------------------------------------------ main

def _table(rows, peak):
    out = ["", f"bf16 matmul peak measured here: {peak:.0f} TFLOP/s", "",
           "flash (causal, bf16, D=128)   seq   batch  fwd ms  fwd TF/s  fwd+bwd ms  fwd+bwd TF/s"
           "  MFU(f+b)  max|err|"]
    for r in rows:
        if r["kind"] != "flash":
            continue
        head = f"  {r['impl']:<28}{r['seq']:>5}{r['batch']:>8}"
        if "error" in r:
            out.append(head + f"  {r['error']}")
            continue
        out.append(head + f"{r['fwd_ms']:>8.2f}{r['fwd_tflops']:>10.1f}{r['fwd_bwd_ms']:>12.2f}"
                   f"{r['fwd_bwd_tflops']:>14.1f}{100 * r['fwd_bwd_tflops'] / peak:>9.0f}%"
                   f"{r['max_abs_err']:>10.1e}")
    out += ["", "decode (bf16, 32/8 heads, D=128)  cache  batch      ms     GB/s  max|err|"]
    for r in rows:
        if r["kind"] != "decode":
            continue
        head = f"  {r['impl']:<30}{r['cache_len']:>7}{r['batch']:>7}"
        if "error" in r:
            out.append(head + f"  {r['error']}")
            continue
        out.append(head + f"{r['ms']:>8.3f}{r['gbps']:>9.0f}{r['max_abs_err']:>10.1e}")
    return "\n".join(out)


SIZES = {  # flash seqs, flash tokens per batch, heads, head_dim; decode cache lens, batches
    "full": dict(seqs=[2048, 4096, 8192], tokens=16384, heads=16, head_dim=128,
                 lens=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 4, 16, 64],
                 kv_heads=8, q_heads=32),
    "quick": dict(seqs=[2048], tokens=16384, heads=16, head_dim=128, lens=[1024, 8192],
                  batches=[1, 16], kv_heads=8, q_heads=32),
    "dry": dict(seqs=[64], tokens=128, heads=2, head_dim=64, lens=[64], batches=[2],
                kv_heads=1, q_heads=2),
}


def _ratios(rows) -> None:
    """Pallas fwd+bwd over cuDNN's at the same seq; decode GB/s over the copy bandwidth."""
    cudnn = {r["seq"]: r.get("fwd_bwd_tflops") for r in rows
             if r["kind"] == "flash" and r["impl"] == "cudnn"}
    for r in rows:
        if r["kind"] == "flash" and r["impl"] == "pallas" and r.get("fwd_bwd_tflops") \
                and cudnn.get(r["seq"]):
            r["vs_cudnn"] = r["fwd_bwd_tflops"] / cudnn[r["seq"]]


def run(mode: str, iters: int, flash_impls=("pallas", "cudnn", "xla"),
        decode_impls=("pallas", "xla")) -> dict:
    z = SIZES[mode]
    dry = mode == "dry"
    peak = matmul_peak(iters, n=256 if dry else 8192) / 1e12
    copy_gbps = copy_bandwidth(iters, nbytes=2 ** 23 if dry else 2 ** 31) / 1e9
    print(json.dumps({"kind": "ceilings", "matmul_peak_tflops": peak,
                      "copy_bandwidth_gbps": copy_gbps}), flush=True)
    rows = []
    for seq in z["seqs"]:
        for impl in flash_impls:
            rows.append(bench_flash(seq, impl, iters, tokens=z["tokens"], heads=z["heads"],
                                    head_dim=z["head_dim"]))
            print(json.dumps(rows[-1]), flush=True)
    for cache_len in z["lens"]:
        for batch in z["batches"]:
            for impl in decode_impls:
                row = bench_decode(cache_len, batch, impl, iters, heads=z["q_heads"],
                                   kv_heads=z["kv_heads"], head_dim=z["head_dim"])
                if "gbps" in row:
                    row["hbm_fraction"] = row["gbps"] / copy_gbps
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)
    _ratios(rows)
    return {**device_info(), "mode": mode, "matmul_peak_tflops": peak,
            "copy_bandwidth_gbps": copy_gbps, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and iterations")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, any platform")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="also write the JSON results here")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.dry_run:
        print(f"needs a GPU (jax platform is {jax.default_backend()!r}); "
              "--dry-run runs tiny shapes anywhere", file=sys.stderr)
        return 2
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    result = run(mode, 1 if args.dry_run else 5 if args.quick else args.iters)
    print(_table(result["rows"], result["matmul_peak_tflops"]))
    print(f"HBM copy bandwidth measured here: {result['copy_bandwidth_gbps']:.0f} GB/s")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
