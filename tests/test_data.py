"""grain pipeline: packed rows, exact documents, determinism, resume, splits, shards, corpora."""

import collections
import itertools
import json

import numpy as np
import pytest

from jaxlm.errors import CheckpointError, InputError
from jaxlm.train.data import (
    BATCH_KEYS,
    eval_batches,
    load_documents,
    make_batches,
    split_documents,
    stdlib_sources,
)

SEQ, BATCH = 32, 4

EXTRA_DOCS = [
    "x",
    "\n\n    \n",
    "print('中文 😀 e\u0301 \u2581 \t tab')\r\n",
    "def f():\n" + "    return 1\n" * 60,  # spans several rows
]


@pytest.fixture(scope="module")
def tok(sp_tokenizer):
    return sp_tokenizer


@pytest.fixture(scope="module")
def docs():
    """~40 small distinct stdlib files plus a few awkward documents."""
    small = [d for d in load_documents("stdlib", max_docs=400) if len(d) < 3000]
    return sorted(set(small[:40] + EXTRA_DOCS))


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def check_row(tok, tokens, targets, positions, segments, mask):
    """Recomputes one row's positions, targets and mask from its segment ids."""
    real = segments > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the end"
    for t in range(len(tokens)):
        if not real[t]:
            assert tokens[t] == targets[t] == tok.pad_id and positions[t] == 0 and mask[t] == 0
            continue
        starts = t == 0 or segments[t] != segments[t - 1]
        assert segments[t] == (1 if t == 0 else segments[t - 1] + starts)
        assert positions[t] == (0 if starts else positions[t - 1] + 1)
        has_next = t + 1 < len(tokens) and segments[t + 1] == segments[t]
        assert mask[t] == float(has_next)
        assert targets[t] == (tokens[t + 1] if has_next else tok.pad_id)


def stream_documents(tok, batches):
    """Real tokens in stream order, cut after each eos, decoded."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()
    assert stream[-1] == tok.eos_id
    pieces, start = [], 0
    for i, token in enumerate(stream):
        if token == tok.eos_id:
            pieces.append(stream[start : i + 1])
            start = i + 1
    return pieces


def decoded_docs(tok, batches):
    out = []
    for ids in stream_documents(tok, batches):
        assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:-1]
        out.append(tok.decode(ids[1:-1]))
    return out


def test_batch_layout_and_rows(tok, docs):
    batches = take(make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=0), 60)
    for b in batches:
        assert tuple(b) == BATCH_KEYS
        assert all(b[k].shape == (BATCH, SEQ) for k in BATCH_KEYS)
        assert all(b[k].dtype == np.int32 for k in BATCH_KEYS if k != "loss_mask")
        assert b["loss_mask"].dtype == np.float32
        for row in range(BATCH):
            check_row(tok, *(b[k][row] for k in BATCH_KEYS))
    # Concatenate-then-split: infinite stream rows are always full.
    assert all((b["segment_ids"] > 0).all() for b in batches)
    # Some row holds several documents, some document spans several rows.
    assert any(b["segment_ids"].max() > 1 for b in batches)
    assert all((b["positions"][:, 0] == 0).all() for b in batches)
    assert any((b["tokens"][:, 0] != tok.bos_id).any() for b in batches)  # continued documents


def test_one_epoch_gives_every_document_exactly(tok, docs):
    batches = list(make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=3, repeat=False))
    for ids in stream_documents(tok, batches):
        # Independent check of the ids against the tokenizer itself.
        assert ids[1:-1] == tok.encode(tok.decode(ids[1:-1]))
    assert sorted(decoded_docs(tok, batches)) == sorted(docs)
    total = sum(len(tok.encode(d)) + 2 for d in docs)
    assert len(batches) == -(-total // (SEQ * BATCH))
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == total
    for b in batches:
        for row in range(BATCH):
            check_row(tok, *(b[k][row] for k in BATCH_KEYS))


def test_epochs_reshuffle(tok, docs):
    batches = list(make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=0, num_epochs=2))
    texts = decoded_docs(tok, batches)
    assert len(texts) == 2 * len(docs)
    first, second = texts[: len(docs)], texts[len(docs) :]
    assert sorted(first) == sorted(second) == sorted(docs)
    assert first != second and first != docs


def test_repeat_is_infinite(tok):
    few = ["a = 1\n", "b = 2\n"]
    batches = take(make_batches(few, tok, seq_len=SEQ, batch_size=BATCH, seed=0), 50)
    assert len(batches) == 50


def test_deterministic_and_seeded(tok, docs):
    def run(seed):
        return take(make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=seed), 25)

    assert_batches_equal(run(7), run(7))
    assert not np.array_equal(run(7)[0]["tokens"], run(8)[0]["tokens"])


@pytest.mark.parametrize("k", [0, 1, 2, 5, 13, 40])
def test_resume_from_state(tok, docs, k):
    kwargs = dict(seq_len=SEQ, batch_size=BATCH, seed=11)
    reference = take(make_batches(docs, tok, **kwargs), k + 6)
    first = make_batches(docs, tok, **kwargs)
    take(first, k)
    state = json.loads(json.dumps(first.get_state()))  # as stored in a checkpoint
    resumed = make_batches(docs, tok, **kwargs)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), reference[k:])
    assert_batches_equal(take(first, 6), reference[k:])  # get_state does not disturb


def test_resume_across_epoch_boundary(tok):
    few = ["alpha = 1\n" * 9, "beta = 2\n" * 5, "gamma()\n"]
    kwargs = dict(seq_len=8, batch_size=2, seed=5)
    reference = take(make_batches(few, tok, **kwargs), 60)
    for k in (7, 23, 41):
        it = make_batches(few, tok, **kwargs)
        take(it, k)
        fresh = make_batches(few, tok, **kwargs)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        assert_batches_equal(take(fresh, 10), reference[k : k + 10])


def test_state_from_another_pipeline_is_refused(tok, docs):
    state = make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=0).get_state()
    other = make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=1)
    with pytest.raises(CheckpointError):
        other.set_state(state)
    with pytest.raises(CheckpointError):
        other.set_state({"bogus": 1})


def test_eval_batches(tok, docs):
    batches = eval_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, num_batches=1000)
    # In document order, once: the whole stream is the documents in order.
    expected = [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()
    assert stream == expected
    assert len(batches) == -(-len(expected) // (SEQ * BATCH))
    last = batches[-1]
    assert last["tokens"].shape == (BATCH, SEQ) and (last["segment_ids"] == 0).any()
    assert last["loss_mask"][last["segment_ids"] == 0].sum() == 0
    for b in batches:
        for row in range(BATCH):
            check_row(tok, *(b[k][row] for k in BATCH_KEYS))
    # Fewer batches than the split holds: evenly spaced rows from all of it, in order.
    all_rows = [b["tokens"][r] for b in batches for r in range(BATCH) if b["segment_ids"][r].any()]
    spread = eval_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, num_batches=3,
                          max_rows_read=10**6)
    assert len(spread) == 3
    picked = [b["tokens"][r] for b in spread for r in range(BATCH)]
    keep = np.linspace(0, len(all_rows) - 1, 3 * BATCH).round().astype(int)
    for got, i in zip(picked, keep):
        np.testing.assert_array_equal(got, all_rows[i])
    assert_batches_equal(spread, eval_batches(docs, tok, seq_len=SEQ, batch_size=BATCH,
                                              num_batches=3, max_rows_read=10**6))


def test_split_documents(docs):
    train, evals = split_documents(docs, 0.2, seed=0)
    assert set(train).isdisjoint(evals) and sorted(train + evals) == sorted(docs)
    assert len(evals) == round(0.2 * len(docs))
    assert split_documents(docs, 0.2, seed=0) == (train, evals)
    assert split_documents(docs, 0.2, seed=1)[1] != evals
    assert [len(part) for part in split_documents(["a", "b"], 0.01, seed=0)] == [1, 1]
    assert split_documents(["a"], 0.5, seed=0) == (["a"], [])
    one = "".join(f"line {i}\n" for i in range(100))  # a one-file corpus: split by characters
    (train_part,), (eval_part,) = split_documents([one], 0.1, seed=0)
    assert train_part + eval_part == one and eval_part.startswith("line ")
    assert abs(len(eval_part) - 0.1 * len(one)) <= len("line 99\n")


def test_process_shards_are_disjoint(tok, docs):
    shards = [
        decoded_docs(tok, list(make_batches(docs, tok, seq_len=SEQ, batch_size=BATCH, seed=0, repeat=False,
                                            process_index=i, process_count=3)))
        for i in range(3)
    ]
    counts = collections.Counter(d for shard in shards for d in shard)
    assert sorted(counts) == sorted(docs) and set(counts.values()) == {1}
    assert all(shards)


def test_stdlib_sources():
    files = stdlib_sources()
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    assert load_documents("stdlib", max_docs=5) == [f.read_text("utf-8") for f in files[:5]]


def test_load_documents_from_directory_and_files(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("import os\n")
    (tmp_path / "pkg" / "sub" / "b.md").write_text("# title\n")
    (tmp_path / "c.txt").write_text("plain 中文\n")
    (tmp_path / "d.bin").write_bytes(b"\x00\x01")
    (tmp_path / "bad.py").write_bytes(b"caf\xe9 = 1\n")  # latin-1: skipped
    (tmp_path / "blank.py").write_text("  \n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.py").write_text("secret\n")
    assert load_documents(str(tmp_path)) == ["plain 中文\n", "import os\n", "# title\n"]
    assert load_documents(str(tmp_path), max_docs=1) == ["plain 中文\n"]
    assert load_documents(str(tmp_path / "c.txt")) == ["plain 中文\n"]

    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 2}\n{"text": "lone \\ud800"}\n')
    assert load_documents(str(jsonl)) == ["one", "two\nlines"]
    jsonl.write_text('{"text": "one"}\n{"body": "no text"}\n')
    with pytest.raises(InputError, match=r"corpus.jsonl:2"):
        load_documents(str(jsonl))


def test_bad_corpus_is_an_input_error(tmp_path, tok):
    with pytest.raises(InputError, match="corpus not found"):
        load_documents(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="no documents"):
        load_documents(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="utf-8"):
        load_documents(str(tmp_path / "latin1.txt"))
    with pytest.raises(InputError):
        make_batches([], tok, seq_len=SEQ, batch_size=BATCH, seed=0)
    with pytest.raises(InputError, match="no documents"):
        make_batches(["only one"], tok, seq_len=SEQ, batch_size=BATCH, seed=0, process_index=1, process_count=2)
