"""What travels with a checkpoint's weights: its tokenizer files, its chat template,
`generation_config.json` (every EOS id and the decoding defaults) and the special-token
ids that an exported `config.json` names.

Every run started from a checkpoint copies them into its run dir, and every export
carries them (`jaxlm convert --to hf` / `--to peft`, `jaxlm quantize`,
`jaxlm.save(..., companions=DIR)`), so that a model loaded elsewhere (transformers,
peft, another jaxlm command) encodes, renders chats and stops where it did here.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from ..errors import CheckpointError

# the files copied as they are (whichever of them the source has)
FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
GENERATION_CONFIG = "generation_config.json"


def copy_companions(src, dst) -> list[str]:
    """Copies each of FILES that the checkpoint dir `src` has and `dst` lacks; returns
    their names. A `src` that is a file (a tokenizer.model) names its directory."""
    folder = os.fspath(src)
    folder = folder if os.path.isdir(folder) else os.path.dirname(folder)
    if os.path.abspath(folder) == os.path.abspath(os.fspath(dst)):
        return []
    copied = []
    for name in FILES:
        s, d = os.path.join(folder, name), os.path.join(os.fspath(dst), name)
        if os.path.isfile(s) and not os.path.exists(d):
            shutil.copyfile(s, d)
            copied.append(name)
    return copied


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


def generation_config(src, tokenizer, generate=None) -> dict:
    """The generation_config.json an export of the checkpoint dir `src` carries: the
    one it has, else one built from the tokenizer's special ids and `generate` (a
    run's GenerateConfig: its decoding settings, as transformers names them)."""
    if os.path.isfile(os.path.join(os.fspath(src), GENERATION_CONFIG)):
        return read_generation_config(src)
    out = {k: v for k, v in special_token_ids({}, tokenizer).items() if v is not None}
    if generate is not None:
        sample = generate.temperature > 0
        out["do_sample"] = sample
        if sample:
            out.update(temperature=generate.temperature, top_k=generate.top_k,
                       top_p=generate.top_p)
        if generate.repetition_penalty != 1.0:
            out["repetition_penalty"] = generate.repetition_penalty
        out["max_new_tokens"] = generate.max_new_tokens
    return out


def special_token_ids(gen: dict, tokenizer) -> dict:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} for an exported config.json:
    generation_config.json's EOS ids (all of them) first, else the tokenizer's."""
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_id
    return {"bos_token_id": gen.get("bos_token_id", tokenizer.bos_id),
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", getattr(tokenizer, "pad_id", None))}
