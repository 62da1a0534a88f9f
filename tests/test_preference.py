"""DPO preference data: paired rows, response-only masks, resume, errors."""

import itertools
import json

import numpy as np
import pytest

from jaxlm.errors import InputError
from jaxlm.model.chat import DEFAULT_CHAT_TEMPLATE, render_chat, template_tokens
from jaxlm.model.tokenizer import HFTokenizer
from jaxlm.train.data import BATCH_KEYS
from jaxlm.train.preference import dpo_batches, dpo_eval_batches, load_preference_records

SEQ, BATCH = 40, 3
WORDS = "the quick brown fox jumps over a lazy dog seven wizards hex".split()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(WORDS * 5, trainers.BpeTrainer(show_progress=False,
        vocab_size=280, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(t.to_str(), {"tokenizer_config.json": json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>"})})


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi)))


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    recs = [{"prompt": _words(rng, 1, 4), "chosen": _words(rng, 1, 4), "rejected": _words(rng, 1, 5)}
            for _ in range(8)]
    recs.append({"prompt": [{"role": "user", "content": "the fox"}],
                 "chosen": {"role": "assistant", "content": "jumps"},
                 "rejected": [{"role": "assistant", "content": "sleeps over a dog"}]})
    recs.append({"prompt": "a dog", "chosen": "hex " * 30, "rejected": "no"})  # chosen cut
    return recs


def oracle(tok, record, side):
    """(tokens, response flags) built without the library's tokenization code."""
    if all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")):
        prompt = [tok.bos_id] + tok.encode(record["prompt"])
        response = tok.encode(record[side]) + [tok.eos_id]
        return (prompt + response)[:SEQ], ([0] * len(prompt) + [1] * len(response))[:SEQ]
    prompt = record["prompt"]
    response = record[side] if isinstance(record[side], list) else [record[side]]
    head = tok.encode_chat(render_chat(DEFAULT_CHAT_TEMPLATE, prompt, add_generation_prompt=True,
                                       **template_tokens(tok)))
    body = tok.encode_chat(response[0]["content"] + "<|im_end|>\n")
    return (head + body)[:SEQ], ([0] * len(head) + [1] * len(body))[:SEQ]


def unpack(row):
    n = int((row["segment_ids"] > 0).sum())
    assert (row["segment_ids"][:n] == 1).all() and (row["positions"][:n] == np.arange(n)).all()
    np.testing.assert_array_equal(row["targets"][:n - 1], row["tokens"][1:n])
    assert row["loss_mask"][n - 1:].sum() == 0
    return row["tokens"][:n].tolist(), [0] + row["loss_mask"][:n - 1].astype(int).tolist()


def rows_of(batch):
    for r in range(BATCH):
        if batch["chosen"]["segment_ids"][r].any():
            yield {s: unpack({k: v[r] for k, v in batch[s].items()}) for s in ("chosen", "rejected")}


def test_pairs_shapes_and_masks(tok, records):
    it = dpo_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=0, num_epochs=1)
    batches = list(it)
    assert len(batches) == -(-len(records) // BATCH)
    for b in batches:
        assert set(b) == {"chosen", "rejected"}
        for side in b.values():
            assert set(side) == set(BATCH_KEYS)
            assert all(side[k].shape == (BATCH, SEQ) for k in BATCH_KEYS)
            assert side["loss_mask"].dtype == np.float32 and side["tokens"].dtype == np.int32
    got = sorted(json.dumps(p) for b in batches for p in rows_of(b))
    want = sorted(json.dumps({s: list(oracle(tok, r, s)) for s in ("chosen", "rejected")})
                  for r in records)
    assert got == want
    same = sum(oracle(tok, r, "chosen")[0] == oracle(tok, r, "rejected")[0] for r in records)
    assert it.stats == {"examples": len(records), "truncated": 1, "dropped": 0,
                        "identical": same}


def test_resume_and_eval(tok, records):
    a = dpo_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=4)
    list(itertools.islice(a, 5))
    state = json.loads(json.dumps(a.get_state()))
    want = list(itertools.islice(a, 4))
    b = dpo_batches(records, tok, seq_len=SEQ, batch_size=BATCH, seed=4)
    b.set_state(state)
    for x, y in zip(want, itertools.islice(b, 4)):
        for s in ("chosen", "rejected"):
            for k in BATCH_KEYS:
                np.testing.assert_array_equal(x[s][k], y[s][k])
    evals = dpo_eval_batches(records, tok, seq_len=SEQ, batch_size=BATCH, num_batches=2)
    assert len(evals) == 2 and evals[0]["chosen"]["tokens"].shape == (BATCH, SEQ)


def test_prompt_longer_than_row_is_dropped(tok):
    recs = [{"prompt": "fox " * 60, "chosen": "a", "rejected": "b"},
            {"prompt": "fox", "chosen": "a", "rejected": "b"}]
    it = dpo_batches(recs, tok, seq_len=SEQ, batch_size=1, seed=0)
    assert it.stats == {"examples": 1, "truncated": 1, "dropped": 1, "identical": 0}
    with pytest.raises(InputError, match="no preference pairs"):
        dpo_batches(recs[:1], tok, seq_len=SEQ, batch_size=1, seed=0)


def test_identical_chosen_and_rejected_are_counted_and_all_identical_refused(tok):
    """A pair whose chosen and rejected are the same tokens (after truncation to the
    row) carries no preference: counted (the run warns with the count), and a data set
    of only such pairs is refused in one line rather than trained at a flat loss."""
    same = [{"prompt": "fox", "chosen": "a dog", "rejected": "a dog"},
            {"prompt": "fox", "chosen": "hex " * 60, "rejected": "hex " * 61}]  # same once cut
    it = dpo_batches([*same, {"prompt": "fox", "chosen": "a", "rejected": "b"}], tok,
                     seq_len=SEQ, batch_size=1, seed=0)
    assert it.stats == {"examples": 3, "truncated": 1, "dropped": 0, "identical": 2}
    with pytest.raises(InputError) as e:
        dpo_batches(same, tok, seq_len=SEQ, batch_size=1, seed=0)
    assert "every preference pair (2) has the same tokens" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, match", [
    ({"prompt": "p", "chosen": "c"}, r"p\.jsonl:1: .*missing rejected"),
    ({"prompt": "p", "chosen": {"role": "user", "content": "c"}, "rejected": "r"},
     r"p\.jsonl:1: chosen: the conversation has no assistant turn"),
    ({"prompt": [{"role": "user", "content": 1}], "chosen": "c", "rejected": "r"},
     r"p\.jsonl:1: prompt: message 0 \(user\) has a non-string"),
])
def test_bad_records(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(InputError, match=match):
        load_preference_records(str(path))
