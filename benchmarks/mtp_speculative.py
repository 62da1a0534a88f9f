"""Self-speculative decoding with DeepSeek-V3's multi-token prediction, on CPU: a small
DeepSeek-style model (latent attention, the DeepSeek MoE) with one MTP module trained on
the standard library, then greedy decoding drafted by its own MTP module
(`generate(..., draft="mtp")`) against plain greedy decoding of the same prompts.

    python benchmarks/mtp_speculative.py --run runs/mtp-bench [--steps 300]

Trains `--config tiny-deepseek` with model.mtp_depth=1 (smaller: TRAIN; --override
key=value replaces or adds a setting; skipped
when --run already holds a finished run), then for batch sizes 1 and 8: the acceptance
rate of the MTP drafts, the decode throughput (new tokens / s, the second of two runs:
the first compiles) of both, the speed-up, and whether the outputs are equal token for
token. Prints a table and writes `mtp_speculative.json` in --run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TRAIN = ["model.mtp_depth=1", "model.n_layers=2", "model.vocab_size=2048",
         "data.batch_size=8", "train.mtp_loss_weight=0.3"]
PROMPT_FILES = ("json/decoder.py", "argparse.py", "collections/__init__.py", "textwrap.py",
                "string.py", "shlex.py", "heapq.py", "bisect.py")


def prompts_from_stdlib(n: int, chars: int = 200) -> list[str]:
    """The first `chars` characters of a def in each of n standard-library files."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for name in PROMPT_FILES[:n]:
        text = open(os.path.join(root, name), encoding="utf-8").read()
        at = text.find("\ndef ", len(text) // 3)
        out.append(text[at + 1:at + 1 + chars])
    return out


def _merged(base, extra):
    """key=value overrides: `extra`'s replace `base`'s of the same key."""
    keys = {x.split("=", 1)[0] for x in extra}
    return [x for x in base if x.split("=", 1)[0] not in keys] + list(extra)


def timed_generate(params, cfg, ids, **kw):
    from jaxlm.infer.generate import generate
    generate(params, cfg, ids, **kw)  # compiles
    t = time.perf_counter()
    out = generate(params, cfg, ids, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/mtp-bench")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--override", action="append", default=[], help="more train overrides")
    args = p.parse_args()
    trained = os.path.exists(os.path.join(args.run, "checkpoints"))
    train_s = None
    if not trained:
        t = time.perf_counter()  # wall time: on a shared machine, other jobs' too
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "jaxlm"), "train",
                        "--config", "tiny-deepseek", f"train.steps={args.steps}",
                        f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps}",
                        f"run_dir={args.run}", *_merged(TRAIN, args.override)], check=True)
        train_s = time.perf_counter() - t

    import jaxlm
    cfg, params = jaxlm.load(args.run)
    tok = jaxlm.load_tokenizer(args.run)
    rows = [json.loads(x) for x in open(os.path.join(args.run, "metrics.jsonl"))]
    last = [r for r in rows if "mtp_loss" in r][-1]
    texts = prompts_from_stdlib(8)
    ids = [tok.encode(s) for s in texts]
    result = {"steps": last["step"], "loss": last["loss"], "mtp_loss": last["mtp_loss"],
              "train_seconds": train_s, "max_new_tokens": args.max_new_tokens, "batches": []}
    print(f"trained {last['step']} steps: loss {last['loss']:.3f}, mtp_loss "
          f"(x{0.3}) {last['mtp_loss']:.3f}")
    for batch in (1, 8):
        chosen = ids[:batch]
        plain, t_plain = timed_generate(params, cfg, chosen, max_new_tokens=args.max_new_tokens)
        spec, t_spec = timed_generate(params, cfg, chosen, max_new_tokens=args.max_new_tokens,
                                      draft="mtp")
        new = int(np.sum(np.asarray(plain.tokens) >= 0))
        row = {"batch": batch, "new_tokens": new,
               "plain_tok_s": new / t_plain, "mtp_tok_s": new / t_spec,
               "speedup": t_plain / t_spec, **spec.stats,
               "tokens_per_cycle": new / batch / spec.stats["cycles"],
               "equal": bool(np.array_equal(np.asarray(plain.tokens),
                                            np.asarray(spec.tokens)))}
        result["batches"].append(row)
        print(f"batch {batch}: acceptance {row['acceptance_rate']:.3f}, "
              f"{row['tokens_per_cycle']:.2f} tokens per cycle, plain "
              f"{row['plain_tok_s']:.1f} tok/s, mtp {row['mtp_tok_s']:.1f} tok/s, "
              f"speed-up {row['speedup']:.2f}x, equal outputs: {row['equal']}", flush=True)
    print(repr(texts[0][:80]), "->", repr(tok.decode([int(t) for t in plain.tokens[0]
                                                      if t >= 0])[:120]))
    with open(os.path.join(args.run, "mtp_speculative.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
