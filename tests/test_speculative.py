"""Speculative decoding: greedy output = the target's greedy output whatever the draft;
sampled second tokens follow the target's own distribution (chi-square); one trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlm.errors import InputError
from jaxlm.infer.generate import generate
from jaxlm.model import ModelConfig, forward, init_params
from tiny_models import LLAMA as CFG  # the target: vocab 97, init_std 0.2


def generate_speculative(params, cfg, draft_params, draft_cfg, prompts, **kw):
    """jaxlm.generate with a draft model: the engine's speculative cycle."""
    return generate(params, cfg, prompts, draft=(draft_params, draft_cfg), **kw)

DRAFT = dataclasses.replace(CFG, n_layers=1, n_heads=2, n_kv_heads=1)  # a smaller model
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40], [60, 61, 62, 63, 64]]
NEW = 40


@pytest.fixture(scope="module")
def models(tiny_llama):
    target = tiny_llama.params
    draft = init_params(DRAFT, jax.random.PRNGKey(1))
    contrary = dict(target, head={"kernel": -target["head"]["kernel"]})  # argmax -> argmin
    return target, draft, contrary


@pytest.fixture(scope="module")
def greedy(models):
    return generate(models[0], CFG, PROMPTS, max_new_tokens=NEW)


@pytest.mark.parametrize("which, k", [("small", 4), ("self", 4), ("contrary", 3)])
def test_greedy_equals_the_targets_greedy_output(models, greedy, which, k):
    target, draft, contrary = models
    dp, dc = {"small": (draft, DRAFT), "self": (target, CFG), "contrary": (contrary, CFG)}[which]
    out = generate_speculative(target, CFG, dp, dc, PROMPTS, max_new_tokens=NEW,
                               num_speculative=k)
    assert out.tokens.tolist() == greedy.tokens.tolist()
    assert out.lengths.tolist() == [NEW] * len(PROMPTS)
    st = out.stats
    if which == "self":  # every draft accepted: k + 1 tokens per cycle
        assert st["acceptance_rate"] == 1.0 and st["cycles"] == -(-(NEW - 1) // (k + 1))
    if which == "contrary":  # every draft rejected: one token per cycle
        assert st["accepted"] == 0 and st["cycles"] == NEW - 1


def test_stop_ids_end_rows_as_plain_generate(models, greedy):
    target, draft, _ = models
    eos = [int(greedy.tokens[1, 7]), int(greedy.tokens[3, 20])]
    ref = generate(target, CFG, PROMPTS, max_new_tokens=NEW, eos_id=eos)
    out = generate_speculative(target, CFG, draft, DRAFT, PROMPTS, max_new_tokens=NEW,
                               num_speculative=4, eos_id=eos)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert out.lengths.tolist() == ref.lengths.tolist()
    assert out.finished.tolist() == ref.finished.tolist() and out.finished.any()


def test_traced_once_for_64_tokens(models, traces):
    target, draft, _ = models
    generate_speculative(target, CFG, draft, DRAFT, [[1, 2], [3]], max_new_tokens=64)
    before = traces["_run"]
    out = generate_speculative(target, CFG, draft, DRAFT, [[4, 5, 6], [7]], max_new_tokens=64,
                               seed=2)
    assert traces["_run"] == before and out.lengths.tolist() == [64, 64]


SMALL = dict(vocab_size=12, max_seq_len=64, dtype="float32", param_dtype="float32")


def test_sampled_tokens_follow_the_targets_distribution():
    """Over N rows (one seed each), the second generated token (the first the draft /
    verify cycle produces) has the target's marginal: sum over t1 of p(t1) p(t2 | t1).
    Chi-square goodness of fit, rejected at significance 0.001."""
    tcfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, init_std=0.3,
                       **SMALL)
    dcfg = ModelConfig(d_model=16, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=32, init_std=0.3,
                       **SMALL)
    tp, dp = init_params(tcfg, jax.random.PRNGKey(3)), init_params(dcfg, jax.random.PRNGKey(4))
    prompt, n, v, temp = [3, 7], 2000, 12, 1.5
    out = generate_speculative(tp, tcfg, dp, dcfg, [prompt] * n, max_new_tokens=3,
                               num_speculative=2, temperature=temp, seed=0, max_len=8)
    assert 0.05 < out.stats["acceptance_rate"] < 0.95  # both accept and reject paths ran
    p1 = jax.nn.softmax(forward(tp, tcfg, jnp.asarray([prompt]))[0][0, -1] / temp)
    seqs = jnp.asarray([prompt + [t] for t in range(v)])
    p2 = jax.nn.softmax(forward(tp, tcfg, seqs)[0][:, -1] / temp, axis=-1)  # [t1, t2]
    expected = np.asarray(p1 @ p2, np.float64)
    for col, probs in ((0, np.asarray(p1, np.float64)), (1, expected)):
        counts = np.bincount(out.tokens[:, col], minlength=v)
        _, pvalue = stats.chisquare(counts, probs / probs.sum() * n)
        assert pvalue > 1e-3, (col, pvalue, counts, probs * n)


@pytest.mark.parametrize("change, words", [
    ({"draft_cfg": dataclasses.replace(DRAFT, vocab_size=98)}, ["vocabulary", "98", "97"]),
    ({"num_speculative": 0}, ["num_speculative=0"]),
    ({"temperature": -1.0}, ["temperature"]),
])
def test_bad_input_is_one_line(models, change, words):
    target, draft, _ = models
    kw = {"draft_cfg": DRAFT, "num_speculative": 2, **change}
    with pytest.raises(InputError) as e:
        generate_speculative(target, CFG, draft, kw.pop("draft_cfg"), [[1, 2]],
                             max_new_tokens=4, **kw)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
