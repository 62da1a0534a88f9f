"""Causal-LM input pipeline on grain: documents -> packed rows -> batches.

    Documents (MapDataset of texts | file paths | prepared ArrayRecord records)
         --every k-th held out for eval--> [process_index::process_count]
         --shuffle(seed, epoch)--> repeat --map(read/tokenize: [bos] + ids + [eos])
         --> to_iter_dataset (threads) --ConcatThenSplitIterDataset(seq_len)-->
         [IterDataset.mix of several sources by weight] --window shuffle-->
         batch (last one padded) --map(targets, loss_mask)-->
         {tokens, targets, positions, segment_ids, loss_mask}

Every corpus is read lazily by index (`open_corpus`): "stdlib" and
directories as a list of file paths, `jaxlm prepare` output as grain's
`ArrayRecordDataSource` over its shards; nothing is read at start-up, and a
saved state is checked against the corpus's identity (file names + sizes, or
the manifest digest), not a hash of its documents.

Packing is concatenate-then-split (grain's `ConcatThenSplitIterDataset`):
documents are laid end to end and cut every `seq_len` tokens, so rows are
full except at the very end of a finite pass. A document cut by a row end
continues in the next row as a new segment whose positions restart at 0
(attention never crosses segments, so the cut piece starts a fresh context).
Segment ids number the pieces of a row 1, 2, ...; 0 is padding.

`targets[t]` is the next token of the same segment; the last token of each
segment (and padding) has target pad and `loss_mask` 0, so one prediction is
lost per segment end (under 1% of tokens for rows of 128).

Tokenization is lazy (inside the pipeline, on `num_threads` threads), so a run
tokenizes only the documents it reads. The iterator's `get_state()` is a
JSON-serialisable dict: save it in a checkpoint, `set_state` it on a fresh
iterator from the same arguments, and the batches continue exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from ..model.tokenizer import require_eos as _require_eos
from ..model.tokenizer import Tokenizer

TEXT_SUFFIXES = (".py", ".txt", ".md")
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
_STATE_VERSION = 1
_PREFETCH_BUFFER = 32  # tokenized documents read ahead per process


# ---------------------------------------------------------------- documents


def stdlib_sources() -> list[pathlib.Path]:
    """The `.py` files of this interpreter's standard library, sorted.

    The walk does not enter site-packages / dist-packages / __pycache__ at all (an
    interpreter's site-packages can hold several times the stdlib's files: a
    `Path.rglob` that filtered them afterwards took 0.56 s here, this 0.03 s, and
    every run on the stdlib corpus lists them)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):  # symlinked folders: not entered
        subfolders[:] = [d for d in subfolders if d not in skip]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return sorted(pathlib.Path(p) for p in files if os.path.isfile(p))


def _read_text(path: pathlib.Path) -> str | None:
    """UTF-8 text of a file, or None if it cannot be read or decoded."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_files(paths: Sequence[pathlib.Path], max_docs: int | None) -> list[str]:
    """Texts of the readable, non-blank files, at most `max_docs` of them."""
    docs: list[str] = []
    for path in paths:
        if max_docs is not None and len(docs) >= max_docs:
            break
        text = _read_text(path)
        if text is not None and text.strip():
            docs.append(text)
    return docs


def _directory_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Text files under `root` (recursive, hidden folders skipped), sorted."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if path.suffix in TEXT_SUFFIXES and not any(p.startswith(".") for p in rel):
            if path.is_file():
                files.append(path)
    return sorted(files)


def _is_encodable(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_jsonl(path: pathlib.Path, max_docs: int | None) -> list[str]:
    """The "text" field of each line of a JSON-lines file (undecodable texts skipped)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as utf-8 text: {e}") from e
    docs: list[str] = []
    for number, line in enumerate(lines, 1):
        if max_docs is not None and len(docs) >= max_docs:
            break
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"{path}:{number}: expected a JSON object with a \"text\" field") from e
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: \"text\" is not a string")
        if text.strip() and _is_encodable(text):
            docs.append(text)
    return docs


def load_documents(corpus: str, *, max_docs: int | None = None) -> list[str]:
    """Documents of a corpus, in a deterministic order.

    `corpus` is "stdlib" (this interpreter's standard library), a directory
    (every *.py, *.txt, *.md below it), a `.jsonl` file (one {"text": ...} per
    line) or any other text file (one document). Files that are not UTF-8 and
    blank documents are skipped. `max_docs` keeps the first documents.
    """
    if max_docs is not None and max_docs < 1:
        raise ConfigError(f"max_docs must be positive, got {max_docs}")
    if corpus == "stdlib":
        docs = _read_files(stdlib_sources(), max_docs)
    else:
        path = pathlib.Path(corpus).expanduser()
        if path.is_dir():
            docs = _read_files(_directory_files(path), max_docs)
        elif path.is_file() and path.suffix == ".jsonl":
            docs = _read_jsonl(path, max_docs)
        elif path.is_file():
            text = _read_text(path)
            if text is None:
                raise InputError(f"cannot read {path} as utf-8 text")
            docs = [text] if text.strip() else []
        else:
            raise InputError(f"corpus not found: {corpus} (a directory, a text/.jsonl file, or 'stdlib')")
    if not docs:
        raise InputError(f"no documents in corpus {corpus}")
    return docs


def split_documents(docs: Sequence[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) documents, chosen with `seed`, in input order.

    Eval gets round(eval_fraction * n) documents, at least one when there
    are two or more documents and eval_fraction > 0; train is never empty. A
    single document (a one-file corpus) is split by characters instead.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    if n == 0:
        raise InputError("no documents to split")
    if n == 1 and eval_fraction > 0 and isinstance(docs[0], str):
        return _split_one(docs[0], eval_fraction)
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(max(1, round(eval_fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[order[:n_eval]] = True
    train = [d for d, e in zip(docs, is_eval) if not e]
    evals = [d for d, e in zip(docs, is_eval) if e]
    return train, evals


# ---------------------------------------------------------------- lazy corpora


@dataclasses.dataclass(frozen=True, eq=False)
class Documents:
    """A corpus read lazily, by index: nothing is read until the pipeline asks.

    `items` is a grain MapDataset of raw items of one `kind`: "text" (str
    documents), "file" (paths of UTF-8 files, one document each; unreadable or
    blank ones are skipped when read) or "tokens" (ArrayRecord records of a
    prepared corpus: [bos] + ids + [eos] as little-endian int32 bytes).
    `identity` is what a saved iterator state must match (file names and
    sizes, or the manifest digest; never the contents).
    """

    items: grain.MapDataset
    kind: str
    identity: dict
    tokenizer_digest: str | None = None  # prepared corpora: the tokenizer they need
    tokenizer_path: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def view(self, items: grain.MapDataset, **identity) -> "Documents":
        return dataclasses.replace(self, items=items, identity={**self.identity, **identity})


def _files_identity(name: str, paths: Sequence[pathlib.Path], root: pathlib.Path) -> dict:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
    return {"corpus": name, "files": len(paths), "files_sha256": digest.hexdigest()[:16]}


def _prepared(path: pathlib.Path) -> Documents:
    from . import prepare
    manifest = prepare.read_manifest(path)
    shards = [str(path / s["file"]) for e in manifest["inputs"] for s in e["shards"] if s["records"]]
    if not shards:
        raise InputError(f"prepared corpus {path} holds no documents")
    source = grain.sources.ArrayRecordDataSource(shards)  # opens each shard's index, reads no record
    return Documents(grain.MapDataset.source(source), "tokens",
                     {"corpus": "prepared", "manifest_sha256": prepare.manifest_digest(manifest)},
                     tokenizer_digest=manifest["tokenizer_digest"],
                     tokenizer_path=str(path / manifest["tokenizer_file"]))


def open_corpus(corpus: str, *, max_docs: int = 0) -> Documents:
    """A corpus as lazily read `Documents`, in a deterministic order.

    `corpus`: "stdlib", a directory of text files (as `load_documents`), a
    directory prepared by `jaxlm prepare` (it holds manifest.json), a `.jsonl`
    file or a text file (both small: read at once). `max_docs` > 0 keeps the
    first documents. Start-up cost: one stat per raw file, one index read per
    prepared shard.
    """
    if max_docs < 0:
        raise ConfigError(f"max_docs must be >= 0, got {max_docs}")
    path = pathlib.Path(corpus).expanduser()
    if corpus == "stdlib":
        files = stdlib_sources()
        docs = Documents(grain.MapDataset.source([str(p) for p in files]), "file",
                         _files_identity("stdlib", files, pathlib.Path(sysconfig.get_paths()["stdlib"])))
    elif path.is_dir() and ((path / "manifest.json").exists() or any(path.glob("*.array_record"))):
        docs = _prepared(path)  # shards without a manifest: an unfinished `jaxlm prepare`
    elif path.is_dir():
        files = _directory_files(path)
        docs = Documents(grain.MapDataset.source([str(p) for p in files]), "file",
                         _files_identity(str(path.resolve()), files, path))
    elif path.is_file():
        texts = load_documents(corpus, max_docs=max_docs or None)
        st = path.stat()
        docs = Documents(grain.MapDataset.source(texts), "text",
                         {"corpus": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    else:
        raise InputError(f"corpus not found: {corpus} (a directory, a prepared corpus, a text/.jsonl "
                         "file, or 'stdlib')")
    if not len(docs):
        raise InputError(f"no documents in corpus {corpus}")
    if max_docs and max_docs < len(docs):
        docs = docs.view(docs.items[:max_docs], max_docs=max_docs)
    return docs


class _EveryKth(grain.MapDataset):
    """Held-out split by index: `take=True` keeps items k-1, 2k-1, ...; False the others."""

    def __init__(self, parent: grain.MapDataset, k: int, take: bool):
        super().__init__(parent)
        n = len(parent)
        self._k, self._take = k, take
        self._length = n // k if take else n - n // k

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"EveryKth(k={self._k}, take={self._take})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        k, i = self._k, index % self._length
        return self._parent[i * k + k - 1 if self._take else (i // (k - 1)) * k + i % (k - 1)]


def split_corpus(docs: Documents, eval_fraction: float) -> tuple[Documents, Documents | None]:
    """Disjoint (train, eval) views by index: every k-th document is eval, k = round(1 / eval_fraction).

    At least one eval document when there are two or more (k <= n); with one
    document eval is None. Lazy: nothing is read.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(docs)
    if n < 2:
        return _split_single(docs, eval_fraction)
    k = min(max(2, round(1 / eval_fraction)), n)
    return (docs.view(_EveryKth(docs.items, k, False), split=f"train/{k}"),
            docs.view(_EveryKth(docs.items, k, True), split=f"eval/{k}"))


def _split_single(docs: Documents, eval_fraction: float) -> tuple[Documents, Documents | None]:
    """A one-document corpus (a single text file): split by characters (`_split_one`)."""
    if docs.kind == "tokens":
        return docs, None
    item = docs.items[0]
    text = item if docs.kind == "text" else _read_text(pathlib.Path(item))
    train, held = _split_one(text or "", eval_fraction)
    if not held:
        return docs, None
    part = lambda texts, name: Documents(grain.MapDataset.source(texts), "text",  # noqa: E731
                                         {**docs.identity, "split": name})
    return part(train, "train/chars"), part(held, "eval/chars")


def sample_texts(docs: Documents, max_chars: int, seed: int) -> list[str]:
    """Texts of documents in a seeded order until `max_chars` (to train a tokenizer on)."""
    if docs.kind == "tokens":
        raise ConfigError("a prepared corpus is already tokenized: use its tokenizer "
                          "(data.tokenizer='' picks the one saved with it)")
    order = np.random.default_rng(seed).permutation(len(docs))
    texts, total = [], 0
    for i in order:
        item = docs.items[int(i)]
        text = item if docs.kind == "text" else _read_text(pathlib.Path(item))
        if text and text.strip():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return texts


def _split_one(doc: str, eval_fraction: float) -> tuple[list[str], list[str]]:
    """A single document (a one-file corpus): its last eval_fraction of characters
    (from a line start where there is one) is the eval part, the rest trains."""
    if len(doc) < 2:
        return [doc], []
    cut = len(doc) - max(1, round(eval_fraction * len(doc)))
    line = doc.rfind("\n", 0, cut)
    if line > 0 and len(doc) - line < 2 * (len(doc) - cut):
        cut = line + 1
    return [doc[:cut]], [doc[cut:]]


# ---------------------------------------------------------------- pipeline


class _Tokenize(grain.transforms.Map):
    """text -> {"tokens": int32 [bos] + ids + [eos]} (no bos if the model has none)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        self._eos = [_require_eos(tokenizer, "data: documents")]

    def map(self, text: str) -> dict[str, np.ndarray]:
        # a corpus is text: a literal "</s>" in it is not a document boundary
        ids = self._bos + self._tokenizer.encode(text, split_special_tokens=True) + self._eos
        return {"tokens": np.asarray(ids, dtype=np.int32)}


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks packed rows; a short final batch is padded with empty rows."""
    batch = {}
    for key, name in (("tokens", "tokens"), ("tokens_positions", "positions"), ("tokens_segment_ids", "segment_ids")):
        stacked = np.stack([r[key] for r in rows]).astype(np.int32, copy=False)
        if len(rows) < batch_size:
            stacked = np.pad(stacked, ((0, batch_size - len(rows)), (0, 0)))
        batch[name] = stacked
    return batch


def _add_targets(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """targets = next token of the same segment; loss_mask marks where one exists."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    same = np.zeros(tokens.shape, dtype=bool)
    same[:, :-1] = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = np.where(same[:, :-1], tokens[:, 1:], pad_id)
    tokens = np.where(segments > 0, tokens, pad_id).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": targets,
        "positions": batch["positions"],
        "segment_ids": segments,
        "loss_mask": same.astype(np.float32),
    }


def _check_shapes(seq_len: int, batch_size: int) -> None:
    if seq_len < 2 or batch_size < 1:
        raise ConfigError(f"need seq_len >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}")


class _EpochShuffle(grain.MapDataset):
    """The parent's elements in a new order each epoch: a permutation seeded by (seed, epoch).

    Used instead of `MapDataset.shuffle`, whose per-index Feistel shuffle costs
    milliseconds per element on small corpora (tens of documents).
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        n = len(parent)
        self._length = n
        self._permutation = functools.lru_cache(maxsize=2)(
            lambda epoch: np.random.default_rng([seed, epoch]).permutation(n)
        )

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return "EpochShuffle"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._length)
        return self._parent[int(self._permutation(epoch)[i])]


class _ToTokens(grain.transforms.Map):
    """An item of `kind` -> {"tokens": int32 [bos] + ids + [eos]}, or None (skipped) for an
    unreadable or blank file."""

    def __init__(self, tokenizer: Tokenizer, kind: str):
        self._tokenize = _Tokenize(tokenizer)
        self._kind = kind

    def map(self, item):
        if self._kind == "tokens":
            return {"tokens": np.frombuffer(item, dtype="<i4").astype(np.int32)}
        if self._kind == "file":
            item = _read_text(pathlib.Path(item))
            if item is None or not item.strip():
                return None
        return self._tokenize.map(item)


_SMALL = 1 << 20  # up to this many documents: one numpy permutation per epoch; above: grain's


def _shuffled(items: grain.MapDataset, seed: int) -> grain.MapDataset:
    """A new order each epoch, from (seed, epoch): O(n) memory below `_SMALL` items, O(1) above."""
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    return _EpochShuffle(items, seed) if len(items) <= _SMALL else items.shuffle(seed)


def _rows(docs: Documents, tokenizer, *, seq_len, seed, num_epochs, num_threads) -> grain.IterDataset:
    """One source's packed rows: shuffle(seed, epoch) -> repeat -> tokenize (threads) -> pack."""
    ds = docs.items
    if seed is not None:
        ds = _shuffled(ds, seed)  # a new order each epoch (indices run on past len)
    ds = ds.repeat(num_epochs).map(_ToTokens(tokenizer, docs.kind))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=_PREFETCH_BUFFER))
    return grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})


def _dataset(sources, tokenizer, *, seq_len, batch_size, seed, num_epochs, num_threads,
             shuffle_rows: int = 0) -> grain.IterDataset:
    """The grain pipeline over [(Documents, weight)]; `seed=None` keeps document order;
    `num_epochs=None` repeats forever.

    Several sources are packed separately and their rows mixed by weight
    (`IterDataset.mix`: a deterministic interleaving, so each source's share
    of rows, hence of tokens, is its weight; a finite stream stops when one
    source ends). `shuffle_rows` > 0 shuffles packed rows within windows of
    that many rows, so a batch's rows come from many documents rather than
    one or two consecutive ones (whose gradients are strongly correlated).
    """
    streams = [_rows(docs, tokenizer, seq_len=seq_len, seed=None if seed is None else seed + j,
                     num_epochs=num_epochs, num_threads=num_threads)
               for j, (docs, _) in enumerate(sources)]
    it = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, [w for _, w in sources])
    if seed is not None and shuffle_rows > 1:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_rows, seed=seed)
    it = it.batch(batch_size, batch_fn=lambda rows: _stack_rows(rows, batch_size))
    pad_id = tokenizer.pad_id
    return it.map(lambda batch: _add_targets(batch, pad_id))

# ---------------------------------------------------------------- iterator


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars in grain states."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"data iterator state holds a {type(value).__name__}")


def _as_tuples(state: Any) -> Any:
    """JSON turns grain's tuples into lists; grain compares them to tuples."""
    if isinstance(state, dict):
        return {k: _as_tuples(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return tuple(_as_tuples(v) for v in state)
    return state


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over batches with grain-style, JSON-serialisable state."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict[str, Any]):
        self._iterator = iter(dataset)
        self._fingerprint = fingerprint

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """Position in the stream: plain dicts, lists, ints and strings."""
        grain_state = json.loads(json.dumps(self._iterator.get_state(), default=_plain))
        return {"version": _STATE_VERSION, "pipeline": dict(self._fingerprint), "grain": grain_state}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()` of an iterator built with the same arguments."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "grain" not in state:
            raise CheckpointError("data iterator state is missing or from another version")
        if state.get("pipeline") != self._fingerprint:
            raise CheckpointError(
                f"data iterator state was saved for another pipeline: {state.get('pipeline')} != {self._fingerprint}"
            )
        self._iterator.set_state(_as_tuples(state["grain"]))


def _identity(docs: Documents) -> dict[str, Any]:
    """What a saved state must match for one source: its identity, never its contents."""
    return {**docs.identity, "kind": docs.kind, "num_docs": len(docs)}


def _as_documents(docs) -> Documents:
    """A list of texts becomes `Documents` (identified by a digest of the texts: they are in memory)."""
    if isinstance(docs, Documents):
        return docs
    docs = list(docs)
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return Documents(grain.MapDataset.source(docs), "text", {"docs_sha256": digest.hexdigest()[:16]})


def _sources(docs) -> list[tuple[Documents, float]]:
    """Documents, a list of texts, or a mixture [(Documents or texts, weight), ...]."""
    if isinstance(docs, Sequence) and docs and all(
            isinstance(d, tuple) and len(d) == 2 and not isinstance(d[0], str) for d in docs):
        sources = [(_as_documents(d), float(w)) for d, w in docs]
        weights = [w for _, w in sources]
        if any(not w > 0 for w in weights) or not sum(weights) > 0:
            raise ConfigError(f"mixture weights must be > 0 and sum to a positive number, got {weights}")
        return sources
    return [(_as_documents(docs), 1.0)]


def _check_tokenizer(sources, tokenizer: Tokenizer) -> None:
    needed = {d.tokenizer_digest for d, _ in sources} - {None}
    if needed:
        from .prepare import tokenizer_digest
        have = tokenizer_digest(tokenizer)
        for d, _ in sources:
            if d.tokenizer_digest not in (None, have):
                raise ConfigError(
                    f"the corpus was prepared with the tokenizer {d.tokenizer_path} (digest "
                    f"{d.tokenizer_digest}), not with the run's (digest {have}: train.init_from's,"
                    " else data.tokenizer): prepare it again with `jaxlm prepare --tokenizer` "
                    "the run's, or, for a new model, set data.tokenizer to the corpus's")


def _shard(sources, process_index: int, process_count: int) -> list[tuple[Documents, float]]:
    """This process's documents of each source: indices process_index, +process_count, ...

    Disjoint across processes, and together the whole source (the same rule
    as `docs[process_index::process_count]`, as a lazy grain slice).
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"bad process_index/process_count: {process_index}/{process_count}")
    out = []
    for docs, weight in sources:
        total = len(docs)
        if not total:
            raise InputError("no documents to make batches from")
        if process_count > 1:
            docs = docs.view(docs.items[process_index::process_count],
                             process_index=process_index, process_count=process_count)
        if not len(docs):
            raise InputError(f"process {process_index} of {process_count} gets no documents "
                             f"({total} in all)")
        out.append((docs, weight))
    return out


def make_batches(
    docs,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    repeat: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    shuffle_rows: int = 0,
) -> BatchIterator:
    """Training batches: dicts of `[batch_size, seq_len]` numpy arrays.

    `docs`: a list of texts, lazily read `Documents` (`open_corpus`), or a
    mixture `[(documents, weight), ...]` whose sources get that share of the
    rows. Documents are shuffled with `seed`, differently each epoch.
    `repeat=True` with `num_epochs=None` never ends; `num_epochs=k` stops
    after k passes, `repeat=False` after one; the last batch of a finite
    stream is padded (segment_ids 0, loss_mask 0). Each process reads a
    disjoint share of each source (indices `process_index::process_count`),
    so shares may differ in length. `shuffle_rows` > 0 shuffles packed rows
    within windows of that many rows. Same arguments -> same batches.
    """
    _check_shapes(seq_len, batch_size)
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be positive, got {num_epochs}")
    sources = _sources(docs)
    _check_tokenizer(sources, tokenizer)
    sources = _shard(sources, process_index, process_count)
    epochs = num_epochs if repeat else 1
    ds = _dataset(sources, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  num_epochs=epochs, num_threads=num_threads, shuffle_rows=shuffle_rows)
    fingerprint = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed, "num_epochs": epochs,
                   "process_index": process_index, "process_count": process_count,
                   "shuffle_rows": shuffle_rows, "vocab_size": tokenizer.vocab_size,
                   "sources": [{**_identity(d), "weight": w} for d, w in sources]}
    return BatchIterator(ds, fingerprint)


def eval_batches(
    docs,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    max_rows_read: int = 64,
) -> list[dict[str, np.ndarray]]:
    """A fixed, deterministic list of eval batches spread over the eval documents.

    `docs` as for `make_batches` (a mixture gives rows mixed by weight). The
    eval documents are packed in order (no shuffle, no repeat), read lazily.
    If they give more rows than `num_batches * batch_size`, evenly spaced rows
    are kept (reading at most `max_rows_read` times the rows needed), so the
    eval covers the whole split rather than its first documents. If they give
    fewer, every row is kept and fewer batches come back (never repeated
    data), the last one padded with empty rows (segment 0, loss_mask 0).
    Always at least one batch.
    """
    _check_shapes(seq_len, batch_size)
    if num_batches < 1:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    sources = _sources(docs)
    _check_tokenizer(sources, tokenizer)
    sources = _shard(sources, process_index, process_count)
    ds = _dataset(sources, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=None,
                  num_epochs=1, num_threads=2)
    wanted = num_batches * batch_size
    rows = []
    for batch in ds:
        rows += [{k: v[r] for k, v in batch.items()} for r in range(batch_size)
                 if batch["segment_ids"][r].any()]
        if len(rows) >= wanted * max_rows_read:
            break
    if not rows:
        raise InputError("the eval documents hold no tokens")
    if len(rows) > wanted:
        keep = np.linspace(0, len(rows) - 1, wanted).round().astype(int)
        rows = [rows[i] for i in keep]
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows += [empty] * (-len(rows) % batch_size)
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def open_sources(data_cfg) -> tuple[Any, Any]:
    """(train, eval) documents of a DataConfig: `data.sources` (a weighted mixture, each
    source split alike) or else `data.corpus`. Lazy: nothing is read."""
    specs = data_cfg.sources or ((data_cfg.corpus, 1.0),)
    splits = [(split_corpus(open_corpus(path, max_docs=data_cfg.max_docs), data_cfg.eval_fraction), w)
              for path, w in specs]
    for (path, _), ((_, evals), _) in zip(specs, splits):
        if evals is None:
            raise InputError(f"corpus {path} has a single document: no eval split can be held out")
    if len(splits) == 1:
        (train, evals), _ = splits[0]
        return train, evals
    return [(t, w) for (t, _), w in splits], [(e, w) for (_, e), w in splits]
