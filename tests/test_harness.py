"""jaxlm's lm-eval backend against lm-eval's own `hf` backend on the same weights: a
Llama-style and a GPT-2-style Hugging Face dir (random weights, a tokenizer trained
here), three local tasks (multiple choice: 4 options, 200 items; generate_until: 50
items with stop strings; loglikelihood_rolling over documents longer than the model): the same per-item choices, log-likelihoods within 1e-4, and
the same greedy generations."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ("red green blue small large cat dog bird runs sleeps eats the a of and to in on "
         "is was very not").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_tasks(directory, rng, n_mc=200, n_gen=50):
    """Two task YAMLs over local JSONL in `directory` (lm-eval's custom-task layout)."""
    with open(directory / "mc.jsonl", "w") as f:
        for _ in range(n_mc):
            f.write(json.dumps({"question": sentence(rng, int(rng.integers(3, 9))),
                                "choices": [sentence(rng, int(rng.integers(1, 4)))
                                            for _ in range(4)],
                                "answer": int(rng.integers(4))}) + "\n")
    with open(directory / "gen.jsonl", "w") as f:
        for _ in range(n_gen):
            f.write(json.dumps({"prompt": sentence(rng, int(rng.integers(2, 7))),
                                "target": "red"}) + "\n")
    with open(directory / "roll.jsonl", "w") as f:  # some longer than the 64 positions
        for n in (5, 20, 60, 90):
            f.write(json.dumps({"text": sentence(rng, n)}) + "\n")
    (directory / "jx_roll.yaml").write_text(f"""task: jx_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'roll.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (directory / "jx_mc.yaml").write_text(f"""task: jx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (directory / "jx_gen.yaml").write_text(f"""task: jx_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: [".", " dog"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")


def tokenizer(rng, llama: bool):
    """A byte-level BPE trained on WORDS' sentences, as transformers' fast tokenizer:
    Llama-style (BOS added to every text) or GPT-2-style (nothing added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>"] if llama else ["<|endoftext|>"]
    tok.train_from_iterator([sentence(rng, 12) for _ in range(200)], trainers.BpeTrainer(
        show_progress=False, vocab_size=160, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                    eos_token="</s>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0],
                                                eos_token=special[0])


def hf_dir(path, rng, family):
    fast = tokenizer(rng, family == "llama")
    torch.manual_seed(0)
    ids = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id}
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
            tie_word_embeddings=False, **ids)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=4,
                                         n_positions=64, **ids)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    tasks = tmp_path_factory.mktemp("tasks")
    write_tasks(tasks, rng)
    dirs = {f: hf_dir(tmp_path_factory.mktemp(f), rng, f) for f in ("llama", "gpt2")}
    from lm_eval.tasks import TaskManager  # the local tasks only: no index of lm-eval's own
    return TaskManager(include_path=str(tasks), include_defaults=False), dirs


def evaluate(model, model_args, tasks):
    from lm_eval import simple_evaluate

    from jaxlm.infer.harness import register
    register()
    out = simple_evaluate(model=model, model_args=model_args, tasks=["jx_mc", "jx_gen", "jx_roll"],
                          task_manager=tasks, batch_size=16,
                          log_samples=True, bootstrap_iters=0, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_numbers_as_the_hf_backend(setup, family):
    tasks, dirs = setup
    path = str(dirs[family])
    ours = evaluate("jaxlm", f"checkpoint={path}", tasks)
    ref = evaluate("hf", f"pretrained={path},dtype=float32,device=cpu", tasks)
    mc_ours = sorted(ours["samples"]["jx_mc"], key=lambda s: s["doc_id"])
    mc_ref = sorted(ref["samples"]["jx_mc"], key=lambda s: s["doc_id"])
    assert len(mc_ours) == len(mc_ref) == 200
    for a, b in zip(mc_ours, mc_ref):
        la = np.array([r[0] for r in a["filtered_resps"]], np.float64)
        lb = np.array([r[0] for r in b["filtered_resps"]], np.float64)
        np.testing.assert_allclose(la, lb, atol=1e-4)
        assert int(np.argmax(la)) == int(np.argmax(lb))
        assert [r[1] for r in a["filtered_resps"]] == [r[1] for r in b["filtered_resps"]]
    assert ours["results"]["jx_mc"]["acc,none"] == ref["results"]["jx_mc"]["acc,none"]
    roll = [np.array([s["filtered_resps"][0] for s in sorted(out["samples"]["jx_roll"],
                                                           key=lambda s: s["doc_id"])])
            for out in (ours, ref)]
    np.testing.assert_allclose(roll[0], roll[1], atol=1e-4)  # whole documents, windowed
    gen_ours = sorted(ours["samples"]["jx_gen"], key=lambda s: s["doc_id"])
    gen_ref = sorted(ref["samples"]["jx_gen"], key=lambda s: s["doc_id"])
    texts = [s["resps"][0][0] for s in gen_ours]
    assert len(texts) == 50 and texts == [s["resps"][0][0] for s in gen_ref]
    assert len(set(texts)) > 5 and any(texts)  # varied, non-empty generations
