"""Fine-tuning end to end through `jaxlm.train.loop.train`: train.init_from a Hugging
Face Llama dir (built here from a config with random weights and a local tokenizer
with a chat template) for sft, sft + LoRA (stopped, resumed, exported) and dpo, then
from the resulting jaxlm run; and the errors at the door."""

import json

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jaxlm  # noqa: E402
from jaxlm.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.scripts.cli import main  # noqa: E402
from jaxlm.train.loop import train  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = "alpha beta gamma delta one two three four red green blue add sub mul".split()
EOS_IDS = [2, 0]  # <|im_end|>, <|endoftext|>: the special tokens' ids in hf_llama's tokenizer


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, n))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = np.random.default_rng(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_sentence(rng, 12) for _ in range(50)], trainers.BpeTrainer(
        show_progress=False, vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|im_end|>")
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("hf_llama")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128,
        tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    # two stop ids, as Llama-3-Instruct has (<|eot_id|>, <|end_of_text|>)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": fast.bos_token_id, "eos_token_id": EOS_IDS}))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("corpora")
    sft, dpo = d / "sft.jsonl", d / "dpo.jsonl"
    with open(sft, "w") as f:
        for i in range(48):  # the completion repeats the prompt: learnable in a few steps
            p = _sentence(rng, 4)
            row = ({"prompt": p + " =", "completion": " " + p} if i % 2 else
                   {"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": p}]})
            f.write(json.dumps(row) + "\n")
    with open(dpo, "w") as f:
        for _ in range(48):
            p = _sentence(rng, 3)
            f.write(json.dumps({"prompt": p + " =", "chosen": " " + p,
                                "rejected": " " + _sentence(rng, 3)}) + "\n")
    return {"sft": sft, "dpo": dpo}


def _cfg(run_dir, init_from, corpus, *overrides):
    return load_config("tiny-llama-sft", [
        f"train.init_from={init_from}", f"data.corpus={corpus}", f"run_dir={run_dir}",
        "data.seq_len=48", "data.batch_size=4", "data.eval_fraction=0.2", "train.steps=6",
        "train.warmup_steps=1", "train.eval_every=6", "train.eval_batches=2",
        "train.checkpoint_every=3", "train.log_every=1", "train.learning_rate=3e-3",
        "mesh.devices=1", *overrides])


def _metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}, [m for m in lines if "eval_loss" in m]


@pytest.fixture(scope="module")
def sft_run(hf_llama, corpora, tmp_path_factory):
    run = tmp_path_factory.mktemp("sft")
    cfg = _cfg(run, hf_llama, corpora["sft"])
    return run, cfg, train(cfg, progress=False)


def test_sft_from_a_hugging_face_dir(sft_run, hf_llama):
    run, cfg, summary = sft_run
    hf = json.loads((hf_llama / "config.json").read_text())
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (
        hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"])
    assert cfg.model.param_dtype == "float32"  # f32 masters whatever the checkpoint holds
    first, last = summary["eval"][0]["eval_loss"], summary["eval"][-1]["eval_loss"]
    assert last < first, (first, last)
    # the run is self-contained: tokenizer and template copied, params its own
    from jaxlm.model.chat import chat_template_of
    assert (run / "tokenizer.json").exists() and chat_template_of(run) == CHATML
    _, base = jaxlm.load(str(hf_llama))
    mcfg, tuned = jaxlm.load(str(run))
    assert mcfg == cfg.model
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                        base, tuned)
    assert max(jax.tree.leaves(diff)) > 0
    tok = jaxlm.load_tokenizer(str(run))
    out = jaxlm.generate(tuned, mcfg, [[tok.bos_id] + tok.encode("red green =")],
                         max_new_tokens=4, eos_id=tok.eos_id)
    assert 1 <= out.lengths[0] <= 4


def test_lora_from_a_hugging_face_dir_resumes_exactly_and_exports(hf_llama, corpora, tmp_path):
    lora = ("train.lora.rank=4", "train.lora.alpha=8", "train.lora.targets=layers/attn/(q|v)",
            "model.remat=full")
    straight = tmp_path / "straight"
    train(_cfg(straight, hf_llama, corpora["sft"], *lora), progress=False)
    stopped = tmp_path / "stopped"
    cfg = _cfg(stopped, hf_llama, corpora["sft"], *lora)
    train(cfg, progress=False, stop_after=3)
    train(cfg, progress=False, resume=True)  # the frozen base is rebuilt from init_from
    a, b = _metrics(straight)[0], _metrics(stopped)[0]
    assert [a[s]["loss"] for s in (4, 5, 6)] == [b[s]["loss"] for s in (4, 5, 6)]
    # the checkpoint holds the adapters only; its config names the base
    from jaxlm.api import lora_adapters
    run_cfg, adapters = lora_adapters(str(stopped))
    assert run_cfg.train.init_from == str(hf_llama)
    assert set(adapters["layers"]["attn"]) == {"q", "v"}
    assert all(set(v) == {"a", "b"} for v in adapters["layers"]["attn"].values())
    # jaxlm.load merges; the peft export loads onto the transformers base with the same logits
    mcfg, merged = jaxlm.load(str(stopped))
    tokens = np.arange(3, 15, dtype=np.int32)[None]
    ours, _ = jaxlm.forward(merged, mcfg, tokens)
    assert main(["convert", "--input", str(stopped), "--output", str(tmp_path / "peft"),
                 "--to", "peft"]) == 0
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_lora_run_and_its_exports_keep_tokenizer_template_and_stop_ids(
        hf_llama, corpora, tmp_path, monkeypatch, capsys):
    """HF dir (ChatML, two EOS ids in generation_config.json) -> LoRA SFT through the CLI,
    with a relative train.init_from -> `convert --to hf` and `--to peft`: transformers
    renders the merged dir's chat template as the original's and stops at either EOS;
    peft loads the adapter from another working directory with no hub; `jaxlm generate
    --chat` runs on the merged export. A --resume that changes the LoRA rank is refused
    in one line and leaves the run dir byte-identical."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from jaxlm.infer.text import generation_settings
    monkeypatch.chdir(hf_llama.parent)
    run, merged, adapter = tmp_path / "run", tmp_path / "merged", tmp_path / "adapter"
    args = ["train", "--config", "sft", f"train.init_from={hf_llama.name}",  # relative
            f"data.corpus={corpora['sft']}", f"run_dir={run}", "data.seq_len=48",
            "data.batch_size=4", "train.steps=2", "train.warmup_steps=1", "train.eval_every=2",
            "train.eval_batches=1", "train.checkpoint_every=2", "mesh.devices=1",
            "train.lora.rank=4", "train.lora.targets=layers/attn/(q|v)"]
    assert main(args) == 0
    tok = jaxlm.load_tokenizer(str(run))
    assert list(generation_settings(run, tok).eos_ids) == EOS_IDS  # the run keeps both
    assert main(["convert", "--input", str(run), "--output", str(merged), "--to", "hf"]) == 0
    assert main(["convert", "--input", str(run), "--output", str(adapter), "--to", "peft"]) == 0
    chat = [{"role": "user", "content": "red green"}]
    original = transformers.AutoTokenizer.from_pretrained(str(hf_llama))
    exported = transformers.AutoTokenizer.from_pretrained(str(merged))
    assert exported.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert exported.eos_token == original.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.generation_config.eos_token_id == EOS_IDS
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == EOS_IDS
    text = original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([original(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert not any(t in EOS_IDS for t in out[:-1])  # it ran to the length or to either EOS
    # peft: the adapter names the base by its absolute path, loadable from elsewhere
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(hf_llama.resolve())
    monkeypatch.chdir(tmp_path)
    with torch.no_grad():
        lora_model = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        theirs = lora_model(torch.tensor([[3, 4, 5, 6]])).logits.numpy()
    mcfg, params = jaxlm.load(str(run))
    ours, _ = jaxlm.forward(params, mcfg, np.array([[3, 4, 5, 6]], np.int32))
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(merged), "--chat", "--prompt", "red",
                 "generate.max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.strip()
    # a refused --resume changes nothing
    monkeypatch.chdir(hf_llama.parent)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    resumed = [a if not a.startswith("train.lora.rank=") else "train.lora.rank=8" for a in args]
    assert main([*resumed, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lora.rank=8 differs from the run's 4" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_dpo_from_the_sft_run(sft_run, corpora, tmp_path):
    """init_from a jaxlm run dir; DPO without LoRA keeps a frozen copy as the reference."""
    run, _, _ = sft_run
    cfg = _cfg(tmp_path / "dpo", run, corpora["dpo"], "train.objective=dpo", "train.dpo.beta=0.5")
    summary = train(cfg, progress=False)
    steps, evals = _metrics(tmp_path / "dpo")
    assert steps[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert steps[1]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert all(k in evals[-1] for k in ("eval_reward_accuracy", "eval_reward_margin"))
    assert not any("eval_perplexity" in e for e in evals)  # exp(a DPO loss) means nothing
    assert all("eval_perplexity" in e for e in _metrics(run)[1])  # SFT's token loss: it does
    assert steps[6]["reward_margin"] != 0.0  # the policy has moved off the reference
    assert all(np.isfinite(steps[s]["loss"]) for s in steps) and len(summary["eval"]) == 2
    # (test_dpo.py shows a few steps on a fixed preference set raise the margin)


@pytest.mark.slow  # covered by test_dpo_from_the_sft_run (DPO in the loop from a checkpoint), the LoRA-from-HF
# test above and test_dpo.py's LoRA DPO steps with grad accumulation
def test_dpo_with_lora_from_a_hugging_face_dir(hf_llama, corpora, tmp_path):
    cfg = _cfg(tmp_path / "dpo", hf_llama, corpora["dpo"], "train.objective=dpo",
               "train.lora.rank=4", "train.lora.base_dtype=int8", "train.grad_accum_steps=2")
    train(cfg, progress=False)
    steps, _ = _metrics(tmp_path / "dpo")
    assert steps[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert all(np.isfinite(steps[s]["loss"]) for s in steps)


@pytest.mark.slow  # test_lora.py's nf4 QLoRA test shows the loss falling through the same step
def test_qlora_nf4_sft_on_stdlib_lowers_the_loss(hf_llama, tmp_path):
    """QLoRA over a 4-bit NF4 base (double-quantized scales), SFT on stdlib-sft through
    the training loop: the loss falls; the run's base is the float dir, quantized at
    start (nothing 4-bit is written: the checkpoints hold the adapters)."""
    run = tmp_path / "qlora"
    cfg = _cfg(run, hf_llama, "stdlib-sft", "train.lora.rank=8", "train.lora.base_dtype=nf4",
               "train.lora.targets=layers/(attn/(q|k|v|o)|mlp/(gate|up|down))",
               "model.quant_group=16", "train.steps=10", "train.eval_every=10",
               "train.checkpoint_every=10", "train.learning_rate=3e-2", "data.max_docs=60",
               "data.seq_len=96")
    train(cfg, progress=False)
    steps, evals = _metrics(run)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.15, evals  # held-out rows
    assert np.mean([steps[s]["loss"] for s in (8, 9, 10)]) < steps[1]["loss"] - 0.15


def test_sharded_init_from_a_hugging_face_dir(hf_llama, corpora, tmp_path):
    from jaxlm.model import model_specs
    from jaxlm.model.params import logical_axes
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import partition_spec
    from jaxlm.train.loop import _initial_params
    cfg = _cfg(tmp_path, hf_llama, corpora["sft"], "mesh.devices=0", "mesh.data=2",
               "mesh.fsdp=4", "data.batch_size=8")
    mesh = make_mesh(cfg.mesh)
    params = _initial_params(cfg, mesh)
    axes = jax.tree.leaves(logical_axes(model_specs(cfg.model)),
                           is_leaf=lambda x: isinstance(x, tuple))
    for leaf, ax in zip(jax.tree.leaves(params), axes):
        want = partition_spec(ax, cfg.mesh.rules)
        assert tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec)) == \
            tuple(want) + (None,) * (leaf.ndim - len(want))
    embed = params["embed"]["tokens"]  # [vocab, embed]: embed over fsdp -> a quarter each
    assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 4)


def test_continued_pretraining_keeps_the_checkpoints_tokenizer(hf_llama, tmp_path, capsys):
    """clm from an HF dir on a raw corpus uses the checkpoint's tokenizer (it trained a
    new sentencepiece one and paired it with the weights); a corpus prepared with
    another tokenizer is refused in one line naming it."""
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"doc{i}.txt").write_text("\n".join(_sentence(rng, 9) for _ in range(20)))
    run = tmp_path / "run"
    cfg = load_config(None, [f"train.init_from={hf_llama}", f"data.corpus={raw}",
                             f"run_dir={run}", "train.objective=clm", "data.seq_len=32",
                             "data.batch_size=2", "data.eval_fraction=0.2", "train.steps=1",
                             "train.warmup_steps=0", "train.eval_batches=1", "mesh.devices=1"])
    train(cfg, progress=False)
    ours = jaxlm.load_tokenizer(str(run))
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_llama))
    alphabet = list("abcdefghij ,.()=+-\n\t") + WORDS
    texts = ["".join(rng.choice(alphabet, int(rng.integers(1, 12)))) for _ in range(1000)]
    assert [ours.encode(t) for t in texts] == \
        [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
    # a corpus prepared with a tokenizer of its own (trained by prepare): refused
    assert main(["prepare", "--input", f"{raw}/*.txt", "--output", str(tmp_path / "prep"),
                 "--vocab-size", "320"]) == 0
    capsys.readouterr()
    rc = main(["train", "--config", "sft", f"train.init_from={hf_llama}", "train.objective=clm",
               f"data.corpus={tmp_path / 'prep'}", f"run_dir={tmp_path / 'run2'}",
               "data.seq_len=32", "mesh.devices=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "prepared with the tokenizer" in err[0] and str(tmp_path / "prep") in err[0], err
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_fine_tuning_presets_take_everything_from_init_from(hf_llama, corpora):
    """`--config sft` / `dpo`: no model section, no sampling settings; the model is the
    checkpoint's, the generate settings the defaults (or generation_config.json's)."""
    from jaxlm.config import GenerateConfig
    for preset, objective in (("sft", "sft"), ("dpo", "dpo")):
        cfg = load_config(preset, [f"train.init_from={hf_llama}",
                                   f"data.corpus={corpora[objective]}", "data.seq_len=48"])
        assert cfg.train.objective == objective
        assert cfg.model == jaxlm.model_config_of(str(hf_llama))
        assert cfg.generate == GenerateConfig()


def test_errors_at_the_door(hf_llama, corpora, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.n_layers=3 would change a parameter shape"):
        _cfg(tmp_path, hf_llama, corpora["sft"], "model.n_layers=3")
    _cfg(tmp_path, hf_llama, corpora["sft"], "model.remat=full")  # shapes unchanged: fine
    # a preset's model section is reported as the preset's, not as the user's keys
    with pytest.raises(ConfigError, match=r"the config tiny-llama sets model\.\w+=.* would "
                                          r"change a parameter shape.*--config sft or dpo"):
        load_config("tiny-llama", [f"train.init_from={hf_llama}"])
    with pytest.raises(CheckpointError, match="does not exist"):
        _cfg(tmp_path, tmp_path / "nowhere", corpora["sft"])
    with pytest.raises(ConfigError, match=r"lora\.rank=-1"):
        _cfg(tmp_path, hf_llama, corpora["sft"], "train.lora.rank=-1")
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        _cfg(tmp_path, hf_llama, corpora["sft"], "train.lora.rank=4", "train.lora.targets=nothing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1.*assistant"):
        train(_cfg(tmp_path / "r1", hf_llama, bad), progress=False)
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    rc = main(["train", "--config", "tiny-llama-sft", f"train.init_from={hf_llama}",
               f"data.corpus={bad}", "data.seq_len=48", "mesh.devices=1",
               f"run_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "bad.jsonl:2" in err[0], err


def test_a_lora_run_pins_its_base(hf_llama, corpora, tmp_path, capsys, monkeypatch):
    """base.json records the base's absolute path and weights digest. Replaced by
    same-shaped weights, the base is refused in one line naming both digests by
    jaxlm.load, generate, convert and --resume (each changing nothing), unless
    accepted; a moved base is pointed to with train.init_from=NEW. A peft export
    loads as a checkpoint (`jaxlm.load`, `generate --chat`) and continues as
    train.lora_from."""
    import shutil
    torch = pytest.importorskip("torch")
    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(hf_llama, base)
    lora = ("train.lora.rank=4", "train.lora.targets=layers/attn/(q|v)")
    cfg = _cfg(run, base, corpora["sft"], *lora, "train.steps=2", "train.checkpoint_every=2")
    train(cfg, progress=False)
    record = json.loads((run / "base.json").read_text())
    assert record["path"] == str(base) and record["kind"] == "hf" and len(record["digest"]) == 16
    tokens = np.array([[3, 4, 5, 6]], np.int32)
    mcfg, params = jaxlm.load(str(run))
    want = np.asarray(jaxlm.forward(params, mcfg, tokens)[0])
    with monkeypatch.context() as m:  # files with their recorded stats are not read again
        from jaxlm.train import base as pinned
        m.setattr(pinned, "digest", lambda *a: pytest.fail("the base was hashed again"))
        jaxlm.load(str(run))

    # an export of the run as a peft dir is itself a checkpoint
    adapter = tmp_path / "adapter"
    assert main(["convert", "--input", str(run), "--output", str(adapter), "--to", "peft"]) == 0
    assert jaxlm.api.checkpoint_kind(str(adapter)) == "peft"
    pcfg, pparams = jaxlm.load(str(adapter))
    np.testing.assert_allclose(np.asarray(jaxlm.forward(pparams, pcfg, tokens)[0]), want,
                               atol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(adapter), "--chat", "--prompt", "red",
                 "generate.max_new_tokens=3"]) == 0
    assert capsys.readouterr().out.strip()

    # train.lora_from continues the adapter: one step at the warmup's learning rate 0
    # writes it back as read
    cont = tmp_path / "continued"
    train(_cfg(cont, base, corpora["sft"], f"train.lora_from={adapter}", "train.steps=1",
               "train.checkpoint_every=1", "train.eval_every=1"), progress=False)
    assert (read := jaxlm.load(str(cont)))[0] == mcfg
    np.testing.assert_allclose(np.asarray(jaxlm.forward(read[1], mcfg, tokens)[0]), want,
                               atol=1e-5)

    # same-shaped weights in the base dir: every reader refuses, naming both digests
    state = transformers.LlamaForCausalLM.from_pretrained(base).state_dict()
    torch.manual_seed(7)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(base))
    assert {k: v.shape for k, v in other.state_dict().items()} == {
        k: v.shape for k, v in state.items()}
    other.save_pretrained(base)
    with pytest.raises(CheckpointError, match=f"trained on {record['digest']}"):
        jaxlm.load(str(run))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    for argv in (["generate", "--checkpoint", str(run), "--prompt", "red"],
                 ["convert", "--input", str(run), "--output", str(tmp_path / "m"), "--to", "hf"],
                 ["train", "--config", str(run / "config.yaml"), "--resume", "train.steps=4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and record["digest"] in err[0] and str(base) in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "m").exists()
    _, accepted = jaxlm.load(str(run), accept_base_change=True)  # the new base, merged
    assert not np.allclose(np.asarray(jaxlm.forward(accepted, mcfg, tokens)[0]), want)

    # the original weights, moved elsewhere: train.init_from=NEW on load and on resume
    moved = tmp_path / "moved"
    shutil.copytree(hf_llama, moved)
    _, again = jaxlm.load(str(run), init_from=str(moved))
    np.testing.assert_allclose(np.asarray(jaxlm.forward(again, mcfg, tokens)[0]), want, atol=1e-5)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "red",
                 "generate.max_new_tokens=2", f"train.init_from={moved}"]) == 0
    assert main(["train", "--config", str(run / "config.yaml"), "--resume", "train.steps=3",
                 f"train.init_from={moved}"]) == 0
    assert json.loads((run / "base.json").read_text())["path"] == str(moved)
