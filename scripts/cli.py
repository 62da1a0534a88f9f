"""The `jaxlm` command: train | generate | batch-infer | serve | score | eval | convert |
quantize | bench | plan | prepare | config.

Each subcommand takes `--config` (a YAML path or a preset name) and
`key=value` overrides. Bad input prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def _config(args):
    from ..config import load_config
    return load_config(args.config, args.overrides)


def _base_options(p, overrides: bool = False):
    """--accept-base-change, and for commands without key=value overrides of their own
    the one override they take: train.init_from=DIR (a LoRA run's base, moved)."""
    p.add_argument("--accept-base-change", action="store_true",
                   help="a LoRA run's (or peft dir's) base, or a distillation run's teacher, "
                   "whose weights changed since the run (its digest in base.json / "
                   "teacher.json): use it anyway")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="train.init_from=DIR",
                       help="a LoRA run's base, moved to DIR")


def base_choice(args, only: bool = False) -> dict:
    """{init_from, accept_base_change} for `jaxlm.load` from the command line: the
    train.init_from=DIR override taken out of args.overrides. `only`: the command
    takes no other override."""
    from ..config import parse_override
    from ..errors import ConfigError
    init_from, rest = None, []
    for text in getattr(args, "overrides", None) or []:
        key, value = parse_override(text)
        if key == "train.init_from":
            init_from = os.path.abspath(os.path.expanduser(str(value)))
        elif only:
            raise ConfigError(f"{key}: jaxlm {args.command} takes no key=value settings but "
                              "train.init_from=DIR (a LoRA run's moved base)")
        else:
            rest.append(text)
    args.overrides = rest
    return {"init_from": init_from,
            "accept_base_change": getattr(args, "accept_base_change", False)}


def cmd_train(args):
    from ..sharding.distributed import initialize
    cfg = _config(args)
    if args.step is not None and not args.resume:
        from ..errors import ConfigError
        raise ConfigError("--step N chooses the checkpoint to resume: it needs --resume")
    initialize(args.coordinator, args.num_processes, args.process_id,  # before any device use
               timeout_s=args.coordinator_timeout)
    from ..train.loop import train
    summary = train(cfg, resume=args.resume, step=args.step,
                    accept_base_change=args.accept_base_change)
    evals = summary["eval"]
    if not evals and summary["final_step"] > summary["start_step"]:  # grpo: no eval loss
        print(f"trained to step {summary['final_step']}; run dir {cfg.run_dir}")
    elif not evals:
        print(f"{cfg.run_dir} is at step {summary['final_step']} of train.steps={cfg.train.steps}: "
              "nothing left to train")
    else:
        print(f"trained to step {summary['final_step']}: eval loss "
              f"{evals[0]['eval_loss']:.4f} (step {evals[0]['step']}) -> "
              f"{evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']}); run dir {cfg.run_dir}")


def cmd_generate(args):
    from .generate import run_generate
    run_generate(args, **base_choice(args))


def cmd_batch_infer(args):
    run_batch_infer(args)


def run_batch_infer(args):
    from ..infer.batch import batch_infer
    base = base_choice(args)
    from ..sharding.distributed import initialize
    initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None),
               timeout_s=getattr(args, "coordinator_timeout", 300.0))  # before any device use
    from .generate import read_guide_spec
    s = batch_infer(args.checkpoint, args.input, args.output, batch_size=args.batch_size,
                    overrides=args.overrides, on_change=args.on_change, step=args.step,
                    chat=getattr(args, "chat", False), engine=getattr(args, "engine", "auto"),
                    guide=read_guide_spec(args), **base)
    import jax
    if jax.process_index() != 0:  # process 0 writes the output and reports
        return s
    print(f"batch-infer: {s['prompts']} prompts ({s['skipped']} already done, "
          f"{s['regenerated']} regenerated after a change), "
          f"{s['new_tokens']} new tokens in {s['seconds']:.1f}s: {s['tokens_per_s']:.1f} tokens/s; "
          f"wrote {args.output}")
    return s


def cmd_serve(args):
    from .serve import run_serve
    return run_serve(args)


def cmd_convert(args):
    from .convert import run_convert
    print(run_convert(args.input, args.output, args.to, **base_choice(args, only=True)))


def cmd_score(args):
    from .score import run_score
    print(run_score(args.checkpoint, args.input, args.output, args.batch_size))


def cmd_eval(args):
    from .eval import run_eval, split_data_args
    split_data_args(args)
    run_eval(args, **base_choice(args))


def cmd_bench(args):
    from .bench import run_bench
    run_bench(_config(args))


def cmd_quantize(args):
    from .quantize import run_quantize
    print(run_quantize(args.checkpoint, args.out, args.dtype, args.step,
                       **base_choice(args, only=True), method=args.method,
                       calibration=args.calibration or (), group=args.group,
                       samples=args.calibration_samples, seq_len=args.calibration_len,
                       act_order=args.act_order,
                       progress=lambda m: print(m, file=sys.stderr, flush=True)))


def cmd_plan(args):
    from .plan import run_plan
    return run_plan(args)


def cmd_prepare(args):
    from .prepare import run_prepare
    run_prepare(args)


def cmd_config(args):
    from .config_keys import run_config
    return run_config(args)


def _process_options(p, role: str = "") -> None:
    """The multi-host options (`sharding.distributed.initialize`)."""
    p.add_argument("--coordinator", help="multi-host: host:port of process 0's coordinator")
    p.add_argument("--coordinator-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="multi-host: how long to wait for every process (default 300)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help=f"multi-host: this process's index{role}")


def _guide_options(parser, where: str = "") -> None:
    guide = parser.add_mutually_exclusive_group()
    guide.add_argument("--regex", help=f"guided decoding: outputs fully match this regex{where}")
    guide.add_argument("--json-schema", metavar="FILE", help="guided decoding: outputs are JSON "
                       f"valid against this schema file{where}")
    guide.add_argument("--choice", action="append", metavar="TEXT",
                       help=f"guided decoding: the output is one of these (repeatable){where}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pretrain a model from a config")
    t.add_argument("--config", required=True, help="YAML file or preset name (e.g. tiny-llama)")
    t.add_argument("--resume", action="store_true", help="continue the run dir's latest checkpoint")
    t.add_argument("--step", type=int, help="with --resume: the checkpoint step to continue "
                   "(default the latest; later ones are moved aside)")
    _process_options(t)
    _base_options(t)
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="a jaxlm run/checkpoint dir or a "
                   "Hugging Face dir")
    g.add_argument("--step", type=int, help="the checkpoint step (default the latest)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file, one prompt per line")
    g.add_argument("--config", help="optional YAML with a generate: section")
    g.add_argument("--chat", action="store_true", help="render each prompt as one user "
                   "message with the checkpoint's chat template")
    g.add_argument("--eos-id", type=int, action="append", metavar="ID",
                   help="an id that ends a row (repeatable); default the checkpoint's "
                   "(generation_config.json eos_token_id, else the tokenizer's eos)")
    g.add_argument("--draft", help="speculative decoding: a draft checkpoint (a jaxlm or "
                   "HF decoder dir) with the target's vocabulary, or 'mtp': the model's own "
                   "multi-token prediction modules (model.mtp_depth > 0)")
    g.add_argument("--num-speculative", type=int, default=None,
                   help="tokens the draft proposes per cycle (with --draft; default 4, with "
                   "--draft mtp model.mtp_depth)")
    _guide_options(g)
    _base_options(g)
    g.add_argument("overrides", nargs="*", metavar="generate.key=value")
    g.set_defaults(fn=cmd_generate)

    bi = sub.add_parser("batch-infer", help="sharded, resumable generation over a JSONL file")
    bi.add_argument("--checkpoint", required=True,
                    help="a jaxlm run/checkpoint dir or a Hugging Face dir")
    bi.add_argument("--input", required=True, help='JSONL, one {"id": ..., "prompt": "..."} a line')
    bi.add_argument("--output", required=True, help="JSONL out; a rerun skips the ids written")
    bi.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default 32)")
    bi.add_argument("--on-change", choices=("refuse", "regenerate"), default="refuse",
                    help="done lines whose prompt or settings changed: refuse the rerun "
                    "(default) or regenerate them")
    bi.add_argument("--step", type=int, help="the checkpoint step (default the latest)")
    bi.add_argument("--chat", action="store_true",
                    help="render each prompt as a user message with the checkpoint's chat template")
    _process_options(bi, " (process 0 writes --output)")
    bi.add_argument("--engine", choices=("auto", "continuous", "static"), default="auto",
                    help="the engine's cache: a paged pool (auto, continuous: the default) or "
                    "a contiguous row per slot (static: chunks of --batch-size prompts)")
    _guide_options(bi, " (rows that give none)")
    _base_options(bi)
    bi.add_argument("overrides", nargs="*", metavar="generate.key=value|mesh.key=value")
    bi.set_defaults(fn=cmd_batch_infer)

    from .serve import add_arguments as serve_arguments
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, "
                        "streaming) on a checkpoint")
    serve_arguments(sv)
    _process_options(sv, " (process 0 serves HTTP, the others follow its engine steps)")
    sv.set_defaults(fn=cmd_serve)

    sc = sub.add_parser("score", help="a reward model's (a sequence classifier's) scores of "
                        "JSONL rows")
    sc.add_argument("--checkpoint", required=True, help="a jaxlm run dir or a HF "
                    "*ForSequenceClassification dir")
    sc.add_argument("--input", required=True, help="JSONL: {\"prompt\", \"completion\"} or "
                    "{\"messages\"} rows")
    sc.add_argument("--output", required=True, help="JSONL: each row with \"score\" added")
    sc.add_argument("--batch-size", type=int, default=16, help="rows scored at once")
    sc.set_defaults(fn=cmd_score)

    from .eval import add_arguments as eval_arguments
    ev = sub.add_parser("eval", help="perplexity / bits per byte of text files, and lm-eval "
                        "tasks on jaxlm's backend")
    eval_arguments(ev)
    _base_options(ev)
    ev.set_defaults(fn=cmd_eval)

    c = sub.add_parser("convert", help="convert a checkpoint between jaxlm and Hugging Face")
    c.add_argument("--input", required=True, help="a jaxlm run/checkpoint dir or a HF dir")
    c.add_argument("--output", required=True, help="a new directory")
    c.add_argument("--to", choices=("jaxlm", "hf", "peft"), required=True, help="the output format")
    _base_options(c, overrides=True)
    c.set_defaults(fn=cmd_convert)

    b = sub.add_parser("bench", help="measure train and decode speed")
    b.add_argument("--config", default="bench-cpu", help="YAML file or preset (default bench-cpu)")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.set_defaults(fn=cmd_bench)

    qz = sub.add_parser("quantize", help="quantized weights (int8, int4, nf4, fp8): a "
                        "checkpoint -> a new jaxlm run dir")
    qz.add_argument("--checkpoint", required=True, help="a jaxlm run/checkpoint dir or a HF dir")
    qz.add_argument("--out", required=True, help="a new directory (written atomically)")
    qz.add_argument("--dtype", "--weight-dtype", dest="dtype", default="int8",
                    help="the weights' format: int8 | int4 | nf4 | fp8 (model.weight_dtype)")
    qz.add_argument("--group", type=int, help="int4 / nf4: input rows per scale (default: "
                    "the checkpoint's model.quant_group, 128; 0: per output channel)")
    qz.add_argument("--method", default="rtn", help="rtn (round to nearest) | gptq | awq")
    qz.add_argument("--calibration", nargs="+", metavar="FILE",
                    help="gptq / awq: text files whose sequences calibrate the weights")
    qz.add_argument("--calibration-samples", type=int, default=256,
                    help="gptq / awq: calibration windows (default 256)")
    qz.add_argument("--act-order", action="store_true",
                    help="gptq: quantize input rows in order of decreasing activation "
                    "energy (static groups)")
    qz.add_argument("--calibration-len", type=int, default=0,
                    help="gptq / awq: tokens per window (default min(512, model.max_seq_len))")
    qz.add_argument("--step", type=int, help="the checkpoint step (default the latest)")
    _base_options(qz, overrides=True)
    qz.set_defaults(fn=cmd_quantize)

    pl = sub.add_parser("plan", help="per-device memory of a config on a mesh (no allocation)")
    pl.add_argument("--config", required=True, help="YAML file or preset name")
    pl.add_argument("--devices", type=int, help="devices in the mesh (default: the product of "
                    "the mesh.* sizes, or this host's devices when one is -1)")
    pl.add_argument("--device-memory", help="e.g. 16GiB: exit 1 with 'does not fit' above it")
    pl.add_argument("--cache-len", type=int, help="kv cache length (default seq_len + "
                    "generate.max_new_tokens)")
    pl.add_argument("--batch", type=int, help="kv cache batch (default data.batch_size)")
    pl.add_argument("overrides", nargs="*", metavar="key=value")
    pl.set_defaults(fn=cmd_plan)

    from .prepare import add_arguments as prepare_arguments
    pr = sub.add_parser("prepare", help="tokenize text/.jsonl/Parquet files into ArrayRecord shards")
    prepare_arguments(pr)
    pr.set_defaults(fn=cmd_prepare)

    cf = sub.add_parser("config", help="every config key: its type, default (or a config's "
                        "value) and meaning")
    cf.add_argument("--config", help="YAML file or preset name: show its resolved values")
    cf.add_argument("--json", action="store_true", help="a JSON list of {key, type, default, "
                    "value, meaning}")
    cf.add_argument("items", nargs="*", metavar="SECTION|key=value",
                    help="the sections (model, train.lora, ...) or keys to show (default: all); "
                    "key=value overrides")
    cf.set_defaults(fn=cmd_config)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from absl import logging as absl_logging  # orbax logs routine notices as warnings
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        if getattr(args, "overrides", None):  # a key typed twice: neither silently wins
            from ..config import refuse_repeated_keys
            refuse_repeated_keys(args.overrides)
        rc = args.fn(args)
    except KeyboardInterrupt as e:
        print(interrupt_message(args.command, e), file=sys.stderr)
        rc = 0 if _preempted_cleanly(args.command, e) else 130
        if argv is None:  # the real command: skip the interpreter teardown, where
            _exit_now(rc)  # runtime threads still live after an interrupt can crash it
        return rc
    except BaseException as e:  # noqa: BLE001 - only user errors are turned into one line
        message = error_line(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


def error_line(e: BaseException) -> str | None:
    """The one-line message of a user error (a JaxlmError, a file-system error, a
    user file that is not UTF-8), or None for anything else (a bug: traceback)."""
    from ..errors import JaxlmError
    if isinstance(e, JaxlmError):
        return str(e)
    if isinstance(e, OSError):
        names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        text = e.strerror or str(e) or type(e).__name__
        return f"{names}: {text}" if names else text
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not valid UTF-8 text ({e.reason} at byte {e.start})"
    return None


def _preempted_cleanly(command: str, e: KeyboardInterrupt) -> bool:
    """SIGTERM (a preemption) that stopped `train` with its checkpoint saved: exit 0."""
    from ..train.guard import Terminated
    return (command == "train" and isinstance(e, Terminated)
            and getattr(e, "saved_step", None) is not None)


def interrupt_message(command: str, e: KeyboardInterrupt) -> str:
    """What an interrupt left behind: for `train`, whether a checkpoint was saved."""
    if command != "train":
        return "interrupted"
    saved = getattr(e, "saved_step", None)
    if saved is not None and _preempted_cleanly(command, e):
        return (f"stopped by SIGTERM: saved a checkpoint of step {saved}; the run is "
                "resumable: continue with --resume")
    if saved is not None:
        return f"interrupted: saved a checkpoint of step {saved}; continue with --resume"
    why = getattr(e, "reason", None) or "during start-up, before the first step"
    return f"interrupted {why}: no checkpoint was saved by this run"


def _exit_now(code: int):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
