"""PPO (train/ppo.py): the rewards, GAE, whitening, policy and value losses and their
gradients against a torch re-implementation of TRL's PPOTrainer formulas (TRL 1.16 ships
no PPO trainer); a run through `jaxlm train` against a reward model that logs its
metrics, resumes exactly and exports its policy; the refusals."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import load_config
from jaxlm.train import ppo

torch = pytest.importorskip("torch")


# ------------------------------------------------------------ the formulas, against torch


def t_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def t_masked_whiten(x, mask, shift_mean=True):
    mean = t_masked_mean(x, mask)
    var = t_masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def torch_ppo(logps, ref, values, scores, lengths, new_logps, vpred, *, kl_coef, estimator,
              gamma, lam, whiten_rewards, cliprange, cliprange_value, vf_coef):
    """TRL PPOTrainer's (v0.12-0.19) rollout and loss formulas, written out in torch over
    responses laid out from index 0 and padded after `lengths` (TRL's layout), with the
    score at the last response token and values 0 past it (as the brief asks)."""
    b, n = logps.shape
    mask = (torch.arange(n)[None] < torch.as_tensor(lengths)[:, None]).double()
    logr = ref - logps
    kl = -logr if estimator == "k1" else (logr.exp() - 1) - logr
    rewards = (-kl_coef * kl) * mask
    rewards[torch.arange(b), torch.as_tensor(lengths) - 1] += scores
    values = values * mask
    raw = rewards.clone()
    if whiten_rewards:
        rewards = t_masked_whiten(rewards, mask, shift_mean=False) * mask
    lastgaelam, reversed_adv = 0.0, []
    for t in reversed(range(n)):
        nextvalues = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    adv = torch.stack(reversed_adv[::-1], dim=1)
    returns = adv + values
    adv = t_masked_whiten(adv, mask) * mask
    # the loss
    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1, vf_losses2 = (vpred - returns) ** 2, (vpredclipped - returns) ** 2
    vf_loss = 0.5 * t_masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(new_logps - logps)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = t_masked_mean(torch.max(pg_losses, pg_losses2), mask)
    return {"rewards": raw, "advantages": adv, "returns": returns * mask,
            "pg_loss": pg_loss, "vf_loss": vf_loss, "loss": pg_loss + vf_coef * vf_loss,
            "pg_clipfrac": t_masked_mean((pg_losses2 > pg_losses).double(), mask),
            "vf_clipfrac": t_masked_mean((vf_losses2 > vf_losses1).double(), mask)}


@pytest.mark.parametrize("estimator, gamma, lam, whiten_rewards", [
    ("k1", 1.0, 0.95, False), ("k3", 0.9, 0.8, True)])
def test_rewards_gae_whitening_and_losses_equal_a_torch_reimplementation(
        estimator, gamma, lam, whiten_rewards):
    """jaxlm lays each completion out after its prompt (positions start-1 .. end-2 of a
    row predict it); torch's reference holds it from index 0. Random log-probs, values and
    scores, completions of 1 to 9 tokens after prompts of 1 to 5: rewards, advantages,
    returns, both losses and the gradients w.r.t. the new log-probs and values agree to
    1e-5 in float32."""
    rng = np.random.default_rng(0)
    b, n, s = 7, 9, 16
    lengths = rng.integers(1, n + 1, b)
    lengths[0], lengths[1] = n, 1  # a full row and a one-token completion
    starts = rng.integers(1, 6, b)  # the first position predicting a completion token
    logps = rng.normal(-2.0, 0.5, (b, n))
    ref = logps + rng.normal(0.0, 0.3, (b, n))
    values = rng.normal(0.0, 1.0, (b, n))
    scores = rng.normal(0.0, 2.0, b)
    new_logps = logps + rng.normal(0.0, 0.3, (b, n))  # ratios beyond 1 +- 0.2: clips bind
    vpred = values + rng.normal(0.0, 0.5, (b, n))  # beyond +- 0.2 of the old values
    kw = dict(cliprange=0.2, cliprange_value=0.2)
    coefs = dict(kl_coef=0.05, gamma=gamma, lam=lam)

    new_t = torch.tensor(new_logps, requires_grad=True)
    vpred_t = torch.tensor(vpred, requires_grad=True)
    want = torch_ppo(*(torch.tensor(x) for x in (logps, ref, values, scores)), lengths,
                     new_t, vpred_t, estimator=estimator, whiten_rewards=whiten_rewards,
                     vf_coef=0.1, **coefs, **kw)
    want["loss"].backward()

    def lay(x):  # [b, n] from index 0 -> [b, s] at each row's completion positions
        out = np.zeros((b, s), np.float32)
        for r in range(b):
            out[r, starts[r]:starts[r] + lengths[r]] = x[r, :lengths[r]]
        return jnp.asarray(out)

    def back(x):  # the reverse
        x = np.asarray(x)
        out = np.zeros((b, n))
        for r in range(b):
            out[r, :lengths[r]] = x[r, starts[r]:starts[r] + lengths[r]]
        return out

    mask = lay(np.ones((b, n)))
    rewards, _ = ppo.token_rewards(lay(logps), lay(ref), jnp.asarray(scores, jnp.float32), mask,
                                   kl_coef=0.05, estimator=estimator)
    adv, returns = ppo.advantages_and_returns(rewards, lay(values), mask, gamma=gamma, lam=lam,
                                              whiten_rewards=whiten_rewards)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back(rewards), want["rewards"], **tol)
    np.testing.assert_allclose(back(adv), want["advantages"].detach(), **tol)
    np.testing.assert_allclose(back(returns), want["returns"].detach(), **tol)
    assert not np.asarray(adv)[np.asarray(mask) == 0].any()  # 0 off the completions

    def loss(new, v):
        return ppo.ppo_loss(new, lay(logps), adv, v, lay(values), returns, mask,
                            vf_coef=0.1, **kw)[0]
    got, (g_new, g_v) = jax.value_and_grad(loss, argnums=(0, 1))(lay(new_logps), lay(vpred))
    np.testing.assert_allclose(float(got), float(want["loss"].detach()), **tol)
    np.testing.assert_allclose(back(g_new), new_t.grad.numpy(), **tol)
    np.testing.assert_allclose(back(g_v), vpred_t.grad.numpy(), **tol)
    _, pg_loss, vf_loss = ppo.ppo_loss(lay(new_logps), lay(logps), adv, lay(vpred), lay(values),
                                       returns, mask, vf_coef=0.1, **kw)
    np.testing.assert_allclose([pg_loss, vf_loss], [float(want["pg_loss"].detach()),
                                                    float(want["vf_loss"].detach())], **tol)
    # both clips are exercised (else the max() branches were never compared)
    assert 0 < float(want["pg_clipfrac"]) < 1 and 0 < float(want["vf_clipfrac"]) < 1


def test_masked_whitening_is_trls():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (4, 6))
    mask = (rng.random((4, 6)) < 0.6).astype(np.float64)
    for shift in (True, False):
        want = t_masked_whiten(torch.tensor(x), torch.tensor(mask), shift_mean=shift).numpy()
        got = ppo.masked_whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.float32),
                                shift_mean=shift)
        np.testing.assert_allclose(np.asarray(got)[mask > 0], want[mask > 0], rtol=1e-5,
                                   atol=1e-5)


# ------------------------------------------------------------ a run through `jaxlm train`


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, sp_tokenizer_dir, sp_tokenizer):
    """reward_model(vocab) -> the path of a jaxlm dir of a one-score Llama-style
    classifier (wider than the policy: the value model it starts is another model), random
    weights (key 1); with the shared tokenizer when its vocabulary is the tokenizer's."""
    import jaxlm
    import tiny_models
    made = {}

    def get(vocab=tiny_models.TOKENIZER_VOCAB):
        if vocab not in made:
            cfg = dataclasses.replace(tiny_models.checkpoint_config("llama"), vocab_size=vocab,
                                      d_model=48, num_labels=1, pad_token_id=sp_tokenizer.pad_id)
            path = tmp_path_factory.mktemp("reward") / f"rm{vocab}"
            jaxlm.save(str(path), cfg, jaxlm.init_params(cfg, jax.random.key(1)))
            if vocab == tiny_models.TOKENIZER_VOCAB:
                shutil.copy(sp_tokenizer_dir / "tokenizer.model", path / "tokenizer.model")
            made[vocab] = str(path)
        return made[vocab]
    return get


def _prompts(path, n=6):
    rows = [{"prompt": f"def f{i}(x):"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_args(ckpt, reward, corpus, run, *more):
    return ["train", "--config", "ppo", f"train.init_from={ckpt}", f"data.corpus={corpus}",
            f"run_dir={run}", f"train.reward_model_path={reward}", "data.seq_len=32",
            "data.batch_size=8", "train.steps=4", "mesh.devices=1",
            "train.response_length=8", "train.num_ppo_epochs=2", "train.learning_rate=1e-2",
            "train.checkpoint_every=1", "train.tensorboard=false",
            "train.missing_eos_penalty=1.0", *more]


def _logged(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_a_ppo_run_logs_its_metrics_resumes_exactly_and_exports_its_policy(
        tmp_path, tiny_checkpoint, reward_model):
    import jaxlm
    from jaxlm.scripts.cli import main
    from jaxlm.scripts.convert import run_convert
    ckpt, reward = tiny_checkpoint("llama"), reward_model()
    corpus = _prompts(tmp_path / "prompts.jsonl")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_run_args(ckpt, reward, corpus, full)) == 0
    logged = _logged(full)
    assert sorted(logged) == [1, 2, 3, 4]
    first = logged[1]
    for key in ("loss", "policy_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "entropy",
                "approxkl", "ratio", "score", "non_score_reward", "rlhf_reward", "kl", "value",
                "completion_length", "eos_share", "rollout_share", "grad_norm"):
        assert np.isfinite(first[key]), key
    assert 0 < first["rollout_share"] < 1 and 1 <= first["completion_length"] <= 8
    # the first rollout: the reference is the policy (kl 0) and the ratios are 1
    assert first["kl"] == 0 and first["non_score_reward"] == 0
    assert abs(first["ratio"] - 1) < 1e-5 and first["pg_clipfrac"] == 0
    assert first["value_loss"] > 0 and first["entropy"] > 0
    # step 2 reuses step 1's rollout (num_ppo_epochs = 2) with the updated policy
    assert "score" not in logged[2] and logged[2]["approxkl"] > 0
    assert logged[3]["kl"] != 0  # a new rollout, away from the reference
    # a kill after step 3 (mid-way through the rollout made at step 3, which the data
    # state holds): the run resumed from its checkpoint of step 3
    shutil.copytree(full, part)
    assert main(_run_args(ckpt, reward, corpus, part) + ["--resume", "--step", "3"]) == 0
    assert (part / "checkpoints.set-aside" / "4").is_dir()  # step 4 ran again
    again = _logged(part)[4]
    for key in ("loss", "policy_loss", "value_loss", "grad_norm"):
        assert again[key] == logged[4][key], key
    # the reward model is pinned (reward_model.json): other weights there are refused
    from jaxlm.train import base as pinned
    rec = json.loads((full / pinned.REWARD_MODEL).read_text())
    assert (rec["path"], rec["digest"]) == (reward, pinned.digest(reward)[0])
    other = tmp_path / "other_rm"
    rcfg = jaxlm.load(reward)[0]
    jaxlm.save(str(other), rcfg, jaxlm.init_params(rcfg, jax.random.key(2)))
    with pytest.raises(jaxlm.CheckpointError, match="the reward model of .* changed"):
        pinned.resolve(str(full), reward, given=str(other), name=pinned.REWARD_MODEL)
    # the run's model is the policy: jaxlm.load and `convert --to hf` give it
    base_cfg, base = jaxlm.load(ckpt)
    got_cfg, got = jaxlm.load(str(full))
    assert got_cfg == base_cfg and not got_cfg.num_labels
    assert jax.tree.structure(got) == jax.tree.structure(base)
    assert not np.allclose(got["head"]["kernel"], base["head"]["kernel"])  # trained
    run_convert(str(full), str(tmp_path / "hf"), "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]


# ------------------------------------------------------------ refusals


def test_no_reward_model_or_another_vocabulary_is_one_line(tmp_path, tiny_checkpoint,
                                                           reward_model, capsys):
    from jaxlm.scripts.cli import main
    ckpt, corpus = tiny_checkpoint("llama"), _prompts(tmp_path / "prompts.jsonl")
    for reward, needle in [
            ("", "train.objective=ppo needs a reward model: train.ppo.reward_model_path=PATH"),
            (reward_model(97), "has a vocabulary of 97 tokens, the policy 512")]:
        run = tmp_path / "run"
        capsys.readouterr()
        assert main(_run_args(ckpt, reward, corpus, run)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not run.exists()  # refused before anything is written


def test_ppo_keys_and_trls_flat_names():
    cfg = load_config("ppo", ["train.kl_coef=0.1", "train.cliprange=0.3", "train.vf_coef=0.5",
                              "train.gamma=0.99", "train.lam=0.9", "train.whiten_rewards=true",
                              "train.response_length=16", "train.ppo_temperature=1.0",
                              "train.num_ppo_epochs=2", "train.value_init=policy"])
    p = cfg.train.ppo
    assert (p.kl_coef, p.cliprange, p.vf_coef, p.gamma, p.lam, p.whiten_rewards,
            p.max_completion_length, p.temperature, p.num_ppo_epochs, p.value_init) == \
        (0.1, 0.3, 0.5, 0.99, 0.9, True, 16, 1.0, 2, "policy")
    from jaxlm.errors import ConfigError
    for bad, needle in [(["train.ppo.value_init=ref"], "value_init"),
                        (["train.response_length=600"], "must be less than data.seq_len"),
                        (["train.lam=1.5"], "must be in")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("ppo", bad)
