"""The one engine behind `batch-infer`, on 8 CPU devices (4 data x 2 tensor), for a
Llama-style, a Mixtral-style and a T5 model with 24 prompts of 3..30 tokens:
processors + min-p sampling equal to `jaxlm.generate` run on each prompt alone with
its seed; JSON-schema-guided outputs that parse and validate; n = 3 samples per
prompt, prefilled once (its pages allocated once); beams equal to
`transformers.generate`'s. None of it falls back: the engine's own counters say
every request ran in it, over its paged pool."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

import jax  # noqa: E402

import jaxlm  # noqa: E402
from jaxlm.infer.batch import batch_infer, row_seed  # noqa: E402
from jaxlm.model.kv.paged import pages_for  # noqa: E402
from jaxlm.train.data import load_documents  # noqa: E402
import tiny_models  # noqa: E402

V = 300
N_PROMPTS = 24  # 3 batches of 8 per kind of row; the engine's slots are reused many times per run
NEW = 8
MESH = ["mesh.data=4", "mesh.tensor=2"]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
WORDS = ["the quick brown fox jumps over the lazy dog", 'a sum of all {"n": 1} parts',
         "def main(): return None"]


def save_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(WORDS * 5, trainers.BpeTrainer(
        show_progress=False, vocab_size=V, special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    t.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


def randomized(model):
    """Large random weights: peaked distributions, so greedy and beam choices are not
    near-ties between two float orders."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # Mixtral's router
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.3)
    return model.eval()


MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager", bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, attn_implementation="eager",
        bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: (HF dir, the transformers model)}: random weights, one tokenizer."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for name, make in MODELS.items():
        model = randomized(make())
        model.save_pretrained(root / name)
        (root / name / "generation_config.json").unlink(missing_ok=True)
        save_tokenizer(root / name)
        out[name] = (root / name, model)
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """24 stdlib snippets of 3..30 characters (bytes: tokens), written as an input file."""
    docs = load_documents("stdlib", max_docs=8)
    rng = np.random.default_rng(0)
    texts = []
    for i in range(N_PROMPTS):
        doc = docs[i % len(docs)]
        n = int(rng.integers(3, 31))
        at = int(rng.integers(0, max(1, len(doc) - n)))
        texts.append(doc[at:at + n].replace("\x00", " ") or "x")
    path = tmp_path_factory.mktemp("in") / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": t}) + "\n"
                            for i, t in enumerate(texts)))
    return str(path), texts


def run(checkpoint, inp, out, *overrides, **kw):
    summary = batch_infer(str(checkpoint), inp, str(out), batch_size=8,
                          overrides=[f"generate.max_new_tokens={NEW}", *MESH, *overrides],
                          progress=False, **kw)
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    engine = summary["engine"]
    # no fallback: every request ran in the engine, over its paged pool
    assert engine["cache"] == "paged" and engine["admitted"] == engine["finished"] == len(rows)
    return rows, summary


def encoded(checkpoint, texts):
    from jaxlm.infer.text import encode_prompts
    cfg = jaxlm.model_config_of(str(checkpoint))
    return cfg, encode_prompts(jaxlm.load_tokenizer(str(checkpoint)), cfg, texts)


PROCESSORS = dict(temperature=0.8, repetition_penalty=1.3, no_repeat_ngram_size=3, min_p=0.05,
                  seed=7)


# llama and t5: the decoder's and the encoder-decoder's paths through the engine; Mixtral's
# MoE layers run through it in test_beams_equal_transformers (its per-row settings are
# the same code as llama's)
@pytest.fixture(scope="module", params=["llama", "t5"])
def mixed(request, checkpoints, prompts, tmp_path_factory):
    """One batch-infer run per model over 72 rows, the 24 prompts three times with
    per-row settings: "p<i>" repetition penalty + no-repeat-ngram + min-p, sampled and
    seeded; "j<i>" guided by a JSON schema; "n<i>" n = 3 samples. -> (name, {kind:
    output rows in prompt order}, the summary). Each kind's rows share the run (one
    compiled engine) with the other two, so they also show that a row's output does not
    depend on the other rows' settings."""
    name = request.param
    path, _ = checkpoints[name]
    _, texts = prompts
    kinds = {"p": PROCESSORS,
             "j": {"json_schema": SCHEMA, "max_new_tokens": 24, "temperature": 0.7},
             "n": {"temperature": 2.0, "min_new_tokens": NEW, "n": 3}}
    d = tmp_path_factory.mktemp(f"mixed-{name}")
    (d / "in.jsonl").write_text("".join(
        json.dumps({"id": f"{k}{i}", "prompt": t, **row}) + "\n"
        for k, row in kinds.items() for i, t in enumerate(texts)))
    rows, summary = run(path, str(d / "in.jsonl"), d / "out.jsonl")
    return name, {k: [r for r in rows if r["id"][0] == k] for k in kinds}, summary


def test_processors_and_min_p_equal_per_prompt_generate(checkpoints, prompts, mixed):
    """Repetition penalty 1.3 + no-repeat-ngram 3 + min-p 0.05, sampled and seeded:
    each row equals jaxlm.generate on its prompt alone (one device) with its seed."""
    name, rows, _ = mixed
    path, _ = checkpoints[name]
    _, texts = prompts
    cfg, ids = encoded(path, texts)
    _, params = jaxlm.load(str(path))
    params = jax.device_put(params, jax.devices()[0])
    tok = jaxlm.load_tokenizer(str(path))
    seeds = [row_seed(f"p{i}") for i in range(len(texts))]
    kw = dict(max_new_tokens=NEW, eos_id=tok.eos_id, **PROCESSORS)
    want = jaxlm.generate(params, cfg, ids, row_seeds=seeds, **kw).sequences()
    for i in (0, 1):  # a row does not depend on its batch: two prompts alone
        alone = jaxlm.generate(params, cfg, [ids[i]], row_seeds=[seeds[i]], **kw)
        assert alone.sequences()[0] == want[i]
    assert [r["tokens"] for r in rows["p"]] == want
    assert len({tuple(w) for w in want}) > N_PROMPTS // 2  # not one degenerate output


def test_json_schema_outputs_parse_and_validate(mixed):
    _, rows, _ = mixed
    assert len(rows["j"]) == N_PROMPTS
    for r in rows["j"]:
        assert r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["completion"]), SCHEMA)


def test_n_samples_share_one_prefill(checkpoints, prompts, mixed):
    """n = 3: three distinct completions per id; each prompt prefilled once, its pages
    allocated once (the samples share them; counted by the engine as it allocates)."""
    name, rows, summary = mixed
    path, _ = checkpoints[name]
    _, texts = prompts
    assert len(rows["n"]) == N_PROMPTS
    for r in rows["n"]:
        assert len(r["completions"]) == len(r["tokens"]) == 3
        assert len({tuple(t) for t in r["tokens"]}) == 3, r
    engine = summary["engine"]
    assert engine["prefilled"] == 3 * len(texts)  # once per row, not per sample
    cfg, ids = encoded(path, texts)
    if cfg.family == "decoder":  # every row's prompt pages once: 3 kinds of row per prompt
        assert engine["prompt_pages"] == 3 * sum(pages_for(len(x), 16) for x in ids)


def hf_beams(model, ids, encoder_decoder: bool, eos: int):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=NEW, num_beams=4,
                             do_sample=False, eos_token_id=eos, pad_token_id=0,
                             early_stopping=False, length_penalty=1.0)
    new = (out[0, 1:] if encoder_decoder else out[0, len(ids):]).tolist()
    return new[:new.index(eos)] if eos in new else [t for t in new if t != 0 or
                                                    not encoder_decoder]


@pytest.mark.parametrize("name", list(MODELS))
def test_beams_equal_transformers(checkpoints, prompts, name, tmp_path):
    path, model = checkpoints[name]
    inp, texts = prompts
    rows, _ = run(path, inp, tmp_path / "out.jsonl", "generate.num_beams=4")
    cfg, ids = encoded(path, texts)
    tok = jaxlm.load_tokenizer(str(path))
    seq2seq = cfg.family == "encoder_decoder"
    want = [hf_beams(model, x, seq2seq, tok.eos_id) for x in ids]
    assert [r["tokens"] for r in rows] == want


# ------------------------------------------------------------ the engine's API, on a tiny model

TINY = tiny_models.LLAMA
ROWS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12], [40], [60, 61, 62, 63, 64, 65], [7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama.params


def test_stream_yields_the_same_tokens_and_the_first_before_the_last_finishes(tiny):
    kw = dict(max_new_tokens=[3, 24, 9, 30, 12], temperature=0.7, seed=3)
    whole = jaxlm.generate(tiny, TINY, ROWS, **kw)
    got = {i: [] for i in range(len(ROWS))}
    held = {"engine": None}
    running_at_first = None
    reasons = []
    for ev in jaxlm.generate(tiny, TINY, ROWS, stream=True, slots=2, cache="paged",
                             engine_options=held, **kw):
        if running_at_first is None:  # when the first tokens arrive, is work still left?
            running_at_first = sum(not r.finished for r in held["engine"].requests)
        got[ev.row] += ev.tokens
        reasons.append(ev.finish_reason)
    assert [got[i] for i in range(len(ROWS))] == whole.sequences(include_eos=True)
    assert running_at_first >= 4  # 2 slots: at most one of 5 requests done by then
    assert set(reasons) == {None, "length"} and reasons[-1] == "length"


def test_an_abandoned_stream_frees_its_pages(tiny):
    held = {"engine": None}
    stream = jaxlm.generate(tiny, TINY, ROWS, max_new_tokens=40, stream=True, slots=2,
                            cache="paged", engine_options=held)
    next(stream)
    engine = held["engine"]
    assert engine.pool.in_use() > 0
    stream.close()  # the consumer walks away mid-way
    assert engine.pool.in_use() == 0 and (engine.pool.refs == 0).all()
    assert not engine.busy and all(r.finished for r in engine.requests)
    assert {o.finish_reason for r in engine.requests for o in r.outputs} >= {"abort"}


def test_a_request_added_mid_run_does_not_recompile(tiny, traces):
    from jaxlm.config import GenerateConfig
    from jaxlm.infer.engine import Engine, Features
    g = GenerateConfig(max_new_tokens=16, temperature=0.5)
    engine = Engine(tiny, TINY, settings=g, max_prompt_len=16, max_new_tokens=16, slots=2,
                    features=Features.of([g], TINY.vocab_size), steps_per_call=4)
    first = engine.add(ROWS[1])
    engine.step()
    compiled = traces.copy()
    late = engine.add(ROWS[3], GenerateConfig(max_new_tokens=10, temperature=1.3, seed=5))
    engine.run()
    assert first.finished and late.finished and len(late.outputs[0].tokens) == 10
    assert traces["_run"] == compiled["_run"] == 1  # the loop compiled once, before the add
    alone = jaxlm.generate(tiny, TINY, [ROWS[3]], max_new_tokens=10, temperature=1.3, seed=5,
                           row_seeds=[1])
    assert late.outputs[0].tokens == alone.sequences(include_eos=True)[0]


def test_stop_strings_end_on_the_text_and_are_not_returned(checkpoints):
    path, _ = checkpoints["llama"]
    cfg, params = jaxlm.load(str(path))
    tok = jaxlm.load_tokenizer(str(path))
    free = jaxlm.generate(params, cfg, ["the fox", "a sum"], tokenizer=tok, max_new_tokens=12,
                          temperature=0)
    text = free.texts[0]
    stop = text[3:6]  # a piece of the greedy text, past its start
    out = jaxlm.generate(params, cfg, ["the fox", "a sum"], tokenizer=tok, max_new_tokens=12,
                         temperature=0, stop=[stop])
    assert out.texts[0] == text[:text.index(stop)]
    assert stop not in out.texts[0] and out.lengths[0] < free.lengths[0]
    assert out.texts[1] == (free.texts[1] if stop not in free.texts[1] else
                            free.texts[1][:free.texts[1].index(stop)])
    streamed = {}
    for ev in jaxlm.generate(params, cfg, ["the fox", "a sum"], tokenizer=tok,
                             max_new_tokens=12, temperature=0, stop=[stop], stream=True):
        streamed[ev.row] = streamed.get(ev.row, "") + ev.text
    assert [streamed[0], streamed[1]] == out.texts


@pytest.mark.parametrize("line, words", [
    ({"id": 1, "prompt": "a", "temprature": 0.5}, ["line 1", "unknown key 'temprature'",
                                                  "did you mean 'temperature'"]),
    ({"id": 1, "prompt": "a", "stop": 5}, ["line 1", '"stop" must be a string']),
    ({"id": 1, "prompt": "a", "stop": ["ok", 3]}, ["line 1", '"stop" must be a string']),
    ({"id": 1, "prompt": "a", "n": 2, "temperature": 0.5}, ["line 1", '"n" samples with '
                                                           "generate.num_beams=2"]),
    ({"id": 1, "prompt": "a", "temperature": -1}, ["line 1", "temperature"]),
])
def test_bad_rows_are_one_line(checkpoints, tmp_path, line, words):
    from jaxlm.errors import InputError
    path, _ = checkpoints["llama"]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(line) + "\n")
    out = tmp_path / "out.jsonl"
    beams = ["generate.num_beams=2"] if "n" in line else []
    with pytest.raises(InputError) as e:
        batch_infer(str(path), str(inp), str(out), overrides=beams, progress=False)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not out.exists()  # a refused run writes nothing


def test_per_row_settings_reach_their_rows(checkpoints, tmp_path):
    path, _ = checkpoints["llama"]
    inp = tmp_path / "in.jsonl"
    rows = [{"id": "a", "prompt": "the fox", "max_new_tokens": 3},
            {"id": "b", "prompt": "the fox", "temperature": 1.5, "seed": 4, "n": 2},
            {"id": "c", "prompt": "the fox"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = batch_infer(str(path), str(inp), str(tmp_path / "out.jsonl"),
                          overrides=["generate.max_new_tokens=6"], progress=False)
    got = {r["id"]: r for r in map(json.loads, open(tmp_path / "out.jsonl"))}
    assert len(got["a"]["tokens"]) <= 3 and len(got["c"]["tokens"]) <= 6
    assert len(got["b"]["completions"]) == 2
    assert summary["engine"]["admitted"] == 3


def test_logprobs_are_the_raw_logits_log_softmax_at_each_token(tiny):
    out = jaxlm.generate(tiny, TINY, ROWS, max_new_tokens=6, temperature=0.9, seed=1,
                         return_logits=True, logprobs=True, cache="paged", slots=2)
    for r in range(len(ROWS)):
        n = int(out.lengths[r])
        lsm = jax.nn.log_softmax(out.logits[r, :n], axis=-1)
        want = np.take_along_axis(np.asarray(lsm), out.tokens[r, :n, None], axis=-1)[:, 0]
        np.testing.assert_allclose(out.logprobs[r, :n], want, atol=1e-5)


def test_paged_pool_runs_speculative_drafts(tiny):
    """A draft's pages in the target's pool (speculative decoding) give the target's own
    greedy tokens (a quantized pool against the contiguous cache: test_kv_quant.py)."""
    draft_cfg = dataclasses.replace(TINY, n_layers=1)
    draft = (jaxlm.init_params(draft_cfg, jax.random.key(9)), draft_cfg)
    plain = jaxlm.generate(tiny, TINY, ROWS, max_new_tokens=12)
    spec = jaxlm.generate(tiny, TINY, ROWS, max_new_tokens=12, draft=draft, num_speculative=3,
                          cache="paged", slots=2, page_size=4)
    assert spec.tokens.tolist() == plain.tokens.tolist()
    assert spec.stats["drafted"] > 0
