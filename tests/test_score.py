"""`jaxlm.score` and `perplexity` against transformers on the same weights: per-token
NLL of sliding windows (with and without a stride) and summed continuation
log-probs / greedy flags of (context, continuation) pairs, shared rows included."""

import numpy as np
import pytest

import jaxlm
from jaxlm.errors import InputError
from jaxlm.infer.score import perplexity, score_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, L = 97, 48  # vocab, the model's positions


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers Llama, jaxlm cfg, params) with the same random weights."""
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=L,
        tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    cfg, params = jaxlm.load(str(path))
    return model, cfg, params


def hf_logprobs(model, ids):
    """log-softmax of transformers' logits over `ids` [len(ids), V] (float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def oracle_nlls(model, doc, length, stride):
    """Per-token NLL of doc[1:] by the perplexity-guide windows, each window run through
    transformers: targets `stride` at a time, each with its `length` inputs before the
    chunk's last target."""
    out = []
    for first in range(1, len(doc), stride):
        last = min(first + stride, len(doc)) - 1
        start = max(0, last - length)
        lp = hf_logprobs(model, doc[start:last])
        out += [-lp[t - 1 - start, doc[t]] for t in range(first, last + 1)]
    return np.array(out)


def test_perplexity_matches_transformers_with_and_without_stride(pair):
    model, cfg, params = pair
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V, n).tolist() for n in (130, 7, 49, 50)]
    whole = -hf_logprobs(model, docs[1])[np.arange(6), docs[1][1:]]  # one window: direct
    for stride in (None, 16):
        got = perplexity(params, cfg, docs, stride=stride, batch_size=4)
        for doc, nlls in zip(docs, got.token_nlls):
            assert nlls.shape == (len(doc) - 1,)
            np.testing.assert_allclose(nlls, oracle_nlls(model, doc, L, stride or L), atol=1e-5)
        np.testing.assert_allclose(got.token_nlls[1], whole, atol=1e-5)
        assert got.tokens == sum(len(d) - 1 for d in docs)
        assert np.isclose(got.nll, np.concatenate(got.token_nlls).mean())
        assert np.isclose(got.perplexity, np.exp(got.nll))
    # a stride gives the long document more context: a different (closer) number
    assert not np.allclose(perplexity(params, cfg, docs[:1]).token_nlls[0][L:],
                           perplexity(params, cfg, docs[:1], stride=16).token_nlls[0][L:])


def test_score_matches_transformers(pair, monkeypatch):
    model, cfg, params = pair
    rng = np.random.default_rng(1)
    ctx = rng.integers(0, V, 10).tolist()
    logp = hf_logprobs(model, ctx)
    best = int(np.argmax(logp[-1]))
    pairs = [(ctx, [c]) for c in (best, (best + 1) % V, (best + 2) % V)]  # one context, run
    pairs += [(ctx, rng.integers(0, V, 5).tolist()), (ctx[:3], ctx[3:])]  # once for 4 pairs
    pairs += [(rng.integers(0, V, 60).tolist(), rng.integers(0, V, 4).tolist())]  # > L + 1
    from jaxlm.infer import score as module
    contexts, run = [], module._shared_context_logprobs

    def spy(params, cfg, ctx, ctx_len, *rest):  # the contexts each pass runs
        contexts.extend(tuple(np.asarray(r)[:n]) for r, n in zip(ctx, np.asarray(ctx_len)))
        return run(params, cfg, ctx, ctx_len, *rest)

    monkeypatch.setattr(module, "_shared_context_logprobs", spy)
    got = score_ids(params, cfg, pairs, batch_size=2)
    assert got.truncated == 1  # the 60 + 4 ids: cut to L + 1, on the rows path
    assert contexts.count(tuple(ctx)) == 1 and contexts.count(tuple(ctx[:3])) == 1
    for (c, x), lp, greedy in zip(pairs, got.logprobs, got.is_greedy):
        whole = (c + x)[-(L + 1):]
        ref = hf_logprobs(model, whole[:-1])[-len(x):]
        assert abs(lp - sum(ref[j, t] for j, t in enumerate(x))) < 1e-5
        assert greedy == all(int(np.argmax(ref[j])) == t for j, t in enumerate(x))
    assert got.is_greedy[0] and not got.is_greedy[1]
    # the public entry point: ids through jaxlm.score, and its one-line errors
    pub = jaxlm.score(params, cfg, [p[0] for p in pairs], [p[1] for p in pairs])
    np.testing.assert_allclose(pub.logprobs, got.logprobs, atol=1e-6)
    with pytest.raises(InputError, match="2 contexts but 1"):
        jaxlm.score(params, cfg, [ctx, ctx], [[1]])
    with pytest.raises(InputError, match="strings need tokenizer"):
        jaxlm.score(params, cfg, ["a"], [" b"])
    with pytest.raises(InputError, match="outside the vocabulary"):
        jaxlm.score(params, cfg, [ctx], [[V]])
