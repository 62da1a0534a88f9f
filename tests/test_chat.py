"""Chat templates: our rendering + tokenization == transformers' apply_chat_template."""

import json

import pytest

from jaxlm.errors import CheckpointError, InputError
from jaxlm.model.chat import (DEFAULT_CHAT_TEMPLATE, chat_template_of, render_chat,
                              template_tokens)
from jaxlm.model.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Qwen2-Instruct's template (system default), with a {% generation %} block.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-Instruct's, written over lines so trim_blocks/lstrip_blocks matter.
LLAMA3 = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role'] | tojson) }}
    {% endif %}
    {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}
    {% if loop.index0 == 0 %}
        {% set content = bos_token + content %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {{- content }}{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""

TEXTS = ["hello world, how are you today?", "I am fine, thank you. And you?",
         "def f(x):\n    return x + 1\n", "système: réponds en français"] * 4

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "how are you?"},
     {"role": "assistant", "content": "fine, thank you"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello  you\n"},
     {"role": "user", "content": "def f(x): return x"}, {"role": "assistant", "content": "français"}],
]


# Llama 3's pre-tokenizer split: newline runs are pieces of their own ("\n\n" then "fine").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_dir(tmp_path_factory, name, specials, bos, eos, template, split=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(show_progress=False,
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = template
    path = tmp_path_factory.mktemp(name)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   None, "<|im_end|>", CHATML)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "llama3", ["<|begin_of_text|>", "<|end_of_text|>",
                                                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   "<|begin_of_text|>", "<|eot_id|>", LLAMA3, split=LLAMA3_SPLIT)


def _hf_ids(path, messages, add_generation_prompt):
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("which", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_matches_transformers(which, conversation, add_generation_prompt, chatml_dir, llama3_dir):
    path = {"chatml": chatml_dir, "llama3": llama3_dir}[which]
    template = chat_template_of(path)
    assert template == {"chatml": CHATML, "llama3": LLAMA3}[which]
    tok = load_tokenizer(path)
    messages = CONVERSATIONS[conversation]
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       **template_tokens(tok))
    ours = tok.encode_chat(text)
    assert ours == _hf_ids(path, messages, add_generation_prompt)
    # plain encode reads special-token strings as transformers' tokenizer(text) does
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    for split in (False, True):
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add, split_special_tokens=split) == hf(
                text, add_special_tokens=add, split_special_tokens=split)["input_ids"], (split, add)
    special = {"chatml": "<|im_start|>", "llama3": "<|eot_id|>"}[which]
    assert tok.encode(special) == [hf.convert_tokens_to_ids(special)]
    assert tok.encode(special, split_special_tokens=True) != tok.encode(special)


def test_template_sources(tmp_path, chatml_dir):
    assert chat_template_of(tmp_path) is None
    config = {"chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template_of(tmp_path / "tokenizer.json") == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "S"}))
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chat_template_of(tmp_path) == "S"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert chat_template_of(tmp_path) == "J"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x",
                                                                                  "template": "X"}]}))
    with pytest.raises(CheckpointError, match="default"):
        chat_template_of(tmp_path)


def test_default_template_and_errors(llama3_dir):
    messages = CONVERSATIONS[1]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages) == expected
    assert render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n")
    with pytest.raises(InputError, match="unknown role \"tool\""):
        render_chat(LLAMA3, [{"role": "tool", "content": "x"}], bos_token="<s>")
    with pytest.raises(InputError, match="does not compile"):
        render_chat("{% for m in messages %}", messages)
    with pytest.raises(InputError):  # the sandbox refuses attribute escapes
        render_chat("{{ messages.__class__.__mro__ }}", messages)


def test_sentencepiece_encode_chat(sp_tokenizer):
    tok = sp_tokenizer
    bos, eos = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
    assert template_tokens(tok) == {"bos_token": bos, "eos_token": eos}
    text = f"{bos}hello world{eos}\n{eos}"
    assert tok.encode_chat(text) == ([tok.bos_id] + tok.encode("hello world") + [tok.eos_id]
                                     + tok.encode("\n") + [tok.eos_id])
    assert tok.encode(text) == tok.encode_chat(text)  # special strings are their ids
    assert tok.bos_id not in tok.encode(text, split_special_tokens=True)
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_id] + tok.encode("hi")


def test_resolve_chat_template_and_config_keys(tmp_path, chatml_dir):
    from jaxlm.errors import ConfigError
    from jaxlm.model.chat import resolve_chat_template
    from jaxlm.config import DataConfig, TrainConfig

    assert resolve_chat_template("", chatml_dir) == CHATML
    assert resolve_chat_template("", tmp_path) == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_template("", None) == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_template("chatml", chatml_dir) == DEFAULT_CHAT_TEMPLATE
    (tmp_path / "t.jinja").write_text(LLAMA3)
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == LLAMA3
    with pytest.raises(ConfigError, match="data.chat_template"):
        resolve_chat_template(str(tmp_path / "none.jinja"))
    assert TrainConfig().sft_loss_on == "completion" and DataConfig().chat_template == ""
    with pytest.raises(ConfigError, match="sft_loss_on"):
        TrainConfig(sft_loss_on="prompt")


@pytest.mark.parametrize("which", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", [1, 2])
def test_assistant_mask_matches_transformers_generation_mask(which, conversation, chatml_dir,
                                                             llama3_dir):
    """Our prefix-rendering mask == transformers' {% generation %} mask (ChatML), and the
    Llama-3 mask is the tokens of "content<|eot_id|>" of each assistant turn."""
    from jaxlm.train.sft import chat_example
    path = {"chatml": chatml_dir, "llama3": llama3_dir}[which]
    tok, messages = load_tokenizer(path), CONVERSATIONS[conversation]
    tokens, is_loss = chat_example(messages, tok, chat_template_of(path))
    assert tokens.tolist() == _hf_ids(path, messages, False)
    if which == "chatml":
        hf = transformers.PreTrainedTokenizerFast.from_pretrained(path)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert is_loss.astype(int).tolist() == list(out["assistant_masks"])
    else:
        spans = [tok.encode_chat(m["content"].strip() + "<|eot_id|>") for m in messages
                 if m["role"] == "assistant"]
        assert tokens[is_loss].tolist() == [i for span in spans for i in span]
    assert is_loss.sum() > 0
