"""Data pipeline at scale: time-to-first-batch and peak RSS against corpus size.

    python benchmarks/data_scale.py --sizes-mb 20 200 [--work DIR] [--prepare-mb 200]

For each size, a prepared corpus of that many bytes of int32 token records
(the size the shards of that much text take at ~4 bytes per token) is
written straight through `jaxlm.train.prepare.write_shards` /
`write_manifest` (synthetic ids, documents of 200-8000 tokens), then a fresh
Python process opens it as training does (`open_sources` ->
`make_batches(seq 1024, batch 8, shuffle_rows 2048)`) and reports the time
from opening the corpus to the first batch and its peak RSS
(`resource.getrusage`). Sizes up to `--prepare-mb` are also built the real
way, `prepare()` tokenizing generated text files, and timed (MB/s).
The data is deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_WORDS = ("def class return import self value data index list dict yield lambda for while "
          "if else elif try except with open read write print range len sum min max").split()


def _synthetic_text(rng, n_chars: int) -> str:
    words = rng.choice(_WORDS, size=n_chars // 5 + 1)
    lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)]
    return "\n".join(lines)[:n_chars]


def build_direct(out: pathlib.Path, size_mb: int, tokenizer_dir: pathlib.Path, *, docs_per_file=20_000,
                 records_per_shard=10_000, seed=0) -> dict:
    from jaxlm.model.tokenizer import load_tokenizer
    from jaxlm.train.prepare import write_manifest, write_shards
    tok = load_tokenizer(tokenizer_dir)
    out.mkdir(parents=True)
    tok_path = tok.save(out)
    rng = np.random.default_rng(seed)
    budget = size_mb * 2**20 // 4  # tokens
    inputs, file_index = [], 0
    while budget > 0:
        lengths = rng.integers(200, 8000, docs_per_file)
        lengths = lengths[np.cumsum(lengths) <= budget] if lengths.sum() > budget else lengths
        if not len(lengths):
            lengths = np.array([budget])
        budget -= int(lengths.sum())
        docs = (np.concatenate([[tok.bos_id], rng.integers(4, tok.vocab_size, n - 2), [tok.eos_id]])
                for n in lengths)
        shards = write_shards(out, file_index, docs, records_per_shard)
        inputs.append({"path": f"synthetic-{file_index}", "size": int(lengths.sum()) * 4, "mtime_ns": 0,
                       "shards": shards})
        file_index += 1
    return write_manifest(out, tok, tok_path.name, records_per_shard, inputs)


def build_prepared(work: pathlib.Path, size_mb: int, tokenizer_dir: pathlib.Path, workers: int) -> float:
    """Generates text files and runs `prepare` on them; returns MB/s."""
    from jaxlm.train.prepare import prepare
    raw = work / f"text-{size_mb}"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    per_file = 16 * 2**20
    left, i = size_mb * 2**20, 0
    while left > 0:
        n = min(per_file, left)
        (raw / f"{i:04d}.jsonl").write_text(
            "\n".join(json.dumps({"text": _synthetic_text(rng, 4000)}) for _ in range(n // 4000 + 1)) + "\n")
        left -= n
        i += 1
    t = time.perf_counter()
    prepare(str(raw / "*.jsonl"), str(work / f"prepared-{size_mb}"), tokenizer=str(tokenizer_dir),
            workers=workers, records_per_shard=20_000)
    seconds = time.perf_counter() - t
    shutil.rmtree(raw)
    return size_mb / seconds


_PROBE = """
import json, resource, sys, time
def rss_now():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
from jaxlm.config import load_config
from jaxlm.model.tokenizer import load_tokenizer
from jaxlm.train.data import make_batches, open_sources
t1 = time.perf_counter()
rss_import, rss_import_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_now()
cfg = load_config(None, [f"data.corpus={sys.argv[1]}", "data.seq_len=1024", "data.batch_size=8"])
train, evals = open_sources(cfg.data)
tok = load_tokenizer(train.tokenizer_path or sys.argv[2])
it = make_batches(train, tok, seq_len=1024, batch_size=8, seed=0, shuffle_rows=cfg.data.shuffle_rows)
batch = next(it)
t2 = time.perf_counter()
rss_first = rss_now()
for _ in range(20):
    next(it)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_batch_s": t2 - t1, "next_20_batches_s": t3 - t2,
                  "peak_rss_after_imports_mb": rss_import,
                  "rss_growth_imports_to_first_batch_mb": rss_first - rss_import_now,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "records": len(train) + len(evals)}))
"""


def probe(corpus: str, tokenizer_dir: pathlib.Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE, corpus, str(tokenizer_dir)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[20])
    p.add_argument("--prepare-mb", type=int, default=0, help="also run prepare() for sizes up to this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="jaxlm-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from jaxlm.model.tokenizer import train_sentencepiece
        from jaxlm.train.data import load_documents
        tok_dir = work / "tokenizer"
        train_sentencepiece(load_documents("stdlib", max_docs=200), 4096, tok_dir, max_chars=1_000_000)
        print(json.dumps({"corpus": "stdlib (raw files)", **probe("stdlib", tok_dir)}))
        for size in args.sizes_mb:
            corpus = work / f"direct-{size}"
            t = time.perf_counter()
            manifest = build_direct(corpus, size, tok_dir)
            built = time.perf_counter() - t
            print(json.dumps({"corpus": f"prepared {size} MB", "tokens": manifest["num_tokens"],
                              "shards": sum(len(e["shards"]) for e in manifest["inputs"]),
                              "build_s": round(built, 1), **probe(str(corpus), tok_dir)}), flush=True)
            if not args.keep:
                shutil.rmtree(corpus)
            if size <= args.prepare_mb:
                mbps = build_prepared(work, size, tok_dir, args.workers)
                print(json.dumps({"corpus": f"prepare() of {size} MB of jsonl text", "MB_per_s": round(mbps, 2),
                                  **probe(str(work / f"prepared-{size}"), tok_dir)}), flush=True)
                if not args.keep:
                    shutil.rmtree(work / f"prepared-{size}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
