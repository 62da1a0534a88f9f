"""`jaxlm prepare` and streaming corpora: shards, process sharding, resume, mixtures, errors."""

import collections
import itertools
import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxlm.errors import ConfigError, InputError
from jaxlm.config import load_config, to_dict, config_from_dict
from jaxlm.model.tokenizer import load_tokenizer, train_sentencepiece
from jaxlm.scripts.cli import main as cli_main
from jaxlm.train import data
from jaxlm.train.data import load_documents, make_batches, open_corpus, split_corpus
from jaxlm.train.prepare import prepare

SEQ, BATCH = 16, 4


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def stream_pieces(tok, batches):
    """Real tokens in stream order, cut after each eos (each piece a whole document)."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()
    pieces, start = [], 0
    for i, token in enumerate(stream):
        if token == tok.eos_id:
            pieces.append(tuple(stream[start:i + 1]))
            start = i + 1
    assert start == len(stream)
    return pieces


@pytest.fixture(scope="module")
def tok(sp_tokenizer_file):
    return sp_tokenizer_file


def write_inputs(root: pathlib.Path) -> list[str]:
    """A few small inputs of every kind; returns their documents in prepare's order."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("def alpha():\n    return 1\n" * 3)
    (root / "b.md").write_text("# beta\n\nsome 中文 text\n")
    lines = [{"text": f"line {i}: " + "x = y + 1\n" * (i % 5 + 1)} for i in range(11)]
    (root / "c.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:6]) + "\n\n"
                                  + json.dumps({"text": "   "}) + "\n"
                                  + "\n".join(json.dumps(r) for r in lines[6:]) + "\n")
    rows = [f"parquet row {i}\n" + "print(i)\n" * (i % 3) for i in range(9)]
    pq.write_table(pa.table({"id": list(range(10)), "text": rows[:4] + [None] + rows[4:]}),
                   root / "d.parquet", row_group_size=4)
    return ([(root / "a.txt").read_text(), (root / "b.md").read_text()]
            + [r["text"] for r in lines] + rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("corpus")
    texts = write_inputs(root / "in")
    manifest = prepare(str(root / "in" / "*"), str(root / "out"), tokenizer=tok, records_per_shard=4)
    return root, texts, manifest


def expected_ids(tokenizer, texts):
    return [tuple([tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]) for t in texts]


def test_prepare_writes_each_document_once(corpus, tok):
    root, texts, manifest = corpus
    docs = open_corpus(str(root / "out"))
    tokenizer = load_tokenizer(tok)
    assert docs.kind == "tokens" and len(docs) == len(texts) == manifest["num_records"]
    stored = [tuple(np.frombuffer(docs.items[i], "<i4").tolist()) for i in range(len(docs))]
    assert stored == expected_ids(tokenizer, texts)  # file order, then record order
    assert manifest["num_tokens"] == sum(map(len, stored))
    shards = [len(e["shards"]) for e in manifest["inputs"]]
    assert shards == [1, 1, 3, 3]  # 11 jsonl docs and 9 parquet rows at 4 per shard
    assert all(s["records"] <= 4 for e in manifest["inputs"] for s in e["shards"])
    # The training side: one epoch gives every document exactly once, shuffled.
    batches = list(make_batches(docs, tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0, repeat=False))
    pieces = stream_pieces(tokenizer, batches)
    assert sorted(pieces) == sorted(stored) and pieces != stored
    assert all(set(b) == set(data.BATCH_KEYS) and b["tokens"].shape == (BATCH, SEQ) for b in batches)


def test_split_is_disjoint_and_lazy(corpus, tok, monkeypatch):
    root, texts, _ = corpus
    docs = open_corpus(str(root / "out"))
    train, evals = split_corpus(docs, 0.2)
    every = [docs.items[i] for i in range(len(docs))]
    got_train = [train.items[i] for i in range(len(train))]
    got_eval = [evals.items[i] for i in range(len(evals))]
    assert got_eval == every[4::5] and got_train == [r for i, r in enumerate(every) if i % 5 != 4]
    # stdlib and directories are read only when the pipeline asks.
    reads = []
    monkeypatch.setattr(data, "_read_text", lambda p: reads.append(p) or None)
    stdlib = open_corpus("stdlib")
    split_corpus(stdlib, 0.02)
    assert len(stdlib) > 500 and reads == []


def test_processes_read_disjoint_records_covering_the_epoch(corpus, tok):
    root, texts, _ = corpus
    tokenizer = load_tokenizer(tok)
    docs = open_corpus(str(root / "out"))
    shares = [stream_pieces(tokenizer, list(make_batches(
        docs, tokenizer, seq_len=SEQ, batch_size=BATCH, seed=1, repeat=False,
        process_index=i, process_count=2))) for i in range(2)]
    assert all(shares)
    counts = collections.Counter(p for share in shares for p in share)
    assert counts == collections.Counter(expected_ids(tokenizer, texts))  # disjoint, union = all


@pytest.mark.parametrize("k,small", [(0, None), (3, None), (17, None), (17, 2)])
def test_resume_after_a_kill_is_exact(corpus, tok, k, small, monkeypatch):
    """small=2: the shuffle of large corpora (grain's per-index MapDataset.shuffle)."""
    if small:
        monkeypatch.setattr(data, "_SMALL", small)
    root, _, _ = corpus
    tokenizer = load_tokenizer(tok)
    kwargs = dict(seq_len=SEQ, batch_size=BATCH, seed=4, shuffle_rows=8, process_index=1, process_count=2)
    reference = take(make_batches(open_corpus(str(root / "out")), tokenizer, **kwargs), k + 8)
    killed = make_batches(open_corpus(str(root / "out")), tokenizer, **kwargs)
    take(killed, k)
    state = json.loads(json.dumps(killed.get_state()))  # as stored in a checkpoint
    del killed
    fresh = make_batches(open_corpus(str(root / "out")), tokenizer, **kwargs)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 8), reference[k:])


def test_stdlib_streams_through_the_same_path(tok):
    tokenizer = load_tokenizer(tok)
    docs = open_corpus("stdlib", max_docs=6)
    assert docs.kind == "file" and len(docs) == 6
    batches = list(make_batches(docs, tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0, repeat=False))
    want = expected_ids(tokenizer, load_documents("stdlib", max_docs=6))
    assert sorted(stream_pieces(tokenizer, batches)) == sorted(want)


class _Bytes:
    """Ids = bytes + 3: a row's source is visible in its tokens."""
    vocab_size, pad_id, bos_id, eos_id = 260, 0, 1, 2

    def encode(self, text, split_special_tokens=False):
        return [3 + b for b in text.encode()]


def test_mixture_weights_hold_over_10k_rows():
    rng = np.random.default_rng(0)
    a = ["a" * int(n) for n in rng.integers(1, 40, 50)]  # short documents
    b = ["b" * int(n) for n in rng.integers(5, 90, 30)]  # long ones: weights are per row
    c = ["c" * int(n) for n in rng.integers(1, 20, 20)]
    weights = (0.2, 0.5, 0.3)
    batches = take(make_batches(list(zip((a, b, c), weights)), _Bytes(), seq_len=8, batch_size=100,
                                seed=0, shuffle_rows=2048), 100)
    rows = np.concatenate([x["tokens"] for x in batches])
    assert len(rows) == 10_000
    source = [next(chr(t - 3) for t in row if t > 2) for row in rows]
    assert all(len({t for t in row if t > 2}) == 1 for row in rows)  # sources are packed apart
    for name, w in zip("abc", weights):
        assert abs(source.count(name) / len(rows) - w) < 0.02, (name, source.count(name))
    # Row shuffling mixes the sources within batches.
    assert len({s for s in source[:100]}) == 3


def test_mixture_weights_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="weight"):
        make_batches([(["x"], 0.0), (["y"], 1.0)], _Bytes(), seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match=r"data.sources\[1\]"):
        load_config(None, ["data.sources=[{path: a, weight: 1}, {path: b, weight: -2}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\]"):
        load_config(None, ["data.sources=[{path: a, weight: 1, extra: 2}]"])
    cfg = load_config(None, ["data.sources=[{path: a, weight: 1}, {path: b, weight: 3}]"])
    assert cfg.data.sources == (("a", 1.0), ("b", 3.0))
    assert config_from_dict(to_dict(cfg)) == cfg


def test_mixture_of_prepared_and_raw_from_config(corpus, tok, tmp_path):
    root, texts, _ = corpus
    tokenizer = load_tokenizer(tok)
    (tmp_path / "raw").mkdir()
    for i in range(8):
        (tmp_path / "raw" / f"{i}.py").write_text(f"value_{i} = {i}\n")
    cfg = load_config(None, [f"data.sources=[{{path: {root / 'out'}, weight: 1}}, "
                             f"{{path: {tmp_path / 'raw'}, weight: 1}}]", "data.eval_fraction=0.25"])
    train, evals = data.open_sources(cfg.data)
    assert [len(d) for d, _ in train] == [len(texts) - len(texts) // 4, 6]
    assert [len(d) for d, _ in evals] == [len(texts) // 4, 2]
    first = take(make_batches(train, tokenizer, seq_len=SEQ, batch_size=BATCH, seed=0), 4)
    assert len(first) == 4
    assert data.eval_batches(evals, tokenizer, seq_len=SEQ, batch_size=BATCH, num_batches=2)


def test_wrong_tokenizer_is_refused(corpus, tmp_path):
    root, _, _ = corpus
    other = train_sentencepiece(load_documents("stdlib", max_docs=30), 400, tmp_path, max_chars=100_000)
    with pytest.raises(ConfigError, match="prepared with"):
        make_batches(open_corpus(str(root / "out")), other, seq_len=SEQ, batch_size=BATCH, seed=0)


def test_resume_after_an_interrupted_prepare_completes_identically(tmp_path, tok, corpus):
    _, _, reference = corpus
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = prepare(str(tmp_path / "in" / "*"), str(out), tokenizer=tok, records_per_shard=4)
    before = {p.name: p.read_bytes() for p in out.glob("*.array_record")}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
    assert [s["records"] for e in first["inputs"] for s in e["shards"]] == \
        [s["records"] for e in reference["inputs"] for s in e["shards"]]
    # "Interrupted": one shard of input 2 lost, a half-written temp shard, no manifest.
    (out / "00002-0001.array_record").unlink()
    (out / "00003-0000.array_record.tmp").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    with pytest.raises(InputError, match="not a prepared corpus"):
        open_corpus(str(out))
    again = prepare(str(tmp_path / "in" / "*"), str(out), tokenizer=tok, records_per_shard=4,
                    resume=True)
    assert again == first
    assert {p.name: p.read_bytes() for p in out.glob("*.array_record")} == before
    assert not list(out.glob("*.tmp"))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
    redone = {n for n in after if after[n] != stamps.get(n)}
    assert redone == {"00002-0000.array_record", "00002-0001.array_record", "00002-0002.array_record"}


def test_parallel_workers_write_the_same_shards(tmp_path, tok, corpus):
    root, _, reference = corpus
    prepare(str(root / "in" / "*"), str(tmp_path / "out"), tokenizer=tok, records_per_shard=4, workers=2)
    for p in (root / "out").glob("*.array_record"):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_tokens"] == reference["num_tokens"]


def test_prepare_errors_are_one_line(tmp_path, tok, corpus, capsys):
    root, _, _ = corpus

    def error_of(*args):
        assert cli_main(["prepare", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "matches no files" in error_of("--input", str(tmp_path / "none*.txt"), "--output", str(tmp_path / "o1"),
                                          "--tokenizer", tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert "bad.parquet" in error_of("--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "o2"),
                                     "--tokenizer", tok)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    msg = error_of("--input", str(tmp_path / "notext.parquet"), "--output", str(tmp_path / "o3"),
                   "--tokenizer", tok)
    assert "notext.parquet" in msg and "text" in msg
    msg = error_of("--input", str(root / "in" / "*.txt"), "--output", str(root / "out"), "--tokenizer", tok)
    assert "already holds shards" in msg and "--resume" in msg
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "00000-0000.array_record").write_bytes(b"")
    assert "already holds shards" in error_of("--input", str(root / "in" / "a.txt"), "--output",
                                              str(tmp_path / "o4"), "--tokenizer", tok)
    # a directory that is something else's (a model dir): refused, left as it was
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model_dir / name).write_text(name)
    msg = error_of("--input", str(root / "in" / "a.txt"), "--output", str(model_dir),
                   "--tokenizer", tok)
    assert "is not empty and not a prepared-data directory" in msg and "config.json" in msg
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors",
                                                           "tokenizer.json"]
    assert all((model_dir / n).read_text() == n for n in ("config.json", "tokenizer.json"))
    # and the command works
    assert cli_main(["prepare", "--input", str(root / "in" / "*.md"), "--output", str(tmp_path / "o5"),
                     "--tokenizer", tok]) == 0
    assert "prepared 1 files -> 1 shards, 1 documents" in capsys.readouterr().out


def test_train_on_a_prepared_corpus(corpus, tmp_path, tok):
    """`data.corpus=DIR` trains with the corpus's own tokenizer; another one is refused."""
    from jaxlm.train.loop import train
    root, _, _ = corpus
    tiny = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=16", "data.seq_len=16",
            "data.batch_size=2", "data.eval_fraction=0.2", "train.steps=2", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2", "mesh.devices=1",
            f"data.corpus={root / 'out'}"]
    summary = train(load_config(None, tiny + [f"run_dir={tmp_path / 'run'}"]), progress=False)
    assert summary["final_step"] == 2 and len(summary["eval"]) == 2
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == pathlib.Path(tok).read_bytes()
    other = train_sentencepiece(load_documents("stdlib", max_docs=30), 380, tmp_path / "other",
                                max_chars=100_000)
    with pytest.raises(ConfigError, match="prepared with"):
        train(load_config(None, tiny + [f"run_dir={tmp_path / 'run2'}",
                                        f"data.tokenizer={tmp_path / 'other' / 'tokenizer.model'}"]),
              progress=False)
    assert other.vocab_size == 380


def test_prepare_trains_a_tokenizer_when_none_is_given(tmp_path):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert cli_main(["prepare", "--input", str(tmp_path / "in" / "*"), "--output", str(out),
                     "--vocab-size", "300"]) == 0
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == 300
    manifest = json.loads((out / "manifest.json").read_text())
    # --resume without --tokenizer keeps the one saved with the shards: nothing changes.
    assert cli_main(["prepare", "--input", str(tmp_path / "in" / "*"), "--output", str(out), "--resume"]) == 0
    assert json.loads((out / "manifest.json").read_text()) == manifest
    docs = open_corpus(str(out))
    assert np.frombuffer(docs.items[0], "<i4").tolist() == list(expected_ids(
        tokenizer, [(tmp_path / "in" / "a.txt").read_text()])[0])
