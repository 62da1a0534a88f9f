"""`jaxlm prepare`: tokenize text / .jsonl / Parquet files into ArrayRecord shards.

    inputs (glob) --pool over files--> tokenize each document: [bos] + ids + [eos]
        --> DIR/NNNNN-MMMM.array_record (one record = one document, int32 little-endian)
        --> DIR/NNNNN.done.json (per input) --> DIR/manifest.json (last)

One input file gives one or more shards of at most `records_per_shard`
records. A shard is written under a temporary name and renamed when complete;
an input counts as done once its `.done.json` (written after its shards) is
there and names its current size and mtime, so `resume=True` skips the done
inputs and redoes the rest (a missing shard or a stray temp file only costs
that input's redo). Training reads the shards with `data.corpus=DIR` and must
use the same tokenizer: a copy is saved in DIR and its digest, recorded in
the manifest, is checked when training starts.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

import numpy as np

from ..errors import InputError
from ..model.tokenizer import require_eos as _require_eos
from ..model.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from .data import _is_encodable

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
FORMAT = "int32-le"  # each record: the document's ids as raw little-endian int32
VERSION = 1
_ENCODE_BATCH = 64  # documents tokenized per encode_batch call


# ---------------------------------------------------------------- documents




def _jsonl_texts(path: pathlib.Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, TypeError, KeyError):
                    raise InputError(f"{path}:{number}: expected a JSON object with a \"text\" field") from None
                if not isinstance(text, str):
                    raise InputError(f"{path}:{number}: \"text\" is not a string")
                yield text
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as utf-8 text: {e}") from None


def _parquet_texts(path: pathlib.Path) -> Iterator[str]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise InputError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from None
    if "text" not in table.schema_arrow.names:
        raise InputError(f"Parquet file {path} has no \"text\" column (columns: "
                         f"{', '.join(table.schema_arrow.names)})")
    try:
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
    except Exception as e:
        raise InputError(f"cannot read Parquet file {path}: {str(e).splitlines()[0]}") from None


def file_texts(path) -> Iterator[str]:
    """Non-blank, encodable documents of one input file, in file order.

    `.jsonl`: the "text" field of each line; `.parquet`: the "text" column;
    anything else: the whole file as one UTF-8 document.
    """
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(path)
    elif path.suffix == ".parquet":
        texts = _parquet_texts(path)
    else:
        try:
            texts = iter([path.read_bytes().decode("utf-8")])
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {path} as utf-8 text: {e}") from None
    return (t for t in texts if t.strip() and _is_encodable(t))


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """sha256 (16 hex digits) of the tokenizer's saved files and special ids."""
    digest = hashlib.sha256(repr((tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                  tokenizer.vocab_size)).encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for name in sorted(os.listdir(tmp)):
            digest.update(name.encode() + b"\0" + pathlib.Path(tmp, name).read_bytes())
    return digest.hexdigest()[:16]


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """[bos] + ids + [eos] (no bos if the tokenizer has none) as int32, per text."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = _require_eos(tokenizer, "prepare: documents")
    return [np.asarray(bos + ids + [eos], dtype="<i4")
            for ids in tokenizer.encode_batch(texts, split_special_tokens=True)]  # as _Tokenize


# ---------------------------------------------------------------- shards


# the names prepare writes in --output (shards, done records, the manifest, the
# tokenizer and its special-token files, files being written); any other name there
# means the directory is something else's (a model dir, a corpus)
_OWN_FILE = re.compile(r"^(\d{5}-\d{4}\.array_record|\d{5}\.done\.json|manifest\.json|"
                       r"tokenizer\.(model|json)|tokenizer_config\.json|"
                       r"special_tokens_map\.json|.*\.tmp)$")


def _shard_name(file_index: int, shard: int) -> str:
    return f"{file_index:05d}-{shard:04d}{SHARD_SUFFIX}"


def _done_name(file_index: int) -> str:
    return f"{file_index:05d}.done.json"


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_shards(out_dir, file_index: int, docs, records_per_shard: int) -> list[dict]:
    """Writes int32 documents into shards `{file_index}-{k}`; each renamed when complete.

    Returns [{"file", "records", "tokens"}] per shard (at least one, maybe empty).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out_dir = pathlib.Path(out_dir)
    shards, writer, tmp, count, tokens = [], None, None, 0, 0

    def close():
        writer.close()
        name = _shard_name(file_index, len(shards))
        os.replace(tmp, out_dir / name)
        shards.append({"file": name, "records": count, "tokens": tokens})

    for doc in docs:
        if writer is None:
            tmp = out_dir / (_shard_name(file_index, len(shards)) + ".tmp")
            writer, count, tokens = ArrayRecordWriter(str(tmp), "group_size:1"), 0, 0
        writer.write(np.asarray(doc, dtype="<i4").tobytes())
        count += 1
        tokens += len(doc)
        if count == records_per_shard:
            close()
            writer = None
    if writer is not None or not shards:
        if writer is None:
            tmp = out_dir / (_shard_name(file_index, 0) + ".tmp")
            writer, count, tokens = ArrayRecordWriter(str(tmp), "group_size:1"), 0, 0
        close()
    return shards


def _batched(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str):
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _prepare_file(job: tuple) -> dict:
    """Tokenizes one input into its shards, then writes its done file (atomically)."""
    out_dir, file_index, path, records_per_shard = job
    out_dir = pathlib.Path(out_dir)
    _remove_file_outputs(out_dir, file_index)
    tok = _WORKER_TOKENIZER
    docs = (d for batch in _batched(file_texts(path), _ENCODE_BATCH)
            for d in encode_documents(tok, batch))
    entry = {**_file_id(path), "shards": write_shards(out_dir, file_index, docs, records_per_shard)}
    done = out_dir / _done_name(file_index)
    done.with_suffix(".tmp").write_text(json.dumps(entry))
    os.replace(done.with_suffix(".tmp"), done)
    return entry


def _remove_file_outputs(out_dir: pathlib.Path, file_index: int):
    for p in out_dir.glob(f"{file_index:05d}[-.]*"):
        p.unlink()


def _done_entry(out_dir: pathlib.Path, file_index: int, path: str) -> dict | None:
    """The input's done record if it is complete and matches the file as it is now."""
    try:
        entry = json.loads((out_dir / _done_name(file_index)).read_text())
    except (OSError, ValueError):
        return None
    current = _file_id(path)
    if any(entry.get(k) != current[k] for k in current):
        return None
    if not all((out_dir / s["file"]).is_file() for s in entry.get("shards", ())):
        return None
    return entry


def _sample_texts(files: list[str], max_chars: int) -> list[str]:
    texts, total = [], 0
    for path in files:
        for text in file_texts(path):
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


def prepare(input_glob: str, output: str, *, tokenizer: str = "", resume: bool = False,
            workers: int = 1, records_per_shard: int = 100_000, vocab_size: int = 8192,
            tokenizer_max_chars: int = 4_000_000) -> dict:
    """Tokenizes the files matching `input_glob` into shards in `output`; returns the manifest.

    `tokenizer`: a sentencepiece .model, a tokenizer.json or a directory
    holding one; "" trains a sentencepiece model of `vocab_size` on the first
    `tokenizer_max_chars` characters of the inputs (saved in `output`).
    """
    files = sorted(p for p in globlib.glob(os.path.expanduser(input_glob), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise InputError(f"--input {input_glob!r} matches no files")
    if workers < 1 or records_per_shard < 1:
        raise InputError(f"--workers ({workers}) and --records-per-shard ({records_per_shard}) "
                         "must be positive")
    out = pathlib.Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {output} exists and is not a directory")
    foreign = sorted(n for n in os.listdir(out) if not _OWN_FILE.match(n)) if out.is_dir() else []
    if foreign:
        raise InputError(f"--output {output} is not empty and not a prepared-data directory "
                         f"(it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
                         "; choose a new or an empty directory")
    held = out.is_dir() and (any(out.glob("*" + SHARD_SUFFIX)) or (out / MANIFEST).exists())
    if held and not resume:
        raise InputError(f"--output {output} already holds shards: pass --resume to complete "
                         "them, or choose another directory")
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif resume and any(out.glob("tokenizer.*")):
        tok = load_tokenizer(out)
    else:
        tok = train_sentencepiece(_sample_texts(files, tokenizer_max_chars), vocab_size, out,
                                  max_chars=tokenizer_max_chars)
    if resume and (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text())
        if old.get("tokenizer_digest") != tokenizer_digest(tok):
            raise InputError(f"--resume: {output} was prepared with another tokenizer")
    tok_path = tok.save(out)
    (out / MANIFEST).unlink(missing_ok=True)  # written again, last, when every input is done
    for stray in out.glob("*.tmp"):
        stray.unlink()

    entries: dict[int, dict] = {}
    jobs = []
    for i, path in enumerate(files):
        entry = _done_entry(out, i, path) if resume else None
        if entry is None:
            jobs.append((str(out), i, path, records_per_shard))
        else:
            entries[i] = entry
    if workers == 1 or len(jobs) <= 1:
        _init_worker(str(tok_path))
        for job in jobs:
            entries[job[1]] = _prepare_file(job)
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        with ctx.Pool(min(workers, len(jobs)), _init_worker, (str(tok_path),)) as pool:
            for job, entry in zip(jobs, pool.imap(_prepare_file, jobs)):
                entries[job[1]] = entry

    return write_manifest(out, tok, tok_path.name, records_per_shard,
                          [entries[i] for i in range(len(files))])


def write_manifest(out, tok: Tokenizer, tokenizer_file: str, records_per_shard: int,
                   inputs: list[dict]) -> dict:
    """Writes (atomically, last) and returns the manifest of the shards `inputs` name."""
    out = pathlib.Path(out)
    manifest = {
        "version": VERSION,
        "format": FORMAT,
        "tokenizer_file": tokenizer_file,
        "tokenizer_digest": tokenizer_digest(tok),
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "records_per_shard": records_per_shard,
        "inputs": inputs,
        "num_records": sum(s["records"] for e in inputs for s in e["shards"]),
        "num_tokens": sum(s["tokens"] for e in inputs for s in e["shards"]),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(directory) -> dict:
    """The manifest of a prepared corpus, checked for completeness."""
    directory = pathlib.Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except OSError:
        raise InputError(f"{directory} is not a prepared corpus: {MANIFEST} is missing "
                         "(run `jaxlm prepare`, or complete it with --resume)") from None
    except ValueError:
        raise InputError(f"{directory / MANIFEST} is corrupt: not valid JSON") from None
    if manifest.get("version") != VERSION or manifest.get("format") != FORMAT:
        raise InputError(f"{directory / MANIFEST}: unsupported version/format")
    for entry in manifest["inputs"]:
        for shard in entry["shards"]:
            if not (directory / shard["file"]).is_file():
                raise InputError(f"prepared corpus {directory}: shard {shard['file']} is missing")
    return manifest


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["prepare", "read_manifest", "manifest_digest", "tokenizer_digest", "file_texts",
           "encode_documents", "write_shards", "write_manifest", "MANIFEST"]
