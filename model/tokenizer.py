"""Tokenizers behind one small interface: sentencepiece, and HF tokenizer.json.

`train_sentencepiece` builds a byte-fallback BPE model for source code whose
`decode(encode(s)) == s` holds exactly for every string: spaces, tabs, blank
lines, "\\r\\n", and any Unicode (rare characters fall back to byte pieces).
`load_tokenizer` opens a saved tokenizer from a directory or a file.

Special ids of a trained model: pad=0, unk=1, bos=2, eos=3, then "\\n".
"""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import random
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from ..errors import InputError

MODEL_FILENAME = "tokenizer.model"
HF_TOKENIZER_FILENAME = "tokenizer.json"  # Hugging Face `tokenizers`
# Files next to tokenizer.json that name its special tokens (first wins).
_HF_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")

# sentencepiece writes whitespace as U+2581 ("▁") inside pieces and turns every
# "▁" back into a space on decode; a literal "▁" in the text is therefore
# encoded as its UTF-8 byte pieces, which decode to "▁" unchanged.
_SPACE_MARK = "\u2581"

# Trainer options; each one is checked by tests/test_tokenizer.py.
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # any character outside the vocab -> its UTF-8 bytes
    normalization_rule_name="identity",  # no NFKC: text is kept as is
    add_dummy_prefix=False,  # no space invented at the start
    remove_extra_whitespaces=False,  # keep leading/trailing/repeated spaces
    allow_whitespace_only_pieces=True,  # indentation runs become pieces
    split_digits=True,
    user_defined_symbols=["\n"],  # training lines have no "\n"; encode keeps it
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    character_coverage=0.9995,
    max_sentence_length=16384,  # bytes; longer lines are skipped in training
    input_sentence_size=0,  # use every line given (subsampled by us)
    shuffle_input_sentence=False,  # deterministic: same input -> same bytes
    minloglevel=2,  # quiet
)


class Tokenizer:
    """Interface: text <-> ids, special ids, and saving to a directory."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without bos/eos."""
        raise NotImplementedError

    def encode_chat(self, text: str) -> list[int]:
        """Ids of a rendered chat template: special-token strings ("<|im_start|>",
        "<s>") become their ids, the rest is encoded as `encode` does; no bos/eos added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (subclasses may parallelise)."""
        return [self.encode(t) for t in texts]

    def encode_input(self, text: str) -> list[int]:
        """Ids of `text` as a model reads it whole (a classifier's input): with the
        special tokens transformers' `tokenizer(text)` adds; here bos + `encode`."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids (pad/bos/eos) decode to nothing."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None for models that have none (T5)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None for a tokenizer that has none (generation then
        stops at max_new_tokens or at the stop ids given)."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Padding id, distinct from bos and eos."""
        raise NotImplementedError

    def save(self, directory) -> pathlib.Path:
        """Writes the tokenizer file into `directory`; returns its path."""
        raise NotImplementedError


def _checked_ids(ids, vocab_size: int) -> list[int]:
    """ids as ints in [0, vocab_size), or an InputError naming the first that is not."""
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise InputError("decode: ids must be an iterable of integer token ids") from None
    for pos, i in enumerate(out):
        if not 0 <= i < vocab_size:
            raise InputError(f"decode: id {i} at position {pos} is outside the tokenizer's "
                             f"vocabulary [0, {vocab_size})")
    return out


def require_eos(tokenizer, what: str) -> int:
    """tokenizer.eos_id, or an InputError saying that `what` needs one (a tokenizer
    may have no EOS: generation then runs to max_new_tokens; training cannot)."""
    if tokenizer.eos_id is None:
        raise InputError(f"{what} needs an EOS token, and the tokenizer has none (name "
                         "one as eos_token in tokenizer_config.json)")
    return tokenizer.eos_id


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (any type), held as its serialized bytes."""

    def __init__(self, model_proto: bytes):
        if not model_proto:
            raise InputError("not a valid sentencepiece model (empty)")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError
            raise InputError("not a valid sentencepiece model") from e
        self._proto = bytes(model_proto)
        self._bytes_of_mark = self._byte_ids(_SPACE_MARK)
        self._pad = self._find_pad_id()

    @classmethod
    def from_file(cls, path) -> SentencePieceTokenizer:
        """Loads a `.model` file; InputError if missing or corrupt."""
        path = pathlib.Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read tokenizer file {path}: {e.strerror or e}") from e
        try:
            return cls(data)
        except InputError as e:
            raise InputError(f"{path}: {e}") from e

    def _find_pad_id(self) -> int:
        """The model's pad id, else its unk id (e.g. Llama has no pad piece)."""
        specials = {self._sp.bos_id(), self._sp.eos_id()}
        for candidate in (self._sp.pad_id(), self._sp.unk_id()):
            if candidate >= 0 and candidate not in specials:
                return candidate
        raise InputError("sentencepiece model has no pad (or unk) id distinct from bos/eos")

    def _byte_ids(self, text: str) -> list[int] | None:
        """Byte-fallback ids of `text`, or None if the model has no byte pieces."""
        ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        if any(i == self._sp.unk_id() for i in ids):
            return None
        return ids

    def encode(self, text: str) -> list[int]:
        if _SPACE_MARK not in text or self._bytes_of_mark is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                ids.extend(self._bytes_of_mark)
            ids.extend(self._sp.encode(part))
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """`encode`, with the bos/eos piece strings ("<s>", "</s>") read as those ids."""
        specials = {self._sp.id_to_piece(i): i for i in (self._sp.bos_id(), self._sp.eos_id()) if i >= 0}
        pattern = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True))
        ids: list[int] = []
        start = 0
        for match in re.finditer(pattern, text):
            ids.extend(self.encode(text[start:match.start()]) if match.start() > start else [])
            ids.append(specials[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self.encode(text[start:]))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        texts = list(texts)
        out = self._sp.encode(texts, num_threads=num_threads)
        for i, text in enumerate(texts):
            if _SPACE_MARK in text:
                out[i] = self.encode(text)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_checked_ids(ids, self.vocab_size))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int | None:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    @property
    def eos_id(self) -> int | None:
        eos = self._sp.eos_id()
        return eos if eos >= 0 else None

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def model_proto(self) -> bytes:
        """The serialized model, byte for byte what `save` writes."""
        return self._proto

    def save(self, directory) -> pathlib.Path:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILENAME
        path.write_bytes(self._proto)
        return path


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram, ...), via `tokenizers`.

    `encode` reads text as text: a special token's string in the text (say
    "<|endoftext|>") is encoded as ordinary pieces, never as the special id,
    and no bos/eos/template tokens are added. Special ids come from
    tokenizer_config.json / special_tokens_map.json beside the file if present,
    else from the tokenizer's added tokens by their usual names (<s>, </s>,
    <|endoftext|>, ...); a tokenizer_config.json that names no bos_token means no
    BOS (Qwen, T5), as in transformers. pad: the pad token, else unk, else eos.
    """

    _BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
    _EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")
    _PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
    _UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")

    def __init__(self, json_text: str, special_files: dict[str, str] | None = None):
        from tokenizers import Tokenizer as _Tokenizer
        try:
            self._tok = _Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise InputError(f"not a valid tokenizer.json ({_one_line(e)})") from e
        self._tok.encode_special_tokens = True
        self._json = json_text
        self._special_files = dict(special_files or {})
        named = self._named_special_tokens()
        # transformers reads the BOS from tokenizer_config.json alone: a config that names
        # none (Qwen: null; transformers 5 leaves the key out) means no BOS
        no_bos = "tokenizer_config.json" in self._special_files and "bos_token" not in named
        self._bos = None if no_bos else self._pick(named.get("bos_token"), self._BOS_NAMES)
        self._eos = self._pick(named.get("eos_token"), self._EOS_NAMES)  # None: no EOS
        unk = self._pick(named.get("unk_token"), self._UNK_NAMES)
        if unk is None and getattr(self._tok.model, "unk_token", None):  # BPE/WordPiece unk
            unk = self._tok.token_to_id(self._tok.model.unk_token)
        pad = self._pick(named.get("pad_token"), self._PAD_NAMES)
        self._pad = next((i for i in (pad, unk, self._eos) if i is not None), None)
        if self._pad is None:
            raise InputError("tokenizer.json has no pad, unk or eos token to pad with (name "
                             "one as pad_token in tokenizer_config.json)")
        self._skip = {i for i in (self._bos, self._eos, self._pad) if i is not None}

    @classmethod
    def from_file(cls, path) -> HFTokenizer:
        """Loads `tokenizer.json` (+ the special-token files beside it); InputError if bad."""
        path = pathlib.Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            special = {name: (path.parent / name).read_text(encoding="utf-8")
                       for name in _HF_SPECIAL_FILES if (path.parent / name).is_file()}
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read tokenizer file {path}: "
                             f"{getattr(e, 'strerror', None) or e}") from e
        try:
            return cls(text, special)
        except InputError as e:
            raise InputError(f"{path}: {e}") from e

    def _named_special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...} from the special-token files (first file wins)."""
        names: dict[str, str] = {}
        for file_name in _HF_SPECIAL_FILES:
            if file_name not in self._special_files:
                continue
            try:
                data = json.loads(self._special_files[file_name])
            except ValueError as e:
                raise InputError(f"{file_name} is not valid JSON") from e
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = data.get(key) if isinstance(data, dict) else None
                if isinstance(value, dict):  # a serialized AddedToken
                    value = value.get("content")
                if isinstance(value, str) and key not in names:
                    names[key] = value
        return names

    def _pick(self, configured: str | None, usual: Sequence[str]) -> int | None:
        if configured is not None:
            return self._tok.token_to_id(configured)
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        for name in usual:
            if name in added:
                return added[name]
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _chat_tok(self):
        """A second copy that reads special-token strings as their ids (built on first use)."""
        from tokenizers import Tokenizer as _Tokenizer
        tok = _Tokenizer.from_str(self._json)
        tok.encode_special_tokens = False
        return tok

    def encode_chat(self, text: str) -> list[int]:
        """`encode`, but added special tokens' strings ("<|im_start|>") are their ids,
        as transformers tokenizes a rendered chat template."""
        return self._chat_tok.encode(text, add_special_tokens=False).ids

    def encode_input(self, text: str) -> list[int]:
        """As transformers' `tokenizer(text)`: the tokenizer.json's post-processor adds
        its special tokens (BERT's [CLS] ... [SEP], Llama's BOS), and special-token
        strings in the text are their ids."""
        return self._chat_tok.encode(text, add_special_tokens=True).ids

    @property
    def special_token_strings(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., ...}: the config's names, else the chosen ids' tokens.

        What transformers passes a chat template (its special_tokens_map)."""
        named = self._named_special_tokens()
        if not named:
            ids = {"bos_token": self._bos, "eos_token": self._eos}
            named = {k: self._tok.id_to_token(i) for k, i in ids.items() if i is not None}
        return named

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in _checked_ids(ids, self.vocab_size)
                                 if i not in self._skip],
                                skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def save(self, directory) -> pathlib.Path:
        """Writes tokenizer.json as loaded (+ the special-token files it came with)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self._special_files.items():
            (directory / name).write_text(text, encoding="utf-8")
        path = directory / HF_TOKENIZER_FILENAME
        path.write_text(self._json, encoding="utf-8")
        return path


def _one_line(e: BaseException) -> str:
    """The readable part of a sentencepiece error, on one line."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[-1].rsplit("] ", 1)[-1]


def _training_lines(texts: Iterable[str], max_chars: int, seed: int) -> list[str]:
    """Non-empty lines of the documents in a seeded order, up to `max_chars`."""
    docs = [t for t in texts if t]
    random.Random(seed).shuffle(docs)
    lines: list[str] = []
    total = 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line:
                continue
            lines.append(line)
            total += len(line)
            if total >= max_chars:
                return lines
    return lines


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir,
    *,
    max_chars: int = 4_000_000,
    seed: int = 0,
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE model and saves it as `out_dir/tokenizer.model`.

    The documents are shuffled with `seed` and cut at `max_chars` characters;
    sentencepiece then trains on their lines ("\\n" is a user-defined piece).
    Deterministic: the same arguments give the same model bytes.
    """
    lines = _training_lines(texts, max_chars, seed)
    if not lines:
        raise InputError("no text to train the tokenizer on (all documents are empty)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=num_threads,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as e:  # e.g. vocab_size too small or too large for the text
        raise InputError(f"sentencepiece training failed: {_one_line(e)}") from e
    tokenizer = SentencePieceTokenizer(model.getvalue())
    tokenizer.save(out_dir)
    return tokenizer


def load_tokenizer(path) -> Tokenizer:
    """Opens a tokenizer: a directory (a jaxlm run dir: `tokenizer.model`, else
    `tokenizer.json`; a Hugging Face dir: `tokenizer.json`, what transformers' fast
    tokenizer reads, else `tokenizer.model`), or the file itself."""
    path = pathlib.Path(os.fspath(path))
    if path.is_dir():
        path = _tokenizer_file_in(path)
    elif not path.is_file():
        raise InputError(f"tokenizer not found: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if path.name.endswith(".json"):
        return HFTokenizer.from_file(path)
    raise InputError(f"unsupported tokenizer file {path} "
                     "(expected a sentencepiece .model or a Hugging Face tokenizer.json)")


def _tokenizer_file_in(directory: pathlib.Path) -> pathlib.Path:
    """The tokenizer file inside a directory (first match in preference order)."""
    hf_dir = (directory / "config.json").is_file() and not (directory / "config.yaml").is_file()
    names = (HF_TOKENIZER_FILENAME, MODEL_FILENAME) if hf_dir else (MODEL_FILENAME,
                                                                     HF_TOKENIZER_FILENAME)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise InputError(f"no {MODEL_FILENAME} (or {HF_TOKENIZER_FILENAME}) in {directory}")
