"""Guided decoding: a tiny random Llama with a locally trained sentencepiece vocabulary,
100 seeded samples per constraint checked by an independent oracle (`json` +
`jsonschema`, `re.fullmatch`), mixed constraints in one batch, greedy, errors."""

import json
import re

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import InputError
from jaxlm.infer import generate as gen
from jaxlm.infer.guided import Guide, token_bytes
from jaxlm.model.config import ModelConfig
from jaxlm.model.tokenizer import train_sentencepiece

jsonschema = pytest.importorskip("jsonschema")

TEXT = ["The quick brown fox jumps over the lazy dog. {\"name\": \"Ada\", \"age\": 36}",
        "Pack my box with five dozen liquor jugs! [1, 2, 3] 0123456789 true false null",
        "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow?",
        "e-mail: ada@example.org, id_42 = {\"tags\": [\"x\", \"y\"], \"ok\": true}"] * 20

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "age": {"type": "integer"},
        "color": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 2},
                 "maxItems": 2},
        "owner": {"type": "object", "properties": {"id": {"type": "integer"},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"]},
    },
    "required": ["name", "age", "color", "tags", "owner"],
}
REGEX = r"[a-z]{2,5}-[0-9]{1,3}( ok)?"
CHOICES = ["yes", "no", "maybe not"]
N = 100  # seeded samples per constraint
MAX_NEW = 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = train_sentencepiece(TEXT, 320, tmp_path_factory.mktemp("tok"))
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, d_ff=64, max_seq_len=256)
    params = jaxlm.init_params(cfg, jax.random.key(0))
    return tok, cfg, params


@pytest.fixture(scope="module")
def guides(setup):
    tok, cfg, _ = setup
    return {"json": Guide.json_schema(SCHEMA, tok, cfg.vocab_size),
            "regex": Guide.regex(REGEX, tok, cfg.vocab_size),
            "choice": Guide.choice(CHOICES, tok, cfg.vocab_size)}


def run(setup, guide, n=N, **kw):
    tok, cfg, params = setup
    prompt = [tok.bos_id] + tok.encode("Answer: ")
    kw = dict(dict(temperature=1.0, max_new_tokens=MAX_NEW, seed=3), **kw)
    out = jaxlm.generate(params, cfg, [prompt] * n, guide=guide, eos_id=tok.eos_id, **kw)
    guided = np.asarray([g is not None for g in guide] if isinstance(guide, list) else [True])
    assert out.finished[guided if len(guided) == n else slice(None)].all(), \
        "every guided row ends with EOS within max_new_tokens"
    return [tok.decode(ids) for ids in out.sequences()], out


def test_token_bytes_concatenate_to_decode(setup):
    tok, _, _ = setup
    pieces = token_bytes(tok)
    for text in TEXT[:4] + ["  spaces  and é ü 漢字 ▁mark\n"]:
        ids = tok.encode(text)
        assert b"".join(pieces[i] for i in ids).decode() == tok.decode(ids) == text


def test_json_schema_samples_validate(setup, guides):
    texts, _ = run(setup, guides["json"])
    docs = [json.loads(t) for t in texts]  # every output parses
    for d in docs:
        jsonschema.validate(d, SCHEMA)
    assert len({json.dumps(d, sort_keys=True) for d in docs}) > N // 2  # sampled, not stuck


def test_regex_and_choice_samples_match(setup, guides):
    texts, _ = run(setup, guides["regex"])
    assert all(re.fullmatch(REGEX, t) for t in texts), [t for t in texts
                                                         if not re.fullmatch(REGEX, t)]
    assert len(set(texts)) > N // 2
    texts, _ = run(setup, guides["choice"], seed=5)
    assert set(texts) <= set(CHOICES) and len(set(texts)) == len(CHOICES)


def test_mixed_batch_greedy_and_top_k_top_p(setup, guides):
    tok, cfg, params = setup
    order = [guides["json"], None, guides["regex"], guides["choice"]]
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                                          repetition_penalty=1.2)):
        texts, out = run(setup, order, n=4, **kw)
        jsonschema.validate(json.loads(texts[0]), SCHEMA)
        assert re.fullmatch(REGEX, texts[2]) and texts[3] in CHOICES
        # the unconstrained row equals a plain run (guides do not touch other rows)
        plain = jaxlm.generate(params, cfg, [[tok.bos_id] + tok.encode("Answer: ")] * 4,
                               eos_id=tok.eos_id, max_new_tokens=MAX_NEW, seed=3,
                               **dict(dict(temperature=1.0), **kw))
        assert out.sequences()[1] == plain.sequences()[1]


def test_greedy_follows_the_masked_argmax(setup, guides):
    """Oracle: a naive host loop re-running the model on the whole sequence and
    taking the argmax over the tokens the guide's table allows."""
    tok, cfg, params = setup
    g = guides["regex"]
    prompt = [tok.bos_id] + tok.encode("Answer: ")
    _, out = run(setup, g, n=1, temperature=0.0, max_new_tokens=16)
    seq, state, want = list(prompt), 0, []
    fwd = jax.jit(lambda p, x: jaxlm.forward(p, cfg, x)[0])  # causal: right padding is inert
    for step in range(16):
        padded = np.zeros((1, 32), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(fwd(params, padded)[0, len(seq) - 1])
        allowed = g.table[state] >= 0
        allowed &= (g.dist[np.maximum(g.table[state], 0)] + 2 <= 16 - step)
        allowed[tok.eos_id] = g.accepting[state]
        t = int(np.argmax(np.where(allowed, logits, -np.inf)))
        want.append(t)
        if t == tok.eos_id:
            break
        seq.append(t)
        state = int(g.table[state, t])
    assert out.sequences(include_eos=True)[0] == want


def test_traced_once(setup, guides, traces):
    before = traces["_run"]
    run(setup, guides["regex"], n=4, seed=11)
    mid = traces["_run"]
    run(setup, [guides["regex"], guides["choice"], None, guides["regex"]], n=4, seed=12)
    assert traces["_run"] == mid <= before + 1


def test_errors(setup, guides):
    tok, cfg, params = setup
    V = cfg.vocab_size
    with pytest.raises(InputError, match="invalid regex"):
        Guide.regex("(ab", tok, V)
    with pytest.raises(InputError, match="unsupported JSON schema.*ipv9"):
        Guide.json_schema({"type": "string", "format": "ipv9"}, tok, V)
    with pytest.raises(InputError, match="'minimum' at schema.properties.a.items"):
        Guide.json_schema({"type": "object", "properties": {"a": {
            "type": "array", "items": {"type": "integer", "minimum": 0}}}}, tok, V)
    with pytest.raises(InputError, match="not valid JSON"):
        Guide.json_schema("{nope", tok, V)
    with pytest.raises(InputError, match="choices"):
        Guide.choice("yes", tok, V)
    small = ModelConfig(vocab_size=5, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                        max_seq_len=64)  # ids 4.. (the letters) cut off: nothing to spell
    with pytest.raises(InputError, match="cannot realise"):
        Guide.regex("abc", tok, small.vocab_size)
    prompt = [[tok.bos_id, 5]]
    with pytest.raises(InputError, match="beam"):
        jaxlm.generate(params, cfg, prompt, guide=guides["regex"], eos_id=tok.eos_id,
                       max_new_tokens=8, num_beams=2)
    with pytest.raises(InputError, match="eos_id"):
        jaxlm.generate(params, cfg, prompt, guide=guides["regex"], max_new_tokens=8)
    with pytest.raises(InputError, match="needs at least 4 tokens.*max_new_tokens=3"):
        jaxlm.generate(params, cfg, prompt, guide=Guide.regex("[0-9]{3}", tok, V),
                       eos_id=tok.eos_id, max_new_tokens=3)  # digits are split: 3 + EOS
    with pytest.raises(InputError, match="2 guides for 1 prompts"):
        jaxlm.generate(params, cfg, prompt, guide=[None, None], eos_id=tok.eos_id,
                       max_new_tokens=8)


def test_cli(setup, tmp_path, capsys):
    from jaxlm.scripts.cli import main
    tok, cfg, params = setup
    path = str(tmp_path / "model")
    jaxlm.save(path, cfg, params)
    tok.save(path)
    base = ["generate", "--checkpoint", path, "--prompt", "Answer: ", "--prompt", "Q: "]
    sets = ["generate.temperature=1.0", "generate.max_new_tokens=96"]
    assert main(base + ["--choice", "yes", "--choice", "maybe not"] + sets) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] in ("Answer: yes", "Answer: maybe not") and lines[3] in ("Q: yes",
                                                                             "Q: maybe not")
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    assert main(base + ["--json-schema", str(tmp_path / "s.json")] + sets) in (0, None)
    out = capsys.readouterr().out.splitlines()
    jsonschema.validate(json.loads(out[1][len("Answer: "):]), SCHEMA)
    (tmp_path / "bad.json").write_text('{"type": "integer", "multipleOf": 3}')
    for extra, needle in ((["--regex", "[a-"], "invalid regex"),
                          (["--json-schema", str(tmp_path / "bad.json")], "'multipleOf'"),
                          (["--json-schema", str(tmp_path / "none.json")], "cannot read"),
                          (["--regex", "a+", "generate.num_beams=2"], "beam")):
        settings = sets if "beam" not in needle else ["generate.temperature=0",
                                                      "generate.max_new_tokens=96"]
        assert main(base + extra[:2] + settings + extra[2:]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def _hf_tokenizer(kind):
    """A small tokenizer.json trained here: GPT-2 style ByteLevel BPE, or a Llama-style
    BPE with Metaspace ("▁") and byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxlm.model.tokenizer import HFTokenizer
    special = ["<unk>", "<s>", "</s>"]
    if kind == "bytelevel":
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                       decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special)
    t.train_from_iterator(TEXT, trainer)
    if kind != "bytelevel":  # byte pieces in the model's vocab, as Llama's tokenizer.json
        spec = json.loads(t.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in spec["model"]["merges"]]
        t.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    return HFTokenizer(t.to_str())


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_hf_token_bytes_and_a_guide(kind):
    tok = _hf_tokenizer(kind)
    pieces = token_bytes(tok)
    assert pieces[tok.eos_id] is None and pieces[tok.bos_id] is None
    for text in TEXT[:4] + ["  spaces  and é ü 漢字\n"]:
        ids = tok.encode(text)
        assert b"".join(pieces[i] for i in ids).decode() == tok.decode(ids) == text
    g = Guide.regex("é[0-9]{2}", tok, tok.vocab_size + 8)  # padded model vocab
    assert g.table.shape == (len(g.table), tok.vocab_size + 8) and g.dist[0] >= 2


def test_min_new_tokens_cannot_starve_a_guided_row(setup, guides):
    """The guide wins: once only EOS is allowed it is emitted, min_new_tokens or not."""
    for kw in (dict(temperature=1.0), dict(temperature=0.0)):
        texts, out = run(setup, guides["choice"], n=8, min_new_tokens=40, **kw)
        assert set(texts) <= set(CHOICES) and out.lengths.max() < 40
