"""Greedy decode tokens/s, jaxlm against Hugging Face transformers, with the roofline.

Same weights (jaxlm's params exported with `jaxlm.model.hf.save_hf`, loaded by
`LlamaForCausalLM`), same prompts, same lengths (every row generates exactly
`new_tokens`), torch on `torch_threads` threads. The roofline per decode step
is max(weight bytes / memory bandwidth, batch x FLOPs per token / matmul peak),
both measured here in the same run (a large numpy copy, a large f32 matmul).

    python -m jaxlm.scripts.bench_decode [--batches 1 16] [--no-hf]
(`jaxlm bench` runs it through `bench_decode_vs_hf`.)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

# timed runs per side, best taken: a 64-token batch-1 run is ~0.1 s, and on a
# shared 2-core VM single runs differ by up to 25% (BENCHMARKS.md)
REPEATS = 5


def memory_bandwidth(n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write counted), best of `repeats`."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] float32 matmul on the default device, best of `repeats`."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def decode_flops_per_token(cfg, params, context: int) -> float:
    """2 x the matmul weights (the embedding gather excluded, the head included)
    + attention's q.k and p.v over `context` cached positions."""
    n = sum(x.size for x in jax.tree.leaves(params["layers"]))
    head = params["head"] if "head" in params else params["embed"]  # tied: the table
    n += sum(x.size for x in jax.tree.leaves(head))
    return 2 * n + 4 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim


def _weight_bytes_read(params) -> int:
    """Bytes of the weights one decode step reads: all but an untied embedding table
    (only its B rows are gathered)."""
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return nbytes(params) - (nbytes(params["embed"]) if "head" in params else 0)


def roofline(cfg, params, batch: int, context: int, bandwidth: float, peak: float) -> dict:
    """Tokens/s bound at this batch: batch / max(weight read time, compute time) per step."""
    weight_bytes = _weight_bytes_read(params)
    step = max(weight_bytes / bandwidth, batch * decode_flops_per_token(cfg, params, context) / peak)
    return {"tokens_per_s": batch / step, "weight_bound": weight_bytes / bandwidth >= step}


def jaxlm_tokens_per_s(cfg, params, prompts, new_tokens: int, repeats: int = REPEATS):
    from ..infer.generate import generate
    generate(params, cfg, prompts, max_new_tokens=new_tokens)  # compile
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(params, cfg, prompts, max_new_tokens=new_tokens)
        best = min(best, time.perf_counter() - t0)
    return float(np.sum(out.lengths)) / best, out.tokens


def hf_tokens_per_s(cfg, params, prompts, new_tokens: int, threads: int = 2,
                    repeats: int = REPEATS):
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.hf import save_hf
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        save_hf(f"{d}/m", cfg, params)
        model = AutoModelForCausalLM.from_pretrained(f"{d}/m", dtype=torch.float32).eval()
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm up
        best, out = math.inf, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t0)
    return ids.shape[0] * new_tokens / best, out[:, ids.shape[1]:].numpy()


def _has_transformers() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def bench_decode_vs_hf(cfg, params, batches=(1, 16), prompt_len: int = 32,
                       new_tokens: int = 64, hf: bool = True, threads: int = 2) -> dict:
    """Per batch: jaxlm and HF tokens/s, their ratio, the roofline and jaxlm's share of it."""
    bw, peak = memory_bandwidth(), matmul_peak()
    print(f"machine: memory bandwidth {bw / 1e9:.1f} GB/s (numpy copy), matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (jit f32 2048^3)")
    out = {"bandwidth_gb_s": round(bw / 1e9, 2), "peak_gflops": round(peak / 1e9, 2)}
    for b in batches:
        prompts = np.random.default_rng(b).integers(3, cfg.vocab_size, (b, prompt_len)).tolist()
        tps, ids = jaxlm_tokens_per_s(cfg, params, prompts, new_tokens)
        roof = roofline(cfg, params, b, prompt_len + new_tokens // 2, bw, peak)
        row = {"jaxlm": round(tps, 1), "roofline": round(roof["tokens_per_s"], 1),
               "of_roofline": round(tps / roof["tokens_per_s"], 3)}
        line = (f"decode batch {b}: jaxlm {tps:.0f} tokens/s; roofline "
                f"{roof['tokens_per_s']:.0f} ({'weight-read' if roof['weight_bound'] else 'compute'}"
                f" bound), jaxlm at {tps / roof['tokens_per_s']:.0%} of it")
        if hf and not _has_transformers():
            hf = False
            print("(transformers / torch not installed: no Hugging Face comparison)")
        if hf:
            htps, hids = hf_tokens_per_s(cfg, params, prompts, new_tokens, threads)
            same = float(np.mean(np.asarray(ids)[:, :new_tokens] == hids))
            row.update(hf=round(htps, 1), ratio=round(tps / htps, 3), same_ids=round(same, 3))
            line += f"; HF transformers {htps:.0f} tokens/s (x{tps / htps:.2f}, ids equal {same:.0%})"
        print(line)
        out[f"batch_{b}"] = row
    return out


def main(argv=None):
    from ..model import init_params
    from ..config import load_config
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench-cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    params = init_params(cfg.model, jax.random.key(0))
    print(bench_decode_vs_hf(cfg.model, params, tuple(args.batches), hf=not args.no_hf))


if __name__ == "__main__":
    main()
