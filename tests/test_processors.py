"""Logit processors and min-p against transformers' LogitsProcessors; greedy generate
with them against transformers.generate on a tiny random Llama; the config path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError, InputError
from jaxlm.infer import generate as gen
from jaxlm.infer import processors as lp
from jaxlm.infer.generate import generate, generate_kwargs
from jaxlm.infer.sampling import sample, warp
from jaxlm.config import GenerateConfig, load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

V = 24  # small: ids repeat, n-grams recur
R, L = 6, 20  # rows, ids per row


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (R, L)).astype(np.int32)
    ids[:, 10:13] = ids[:, 3:6]  # a repeated 3-gram in every row
    ids[0, -2:] = ids[0, 3:5]  # row 0 ends with the start of that 3-gram
    logits = rng.normal(0, 2.0, (R, V)).astype(np.float32)
    logits[:, :4] = -np.abs(logits[:, :4])  # negatives: the penalty multiplies them
    return ids, logits


def ours(proc, ids, logits, n_new=0, eos=None, split=None):
    """Our processed logits; with split, the history is the prompt ids[:, :split] + the
    rest pushed one token at a time (the in-loop path)."""
    split = L if split is None else split
    hist = lp.init_history(proc.shape(), jnp.asarray(ids[:, :split]),
                           jnp.full((R,), split, jnp.int32), V, L - split)
    for t in range(split, L):
        hist = lp.push(hist, jnp.asarray(ids[:, t]), jnp.ones((R,), bool))
    return np.asarray(lp.apply(proc.shape(), jnp.asarray(logits), hist, proc.rows(R), n_new,
                               lp.eos_array(eos, V)))


def theirs(processor, ids, logits):
    return processor(torch.tensor(ids, dtype=torch.long), torch.tensor(logits)).numpy()


@pytest.mark.parametrize("penalty", [1.3, 0.7])
@pytest.mark.parametrize("split", [L, 8])
def test_repetition_penalty_matches_hf(data, penalty, split):
    ids, logits = data
    got = ours(lp.Processors(repetition_penalty=penalty), ids, logits, split=split)
    np.testing.assert_allclose(got, theirs(hf.RepetitionPenaltyLogitsProcessor(penalty), ids,
                                           logits), rtol=1e-6)
    assert not np.allclose(got, logits)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("split", [L, 5])
def test_no_repeat_ngram_matches_hf(data, n, split):
    ids, logits = data
    got = ours(lp.Processors(no_repeat_ngram_size=n), ids, logits, split=split)
    ref = theirs(hf.NoRepeatNGramLogitsProcessor(n), ids, logits)
    np.testing.assert_array_equal(got, ref)
    assert np.isinf(got).any()
    short = ids[:, :n - 1] if n > 1 else ids[:, :0]  # fewer than n ids: nothing banned
    proc = lp.Processors(no_repeat_ngram_size=n)
    hist = lp.init_history(proc.shape(), jnp.asarray(
        np.pad(short, ((0, 0), (0, 4)))), jnp.full((R,), n - 1, jnp.int32), V, 4)
    assert np.isfinite(lp.apply(proc.shape(), jnp.asarray(logits), hist, proc.rows(R), 0,
                                lp.eos_array(None, V))).all()


@pytest.mark.parametrize("n_new", [0, 3, 4, 9])
def test_min_new_tokens_matches_hf_with_several_eos(data, n_new):
    ids, logits = data
    eos = [3, 17, 5]
    got = ours(lp.Processors(min_new_tokens=4), ids, logits, n_new=n_new, eos=eos)
    ref = theirs(hf.MinNewTokensLengthLogitsProcessor(L - n_new, 4, eos), ids, logits)
    np.testing.assert_array_equal(got, ref)
    assert np.isinf(got[:, eos]).all() == (n_new < 4)


def test_presence_and_frequency_penalties_count_generated_tokens_only(data):
    ids, logits = data
    split = 12  # ids[:, :12] are the prompt
    proc = lp.Processors(presence_penalty=0.5, frequency_penalty=0.3)
    got = ours(proc, ids, logits, split=split)
    counts = np.stack([np.bincount(r[split:], minlength=V) for r in ids])
    np.testing.assert_allclose(got, logits - 0.5 * (counts > 0) - 0.3 * counts, rtol=1e-6)


def test_processors_compose_in_hf_order(data):
    ids, logits = data
    proc = lp.Processors(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3)
    got = ours(proc, ids, logits, n_new=1, eos=[7, 9], split=10)
    ref = theirs(hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.5), hf.NoRepeatNGramLogitsProcessor(2),
        hf.MinNewTokensLengthLogitsProcessor(L - 1, 3, [7, 9])]), ids, logits)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(min_p=0.1), dict(min_p=0.3, top_k=10),
                                dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05),
                                dict(temperature=1.5, top_p=0.8)])
def test_warpers_match_hf(data, kw):
    _, logits = data
    kw = {"temperature": 1.0, **kw}
    warpers = [hf.TemperatureLogitsWarper(kw["temperature"])]
    if kw.get("top_k"):
        warpers.append(hf.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        warpers.append(hf.TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        warpers.append(hf.MinPLogitsWarper(kw["min_p"]))
    ref = theirs(hf.LogitsProcessorList(warpers), np.zeros((R, 1), np.int32), logits)
    got = np.asarray(warp(jnp.asarray(logits), **kw))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def test_min_p_sampling_frequencies_match_the_warped_distribution():
    x = np.random.default_rng(3).normal(0, 1.5, size=16).astype(np.float32)
    n = 20000
    for kw in (dict(min_p=0.2), dict(min_p=0.1, top_k=8)):
        draw = jax.jit(lambda a, k: sample(a, k, temperature=0.8, **kw))
        toks = np.asarray(draw(jnp.broadcast_to(jnp.asarray(x), (n, 16)), jax.random.key(0)))
        freq = np.bincount(toks, minlength=16) / n
        w = np.asarray(warp(jnp.asarray(x[None]), temperature=0.8, **kw))[0]
        p = np.exp(w - w.max())
        p /= p.sum()
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p))
        assert np.abs(freq - p).max() < 0.02


# ------------------------------------------------------------ generate vs transformers

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import jaxlm
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # large weights: peaked, repetitive greedy output
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    cfg, params = jaxlm.load(str(path))
    return model, cfg, params


PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 9], [12, 12, 30, 31, 30, 31, 7]]


def hf_greedy(model, prompt, n, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=n, do_sample=False,
            pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5),
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=6),
])
def test_greedy_with_processors_matches_transformers(llama, kw):
    model, cfg, params = llama
    plain = generate(params, cfg, PROMPTS, max_new_tokens=16)
    eos = sorted({int(t[2]) for t in plain.tokens})  # stops the plain rows early
    out = generate(params, cfg, PROMPTS, max_new_tokens=16, eos_id=eos, **kw)
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(model, prompt, 16, eos_token_id=eos, **kw)
        n = int(out.lengths[i])
        assert out.tokens[i, :n].tolist() == ref[:n]
        assert n == 16 or (out.finished[i] and n == len(ref) and ref[-1] in eos)
    assert out.tokens.tolist() != plain.tokens.tolist()


def test_sampled_tokens_lie_in_the_processed_support(llama):
    """Sampling with processors + warpers: every token drawn has a finite score under
    transformers' processors and warpers, applied to the same step's raw logits."""
    model, cfg, params = llama
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)
    out = generate(params, cfg, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=8,
                   min_p=0.1, eos_id=[3, 4], seed=3, return_logits=True, **kw)
    for i, prompt in enumerate(PROMPTS):
        for t in range(int(out.lengths[i])):
            seq = np.asarray([prompt + out.tokens[i, :t].tolist()])
            procs = hf.LogitsProcessorList([
                hf.RepetitionPenaltyLogitsProcessor(1.3), hf.NoRepeatNGramLogitsProcessor(2),
                hf.MinNewTokensLengthLogitsProcessor(len(prompt), 5, [3, 4]),
                hf.TopKLogitsWarper(8), hf.MinPLogitsWarper(0.1)])
            scores = theirs(procs, seq, out.logits[i, t:t + 1])[0]
            assert np.isfinite(scores[out.tokens[i, t]]), (i, t)
            assert np.isfinite(scores).sum() < cfg.vocab_size


def test_processors_traced_once(llama, traces):
    _, cfg, params = llama
    kw = dict(max_new_tokens=10, repetition_penalty=1.2, no_repeat_ngram_size=2,
              presence_penalty=0.1, frequency_penalty=0.2, min_new_tokens=2, eos_id=[3, 4])
    generate(params, cfg, PROMPTS, **kw)
    before = traces["_run"]
    generate(params, cfg, [[1, 2], [3], [9, 9, 9, 9]], **{**kw, "eos_id": 5})
    assert traces["_run"] == before


@pytest.mark.parametrize("kwargs, words", [
    ({"repetition_penalty": 0.0}, ["repetition_penalty=0.0"]),
    ({"min_p": 1.5}, ["min_p=1.5"]),
    ({"no_repeat_ngram_size": -1}, ["no_repeat_ngram_size=-1"]),
    ({"min_new_tokens": 2.5}, ["min_new_tokens=2.5"]),
    ({"presence_penalty": 3.0}, ["presence_penalty=3.0"]),
    ({"eos_id": [3, 64]}, ["eos_id=64"]),
    ({"num_return_sequences": 2}, ["num_return_sequences=2", "greedy"]),
])
def test_bad_settings_are_one_line_errors(llama, kwargs, words):
    _, cfg, params = llama
    with pytest.raises(InputError) as e:
        generate(params, cfg, [[1, 2]], max_new_tokens=4, **kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_generate_config_keys_reach_generate():
    g = load_config("tiny-llama", ["generate.repetition_penalty=1.3", "generate.min_p=0.05",
                                   "generate.no_repeat_ngram_size=3", "generate.stop_ids=[7, 9]",
                                   "generate.min_new_tokens=2", "generate.presence_penalty=0.5",
                                   "generate.frequency_penalty=0.25", "generate.num_beams=1",
                                   "generate.temperature=0.5"]).generate
    kw = generate_kwargs(g, eos_id=2)
    assert kw["eos_id"] == [2, 7, 9] and kw["repetition_penalty"] == 1.3
    assert (kw["min_p"], kw["no_repeat_ngram_size"], kw["min_new_tokens"]) == (0.05, 3, 2)
    assert (kw["presence_penalty"], kw["frequency_penalty"]) == (0.5, 0.25)
    import inspect
    accepted = set(inspect.signature(generate).parameters)
    assert set(kw) <= accepted
    fields = {f for f in GenerateConfig.__dataclass_fields__} - {"stop_ids"}
    assert fields <= set(kw)  # every generate.* key is passed on


@pytest.mark.parametrize("override, key", [
    ("generate.repetition_penalty=0", "generate.repetition_penalty"),
    ("generate.min_p=2", "generate.min_p"),
    ("generate.no_repeat_ngram_size=-2", "generate.no_repeat_ngram_size"),
    ("generate.frequency_penalty=5", "generate.frequency_penalty"),
    ("generate.stop_ids=[1, -1]", "generate.stop_ids"),
    ("generate.early_stopping=sometimes", "generate.early_stopping"),
    ("generate.num_beams=0", "generate.num_beams"),
    ("generate.num_beams=2", "generate.num_beams=2"),  # with the preset's temperature 0.7
])
def test_bad_generate_config_is_one_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny-llama", [override])
    assert key in str(e.value) and "\n" not in str(e.value), str(e.value)
