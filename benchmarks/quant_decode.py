"""Decode speed per weight dtype: greedy tokens/s of `jaxlm.generate` on the bench-cpu
shape with float32 weights and with model.weight_dtype = int8, int4, nf4, fp8
(round-to-nearest from the same random float32 weights), at batch 1 and 16, in one
process. Each configuration is compiled first; then the rounds alternate the dtypes
so that a change in machine load hits them alike, and the median per cell is printed
as a markdown table with its ratio to float32 and the params' bytes (`param_bytes`).

    python benchmarks/quant_decode.py [--rounds 3] [--new-tokens 64] [--config bench-cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from jaxlm.config import load_config
from jaxlm.infer.generate import generate
from jaxlm.model import init_params
from jaxlm.model.quantize import param_bytes, quantize_params

DTYPES = ("float32", "int8", "int4", "nf4", "fp8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench-cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    cfg = load_config(args.config, []).model
    params = init_params(cfg, jax.random.key(0))
    models = {"float32": (cfg, params)}
    for fmt in DTYPES[1:]:
        q = dataclasses.replace(cfg, weight_dtype=fmt)
        models[fmt] = (q, jax.jit(lambda p, q=q: quantize_params(p, q))(params))
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: np.random.default_rng(b).integers(3, cfg.vocab_size, (b, args.prompt)).tolist()
               for b in batches}
    kw = dict(max_new_tokens=args.new_tokens)
    for b in batches:  # compile every configuration first
        for c, p in models.values():
            generate(p, c, prompts[b], **kw)
    speed = {(d, b): [] for d in DTYPES for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            for d in DTYPES:
                c, p = models[d]
                t0 = time.perf_counter()
                out = generate(p, c, prompts[b], **kw)
                speed[d, b].append(float(np.sum(out.lengths)) / (time.perf_counter() - t0))
    nbytes = param_bytes(dataclasses.replace(cfg, quant_group=cfg.quant_group))
    print(f"{args.config}: prompt {args.prompt}, {args.new_tokens} new tokens, greedy; median of "
          f"{args.rounds} alternated rounds; jax {jax.__version__} {jax.default_backend()}")
    head = " | ".join(f"batch {b} tok/s (x float32)" for b in batches)
    print(f"| weights | params | {head} |")
    print("| --- | --- |" + " --- |" * len(batches))
    for d in DTYPES:
        mib = nbytes["float" if d == "float32" else d] / 2**20
        cells = []
        for b in batches:
            med = statistics.median(speed[d, b])
            base = statistics.median(speed["float32", b])
            cells.append(f"{med:.1f} ({med / base:.2f})")
        print(f"| {d} | {mib:.2f} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
