"""`jaxlm generate`: prompts in, text out, from a run/checkpoint dir."""

from __future__ import annotations

import dataclasses
import os

from jaxlm.errors import InputError


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise InputError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
    if not prompts:
        raise InputError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i} is empty")
    return prompts


def decode_ids(tok, ids, vocab_size: int) -> str:
    """Text for ids; ids past the tokenizer (T5 span sentinels, counting down from
    the top of the model's vocab) print as <extra_id_N>."""
    parts, run = [], []
    for i in ids:
        if i < tok.vocab_size:
            run.append(i)
            continue
        parts += [tok.decode(run), f"<extra_id_{vocab_size - 1 - i}>"]
        run = []
    return "".join(parts) + tok.decode(run)


def run_generate(args):
    import jaxlm
    from jaxlm.infer.generate import generate_kwargs
    from jaxlm.model.config import config_from_dict, load_config, to_dict
    from jaxlm.train.loop import read_run_config

    from jaxlm.model.hf import is_hf_checkpoint

    prompts = read_prompts(args)
    if is_hf_checkpoint(args.checkpoint) and not os.path.exists(
            os.path.join(args.checkpoint, "config.yaml")):
        saved = {}  # a Hugging Face dir: generation settings from the command line only
    else:
        saved = {"generate": to_dict(read_run_config(args.checkpoint).generate)}
    gen_cfg = load_config(args.config, args.overrides) if args.config else config_from_dict(
        saved, args.overrides)
    g = gen_cfg.generate
    cfg, params = jaxlm.load(args.checkpoint)
    tok = jaxlm.load_tokenizer(args.checkpoint)
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    out = jaxlm.generate(params, cfg, ids, **generate_kwargs(g, tok.eos_id))
    n = g.num_return_sequences  # output row i * n + r: sequence r of prompt i
    for i, new in enumerate(out.sequences()):
        prompt = prompts[i // n]
        score = "" if out.scores is None else f" (score {out.scores[i]:.4f})"
        print(f"=== prompt: {prompt!r}" + (f" #{i % n + 1}" if n > 1 else "") + score)
        print(prompt + decode_ids(tok, new, cfg.vocab_size))
    return dataclasses.asdict(g)
