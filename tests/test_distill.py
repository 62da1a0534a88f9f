"""Distillation (train.objective=distill): GKD's generalized JSD and the forward / reverse
KL against TRL 1.16's `GKDTrainer.generalized_jsd_loss` (loss and gradient, torch
autograd vs jax.grad), vocab-chunked equal to full logits; a run from the shared tiny
Llama checkpoint to a teacher of another shape lowers the loss, resumes exactly (with
on-policy samples from the engine); a teacher of another vocabulary is one line."""

import dataclasses
import json
import shutil
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import jaxlm  # noqa: E402
import tiny_models  # noqa: E402
from jaxlm.config import load_config  # noqa: E402
from jaxlm.train import distill  # noqa: E402
from jaxlm.train.loop import train  # noqa: E402


def gkd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss  # a staticmethod in TRL 1.16


def _logits(seed=0, b=2, s=5, v=37):
    rng = np.random.default_rng(seed)
    zs = (3 * rng.normal(size=(b, s, v))).astype(np.float32)
    zt = (3 * rng.normal(size=(b, s, v))).astype(np.float32)
    labels = rng.integers(0, v, (b, s))
    labels[0, :2] = -100  # prompt tokens: no loss
    labels[1, -1] = -100
    return zs, zt, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_equals_trl_loss_and_gradient(beta, temperature):
    """Each beta, 0 (forward KL) and 1 (reverse KL) included, each temperature: TRL's
    batchmean (sum over tokens and vocab / loss tokens) and its student-logit gradient."""
    zs, zt, labels = _logits()
    student = torch.tensor(zs, requires_grad=True)
    want = gkd_loss()(student, torch.tensor(zt), torch.tensor(labels), beta=beta,
                      temperature=temperature)
    want.backward()
    mask = jnp.asarray(labels != -100, jnp.float32)

    def mean(z):
        total, count = distill.divergence_loss(z, jnp.asarray(zt), mask, beta=beta,
                                               temperature=temperature)
        return total / count
    got, grad = jax.value_and_grad(mean)(jnp.asarray(zs))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), student.grad.numpy(), atol=1e-5)


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_the_configured_loss_is_trls_beta(loss, beta):
    """train.distill.loss picks GKD's beta: forward_kl = KL(T||S) (beta 0), reverse_kl =
    KL(S||T) (beta 1), jsd = train.distill.beta; the KLs checked against numpy too."""
    from jaxlm.config import DistillConfig
    assert DistillConfig(loss=loss, beta=0.3).jsd_beta == beta
    zs, zt, labels = _logits(1)
    mask = labels != -100
    total, count = distill.divergence_loss(jnp.asarray(zs), jnp.asarray(zt), mask, beta=beta)
    ls = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    lt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    if loss != "jsd":
        p, lp, lq = (np.exp(lt), lt, ls) if loss == "forward_kl" else (np.exp(ls), ls, lt)
        want = (p * (lp - lq)).sum(-1)[mask].sum() / mask.sum()
        np.testing.assert_allclose(float(total / count), want, rtol=1e-5)
    trl = gkd_loss()(torch.tensor(zs), torch.tensor(zt), torch.tensor(labels), beta=beta)
    np.testing.assert_allclose(float(total / count), trl.item(), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_vocab_chunked_equals_full_logits(beta):
    """Hidden states and heads of two widths (student 8, teacher 6), vocab 37 in chunks of
    10 (the last one padded): the loss and the student's gradients equal full logits'."""
    rng = np.random.default_rng(2)
    xs, ws = rng.normal(size=(10, 8)).astype(np.float32), rng.normal(size=(8, 37)).astype(np.float32)
    xt, wt = rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=(6, 37)).astype(np.float32)
    mask = (rng.random(10) < 0.7).astype(np.float32)
    full = lambda x, w: distill.divergence_loss(x @ w, xt @ wt, mask, beta=beta,  # noqa: E731
                                                temperature=1.5)[0]
    chunked = lambda x, w: distill.chunked_divergence_loss(  # noqa: E731
        x, w, xt, wt, mask, beta=beta, temperature=1.5, chunk=10)[0]
    a, ga = jax.value_and_grad(full, (0, 1))(xs, ws)
    b, gb = jax.value_and_grad(chunked, (0, 1))(xs, ws)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def teachers(tiny_checkpoint, tmp_path_factory):
    """{"same": a teacher of the student's vocabulary (another shape: 1 layer, d_model 48),
    "other": one of 600 tokens}, jaxlm dirs."""
    student = tiny_models.checkpoint_config("llama")
    out = {}
    for name, change in (("same", dict(n_layers=1, d_model=48, d_ff=96)),
                         ("other", dict(vocab_size=600))):
        cfg = dataclasses.replace(student, **change)
        path = tmp_path_factory.mktemp(f"teacher_{name}") / "model"
        jaxlm.save(str(path), cfg, jaxlm.init_params(cfg, jax.random.key(7)))
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "def class return import self value list print open".split()
    path = tmp_path_factory.mktemp("distill_data") / "sft.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            p = " ".join(rng.choice(words, 3))
            f.write(json.dumps({"prompt": p + " =", "completion": " " + p}) + "\n")
    return path


def _cfg(run_dir, student, teacher, corpus, *overrides):
    return load_config("distill", [
        f"train.init_from={student}", f"train.distill.teacher={teacher}",
        f"data.corpus={corpus}", f"run_dir={run_dir}", "data.seq_len=32", "data.batch_size=4",
        "data.eval_fraction=0.2", "train.steps=4", "train.warmup_steps=1",
        "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=2",
        "train.log_every=1", "train.learning_rate=1e-2", "train.loss_vocab_chunk=200",
        "mesh.devices=1", *overrides])


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in rows if "loss" in m}


def test_a_distill_run_lowers_the_loss_and_resumes_exactly(tiny_checkpoint, teachers,
                                                           sft_jsonl, tmp_path):
    """JSD with on-policy steps (lmbda 0.5: step 4 samples from the student through
    the engine, steps 1-3 do not), stopped at step 2 and resumed: the losses and the on-policy draws equal
    an uninterrupted run's; the eval loss (the divergence) falls."""
    student = tiny_checkpoint("llama")
    straight = tmp_path / "straight"
    summary = train(_cfg(straight, student, teachers["same"], sft_jsonl), progress=False)
    first, last = summary["eval"][0]["eval_loss"], summary["eval"][-1]["eval_loss"]
    assert last < first, (first, last)
    a = _losses(straight)
    assert [a[s]["on_policy"] for s in range(1, 5)] == [0, 0, 0, 1]
    assert all("distill_loss" in a[s] and "eval_perplexity" not in a[s] for s in a)
    stopped, teacher = tmp_path / "stopped", tmp_path / "teacher"
    shutil.copytree(teachers["same"], teacher)
    cfg = _cfg(stopped, student, teacher, sft_jsonl)
    train(cfg, progress=False, stop_after=2)
    assert json.loads((stopped / "teacher.json").read_text())["path"] == str(teacher)
    tcfg = jaxlm.load(str(teacher))[0]  # the teacher replaced by other weights: refused
    shutil.rmtree(teacher)
    jaxlm.save(str(teacher), tcfg, jaxlm.init_params(tcfg, jax.random.key(8)))
    with pytest.raises(jaxlm.CheckpointError, match="the teacher of .* changed: .*teacher.json"):
        train(cfg, progress=False, resume=True)
    shutil.rmtree(teacher)
    shutil.copytree(teachers["same"], teacher)  # the same bytes again (new inodes): taken
    train(cfg, progress=False, resume=True)  # the teacher is read again from its dir
    b = _losses(stopped)
    assert [(a[s]["loss"], a[s]["on_policy"]) for s in range(1, 5)] == \
        [(b[s]["loss"], b[s]["on_policy"]) for s in range(1, 5)]


def test_the_on_policy_batch_keeps_prompts_and_samples_completions(tiny_checkpoint,
                                                                   sp_tokenizer):
    """A packed row of two examples: each keeps its prompt; the loss moves to the sampled
    tokens; what a shorter sample leaves is padding; the draws follow (seed, step)."""
    from jaxlm.train.onpolicy import is_on_policy_step, on_policy_batch
    mcfg, params = jaxlm.load(tiny_checkpoint("llama"))
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3])
    tokens = np.array([[2, 10, 11, 12, 13, 3, 2, 20, 21, 22, 23, 24, 3, 0, 0, 0]])
    loss = np.zeros_like(tokens, np.float32)
    loss[0, 2:5], loss[0, 8:12] = 1, 1  # completions: tokens 3..5 and 9..12
    targets = np.where(seg[:, 1:] == seg[:, :-1], tokens[:, 1:], 0)
    batch = {"tokens": tokens, "targets": np.pad(targets, ((0, 0), (0, 1))),
             "positions": np.array([list(range(6)) + list(range(7)) + [0] * 3]),
             "segment_ids": seg, "loss_mask": loss}
    new = on_policy_batch(params, mcfg, batch, seed=0, step=0, temperature=1.0, eos_id=3,
                          pad_id=0, max_len=16)
    np.testing.assert_array_equal(new["tokens"][0, :3], tokens[0, :3])  # prompt 1
    np.testing.assert_array_equal(new["tokens"][0, 6:9], tokens[0, 6:9])  # prompt 2
    for p, end in ((2, 5), (8, 12)):
        n = int(new["loss_mask"][0, p:end + 1].sum())
        assert 1 <= n <= end - p
        np.testing.assert_array_equal(new["targets"][0, p:p + n], new["tokens"][0, p + 1:p + 1 + n])
        assert (new["segment_ids"][0, p + 1 + n:end + 1] == 0).all()
    draws = [is_on_policy_step(0, s, 0.5) for s in range(40)]
    assert draws == [is_on_policy_step(0, s, 0.5) for s in range(40)] and 5 < sum(draws) < 35


def test_a_teacher_of_another_vocabulary_is_one_line(tiny_checkpoint, teachers, sft_jsonl,
                                                     tmp_path, capsys):
    from jaxlm.scripts.cli import main
    run = tmp_path / "run"
    rc = main(["train", "--config", "distill", f"train.init_from={tiny_checkpoint('llama')}",
               f"train.distill.teacher={teachers['other']}", f"data.corpus={sft_jsonl}",
               f"run_dir={run}", "data.seq_len=32", "mesh.devices=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "600" in err[0] and "512" in err[0] and "vocabulary" in err[0]
    assert not run.exists()


def test_config_names_and_plan_counts_the_teacher(tiny_checkpoint, teachers):
    """TRL's flat spellings load; the teacher's path is stored absolute; distill with LoRA
    is refused; `jaxlm plan` counts the teacher's params as frozen."""
    from jaxlm.errors import ConfigError
    from jaxlm.sharding.plan import plan
    cfg = load_config("distill", [f"train.init_from={tiny_checkpoint('llama')}",
                                  f"train.teacher_model_name_or_path={teachers['same']}",
                                  "train.lmbda=0.25", "mesh.devices=1", "data.seq_len=32"])
    assert (cfg.train.distill.teacher, cfg.train.distill.on_policy) == (teachers["same"], 0.25)
    relative = load_config("distill", ["train.init_from=", "train.distill.teacher=t/model"])
    assert relative.train.distill.teacher == os.path.abspath("t/model")  # resumable anywhere
    teacher = jaxlm.load(teachers["same"])[1]
    assert plan(cfg)["frozen"] == sum(x.nbytes for x in jax.tree.leaves(teacher))
    with pytest.raises(ConfigError, match="lora"):
        load_config("distill", ["train.lora.rank=4", "train.init_from="])
