"""Greedy decode tokens/s per `generate.kv_dtype` (auto, int8, int4, fp8), batch 1 and 16.

    python benchmarks/kv_dtype.py [--config bench-cpu] [--batches 1 16] [--new 128]
        [--cache contiguous|paged] [--repeats 5] [--out f.json]

`jaxlm.generate` over the config's model (random weights, float32 on bench-cpu),
prompts of 16 tokens, every row generating exactly --new tokens. Per batch the formats
are timed in turn, round after round, each compiled first, so that load on a shared
machine falls on all of them alike: the medians of tokens/s and of each format's ratio
to auto in the same round. The cache bytes per format are those of the arrays
`init_cache` allocates for that batch. Quality is not measured here: at random init
the logits are near-ties, so any format parts greedy paths (tests/test_kv_quant.py
compares logits against the float cache).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jaxlm
from jaxlm.config import load_config
from jaxlm.model.config import KV_DTYPES
from jaxlm.model.kv import cache_bytes, cache_shapes


def run(config, batches, new: int, cache: str, repeats: int) -> dict:
    cfg = config.model
    params = jaxlm.init_params(cfg, jax.random.key(0))
    out = {"platform": jax.devices()[0].platform, "jax": jax.__version__, "cache": cache,
           "new_tokens": new, "batches": {}}
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, 16)).tolist()
        kw = dict(max_new_tokens=new, min_new_tokens=new, cache=cache)
        runs = {d: (lambda d=d: jaxlm.generate(params, cfg, prompts, kv_dtype=d, **kw))
                for d in KV_DTYPES}
        for fn in runs.values():  # compile
            fn()
        tps = {d: [] for d in KV_DTYPES}
        for _ in range(repeats):
            for d, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                tps[d].append(batch * new / (time.perf_counter() - t0))
        length = 16 + new
        out["batches"][batch] = {d: {
            "tokens_per_s": round(float(np.median(tps[d])), 1),
            "vs_auto": round(float(np.median(np.divide(tps[d], tps["auto"]))), 3),
            "cache_bytes": cache_bytes(cache_shapes(cfg, batch, length, kv_dtype=d))}
            for d in KV_DTYPES}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench-cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--cache", default="contiguous", choices=("contiguous", "paged"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [])
    res = run(cfg, args.batches, args.new, args.cache, args.repeats)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
