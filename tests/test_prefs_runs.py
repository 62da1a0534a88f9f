"""Reward models, KTO, ORPO and SimPO as runs (tiny Llama, a few steps, one device):
a reward model trained from a causal LM's Hugging Face dir (a fresh score head)
exports to a dir transformers loads as AutoModelForSequenceClassification with equal
scores, and `jaxlm score` gives them too; every new objective resumes exactly
(stop_after, then --resume: the losses of an uninterrupted run); ORPO and SimPO keep no
reference tree; bad input is one error line (exit 2)."""

import json
import re

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jaxlm  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.scripts.cli import main  # noqa: E402
from jaxlm.train.loop import train  # noqa: E402

TOL = 1e-4
SHORT = ["data.seq_len=32", "data.batch_size=4", "data.eval_fraction=0.2", "train.steps=4",
         "train.warmup_steps=0", "train.eval_every=4", "train.eval_batches=1",
         "train.checkpoint_every=2", "train.log_every=1", "train.learning_rate=1e-3",
         "mesh.devices=1", "train.tensorboard=false"]


def _lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs_data")
    prefs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}!",
              **({"margin": 0.5} if i % 3 == 0 else {})} for i in range(20)]
    kto = [{"prompt": f"What is {i} + 1?", "completion": f"{i + 1 + i % 2}.",
            "label": i % 2 == 0} for i in range(20)]
    (root / "prefs.jsonl").write_text(_lines(prefs))
    (root / "kto.jsonl").write_text(_lines(kto))
    return root


@pytest.fixture(scope="module")
def hf_lm(tiny_checkpoint, tmp_path_factory):
    """The shared tiny Llama checkpoint as a Hugging Face LlamaForCausalLM dir."""
    out = tmp_path_factory.mktemp("hf_lm") / "hf"
    assert main(["convert", "--input", tiny_checkpoint("llama"), "--output", str(out),
                 "--to", "hf"]) == 0
    return out


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _resumes_exactly(tmp_path, preset, init_from, corpus, *extra, straight=None):
    """An uninterrupted run (`straight`: one made already) and one stopped at step 2
    then resumed log equal losses."""
    args = [f"train.init_from={init_from}", f"data.corpus={corpus}", *SHORT, *extra]
    stopped = tmp_path / "stopped"
    if straight is None:
        straight = tmp_path / "straight"
        train(load_config(preset, [*args, f"run_dir={straight}"]), progress=False)
    cfg = load_config(preset, [*args, f"run_dir={stopped}"])
    train(cfg, progress=False, stop_after=2)
    train(cfg, progress=False, resume=True)
    a, b = _losses(straight), _losses(stopped)
    assert [a[s]["loss"] for s in (1, 2, 3, 4)] == [b[s]["loss"] for s in (1, 2, 3, 4)]
    return a, cfg


def test_reward_model_from_a_causal_lm_round_trips_through_transformers(hf_lm, data, tmp_path):
    run, out = tmp_path / "rm", tmp_path / "rm_hf"
    assert main(["train", "--config", "reward", f"train.init_from={hf_lm}",
                 f"data.corpus={data / 'prefs.jsonl'}", f"run_dir={run}", *SHORT]) == 0
    logged = _losses(run)
    assert {"reward_accuracy", "reward_margin", "reward_loss"} <= set(logged[1])
    _resumes_exactly(tmp_path, "reward", hf_lm, data / "prefs.jsonl", straight=run)  # margins
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in x]
    assert "eval_reward_accuracy" in evals[-1] and "eval_perplexity" not in evals[-1]
    cfg, params = jaxlm.load(str(run))
    assert cfg.num_labels == 1 and cfg.pad_token_id >= 0
    assert "score" in params and "head" not in params  # the LM head dropped, a fresh score
    assert main(["convert", "--input", str(run), "--output", str(out), "--to", "hf"]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == cfg.pad_token_id
    rng = np.random.default_rng(0)
    lengths = [9, 5, 2, 12]
    tokens = np.full((4, 12), cfg.pad_token_id, np.int64)
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(cfg.pad_token_id + 1, cfg.vocab_size, n)
        mask[i, :n] = 1
    with torch.no_grad():
        theirs = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(jaxlm.classify(params, cfg, tokens.astype(np.int32), mask))
    assert theirs.shape == (4, 1) and np.abs(ours - theirs).max() <= TOL

    # jaxlm score: the rows as training tokenizes them; the HF export scores them alike
    rows = [{"prompt": "What is 3 + 1?", "completion": "4."},
            {"prompt": "What is 3 + 1?", "completion": "5!", "id": 7},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "in.jsonl").write_text(_lines(rows))
    for checkpoint in (run, out):
        assert main(["score", "--checkpoint", str(checkpoint), "--input",
                     str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 0
        scored = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == rows
        if checkpoint == run:
            first = [r["score"] for r in scored]
    assert np.abs(np.array(first) - [r["score"] for r in scored]).max() <= TOL
    # a reward run from a *ForSequenceClassification dir keeps its score head
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.train.loop import _initial_params
    again = load_config("reward", [f"train.init_from={out}", "mesh.devices=1",
                                   "data.seq_len=32"])
    assert again.model.num_labels == 1
    start = _initial_params(again, make_mesh(again.mesh))
    np.testing.assert_array_equal(start["score"]["kernel"], params["score"]["kernel"])
    tok = jaxlm.load_tokenizer(str(run))
    ids = [tok.bos_id] + tok.encode("What is 3 + 1?") + tok.encode("4.") + [tok.eos_id]
    with torch.no_grad():
        direct = model(torch.tensor([ids])).logits.numpy()[0, 0]
    assert abs(direct - first[0]) <= TOL


def test_kto_resumes_exactly_and_keeps_a_reference(tiny_checkpoint, data, tmp_path):
    logged, cfg = _resumes_exactly(tmp_path, "kto", tiny_checkpoint("llama"), data / "kto.jsonl",
                                   "train.desirable_weight=1.5")
    assert cfg.train.kto.desirable_weight == 1.5
    assert logged[1]["kl"] == 0.0 and logged[1]["reward_margin"] == 0.0  # policy == reference
    assert logged[4]["kl"] >= 0.0
    # at z = 0 and policy == reference each row's loss is 1 - sigmoid(0) = 0.5 times its weight
    assert 0.5 <= logged[1]["kto_loss"] <= 0.75 and logged[1]["kto_loss"] == logged[1]["loss"]


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_orpo_and_simpo_keep_no_reference_and_resume_exactly(loss, tiny_checkpoint, data,
                                                              tmp_path):
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.train.lora import trainable_specs
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import create_state, needs_frozen
    extra = ["train.cpo_alpha=0.5", "train.dpo.beta=2.0"] if loss == "simpo" else []
    logged, cfg = _resumes_exactly(tmp_path, "dpo", tiny_checkpoint("llama"),
                                   data / "prefs.jsonl", f"train.dpo.loss={loss}", *extra)
    assert not needs_frozen(cfg)
    tx = make_optimizer(cfg.train, trainable_specs(cfg))
    state = create_state(cfg, make_mesh(cfg.mesh), tx, 0)
    assert state.frozen is None
    assert logged[1]["nll_loss"] > 0 and "reward_accuracy" in logged[1]
    if loss == "orpo":
        assert "log_odds_ratio" in logged[1]


def test_bad_input_is_one_line(tiny_checkpoint, data, tmp_path, capsys):
    base = tiny_checkpoint("llama")
    no_label = tmp_path / "nolabel.jsonl"
    no_label.write_text(_lines([{"prompt": "a", "completion": "b"}] * 4))
    not_bool = tmp_path / "notbool.jsonl"
    not_bool.write_text(_lines([{"prompt": "a", "completion": "b", "label": 1}] * 4))
    no_rejected = tmp_path / "norejected.jsonl"
    no_rejected.write_text(_lines([{"prompt": "a", "chosen": "b"}] * 4))
    bad_margin = tmp_path / "margin.jsonl"
    bad_margin.write_text(_lines([{"prompt": "a", "chosen": "b", "rejected": "c",
                                   "margin": "big"}] * 4))
    cases = [
        ("kto", no_label, [], r"nolabel.jsonl:1: a KTO record needs .*missing label"),
        ("kto", not_bool, [], r"notbool.jsonl:1: \"label\" 1 is not true or false"),
        ("kto", data / "prefs.jsonl", [], r"prefs.jsonl:1: a KTO record needs.*preference pair"),
        ("kto", data / "kto.jsonl", ["data.batch_size=1"], r"data.batch_size >= 2"),
        ("reward", no_rejected, [], r"norejected.jsonl:1: .*missing rejected"),
        ("reward", bad_margin, [], r"margin.jsonl:1: \"margin\" 'big' is not a finite number"),
        ("reward", data / "kto.jsonl", [], r"kto.jsonl:1: .*train.objective=kto"),
        ("reward", data / "prefs.jsonl", ["train.lora.rank=4"], r"lora.rank > 0 is not supp"),
        ("dpo", data / "prefs.jsonl", ["train.dpo.loss=orpo", "train.dpo.label_smoothing=0.1"],
         r"label_smoothing applies to the sigmoid and simpo losses; loss=orpo has none"),
    ]
    for i, (preset, corpus, extra, message) in enumerate(cases):
        given = {e.split("=")[0] for e in extra}
        short = [s for s in SHORT if s.split("=")[0] not in given]
        rc = main(["train", "--config", preset, f"train.init_from={base}",
                   f"data.corpus={corpus}", f"run_dir={tmp_path / str(i)}", *short, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (preset, message, err)
        assert re.search(message, err[0]), (message, err[0])
    with pytest.raises(jaxlm.ConfigError, match="train.objective=dpo train.dpo.loss=orpo"):
        load_config("dpo", ["train.objective=orpo"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text(_lines([{"text": "no prompt"}]))
    assert main(["score", "--checkpoint", base, "--input", str(rows), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "no score head" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["orpo"])  # simpo's NLL term takes the same path
def test_reference_free_losses_accumulate_exactly(loss, tiny_llama):
    """grad_accum_steps=2 gives the whole batch's loss and gradient: the NLL term is a
    token mean over the whole batch, not over each microbatch. ORPO's loss is TRL's:
    the chosen rows' NLL over prompt and response, less beta times the mean log sigmoid
    of the log odds ratio (TRL's odds_ratio_loss is checked in test_pref_losses)."""
    import functools
    import optax
    from jaxlm.config import DpoConfig, TrainConfig
    from jaxlm.train.state import TrainState
    from jaxlm.train.step import train_step
    rng = np.random.default_rng(0)
    v, s = tiny_llama.cfg.vocab_size, 16

    def rows(lengths, prompt):
        out = {k: np.zeros((len(lengths), s), np.int32) for k in
               ("tokens", "targets", "positions", "segment_ids")}
        out["loss_mask"] = np.zeros((len(lengths), s), np.float32)
        for i, n in enumerate(lengths):
            seq = rng.integers(1, v, n + 1)
            out["tokens"][i, :n], out["targets"][i, :n], out["segment_ids"][i, :n] = \
                seq[:-1], seq[1:], 1
            out["positions"][i, :n] = np.arange(n)
            out["loss_mask"][i, prompt - 1:n] = 1
        return out
    batch = {"chosen": rows([9, 15, 6, 12], 3), "rejected": rows([14, 5, 10, 7], 3)}
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp_zero(), params=tiny_llama.params,
                       opt_state=tx.init(tiny_llama.params))
    results = []
    for k in (1, 2):
        tcfg = TrainConfig(objective="dpo", grad_accum_steps=k, steps=1, warmup_steps=0,
                           dpo=DpoConfig(loss=loss, beta=0.5, cpo_alpha=0.7))
        step = jax.jit(functools.partial(train_step, mcfg=tiny_llama.cfg, tx=tx,
                                         lr_schedule=lambda _: 0.0, vocab_chunk=0, tcfg=tcfg))
        results.append(jax.device_get(step(state, batch)[1]))
    for key in ("loss", "grad_norm", "nll_loss", "reward_margin"):
        np.testing.assert_allclose(results[0][key], results[1][key], rtol=2e-5, err_msg=key)
    if loss == "orpo":  # the formula, in numpy, from the policy's log-probs
        from jaxlm.train.dpo import concat_pairs, sequence_logprobs, target_mask
        both = concat_pairs(batch)
        mask = np.concatenate([np.asarray(target_mask(batch["chosen"])),
                               np.zeros_like(batch["rejected"]["loss_mask"])])
        resp, full = (np.asarray(x, np.float64) for x in sequence_logprobs(
            tiny_llama.params, tiny_llama.cfg, both, 0, [both["loss_mask"], mask]))
        avg = resp / both["loss_mask"].sum(-1)
        ac, ar = avg[:4], avg[4:]
        log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
        want = -full.sum() / mask.sum() - 0.5 * np.mean(-np.logaddexp(0, -log_odds))
        np.testing.assert_allclose(results[0]["loss"], want, rtol=1e-5)


def jnp_zero():
    import jax.numpy as jnp
    return jnp.zeros((), jnp.int32)
