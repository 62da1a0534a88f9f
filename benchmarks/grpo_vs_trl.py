"""One GRPO step, jaxlm against TRL's GRPOTrainer, side by side on this CPU.

    python benchmarks/grpo_vs_trl.py [--quick] [--steps 5] [--beta 0,0.04] [--json out.json]

One invocation builds one tiny Llama-style Hugging Face checkpoint (LlamaForCausalLM
from a LlamaConfig the shape of configs/tiny-llama.yaml: vocab 4096, hidden 192, 4
layers, 6 heads, 2 KV heads, intermediate 512; random weights, float32) with a
byte-level BPE tokenizer trained here on the Python standard library's source, and
one prompts JSONL, in a temporary directory. Then, one after the other, each side runs
in its own child process (this script again, `--side jaxlm` / `--side trl`, the same
environment: the thread settings are whatever both libraries take by default, all the
cores; the children print theirs) and trains on that same directory:

  jaxlm: `train.objective=grpo train.init_from=HF_DIR` through `jaxlm.train.loop.train`
  TRL:   `GRPOTrainer(model=HF_DIR, ...)` (trl 1.16, transformers generate, no vLLM)

with the same G (num_generations), prompts per step, prompt length, completion length,
temperature 1 (top-k 0, top-p 1), beta, loss_type dapo, epsilon 0.2 / 0.28, AdamW at
lr 1e-6 constant, grad-norm clip 1, float32, no gradient checkpointing, one optimizer
step per rollout (mu = 1, so neither side runs a separate old-log-prob forward), and
the same reward function (`length_reward` below: each completion's characters / 100).

Equal token counts on both sides:
  * prompts: every prompt is the same number of single-token words, checked to encode
    to exactly --prompt-len ids ([BOS] + words) on jaxlm's tokenizer and on TRL's
    (the tokenizer's post-processor adds the BOS TRL's call adds; jaxlm adds its own);
  * completions: the checkpoint cannot sample its EOS. Residual coordinate 0 is a
    constant 1 (column 0 of the embedding is 1; row 0 of every o_proj and down_proj
    is 0, so no layer writes to it), so after the final RMSNorm it is a large positive
    number at every position; lm_head's column 0 is 0 except for the EOS row, -50,
    which puts the EOS logit near -700: probability 0 in float32. Every completion
    runs to max_completion_length on both sides, and each child checks it (jaxlm's
    logged completion_length, TRL's completions/min_length).

Timing (wall clock, in each child, steady state: the first --warmup steps, which hold
jaxlm's compiles and TRL's first-call set-up, are left out; the median of the rest):
  rollout: jaxlm `_Loop.next_batch` (the engine's sampling, decode, rewards,
           advantages, the batch's layout and its copy to the device);
           TRL `GRPOTrainer._generate_and_score_completions` (tokenise, generate,
           decode, rewards, advantages), timed by wrapping the method;
  update:  jaxlm `_Loop.timed_step` (the jitted loss, backward and AdamW step,
           waited for); TRL the rest of the optimizer step, from a TrainerCallback's
           on_step_begin to its on_step_end (forward, loss, backward, clip,
           optimizer.step) minus the rollout inside it.
  step = rollout + update; ratio = TRL's median step / jaxlm's. With beta > 0 the
  reference's log-probs fall on different sides of the split: TRL computes them in
  `_generate_and_score_completions` (its rollout), jaxlm inside the jitted train step
  (its update); the step's total is the comparable figure.

--quick: 1 warm-up step and 3 timed ones per side (the defaults: 1 and 5).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SHAPE = dict(vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
             num_key_value_heads=2, intermediate_size=512)
SPECIALS = ["<pad>", "<s>", "</s>"]
EOS_SCALE = 50.0  # lm_head[eos, 0]: the EOS logit is about -EOS_SCALE * 14


def length_reward(prompts, completions, **kwargs):
    """The reward of both sides: the completion's length in characters / 100."""
    return [len(c) / 100.0 for c in completions]


# ------------------------------------------------------------------ the shared inputs


def _stdlib_text(max_chars: int) -> list[str]:
    root = pathlib.Path(os.__file__).parent
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="ignore")
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


def build_checkpoint(path: pathlib.Path, seed: int = 0) -> dict:
    """The HF dir both sides load: tokenizer (byte-level BPE, vocab 4096) and a random
    LlamaForCausalLM that never samples its EOS (module docstring)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_stdlib_text(3_000_000), trainers.BpeTrainer(
        show_progress=False, vocab_size=SHAPE["vocab_size"], special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pad, bos, eos = (tok.token_to_id(s) for s in SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    vocab = len(fast)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**SHAPE, "vocab_size": vocab}, max_position_embeddings=512,
                                      tie_word_embeddings=False, bos_token_id=bos,
                                      eos_token_id=eos, pad_token_id=pad)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # residual coordinate 0: a constant 1 that only the EOS logit reads
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = -EOS_SCALE
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return {"vocab": vocab, "bos": bos, "eos": eos, "pad": pad}


def write_prompts(path: pathlib.Path, hf_dir: pathlib.Path, n: int, prompt_len: int) -> None:
    """n prompts of prompt_len - 1 single-token words each ([BOS] + words: prompt_len ids
    on both tokenizers, checked)."""
    import numpy as np
    import transformers

    import jaxlm
    fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = jaxlm.load_tokenizer(hf_dir)
    words = sorted(t[1:] for t in fast.get_vocab()
                   if t.startswith("\u0120") and t[1:].isidentifier() and t[1:].isascii()
                   and t[1:] in fast.get_vocab())  # " w" and "w" are both one token
    rng = np.random.default_rng(0)
    rows = [" ".join(rng.choice(words, prompt_len - 1)) for _ in range(n)]
    for text in rows:
        want = prompt_len
        got_hf = len(fast(text)["input_ids"])
        got_ours = len(([ours.bos_id] if ours.bos_id is not None else []) + ours.encode(text))
        assert got_hf == want and got_ours == want, (text, got_hf, got_ours)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in rows))


# ------------------------------------------------------------------ the two sides


def _threads() -> dict:
    return {"omp": os.environ.get("OMP_NUM_THREADS"), "xla_flags": os.environ.get("XLA_FLAGS"),
            "cpus": os.cpu_count()}


def run_jaxlm(a, work: pathlib.Path) -> dict:
    import jax

    from jaxlm.config import load_config
    from jaxlm.train import loop

    steps = a.warmup + a.steps
    run_dir = work / f"jaxlm-run-{a.beta}"
    cfg = load_config("grpo", [
        f"train.init_from={work / 'hf'}", f"data.corpus={work / 'prompts.jsonl'}",
        f"run_dir={run_dir}", f"data.seq_len={a.prompt_len + a.completion_len}",
        f"data.batch_size={a.prompts * a.G}", f"train.steps={steps}",
        f"train.grpo.num_generations={a.G}", f"train.grpo.max_completion_length={a.completion_len}",
        f"train.grpo.beta={a.beta}", "train.grpo.loss_type=dapo", "train.grpo.epsilon=0.2",
        "train.grpo.epsilon_high=0.28", "train.grpo.temperature=1.0",
        "train.grpo.reward_funcs=grpo_vs_trl:length_reward", "train.learning_rate=1e-6",
        "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.weight_decay=0.0",
        "train.grad_clip=1.0", f"train.checkpoint_every={steps + 1}",
        f"train.eval_every={steps + 1}", "train.log_every=1", "train.tensorboard=false"])
    rollout, update = [], []
    next_batch, timed_step = loop._Loop.next_batch, loop._Loop.timed_step

    def timed_next_batch(self, state, step):
        t = time.perf_counter()
        out = next_batch(self, state, step)
        jax.block_until_ready(out[0])
        rollout.append(time.perf_counter() - t)
        return out

    def timed_timed_step(self, state, batch, made):
        t = time.perf_counter()
        out = timed_step(self, state, batch, made)
        jax.block_until_ready(out[1]["loss"])
        update.append(time.perf_counter() - t)
        return out

    loop._Loop.next_batch, loop._Loop.timed_step = timed_next_batch, timed_timed_step
    loop.train(cfg, progress=False)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["completion_length"] for r in rows if "completion_length" in r]
    assert lengths and all(x == a.completion_len for x in lengths), lengths
    return {"rollout_s": rollout, "update_s": update, "completion_length": lengths,
            "logged_step_s": [r["step_s"] for r in rows if "step_s" in r],
            "versions": {"jax": jax.__version__}, "threads": _threads(),
            "devices": [str(d) for d in jax.devices()]}


def run_trl(a, work: pathlib.Path) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    prompts = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    args = trl.GRPOConfig(
        output_dir=str(work / f"trl-run-{a.beta}"), max_steps=a.warmup + a.steps,
        per_device_train_batch_size=a.prompts * a.G, gradient_accumulation_steps=1,
        num_generations=a.G, max_completion_length=a.completion_len, temperature=1.0,
        top_k=0, top_p=1.0, beta=a.beta, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        num_iterations=1, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32})
    trainer = trl.GRPOTrainer(model=str(work / "hf"), reward_funcs=length_reward, args=args,
                              train_dataset=datasets.Dataset.from_list(prompts),
                              processing_class=transformers.AutoTokenizer.from_pretrained(work / "hf"))
    rollout, step = [], []
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t = time.perf_counter()
        out = generate(inputs)
        rollout.append(time.perf_counter() - t)
        return out
    trainer._generate_and_score_completions = timed_generate

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    logs = [r for r in trainer.state.log_history if "completions/min_length" in r]
    lengths = [(r["completions/min_length"], r["completions/max_length"]) for r in logs]
    assert lengths and all(lo == hi == a.completion_len for lo, hi in lengths), lengths
    assert len(rollout) == len(step), (len(rollout), len(step))
    return {"rollout_s": rollout, "update_s": [s - r for s, r in zip(step, rollout)],
            "completion_length": [lo for lo, _ in lengths],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__},
            "threads": {**_threads(), "torch_threads": torch.get_num_threads(),
                        "torch_interop_threads": torch.get_num_interop_threads()}}


# ------------------------------------------------------------------ the parent


def _side(a, side: str, work: pathlib.Path, beta: float) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--side", side, "--work",
           str(work), "--steps", str(a.steps), "--warmup", str(a.warmup), "--G", str(a.G),
           "--prompts", str(a.prompts), "--prompt-len", str(a.prompt_len),
           "--completion-len", str(a.completion_len), "--beta", str(beta)]
    t = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=os.environ.copy())
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{side} side failed (exit {done.returncode})")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    w = a.warmup
    out["median_rollout_s"] = statistics.median(out["rollout_s"][w:])
    out["median_update_s"] = statistics.median(out["update_s"][w:])
    out["median_step_s"] = statistics.median(r + u for r, u in zip(out["rollout_s"][w:],
                                                                   out["update_s"][w:]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed ones")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per side")
    p.add_argument("--G", type=int, default=8, help="num_generations")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens, BOS included")
    p.add_argument("--completion-len", type=int, default=64, help="max_completion_length")
    p.add_argument("--beta", default="0", help="the KL coefficient (0: no reference); a comma "
                   "list (0,0.04) runs both sides at each")
    p.add_argument("--sides", default="jaxlm,trl", help="which sides, in order")
    p.add_argument("--json", default="", help="write the result here too")
    p.add_argument("--side", choices=("jaxlm", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = 3, 1
    if a.side:  # a child: one side, one JSON line out
        work, a.beta = pathlib.Path(a.work), float(a.beta)
        out = (run_jaxlm if a.side == "jaxlm" else run_trl)(a, work)
        print(json.dumps(out))
        return 0

    load_before = os.getloadavg()
    betas = [float(b) for b in str(a.beta).split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl-") as tmp:
        work = pathlib.Path(tmp)
        shared = build_checkpoint(work / "hf")
        write_prompts(work / "prompts.jsonl", work / "hf", 64, a.prompt_len)
        for beta in betas:
            for side in a.sides.split(","):
                results[f"{side} beta={beta:g}"] = _side(a, side, work, beta)
    load_after = os.getloadavg()

    print(f"GRPO step: {a.prompts} prompts x G={a.G} = {a.prompts * a.G} completions, prompt "
          f"{a.prompt_len} + completion {a.completion_len} tokens, loss dapo; vocab "
          f"{shared['vocab']}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print("| side | beta | steps | median step s | rollout s | update s | TRL step / side's |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        side, beta = key.split(" beta=")
        trl_r = results.get(f"trl beta={beta}")
        ratio = f"{trl_r['median_step_s'] / r['median_step_s']:.2f}x" if trl_r else ""
        print(f"| {side} | {beta} | {len(r['rollout_s']) - a.warmup} (+{a.warmup} warm-up) | "
              f"{r['median_step_s']:.3f} | {r['median_rollout_s']:.3f} | "
              f"{r['median_update_s']:.3f} | {ratio} |")
    for key, r in results.items():
        print(f"{key}: per step rollout {[round(x, 3) for x in r['rollout_s']]} update "
              f"{[round(x, 3) for x in r['update_s']]}; process {r['process_s']:.1f} s; "
              f"{r['versions']}; threads {r['threads']}")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}")
    for beta in betas:
        j, t = results.get(f"jaxlm beta={beta:g}"), results.get(f"trl beta={beta:g}")
        if j and t:
            print(f"beta {beta:g}: jaxlm's step is {t['median_step_s'] / j['median_step_s']:.2f}x "
                  "faster than TRL's")
    if a.json:
        sys.path.insert(0, str(HERE))
        from benchlib import write_json
        write_json(a.json, {"args": vars(a), "results": results, "load_before": load_before,
                            "load_after": load_after, "date": time.strftime("%Y-%m-%d %H:%M")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
