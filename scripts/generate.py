"""`jaxlm generate`: prompts in, text out, from a jaxlm run/checkpoint dir or a Hugging
Face dir (prompts encoded by `jaxlm.infer.text.encode_prompts`; stop ids, the
decoder start and the decoding defaults of generation_config.json from
`generation_settings`, applied to the generate.* keys not given by
`resolve_generate`)."""

from __future__ import annotations

import dataclasses

from ..errors import InputError
from ..infer.text import (apply_model_overrides, chat_template_for, decode_ids,  # noqa: F401
                          encode_prompts, generation_settings, given_generate_keys,
                          resolve_generate, split_model_overrides, stop_ids)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise InputError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte "
                             f"{e.start})") from None
    if not prompts:
        raise InputError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i} is empty")
    return prompts


def run_generate(args, init_from: str | None = None, accept_base_change: bool = False):
    from ..api import load
    from ..infer.text import generate
    from ..model.tokenizer import load_tokenizer
    from ..infer.generate import generate_kwargs
    from ..config import config_from_dict, load_config, read_yaml, to_dict
    from ..train.loop import read_run_config

    from ..api import checkpoint_kind, companions_dir

    prompts = read_prompts(args)
    files = companions_dir(args.checkpoint, init_from)  # tokenizer, template, generation config
    template = chat_template_for(files) if getattr(args, "chat", False) else None
    model_overrides, overrides = split_model_overrides(args.overrides)
    if checkpoint_kind(args.checkpoint) != "jaxlm":
        saved = {}  # an HF or peft dir: generation settings from the command line only
    else:
        saved = {"generate": to_dict(read_run_config(args.checkpoint).generate)}
    gen_cfg = load_config(args.config, overrides) if args.config else config_from_dict(
        saved, overrides)
    given = given_generate_keys(overrides, read_yaml(args.config) if args.config else {},
                                saved=saved.get("generate"))
    cfg, params = load(args.checkpoint, step=getattr(args, "step", None), init_from=init_from,
                       accept_base_change=accept_base_change)
    cfg = apply_model_overrides(cfg, model_overrides)
    tok = load_tokenizer(files)
    settings = generation_settings(files, tok)
    g = resolve_generate(gen_cfg.generate, settings, given)
    ids = encode_prompts(tok, cfg, prompts, chat_template=template)
    eos = stop_ids(getattr(args, "eos_id", None) or settings.eos_ids, g, cfg.vocab_size)
    guide = read_guide(args, tok, cfg.vocab_size)
    if getattr(args, "draft", None):
        if guide is not None:
            raise InputError("--draft: guided decoding (--regex / --json-schema / --choice) "
                             "is not supported with speculative decoding")
        out = _speculative(args, g, params, cfg, ids, eos)
    else:
        kwargs = generate_kwargs(g)
        kwargs["eos_id"] = eos or None  # no EOS anywhere: rows run to max_new_tokens
        if cfg.family == "encoder_decoder" and settings.decoder_start_id is not None:
            kwargs["decoder_start_id"] = settings.decoder_start_id
        out = generate(params, cfg, ids, guide=guide, **kwargs)
    n = g.num_return_sequences  # output row i * n + r: sequence r of prompt i
    for i, new in enumerate(out.sequences()):
        prompt = prompts[i // n]
        score = "" if out.scores is None else f" (score {out.scores[i]:.4f})"
        print(f"=== prompt: {prompt!r}" + (f" #{i % n + 1}" if n > 1 else "") + score)
        print(prompt + (guide.text(new) if guide is not None else
                        decode_ids(tok, new, cfg.vocab_size)))
    return dataclasses.asdict(g)


def read_guide_spec(args):
    """--regex / --json-schema FILE / --choice ... -> ("regex" | "json_schema" | "choice",
    value) or None (the JSON schema file read: its text)."""
    if getattr(args, "regex", None) is not None:
        return ("regex", args.regex)
    if getattr(args, "choice", None):
        return ("choice", list(args.choice))
    path = getattr(args, "json_schema", None)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return ("json_schema", f.read())
    except OSError as e:
        raise InputError(f"cannot read --json-schema {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--json-schema {path} is not UTF-8 text (byte {e.start})") from None


def read_guide(args, tok, vocab_size: int):
    """--regex / --json-schema FILE / --choice ... -> a compiled Guide, or None."""
    from ..infer.guided import Guide
    spec = read_guide_spec(args)
    if spec is None:
        return None
    kind, value = spec
    return getattr(Guide, kind)(value, tok, vocab_size)


def _speculative(args, g, params, cfg, ids, stop):
    """`--draft DIR --num-speculative K`: the target's settings, drafted by DIR's model
    (`--draft mtp`: by the model's own multi-token prediction modules)."""
    from ..api import load
    from ..infer.generate import generate, generate_kwargs

    if args.draft == "mtp":  # self-speculation: the model's own MTP modules draft
        draft = "mtp"
    else:
        draft_cfg, draft_params = load(args.draft)
        draft = (draft_params, draft_cfg)
    kwargs = dict(generate_kwargs(g), eos_id=stop or None)
    try:
        out = generate(params, cfg, ids, draft=draft, num_speculative=args.num_speculative,
                       **kwargs)
    except InputError as e:
        raise InputError(f"--draft: {e}") from None  # the target's settings it cannot run
    st = out.stats
    print(f"speculative: {st['accepted']}/{st['drafted']} draft tokens accepted "
          f"({100 * st['acceptance_rate']:.1f}%) in {st['cycles']} cycles")
    return out
