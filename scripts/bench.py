"""`jaxlm bench`: matmul peak, train tokens/s and MFU, decode tokens/s.

Prints readable lines, then one JSON line with peak_gflops,
train_tokens_per_s, train_mfu, decode_tokens_per_s_b1, decode_tokens_per_s_b16,
and decode_vs_hf (jaxlm against Hugging Face generate on the same weights, with
the measured roofline: `jaxlm.scripts.bench_decode`).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from ..model import init_params, model_specs
from ..model.config import model_flops_per_token
from ..sharding.mesh import make_mesh
from ..sharding.rules import named_sharding, use_mesh
from ..train.metrics import device_peak, mesh_devices, mfu
from ..train.optimizer import learning_rate_schedule, make_optimizer
from ..train.state import create_state, state_shardings
from ..train.step import compile_steps


def synthetic_batch(cfg, seed=0):
    b, s = cfg.data.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, s + 1), dtype=np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "loss_mask": np.ones((b, s), np.float32)}


def bench_train(cfg, steps: int = 10) -> float:
    """Steady-state train tokens/s on synthetic batches (data loading excluded)."""
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train, model_specs(cfg.model))
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, seed=0)
        batch_sharding = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        step, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train),
                                state_shardings(cfg, mesh, tx), batch_sharding,
                                cfg.train.loss_vocab_chunk)
        batch = jax.device_put(synthetic_batch(cfg), batch_sharding)
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
    return cfg.data.batch_size * cfg.data.seq_len * steps / dt


def bench_decode(cfg, params, batch: int, prompt_len: int = 16, new_tokens: int = 128) -> float:
    from ..infer.generate import generate
    rng = np.random.default_rng(batch)
    prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    generate(params, cfg, prompts, max_new_tokens=new_tokens)  # compile
    t0 = time.perf_counter()
    out = generate(params, cfg, prompts, max_new_tokens=new_tokens)
    dt = time.perf_counter() - t0
    return float(np.sum(out.lengths)) / dt


def bench_speculative(cfg, params, plain_tps: float, draft_layers: int = 1, k: int = 4,
                      prompt_len: int = 16, new_tokens: int = 128) -> dict:
    """Greedy speculative decoding at batch 1 with a draft made of the target's first
    draft_layers layers (same embeddings and head): acceptance rate and speed-up over
    plain greedy decode (plain_tps tokens/s, measured in the same run)."""
    import dataclasses

    from ..infer.generate import generate
    draft_cfg = dataclasses.replace(cfg, n_layers=draft_layers)
    draft = dict(params, layers=jax.tree.map(lambda a: a[:draft_layers], params["layers"]))
    prompts = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, prompt_len)).tolist()
    kw = dict(max_new_tokens=new_tokens, num_speculative=k, draft=(draft, draft_cfg))
    generate(params, cfg, prompts, **kw)  # compile
    t0 = time.perf_counter()
    out = generate(params, cfg, prompts, **kw)
    tps = float(np.sum(out.lengths)) / (time.perf_counter() - t0)
    return {"tokens_per_s": tps, "speedup": tps / plain_tps,
            "acceptance_rate": out.stats["acceptance_rate"]}


def bench_guided(cfg, params, batch: int = 16, prompt_len: int = 16,
                 digits: int = 127) -> dict:
    """Guided against unguided greedy decode, same rows and token counts: the guide is
    the regex [0-9]{digits} compiled against a 512-piece sentencepiece tokenizer
    (trained here, digits split: one token per digit) padded to the model's vocab,
    so the mask is [batch, vocab_size] as in real use; the unguided run emits the
    same digits + 1 tokens (no stop id)."""
    import tempfile

    from ..infer.generate import generate
    from ..infer.guided import Guide
    from ..model.tokenizer import train_sentencepiece
    from ..train.data import load_documents
    with tempfile.TemporaryDirectory() as d:
        tok = train_sentencepiece(load_documents("stdlib", max_docs=20), 512, d,
                                  max_chars=200_000)
    guide = Guide.regex(f"[0-9]{{{digits}}}", tok, cfg.vocab_size)
    prompts = np.random.default_rng(2).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    tps = {}
    for name, kw in (("unguided", {}), ("guided", dict(guide=guide, eos_id=tok.eos_id))):
        generate(params, cfg, prompts, max_new_tokens=digits + 1, **kw)  # compile
        t0 = time.perf_counter()
        out = generate(params, cfg, prompts, max_new_tokens=digits + 1, **kw)
        tps[name] = float(np.sum(out.lengths)) / (time.perf_counter() - t0)
    return {"states": len(guide.table), **tps}


def continuous_workload(n_prompts: int = 200, seed: int = 0):
    """n_prompts stdlib snippets as byte ids (+3, clear of the special ids): prompt
    lengths 8..80 and max_new_tokens 8..80, each varying by 10x."""
    from ..train.data import load_documents
    docs = [d.encode("utf-8") for d in load_documents("stdlib", max_docs=16)]
    rng = np.random.default_rng(seed)
    prompts, news = [], []
    for i in range(n_prompts):
        data, n = docs[i % len(docs)], int(rng.integers(8, 81))
        off = int(rng.integers(0, max(1, len(data) - n)))
        prompts.append([b + 3 for b in data[off:off + n]])
        news.append(int(rng.integers(8, 81)))
    return prompts, news


def bench_continuous(cfg, params, n_prompts: int = 200, slots: int = 16,
                     page_size: int = 16, steps_per_call: int = 32, repeats: int = 3,
                     **settings) -> dict:
    """Continuous batching (jaxlm.infer.engine) against static batches of the same
    `slots` rows (jaxlm.generate, each batch running to its longest request), on
    the same workload, greedy, no stop id: both produce exactly each request's
    max_new_tokens, the tokens counted. Each path runs once to compile, then the
    two are timed alternately `repeats` times (identical runs on a shared 2-core VM
    differ by +-15%): the medians of tokens/s and of the per-pair ratios, and in
    how many requests the compile runs' tokens are equal (same_outputs). settings:
    more generate keywords for both (e.g. the logit processors, sampled: what
    batch-infer's static fallback ran before the one engine)."""
    from ..infer.generate import generate, generate_many
    prompts, news = continuous_workload(n_prompts)
    max_len = -(-(max(map(len, prompts)) + max(news)) // 128) * 128

    def static():
        rows = []
        for i in range(0, len(prompts), slots):
            batch, want = prompts[i:i + slots], news[i:i + slots]
            out = generate(params, cfg, batch, max_new_tokens=max(want), max_len=max_len,
                           row_seeds=list(range(i, i + len(batch))), **settings)
            rows += [s[:m] for s, m in zip(out.sequences(), want)]
        return rows

    def continuous():
        return generate_many(params, cfg, prompts, max_new_tokens=news, slots=slots,
                             page_size=page_size, steps_per_call=steps_per_call,
                             row_seeds=list(range(len(prompts))), **settings).sequences()

    # the compile runs: the two paths' tokens, request by request
    same = sum(a == b for a, b in zip(static(), continuous()))
    return {"prompts": n_prompts, "slots": slots, "tokens": sum(news), "same_outputs": same,
            **alternate(continuous, static, sum(news), repeats, ("continuous", "static"))}


def alternate(a, b, tokens: int, repeats: int, names) -> dict:
    """a() and b() (compiled already) timed in turn `repeats` times, each producing
    `tokens` tokens: the medians of their tokens/s and of the per-pair ratios a / b."""
    tps, ratios = {n: [] for n in names}, []
    for _ in range(repeats):
        for name, fn in zip(names, (a, b)):
            t0 = time.perf_counter()
            fn()
            tps[name].append(tokens / (time.perf_counter() - t0))
        ratios.append(tps[names[0]][-1] / tps[names[1]][-1])
    return {**{k: float(np.median(v)) for k, v in tps.items()},
            "ratio": float(np.median(ratios)), "ratios": [round(r, 3) for r in ratios]}


def bench_samples(cfg, params, n_prompts: int = 32, prompt_len: int = 240, n: int = 4,
                  new_tokens: int = 16, slots: int = 16, repeats: int = 3) -> dict:
    """n samples per prompt (one request each: prefilled once, its full pages shared
    by the n slots) against the same prompts as n separate requests each (n
    prefills), over the same paged engine and slots; long prompts, short outputs,
    sampled. Alternated `repeats` times: medians of tokens/s and of the ratios."""
    from ..infer.generate import generate
    rng = np.random.default_rng(3)
    prompts = rng.integers(3, cfg.vocab_size, (n_prompts, prompt_len)).tolist()
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, cache="paged", slots=slots,
              min_new_tokens=new_tokens)

    def shared():
        return generate(params, cfg, prompts, num_return_sequences=n, **kw)

    def separate():
        return generate(params, cfg, [p for p in prompts for _ in range(n)], **kw)

    shared(), separate()  # compile
    return {"prompts": n_prompts, "n": n, "prompt_len": prompt_len, "new_tokens": new_tokens,
            **alternate(shared, separate, n_prompts * n * new_tokens, repeats,
                        ("shared", "separate"))}


def bench_caches(cfg, params, batch: int = 16, prompt_len: int = 32, new_tokens: int = 64,
                 repeats: int = 3) -> dict:
    """The one engine over a contiguous cache row per sequence (what jaxlm.generate
    takes when every sequence fits its slots at once) against its paged pool, greedy,
    the same batch admitted at once: medians of tokens/s and of the ratios."""
    from ..infer.generate import generate
    prompts = np.random.default_rng(4).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = {c: (lambda c=c: generate(params, cfg, prompts, cache=c, **kw))
            for c in ("contiguous", "paged")}
    same = runs["contiguous"]().tokens.tolist() == runs["paged"]().tokens.tolist()  # compile
    return {"batch": batch, "same_outputs": same,
            **alternate(runs["contiguous"], runs["paged"], batch * new_tokens, repeats,
                        ("contiguous", "paged"))}


PROCESSORS = dict(temperature=0.8, repetition_penalty=1.3, no_repeat_ngram_size=3, min_p=0.05)


def run_bench(cfg) -> dict:
    n_devices, local = mesh_devices(make_mesh(cfg.mesh))
    peak, source = device_peak(cfg.model.dtype, cfg.train.peak_flops, 2.0, sharing=local)
    print(f"device: {jax.devices()[0].device_kind} x{n_devices}; "
          f"per-device peak {peak / 1e9:.1f} GFLOP/s ({source})")
    tps = bench_train(cfg)
    train_mfu = mfu(tps, model_flops_per_token(cfg.model, cfg.data.seq_len), n_devices, peak)
    print(f"train: {tps:.0f} tokens/s, MFU {train_mfu:.1%} per device "
          f"({model_flops_per_token(cfg.model, cfg.data.seq_len) / 1e6:.1f} MFLOP/token)")
    params = init_params(cfg.model, jax.random.key(0))
    dec = {b: bench_decode(cfg.model, params, b) for b in (1, 16)}
    print(f"decode: {dec[1]:.0f} tokens/s at batch 1, {dec[16]:.0f} tokens/s at batch 16")
    from .bench_decode import bench_decode_vs_hf
    vs_hf = bench_decode_vs_hf(cfg.model, params)  # prompt 32, 64 new tokens, batch 1 and 16
    sp = bench_speculative(cfg.model, params, dec[1])
    print(f"speculative (draft: the first layer, k=4, batch 1): {sp['tokens_per_s']:.0f} "
          f"tokens/s, x{sp['speedup']:.2f} over plain decode, acceptance "
          f"{sp['acceptance_rate']:.1%}")
    gd = bench_guided(cfg.model, params)
    print(f"guided (regex [0-9]{{127}}, batch 16): {gd['guided']:.0f} tokens/s against "
          f"{gd['unguided']:.0f} unguided (x{gd['guided'] / gd['unguided']:.2f})")
    cb = bench_continuous(cfg.model, params)
    print(f"continuous batching ({cb['prompts']} prompts, lengths and max_new_tokens 8..80, "
          f"{cb['slots']} slots): {cb['continuous']:.0f} tokens/s against {cb['static']:.0f} "
          f"for static batches (x{cb['ratio']:.2f}, median of the alternated pairs "
          f"{', '.join(f'x{r:.2f}' for r in cb['ratios'])}; outputs equal for "
          f"{cb['same_outputs']} of {cb['prompts']} prompts)")
    cc = bench_caches(cfg.model, params)
    print(f"batch {cc['batch']} admitted at once: contiguous cache {cc['contiguous']:.0f} "
          f"tokens/s against the paged pool's {cc['paged']:.0f} (x{cc['ratio']:.2f}, pairs "
          f"{', '.join(f'x{r:.2f}' for r in cc['ratios'])}; outputs equal: "
          f"{cc['same_outputs']})")
    cp = bench_continuous(cfg.model, params, **PROCESSORS)
    print(f"with processors (repetition 1.3, no-repeat-ngram 3, min-p 0.05, sampled): "
          f"continuous {cp['continuous']:.0f} tokens/s against {cp['static']:.0f} for static "
          f"batches, batch-infer's fallback before the one engine (x{cp['ratio']:.2f}, pairs "
          f"{', '.join(f'x{r:.2f}' for r in cp['ratios'])}; outputs equal for "
          f"{cp['same_outputs']} of {cp['prompts']})")
    ns = bench_samples(cfg.model, params)
    print(f"n={ns['n']} samples of {ns['prompts']} prompts of {ns['prompt_len']} tokens "
          f"({ns['new_tokens']} new): {ns['shared']:.0f} tokens/s, one prefill each, against "
          f"{ns['separate']:.0f} as {ns['n']} separate requests (x{ns['ratio']:.2f}, pairs "
          f"{', '.join(f'x{r:.2f}' for r in ns['ratios'])})")
    result = {"peak_gflops": round(peak / 1e9, 2), "train_tokens_per_s": round(tps, 1),
              "train_mfu": round(train_mfu, 4), "peak_source": source,
              "decode_tokens_per_s_b1": round(dec[1], 1),
              "decode_tokens_per_s_b16": round(dec[16], 1),
              "speculative_tokens_per_s_b1": round(sp["tokens_per_s"], 1),
              "speculative_speedup": round(sp["speedup"], 3),
              "speculative_acceptance": round(sp["acceptance_rate"], 4),
              "guided_tokens_per_s_b16": round(gd["guided"], 1),
              "unguided_tokens_per_s_b16": round(gd["unguided"], 1),
              "continuous_tokens_per_s": round(cb["continuous"], 1),
              "static_batching_tokens_per_s": round(cb["static"], 1),
              "continuous_over_static": round(cb["ratio"], 3),
              "continuous_same_outputs": cb["same_outputs"],
              "processors_continuous_tokens_per_s": round(cp["continuous"], 1),
              "processors_static_tokens_per_s": round(cp["static"], 1),
              "processors_continuous_over_static": round(cp["ratio"], 3),
              "contiguous_b16_tokens_per_s": round(cc["contiguous"], 1),
              "paged_b16_tokens_per_s": round(cc["paged"], 1),
              "contiguous_over_paged_b16": round(cc["ratio"], 3),
              "n_samples_tokens_per_s": round(ns["shared"], 1),
              "separate_requests_tokens_per_s": round(ns["separate"], 1),
              "n_samples_over_separate": round(ns["ratio"], 3),
              "decode_vs_hf": vs_hf}
    print(json.dumps(result))
    return result


__all__ = ["run_bench"]
