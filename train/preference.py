"""Preference (DPO) data: {"prompt", "chosen", "rejected"} -> paired batches.

    records = load_preference_records("prefs.jsonl")
    train, held_out = split_records(records, 0.02, seed=0)
    batches = dpo_batches(train, tok, template=..., seq_len=256, batch_size=8, seed=0)
    batch = next(batches)   # {"chosen": {...}, "rejected": {...}}

Each of "prompt", "chosen", "rejected" is a string or messages: prompt a list
of messages, chosen/rejected an assistant message or a list of messages.
String prompt and responses: `[bos] + encode(prompt) + encode(response) + [eos]`,
loss on the response and eos. Otherwise the prompt messages (a string prompt
becomes one user message; a string response one assistant message) followed
by the response messages are rendered with the chat template, and the loss
covers the response's assistant turns (found as in train/sft.py).

`batch["chosen"]` and `batch["rejected"]` each hold the five arrays of a
pretraining batch, `[batch, seq_len]`, one example per row (segment 1, then
padding with segment 0). `loss_mask[t]` marks `targets[t]` as a response
token, so a row's sequence log-prob is `sum(token_logprob(targets) * loss_mask)`.
Row r of both is the same pair. A response longer than the row is cut to
`seq_len` tokens (keeping the beginning) and counted in `stats["truncated"]`;
a pair with no response token left on either side is dropped
(`stats["dropped"]`). Iterator state, eval batches and process sharding are
as in train/sft.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from ..model.chat import check_messages
from ..model.tokenizer import require_eos as _require_eos
from ..model.tokenizer import Tokenizer
from .data import _check_shapes
from .sft import (SFTBatches, _jsonl_records, _shard, chat_example, finish_rows,
                  fixed_batches, prompt_completion_example, row_batches)

SIDES = ("chosen", "rejected")


def load_preference_records(source: str | Sequence[str], *,
                            max_records: int | None = None) -> list[dict]:
    """Checked preference records of `.jsonl` files (paths/globs as train/sft.py's)."""
    records = list(_jsonl_records(source, max_records))
    for r in records:
        check_preference_record(r)
    return records


def check_preference_record(record: Mapping[str, Any]) -> None:
    """InputError naming `record["where"]` unless {"prompt", "chosen", "rejected"} of the right types."""
    where = record.get("where", "record")
    missing = [k for k in ("prompt", *SIDES) if k not in record]
    if missing:
        raise InputError(f"{where}: a preference record needs \"prompt\", \"chosen\" and "
                         f"\"rejected\" (missing {', '.join(missing)})")
    if not isinstance(record["prompt"], str):
        check_messages(record["prompt"], f"{where}: prompt", need_assistant=False)
    for side in SIDES:
        response = record[side]
        if isinstance(response, str):
            continue
        messages = [response] if isinstance(response, dict) else response
        check_messages(messages, f"{where}: {side}", need_assistant=True)


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(value)] if isinstance(value, dict) else [dict(m) for m in value]


def tokenize_pair(record: Mapping[str, Any], tokenizer: Tokenizer, template: str | None,
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"chosen": (tokens, is_loss), "rejected": ...} of one preference record."""
    where = record.get("where", "record")
    plain = all(isinstance(record[k], str) for k in ("prompt", *SIDES))
    out = {}
    if plain:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompt = bos + tokenizer.encode(record["prompt"])
        for side in SIDES:
            out[side] = prompt_completion_example(
                prompt, tokenizer.encode(record[side]) + [_require_eos(tokenizer, "dpo")])
        return out
    prompt = _as_messages(record["prompt"], "user")
    for side in SIDES:
        messages = prompt + _as_messages(record[side], "assistant")
        out[side] = chat_example(messages, tokenizer, template, where=f"{where}: {side}",
                                 loss_from=len(prompt))
    return out


def _row(tokens: np.ndarray, is_loss: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example as a `[seq_len]` row of the five arrays (segment 1, then padding)."""
    n = len(tokens)
    padded = np.full((1, seq_len), pad_id, dtype=np.int32)
    padded[0, :n] = tokens
    loss = np.zeros((1, seq_len), dtype=np.int32)
    loss[0, :n] = is_loss
    segments = np.zeros((1, seq_len), dtype=np.int32)
    segments[0, :n] = 1
    positions = np.zeros((1, seq_len), dtype=np.int32)
    positions[0, :n] = np.arange(n)
    return {k: v[0] for k, v in finish_rows(padded, loss, segments, positions, pad_id).items()}


def tokenize_pairs(records, tokenizer, template, seq_len):
    """Rows {"chosen": row, "rejected": row} of the records, and their stats ("identical":
    the kept pairs whose chosen and rejected tokens are the same, which DPO learns
    nothing from)."""
    pairs, truncated, dropped, identical = [], 0, 0, 0
    for record in records:
        sides = tokenize_pair(record, tokenizer, template)
        cut = False
        for side, (tokens, is_loss) in sides.items():
            if len(tokens) > seq_len:
                sides[side], cut = (tokens[:seq_len], is_loss[:seq_len]), True
        truncated += cut
        if not all(is_loss[1:].any() for _, is_loss in sides.values()):
            dropped += 1
            continue
        identical += np.array_equal(sides["chosen"][0], sides["rejected"][0])
        pairs.append({side: _row(*sides[side], seq_len, tokenizer.pad_id) for side in SIDES})
    return pairs, {"examples": len(pairs), "truncated": truncated, "dropped": dropped,
                   "identical": identical}


def _stack_pairs(rows: Sequence[dict], batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Stacks pair rows; a short final batch gets empty rows (segment 0, loss_mask 0)."""
    out = {}
    for side in SIDES:
        out[side] = {}
        for key in rows[0][side]:
            a = np.stack([r[side][key] for r in rows])
            out[side][key] = np.pad(a, ((0, batch_size - len(rows)), (0, 0)))
    return out


def _pairs_or_raise(records, tokenizer, template, seq_len, process_index, process_count):
    shard = _shard(records, process_index, process_count)
    pairs, stats = tokenize_pairs(shard, tokenizer, template, seq_len)
    if not pairs:
        raise InputError(f"no preference pairs with response tokens within seq_len={seq_len} "
                         f"({stats['dropped']} dropped)")
    if stats["identical"] == len(pairs):
        raise InputError(f"every preference pair ({len(pairs)}) has the same tokens as chosen "
                         "and as rejected: a preference loss learns nothing from them")
    return pairs, stats


def dpo_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                template: str | None = None, seq_len: int, batch_size: int, seed: int,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                num_threads: int = 2) -> SFTBatches:
    """Training batches {"chosen": {...}, "rejected": {...}} of `[batch_size, seq_len]` arrays.

    Pairs are shuffled with `seed` each epoch and repeat forever
    (`num_epochs=None`); `get_state()/set_state()` resume exactly; `stats`.
    """
    _check_shapes(seq_len, batch_size)
    pairs, stats = _pairs_or_raise(records, tokenizer, template, seq_len, process_index,
                                   process_count)
    flat = [{f"{s}_{k}": v for s in SIDES for k, v in p[s].items()} for p in pairs]
    return row_batches("dpo", pairs, _stack_pairs, flat, stats, seq_len=seq_len,
                       batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       num_threads=num_threads)


def dpo_eval_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                     template: str | None = None, seq_len: int, batch_size: int,
                     num_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict[str, dict[str, np.ndarray]]]:
    """A fixed list of at most `num_batches` eval batches (evenly spaced pairs, in order)."""
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    pairs, _ = _pairs_or_raise(records, tokenizer, template, seq_len, process_index, process_count)
    return fixed_batches(pairs, batch_size, num_batches)
