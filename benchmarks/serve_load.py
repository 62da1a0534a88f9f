"""`jaxlm serve` under load, against `batch-infer` on the same workload and slots.

    python benchmarks/serve_load.py [--requests 300 --clients 64 --slots 32]

A random-weights Llama-style model (a local sentencepiece tokenizer, stdlib text) is
saved once.
Each side is measured on its second run (the first compiles its shapes) with a
new engine (an empty prefix cache):
1. load: --requests completions (prompts of 16..160 tokens, answers of 8..80: 10x
   each way), greedy, streamed, from --clients concurrent AsyncOpenAI clients to an
   in-process server on 127.0.0.1; every request must complete exactly once and its
   text equal batch-infer's; throughput (completion tokens / wall) against
   batch-infer's on the same rows and slots; p50 / p99 time to first token and
   inter-token latency (per request: (last - first chunk) / (tokens - 1)).
2. prefix cache: 100 chat requests sharing a 512-token system prompt, cache on and
   off side by side: prompt tokens computed (the engine's count) and throughput.
Prints one JSON object; BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_checkpoint(root: pathlib.Path) -> str:
    import jax

    import jaxlm
    from jaxlm.model.config import ModelConfig
    from jaxlm.model.tokenizer import train_sentencepiece
    from jaxlm.train.data import load_documents
    path = root / "model"
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                      d_ff=1024, max_seq_len=1024, init_std=0.2)
    jaxlm.save(str(path), cfg, jaxlm.init_params(cfg, jax.random.key(0)))
    train_sentencepiece(load_documents("stdlib", max_docs=20), 512, path, max_chars=200_000)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return str(path)


def workload(tok, n: int, seed: int):
    """n (prompt text, max_tokens): prompts cut from stdlib text at 16..160 tokens."""
    from jaxlm.train.data import load_documents
    rng = np.random.default_rng(seed)
    docs = [d for d in load_documents("stdlib", max_docs=60) if len(d) > 4000]
    out = []
    for _ in range(n):
        doc = docs[int(rng.integers(len(docs)))]
        at = int(rng.integers(len(doc) - 3000))
        ids = tok.encode(doc[at:at + 3000])[:int(rng.integers(16, 161))]
        out.append((tok.decode(ids), int(rng.integers(8, 81))))
    return out


class InProcess:
    """A `jaxlm serve` server in this process (uvicorn in a thread)."""

    def __init__(self, checkpoint: str, overrides: list):
        from jaxlm.infer.serve import load_served, start, uvicorn_server
        served, run, mesh = load_served(checkpoint, overrides)
        self.server = start(served, mesh, run.mesh.rules)
        sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.uv = uvicorn_server(self.server, log_level="warning")
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        while not self.uv.started:
            time.sleep(0.05)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(timeout=60)
        self.server.worker.stop()


async def drive(url: str, requests: list, clients: int, chat: bool = False):
    """Every request streamed (greedy, usage included) by `clients` concurrent
    AsyncOpenAI clients -> (results [(text, tokens, ttft, itl, finish)], wall seconds)."""
    import openai
    pool = [openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            for _ in range(clients)]
    todo = list(enumerate(requests))
    results: list = [None] * len(requests)

    async def client(c):
        while todo:
            i, (prompt, m) = todo.pop(0)
            t0 = time.perf_counter()
            first = last = None
            text, tokens, finish = "", 0, None
            kw = dict(model="model", max_tokens=m, temperature=0, stream=True,
                      stream_options={"include_usage": True})
            if chat:
                stream = await c.chat.completions.create(messages=prompt, **kw)
            else:
                stream = await c.completions.create(prompt=prompt, **kw)
            async for ch in stream:
                now = time.perf_counter()
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
                for choice in ch.choices:
                    piece = choice.delta.content if chat else choice.text
                    if piece:
                        first = first or now
                        last = now
                        text += piece
                    finish = choice.finish_reason or finish
            assert results[i] is None, f"request {i} answered twice"
            itl = (last - first) / (tokens - 1) if first and tokens > 1 else None
            results[i] = (text, tokens, (first or time.perf_counter()) - t0, itl, finish)

    t = time.perf_counter()
    await asyncio.gather(*[client(c) for c in pool])
    wall = time.perf_counter() - t
    await asyncio.gather(*[c.close() for c in pool])
    return results, wall


def batch_infer_run(checkpoint: str, requests: list, slots: int, out_dir: pathlib.Path,
                    name: str) -> tuple[list, dict]:
    from jaxlm.infer.batch import batch_infer
    rows = out_dir / f"{name}.in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": m}) + "\n"
                            for i, (p, m) in enumerate(requests)))
    out = out_dir / f"{name}.out.jsonl"
    summary = batch_infer(checkpoint, str(rows), str(out), batch_size=slots,
                          overrides=["mesh.devices=1"], progress=False)
    texts = [json.loads(x)["completion"] for x in out.read_text().splitlines() if x]
    return texts, summary


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return round(float(np.percentile(xs, q)) * 1000, 2) if xs else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--prefix-requests", type=int, default=100)
    ap.add_argument("--features", choices=("all", "greedy"), default="all",
                    help="the server's compiled features: every request field, or greedy "
                    "decoding only (batch-infer's loop for this greedy workload)")
    ap.add_argument("--parts", default="load,prefix", help="which cases to run")
    args = ap.parse_args(argv)
    root = pathlib.Path(tempfile.mkdtemp(prefix="serve-load-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "uptime": os.popen("uptime").read().strip(), "args": vars(args)}
    try:
        from jaxlm.model.tokenizer import load_tokenizer
        ckpt = make_checkpoint(root)
        tok = load_tokenizer(ckpt)
        load = workload(tok, args.requests, 0)
        base = ["mesh.devices=1", f"serve.slots={args.slots}", "serve.max_tokens=128",
                f"serve.max_queue={max(args.clients, args.requests)}"]
        if args.features == "greedy":
            base += ["serve.sampling=false", "serve.penalties=false", "serve.guided=false",
                     "serve.max_logprobs=-1"]
        # 1. the load, and batch-infer on the same rows and slots, each measured on its
        # second run (the first compiles its shapes: the jit caches are this process's;
        # the second server is a new engine, its prefix cache empty)
        if "load" in args.parts:
            report["load"] = load_case(args, ckpt, load, base, root)
        if "prefix" in args.parts:
            report["prefix"] = prefix_case(args, ckpt, tok, base)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return report


def load_case(args, ckpt, load, base, root) -> dict:
    batch_infer_run(ckpt, load, args.slots, root, "warm")
    want, summary = batch_infer_run(ckpt, load, args.slots, root, "load")
    warm = InProcess(ckpt, base)
    try:
        asyncio.run(drive(warm.url, load, args.clients))
    finally:
        warm.close()
    srv = InProcess(ckpt, base)
    try:
        stats0 = dict(srv.server.worker.engine.stats)
        results, wall = asyncio.run(drive(srv.url, load, args.clients))
        eng = srv.server.worker.engine
        pool = eng.pool
        whole = pool.in_use() == 0 and \
            sum(map(len, pool.free)) + pool.n_cached() == pool.n_pages
        steps = eng.stats["steps"] - stats0["steps"]
    finally:
        srv.close()
    tokens = sum(r[1] for r in results)
    texts = [r[0] for r in results]
    out = {
        "requests": len(results), "completed": sum(r[4] is not None for r in results),
        "equal_to_batch_infer": sum(a == b for a, b in zip(texts, want)),
        "completion_tokens": tokens, "wall_s": round(wall, 2),
        "serve_tokens_per_s": round(tokens / wall, 1),
        "batch_infer_tokens_per_s": summary["tokens_per_s"],
        "batch_infer_s": summary["seconds"],
        "ratio": round(tokens / wall / summary["tokens_per_s"], 3),
        "ttft_ms_p50": pct([r[2] for r in results], 50),
        "ttft_ms_p99": pct([r[2] for r in results], 99),
        "itl_ms_p50": pct([r[3] for r in results], 50),
        "itl_ms_p99": pct([r[3] for r in results], 99),
        "decode_steps": steps, "pool_whole": whole}
    print(json.dumps(out), flush=True)
    return out


def prefix_case(args, ckpt, tok, base) -> dict:
    # 2. the prefix cache: one 512-token system prompt, short questions, on vs off
    rng = np.random.default_rng(0)
    docs = workload(tok, 4 * args.prefix_requests, 2)
    ids = tok.encode("".join(p for p, _ in docs))
    system = tok.decode(ids[:512])
    questions = [(tok.decode(ids[2000 + 16 * i:2000 + 16 * i + int(rng.integers(8, 16))]),
                  16) for i in range(args.prefix_requests)]

    def chats(sys_text):
        return [([{"role": "system", "content": sys_text},
                  {"role": "user", "content": q}], m) for q, m in questions]

    prefix = {}
    outs = {}
    for on in (False, True):
        flag = [f"generate.prefix_cache={str(on).lower()}"]
        warm = InProcess(ckpt, base + flag)  # its shapes compiled (module docstring)
        try:
            asyncio.run(drive(warm.url, chats(system), args.clients, chat=True))
        finally:
            warm.close()
        srv = InProcess(ckpt, base + flag)
        try:
            eng = srv.server.worker.engine
            before = dict(eng.stats)
            res, wall = asyncio.run(drive(srv.url, chats(system), args.clients,
                                          chat=True))
            pool = eng.pool
            prefix[on] = {
                "prefill_tokens": eng.stats["prefill_tokens"] - before["prefill_tokens"],
                "prompt_tokens": eng.stats["prompt_tokens"] - before["prompt_tokens"],
                "tokens_per_s": round(sum(r[1] for r in res) / wall, 1),
                "wall_s": round(wall, 2),
                "ttft_ms_p50": pct([r[2] for r in res], 50),
                "pool_whole": pool.in_use() == 0 and
                sum(map(len, pool.free)) + pool.n_cached() == pool.n_pages}
            outs[on] = [r[0] for r in res]
        finally:
            srv.close()
    out = {
        "off": prefix[False], "on": prefix[True],
        "prefill_reduction": round(prefix[False]["prefill_tokens"] /
                                   max(prefix[True]["prefill_tokens"], 1), 2),
        "speedup": round(prefix[True]["tokens_per_s"] / prefix[False]["tokens_per_s"], 2),
        "same_outputs": outs[True] == outs[False]}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(0 if main() else 1)
