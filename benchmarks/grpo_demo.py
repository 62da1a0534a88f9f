"""GRPO learns on CPU: the `tiny-llama-grpo` preset over seeds, its base and final
policies scored on the same held prompts.

    make run && jaxlm train --config tiny-llama-sft
    python benchmarks/grpo_demo.py --sft runs/tiny-llama-sft --out runs/grpo-demo

For each seed: `jaxlm train --config tiny-llama-grpo` (train.seed and data.seed = the
seed) in-process, then the mean `python` reward of the base (the SFT checkpoint) and
of the trained policy on the same EVAL_PROMPTS held stdlib-sft prompts x G samples
(sampled by the same rollout code, at the preset's temperature and completion cap),
and the training curve (each step's rollout reward, from metrics.jsonl). Prints a
table and writes `summary.json` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

EVAL_PROMPTS = 64


def mean_reward(cfg, params, tokenizer, records, eos, seed: int) -> float:
    """The preset's reward, averaged over `records` x G samples of `params`."""
    import dataclasses
    from jaxlm.train.rollout import Rollouts
    g = cfg.train.grpo.num_generations
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=8 * g))
    rollouts = Rollouts(cfg, tokenizer, None, records, eos_ids=eos)
    steps = len(records) // rollouts.per_step
    rewards = [rollouts.rollout(params, 10_000 + seed * 1000 + i)[1]["reward"]
               for i in range(steps)]
    last = rollouts.last
    for k in range(0, 3 * cfg.train.grpo.num_generations, cfg.train.grpo.num_generations):
        print(f"  reward {last['rewards'][k]:.0f}: {last['prompts'][k].splitlines()[0]!r} -> "
              f"{last['completions'][k]!r}", flush=True)
    return float(np.mean(rewards))


def curve(run_dir: str) -> dict[int, float]:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["reward"] for r in rows if "reward" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", default="runs/tiny-llama-sft", help="the SFT checkpoint")
    p.add_argument("--out", default="runs/grpo-demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides of the preset (before --seeds)")
    args = p.parse_args()

    import jaxlm
    from jaxlm.config import load_config
    from jaxlm.infer.text import generation_settings
    from jaxlm.train.loop import train
    from jaxlm.train.rollout import load_prompt_records

    tokenizer = jaxlm.load_tokenizer(args.sft)
    eos = generation_settings(args.sft, tokenizer).eos_ids
    base_cfg, base_params = jaxlm.load(args.sft)
    results = []
    for seed in args.seeds:
        run_dir = os.path.join(args.out, f"seed{seed}")
        cfg = load_config("tiny-llama-grpo", [
            f"train.init_from={args.sft}", f"train.seed={seed}", f"data.seed={seed}",
            f"run_dir={run_dir}", *args.overrides])
        records = load_prompt_records(cfg.data.corpus, seq_len=cfg.data.seq_len)
        held = records[-EVAL_PROMPTS:]
        t0 = time.perf_counter()
        train(cfg, progress=False, resume=os.path.isdir(os.path.join(run_dir, "checkpoints")))
        wall = time.perf_counter() - t0
        _, params = jaxlm.load(run_dir)
        before = mean_reward(cfg, base_params, tokenizer, held, eos, seed)
        after = mean_reward(cfg, params, tokenizer, held, eos, seed)
        c = curve(run_dir)
        first = next((s for s in sorted(c) if c[s] > 0.6), None)
        results.append({"seed": seed, "base": before, "final": after, "train_s": wall,
                        "first_step_over_0.6": first, "curve": c})
        print(f"seed {seed}: held-out mean reward {before:.3f} -> {after:.3f}; rollout reward "
              f"> 0.6 first at step {first}; {wall:.0f} s", flush=True)
    print("\n| seed | base | after | first step > 0.6 | train s |\n| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['seed']} | {r['base']:.3f} | {r['final']:.3f} | "
              f"{r['first_step_over_0.6']} | {r['train_s']:.0f} |")
    steps = sorted(results[0]["curve"])
    print("\nrollout reward by step (10-step means):")
    for lo in range(0, len(steps), 10):
        window = steps[lo:lo + 10]
        means = [np.mean([r["curve"][s] for s in window if s in r["curve"]]) for r in results]
        print(f"steps {window[0]:>3}-{window[-1]:>3}: " + "  ".join(f"{m:.2f}" for m in means))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
