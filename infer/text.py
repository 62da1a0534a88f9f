"""Text in, text out around `jaxlm.generate`: prompts encoded as each family expects,
stop ids and decoder start from the checkpoint, chat templates.

    tok = jaxlm.load_tokenizer(path)
    out = jaxlm.generate(params, cfg, ["def f"], tokenizer=tok, max_new_tokens=32)
    out.texts                      # one string per output row; out.tokens etc. as before
    settings = generation_settings(path, tok)   # eos_ids, decoder_start_id, ... of a checkpoint

Prompt ids (`encode_prompts`), as Hugging Face tokenizers make them:
* decoders: the tokenizer's BOS (if it has one: Llama `<s>`, GPT-2 `<|endoftext|>`,
  none for Qwen) then the text's ids;
* encoder-decoders (T5): the text's ids then EOS (`</s>`, which T5's tokenizer
  appends to every encoder input); there is no BOS;
* chat (`chat_template=`): each prompt is one user message rendered with the
  template (generation prompt added) and tokenized as transformers'
  `apply_chat_template` does: the template writes its own BOS, nothing is added.

Stop ids (`generation_settings`): `generation_config.json`'s `eos_token_id`
(an id or a list: Llama-3-Instruct has two) when the checkpoint has one, else the
tokenizer's EOS; none when neither has one (rows then stop at max_new_tokens or
at the stop ids given). `decoder_start_token_id` from it or config.json (T5: 0).

Decoding defaults (`GenerationSettings.defaults`, applied by `resolve_generate`):
generation_config.json's do_sample, temperature, top_k, top_p, min_p,
repetition_penalty, no_repeat_ngram_size, max_new_tokens, min_new_tokens,
num_beams, length_penalty and early_stopping
become the generate.* values of every key the user did not give (a config
file's generate section, a `generate.KEY=...` override, a run's saved config).
As in transformers, do_sample false (or absent) is greedy whatever the
temperature says, and do_sample true fills a missing temperature / top_k /
top_p with transformers' defaults (1.0, 50, 1.0). jaxlm has no do_sample key:
an explicit generate.temperature (0 = greedy) always wins. Not read:
max_length (prompt-inclusive), num_beams and the other beam keys.
"""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple, Optional, Sequence

from ..errors import CheckpointError, InputError
from ..model.companions import GENERATION_CONFIG, read_generation_config


class GenerationSettings(NamedTuple):
    """What a checkpoint says about generating from it (None: it does not say)."""
    eos_ids: tuple  # the ids that end a row (empty: neither file nor tokenizer has an EOS)
    decoder_start_id: Optional[int]  # encoder-decoders' first decoder input (T5: 0)
    defaults: dict = {}  # generate.* key -> value from generation_config.json (never mutated)


# transformers' values under do_sample=true for the sampler keys a file leaves out
_SAMPLER_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}
# generate.* keys read as they are (same names, same meaning as transformers')
# (max_length is not read: for a decoder it counts the prompt, and files often hold
# the model's context length there, not a generation budget)
_PLAIN_KEYS = {"repetition_penalty": float, "no_repeat_ngram_size": int,
               "max_new_tokens": int, "min_new_tokens": int, "num_beams": int,
               "length_penalty": float}
_TYPES = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, **_PLAIN_KEYS}


def _ids(value, key: str, path) -> tuple:
    """An id or a list of ids of a generation_config.json field, as a tuple."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{path}: {key} should be a token id or a list of ids, got {value!r}")
    return tuple(values)


def _number(value, key: str, typ, path):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        typ is float or float(value).is_integer())
    if not ok:
        kind = "an integer" if typ is int else "a number"
        raise CheckpointError(f"{path}: {key} should be {kind}, got {value!r}")
    return typ(value)


def decoding_defaults(gen: dict, path) -> dict:
    """generation_config.json's dict -> the generate.* values it sets (see the module
    docstring); CheckpointError naming a key of the wrong type."""
    out = {}
    sample = gen.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise CheckpointError(f"{path}: do_sample should be true or false, got {sample!r}")
    if sample:
        for key, default in _SAMPLER_DEFAULTS.items():
            value = gen.get(key)
            out[key] = default if value is None else _number(value, key, _TYPES[key], path)
    else:  # greedy, whatever temperature / top_k / top_p say
        out["temperature"] = 0.0
    for key, typ in _PLAIN_KEYS.items():
        if gen.get(key) is not None:
            out[key] = _number(gen[key], key, typ, path)
    stop = gen.get("early_stopping")
    if stop is not None:
        if not (isinstance(stop, bool) or stop == "never"):
            raise CheckpointError(f"{path}: early_stopping should be true, false or \"never\", "
                                  f"got {stop!r}")
        out["early_stopping"] = stop
    return out


def given_generate_keys(overrides=(), *sections, saved=None) -> frozenset:
    """The generate.* keys a user gave: `generate.KEY=value` overrides, the keys of
    each `sections` dict's "generate" mapping (a config file), and of `saved` (a run's
    saved generate section, which holds every key) those that differ from
    GenerateConfig's defaults: a run made from a Hugging Face dir (`jaxlm quantize`)
    keeps its generation_config.json's decoding defaults."""
    from ..config import GenerateConfig, parse_override, to_dict
    defaults = to_dict(GenerateConfig())
    keys = {k for k, v in (saved or {}).items() if k not in defaults or v != defaults[k]}
    for text in overrides:
        key = parse_override(text)[0] if isinstance(text, str) else text[0]
        if key.startswith("generate."):
            keys.add(key.split(".", 2)[1])
    for data in sections:
        if isinstance(data, dict) and isinstance(data.get("generate"), dict):
            keys.update(data["generate"])
    return frozenset(keys)


def resolve_generate(g, settings: GenerationSettings, given=frozenset()):
    """GenerateConfig `g` with `settings.defaults` (generation_config.json) for every key
    not in `given` (`given_generate_keys`). Beam search (num_beams > 1, the user's or
    the file's) keeps its greedy beams: the file's sampler keys are then not applied."""
    import dataclasses
    from ..errors import ConfigError
    defaults = {k: v for k, v in settings.defaults.items() if k not in given}
    if defaults.get("num_beams", g.num_beams) > 1:
        defaults = {k: v for k, v in defaults.items() if k not in _SAMPLER_DEFAULTS}
    if not defaults:
        return g
    try:
        return dataclasses.replace(g, **defaults)
    except ConfigError as e:
        raise CheckpointError(f"{GENERATION_CONFIG}: {e}") from None


def generation_settings(directory, tokenizer) -> GenerationSettings:
    """The stop ids, decoder start and decoding defaults (`decoding_defaults`) of a
    checkpoint dir: generation_config.json first, then config.json (an HF dir's; the
    decoder start only), then the tokenizer's EOS (if it has one).

    The BOS is the tokenizer's alone (as transformers' tokenizer adds it): config
    files name a bos_token_id even where the tokenizer adds none (Qwen)."""
    directory = pathlib.Path(os.fspath(directory))
    gen = read_generation_config(directory)
    config = {}
    if (directory / "config.json").is_file() and not (directory / "config.yaml").is_file():
        from ..model.hf.io import read_config
        config = read_config(directory)
    where = directory / GENERATION_CONFIG

    def first(key):
        for source, at in ((gen, where), (config, directory / "config.json")):
            got = _ids(source.get(key), key, at)
            if got:
                return got
        return ()

    eos = _ids(gen.get("eos_token_id"), "eos_token_id", where) or tuple(
        i for i in (tokenizer.eos_id,) if i is not None)
    return GenerationSettings(eos_ids=eos,
                              decoder_start_id=(first("decoder_start_token_id") or (None,))[0],
                              defaults=decoding_defaults(gen, where))


def chat_ids(tokenizer, template: str, prompt) -> list[int]:
    """Ids of `prompt` (a string: one user message; or a list of messages) rendered by
    `template` with the generation prompt, as transformers'
    apply_chat_template(tokenize=True) gives them."""
    from ..model.chat import render_chat, template_tokens
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render_chat(template, messages, add_generation_prompt=True,
                       **template_tokens(tokenizer))
    return tokenizer.encode_chat(text)


def encode_prompts(tokenizer, cfg, prompts: Sequence[str], *,
                   chat_template: str | None = None) -> list[list[int]]:
    """Model input ids of each prompt [n_prompts][len] (see the module docstring)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a list of strings when a tokenizer is given")
    if chat_template is not None:
        rows = [chat_ids(tokenizer, chat_template, p) for p in prompts]
    elif cfg.family == "encoder_decoder":
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        rows = [tokenizer.encode(p) + eos for p in prompts]
    else:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        rows = [bos + tokenizer.encode(p) for p in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise InputError(f"prompt {i} encodes to no tokens")
    return rows


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


def generate(params, cfg, prompts, *, tokenizer=None, chat_template: str | None = None,
             eos_id=None, **kwargs):
    """`jaxlm.generate`: `jaxlm.infer.generate.generate` on token ids, or on strings
    when `tokenizer` is given.

    With a tokenizer: `prompts` are strings, encoded by `encode_prompts` (BOS for
    decoders, EOS appended for encoder-decoders; `chat_template`: each prompt one
    user message rendered with it); eos_id defaults to the tokenizer's EOS (pass a
    list for several stop ids; a tokenizer without one: rows stop at
    max_new_tokens); the output's `texts` holds each row's generated text
    (the final stop id left out), `stop` strings end a row on its text (the text
    stops before the stop string), and `stream=True` yields StreamEvents whose
    `text` is the new text of each event. Without one: exactly the ids-only call
    (`texts` is None). Every other keyword is `jaxlm.infer.generate.generate`'s.
    """
    from .generate import generate as generate_ids
    if tokenizer is None:
        if chat_template is not None:
            raise InputError("generate: chat_template needs tokenizer=")
        return generate_ids(params, cfg, prompts, eos_id=eos_id, **kwargs)
    ids = encode_prompts(tokenizer, cfg, prompts, chat_template=chat_template)
    if eos_id is None:
        eos_id = tokenizer.eos_id
    detokenize = lambda ids: decode_ids(tokenizer, ids, cfg.vocab_size)  # noqa: E731
    out = generate_ids(params, cfg, ids, eos_id=eos_id, detokenize=detokenize, **kwargs)
    if not kwargs.get("stream"):
        return out
    stop = kwargs.get("stop") or ()
    return _with_text(out, detokenize, max(map(len, [stop] if isinstance(stop, str) else stop),
                                           default=1) - 1)


def _documented(wrapper, inner):
    """`wrapper(..., **kwargs)` that passes its keywords to `inner`, given inner's
    keyword parameters in its signature and inner's docstring after its own, so that
    help() and inspect list every parameter it takes."""
    import inspect
    outer = inspect.signature(wrapper)
    own = [p for p in outer.parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in own}
    rest = [p for p in inspect.signature(inner).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name not in names]
    wrapper.__signature__ = outer.replace(parameters=own + rest)
    wrapper.__doc__ = f"{wrapper.__doc__}\n{inner.__name__}'s parameters:\n{inner.__doc__}"
    return wrapper


class TextDeltas:
    """The text one output adds as its tokens arrive: a character split over tokens
    waits for the token that completes it, and the last `hold` characters (the
    longest stop string but one) wait until they cannot be a stop string's start;
    the last push (final=the output's text) gives the rest of it.

    A character split over byte tokens decodes to one U+FFFD per byte so far (not one
    for all), so every trailing U+FFFD waits: shown, it would be replaced by the
    character later, and the text so far would no longer begin with what was sent."""

    def __init__(self, detokenize, hold: int):
        self.detokenize, self.hold = detokenize, hold
        self.ids: list = []
        self.shown = ""

    def push(self, tokens, final: Optional[str] = None, done: bool = False) -> str:
        self.ids += list(tokens)
        if done:
            text = final if final is not None else self.detokenize(self.ids)
            delta = text[len(self.shown):] if text.startswith(self.shown) else text
            self.shown = text
            return delta
        text = self.detokenize(self.ids)
        text = text.rstrip("\ufffd")
        text = text[:max(len(text) - self.hold, 0)]
        delta = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += delta
        return delta


def _with_text(events, detokenize, hold: int):
    """StreamEvents with `text` the new text each adds to its row (`TextDeltas`)."""
    rows: dict[int, TextDeltas] = {}
    for ev in events:
        d = rows.setdefault(ev.row, TextDeltas(detokenize, hold))
        yield ev._replace(text=d.push(ev.tokens, ev.text, ev.finish_reason is not None))


# ------------------------------------------------------------ a checkpoint's settings

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
    if checkpoint_kind(checkpoint) != "jaxlm":  # an HF dir, a peft adapter dir
        template = chat_template_of(checkpoint)
    else:
        from ..train.loop import read_run_config
        run = read_run_config(checkpoint)
        template = chat_template_of(checkpoint)
        if template is None and run.train.objective in ("sft", "dpo", "kto", "distill", "grpo",
                                                        "ppo"):
            template = resolve_chat_template(run.data.chat_template,
                                             run.train.init_from or checkpoint)
    if template is None:
        raise CheckpointError(f"--chat: {checkpoint} has no chat template (no chat_template in "
                              "tokenizer_config.json, no chat_template.jinja)")
    return template


def _document_generate():
    from .generate import generate as generate_ids
    _documented(generate, generate_ids)


_document_generate()
