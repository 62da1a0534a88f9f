"""GRPO (train/grpo.py, train/rollout.py): the loss and its gradient against TRL's
GRPOTrainer._compute_loss itself; rewards and advantages; rollouts over the training
params in place on a 2 x 2 x 2 mesh; one sharded step equal to one device; a run through
`jaxlm train` with a module:function reward that logs its metrics and resumes exactly."""

import dataclasses
import json
import os
import sys
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import Config, DataConfig, GrpoConfig, MeshConfig, TrainConfig, load_config
from jaxlm.errors import ConfigError, InputError
from jaxlm.train import grpo, rollout

sys.path.insert(0, os.path.dirname(__file__))  # grpo_rewards: the module:function rewards

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")


# ------------------------------------------------------------ the loss against TRL


def trl_loss(logps, old, ref, adv, mask, *, loss_type, beta, eps, eps_high, max_len):
    """TRL 1.16's own `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py), called
    on a stand-in trainer whose log-prob function returns `logps` (a leaf tensor that
    needs grad): one process, no accumulation, token-level ratios, no vLLM."""
    b, t = logps.shape
    acc = types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x,
                                gather=lambda x: x, gather_for_metrics=lambda x: x)
    me = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=acc, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                   steps_per_generation=1))
    me._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros(b, t), None)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long),
              "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trl_grpo.GRPOTrainer._compute_loss(me, None, inputs), me._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trls(loss_type, beta):
    rng = np.random.default_rng(0)
    b, t, max_len = 6, 9, 12
    old = rng.normal(-2.0, 0.5, (b, t))
    logps = old + rng.normal(0.0, 0.3, (b, t))  # ratios beyond 1 +- eps: both clips bind
    ref = old + rng.normal(0.0, 0.2, (b, t))
    adv = rng.normal(0.0, 1.0, b)
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    kw = dict(loss_type=loss_type, beta=beta, eps=0.2, eps_high=0.28, max_len=max_len)

    x = torch.tensor(logps, dtype=torch.float32, requires_grad=True)
    want, logged = trl_loss(x, torch.tensor(old, dtype=torch.float32),
                            torch.tensor(ref, dtype=torch.float32),
                            torch.tensor(adv, dtype=torch.float32),
                            torch.tensor(mask, dtype=torch.float32), **kw)
    want.backward()

    def ours(lp):
        return grpo.grpo_loss(lp, jnp.asarray(old, jnp.float32),
                              jnp.broadcast_to(jnp.asarray(adv, jnp.float32)[:, None], (b, t)),
                              jnp.asarray(ref, jnp.float32), jnp.asarray(mask, jnp.float32),
                              beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                              max_completion_length=max_len)
    loss, grad = jax.value_and_grad(ours)(jnp.asarray(logps, jnp.float32))
    np.testing.assert_allclose(float(loss), float(want.detach()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert logged["clip_ratio/region_mean"][0] > 0  # the clipping is exercised


# ------------------------------------------------------------ a run through `jaxlm train`


def _prompts(path, n=6):
    rows = [{"prompt": f"def f{i}(x):", "answer": f"return {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_args(ckpt, corpus, run, *more):
    return ["train", "--config", "grpo", f"train.init_from={ckpt}", f"data.corpus={corpus}",
            f"run_dir={run}", "data.seq_len=32", "data.batch_size=8", "train.steps=4", "mesh.data=4",
            "mesh.tensor=2",
            "train.num_generations=2", "train.max_completion_length=8",
            "train.reward_funcs=grpo_rewards:short", "train.learning_rate=1e-2",
            "train.num_iterations=2", "train.checkpoint_every=2", "train.tensorboard=false",
            "train.grpo_beta=0.04", *more]


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_a_grpo_run_logs_its_metrics_and_resumes_exactly(tmp_path, tiny_checkpoint):
    from jaxlm.scripts.cli import main
    ckpt, corpus = tiny_checkpoint("llama"), _prompts(tmp_path / "prompts.jsonl")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_run_args(ckpt, corpus, full)) == 0
    logged = _losses(full)
    assert sorted(logged) == [1, 2, 3, 4]
    first = logged[1]
    for key in ("loss", "reward", "reward_std", "rewards/short/mean", "rewards/short/std", "kl",
                "clip_region", "completion_length", "entropy", "rollout_share"):
        assert np.isfinite(first[key]), key
    assert 0 < first["rollout_share"] < 1 and 1 <= first["completion_length"] <= 8
    assert "reward" not in logged[2]  # mu = 2: step 2 reuses step 1's rollout
    # stopped at step 3 (mid-way through the rollout made at step 3), then resumed
    from jaxlm.train.loop import train
    cfg = load_config("grpo", _run_args(ckpt, corpus, part)[3:])
    train(cfg, progress=False, stop_after=3)
    assert main(_run_args(ckpt, corpus, part) + ["--resume"]) == 0
    resumed = _losses(part)
    for step in (1, 2, 3, 4):
        assert resumed[step]["loss"] == logged[step]["loss"], step
