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
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte "
                             f"{e.start})") from None
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
    from jaxlm.errors import ConfigError
    from jaxlm.model.config import ModelConfig, _build, _deep_set, parse_override, to_dict
    from jaxlm.validate import _expected_shapes

    def replaced(texts):
        data = {"model": to_dict(cfg)}
        for text in texts:
            _deep_set(data, *parse_override(text))
        return _build(ModelConfig, data["model"], "model.")

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
    import jaxlm
    from jaxlm.model.config import config_from_dict, load_config, to_dict
    from jaxlm.train.loop import read_run_config

    from jaxlm.model.hf import is_hf_checkpoint

    prompts = read_prompts(args)
    model_overrides, overrides = split_model_overrides(args.overrides)
    if is_hf_checkpoint(args.checkpoint) and not os.path.exists(
            os.path.join(args.checkpoint, "config.yaml")):
        saved = {}  # a Hugging Face dir: generation settings from the command line only
    else:
        saved = {"generate": to_dict(read_run_config(args.checkpoint).generate)}
    gen_cfg = load_config(args.config, overrides) if args.config else config_from_dict(
        saved, overrides)
    g = gen_cfg.generate
    cfg, params = jaxlm.load(args.checkpoint, step=getattr(args, "step", None))
    cfg = apply_model_overrides(cfg, model_overrides)
    tok = jaxlm.load_tokenizer(args.checkpoint)
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    out = jaxlm.generate(params, cfg, ids, max_new_tokens=g.max_new_tokens,
                         temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed,
                         eos_id=tok.eos_id)
    for prompt, new in zip(prompts, out.sequences()):
        print(f"=== prompt: {prompt!r}")
        print(prompt + decode_ids(tok, new, cfg.vocab_size))
    return dataclasses.asdict(g)
