"""`jaxlm prepare`: tokenize text / .jsonl / Parquet files into ArrayRecord shards.

Training reads the result with `data.corpus=DIR`; it must use the tokenizer
saved in DIR (the default when data.tokenizer is unset; the manifest's
tokenizer digest is checked when training starts).
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--input", required=True, help="glob of text / .jsonl / .parquet files ('**' recurses)")
    p.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--tokenizer", default="", help="sentencepiece .model, tokenizer.json or a run dir "
                   "(default: train a sentencepiece model of --vocab-size on the inputs)")
    p.add_argument("--vocab-size", type=int, default=8192, help="without --tokenizer (default 8192)")
    p.add_argument("--resume", action="store_true", help="keep the inputs already done, redo the rest")
    p.add_argument("--workers", type=int, default=1, help="processes tokenizing files in parallel")
    p.add_argument("--records-per-shard", type=int, default=100_000,
                   help="documents per output shard at most (default 100000)")


def run_prepare(args) -> None:
    from ..train.prepare import prepare
    manifest = prepare(args.input, args.output, tokenizer=args.tokenizer, resume=args.resume,
                       workers=args.workers, records_per_shard=args.records_per_shard,
                       vocab_size=args.vocab_size)
    shards = sum(len(e["shards"]) for e in manifest["inputs"])
    print(f"prepared {len(manifest['inputs'])} files -> {shards} shards, {manifest['num_records']} "
          f"documents, {manifest['num_tokens']} tokens in {args.output} "
          f"(tokenizer digest {manifest['tokenizer_digest']})")
