"""Beam search against transformers.generate(num_beams=...): the same sequences and
sequence scores for a tiny random Llama, Mixtral (MoE) and T5; errors; one trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import InputError
from jaxlm.infer import generate as gen
from jaxlm.infer.generate import generate
from jaxlm.model import model_specs
from jaxlm.model.params import abstract
import tiny_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 64
NEW = 10
PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 9], [12, 30, 31, 30, 7, 1, 1]]


def randomize(model):
    with torch.no_grad():  # large weights: peaked distributions, no near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # Mixtral router
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.3)


def decoder_pair(tmp_path_factory, config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    path = tmp_path_factory.mktemp(config.model_type)
    model.save_pretrained(path)
    cfg, params = jaxlm.load(str(path))
    return model, cfg, params


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return decoder_pair(tmp_path_factory, transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager"))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return decoder_pair(tmp_path_factory, transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=128, attn_implementation="eager"))


def hf_beams(model, inputs, **kw):
    """transformers' beam search -> (sequences [B*R] as lists, scores [B*R])."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kw)
    lengths = (out.beam_indices >= 0).sum(-1).tolist()
    start = out.sequences.shape[1] - out.beam_indices.shape[1]  # prompt (or start id) length
    seqs = [row[start:start + n] for row, n in zip(out.sequences.tolist(), lengths)]
    return seqs, out.sequences_scores.numpy()


def stop_ids(params, cfg, prompts):
    """Two ids that greedy decoding emits halfway: some hypotheses end on EOS. (Always
    two: every beam test shares one compiled loop per model.)"""
    out = generate(params, cfg, prompts, max_new_tokens=NEW)
    ids = [int(out.tokens[0, NEW // 2]), int(out.tokens[-1, NEW // 2 + 1])]
    return ids if ids[0] != ids[1] else [ids[0], (ids[0] + 1) % V]


def assert_same(out, seqs, scores, eos):
    ours = [row[:n].tolist() for row, n in zip(out.tokens, out.lengths)]
    assert ours == seqs
    np.testing.assert_allclose(out.scores, scores, atol=1e-4, rtol=0)
    for row, n, fin in zip(out.tokens, out.lengths, out.finished):
        assert fin == (n > 0 and eos is not None and int(row[n - 1]) in np.atleast_1d(eos))
        assert (row[n:] == gen.PAD_ID).all()


BEAM_SETTINGS = [
    dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=4),
    dict(num_beams=4, length_penalty=0.6, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=3),
]


def hf_beams_per_prompt(model, prompts, eos, kw):
    """transformers' beams and scores, one prompt per call (no left padding on the HF side)."""
    seqs, scores = [], []
    for p in prompts:
        s, sc = hf_beams(model, dict(input_ids=torch.tensor([p]),
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long)),
                         eos_token_id=eos, **kw)
        seqs += s
        scores += list(sc)
    return seqs, np.asarray(scores)


@pytest.mark.parametrize("kw", BEAM_SETTINGS)
def test_llama_beams_match_transformers(llama, kw):
    model, cfg, params = llama
    eos = stop_ids(params, cfg, PROMPTS)
    out = generate(params, cfg, PROMPTS, max_new_tokens=NEW, eos_id=eos, **kw)
    assert_same(out, *hf_beams_per_prompt(model, PROMPTS, eos, kw), eos)
    if kw["length_penalty"] <= 1.0:  # (2.0 favours the long hypotheses)
        assert out.finished.any() and (out.lengths < NEW).any()  # EOS endings were compared


def test_llama_beams_with_processors_match_transformers(llama):
    model, cfg, params = llama
    kw = dict(num_beams=4, num_return_sequences=2, repetition_penalty=1.3,
              no_repeat_ngram_size=2, min_new_tokens=3)
    eos = stop_ids(params, cfg, PROMPTS)
    out = generate(params, cfg, PROMPTS[:2], max_new_tokens=NEW, eos_id=eos, **kw)
    assert_same(out, *hf_beams_per_prompt(model, PROMPTS[:2], eos, kw), eos)


def test_mixtral_beams_match_transformers(mixtral):
    model, cfg, params = mixtral
    assert cfg.moe.n_experts == 4
    kw = BEAM_SETTINGS[0]
    eos = stop_ids(params, cfg, PROMPTS[:1])
    out = generate(params, cfg, PROMPTS[:1], max_new_tokens=NEW, eos_id=eos, **kw)
    p = PROMPTS[0]
    seqs, scores = hf_beams(model, dict(input_ids=torch.tensor([p]),
                                        attention_mask=torch.ones(1, len(p), dtype=torch.long)),
                            eos_token_id=eos, **kw)
    assert_same(out, seqs, scores, eos)


# ------------------------------------------------------------------ T5

T5 = tiny_models.T5  # v1.0 (relu, tied), as transformers' T5ForConditionalGeneration reads


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from jaxlm.model.hf import save_hf as save_t5
    leaves, tree = jax.tree_util.tree_flatten_with_path(abstract(model_specs(T5)))
    rng = np.random.default_rng(1)
    out = []
    for path, s in leaves:
        name = jax.tree_util.keystr(path)
        scale = 1.0 if "embed" in name or "table" in name else 0.3
        x = 1 + 0.2 * rng.standard_normal(s.shape) if "scale" in name else \
            scale * rng.standard_normal(s.shape)
        out.append(jnp.asarray(x, jnp.float32))
    params = jax.tree_util.tree_unflatten(tree, out)
    path = tmp_path_factory.mktemp("t5") / "hf"
    save_t5(path, T5, params)
    model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    return model, T5, params


@pytest.mark.parametrize("kw", BEAM_SETTINGS[:2])
def test_t5_beams_match_transformers(t5, kw):
    model, cfg, params = t5
    eos = stop_ids(params, cfg, PROMPTS)
    out = generate(params, cfg, PROMPTS, max_new_tokens=NEW, eos_id=eos, **kw)
    ids = np.zeros((len(PROMPTS), 7), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):  # the encoder takes right padding + a mask
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    seqs, scores = hf_beams(model, dict(input_ids=torch.tensor(ids),
                                        attention_mask=torch.tensor(mask)),
                            decoder_start_token_id=0, eos_token_id=eos, **kw)
    assert_same(out, seqs, scores, eos)
    assert out.finished.any()


def test_beam_loops_traced_once(llama, t5, traces):
    for _, cfg, params in (llama, t5):
        kw = dict(max_new_tokens=8, num_beams=4, eos_id=[3, 4])
        generate(params, cfg, [[1, 2, 3], [4], [5]], **kw)
        before = traces["_run"]
        out = generate(params, cfg, [[7, 7], [9, 8, 7, 6, 5], [1]], max_new_tokens=6,
                       num_beams=4, eos_id=[5, 6], length_penalty=0.3, early_stopping=True)
        assert traces["_run"] == before
        assert out.tokens.shape == (3, 6) and out.scores.shape == (3,)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_beams": 0}, ["num_beams=0"]),
    ({"num_beams": 2, "temperature": 0.8}, ["num_beams=2", "not supported"]),
    ({"num_beams": 2, "num_return_sequences": 3}, ["num_return_sequences=3", "num_beams=2"]),
    ({"num_beams": 2, "early_stopping": "sometimes"}, ["early_stopping"]),
    ({"num_beams": 2, "return_logits": True}, ["return_logits"]),
])
def test_bad_beam_settings_are_one_line_errors(llama, t5, kwargs, words):
    for _, cfg, params in (llama, t5):
        with pytest.raises(InputError) as e:
            generate(params, cfg, [[1, 2]], max_new_tokens=4, **kwargs)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
