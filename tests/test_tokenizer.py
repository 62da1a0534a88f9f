"""Sentencepiece tokenizer: exact round trips, special ids, save/load, determinism, errors."""

import pytest

from jaxlm.errors import InputError
from jaxlm.model.tokenizer import (
    MODEL_FILENAME,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from jaxlm.train.data import load_documents

VOCAB = 1024
MAX_CHARS = 300_000

TRICKY = [
    "",
    " ",
    "\n",
    "x",
    "def f(x):\n    return x\n",
    "class A:\n    def m(self):\n        if x:\n            pass\n\n\n",
    "    leading spaces",
    "trailing spaces   ",
    "a   b    c",
    "\n\n\n  \n\t\n",
    "\tif x:\n\t\treturn 1\n",
    "mixed \t tabs\t \tand spaces \n",
    "windows\r\nline\r\nendings\r\n",
    "lone\rcarriage",
    "中文注释 # 日本語のコメント 한국어",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 a\u0308 vs é ä",
    "fullwidth ＡＢＣ １２３ and ligature ﬁ",
    "nul \x00 and controls \x01\x07\x1b[0m\x7f",
    "zero width \u200b\u200d and bom \ufeff",
    "lower blocks \u2581 \u2581\u2581x\u2581",
    "\u2581",
    "numbers 1234567890 3.14159 0xFF 1e-10",
    "s = 'quotes' + \"double\" + '''triple''' \\ backslash",
]


@pytest.fixture(scope="module")
def docs():
    return load_documents("stdlib", max_docs=120)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece(docs, VOCAB, out, max_chars=MAX_CHARS, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)


def test_round_trip_real_code(tok, docs):
    """Documents beyond the training subsample come back exactly too."""
    for doc in docs[-20:]:
        assert tok.decode(tok.encode(doc)) == doc


def test_no_unknown_ids(tok):
    """Byte fallback: nothing maps to <unk>, even characters never seen."""
    unk = tok._sp.unk_id()
    for text in TRICKY + ["\U0001f9ec\u0bf5\u2f00 rare"]:
        assert unk not in tok.encode(text)


def test_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert tok.pad_id == 0
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.id_to_piece(tok.bos_id) == "<s>" and tok.id_to_piece(tok.eos_id) == "</s>"
    text = "x = 1\n"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == text


def test_trainer_options_take_effect(tok):
    """The options of train_sentencepiece, each seen in the encodings."""
    piece = tok.id_to_piece
    assert [piece(i) for i in tok.encode("\n")] == ["\n"]  # "\n" is one piece
    assert len(tok.encode(" " * 8)) == 1  # whitespace-only pieces (indentation)
    assert [piece(i) for i in tok.encode("12345")] == list("12345")  # split_digits:
    pieces = [piece(i) for i in range(tok.vocab_size)]
    assert not [p for p in pieces if len(p) > 1 and not p.startswith("<") and any(c.isdigit() for c in p)]
    assert [piece(i) for i in tok.encode("x")] == ["x"]  # no dummy prefix "▁x"
    assert "".join(piece(i) for i in tok.encode("a  b ")) == "a▁▁b▁"  # spaces kept, not collapsed
    assert [piece(i) for i in tok.encode("\U0001f600")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    assert Tokenizer.encode_batch(tok, TRICKY[:3]) == [tok.encode(t) for t in TRICKY[:3]]


def test_save_and_load(tok, tok_dir, tmp_path):
    path = tok.save(tmp_path / "copy")
    assert path == tmp_path / "copy" / MODEL_FILENAME
    assert path.read_bytes() == (tok_dir / MODEL_FILENAME).read_bytes()
    for loaded in (load_tokenizer(tmp_path / "copy"), load_tokenizer(path), load_tokenizer(str(path))):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_training_is_deterministic(docs, tok_dir, tmp_path):
    again = train_sentencepiece(docs, VOCAB, tmp_path / "again", max_chars=MAX_CHARS, seed=0)
    assert again.model_proto == (tok_dir / MODEL_FILENAME).read_bytes()
    # The subsample depends on the seed (documents are shuffled before the cut).
    other = train_sentencepiece(docs, VOCAB, tmp_path / "other", max_chars=MAX_CHARS, seed=1)
    assert other.model_proto != again.model_proto
    assert other.decode(other.encode(TRICKY[5])) == TRICKY[5]


def test_training_input_errors(tmp_path):
    with pytest.raises(InputError, match="no text"):
        train_sentencepiece(["", ""], 512, tmp_path / "a")
    with pytest.raises(InputError, match="[Vv]ocab"):
        train_sentencepiece(["def f(x):\n    return x\n"], 100, tmp_path / "b")
    assert not (tmp_path / "b" / MODEL_FILENAME).exists()


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(InputError, match=f"no {MODEL_FILENAME}"):
        load_tokenizer(tmp_path)
    corrupt = tmp_path / MODEL_FILENAME
    corrupt.write_bytes(b"\x08\x01garbage that is not a model" * 10)
    with pytest.raises(InputError, match="not a valid sentencepiece model"):
        load_tokenizer(tmp_path)
    corrupt.write_bytes(b"")
    with pytest.raises(InputError, match="not a valid sentencepiece model"):
        load_tokenizer(corrupt)
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(InputError, match="unsupported tokenizer file"):
        load_tokenizer(other)
