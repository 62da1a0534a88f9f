"""`jaxlm score`: a sequence classifier's (a reward model's) scores of JSONL rows.

    jaxlm score --checkpoint runs/rm --input in.jsonl --output out.jsonl

Each input row is {"prompt", "completion"} (strings or messages, tokenized as a
reward run tokenizes its pairs: `[bos] + prompt + completion + [eos]`, or the chat
template's rendering) or {"messages": [...]} (the whole conversation, rendered with
the chat template); the output row is the input row plus "score" (num_labels 1) or
"scores" (a list of num_labels). A row longer than model.max_seq_len keeps its first
tokens (counted in the summary). Bad rows: one InputError line naming file:line.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import ConfigError, InputError

_BUCKET = 16  # rows are padded to a multiple of this: few shapes, few compiles


def score_records(params, cfg, records, tokenizer, *, template=None, batch_size: int = 16):
    """(scores [n, num_labels] float32, rows cut to model.max_seq_len) of checked
    records (`check_score_record`)."""
    from ..model.classify import classify
    from ..train.preference import tokenize_response
    from ..train.sft import chat_example
    seqs, cut = [], 0
    for r in records:
        where = r.get("where", "record")
        if "messages" in r:
            tokens, _ = chat_example(r["messages"], tokenizer, template, "all", where=where)
        else:
            tokens, _ = tokenize_response(r["prompt"], r["completion"], tokenizer, template,
                                          where=where)
        if len(tokens) > cfg.max_seq_len:
            tokens, cut = tokens[:cfg.max_seq_len], cut + 1
        seqs.append(np.asarray(tokens, np.int32))
    pad = cfg.pad_token_id if cfg.pad_token_id >= 0 else tokenizer.pad_id
    out = []
    for i in range(0, len(seqs), batch_size):
        part = seqs[i:i + batch_size]
        width = min(cfg.max_seq_len, -(-max(len(s) for s in part) // _BUCKET) * _BUCKET)
        tokens = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for j, s in enumerate(part):
            tokens[j, :len(s)], mask[j, :len(s)] = s, 1
        out.append(np.asarray(classify(params, cfg, tokens, mask))[:len(part)])
    return np.concatenate(out) if out else np.zeros((0, cfg.num_labels), np.float32), cut


def check_score_record(record) -> None:
    where = record.get("where", "record")
    if "messages" in record:
        from ..model.chat import check_messages
        check_messages(record["messages"], where, need_assistant=False)
        return
    if "prompt" not in record or "completion" not in record:
        raise InputError(f"{where}: a row to score needs \"prompt\" and \"completion\", or "
                         f"\"messages\"; got keys {sorted(k for k in record if k != 'where')}")


def run_score(checkpoint: str, input_path: str, output_path: str, batch_size: int = 16) -> str:
    """Scores `input_path`'s rows into `output_path`; returns the summary line."""
    from ..api import load
    from ..model.chat import resolve_chat_template
    from ..model.tokenizer import load_tokenizer
    from ..train.sft import _jsonl_records
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    cfg, params = load(checkpoint)
    if not cfg.num_labels:
        raise ConfigError(f"jaxlm score: {checkpoint} has no score head (model.num_labels=0): "
                          "score with a reward model (train.objective=reward) or a "
                          "*ForSequenceClassification checkpoint")
    records = list(_jsonl_records(input_path, None))
    for r in records:
        check_score_record(r)
    tokenizer = load_tokenizer(checkpoint)
    template = resolve_chat_template("", checkpoint)
    scores, cut = score_records(params, cfg, records, tokenizer, template=template,
                                batch_size=batch_size)
    tmp = output_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r, s in zip(records, scores):
            row = {k: v for k, v in r.items() if k != "where"}
            if cfg.num_labels == 1:
                row["score"] = float(s[0])
            else:
                row["scores"] = [float(x) for x in s]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, output_path)
    return (f"scored {len(records)} rows ({cut} cut to model.max_seq_len={cfg.max_seq_len}); "
            f"wrote {output_path}")
