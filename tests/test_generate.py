"""generate(): the cached, compiled decode loop against full no-cache forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import InputError
from jaxlm.infer import generate as gen
from jaxlm.infer.generate import PAD_ID, generate
from jaxlm.model import forward
from tiny_models import LLAMA as CFG  # vocab 97, 256 positions; init_std 0.2: no near-ties

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40], [60, 61, 62, 63, 64]]
NEW = 24
NAIVE_LEN = 64  # the no-cache oracle runs on sequences right-padded to this length


@pytest.fixture(scope="module")
def params(tiny_llama):
    return tiny_llama.params


@jax.jit
def _full_logits(params, tokens):
    return forward(params, CFG, tokens)[0]  # no cache: a plain causal pass


def full_logits(params, seq):
    """Logits [len(seq), V] of one sequence, from a full forward without cache."""
    padded = np.zeros((1, NAIVE_LEN), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_full_logits(params, jnp.asarray(padded)))[0, :len(seq)]


def naive_greedy(params, prompt, n, eos_id=None):
    seq = list(prompt)
    for _ in range(n):
        tok = int(np.argmax(full_logits(params, seq)[-1]))
        seq.append(tok)
        if tok == eos_id:
            break
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def batch_out(params):
    return generate(params, CFG, PROMPTS, max_new_tokens=NEW, return_logits=True)


@pytest.fixture(scope="module")
def naive(params):
    return [naive_greedy(params, p, NEW) for p in PROMPTS]


def test_cached_logits_match_full_forward(params, batch_out):
    assert batch_out.logits.shape == (len(PROMPTS), NEW, CFG.vocab_size)
    for b, prompt in enumerate(PROMPTS):
        seq = prompt + batch_out.tokens[b].tolist()
        ref = full_logits(params, seq)[len(prompt) - 1:len(prompt) - 1 + NEW]
        np.testing.assert_allclose(batch_out.logits[b], ref, atol=1e-5, rtol=1e-5)  # f32 rounding


def test_greedy_matches_naive_loop(batch_out, naive):
    assert batch_out.tokens.dtype == np.int32
    assert batch_out.tokens.shape == (len(PROMPTS), NEW)
    np.testing.assert_array_equal(batch_out.lengths, [NEW] * len(PROMPTS))
    assert not batch_out.finished.any()
    assert batch_out.tokens.tolist() == naive
    assert batch_out.sequences() == naive


def test_decode_step_traced_once(params, traces):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [3], [2, 3, 8]]  # batch 5: unique
    jax.clear_caches()  # whatever ran before in this process compiled nothing of this test's
    before = traces["_run"]
    out = generate(params, CFG, prompts, max_new_tokens=64)
    assert out.lengths.tolist() == [64] * 5
    assert traces["_run"] - before == 1
    # other values, other prompt lengths in the same bucket, fewer tokens: no retrace
    generate(params, CFG, [[7] * 9, [1], [2, 2], [4] * 16, [6] * 3], max_new_tokens=50, seed=1)
    generate(params, CFG, prompts, max_new_tokens=64, eos_id=11)
    assert traces["_run"] - before == 1


def test_eos_stops_only_its_row(params, naive):
    row, step = next((b, t) for b, toks in enumerate(naive) for t in range(2, NEW)
                     if toks[t] not in toks[:t])
    eos = naive[row][step]
    out = generate(params, CFG, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    for b, toks in enumerate(naive):
        n = toks.index(eos) + 1 if eos in toks else NEW
        assert out.lengths[b] == n
        assert out.finished[b] == (eos in toks)
        assert out.tokens[b, :n].tolist() == toks[:n]
        assert (out.tokens[b, n:] == PAD_ID).all()
    assert out.lengths[row] == step + 1 and out.tokens[row, step] == eos
    assert out.sequences()[row] == naive[row][:step]
    assert out.sequences(include_eos=True)[row] == naive[row][:step + 1]
    assert any(eos not in toks for toks in naive)  # some row ran on past the stop


def test_batched_equals_alone(params, batch_out):
    for b, prompt in enumerate(PROMPTS):
        alone = generate(params, CFG, [prompt], max_new_tokens=NEW)
        assert alone.tokens[0].tolist() == batch_out.tokens[b].tolist()


def test_array_prompts_and_sampling_determinism(params):
    prompts = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    greedy = generate(params, CFG, prompts, max_new_tokens=8)
    assert greedy.tokens.tolist() == [naive_greedy(params, p, 8) for p in prompts.tolist()]
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(params, CFG, prompts, seed=7, **kw)
    b = generate(params, CFG, prompts, seed=7, **kw)
    c = generate(params, CFG, prompts, seed=8, **kw)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.tokens.tolist() != c.tokens.tolist()
    # a row's draw depends on its seed and row index, not on the other rows
    first = generate(params, CFG, prompts[:1], seed=7, **kw)
    assert first.tokens[0].tolist() == a.tokens[0].tolist()


@pytest.mark.parametrize("prompts, kwargs, words", [
    ([], {}, ["non-empty"]),
    ([[1, 2], []], {}, ["prompt 1", "empty"]),
    ([[1, 97]], {}, ["prompt 0", "97", "vocab_size"]),
    ([[1, -3]], {}, ["prompt 0", "-3", "position 1"]),
    ([[1.5, 2.0]], {}, ["prompt 0", "integer"]),
    ([[1] * 10], {"max_len": 32, "max_new_tokens": 30}, ["prompt 0", "max_len=32"]),
    ([[1] * 200], {"max_new_tokens": 100}, ["prompt 0", "300", "max_seq_len=256"]),
    ([[1]], {"max_len": 512}, ["max_len=512", "max_seq_len=256"]),
    ([[1]], {"max_new_tokens": 0}, ["max_new_tokens=0"]),
    ([[1]], {"eos_id": 97}, ["eos_id=97"]),
    ([[1]], {"top_p": 0.0}, ["top_p"]),
    (np.array([1, 2, 3]), {}, ["2-D"]),
])
def test_bad_input_is_one_line_error(params, prompts, kwargs, words):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError) as e:
        generate(params, CFG, prompts, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
