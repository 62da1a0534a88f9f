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
tokenizer's EOS; `decoder_start_token_id` from it or config.json (T5: 0).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple, Optional, Sequence

from jaxlm.errors import CheckpointError, InputError

GENERATION_CONFIG = "generation_config.json"


class GenerationSettings(NamedTuple):
    """What a checkpoint says about generating from it (None: it does not say)."""
    eos_ids: tuple  # the ids that end a row (never empty: at least the tokenizer's EOS)
    decoder_start_id: Optional[int]  # encoder-decoders' first decoder input (T5: 0)


def _ids(value, key: str, path) -> tuple:
    """An id or a list of ids of a generation_config.json field, as a tuple."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{path}: {key} should be a token id or a list of ids, got {value!r}")
    return tuple(values)


def read_generation_config(directory) -> dict:
    """`generation_config.json` of a checkpoint dir as a dict ({} when there is none)."""
    path = pathlib.Path(os.fspath(directory)) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def generation_settings(directory, tokenizer) -> GenerationSettings:
    """The stop ids and decoder start of a checkpoint dir: generation_config.json first,
    then config.json (an HF dir's; the decoder start only), then the tokenizer's EOS.

    The BOS is the tokenizer's alone (as transformers' tokenizer adds it): config
    files name a bos_token_id even where the tokenizer adds none (Qwen)."""
    directory = pathlib.Path(os.fspath(directory))
    gen = read_generation_config(directory)
    config = {}
    if (directory / "config.json").is_file() and not (directory / "config.yaml").is_file():
        from jaxlm.model.hf.io import read_config
        config = read_config(directory)
    where = directory / GENERATION_CONFIG

    def first(key):
        for source, at in ((gen, where), (config, directory / "config.json")):
            got = _ids(source.get(key), key, at)
            if got:
                return got
        return ()

    eos = _ids(gen.get("eos_token_id"), "eos_token_id", where) or (tokenizer.eos_id,)
    return GenerationSettings(eos_ids=eos,
                              decoder_start_id=(first("decoder_start_token_id") or (None,))[0])


def chat_ids(tokenizer, template: str, prompt: str) -> list[int]:
    """Ids of `prompt` as one user message rendered by `template` with the generation
    prompt, as transformers' apply_chat_template(tokenize=True) gives them."""
    from jaxlm.model.chat import render_chat, template_tokens
    text = render_chat(template, [{"role": "user", "content": prompt}],
                       add_generation_prompt=True, **template_tokens(tokenizer))
    return tokenizer.encode_chat(text)


def encode_prompts(tokenizer, cfg, prompts: Sequence[str], *,
                   chat_template: str | None = None) -> list[list[int]]:
    """Model input ids of each prompt [n_prompts][len] (see the module docstring)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be a list of strings when a tokenizer is given")
    if chat_template is not None:
        rows = [chat_ids(tokenizer, chat_template, p) for p in prompts]
    elif cfg.family == "encoder_decoder":
        rows = [tokenizer.encode(p) + [tokenizer.eos_id] for p in prompts]
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
    list for several stop ids); the output's `texts` holds each row's generated text
    (the final stop id left out). Without one: exactly the ids-only call
    (`texts` is None). Every other keyword is `jaxlm.infer.generate.generate`'s.
    """
    from jaxlm.infer.generate import generate as generate_ids
    if tokenizer is None:
        if chat_template is not None:
            raise InputError("generate: chat_template needs tokenizer=")
        return generate_ids(params, cfg, prompts, eos_id=eos_id, **kwargs)
    ids = encode_prompts(tokenizer, cfg, prompts, chat_template=chat_template)
    if eos_id is None:
        eos_id = tokenizer.eos_id
    out = generate_ids(params, cfg, ids, eos_id=eos_id, **kwargs)
    return out._replace(texts=[decode_ids(tokenizer, s, cfg.vocab_size) for s in out.sequences()])

