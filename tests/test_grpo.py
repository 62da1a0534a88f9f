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
            f"run_dir={run}", "data.seq_len=32", "data.batch_size=8", "train.steps=4",
            # one device: the sharded rollout and step have tests of their own below; on
            # 8 CPU devices under load, XLA:CPU's collectives sometimes deadlock in this
            # run's steps (a rendezvous termination abort, seen with two test workers)
            "mesh.devices=1",
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
    for key in ("loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/short/mean",
                "rewards/short/std", "kl",
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


def test_a_reward_function_that_raises_stops_the_run_in_one_line(tmp_path, tiny_checkpoint,
                                                                  capsys):
    from jaxlm.scripts.cli import main
    ckpt, corpus = tiny_checkpoint("llama"), _prompts(tmp_path / "prompts.jsonl")
    args = _run_args(ckpt, corpus, tmp_path / "run")
    args = [a if not a.startswith("train.reward_funcs=") else "train.reward_funcs="
            "grpo_rewards:raises" for a in args]
    capsys.readouterr()
    assert main(args) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
    assert err == ["error: reward function raises raised ValueError: no score today"]


# ------------------------------------------------------------ on a 2 x 2 x 2 mesh

MESH = MeshConfig(data=2, fsdp=2, tensor=2)


def _grpo_config(mcfg, mesh=MESH, beta=0.0, **grpo_keys):
    return Config(model=mcfg, data=DataConfig(seq_len=32, batch_size=8),
                  train=TrainConfig(objective="grpo", steps=4, warmup_steps=0,
                                    learning_rate=1e-2, grpo=GrpoConfig(
                                        num_generations=2, max_completion_length=8, beta=beta,
                                        reward_funcs="grpo_rewards:short", **grpo_keys)),
                  mesh=mesh)


def _state(cfg, params):
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.train.lora import trainable_specs
    from jaxlm.train.optimizer import make_optimizer
    from jaxlm.train.state import create_state
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train, trainable_specs(cfg))
    return mesh, tx, create_state(cfg, mesh, tx, 0, params)


def _records(n=4):
    return [{"prompt": f"def f{i}(x):", "answer": str(i), "where": f"prompts.jsonl:{i + 1}"}
            for i in range(n)]


def _nbytes(arrays):
    return sum(x.nbytes for x in arrays)


def test_rollouts_read_the_training_params_in_place(tiny_checkpoint, sp_tokenizer):
    """During a rollout on the 2 x 2 x 2 mesh the live device buffers grow by the engine's
    KV pages and per-slot rows, never by a copy of the (sharded) policy weights; beta = 0
    keeps no reference tree."""
    import jaxlm
    from jaxlm.sharding.rules import use_mesh
    mcfg, params = jaxlm.load(tiny_checkpoint("llama"))
    cfg = _grpo_config(mcfg)
    mesh, _, state = _state(cfg, params)
    assert state.frozen is None  # beta = 0: no reference
    sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert sharded, "the training params are sharded over the mesh"
    weights = _nbytes(jax.tree.leaves(state.params))
    seen = []

    def during(info):  # after each admission, before the decode loop runs
        pool = _nbytes(jax.tree.leaves(info["pool"]))
        seen.append(_nbytes(jax.live_arrays()) - pool)

    with use_mesh(mesh, cfg.mesh.rules):
        rollouts = rollout.Rollouts(cfg, sp_tokenizer, None, _records())
        before = _nbytes(jax.live_arrays())
        batch, metrics = rollouts.rollout(rollout.policy_params(cfg, state), 0, during)
    grown = max(seen) - before
    assert grown < weights / 2, (grown, weights)
    # inside the compiled decode loop too: its temporaries hold no split copy of the
    # layer weights (the layer scan reads the stacked training weights); per device
    temps = {}
    with use_mesh(mesh, cfg.mesh.rules):
        engine = rollout.rollout_engine(cfg, state.params, 0)
        for split in (False, True):  # True: generate's loop, which splits (a copy)
            engine.feats = dataclasses.replace(engine.feats, split_weights=split)
            temps[split] = engine.lower().compile().memory_analysis().temp_size_in_bytes
    layers = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(
        state.params["layers"]))
    print(f"decode loop temporaries {temps} B per device; layer weights {layers} B")
    assert temps[True] - temps[False] >= layers, (temps, layers)
    assert batch["tokens"].shape == (8, 32) and metrics["completion_length"] >= 1
    # the G = 2 samples of each prompt: same prompt, sampled apart
    assert (batch["tokens"][0, :3] == batch["tokens"][1, :3]).all()
    # the rollout's log-probs (the importance ratio's old ones) are the training
    # forward's at the positions that predict each completion token
    mask = batch["loss_mask"].astype(bool)
    with use_mesh(mesh, cfg.mesh.rules):
        again = np.asarray(jax.jit(grpo.token_logps, static_argnums=(1, 3))(
            state.params, cfg.model, {k: batch[k] for k in ("tokens", "targets", "positions",
                                                           "segment_ids")}, 1.0))
    np.testing.assert_allclose(batch["old_logps"][mask], again[mask], atol=2e-4)


def test_a_sharded_step_equals_one_device(tiny_checkpoint):
    """One GRPO step on fixed rollouts (beta > 0: the reference in the step too, ratios
    away from 1): the 2 x 2 x 2 mesh, and one device with 2 accumulated microbatches,
    give one device's loss and updated params."""
    import jaxlm
    from jaxlm.sharding.rules import named_sharding, use_mesh
    from jaxlm.train.optimizer import learning_rate_schedule
    from jaxlm.train.state import state_shardings
    from jaxlm.train.step import compile_steps
    mcfg, params = jaxlm.load(tiny_checkpoint("llama"))
    rng = np.random.default_rng(0)
    b, s = 8, 32
    lengths = rng.integers(10, s, b)
    prompt = 4
    batch = {"tokens": rng.integers(0, 512, (b, s)).astype(np.int32),
             "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
             "segment_ids": (np.arange(s)[None] < lengths[:, None]).astype(np.int32)}
    batch["targets"] = np.roll(batch["tokens"], -1, axis=1)
    batch["loss_mask"] = ((np.arange(s)[None] >= prompt - 1)
                          & (np.arange(s)[None] < lengths[:, None] - 1)).astype(np.int32)
    batch["old_logps"] = rng.normal(-6.5, 0.3, (b, s)).astype(np.float32)
    batch["advantages"] = np.repeat(rng.normal(0, 1, (b, 1)), s, 1).astype(np.float32)
    out = {}
    for name, mesh_cfg, accum in (("one", MeshConfig(devices=1), 1), ("mesh", MESH, 1),
                                  ("accum", MeshConfig(devices=1), 2)):
        cfg = _grpo_config(mcfg, mesh_cfg, beta=0.04, loss_type="grpo")
        # Adam's first update is lr g / (|g| + eps): eps 1e-8 turns the reduction-order
        # noise of a gradient element near 0 (a vocab column no row predicts) into
        # 1e-5-sized differences; a larger eps compares the update, not that noise
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eps=1e-3,
                                                                 grad_accum_steps=accum))
        mesh, tx, state = _state(cfg, params)
        with use_mesh(mesh, cfg.mesh.rules):
            sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
            step, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train),
                                    state_shardings(cfg, mesh, tx), sh, tcfg=cfg.train)
            state, metrics = step(state, jax.device_put(batch, sh))
            out[name] = jax.device_get((metrics, state.params))
    (m1, p1) = out["one"]
    assert m1["clip_region"] > 0 and abs(m1["kl"]) < 1e-6  # the reference = the start
    for name in ("mesh", "accum"):  # 8 devices; 2 microbatches (the same step, accumulated)
        m8, p8 = out[name]
        for key in ("loss", "kl", "entropy", "clip_region", "grad_norm"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {key}")
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), p8, p1)


# ------------------------------------------------------------ rewards, advantages, config


def test_builtin_rewards_weights_and_group_advantages():
    funcs = rollout.reward_functions("exact:answer, regex:^return \\d{1,2}$")
    assert [f.__name__ for f in funcs] == ["exact:answer", "regex:^return \\d{1,2}$"]
    completions = ["return 1", " return 2 ", "nope", "return 123"]
    got = rollout.score(funcs, ["p"] * 4, completions,
                        {"answer": ["return 1", "return 2", "x", "return 123"]}, ["w"] * 4)
    np.testing.assert_array_equal(got, [[1, 1], [1, 0], [0, 0], [1, 0]])
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 0.0])
    adv = rollout.advantages(rewards, 2, "group")
    t = torch.tensor(rewards).view(-1, 2)  # TRL: (r - group mean) / (group std + 1e-4)
    want = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)).view(-1)
    np.testing.assert_allclose(adv, want.numpy(), rtol=1e-12)
    assert (rollout.advantages(rewards, 2, "none")[2:4] == 0).all()
    (python,) = rollout.reward_functions("python")
    head = 'def f(x):\n    """Twice x."""\n'
    np.testing.assert_array_equal(
        rollout.score([python], [head] * 4 + [[{"role": "user", "content": "x"}]],
                      ["    return 2 * x\n", "    return (2 *\n", "    # a comment\n",
                       "    y = \0", "print(1)\n"], {}, ["w"] * 5)[:, 0], [1, 0, 0, 0, 1])
    np.testing.assert_allclose(rollout.advantages(rewards, 2, "batch"),
                               (rewards - np.repeat(t.mean(1).numpy(), 2))
                               / (rewards.std(ddof=1) + 1e-4))


@pytest.mark.parametrize("name, needle", [
    ("raises", "reward function raises raised ValueError: no score today"),
    ("too_few", "reward function too_few returned 3 values for 4 completions"),
    ("not_finite", "reward function not_finite returned nan for completion 2 (prompt p.jsonl:3)"),
])
def test_a_bad_reward_is_one_line(name, needle):
    funcs = rollout.reward_functions(f"grpo_rewards:{name}")
    with pytest.raises(InputError) as e:
        rollout.score(funcs, ["p"] * 4, ["a", "b", "c", "d"], {},
                      [f"p.jsonl:{i + 1}" for i in range(4)])
    assert str(e.value) == needle


def test_grpo_keys_and_what_is_refused(tmp_path, capsys):
    from jaxlm.scripts.cli import main
    cfg = load_config("grpo", ["train.num_generations=4", "train.epsilon_high=0.28",
                               "train.grpo_beta=0.04", "train.grpo_loss_type=dr_grpo",
                               "train.scale_rewards=none", "train.reward_funcs=m:f"])
    g = cfg.train.grpo
    assert (g.num_generations, g.epsilon_high, g.beta, g.loss_type, g.scale_rewards) == \
        (4, 0.28, 0.04, "dr_grpo", "none")
    for bad, needle in [(["train.num_generations=1"], "num_generations=1 must be >= 2"),
                        (["data.batch_size=12"], "must be a multiple of train.grpo.num_gen"),
                        (["train.grpo.loss_type=ppo"], "loss_type")]:
        with pytest.raises(ConfigError, match=needle):
            load_config("grpo", bad)
    with pytest.raises(ConfigError, match="cannot import nosuchmodule:f"):
        rollout.reward_functions("nosuchmodule:f")
    with pytest.raises(ConfigError, match="needs train.grpo.reward_funcs"):
        rollout.reward_functions("")
    rc = main(["train", "--config", "grpo", "train.num_generations=1",
               f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "num_generations=1 must be >= 2" in err[0]


def test_grpo_with_lora_merges_the_adapters_for_rollouts(tmp_path, tiny_checkpoint):
    """LoRA: the base is frozen (and the reference, beta > 0), rollouts sample from the
    adapters merged once per step, and the adapters learn. Temperature 0.7: the old
    log-probs are the merged policy's at logits / 0.7, so the first step's ratios are 1."""
    from jaxlm.train.loop import train
    ckpt, corpus = tiny_checkpoint("llama"), _prompts(tmp_path / "prompts.jsonl")
    args = _run_args(ckpt, corpus, tmp_path / "lora")[3:] + [
        "train.lora.rank=4", "train.steps=2", "train.grpo_temperature=0.7"]
    train(load_config("grpo", [a for a in args if a != "train.steps=4"]), progress=False)
    logged = _losses(tmp_path / "lora")
    assert sorted(logged) == [1, 2] and np.isfinite(logged[2]["loss"])
    assert logged[2]["grad_norm"] > 0
    assert logged[1]["clip_region"] == 0 and abs(logged[1]["kl"]) < 1e-6


def test_a_reward_model_dir_is_a_reward_function(tmp_path, sp_tokenizer_dir):
    """model:PATH: a sequence classifier's score (jaxlm.classify) of prompt + completion."""
    import shutil
    import jaxlm
    import tiny_models
    cfg = dataclasses.replace(tiny_models.checkpoint_config("llama"), num_labels=1)
    params = jaxlm.init_params(cfg, jax.random.key(1))
    path = tmp_path / "rm"
    jaxlm.save(str(path), cfg, params)
    shutil.copy(sp_tokenizer_dir / "tokenizer.model", path / "tokenizer.model")
    (fn,) = rollout.reward_functions(f"model:{path}")
    got = rollout.score([fn], ["1 + 1 =", "1 + 1 ="], [" 2", " 3"], {}, ["a", "b"])
    tok = jaxlm.load_tokenizer(str(path))
    ids = [tok.encode("1 + 1 = 2"), tok.encode("1 + 1 = 3")]
    width = max(map(len, ids))
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for r, i in enumerate(ids):
        tokens[r, :len(i)], mask[r, :len(i)] = i, 1
    want = np.asarray(jaxlm.classify(params, cfg, tokens, mask))[:, 0]
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-6)
    assert got[0, 0] != got[1, 0]


def test_stdlib_sft_prompts_keep_their_body_for_the_rewards():
    records = rollout.load_prompt_records("stdlib-sft", max_records=5, seq_len=128)
    assert len(records) == 5
    for r in records:  # the reference body is a field; the prompt parses with it
        assert r["prompt"].lstrip().startswith(("def ", "async def", "@"))
        assert rollout.python_parses([r["prompt"]], [r["completion"]]) == [1.0]
