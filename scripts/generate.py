"""`jaxlm generate`: prompts in, text out, from a jaxlm run/checkpoint dir or a Hugging
Face dir (prompts encoded by `jaxlm.infer.text.encode_prompts`; stop ids, the
decoder start and the decoding defaults of generation_config.json from
`generation_settings`, applied to the generate.* keys not given by
`resolve_generate`)."""

from __future__ import annotations

import dataclasses

from ..errors import CheckpointError, InputError
from ..infer.text import (decode_ids, encode_prompts, generation_settings,  # noqa: F401
                              given_generate_keys, resolve_generate)


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


def split_model_overrides(overrides) -> tuple[list[str], list[str]]:
    """(the model.* overrides, the others)."""
    model = [o for o in overrides if o.strip().startswith("model.")]
    return model, [o for o in overrides if o not in model]


def apply_model_overrides(cfg, overrides):
    """`cfg` (a loaded ModelConfig) with model.* overrides that keep the parameter
    shapes (e.g. model.attention_impl, model.dtype); a key that would change them
    is a ConfigError naming it."""
    if not overrides:
        return cfg
    from ..errors import ConfigError
    from ..config import apply_overrides, model_config_from_dict, parse_override, to_dict
    from ..validate import _expected_shapes

    def replaced(texts):
        return model_config_from_dict(apply_overrides({"model": to_dict(cfg)}, texts)["model"])

    new = replaced(overrides)
    if _expected_shapes(new) != _expected_shapes(cfg):
        for text in overrides:
            one = replaced([text])
            if _expected_shapes(one) != _expected_shapes(cfg):
                raise ConfigError(f"{parse_override(text)[0]}: changes the checkpoint's "
                                  "parameter shapes; only settings that keep them (e.g. "
                                  "model.attention_impl, model.dtype) can be overridden here")
        raise ConfigError("the model.* overrides together change the checkpoint's parameter "
                          "shapes")
    return new


def run_generate(args):
    from ..api import load
    from ..infer.text import generate
    from ..model.tokenizer import load_tokenizer
    from ..infer.generate import generate_kwargs
    from ..config import config_from_dict, load_config, read_yaml, to_dict
    from ..train.loop import read_run_config

    from ..api import checkpoint_kind

    prompts = read_prompts(args)
    template = chat_template_for(args.checkpoint) if getattr(args, "chat", False) else None
    model_overrides, overrides = split_model_overrides(args.overrides)
    if checkpoint_kind(args.checkpoint) == "hf":
        saved = {}  # a Hugging Face dir: generation settings from the command line only
    else:
        saved = {"generate": to_dict(read_run_config(args.checkpoint).generate)}
    gen_cfg = load_config(args.config, overrides) if args.config else config_from_dict(
        saved, overrides)
    given = given_generate_keys(overrides, read_yaml(args.config) if args.config else {},
                                saved=saved.get("generate"))
    cfg, params = load(args.checkpoint, step=getattr(args, "step", None))
    cfg = apply_model_overrides(cfg, model_overrides)
    tok = load_tokenizer(args.checkpoint)
    settings = generation_settings(args.checkpoint, tok)
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


def stop_ids(eos_ids, g, vocab_size: int) -> list[int]:
    """The ids that end a row: `eos_ids` (--eos-id, else the checkpoint's), then
    generate.stop_ids; each must be in the model's vocabulary."""
    out = []
    for i in list(eos_ids) + list(g.stop_ids):
        if not 0 <= i < vocab_size:
            raise InputError(f"stop id {i} (--eos-id / generation_config.json / "
                             f"generate.stop_ids) is outside the vocabulary [0, {vocab_size})")
        if i not in out:
            out.append(i)
    return out


def chat_template_for(checkpoint) -> str:
    """--chat: the checkpoint's chat template (a fine-tuning run's: the one it trained
    with); a checkpoint without one is a CheckpointError."""
    from ..api import checkpoint_kind
    from ..model.chat import chat_template_of, resolve_chat_template
    if checkpoint_kind(checkpoint) == "hf":
        template = chat_template_of(checkpoint)
    else:
        from ..train.loop import read_run_config
        run = read_run_config(checkpoint)
        template = chat_template_of(checkpoint)
        if template is None and run.train.objective in ("sft", "dpo"):
            template = resolve_chat_template(run.data.chat_template,
                                             run.train.init_from or checkpoint)
    if template is None:
        raise CheckpointError(f"--chat: {checkpoint} has no chat template (no chat_template in "
                              "tokenizer_config.json, no chat_template.jinja)")
    return template


def read_guide(args, tok, vocab_size: int):
    """--regex / --json-schema FILE / --choice ... -> a compiled Guide, or None."""
    from ..infer.guided import Guide
    if getattr(args, "regex", None) is not None:
        return Guide.regex(args.regex, tok, vocab_size)
    if getattr(args, "choice", None):
        return Guide.choice(args.choice, tok, vocab_size)
    path = getattr(args, "json_schema", None)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"cannot read --json-schema {path}: {e.strerror}") from None
    return Guide.json_schema(text, tok, vocab_size)


def _speculative(args, g, params, cfg, ids, stop):
    """`--draft DIR --num-speculative K`: the target's settings, drafted by DIR's model."""
    from ..api import load
    from ..infer.text import generate
    from ..model.tokenizer import load_tokenizer
    from ..infer.generate import DECODING_OFF
    from ..infer.speculative import generate_speculative

    unsupported = [k for k, off in DECODING_OFF.items() if getattr(g, k) != off]
    if unsupported:
        raise InputError(f"--draft: generate.{unsupported[0]} is not supported with "
                         "speculative decoding")
    draft_cfg, draft_params = load(args.draft)
    out = generate_speculative(params, cfg, draft_params, draft_cfg, ids,
                               max_new_tokens=g.max_new_tokens,
                               num_speculative=args.num_speculative, temperature=g.temperature,
                               top_k=g.top_k, top_p=g.top_p, seed=g.seed, eos_id=stop)
    st = out.stats
    print(f"speculative: {st['accepted']}/{st['drafted']} draft tokens accepted "
          f"({100 * st['acceptance_rate']:.1f}%) in {st['cycles']} cycles")
    return out
