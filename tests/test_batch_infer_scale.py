"""`jaxlm batch-infer` on real checkpoints and at scale: Hugging Face dirs (Llama, GPT-2,
T5) against transformers' greedy `generate`, several EOS ids from generation_config.json,
--chat, a (4 data x 2 tensor) mesh, and 2 processes x 4 devices writing one file that a
killed run resumes exactly once."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.errors import CheckpointError, InputError  # noqa: E402
from jaxlm.infer.batch import batch_infer  # noqa: E402

PROMPTS = ["the fox", "a lazy dog", "over the hill", "sum of all", "jumps over", "the dog"]
N_NEW = 6
GEN = [f"generate.max_new_tokens={N_NEW}", "generate.temperature=0"]
MESH = ["mesh.data=4", "mesh.tensor=2"]
WORDS = ["the quick brown fox jumps over the lazy dog", "a sum of all parts over the hill",
         "def main(): return None"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
V = 300
WORKER = os.path.join(os.path.dirname(__file__), "batch_infer_worker.py")


def save_tokenizer(directory, specials, config):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(WORDS * 5, trainers.BpeTrainer(
        show_progress=False, vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    t.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert t.get_vocab_size() == V  # the models' vocab: every id decodes


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_" in name
                    else 0.3 * torch.randn_like(p))
    return model.eval()


def hf_greedy(model, ids, stops, encoder_decoder=False):
    """transformers' greedy continuation of one prompt, cut before the first stop id."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=N_NEW, do_sample=False,
                             eos_token_id=list(stops) or None, pad_token_id=0)
    new = out[0, 1:] if encoder_decoder else out[0, len(ids):]
    new = new.tolist()
    for i, t in enumerate(new):
        if t in stops:
            return new[:i]
    return new


def prompt_ids(tok, text, encoder_decoder=False):
    if encoder_decoder:
        return tok.encode(text) + [tok.eos_id]
    return ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(text)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    llama_dir, gpt2_dir, t5_dir, bert_dir = (root / n for n in ("llama", "gpt2", "t5", "bert"))
    save_tokenizer(llama_dir, ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
                   {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                    "chat_template": CHATML})
    llama = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=2)))
    llama.save_pretrained(llama_dir)
    (llama_dir / "generation_config.json").unlink(missing_ok=True)
    save_tokenizer(gpt2_dir, ["<|endoftext|>"], {})
    gpt2 = randomized(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64,
        bos_token_id=None, eos_token_id=None)))
    gpt2.save_pretrained(gpt2_dir)
    save_tokenizer(t5_dir, ["<pad>", "</s>", "<unk>"], {"eos_token": "</s>", "pad_token": "<pad>"})
    t5 = randomized(transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))
    t5.save_pretrained(t5_dir)
    (t5_dir / "generation_config.json").unlink(missing_ok=True)
    transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, intermediate_size=64).save_pretrained(bert_dir)
    save_tokenizer(bert_dir, ["[PAD]", "[SEP]"], {"eos_token": "[SEP]"})

    # Two extra EOS ids that greedy decoding reaches: a new token of prompt 0 and of prompt 1
    tok = jaxlm.load_tokenizer(llama_dir)
    free = [hf_greedy(llama, prompt_ids(tok, p), {tok.eos_id}) for p in PROMPTS[:2]]
    a = next(t for j, t in enumerate(free[0]) if j and t not in free[0][:j])
    b = next(t for j, t in enumerate(free[1]) if j and t not in free[1][:j] + [a])
    (llama_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b]}))
    return {"llama": (llama_dir, llama, [tok.eos_id, a, b]), "gpt2": (gpt2_dir, gpt2, None),
            "t5": (t5_dir, t5, None), "bert": bert_dir}


def write_inputs(path, prompts=PROMPTS):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    return str(path)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def llama_run(dirs, tmp_path_factory):
    """The single-process reference: the Llama dir on a (4 data x 2 tensor) mesh."""
    d = tmp_path_factory.mktemp("llama_run")
    inp, out = write_inputs(d / "in.jsonl"), str(d / "out.jsonl")
    batch_infer(str(dirs["llama"][0]), inp, out, batch_size=4, overrides=GEN + MESH,
                progress=False)
    return inp, out


def test_llama_dir_sharded_stops_at_either_eos(dirs, llama_run):
    path, model, stops = dirs["llama"]
    tok = jaxlm.load_tokenizer(path)
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    want = [hf_greedy(model, i, set(stops)) for i in ids]
    # both generation_config EOS ids end some row early (else this test would prove nothing)
    full = [hf_greedy(model, i, {tok.eos_id}) for i in ids]
    ended_by = {f[len(w)] for w, f in zip(want, full) if len(w) < len(f)}
    assert set(stops[1:]) <= ended_by
    rows = read_rows(llama_run[1])
    assert [r["tokens"] for r in rows] == want
    assert [r["completion"] for r in rows] == [tok.decode(w) for w in want]


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_gpt2_and_t5_dirs_match_transformers(dirs, family, tmp_path):
    path, model, _ = dirs[family]
    tok = jaxlm.load_tokenizer(path)
    inp, out = write_inputs(tmp_path / "in.jsonl", PROMPTS[:3]), str(tmp_path / "out.jsonl")
    batch_infer(str(path), inp, out, batch_size=4, overrides=GEN, progress=False)
    t5 = family == "t5"
    want = [hf_greedy(model, prompt_ids(tok, p, t5), {tok.eos_id}, t5) for p in PROMPTS[:3]]
    rows = read_rows(out)
    assert [r["tokens"] for r in rows] == want
    assert all(r["completion"] == tok.decode(w) for r, w in zip(rows, want))


CONVERSATION = [{"role": "system", "content": "be"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "go"}]


def test_chat_renders_the_checkpoints_template(dirs, tmp_path):
    """--chat renders each prompt as one user message; a "messages" line (here beside
    them) is a whole conversation: both as transformers' apply_chat_template renders
    them, with the generation prompt."""
    path, model, stops = dirs["llama"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    inp, out = write_inputs(tmp_path / "in.jsonl", PROMPTS[:2]), str(tmp_path / "out.jsonl")
    with open(inp, "a") as f:
        f.write(json.dumps({"id": "conv", "messages": CONVERSATION}) + "\n")
    batch_infer(str(path), inp, out, batch_size=2, overrides=GEN, progress=False, chat=True)
    want = []
    for messages in [[{"role": "user", "content": p}] for p in PROMPTS[:2]] + [CONVERSATION]:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want.append(hf_greedy(model, hf_tok(text, add_special_tokens=False)["input_ids"],
                              set(stops)))
    rows = read_rows(out)
    assert [r["tokens"] for r in rows] == want
    assert rows[2]["messages"] == CONVERSATION and "prompt" not in rows[2]
    # without --chat, a messages line is rendered the same way beside plain prompts
    out2 = str(tmp_path / "out2.jsonl")
    batch_infer(str(path), inp, out2, batch_size=2, overrides=GEN, progress=False)
    assert read_rows(out2)[2]["tokens"] == want[2]


@pytest.mark.parametrize("case, needle", [
    ("chat_without_template", "--chat: .* has no chat template"),
    ("encoder_only", "encoder-only model .*batch-infer needs a generative model"),
    ("messages_without_template", 'line 2: "messages" are rendered with the checkpoint\'s '
                                  "chat template, and .* has none"),
    ("prompt_and_messages", 'line 2: give "prompt" .* or "messages" .*, one of them'),
    ("bad_messages", r'line 2: message 0 \(user\) has a non-string "content"'),
])
def test_bad_input_one_line(dirs, tmp_path, case, needle):
    path = dirs["bert"] if case == "encoder_only" else dirs["gpt2"][0]
    inp, out = write_inputs(tmp_path / "in.jsonl", PROMPTS[:1]), tmp_path / "out.jsonl"
    second = {"messages_without_template": {"messages": CONVERSATION},
              "prompt_and_messages": {"prompt": "a", "messages": CONVERSATION},
              "bad_messages": {"messages": [{"role": "user", "content": 3}]}}.get(case)
    if second is not None:
        with open(inp, "a") as f:
            f.write(json.dumps({"id": "x", **second}) + "\n")
    with pytest.raises(CheckpointError if case == "chat_without_template" else InputError,
                       match=needle) as e:
        batch_infer(str(path), inp, str(out), overrides=GEN, progress=False,
                    chat=case == "chat_without_template")
    assert "\n" not in str(e.value) and not out.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(path, inp, out, exit_at=(0, 0), engine="static"):
    """`jaxlm batch-infer --engine engine` as 2 processes x 4 CPU devices; process i
    dies before its batch exit_at[i] (0: never), and then the other is killed (SIGKILL)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    coordinator = f"localhost:{_free_port()}"
    args = ["--checkpoint", str(path), "--input", inp, "--output", out, "--batch-size", "2",
            "--engine", engine, *GEN, *MESH]
    procs = [subprocess.Popen([sys.executable, WORKER, coordinator, str(i), str(exit_at[i]),
                               *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        if any(exit_at):
            procs[[i for i, n in enumerate(exit_at) if n][0]].wait(timeout=300)
            time.sleep(1)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:  # a failed wait leaves no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


def test_two_processes_write_one_file_and_resume_after_a_kill(dirs, llama_run, tmp_path):
    inp, ref = llama_run
    out = str(tmp_path / "out.jsonl")
    # process 1 dies before its 3rd batch of 2 rows; process 0 is then killed too
    codes, logs = two_processes(dirs["llama"][0], inp, out, exit_at=(0, 3))
    assert codes[1] == 9, logs
    partial = read_rows(out)
    assert 0 < len(partial) < len(PROMPTS) and len(partial) % 2 == 0, logs
    codes, logs = two_processes(dirs["llama"][0], inp, out)
    assert codes == [0, 0], logs
    assert f"{len(partial)} already done" in logs[0]
    with open(out, "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()  # every row once, byte for byte the 1-process file


def test_two_processes_continuous_batching(dirs, llama_run, tmp_path):
    """The paged engine across 2 processes (every process runs the host loop, the
    per-slot state gathered at each round trip): the 1-process file, byte for byte."""
    inp, ref = llama_run
    out = str(tmp_path / "out.jsonl")
    codes, logs = two_processes(dirs["llama"][0], inp, out, engine="continuous")
    assert codes == [0, 0], logs
    with open(out, "rb") as f, open(ref, "rb") as g:
        assert f.read() == g.read()


class _Tok:
    eos_id = 2


@pytest.mark.parametrize("config, want", [
    (None, (2,)),  # no generation_config.json: the tokenizer's EOS
    ({"eos_token_id": 7, "do_sample": False}, (7,)),
    ({"eos_token_id": [128001, 128009]}, (128001, 128009)),
    ({"eos_token_id": "</s>"}, "eos_token_id should be a token id or a list"),
    ([1, 2], "should hold a JSON object"),
])
def test_generation_settings_stop_ids(tmp_path, config, want):
    from jaxlm.errors import CheckpointError
    from jaxlm.infer.text import generation_settings
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    if isinstance(want, tuple):
        assert generation_settings(tmp_path, _Tok()).eos_ids == want
    else:
        with pytest.raises(CheckpointError, match=want):
            generation_settings(tmp_path, _Tok())
