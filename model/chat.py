"""Chat templates: a checkpoint's Jinja template, rendered as transformers renders it.

    template = chat_template_of(checkpoint_dir) or DEFAULT_CHAT_TEMPLATE
    text = render_chat(template, messages, add_generation_prompt=True, **template_tokens(tok))
    ids = tok.encode_chat(text)       # special-token strings in `text` -> their ids

The rendering matches `transformers`' `apply_chat_template(..., tokenize=False)`:
an `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}...{% endgeneration %}` block
that renders its body unchanged, the globals `raise_exception(msg)`,
`strftime_now(fmt)`, `dict`, `namespace` (no underscore names), the `tojson`
filter of `json.dumps` (no HTML escaping, `ensure_ascii=False`), and the
tokenizer config's special-token strings (`bos_token`, `eos_token`,
`unk_token`, `pad_token`) as variables. Tokenizing the rendered text adds no
bos/eos of its own (the template writes them), as `apply_chat_template` does.

The default template, for checkpoints without one, is ChatML:

    <|im_start|>{role}\\n{content}<|im_end|>\\n     for every message
    <|im_start|>assistant\\n                       with add_generation_prompt

(no system message is invented). With a tokenizer that lacks the ChatML
tokens (e.g. the sentencepiece model of `make run`) the markers are encoded as
ordinary text pieces; the format is still learnable.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import CheckpointError, ConfigError, InputError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_FILENAME = "chat_template.jinja"
_CONFIG_FILENAME = "tokenizer_config.json"


def chat_template_of(path) -> str | None:
    """The checkpoint's own chat template, or None.

    `path` is a checkpoint/tokenizer directory or a file inside one. Looks at
    `chat_template` in tokenizer_config.json (a string, or a list of
    {"name", "template"} of which "default" is used), else the file
    chat_template.jinja beside it.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        directory = directory.parent
    config_file = directory / _CONFIG_FILENAME
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{config_file} is not readable JSON ({e})") from e
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if not isinstance(named.get("default"), str):
                raise CheckpointError(f"{config_file}: chat_template is a list without a 'default' "
                                      f"template (names: {sorted(map(str, named))})")
            return named["default"]
        if template is not None:
            raise CheckpointError(f"{config_file}: chat_template should be a string or a list, "
                                  f"got {type(template).__name__}")
    jinja_file = directory / TEMPLATE_FILENAME
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {jinja_file}: {e}") from e
    return None


def resolve_chat_template(setting: str, checkpoint_dir=None) -> str:
    """The template `data.chat_template` names: "" the checkpoint's own (else the
    default), "chatml" the default, else the path of a Jinja file."""
    if setting == "":
        own = chat_template_of(checkpoint_dir) if checkpoint_dir else None
        return own if own is not None else DEFAULT_CHAT_TEMPLATE
    if setting == "chatml":
        return DEFAULT_CHAT_TEMPLATE
    path = pathlib.Path(setting).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.chat_template={setting!r}: not \"\", \"chatml\" nor a readable "
                          f"template file ({getattr(e, 'strerror', None) or e})") from e


def template_tokens(tokenizer) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": ..., ...}: the strings a template may write.

    Tokens the tokenizer does not have (bos for T5/Qwen-style) are left out,
    so the template sees them undefined (rendered as ""), as in transformers.
    """
    named = getattr(tokenizer, "special_token_strings", None)
    if named is not None:
        return dict(named)
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    return {k: tokenizer.id_to_piece(i) for k, i in ids.items() if i is not None}


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = False, bos_token: str | None = None,
                eos_token: str | None = None, **extra) -> str:
    """The conversation rendered by `template`, as `apply_chat_template(tokenize=False)`.

    `messages`: [{"role": ..., "content": ...}, ...]. Special tokens given as
    None are left undefined. A template's `raise_exception` or a Jinja error
    becomes an InputError naming the message.
    """
    compiled = _compile(template)
    variables = {"bos_token": bos_token, "eos_token": eos_token, **extra}
    variables = {k: v for k, v in variables.items() if v is not None}
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in transformers' sandbox (cached per template string)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template does not compile: {_one_line(e)}") from e


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain json.dumps (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself (as transformers)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore-prefixed attribute names (as transformers)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` -> body (transformers' assistant-mask marker)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def check_messages(messages: Any, where: str, *, need_assistant: bool) -> None:
    """InputError naming `where` unless `messages` is a non-empty list of {"role": str,
    "content": str} (with an assistant turn when `need_assistant`)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: \"messages\" should be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"{where}: message {i} should be an object with a string \"role\"")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {i} ({m['role']}) has a non-string \"content\"")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: the conversation has no assistant turn")
