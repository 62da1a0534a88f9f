"""A multiple-choice task through lm-eval: jaxlm's backend against lm-eval's `hf` backend,
side by side on this CPU, model load and compilation included.

    python benchmarks/eval_vs_hf.py [--items 1000] [--batch-sizes 16,1] [--json out.json]

One invocation builds, in a temporary directory, one Llama-style Hugging Face
checkpoint (LlamaForCausalLM: d_model 256, 4 layers, 4 heads, intermediate 1024,
vocab 8192, 512 positions; random weights, float32) with a byte-level BPE tokenizer
trained here on the Python standard library's source, and one local lm-eval task: N
items of 4 choices each (a context of 20 to 60 words, choices of 1 to 4 words; 4N
loglikelihood requests). Then, for each batch size and each backend, one after the
other, a child process (this script again, `--side jaxlm|hf`, the same environment)
imports lm-eval and times `lm_eval.simple_evaluate(model=..., model_args=...,
batch_size=B)` from the call to its return: loading the checkpoint, jaxlm's
compiles, every request. lm-eval's default batch size is 1 (its CLI's and
HFLM's). Both sides report their accuracy: it must be the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WORDS = None


def build(directory: str, items: int) -> None:
    import numpy as np
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from jaxlm.train.data import load_documents
    texts = load_documents("stdlib", max_docs=200)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        show_progress=False, vocab_size=8192, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
        num_key_value_heads=4, num_hidden_layers=4, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(os.path.join(directory, "model"))
    fast.save_pretrained(os.path.join(directory, "model"))
    words = sorted({w for t in texts[:20] for w in t.split() if w.isidentifier()})[:2000]
    rng = np.random.default_rng(0)
    with open(os.path.join(directory, "mc.jsonl"), "w") as f:
        for _ in range(items):
            f.write(json.dumps({
                "question": " ".join(rng.choice(words, int(rng.integers(20, 61)))),
                "choices": [" ".join(rng.choice(words, int(rng.integers(1, 5))))
                            for _ in range(4)],
                "answer": int(rng.integers(4))}) + "\n")
    with open(os.path.join(directory, "bench_mc.yaml"), "w") as f:
        f.write(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {os.path.join(directory, 'mc.jsonl')}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def side(name: str, directory: str, batch_size: int) -> dict:
    """One backend's timed simple_evaluate (in its own process)."""
    import logging
    logging.disable(logging.WARNING)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    model = os.path.join(directory, "model")
    if name == "jaxlm":
        from jaxlm.infer.harness import register
        register()
        args = f"checkpoint={model},progress=false"
    else:
        args = f"pretrained={model},dtype=float32,device=cpu"
    tasks = TaskManager(include_path=directory, include_defaults=False)
    t0 = time.perf_counter()
    out = simple_evaluate(model=name, model_args=args, tasks=["bench_mc"], task_manager=tasks,
                          batch_size=batch_size, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    return {"side": name, "batch_size": batch_size, "seconds": round(seconds, 2),
            "acc": out["results"]["bench_mc"]["acc,none"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--batch-sizes", default="16,1")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--side", choices=("jaxlm", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.dir, args.batch_size)))
        return
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TF_CPP_MIN_LOG_LEVEL="2", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        build(d, args.items)
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            for name in ("jaxlm", "hf"):
                got = subprocess.run([sys.executable, __file__, "--side", name, "--dir", d,
                                      "--batch-size", str(b)], env=env, check=True,
                                     capture_output=True, text=True)
                row = json.loads(got.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    for b in sorted({r["batch_size"] for r in rows}, reverse=True):
        j = next(r for r in rows if r["side"] == "jaxlm" and r["batch_size"] == b)
        h = next(r for r in rows if r["side"] == "hf" and r["batch_size"] == b)
        same = "same accuracy" if j["acc"] == h["acc"] else "ACCURACY DIFFERS"
        print(f"batch {b}: jaxlm {j['seconds']:.1f} s, hf {h['seconds']:.1f} s: "
              f"{h['seconds'] / j['seconds']:.2f}x ({same}, {j['acc']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
