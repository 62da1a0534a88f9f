"""Sequence classification (`*ForSequenceClassification`, model.num_labels > 0) against
transformers: Llama and BERT classifier dirs (tiny configs, random weights) load with
transformers' scores, right-padded batches included; exports load back in
transformers with the same scores, labels and pad id; and the errors at the door."""

import json
import re

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

import jaxlm  # noqa: E402
from jaxlm.errors import CheckpointError, ConfigError  # noqa: E402

TOL = 1e-4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
WORDS = "alpha beta gamma delta one two three four red green blue add sub mul".split()


def _tokenizer():
    """A tiny byte-level BPE (transformers' fast tokenizer), pad id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = np.random.default_rng(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(show_progress=False, vocab_size=300,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 12)) for _ in range(50)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hf_llama_cls(tmp_path_factory):
    """A LlamaForSequenceClassification dir: 3 named labels, pad_token_id 0, a tokenizer."""
    fast = _tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128,
        id2label=LABELS, pad_token_id=fast.pad_token_id, initializer_range=0.2)
    path = tmp_path_factory.mktemp("hf_llama_cls")
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_bert_cls(tmp_path_factory):
    """A BertForSequenceClassification dir: 2 labels (LABEL_0, LABEL_1)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=80,
                                     max_position_embeddings=64, num_labels=2)
    path = tmp_path_factory.mktemp("hf_bert_cls")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


def _padded(vocab, pad, lengths=(9, 5, 2), seed=0):
    """(tokens, mask) [B, S]: right-padded rows of random non-pad ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(pad + 1, vocab, (len(lengths), max(lengths)))
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        tokens[i, n:] = pad
        mask[i, :n] = 1
    return tokens, mask


def _hf_scores(path_or_model, tokens, mask, **kw):
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else \
        transformers.AutoModelForSequenceClassification.from_pretrained(path_or_model)
    model.eval()
    with torch.no_grad():
        t = {k: torch.tensor(v) for k, v in kw.items()}
        return model(torch.tensor(tokens), attention_mask=torch.tensor(mask), **t).logits.numpy()


def test_llama_classifier_matches_transformers(hf_llama_cls):
    cfg, params = jaxlm.load(str(hf_llama_cls))
    assert (cfg.num_labels, cfg.pad_token_id, cfg.label_names, cfg.head) == (
        3, 0, tuple(LABELS.values()), True)
    assert "score" in params and "head" not in params
    tokens, mask = _padded(cfg.vocab_size, cfg.pad_token_id)
    ref = _hf_scores(hf_llama_cls, tokens, mask)
    ours = np.asarray(jaxlm.classify(params, cfg, tokens, mask))
    assert ours.shape == (3, 3) and np.abs(ours - ref).max() <= TOL
    # HF pools at the last non-pad token: without a mask the pad id alone finds it
    assert np.abs(np.asarray(jaxlm.classify(params, cfg, tokens)) - ref).max() <= TOL
    # forward adds the score head at every position; the pooled position is classify's
    scores, _ = jaxlm.forward(params, cfg, tokens[:1])
    assert scores.shape == (1, tokens.shape[1], 3)
    assert np.abs(np.asarray(scores[0, -1]) - ref[0]).max() <= TOL


def test_bert_classifier_matches_transformers(hf_bert_cls):
    cfg, params = jaxlm.load(str(hf_bert_cls))
    assert (cfg.family, cfg.num_labels, cfg.lm_head) == ("encoder", 2, False)
    assert {"pooler", "score"} <= set(params) and "mlm" not in params
    tokens, mask = _padded(cfg.vocab_size, 0)
    types = np.random.default_rng(1).integers(0, 2, tokens.shape)
    ref = _hf_scores(hf_bert_cls, tokens, mask, token_type_ids=types)
    ours = np.asarray(jaxlm.classify(params, cfg, tokens, mask, types))
    assert ours.shape == (3, 2) and np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_export_loads_in_transformers_with_equal_scores(which, hf_llama_cls, hf_bert_cls,
                                                        tmp_path):
    src = {"llama": hf_llama_cls, "bert": hf_bert_cls}[which]
    cfg, params = jaxlm.load(str(src))
    out = tmp_path / "out"
    jaxlm.save(str(out), cfg, params, format="hf", companions=str(src))
    arch = {"llama": "LlamaForSequenceClassification",
            "bert": "BertForSequenceClassification"}[which]
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    original = transformers.AutoConfig.from_pretrained(src)
    assert type(model).__name__ == arch and model.config.num_labels == cfg.num_labels
    for key in ("id2label", "pad_token_id"):
        assert getattr(model.config, key) == getattr(original, key), key
    assert model.config.label2id == {n: i for i, n in original.id2label.items()}
    tokens, mask = _padded(cfg.vocab_size, 0, seed=2)
    ours = np.asarray(jaxlm.classify(params, cfg, tokens, mask))
    assert np.abs(_hf_scores(model, tokens, mask) - ours).max() <= TOL
    assert jaxlm.load(str(out))[0] == cfg


def test_errors_at_the_door(hf_llama_cls, tiny_llama, tmp_path):
    cfg, params = jaxlm.load(str(hf_llama_cls))
    with pytest.raises(ConfigError, match="sequence classifier.*jaxlm.classify"):
        jaxlm.generate(params, cfg, [[1, 2]], max_new_tokens=2)
    with pytest.raises(ConfigError, match="no score head"):
        jaxlm.classify(tiny_llama.params, tiny_llama.cfg, np.ones((1, 3), np.int32))
    with pytest.raises(ConfigError, match="label_names has 2 names"):
        jaxlm.ModelConfig(num_labels=3, label_names=("a", "b"))
    with pytest.raises(ConfigError, match="encoder_decoder"):
        jaxlm.ModelConfig(family="encoder_decoder", num_labels=2)
    bad = tmp_path / "multi"
    bad.mkdir()
    hf = json.loads((hf_llama_cls / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf,
                                                 "problem_type": "multi_label_classification"}))
    with pytest.raises(CheckpointError, match="multi_label_classification.*not supported"):
        jaxlm.model_config_of(str(bad))


# ------------------------------------------------------------ training


def _labelled(path, n=64, seed=0, **extra):
    """JSONL of {"text", "label"}: the label is the colour word that ends the text (some
    lines name it by its id2label name), so that a few steps learn it."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = int(rng.integers(0, 3))
            text = " ".join(rng.choice(WORDS[:8], 4)) + " " + ("red", "green", "blue")[label]
            f.write(json.dumps({"text": text, "label": LABELS[label] if i % 4 == 0 else label,
                                **extra}) + "\n")
    return path


def _train_args(init_from, corpus, run_dir, *overrides):
    return ["train", "--config", "classify", f"train.init_from={init_from}",
            f"data.corpus={corpus}", f"run_dir={run_dir}", "data.seq_len=16",
            "data.batch_size=8", "data.eval_fraction=0.25", "train.steps=12",
            "train.warmup_steps=1", "train.eval_every=12", "train.eval_batches=2",
            "train.checkpoint_every=12", "train.log_every=4", "train.learning_rate=3e-3",
            "mesh.devices=1", *overrides]


def test_trained_run_exports_what_transformers_scores_alike(hf_llama_cls, tmp_path, capsys):
    from jaxlm.scripts.cli import main
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(_train_args(hf_llama_cls, _labelled(tmp_path / "train.jsonl"), run)) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    assert "eval_accuracy" in evals[-1] and "eval_perplexity" not in evals[-1]
    assert all(m["tokens"] == 8 for m in lines if "loss" in m)  # rows, not tokens
    assert main(["convert", "--input", str(run), "--output", str(out), "--to", "hf"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"]
    assert hf["id2label"] == {str(k): v for k, v in LABELS.items()} and hf["pad_token_id"] == 0
    fast = transformers.AutoTokenizer.from_pretrained(out)
    enc = fast(["red green blue", "one two three four five green", "add"], padding=True,
               return_tensors="np")
    cfg, params = jaxlm.load(str(run))
    _, base = jaxlm.load(str(hf_llama_cls))
    assert np.abs(np.asarray(params["score"]["kernel"]) - np.asarray(
        base["score"]["kernel"])).max() > 0  # trained
    ours = np.asarray(jaxlm.classify(params, cfg, enc["input_ids"], enc["attention_mask"]))
    ref = _hf_scores(out, enc["input_ids"], enc["attention_mask"])
    assert np.abs(ours - ref).max() <= TOL


def test_classify_input_errors_are_one_line(hf_llama_cls, tiny_checkpoint, tmp_path, capsys):
    from jaxlm.scripts.cli import main
    cases = {
        "missing": ({"text": "red"}, r"train.jsonl:1: a classify record needs \"label\""),
        "range": ({"text": "red", "label": 3}, r"train.jsonl:1: label 3 is not a class id "
                                               r"in \[0, 3\)"),
        "name": ({"text": "red", "label": "happy"}, r"label 'happy' is not a class id"),
        "text": ({"label": 1}, r"needs \"text\""),
    }
    for name, (record, message) in cases.items():
        corpus = tmp_path / name / "train.jsonl"
        corpus.parent.mkdir()
        corpus.write_text("\n".join([json.dumps(record)] + [json.dumps(
            {"text": "blue", "label": 2})] * 3) + "\n")
        rc = main(_train_args(hf_llama_cls, corpus, tmp_path / name / "run"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (name, err)
        assert re.search(message, err[0]), (name, err[0])
    # a model without a score head, a classifier with another objective, LoRA
    corpus = tmp_path / "range" / "train.jsonl"
    for args, message in (
            (_train_args(tiny_checkpoint("llama"), corpus, tmp_path / "lm"),
             "train.objective=classify needs a model with a score head"),
            (_train_args(hf_llama_cls, corpus, tmp_path / "sft", "train.objective=sft"),
             "sequence classifier.*use train.objective=classify"),
            (_train_args(hf_llama_cls, corpus, tmp_path / "lora", "train.lora.rank=4"),
             "lora.rank > 0 is not supported")):
        rc = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert re.search(message, err[0]), err[0]


def test_regression_and_classification_losses_are_transformers():
    """num_labels 1: HF's regression (MSE); more: single-label cross-entropy; padding
    rows (weight 0) count for nothing."""
    from jaxlm.train.classify import check_classify_record
    from jaxlm.train.objectives import classification_loss
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 2, 1, 0])
    weights = np.array([1, 1, 1, 0])
    total, count, extra = classification_loss(scores, labels.astype(np.float32), weights)
    ref = torch.nn.functional.cross_entropy(torch.tensor(scores[:3]), torch.tensor(labels[:3]))
    assert count == 3 and abs(float(total) / 3 - float(ref)) < 1e-6
    assert float(extra["accuracy"]) == float(np.sum(scores[:3].argmax(-1) == labels[:3]))
    targets = rng.normal(size=4).astype(np.float32)
    total, count, extra = classification_loss(scores[:, :1], targets, weights)
    ref = torch.nn.functional.mse_loss(torch.tensor(scores[:3, 0]), torch.tensor(targets[:3]))
    assert extra == {} and abs(float(total) / 3 - float(ref)) < 1e-6
    assert check_classify_record({"text": "x", "label": 0.25}, 1) == 0.25
    assert check_classify_record({"messages": [{"role": "user", "content": "x"}],
                                  "label": "b"}, 2, ("a", "b")) == 1.0
    from jaxlm.errors import InputError
    with pytest.raises(InputError, match="not a finite number"):
        check_classify_record({"text": "x", "label": "1.5"}, 1)
    with pytest.raises(InputError, match="not a class id"):
        check_classify_record({"text": "x", "label": True}, 2)
