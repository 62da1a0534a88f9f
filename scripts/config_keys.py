"""`jaxlm config`: every config key with its type, default (or, with --config, the
resolved value) and meaning. The meanings are the comments at the fields of the config
dataclasses (config.py, model/config.py), read by `jaxlm.config.field_docs`."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import yaml

DEFAULT_WIDTH = 12  # a longer value runs over its column; the meaning goes to the next line


def run_config(args) -> int:
    from ..config import describe_keys, load_config, refuse_repeated_keys, select_keys
    names = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    refuse_repeated_keys(overrides)
    cfg = load_config(args.config, overrides) if args.config or overrides else None
    docs = select_keys(describe_keys(cfg), names)
    if args.json:
        print(json.dumps([d._asdict() for d in docs], indent=1))
    else:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print("\n".join(format_keys(docs, "value" if cfg is not None else "default", width)))
    return 0


def yaml_text(value) -> str:
    """A value as it is written in YAML or a `key=value` override."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False,
                          width=float("inf"))
    return text.removesuffix("\n...\n").strip()


def format_keys(docs, value_title: str = "default", width: int | None = None) -> list[str]:
    """Aligned columns: key, type, value, meaning; a blank line between top-level
    sections. `width`: wrap the meanings to it (a terminal); None: one line per key."""
    rows = [(d.key, d.type, yaml_text(d.value if value_title == "value" else d.default),
             d.meaning) for d in docs]
    kw = max([len("key")] + [len(r[0]) for r in rows])
    tw = max([len("type")] + [len(r[1]) for r in rows])
    vw = min(DEFAULT_WIDTH, max([len(value_title)] + [len(r[2]) for r in rows]))
    col = kw + tw + vw + 6
    room = None if width is None else width - col
    lines, section = [f"{'key':<{kw}}  {'type':<{tw}}  {value_title:<{vw}}  meaning"], None
    for key, typ, value, meaning in rows:
        top = key.split(".")[0] if "." in key else ""
        if section is not None and top != section:
            lines.append("")
        section = top
        head = f"{key:<{kw}}  {typ:<{tw}}  {value:<{vw}}"
        if room is None:
            lines.append(f"{head}  {meaning}" if len(value) <= vw else f"{head}\n{'':{col}}{meaning}")
            continue
        indent = col if room >= 30 else 4
        parts = textwrap.wrap(meaning, max(20, width - indent)) or [""]
        if len(value) <= vw and indent == col:
            lines.append(f"{head}  {parts.pop(0)}")
        else:
            lines.append(head)
        lines += [" " * indent + p for p in parts]
    return [line.rstrip() for line in lines]
