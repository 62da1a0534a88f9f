"""Hugging Face dirs in `jaxlm generate` and `jaxlm.generate` as they come from
`save_pretrained`: tokenizers with and without BOS, T5's `</s>`, several EOS ids
from generation_config.json, chat templates, and base models without a head.

The oracle is transformers: models built from configs with random weights,
tokenizers trained here (tokenizers), greedy `generate` on the ids its own
tokenizer makes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxlm
from jaxlm.errors import CheckpointError
from jaxlm.scripts import cli

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n\tpass\n", "print('hello world')\n",
         "import os\nfor i in range(10):\n    print(i)\n"] * 10
PROMPTS = ["def f(x):", "print('hello"]
NEW = 8
# a Llama-3-like template: the template writes BOS, each turn ends with <|eot|>
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|eot|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")


def _tokenizer(tmp, specials, post=None, template=None, **names):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if post is not None:
        tok.post_processor = post(tok)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(tmp)
    return fast


def _save(model, path):
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tok = _tokenizer(path, ["<unk>", "<s>", "</s>", "<|start|>", "<|eot|>"], template=TEMPLATE,
                     bos_token="<s>", eos_token="<|eot|>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3, bos_token_id=1, eos_token_id=4)
    return path, tok, _save(transformers.LlamaForCausalLM(cfg), path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    tok = _tokenizer(path, ["<|endoftext|>"], bos_token="<|endoftext|>",
                     eos_token="<|endoftext|>")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.3)
    return path, tok, _save(transformers.GPT2LMHeadModel(cfg), path)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from tokenizers import processors
    path = tmp_path_factory.mktemp("t5")
    # as T5's own tokenizer: no BOS, "</s>" appended to every input
    eos = lambda t: processors.TemplateProcessing(single="$A </s>",
                                                  special_tokens=[("</s>", t.token_to_id("</s>"))])
    tok = _tokenizer(path, ["<pad>", "</s>", "<unk>"], post=eos, eos_token="</s>",
                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, initializer_factor=3.0,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return path, tok, _save(transformers.T5ForConditionalGeneration(cfg), path)


def _hf_greedy(model, ids, **kw):
    """transformers' greedy continuation of one prompt (new ids, the stop id kept)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw)
    out = out[0].tolist()
    return out[1:] if model.config.is_encoder_decoder else out[len(ids):]


def _strip(seq, eos):
    return seq[:-1] if seq and seq[-1] in eos else seq


def _cli(capsys, *args):
    rc = cli.main(["generate", *map(str, args), f"generate.max_new_tokens={NEW}"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _expected(prompts, texts):
    return "".join(f"=== prompt: {p!r}\n{p + t}\n" for p, t in zip(prompts, texts))


def test_t5_appends_eos_and_matches_transformers(t5, capsys):
    """No BOS, `</s>` appended (as the HF tokenizer does), decoder start and EOS from
    generation_config.json: greedy ids and the CLI's text equal transformers'."""
    path, hf_tok, model = t5
    tok = jaxlm.load_tokenizer(path)
    assert tok.bos_id is None
    cfg, params = jaxlm.load(path)
    from jaxlm.infer.text import encode_prompts
    ids = encode_prompts(tok, cfg, PROMPTS)
    assert ids == [hf_tok(p)["input_ids"] for p in PROMPTS]
    assert all(row[-1] == tok.eos_id for row in ids)
    want = [_hf_greedy(model, row) for row in ids]
    out = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, max_new_tokens=NEW)
    assert out.sequences(include_eos=True) == want
    assert out.texts == [hf_tok.decode(_strip(w, [1]), skip_special_tokens=True) for w in want]
    rc, stdout, err = _cli(capsys, "--checkpoint", path, *sum((["--prompt", p] for p in PROMPTS),
                                                              []))
    assert rc == 0, err
    assert stdout == _expected(PROMPTS, out.texts)


def test_gpt2_bos_is_eos_and_cli_text(gpt2, capsys):
    """GPT-2: BOS and EOS are one token (<|endoftext|>); the prompt starts with it."""
    path, hf_tok, model = gpt2
    tok = jaxlm.load_tokenizer(path)
    assert tok.bos_id == tok.eos_id == 0
    ids = [0] + hf_tok(PROMPTS[0])["input_ids"]
    want = _strip(_hf_greedy(model, ids), [0])
    rc, stdout, err = _cli(capsys, "--checkpoint", path, "--prompt", PROMPTS[0])
    assert rc == 0, err
    assert stdout == _expected(PROMPTS[:1], [hf_tok.decode(want, skip_special_tokens=True)])
    # --chat on a checkpoint without a template: one line, exit 2
    rc, stdout, err = _cli(capsys, "--checkpoint", path, "--chat", "--prompt", "hi")
    assert rc == 2 and err.count("\n") == 1 and "has no chat template" in err, err


def test_qwen_style_tokenizer_has_no_bos(tmp_path):
    """A tokenizer_config.json naming no bos_token (Qwen) means no BOS, though the
    vocabulary holds <|endoftext|>: decoder prompts are the text's ids alone, as
    transformers' tokenizer gives them."""
    hf_tok = _tokenizer(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok = jaxlm.load_tokenizer(tmp_path)
    assert tok.bos_id is hf_tok.bos_token_id is None and tok.eos_id == hf_tok.eos_token_id
    from jaxlm.infer.text import encode_prompts
    assert encode_prompts(tok, jaxlm.ModelConfig(), PROMPTS) == [
        hf_tok(p)["input_ids"] for p in PROMPTS]


def _two_stop_ids(model, rows):
    """One stop id per row that its greedy continuation emits (after at least one
    other token where it can), and that the other row does not emit before its own."""
    runs = [_hf_greedy(model, r) for r in rows]
    for ka in range(len(runs[0]) - 1, -1, -1):
        a = runs[0][ka]
        if a in runs[0][:ka] or a in runs[1]:
            continue
        for kb in range(len(runs[1]) - 1, -1, -1):
            b = runs[1][kb]
            if b not in runs[1][:kb] and b not in runs[0][:ka + 1]:
                return [a, b]
    raise AssertionError(f"no stop ids separate the greedy runs {runs}")


def test_llama_chat_and_two_eos_ids(llama, capsys):
    """--chat renders each prompt with the checkpoint's template as transformers'
    apply_chat_template; generation_config.json's two eos ids each stop a row, as in
    transformers' generate; the API with strings gives the same ids and texts."""
    path, hf_tok, model = llama
    rows = [list(hf_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                            add_generation_prompt=True)["input_ids"])
            for p in PROMPTS]
    eos = _two_stop_ids(model, rows)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos,
                                                             "bos_token_id": 1}))
    want = [_hf_greedy(model, r, eos_token_id=eos) for r in rows]
    assert [w[-1] for w in want] == eos and all(len(w) < NEW + 1 for w in want)

    from jaxlm.infer.text import encode_prompts, generation_settings
    from jaxlm.infer.text import chat_template_for
    tok = jaxlm.load_tokenizer(path)
    assert generation_settings(path, tok).eos_ids == tuple(eos)
    cfg, params = jaxlm.load(path)
    assert encode_prompts(tok, cfg, PROMPTS, chat_template=chat_template_for(path)) == rows
    out = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, chat_template=TEMPLATE,
                         eos_id=eos, max_new_tokens=NEW)
    assert out.sequences(include_eos=True) == want and out.finished.all()
    texts = [hf_tok.decode(w[:-1], skip_special_tokens=True) for w in want]
    assert out.texts == texts
    args = sum((["--prompt", p] for p in PROMPTS), [])
    rc, stdout, err = _cli(capsys, "--checkpoint", path, "--chat", *args)
    assert rc == 0, err
    assert stdout == _expected(PROMPTS, texts)
    # --eos-id replaces the checkpoint's: only the second row's id stops (the first runs on)
    plain = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, chat_template=TEMPLATE,
                           eos_id=eos[1:], max_new_tokens=NEW)
    rc, stdout, err = _cli(capsys, "--checkpoint", path, "--chat", "--eos-id", eos[1], *args)
    assert rc == 0 and stdout == _expected(PROMPTS, plain.texts), err
    assert not plain.finished[0] and plain.finished[1]
    # the ids-only call is unchanged: no texts
    assert jaxlm.generate(params, cfg, rows, eos_id=eos, max_new_tokens=NEW).texts is None


# ------------------------------------------------------------------ base models

def _base_models():
    torch.manual_seed(3)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=True)
    t5enc = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu"))
    return {"llama": (llama, "lm_head.weight"), "bert": (bert, "cls.predictions"),
            "t5_encoder": (t5enc, "the decoder and lm_head.weight")}


def test_base_models_give_hidden_states_and_refuse_logits(tmp_path):
    """LlamaModel, BertModel, T5EncoderModel dirs: hidden states equal transformers'
    last_hidden_state, jaxlm.embed their masked mean; logits are a one-line error
    naming what the checkpoint lacks."""
    tokens = np.random.default_rng(0).integers(3, 96, (2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.int32)
    mask[1, 6:] = 0
    for name, (model, missing) in _base_models().items():
        model.eval()
        model.save_pretrained(tmp_path / name)
        cfg, params = jaxlm.load(tmp_path / name)
        assert not cfg.head and "head" not in params and "mlm" not in params, name
        with torch.no_grad():
            want = model(input_ids=torch.tensor(tokens, dtype=torch.long)).last_hidden_state
        hidden, _ = jaxlm.forward(params, cfg, tokens, return_hidden=True)
        np.testing.assert_allclose(np.asarray(hidden), want.numpy(), atol=2e-4, err_msg=name)
        if cfg.family == "encoder":  # padding kept out of attention: transformers' mask
            with torch.no_grad():
                h = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            np.testing.assert_allclose(np.asarray(jaxlm.embed(params, cfg, tokens, mask)),
                                       pooled, atol=2e-4, err_msg=name)
        with pytest.raises(CheckpointError, match="no output head") as e:
            jaxlm.forward(params, cfg, tokens)
        assert missing in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        cfg, params = jaxlm.load(tmp_path / "llama")
        jaxlm.generate(params, cfg, [[3, 4]], max_new_tokens=2)


# ------------------------------------------------------------------ generation_config, no EOS

def _generate_cli(capsys, *argv):
    """`jaxlm generate ...` run in-process: (the resolved generate settings, stdout)."""
    from jaxlm.scripts.generate import run_generate
    args = cli.build_parser().parse_args(["generate", *map(str, argv)])
    resolved = run_generate(args)
    return resolved, capsys.readouterr().out


def test_generation_config_sampling_defaults(llama, tmp_path, capsys):
    """do_sample/temperature/top_k of generation_config.json apply to the keys the
    user did not give; an explicit generate.temperature (0: greedy) wins."""
    import shutil
    from jaxlm.infer.text import generation_settings
    path = tmp_path / "llama"
    shutil.copytree(llama[0], path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.7, top_k=5)
    (path / "generation_config.json").write_text(json.dumps(gen))
    tok = jaxlm.load_tokenizer(path)
    cfg, params = jaxlm.load(path)
    eos = list(generation_settings(path, tok).eos_ids)
    args = ["--checkpoint", path, *sum((["--prompt", p] for p in PROMPTS), []),
            f"generate.max_new_tokens={NEW}"]
    resolved, stdout = _generate_cli(capsys, *args)
    assert (resolved["temperature"], resolved["top_k"], resolved["top_p"]) == (0.7, 5, 1.0)
    sampled = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, eos_id=eos,
                             max_new_tokens=NEW, temperature=0.7, top_k=5, seed=0)
    assert stdout == _expected(PROMPTS, sampled.texts)
    resolved, stdout = _generate_cli(capsys, *args, "generate.temperature=0")
    assert resolved["temperature"] == 0.0
    greedy = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, eos_id=eos, max_new_tokens=NEW)
    assert stdout == _expected(PROMPTS, greedy.texts)
    assert sampled.texts != greedy.texts  # the defaults did change the decoding
    # a run quantized from the dir keeps them (its saved generate section is defaults)
    from jaxlm.scripts.quantize import run_quantize
    run_quantize(str(path), str(tmp_path / "int8"))
    resolved, _ = _generate_cli(capsys, "--checkpoint", tmp_path / "int8", "--prompt",
                                PROMPTS[0], "generate.max_new_tokens=2")
    assert (resolved["temperature"], resolved["top_k"]) == (0.7, 5)
    gen["do_sample"] = False  # transformers: greedy whatever the temperature says
    (path / "generation_config.json").write_text(json.dumps(gen))
    resolved, stdout = _generate_cli(capsys, *args)
    assert resolved["temperature"] == 0.0 and stdout == _expected(PROMPTS, greedy.texts)
    gen.update(do_sample=True, top_k="five")  # a file's bad value: one line naming it
    (path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError, match="generation_config.json: top_k should be an "
                                              "integer, got 'five'"):
        generation_settings(path, tok)


def test_generation_config_beam_defaults(llama, tmp_path, capsys):
    """num_beams, length_penalty and early_stopping of generation_config.json apply
    (its sampler keys then do not: beams are greedy); generate.num_beams=1 wins."""
    import shutil
    from jaxlm.infer.text import generation_settings
    path = tmp_path / "llama"
    shutil.copytree(llama[0], path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(num_beams=3, length_penalty=0.5, early_stopping=True, do_sample=True,
               temperature=0.7)
    (path / "generation_config.json").write_text(json.dumps(gen))
    tok = jaxlm.load_tokenizer(path)
    cfg, params = jaxlm.load(path)
    eos = list(generation_settings(path, tok).eos_ids)
    args = ["--checkpoint", path, "--prompt", PROMPTS[0], f"generate.max_new_tokens={NEW}"]
    resolved, stdout = _generate_cli(capsys, *args)
    assert (resolved["num_beams"], resolved["length_penalty"], resolved["early_stopping"],
            resolved["temperature"]) == (3, 0.5, True, 0.0)
    beams = jaxlm.generate(params, cfg, PROMPTS[:1], tokenizer=tok, eos_id=eos,
                           max_new_tokens=NEW, num_beams=3, length_penalty=0.5,
                           early_stopping=True)
    assert "(score " in stdout and beams.texts[0] in stdout  # the beams' best, its score
    resolved, _ = _generate_cli(capsys, *args, "generate.num_beams=1")
    assert (resolved["num_beams"], resolved["temperature"]) == (1, 0.7)
    gen["early_stopping"] = "soon"
    (path / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckpointError, match="early_stopping should be true, false or"):
        generation_settings(path, tok)


def test_tokenizer_without_eos_runs_to_max_new_tokens(llama, tmp_path, capsys):
    """A tokenizer with no EOS and a generation_config.json without eos_token_id load;
    rows stop only at max_new_tokens (greedy ids equal transformers' with no EOS),
    or at --eos-id when given."""
    import copy
    import shutil
    from jaxlm.infer.text import encode_prompts, generation_settings
    path = tmp_path / "llama"
    shutil.copytree(llama[0], path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    hf_tok = _tokenizer(path, ["<unk>", "<s>"], bos_token="<s>", unk_token="<unk>")
    gen = json.loads((path / "generation_config.json").read_text())
    gen.pop("eos_token_id", None)
    (path / "generation_config.json").write_text(json.dumps(gen))
    tok = jaxlm.load_tokenizer(path)
    assert tok.eos_id is None and hf_tok.eos_token_id is None
    assert generation_settings(path, tok).eos_ids == ()
    cfg, params = jaxlm.load(path)
    model = copy.deepcopy(llama[2])
    model.generation_config.eos_token_id = None
    ids = encode_prompts(tok, cfg, PROMPTS)
    want = [_hf_greedy(model, row) for row in ids]
    assert all(len(w) == NEW for w in want)
    out = jaxlm.generate(params, cfg, PROMPTS, tokenizer=tok, max_new_tokens=NEW)
    assert out.sequences() == want and not out.finished.any()
    prompts = sum((["--prompt", p] for p in PROMPTS), [])
    _, stdout = _generate_cli(capsys, "--checkpoint", path, *prompts,
                              f"generate.max_new_tokens={NEW}")
    texts = [hf_tok.decode(w, skip_special_tokens=True) for w in want]
    assert stdout == _expected(PROMPTS, texts)
    stop = want[0][2]  # row 0 stops at its third token given --eos-id
    _, stdout = _generate_cli(capsys, "--checkpoint", path, "--prompt", PROMPTS[0],
                              "--eos-id", stop, f"generate.max_new_tokens={NEW}")
    cut = want[0][:want[0].index(stop)]
    assert stdout == _expected(PROMPTS[:1], [hf_tok.decode(cut, skip_special_tokens=True)])


def test_t5_model_dir_gives_hidden_states_and_refuses_logits(tmp_path):
    """A T5Model dir (encoder + decoder, no lm_head; v1.0: tied, relu): loads with
    model.head=false; decoder hidden states and the encoder's pooled output equal
    transformers' T5Model; logits and generation are one-line CheckpointErrors, tied
    embeddings or not (as LlamaModel / GPT2Model dirs); it saves back as a T5Model."""
    torch.manual_seed(4)
    model = transformers.T5Model(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="relu", tie_word_embeddings=True, initializer_factor=3.0)).eval()
    model.save_pretrained(tmp_path / "t5")
    cfg, params = jaxlm.load(tmp_path / "t5")
    assert cfg.family == "encoder_decoder" and not cfg.head and "head" not in params
    rng = np.random.default_rng(1)
    tokens, dec = rng.integers(2, 96, (2, 9)).astype(np.int32), rng.integers(2, 96, (2, 5))
    dec[:, 0] = 0
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long))
    hidden, _ = jaxlm.forward(params, cfg, tokens, dec.astype(np.int32), mask,
                              return_hidden=True)
    # float32 sums over activations of size ~5: 1e-3 (a wrong scale or mask is O(1))
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-3,
                               rtol=1e-3)
    enc = want.encoder_last_hidden_state.numpy()
    pooled = (enc * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(jaxlm.embed(params, cfg, tokens, mask)), pooled,
                               atol=1e-3, rtol=1e-3)
    for call in (lambda: jaxlm.forward(params, cfg, tokens, dec.astype(np.int32)),
                 lambda: jaxlm.generate(params, cfg, [[3, 4, 1]], max_new_tokens=2)):
        with pytest.raises(CheckpointError, match="no output head") as e:
            call()
        assert "lm_head.weight (a T5Model)" in str(e.value) and "\n" not in str(e.value)
    jaxlm.save(tmp_path / "again", cfg, params, format="hf")
    again = transformers.T5Model.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        got = again(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec, dtype=torch.long))
    np.testing.assert_allclose(got.last_hidden_state.numpy(), want.last_hidden_state.numpy(),
                               atol=1e-5)
