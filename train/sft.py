"""Supervised fine-tuning data: records -> tokenized examples -> packed rows -> batches.

    records = load_sft_records("data/*.jsonl")          # or "stdlib-sft"
    train, held_out = split_records(records, eval_fraction=0.02, seed=0)
    batches = sft_batches(train, tok, template=..., seq_len=128, batch_size=8, seed=0)
    evals = sft_eval_batches(held_out, tok, template=..., seq_len=128, batch_size=8,
                             num_batches=4)

A record is one JSON line: `{"prompt": str, "completion": str}`,
`{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI / HF chat format), or
TRL's conversational prompt/completion `{"prompt": [messages], "completion":
[messages]}` (rendered as the messages prompt + completion; loss tokens: the
completion's assistant turns only, as TRL's completion-only loss).

Tokenization (eager, once per process, so truncations are counted exactly):
  - prompt/completion: `[bos] + encode(prompt) + encode(completion) + [eos]`;
    loss tokens: the completion's and the final eos (`loss_on="completion"`),
    or all of them (`loss_on="all"`).
  - messages: the chat template's rendering, `tok.encode_chat`-ed (the
    template writes bos/eos itself); loss tokens: each assistant turn's, end
    of turn included, found MaxText's way: the tokens between the rendering of
    the turns before it with the generation prompt and the rendering through
    it (each must be a token prefix of the next, else InputError).

Packing: grain's first-fit packing (`FirstFitPackIterDataset`, bins filled in
order, `batch_size` bins at a time): several examples per row of `seq_len`,
never one split over two rows; an example longer than a row keeps its first
`seq_len` tokens and is counted in `stats["truncated"]`; one left without a
loss token is dropped (`stats["dropped"]`). Batches have the keys and dtypes
of the pretraining batches (`train/data.py`), `[batch, seq_len]`: segment ids
number a row's examples 1, 2, ... (0: padding), positions restart at 0,
`targets[t]` is the next token of the same example and `loss_mask[t]` is 1
exactly when that next token is a loss token, so the causal-LM loss (NLL
summed over loss_mask / its count) is the SFT loss.

The default set `stdlib-sft` is derived from the Python standard library at
run time (`stdlib_sft_records`): for each function with a docstring, prompt =
its `def` line through the docstring, completion = the rest of its body.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import pathlib
import re
import sysconfig
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ..errors import ConfigError, InputError
from ..model.chat import DEFAULT_CHAT_TEMPLATE, check_messages, render_chat, template_tokens
from ..model.tokenizer import require_eos as _require_eos
from ..model.tokenizer import Tokenizer
from .data import BatchIterator, _EpochShuffle, _check_shapes, split_documents, stdlib_sources

STDLIB_SFT = "stdlib-sft"
LOSS_ON = ("completion", "all")
_PREFETCH_BUFFER = 64


# ---------------------------------------------------------------- records


def load_sft_records(source: str | Sequence[str], *, max_records: int | None = None,
                     seq_len: int | None = None) -> list[dict]:
    """Records of `.jsonl` files, in file then line order; or the `stdlib-sft` set.

    `source`: a path, a glob, several of them comma-separated or as a list,
    or "stdlib-sft". Every record is checked (`check_sft_record`) and carries
    "where" ("file:line") for later error messages. `seq_len` sizes the
    stdlib-sft functions to the rows (`stdlib_sft_limits`).
    """
    if source == STDLIB_SFT:
        return stdlib_sft_records(max_records=max_records or 20_000, **stdlib_sft_limits(seq_len))
    records = [r for r in _jsonl_records(source, max_records)]
    for r in records:
        check_sft_record(r)
    return records


def check_sft_record(record: Mapping[str, Any]) -> None:
    """InputError (naming `record["where"]`) unless a prompt/completion or messages record."""
    where = record.get("where", "record")
    if "messages" in record:
        check_messages(record["messages"], where, need_assistant=True)
    elif "prompt" in record and "completion" in record:
        if isinstance(record["prompt"], list) or isinstance(record["completion"], list):
            # TRL's conversational prompt/completion: two lists of messages
            check_messages(record["prompt"], f"{where}: prompt", need_assistant=False)
            check_messages(record["completion"], f"{where}: completion", need_assistant=True)
            return
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise InputError(f"{where}: \"{key}\" is not a string")
    else:
        raise InputError(f"{where}: expected {{\"prompt\", \"completion\"}} or {{\"messages\"}}, "
                         f"got keys {sorted(k for k in record if k != 'where')}")


def source_files(source: str | Sequence[str]) -> list[pathlib.Path]:
    """The files a source names: paths and globs, comma-separated or a list, in that order."""
    parts = source.split(",") if isinstance(source, str) else list(source)
    files: list[pathlib.Path] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if glob.has_magic(part):
            matches = sorted(glob.glob(str(pathlib.Path(part).expanduser()), recursive=True))
            if not matches:
                raise InputError(f"no file matches {part}")
            files += [pathlib.Path(m) for m in matches]
        else:
            path = pathlib.Path(part).expanduser()
            if not path.is_file():
                raise InputError(f"data file not found: {part}")
            files.append(path)
    if not files:
        raise InputError(f"no data files in {source!r}")
    return files


def _jsonl_records(source, max_records: int | None):
    """{...json object..., "where": "file:line"} for each non-blank line."""
    count = 0
    for path in source_files(source):
        try:
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {path} as utf-8 text: {e}") from e
        for number, line in enumerate(lines, 1):
            if max_records is not None and count >= max_records:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            count += 1
            yield {**record, "where": f"{path}:{number}"}


def split_records(records: Sequence[dict], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Disjoint (train, eval) records chosen with `seed` (as `split_documents`)."""
    return split_documents(records, eval_fraction, seed)


# ---------------------------------------------------------------- stdlib set


_TEST_DIRS = {"test", "tests", "idle_test"}
_CHARS_PER_TOKEN = 3  # stdlib source with the 4096-piece `make run` tokenizer: 3.0


def stdlib_sft_limits(seq_len: int | None) -> dict[str, int]:
    """Function size caps that mostly fit rows of `seq_len` tokens (default: 128).

    About 3 characters a token: with the 4096-piece `make run` tokenizer,
    seq_len 128 gives 1,827 functions (median 83 tokens, 5% cut), seq_len 256
    gives 3,331 (median 117 tokens, 2% cut); parsing the stdlib takes ~15-40 s.
    """
    max_chars = max(120, _CHARS_PER_TOKEN * (seq_len or 128))
    return {"max_chars": max_chars, "max_body_lines": max(3, max_chars // 40)}


def stdlib_sft_records(*, max_records: int = 20_000, max_chars: int = 384,
                       max_body_lines: int = 9, files: Sequence[pathlib.Path] | None = None) -> list[dict]:
    """Prompt/completion records from the standard library's documented functions.

    `files` default: the stdlib's `.py` files outside its test folders (60% of
    its bytes are tests). For each function or method (files sorted, functions in source order)
    whose docstring is followed by 2..`max_body_lines` lines of body and whose
    source has at most `max_chars` characters: prompt = its `def` line(s)
    through the docstring's last line, completion = the remaining lines; both
    dedented by the `def`'s indentation (functions with a line indented less,
    e.g. inside a string, are skipped). Deterministic; the first `max_records`.
    """
    if files is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in stdlib_sources() if _TEST_DIRS.isdisjoint(p.relative_to(root).parts)]
    records: list[dict] = []
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = re.split(r"\r\n|\r|\n", text)  # ast's line breaks (str.splitlines also splits at \f)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(functions, key=lambda n: n.lineno):
            record = _function_record(node, lines, max_chars, max_body_lines)
            if record is not None:
                records.append({**record, "where": f"{path}:{node.lineno}"})
                if len(records) >= max_records:
                    return records
    return records


def _function_record(node, lines: list[str], max_chars: int, max_body_lines: int) -> dict | None:
    """{"prompt", "completion"} of one function, or None if it does not qualify."""
    if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
        return None
    doc_end = node.body[0].end_lineno  # 1-based, inclusive
    if node.body[1].lineno <= doc_end or not 2 <= node.end_lineno - doc_end <= max_body_lines:
        return None
    head, body = lines[node.lineno - 1:doc_end], lines[doc_end:node.end_lineno]
    indent = node.col_offset
    if any(line.strip() and line[:indent].strip() for line in head + body):
        return None  # a line indented less than the def: cannot dedent consistently
    prompt = "\n".join(line[indent:] for line in head) + "\n"
    completion = "\n".join(line[indent:] for line in body) + "\n"
    if len(prompt) + len(completion) > max_chars or not completion.strip():
        return None
    return {"prompt": prompt, "completion": completion}


# ---------------------------------------------------------------- tokenization


def tokenize_sft(record: Mapping[str, Any], tokenizer: Tokenizer, template: str | None = None,
                 loss_on: str = "completion") -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n], is_loss bool [n]) of one record (see the module docstring)."""
    if loss_on not in LOSS_ON:
        raise ConfigError(f"train.sft_loss_on={loss_on!r} should be one of {LOSS_ON}")
    if "messages" in record:
        return chat_example(record["messages"], tokenizer, template, loss_on,
                            where=record.get("where", "record"))
    if isinstance(record["prompt"], list):  # conversational: loss on the completion's turns
        return chat_example([*record["prompt"], *record["completion"]], tokenizer, template,
                            loss_on, where=record.get("where", "record"),
                            loss_from=len(record["prompt"]))
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompt = bos + tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"]) + [_require_eos(tokenizer, "sft")]
    return prompt_completion_example(prompt, completion, loss_on)


def prompt_completion_example(prompt: Sequence[int], completion: Sequence[int],
                              loss_on: str = "completion") -> tuple[np.ndarray, np.ndarray]:
    """(prompt + completion ids, loss flags on the completion, or on all with loss_on="all")."""
    tokens = np.asarray(list(prompt) + list(completion), dtype=np.int32)
    is_loss = np.zeros(len(tokens), dtype=bool)
    is_loss[0 if loss_on == "all" else len(prompt):] = True
    return tokens, is_loss


def chat_example(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: str | None,
                 loss_on: str = "completion", *, where: str = "record",
                 loss_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the rendered conversation, loss flags on its assistant turns' tokens).

    Only assistant turns at index >= `loss_from` carry loss (DPO: the
    response after the prompt's messages). `template` None: the default.
    """
    template = template or DEFAULT_CHAT_TEMPLATE
    specials = template_tokens(tokenizer)

    def ids(upto: int, add_generation_prompt: bool) -> list[int]:
        try:
            text = render_chat(template, messages[:upto], add_generation_prompt=add_generation_prompt,
                               **specials)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        return tokenizer.encode_chat(text)

    full = ids(len(messages), False)
    is_loss = np.zeros(len(full), dtype=bool)
    if loss_on == "all":
        is_loss[:] = True
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < loss_from or loss_on == "all":
            continue
        prefix, through = ids(i, True), ids(i + 1, False)
        if through[:len(prefix)] != prefix or full[:len(through)] != through:
            raise InputError(
                f"{where}: the chat template's rendering of the conversation up to assistant turn "
                f"{i} (with the generation prompt) is not a token prefix of its rendering through "
                "that turn (or that of the whole conversation), so the assistant tokens cannot be "
                "found: the template renders earlier turns differently in a longer conversation, or "
                "the tokenizer merges text across the end of the generation prompt")
        is_loss[len(prefix):len(through)] = True
    return np.asarray(full, dtype=np.int32), is_loss


def tokenize_records(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: str | None,
                     loss_on: str, seq_len: int) -> tuple[list[dict[str, np.ndarray]], dict[str, int]]:
    """Examples {"tokens", "loss"} (int32, at most seq_len long) and their stats.

    stats: examples (kept), truncated (longer than seq_len, cut to it),
    dropped (no loss token left after the cut, or none at all).
    """
    if loss_on not in LOSS_ON:
        raise ConfigError(f"train.sft_loss_on={loss_on!r} should be one of {LOSS_ON}")
    plain = [r for r in records if "messages" not in r]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    encoded = iter(tokenizer.encode_batch([s for r in plain for s in (r["prompt"], r["completion"])]))
    examples, truncated, dropped = [], 0, 0
    for record in records:
        if "messages" in record:
            tokens, is_loss = tokenize_sft(record, tokenizer, template, loss_on)
        else:
            prompt, completion = next(encoded), next(encoded)
            eos = [_require_eos(tokenizer, "sft")]
            tokens, is_loss = prompt_completion_example(bos + prompt, completion + eos, loss_on)
        if len(tokens) > seq_len:
            tokens, is_loss = tokens[:seq_len], is_loss[:seq_len]
            truncated += 1
        if not is_loss[1:].any():  # the first token is never predicted
            dropped += 1
            continue
        examples.append({"tokens": tokens, "loss": is_loss.astype(np.int32)})
    return examples, {"examples": len(examples), "truncated": truncated, "dropped": dropped}


# ---------------------------------------------------------------- rows and batches


def finish_rows(tokens: np.ndarray, is_loss: np.ndarray, segment_ids: np.ndarray,
                positions: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Packed `[batch, seq]` rows -> the five batch arrays (targets = next token of the segment)."""
    same = np.zeros(tokens.shape, dtype=bool)
    same[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    targets = np.full(tokens.shape, pad_id, dtype=np.int32)
    targets[:, :-1] = np.where(same[:, :-1], tokens[:, 1:], pad_id)
    loss_mask = np.zeros(tokens.shape, dtype=np.float32)
    loss_mask[:, :-1] = same[:, :-1] & (is_loss[:, 1:] > 0)
    return {
        "tokens": np.where(segment_ids > 0, tokens, pad_id).astype(np.int32),
        "targets": targets,
        "positions": np.where(segment_ids > 0, positions, 0).astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "loss_mask": loss_mask,
    }


def _stack_packed(rows: Sequence[dict[str, np.ndarray]], batch_size: int, pad_id: int):
    """Packed rows (grain's keys) -> one batch; a short final batch gets empty rows."""
    def stack(key):
        a = np.stack([r[key] for r in rows]).astype(np.int32, copy=False)
        return np.pad(a, ((0, batch_size - len(rows)), (0, 0)))
    return finish_rows(stack("tokens"), stack("loss"), stack("tokens_segment_ids"),
                       stack("tokens_positions"), pad_id)


def _packed_dataset(examples, *, seq_len, batch_size, seed, num_epochs, num_threads, pad_id,
                    packing_bins=None):
    """examples -> (epoch shuffle) -> repeat -> first-fit packed rows -> batches.

    First fit over `packing_bins` open rows (default `batch_size`): an example
    goes to the first row with room; when none has room, all rows are emitted.
    """
    ds = grain.MapDataset.source(examples)
    if seed is not None:
        ds = _EpochShuffle(ds, seed)
    it = ds.repeat(num_epochs).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=_PREFETCH_BUFFER))
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": seq_len, "loss": seq_len},
        num_packing_bins=packing_bins or batch_size,
        shuffle_bins=False)
    return it.batch(batch_size, batch_fn=lambda rows: _stack_packed(rows, batch_size, pad_id))


def examples_digest(examples: Sequence[Mapping[str, np.ndarray]]) -> str:
    """A short sha256 of the tokenized examples (what a saved iterator state must match)."""
    digest = hashlib.sha256()
    for ex in examples:
        for key in sorted(ex):
            digest.update(np.ascontiguousarray(ex[key]).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


class SFTBatches(BatchIterator):
    """Batches with `get_state()/set_state()` (as train/data.py) and `stats` (counts)."""

    def __init__(self, dataset, fingerprint, stats: dict[str, int]):
        super().__init__(dataset, fingerprint)
        self.stats = dict(stats)


def _shard(records: Sequence, process_index: int, process_count: int) -> list:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"bad process_index/process_count: {process_index}/{process_count}")
    shard = list(records[process_index::process_count])
    if not shard:
        raise InputError(f"process {process_index} of {process_count} gets no records "
                         f"({len(records)} in all)")
    return shard


def row_batches(kind: str, items: list, stack, digest_rows: list, stats: dict, *,
                seq_len: int, batch_size: int, seed: int, num_epochs: int | None,
                process_index: int, process_count: int, num_threads: int) -> SFTBatches:
    """Batches of one example per row (DPO pairs, classify examples): `items` shuffled
    with `seed` each epoch, repeated (`num_epochs=None`) or not, `stack(rows,
    batch_size)` per batch; resumable, fingerprinted by `digest_rows`' contents."""
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be positive, got {num_epochs}")
    ds = _EpochShuffle(grain.MapDataset.source(items), seed).repeat(num_epochs)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
    it = it.batch(batch_size, batch_fn=lambda rows: stack(rows, batch_size))
    fingerprint = {"kind": kind, "seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                   "num_epochs": num_epochs, "process_index": process_index,
                   "process_count": process_count, "num_examples": len(items),
                   "examples_sha256": examples_digest(digest_rows)}
    return SFTBatches(it, fingerprint, stats)


def _no_examples(stats) -> InputError:
    return InputError(f"no examples with a loss token ({stats['dropped']} dropped: nothing to "
                      "learn within seq_len)")


def sft_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                template: str | None = None, seq_len: int, batch_size: int, seed: int,
                loss_on: str = "completion", num_epochs: int | None = None,
                process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                packing_bins: int | None = None) -> SFTBatches:
    """Training batches of packed SFT examples, `[batch_size, seq_len]` numpy arrays.

    Examples are shuffled with `seed`, differently each epoch, and repeat
    forever (`num_epochs=None`) or stop after `num_epochs` passes (the last
    batch padded with empty rows). Each process takes every
    `process_count`-th record from `process_index`. `template`: the chat
    template for messages records (None: the default ChatML). `packing_bins`:
    rows filled at once (default `batch_size`; more pack tighter).
    """
    _check_shapes(seq_len, batch_size)
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be positive, got {num_epochs}")
    if packing_bins is not None and packing_bins < 1:
        raise ConfigError(f"packing_bins must be positive, got {packing_bins}")
    shard = _shard(records, process_index, process_count)
    examples, stats = tokenize_records(shard, tokenizer, template, loss_on, seq_len)
    if not examples:
        raise _no_examples(stats)
    ds = _packed_dataset(examples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                         num_epochs=num_epochs, num_threads=num_threads, pad_id=tokenizer.pad_id,
                         packing_bins=packing_bins)
    fingerprint = {"kind": "sft", "seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                   "packing_bins": packing_bins or batch_size,
                   "num_epochs": num_epochs, "process_index": process_index,
                   "process_count": process_count, "num_examples": len(examples),
                   "examples_sha256": examples_digest(examples)}
    return SFTBatches(ds, fingerprint, stats)


def fixed_batches(rows: list[dict[str, np.ndarray]], batch_size: int, num_batches: int) -> list:
    """Evenly spaced rows (if more than needed) stacked into at most `num_batches` batches."""
    wanted = num_batches * batch_size
    if len(rows) > wanted:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, wanted).round().astype(int)]
    empty = _zeros_like_tree(rows[0])
    rows = rows + [empty] * (-len(rows) % batch_size)
    return [_stack_tree(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _zeros_like_tree(tree):
    if isinstance(tree, dict):
        return {k: _zeros_like_tree(v) for k, v in tree.items()}
    return np.zeros_like(tree)


def _stack_tree(trees):
    if isinstance(trees[0], dict):
        return {k: _stack_tree([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def sft_eval_batches(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                     template: str | None = None, seq_len: int, batch_size: int, num_batches: int,
                     loss_on: str = "completion", process_index: int = 0, process_count: int = 1,
                     max_rows_read: int = 64) -> list[dict[str, np.ndarray]]:
    """A fixed list of eval batches: the eval records packed in order, one pass.

    More rows than `num_batches * batch_size`: evenly spaced ones are kept
    (reading at most `max_rows_read` times that many); fewer: all of them, in
    fewer batches, the last padded with empty rows. At least one batch.
    """
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    shard = _shard(records, process_index, process_count)
    examples, stats = tokenize_records(shard, tokenizer, template, loss_on, seq_len)
    if not examples:
        raise _no_examples(stats)
    ds = _packed_dataset(examples, seq_len=seq_len, batch_size=batch_size, seed=None, num_epochs=1,
                         num_threads=1, pad_id=tokenizer.pad_id)
    rows = []
    for batch in ds:
        rows += [{k: v[r] for k, v in batch.items()} for r in range(batch_size)
                 if batch["segment_ids"][r].any()]
        if len(rows) >= num_batches * batch_size * max_rows_read:
            break
    return fixed_batches(rows, batch_size, num_batches)


# ---------------------------------------------------------------- from a run config


def finetune_data(kind: str, cfg, tokenizer: Tokenizer, *, template: str | None,
                  batch_size: int | None = None, process_index: int = 0, process_count: int = 1):
    """(training iterator, fixed eval batches) of an "sft", "dpo", "reward", "kto" or
    "classify" run, from `cfg`.

    Reads `cfg.data.corpus` (jsonl paths/globs, or "stdlib-sft" for sft),
    holds out `cfg.data.eval_fraction` of the records (seed `cfg.data.seed`),
    and batches them with `cfg.data.seq_len`, `cfg.train.sft_loss_on` and
    `cfg.train.eval_batches`. `batch_size`: this process's rows of a training
    batch (default `cfg.data.batch_size`); eval batches are global (every
    process builds the same ones). `template`: see `resolve_chat_template`.
    """
    from . import classify, preference

    data = cfg.data
    if kind == "sft":
        records = load_sft_records(data.corpus, max_records=data.max_docs or None,
                                   seq_len=data.seq_len)
    elif kind in ("dpo", "reward"):
        records = preference.load_preference_records(data.corpus, max_records=data.max_docs or None)
    elif kind == "kto":
        records = preference.load_kto_records(data.corpus, max_records=data.max_docs or None)
    elif kind == "classify":
        records = classify.load_classify_records(data.corpus, cfg.model.num_labels,
                                                 cfg.model.label_names,
                                                 max_records=data.max_docs or None)
    else:
        raise ConfigError(f"finetune_data: kind should be 'sft', 'dpo', 'reward', 'kto' or "
                          f"'classify', got {kind!r}")
    train, held = split_records(records, data.eval_fraction, data.seed)
    if not held:
        raise InputError(f"data.corpus={data.corpus}: {len(records)} record(s), too few to hold "
                         "out an eval split (need 2 or more)")
    common = dict(template=template, seq_len=data.seq_len)
    if kind == "sft":
        loss_on = cfg.train.sft_loss_on
        batches = sft_batches(train, tokenizer, batch_size=batch_size or data.batch_size, seed=data.seed,
                              loss_on=loss_on, process_index=process_index,
                              process_count=process_count, **common)
        evals = sft_eval_batches(held, tokenizer, batch_size=data.batch_size,
                                 num_batches=cfg.train.eval_batches, loss_on=loss_on, **common)
    elif kind == "classify":
        batches = classify.classify_batches(train, tokenizer,
                                            batch_size=batch_size or data.batch_size,
                                            seed=data.seed, process_index=process_index,
                                            process_count=process_count, **common)
        evals = classify.classify_eval_batches(held, tokenizer, batch_size=data.batch_size,
                                               num_batches=cfg.train.eval_batches, **common)
    elif kind == "kto":
        batches = preference.kto_batches(train, tokenizer, batch_size=batch_size or data.batch_size,
                                         seed=data.seed, process_index=process_index,
                                         process_count=process_count, **common)
        evals = preference.kto_eval_batches(held, tokenizer, batch_size=data.batch_size,
                                            num_batches=cfg.train.eval_batches, **common)
    else:
        margin = kind == "reward"
        batches = preference.dpo_batches(train, tokenizer, batch_size=batch_size or data.batch_size,
                                         seed=data.seed, process_index=process_index,
                                         process_count=process_count, margin=margin, **common)
        evals = preference.dpo_eval_batches(held, tokenizer, batch_size=data.batch_size,
                                            num_batches=cfg.train.eval_batches, margin=margin,
                                            **common)
    return batches, evals
