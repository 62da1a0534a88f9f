"""Preference data: {"prompt", "chosen", "rejected"} -> paired batches (dpo, reward);
{"prompt", "completion", "label"} -> KTO batches (kto).

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

With `margin=True` (train.objective=reward) a pair may carry "margin" (a finite
number, default 0: TRL's RewardTrainer's margin column): `batch["chosen"]["margin"]`
holds it in every column.

KTO (`load_kto_records`, `kto_batches`): TRL's unpaired format, {"prompt",
"completion", "label": bool} (prompt and completion strings or messages, as above).
`batch["completion"]` holds prompt_i + completion_i, `batch["kl"]` the mismatched
prompt_i + completion_{i-1} of the same batch (the first row takes the last row's
completion: TRL's rotation, for the KL estimate), `batch["label"]` 1.0 / 0.0 in every
column; the loss tokens are the completion's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import math

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
    """InputError naming `record["where"]` unless {"prompt", "chosen", "rejected"} of the
    right types (and a finite number as "margin", if given)."""
    where = record.get("where", "record")
    missing = [k for k in ("prompt", *SIDES) if k not in record]
    if missing:
        hint = (" (this looks like KTO's unpaired format: train.objective=kto)"
                if "completion" in record and "label" in record else "")
        raise InputError(f"{where}: a preference record needs \"prompt\", \"chosen\" and "
                         f"\"rejected\" (missing {', '.join(missing)}){hint}")
    if "margin" in record and not _finite(record["margin"]):
        raise InputError(f"{where}: \"margin\" {record['margin']!r} is not a finite number")
    if not isinstance(record["prompt"], str):
        check_messages(record["prompt"], f"{where}: prompt", need_assistant=False)
    for side in SIDES:
        response = record[side]
        if isinstance(response, str):
            continue
        messages = [response] if isinstance(response, dict) else response
        check_messages(messages, f"{where}: {side}", need_assistant=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(value)] if isinstance(value, dict) else [dict(m) for m in value]


def tokenize_pair(record: Mapping[str, Any], tokenizer: Tokenizer, template: str | None,
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"chosen": (tokens, is_loss), "rejected": ...} of one preference record."""
    plain = all(isinstance(record[k], str) for k in ("prompt", *SIDES))
    where = record.get("where", "record")
    return {side: tokenize_response(record["prompt"], record[side], tokenizer, template,
                                    where=f"{where}: {side}", plain=plain) for side in SIDES}


def tokenize_response(prompt, response, tokenizer: Tokenizer, template: str | None, *,
                      where: str = "record", plain: bool | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss flags on the response) of a prompt and one response, each a string or
    messages: strings (`plain`, default: both are) as `[bos] + prompt + response + [eos]`,
    else rendered with the chat template. What a reward model scores (`jaxlm score`)."""
    if plain is None:
        plain = isinstance(prompt, str) and isinstance(response, str)
    if plain:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        return prompt_completion_example(
            bos + tokenizer.encode(prompt),
            tokenizer.encode(response) + [_require_eos(tokenizer, "dpo")])
    messages = _as_messages(prompt, "user")
    return chat_example(messages + _as_messages(response, "assistant"), tokenizer, template,
                        where=where, loss_from=len(messages))


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


def tokenize_pairs(records, tokenizer, template, seq_len, margin: bool = False):
    """Rows {"chosen": row, "rejected": row} of the records, and their stats ("identical":
    the kept pairs whose chosen and rejected tokens are the same, which DPO learns
    nothing from). `margin`: the chosen row has "margin" too (the record's, else 0)."""
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
        pair = {side: _row(*sides[side], seq_len, tokenizer.pad_id) for side in SIDES}
        if margin:
            pair["chosen"]["margin"] = np.full(seq_len, record.get("margin", 0.0), np.float32)
        pairs.append(pair)
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


def _pairs_or_raise(records, tokenizer, template, seq_len, process_index, process_count,
                    margin=False):
    shard = _shard(records, process_index, process_count)
    pairs, stats = tokenize_pairs(shard, tokenizer, template, seq_len, margin)
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
                num_threads: int = 2, margin: bool = False) -> SFTBatches:
    """Training batches {"chosen": {...}, "rejected": {...}} of `[batch_size, seq_len]` arrays.

    Pairs are shuffled with `seed` each epoch and repeat forever
    (`num_epochs=None`); `get_state()/set_state()` resume exactly; `stats`.
    `margin`: the chosen rows carry each pair's "margin" (train.objective=reward).
    """
    _check_shapes(seq_len, batch_size)
    pairs, stats = _pairs_or_raise(records, tokenizer, template, seq_len, process_index,
                                   process_count, margin)
    flat = [{f"{s}_{k}": v for s in SIDES for k, v in p[s].items()} for p in pairs]
    return row_batches("reward" if margin else "dpo", pairs, _stack_pairs, flat, stats,
                       seq_len=seq_len,
                       batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       num_threads=num_threads)


def dpo_eval_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                     template: str | None = None, seq_len: int, batch_size: int,
                     num_batches: int, process_index: int = 0,
                     process_count: int = 1, margin: bool = False,
                     ) -> list[dict[str, dict[str, np.ndarray]]]:
    """A fixed list of at most `num_batches` eval batches (evenly spaced pairs, in order)."""
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    pairs, _ = _pairs_or_raise(records, tokenizer, template, seq_len, process_index, process_count,
                               margin)
    return fixed_batches(pairs, batch_size, num_batches)


# ---------------------------------------------------------------- KTO


def load_kto_records(source: str | Sequence[str], *,
                     max_records: int | None = None) -> list[dict]:
    """Checked KTO records of `.jsonl` files (paths/globs as train/sft.py's)."""
    records = list(_jsonl_records(source, max_records))
    for r in records:
        check_kto_record(r)
    return records


def check_kto_record(record: Mapping[str, Any]) -> None:
    """InputError naming `record["where"]` unless {"prompt", "completion", "label": bool}
    of the right types."""
    where = record.get("where", "record")
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        hint = (" (this looks like a preference pair: train.objective=dpo or reward)"
                if all(k in record for k in SIDES) else "")
        raise InputError(f"{where}: a KTO record needs \"prompt\", \"completion\" and "
                         f"\"label\" (true: desirable, false: undesirable; missing "
                         f"{', '.join(missing)}){hint}")
    if not isinstance(record["label"], bool):
        raise InputError(f"{where}: \"label\" {record['label']!r} is not true or false")
    if not isinstance(record["prompt"], str):
        check_messages(record["prompt"], f"{where}: prompt", need_assistant=False)
    completion = record["completion"]
    if not isinstance(completion, str):
        messages = [completion] if isinstance(completion, dict) else completion
        check_messages(messages, f"{where}: completion", need_assistant=True)


def tokenize_kto(record: Mapping[str, Any], tokenizer: Tokenizer, template: str | None,
                 ) -> dict[str, np.ndarray]:
    """{"prompt": ids, "completion": ids, "loss": completion loss flags, "label"} of one
    record: the completion's tokens follow the prompt's (chat: the generation prompt's)."""
    where = record.get("where", "record")
    if isinstance(record["prompt"], str) and isinstance(record["completion"], str):
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompt = bos + tokenizer.encode(record["prompt"])
        completion = tokenizer.encode(record["completion"]) + [_require_eos(tokenizer, "kto")]
        tokens, is_loss = prompt_completion_example(prompt, completion)
        split = len(prompt)
    else:
        prompt = _as_messages(record["prompt"], "user")
        messages = prompt + _as_messages(record["completion"], "assistant")
        tokens, is_loss = chat_example(messages, tokenizer, template, where=f"{where}: completion",
                                       loss_from=len(prompt))
        split = int(np.argmax(is_loss)) if is_loss.any() else len(tokens)
    return {"prompt": tokens[:split], "completion": tokens[split:],
            "loss": is_loss[split:].astype(np.int32),
            "label": np.asarray(float(record["label"]), np.float32)}


def _kto_row(prompt, completion, loss, seq_len, pad_id):
    tokens = np.concatenate([prompt, completion])[:seq_len]
    is_loss = np.concatenate([np.zeros(len(prompt), np.int32), loss])[:seq_len]
    return _row(tokens, is_loss, seq_len, pad_id)


def _kto_stack(pad_id: int, seq_len: int):
    """stack(items, batch_size) -> {"completion", "kl", "label"}: the rows of a batch, each
    with the completion of the row before it (the first: the last's) as its KL row."""
    def stack(items, batch_size):
        rows = [_kto_row(it["prompt"], it["completion"], it["loss"], seq_len, pad_id)
                for it in items]
        kl = [_kto_row(it["prompt"], prev["completion"], prev["loss"], seq_len, pad_id)
              for it, prev in zip(items, items[-1:] + items[:-1])]
        pad = lambda a: np.pad(a, ((0, batch_size - len(items)), (0, 0)))  # noqa: E731
        out = {name: {k: pad(np.stack([r[k] for r in part])) for k in part[0]}
               for name, part in (("completion", rows), ("kl", kl))}
        out["label"] = pad(np.stack([np.full(seq_len, it["label"], np.float32) for it in items]))
        return out
    return stack


def _kto_items(records, tokenizer, template, seq_len, process_index, process_count, least=2):
    items, truncated, dropped = [], 0, 0
    for record in _shard(records, process_index, process_count):
        item = tokenize_kto(record, tokenizer, template)
        room = seq_len - len(item["prompt"])
        if len(item["prompt"]) + len(item["completion"]) > seq_len:
            truncated += 1
        if room < 1 or not item["loss"][:room].any():
            dropped += 1
            continue
        items.append(item)
    stats = {"examples": len(items), "truncated": truncated, "dropped": dropped,
             "desirable": int(sum(it["label"] > 0 for it in items))}
    if len(items) < least:
        raise InputError(f"KTO needs {least} or more records with completion tokens within "
                         f"seq_len={seq_len} (got {len(items)}; {dropped} dropped): its KL "
                         "estimate pairs each prompt with another record's completion")
    return items, stats


def kto_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                template: str | None = None, seq_len: int, batch_size: int, seed: int,
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                num_threads: int = 2) -> SFTBatches:
    """Training batches {"completion", "kl", "label"} of `[batch_size, seq_len]` arrays,
    shuffled and resumable as `dpo_batches`'. batch_size must be 2 or more (TRL's rule:
    with one row the KL estimate is the row's own reward)."""
    _check_shapes(seq_len, batch_size)
    if batch_size < 2:
        raise ConfigError(f"train.objective=kto needs data.batch_size >= 2 per process (got "
                          f"{batch_size}): its KL estimate pairs each prompt with another "
                          "row's completion")
    items, stats = _kto_items(records, tokenizer, template, seq_len, process_index, process_count)
    return row_batches("kto", items, _kto_stack(tokenizer.pad_id, seq_len), items, stats,
                       seq_len=seq_len, batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                       process_index=process_index, process_count=process_count,
                       num_threads=num_threads)


def kto_eval_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                     template: str | None = None, seq_len: int, batch_size: int,
                     num_batches: int, process_index: int = 0, process_count: int = 1) -> list:
    """A fixed list of at most `num_batches` eval batches (evenly spaced records, in order)."""
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    items, _ = _kto_items(records, tokenizer, template, seq_len, process_index, process_count,
                          least=1)
    wanted = num_batches * batch_size
    if len(items) > wanted:
        items = [items[i] for i in np.linspace(0, len(items) - 1, wanted).round().astype(int)]
    stack = _kto_stack(tokenizer.pad_id, seq_len)
    return [stack(items[i:i + batch_size], batch_size) for i in range(0, len(items), batch_size)]
