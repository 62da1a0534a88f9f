"""SFT data: packed loss == per-example loss, assistant masks, packing, resume, errors."""

import ast
import collections
import itertools
import json
import textwrap

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import InputError
from jaxlm.model.chat import DEFAULT_CHAT_TEMPLATE
from jaxlm.model.tokenizer import HFTokenizer
from jaxlm.train.data import BATCH_KEYS, stdlib_sources
from jaxlm.train.sft import (chat_example, check_sft_record, load_sft_records, sft_batches,
                             sft_eval_batches, split_records, stdlib_sft_records, tokenize_sft)

SEQ, BATCH = 48, 4
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "def return print value list of numbers sum total").split()


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi)))


@pytest.fixture(scope="module")
def tok(sp_tokenizer):
    return sp_tokenizer


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(1)
    recs = [{"prompt": _text(rng, 1, 6), "completion": _text(rng, 1, 5)} for _ in range(40)]
    recs.append({"prompt": _text(rng, 3, 5), "completion": _text(rng, 60, 70)})  # truncated
    recs.append({"prompt": _text(rng, 60, 70), "completion": "x"})  # no loss left: dropped
    return recs


def oracle_example(tok, record, seq_len=SEQ):
    """[bos] + prompt + completion + [eos] and its loss flags, cut to seq_len."""
    prompt = [tok.bos_id] + tok.encode(record["prompt"])
    tokens = prompt + tok.encode(record["completion"]) + [tok.eos_id]
    flags = [0] * len(prompt) + [1] * (len(tokens) - len(prompt))
    return tokens[:seq_len], flags[:seq_len]


def segments_of(batch):
    """(tokens, loss flags of the tokens) of every example in a batch, row by row."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in sorted(set(seg[seg > 0].tolist())):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and (batch["positions"][r, idx] == np.arange(len(idx))).all()
            tokens = batch["tokens"][r, idx]
            np.testing.assert_array_equal(batch["targets"][r, idx[:-1]], tokens[1:])
            assert batch["loss_mask"][r, idx[-1]] == 0
            out.append((tokens.tolist(), [0] + batch["loss_mask"][r, idx[:-1]].astype(int).tolist()))
        assert batch["loss_mask"][r, seg == 0].sum() == 0
    return out


@pytest.mark.parametrize("bins", [None, 16])
def test_batches_hold_every_example_whole_once(tok, records, bins):
    it = sft_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=3, num_epochs=1,
                     packing_bins=bins)
    batches = list(it)
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert b[k].shape == (BATCH, SEQ)
            assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    got = collections.Counter(json.dumps(s) for b in batches for s in segments_of(b))
    expected = [oracle_example(tok, r) for r in records]
    kept = [e for e in expected if any(e[1][1:])]
    assert got == collections.Counter(json.dumps(e) for e in kept)
    assert it.stats == {"examples": len(kept), "dropped": len(expected) - len(kept),
                        "truncated": sum(len(oracle_example(tok, r, 10**6)[0]) > SEQ for r in records)}
    assert it.stats["truncated"] >= 2 and it.stats["dropped"] >= 1 and it.stats["examples"] > 30
    assert max(len(set(b["segment_ids"][r].tolist()) - {0}) for b in batches for r in range(BATCH)) > 1


def test_loss_all_marks_every_prediction(tok, records):
    batch = next(sft_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=0, loss_on="all"))
    same = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, 1:] > 0)
    np.testing.assert_array_equal(batch["loss_mask"][:, :-1], same.astype(np.float32))


def test_packed_loss_equals_per_example_loss(tok, records):
    cfg = jaxlm.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                            max_seq_len=64, attention_impl="xla")
    params = jaxlm.init_params(cfg, jax.random.key(0))
    forward = jax.jit(lambda t, p, s: jaxlm.forward(params, cfg, t, p, s)[0])
    alone = jax.jit(lambda t: jaxlm.forward(params, cfg, t)[0])  # default positions 0..
    batches = list(sft_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=5, num_epochs=1))
    packed_sum = packed_count = 0.0
    for b in batches:
        logp = jax.nn.log_softmax(forward(b["tokens"], b["positions"], b["segment_ids"]), -1)
        nll = -np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
        packed_sum += float((nll * b["loss_mask"]).sum())
        packed_count += float(b["loss_mask"].sum())
    alone_sum = alone_count = 0.0
    for record in records:
        tokens, flags = oracle_example(tok, record)
        t = np.zeros((1, SEQ), np.int32)  # causal: the padding after the example changes nothing
        t[0, :len(tokens)] = tokens
        logp = np.asarray(jax.nn.log_softmax(alone(t)[0], -1))
        for i in range(len(tokens) - 1):
            if flags[i + 1]:
                alone_sum -= logp[i, tokens[i + 1]]
                alone_count += 1
    assert packed_count == alone_count
    np.testing.assert_allclose(packed_sum / packed_count, alone_sum / alone_count, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 3, 11])
def test_resume_continues_exactly(tok, records, k):
    def make():
        return sft_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=7)
    a = make()
    list(itertools.islice(a, k))
    state = json.loads(json.dumps(a.get_state()))
    expected = list(itertools.islice(a, 5))
    b = make()
    b.set_state(state)
    for x, y in zip(expected, itertools.islice(b, 5)):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_epochs_reshuffle_and_seed(tok, records):
    def first(seed):
        return next(sft_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=seed))["tokens"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_eval_split_and_sharding(tok, records):
    train, held = split_records(records, 0.25, seed=0)
    assert len(held) == 10 and not {json.dumps(r) for r in train} & {json.dumps(r) for r in held}
    evals = sft_eval_batches(held, tok, seq_len=SEQ, batch_size=BATCH, num_batches=8)
    got = collections.Counter(json.dumps(s) for b in evals for s in segments_of(b))
    assert got == collections.Counter(json.dumps(oracle_example(tok, r)) for r in held
                                      if any(oracle_example(tok, r)[1][1:]))
    again = sft_eval_batches(held, tok, seq_len=SEQ, batch_size=BATCH, num_batches=8)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(evals, again))
    assert len(sft_eval_batches(held, tok, seq_len=SEQ, batch_size=1, num_batches=2)) == 2
    shards = [collections.Counter(json.dumps(s) for b in sft_batches(
        records, tok, seq_len=SEQ, batch_size=BATCH, seed=0, num_epochs=1, process_index=i,
        process_count=2) for s in segments_of(b)) for i in range(2)]
    assert not shards[0] & shards[1]
    assert sum(shards, collections.Counter()) == collections.Counter(
        json.dumps(oracle_example(tok, r)) for r in records if any(oracle_example(tok, r)[1][1:]))


# ---------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def chatml_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(WORDS * 5, trainers.BpeTrainer(show_progress=False,
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(t.to_str(), {"tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>"})})


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
        {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "a dog"},
        {"role": "assistant", "content": "lazy dog\nsum"}]


def test_chat_mask_covers_exactly_the_assistant_turns(chatml_tok):
    tokens, is_loss = chat_example(CHAT, chatml_tok, DEFAULT_CHAT_TEMPLATE)
    expected_tokens, expected_loss = [], []
    for m in CHAT:  # independent: ChatML pieces tokenized one by one
        head = chatml_tok.encode_chat(f"<|im_start|>{m['role']}\n")
        body = chatml_tok.encode_chat(f"{m['content']}<|im_end|>\n")
        expected_tokens += head + body
        expected_loss += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert tokens.tolist() == expected_tokens
    assert is_loss.astype(int).tolist() == expected_loss
    im_end = chatml_tok.encode_chat("<|im_end|>")
    assert len(im_end) == 1 and im_end[0] in tokens[is_loss].tolist()
    tokens, is_loss = chat_example(CHAT[:3], chatml_tok, DEFAULT_CHAT_TEMPLATE)
    batch = next(sft_batches([{"messages": CHAT[:3]}], chatml_tok, seq_len=64, batch_size=1, seed=0))
    n = len(tokens)
    np.testing.assert_array_equal(batch["tokens"][0, :n], tokens)
    np.testing.assert_array_equal(batch["loss_mask"][0, :n - 1], is_loss[1:])


def test_trl_conversational_prompt_completion_puts_loss_on_the_completion_only(chatml_tok):
    """TRL's {"prompt": [messages], "completion": [messages]}: the conversation rendered
    whole, loss on the completion's turns only (an assistant turn inside the prompt
    carries none), and bad records name their line."""
    record = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    tokens, is_loss = tokenize_sft(record, chatml_tok, DEFAULT_CHAT_TEMPLATE)
    expected_tokens, expected_loss = [], []
    for i, m in enumerate(CHAT):  # independent: ChatML pieces tokenized one by one
        head = chatml_tok.encode_chat(f"<|im_start|>{m['role']}\n")
        body = chatml_tok.encode_chat(f"{m['content']}<|im_end|>\n")
        expected_tokens += head + body
        expected_loss += [0] * len(head) + [int(i >= 4)] * len(body)
    assert tokens.tolist() == expected_tokens
    assert is_loss.astype(int).tolist() == expected_loss
    check_sft_record(record)
    with pytest.raises(InputError, match=r"f.jsonl:2: completion: the conversation has no "
                                         "assistant turn"):
        check_sft_record({"prompt": CHAT[:2], "completion": [CHAT[1]], "where": "f.jsonl:2"})
    with pytest.raises(InputError, match=r"f.jsonl:2: prompt: \"messages\" should be"):
        check_sft_record({"prompt": "p", "completion": CHAT[2:3], "where": "f.jsonl:2"})


def test_template_breaking_the_prefix_assumption_is_refused(chatml_tok):
    drops_old_turns = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                       "[old]{% else %}{{ m.content }}{% endif %}{% endfor %}")
    with pytest.raises(InputError, match="not a token prefix"):
        chat_example(CHAT, chatml_tok, drops_old_turns, where="f.jsonl:3")


# ---------------------------------------------------------------- files and errors


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_load_files_globs_and_lists(tmp_path):
    _write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}, "", {"messages": CHAT}])
    _write(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "d", "extra": 1}])
    one = load_sft_records(str(tmp_path / "a.jsonl"))
    assert [r["where"] for r in one] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:3"]
    assert len(load_sft_records(str(tmp_path / "*.jsonl"))) == 3
    both = load_sft_records(f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.jsonl'}")
    assert [r["prompt"] for r in both if "prompt" in r] == ["q", "p"]
    assert len(load_sft_records([str(tmp_path / "a.jsonl")], max_records=1)) == 1


@pytest.mark.parametrize("line, match", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ({"text": "x"}, r"bad\.jsonl:2: expected .*prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: .*no assistant turn"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
     r"bad\.jsonl:2: message 0 \(user\) has a non-string"),
    ({"prompt": "p", "completion": 3}, r"bad\.jsonl:2: \"completion\" is not a string"),
    ([1, 2], r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, match):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, line])
    with pytest.raises(InputError, match=match):
        load_sft_records(str(path))


def test_missing_sources(tmp_path):
    with pytest.raises(InputError, match="no file matches"):
        load_sft_records(str(tmp_path / "*.jsonl"))
    with pytest.raises(InputError, match="not found"):
        load_sft_records(str(tmp_path / "none.jsonl"))


# ---------------------------------------------------------------- stdlib set


def test_stdlib_sft_records_are_functions_split_after_the_docstring():
    files = [p for p in stdlib_sources() if p.name in ("textwrap.py", "shlex.py", "colorsys.py")]
    recs = stdlib_sft_records(files=files, max_chars=800, max_body_lines=20)
    assert len(recs) >= 5 and recs == stdlib_sft_records(files=files, max_chars=800, max_body_lines=20)
    assert len(stdlib_sft_records(files=files, max_records=3)) == 3
    for r in recs:
        path, line = r["where"].rsplit(":", 1)
        text = open(path, encoding="utf-8").read()
        node = next(n for n in ast.walk(ast.parse(text))
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.lineno == int(line))
        source = textwrap.dedent(" " * node.col_offset + ast.get_source_segment(text, node))
        assert r["prompt"] + r["completion"] == source + "\n"
        assert r["prompt"].lstrip().startswith(("def ", "async def "))
        function = ast.parse(source).body[0]  # the prompt ends where the docstring does
        assert r["prompt"].count("\n") == function.body[0].end_lineno
        assert ast.get_docstring(function) == ast.get_docstring(node) and r["completion"].strip()


def test_finetune_data_from_config(tmp_path, tok, records):
    from jaxlm.config import config_from_dict
    from jaxlm.train.sft import finetune_data
    _write(tmp_path / "sft.jsonl", records[:12])
    _write(tmp_path / "dpo.jsonl", [{"prompt": r["prompt"], "chosen": r["completion"],
                                     "rejected": "dog"} for r in records[:12]])
    for kind in ("sft", "dpo"):
        cfg = config_from_dict({"data": {"corpus": str(tmp_path / f"{kind}.jsonl"), "seq_len": SEQ,
                                         "batch_size": 4, "eval_fraction": 0.25},
                                "train": {"eval_batches": 2, "sft_loss_on": "all"}})
        batches, evals = finetune_data(kind, cfg, tok, template=None, batch_size=2)
        batch = next(batches)
        rows = batch if kind == "sft" else batch["chosen"]
        assert rows["tokens"].shape == (2, SEQ) and evals
        ev = evals[0] if kind == "sft" else evals[0]["chosen"]
        assert ev["tokens"].shape == (4, SEQ)
        assert batches.stats["examples"] == 9
    one = _write(tmp_path / "one.jsonl", records[:1])
    with pytest.raises(InputError, match="too few"):
        finetune_data("sft", config_from_dict({"data": {"corpus": str(one)}}), tok, template=None)


def test_stdlib_sft_limits_scale_with_rows():
    files = [p for p in stdlib_sources() if p.name in ("textwrap.py", "shlex.py", "colorsys.py")]
    from jaxlm.train.sft import stdlib_sft_limits
    small, large = stdlib_sft_limits(64), stdlib_sft_limits(512)
    assert small["max_chars"] < large["max_chars"] and small["max_body_lines"] < large["max_body_lines"]
    few, many = (stdlib_sft_records(files=files, **lim) for lim in (small, large))
    assert len(few) < len(many)
    assert all(len(r["prompt"]) + len(r["completion"]) <= small["max_chars"] for r in few)
    assert stdlib_sft_limits(None) == stdlib_sft_limits(128)
