"""`jaxlm eval`: perplexity and bits per byte of text files, and lm-eval tasks.

    jaxlm eval --checkpoint runs/tiny --data valid.txt [--stride 256]
    jaxlm eval --checkpoint hf-dir --tasks hellaswag,arc_easy --output result.json
    jaxlm eval --checkpoint runs/tiny --tasks my_task --include-path tasks/ mesh.data=4 mesh.tensor=2

Runs under the mesh config (a run dir's saved mesh section, with mesh.* overrides),
the rows split over its batch axes. The JSON result goes to --output, else for a
jaxlm run dir beside its metrics.jsonl (`eval-step-<N>.json`), else (an HF dir) to
stdout only; a summary line is printed either way.
"""

from __future__ import annotations

import json
import os
import re

_KEY_VALUE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="a jaxlm run/checkpoint dir, a Hugging Face dir or a peft dir")
    p.add_argument("--data", nargs="+", metavar="FILE", default=[],
                   help="text files (one document each), .jsonl files ({\"text\"} a line) or "
                   "corpora prepared by `jaxlm prepare`: token NLL, perplexity, bits per byte")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (lm-eval's own, or "
                   "YAMLs in --include-path)")
    p.add_argument("--include-path", help="a directory of lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: examples in each prompt")
    p.add_argument("--limit", type=float, help="lm-eval: items per task (a fraction if < 1)")
    p.add_argument("--stride", type=int, help="perplexity: tokens scored per window (default "
                   "the window: disjoint windows; smaller: more context per token)")
    p.add_argument("--max-length", type=int, help="the window / context (default "
                   "model.max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--step", type=int, help="the checkpoint step (default the latest)")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument("overrides", nargs="*", metavar="mesh.key=value",
                   help="mesh settings (mesh.data=4 mesh.tensor=2), train.init_from=DIR")


def split_data_args(args) -> None:
    """`--data a.txt mesh.data=4`: --data took the key=value words after it too; give
    them back to the overrides."""
    moved = [d for d in args.data if _KEY_VALUE.match(d) and not os.path.exists(d)]
    args.data = [d for d in args.data if d not in moved]
    args.overrides = list(args.overrides) + moved


def run_eval(args, init_from=None, accept_base_change=False) -> dict:
    """Evaluates as the arguments say; returns the result dict (also written)."""
    from ..api import checkpoint_kind, companions_dir, load, model_config_of
    from ..config import config_from_dict, to_dict
    from ..errors import ConfigError, InputError
    from ..infer.evaluate import (check_tasks, evaluate, read_eval_data, task_manager,
                                  tokenizer_for)
    from ..sharding.mesh import check_divisible, make_mesh
    from ..train.checkpoint import latest_step
    from ..train.loop import read_run_config

    split_data_args(args)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not args.data and not tasks:
        raise InputError("jaxlm eval: give --data FILES (perplexity) and/or --tasks NAMES")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size} must be >= 1")
    bad = [o for o in args.overrides if not o.strip().startswith("mesh.")]
    if bad:
        raise ConfigError(f"{bad[0]}: jaxlm eval takes mesh.* settings only")
    kind = checkpoint_kind(args.checkpoint)
    run_dir = kind == "jaxlm"
    if not run_dir and args.step is not None:
        raise InputError(f"--step {args.step}: {args.checkpoint} is not a jaxlm run dir; it "
                         "has no steps")
    cfg = model_config_of(args.checkpoint, init_from)
    if cfg.family != "decoder":
        raise InputError(f"jaxlm eval scores causal decoders; {args.checkpoint} is a "
                         f"{cfg.family} model")
    for name, value in (("--max-length", args.max_length), ("--stride", args.stride)):
        if value is not None and not 1 <= value <= cfg.max_seq_len:
            raise InputError(f"{name} {value} must be in [1, model.max_seq_len="
                             f"{cfg.max_seq_len}]")
    files = companions_dir(args.checkpoint, init_from)
    tok = tokenizer_for(files)
    docs = read_eval_data(args.data, tok) if args.data else None
    manager = None
    if tasks:
        manager = task_manager(args.include_path, tasks)
        check_tasks(manager, tasks)
    base = {"mesh": to_dict(read_run_config(args.checkpoint).mesh)} if run_dir else {}
    mesh_cfg = config_from_dict(base, list(args.overrides)).mesh
    mesh, rules = make_mesh(mesh_cfg), mesh_cfg.rules
    check_divisible(mesh, rules, {"vocab": cfg.vocab_size, "heads": cfg.n_heads,
                                  "kv_heads": cfg.n_kv_heads, "mlp": cfg.d_ff,
                                  "embed": cfg.d_model})
    step = (latest_step(args.checkpoint) if args.step is None else args.step) if run_dir else None
    _, params = load(args.checkpoint, cfg=cfg, mesh=mesh, rules=rules, step=step,
                     init_from=init_from, accept_base_change=accept_base_change)
    result = {"checkpoint": os.path.abspath(args.checkpoint), "step": step,
              "mesh": dict(mesh.shape)}
    result.update(evaluate(params, cfg, tok, docs=docs, tasks=tasks, manager=manager,
                           max_length=args.max_length, stride=args.stride,
                           batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                           limit=args.limit, mesh=mesh, rules=rules, chat_template_dir=files,
                           progress=True))
    out = args.output or (os.path.join(args.checkpoint, f"eval-step-{step}.json")
                          if run_dir else None)
    if out and args.output is None and os.path.isfile(out):  # this step's earlier evals
        result = merged(out, result)
    text = json.dumps(result, indent=2, allow_nan=False, default=str)
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, out)
    else:
        print(text)
    print(summary(result, out))
    return result


def merged(path: str, result: dict) -> dict:
    """An earlier result of the same checkpoint (another --data, other --tasks) with
    `result` over it: what was measured stays, what is measured again is replaced."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return result
    if not isinstance(old, dict):
        return result
    tasks = {**(old.get("tasks") or {}), **(result.get("tasks") or {})}
    return {**old, **result, **({"tasks": tasks} if tasks else {})}


def summary(result: dict, out) -> str:
    parts = []
    p = result.get("perplexity")
    if p:
        bpb = "" if p["bits_per_byte"] is None else f", {p['bits_per_byte']:.4f} bits/byte"
        parts.append(f"{p['tokens']} tokens: nll {p['nll']:.4f}, perplexity "
                     f"{p['perplexity']:.3f}{bpb}")
    for name, metrics in (result.get("tasks") or {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if not k.split(",")[0].endswith("_stderr"))
        parts.append(f"{name}: {shown}")
    if result.get("truncated"):
        parts.append(f"{result['truncated']} request(s) cut from the left to the model's "
                     "positions")
    return "eval: " + "; ".join(parts) + (f"; wrote {out}" if out else "")
