"""Sequence-classification data: labelled JSONL records -> one example per row -> batches.

    records = load_classify_records("train.jsonl", num_labels=3)
    train, held_out = split_records(records, 0.02, seed=0)
    batches = classify_batches(train, tok, seq_len=256, batch_size=8, seed=0)
    batch = next(batches)   # tokens, positions, segment_ids, labels: [batch, seq_len]

A record is one JSON line, `{"text": str, "label": ...}` or `{"messages": [...],
"label": ...}` (rendered with the chat template, no generation prompt: a reward
model scores the whole conversation). The label is a class id in [0,
model.num_labels) or one of model.label_names (HF's id2label names); with
model.num_labels = 1 (a regression, HF's problem_type "regression") any finite
number. Anything else is an InputError naming the file and line.

A text is encoded as transformers' `tokenizer(text)` encodes it
(`encode(text, add_special_tokens=True)`: BERT's [CLS] ... [SEP], Llama's BOS). Each example is one row (segment 1, then
padding: segment 0, the tokenizer's pad id), cut to `seq_len` tokens keeping the
beginning (`stats["truncated"]`); an example without a token is dropped
(`stats["dropped"]`). `labels` holds the row's label in every column (float32; a
padding row: 0), so that every batch leaf is [batch, seq] and shards alike. The model
pools each row at the position HF pools (`jaxlm.model.layers.score.pool_positions`,
padding excluded) and the loss (train/objectives.py `classification_loss`) is the
cross-entropy over labels, or the squared error of a regression, per labelled row.
Iterator state, eval batches and process sharding are as in train/sft.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from ..model.chat import check_messages
from ..model.tokenizer import Tokenizer
from .data import _check_shapes
from .sft import (SFTBatches, _jsonl_records, _shard, chat_example, fixed_batches,
                  row_batches)


def load_classify_records(source: str | Sequence[str], num_labels: int,
                          label_names: Sequence[str] = (), *,
                          max_records: int | None = None) -> list[dict]:
    """Checked records of `.jsonl` files (paths/globs as train/sft.py's), each with its
    "label" as a float (a class id, or a regression target)."""
    return [{**r, "label": check_classify_record(r, num_labels, label_names)}
            for r in _jsonl_records(source, max_records)]


def check_classify_record(record: Mapping[str, Any], num_labels: int,
                          label_names: Sequence[str] = ()) -> float:
    """The record's label as a float, or an InputError naming `record["where"]`."""
    where = record.get("where", "record")
    if "messages" in record:
        check_messages(record["messages"], where, need_assistant=False)
    elif not isinstance(record.get("text"), str):
        raise InputError(f"{where}: a classify record needs \"text\" (a string) or "
                         f"\"messages\", and \"label\"; got keys "
                         f"{sorted(k for k in record if k != 'where')}")
    if "label" not in record:
        raise InputError(f"{where}: a classify record needs \"label\" (a class id in "
                         f"[0, {num_labels})" + (")" if num_labels > 1 else " or a number)"))
    label = record["label"]
    if num_labels == 1:  # regression
        if isinstance(label, bool) or not isinstance(label, (int, float)) \
                or not math.isfinite(label):
            raise InputError(f"{where}: label {label!r} is not a finite number "
                             "(model.num_labels=1: a regression)")
        return float(label)
    names = list(label_names) or [f"LABEL_{i}" for i in range(num_labels)]
    if isinstance(label, str) and label in names:
        return float(names.index(label))
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
        raise InputError(f"{where}: label {label!r} is not a class id in [0, {num_labels}) "
                         f"(model.num_labels={num_labels}) nor one of the label names "
                         f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    return float(label)


def tokenize_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
                      template: str | None, seq_len: int) -> tuple[list[dict], dict[str, int]]:
    """Rows {"tokens", "positions", "segment_ids", "labels"} ([seq_len] each) and stats."""
    rows, truncated, dropped = [], 0, 0
    for record in records:
        if "messages" in record:
            tokens, _ = chat_example(record["messages"], tokenizer, template, "all",
                                     where=record.get("where", "record"))
        else:
            tokens = tokenizer.encode(record["text"], add_special_tokens=True)
        if len(tokens) > seq_len:
            tokens, truncated = tokens[:seq_len], truncated + 1
        if not len(tokens):
            dropped += 1
            continue
        rows.append(_row(np.asarray(tokens, np.int32), record["label"], seq_len,
                         tokenizer.pad_id))
    return rows, {"examples": len(rows), "truncated": truncated, "dropped": dropped}


def _row(tokens: np.ndarray, label: float, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(tokens)
    row = {"tokens": np.full(seq_len, pad_id, np.int32), "positions": np.zeros(seq_len, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32),
           "labels": np.full(seq_len, label, np.float32)}
    row["tokens"][:n], row["positions"][:n], row["segment_ids"][:n] = tokens, np.arange(n), 1
    return row


def _stack(rows: Sequence[dict], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows; a short final batch gets empty rows (segment 0: no example)."""
    return {k: np.pad(np.stack([r[k] for r in rows]), ((0, batch_size - len(rows)), (0, 0)))
            for k in rows[0]}


def _rows_or_raise(records, tokenizer, template, seq_len, process_index, process_count):
    rows, stats = tokenize_examples(_shard(records, process_index, process_count), tokenizer,
                                    template, seq_len)
    if not rows:
        raise InputError(f"no classify examples with a token ({stats['dropped']} dropped)")
    return rows, stats


def classify_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                     template: str | None = None, seq_len: int, batch_size: int, seed: int,
                     num_epochs: int | None = None, process_index: int = 0,
                     process_count: int = 1, num_threads: int = 2) -> SFTBatches:
    """Training batches of `[batch_size, seq_len]` arrays, one example per row.

    Examples are shuffled with `seed` each epoch and repeat forever
    (`num_epochs=None`); `get_state()/set_state()` resume exactly; `stats`.
    """
    _check_shapes(seq_len, batch_size)
    rows, stats = _rows_or_raise(records, tokenizer, template, seq_len, process_index,
                                 process_count)
    return row_batches("classify", rows, _stack, rows, stats, seq_len=seq_len,
                       batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       num_threads=num_threads)


def classify_eval_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                          template: str | None = None, seq_len: int, batch_size: int,
                          num_batches: int, process_index: int = 0,
                          process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """A fixed list of at most `num_batches` eval batches (evenly spaced examples, in order)."""
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    rows, _ = _rows_or_raise(records, tokenizer, template, seq_len, process_index, process_count)
    return fixed_batches(rows, batch_size, num_batches)
