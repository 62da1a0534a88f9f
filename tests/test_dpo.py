"""DPO: the loss and its gradient against transformers log-probs and torch autograd;
a few LoRA DPO steps (reference = the frozen base) raise the reward margin."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.config import (Config, DataConfig, DpoConfig, LoraConfig, MeshConfig,  # noqa: E402
                          TrainConfig)
from jaxlm.model.hf import load_hf  # noqa: E402
from jaxlm.sharding.mesh import make_mesh  # noqa: E402
from jaxlm.sharding.rules import named_sharding, use_mesh  # noqa: E402
from jaxlm.train import dpo  # noqa: E402
from jaxlm.train.lora import trainable_specs  # noqa: E402
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from jaxlm.train.state import TrainState, create_state, state_shardings  # noqa: E402
from jaxlm.train.step import compile_steps, train_step  # noqa: E402

V, S, PAIRS = 96, 16, 4


def hf_llama(seed, path):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def lm_rows(seqs, prompt_lens):
    """Right-padded LM batch; the loss on the response tokens (after the prompt)."""
    b = len(seqs)
    tokens, targets = np.zeros((b, S), np.int32), np.zeros((b, S), np.int32)
    seg, mask = np.zeros((b, S), np.int32), np.zeros((b, S), np.float32)
    for i, (seq, p) in enumerate(zip(seqs, prompt_lens)):
        n = len(seq) - 1
        tokens[i, :n], targets[i, :n], seg[i, :n] = seq[:-1], seq[1:], 1
        mask[i, p - 1:n] = 1
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (b, S)).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": seg,
            "loss_mask": mask}


def preference_batch(seed=0, pairs=PAIRS):
    """Shared prompts; chosen responses from one token set, rejected from another."""
    rng = np.random.default_rng(seed)
    chosen, rejected, plens = [], [], []
    for _ in range(pairs):
        p = int(rng.integers(3, 6))
        prompt = rng.integers(0, V, p).tolist()
        chosen.append(prompt + rng.integers(0, V // 2, int(rng.integers(4, S - p))).tolist())
        rejected.append(prompt + rng.integers(V // 2, V, int(rng.integers(4, S - p))).tolist())
        plens.append(p)
    return {"chosen": lm_rows(chosen, plens), "rejected": lm_rows(rejected, plens)}


def torch_logprobs(model, rows):
    logits = model(torch.tensor(rows["tokens"], dtype=torch.long),
                   attention_mask=torch.tensor(rows["segment_ids"])).logits
    logp = torch.log_softmax(logits.float(), -1)
    token = logp.gather(-1, torch.tensor(rows["targets"], dtype=torch.long)[..., None])[..., 0]
    return (token * torch.tensor(rows["loss_mask"])).sum(-1)


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    m = (pc - rc) - (pr - rr)
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    if loss_type == "ipo":
        return (m - 1 / (2 * beta)) ** 2
    return -(1 - ls) * logsig(beta * m) - ls * logsig(-beta * m)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    policy, reference = hf_llama(0, root / "policy"), hf_llama(1, root / "reference")
    mcfg, p_params = load_hf(root / "policy")
    _, r_params = load_hf(root / "reference")
    return policy, reference, mcfg, p_params, r_params


def test_dpo_loss_is_the_formula_for_both_loss_types():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(size=6) * 3 for _ in range(4))
    for loss_type, ls in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        losses, metrics = dpo.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), 0.3,
                                       loss_type, ls)
        np.testing.assert_allclose(losses, numpy_dpo(pc, pr, rc, rr, 0.3, loss_type, ls),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["reward_margin"], 0.3 * ((pc - rc) - (pr - rr)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(metrics["reward_accuracy"], (pc - rc > pr - rr) * 1.0)


def test_dpo_step_loss_and_gradient_match_transformers(models):
    policy, reference, mcfg, p_params, r_params = models
    batch = preference_batch()
    beta, ls = 0.5, 0.1
    tcfg = TrainConfig(objective="dpo", dpo=DpoConfig(beta=beta, label_smoothing=ls), steps=1,
                       warmup_steps=0)

    # oracle: transformers log-probs, the formula in numpy (loss) and torch (gradient)
    with torch.no_grad():
        rc, rr = (torch_logprobs(reference, batch[k]) for k in ("chosen", "rejected"))
    pc, pr = (torch_logprobs(policy, batch[k]) for k in ("chosen", "rejected"))
    m = (pc - rc) - (pr - rr)
    loss_t = (-(1 - ls) * torch.nn.functional.logsigmoid(beta * m)
              - ls * torch.nn.functional.logsigmoid(-beta * m)).mean()
    policy.zero_grad()
    loss_t.backward()
    as_np = lambda t: t.detach().double().numpy()  # noqa: E731
    want_loss = numpy_dpo(*(as_np(t) for t in (pc, pr, rc, rr)), beta, "sigmoid", ls).mean()
    want_norm = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in policy.parameters()))

    # ours: the train step (chunked vocab) and jax.grad of the objective (full logits)
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=p_params,
                       opt_state=tx.init(p_params), frozen=r_params)
    step = jax.jit(functools.partial(train_step, mcfg=mcfg, tx=tx,
                                     lr_schedule=lambda s: 0.0, vocab_chunk=40, tcfg=tcfg))
    _, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["dpo_loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], want_norm, rtol=1e-4)
    margin = beta * as_np(m)
    np.testing.assert_allclose(metrics["reward_margin"], margin.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards_chosen"], beta * as_np(pc - rc).mean(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["reward_accuracy"], (margin > 0).mean())

    def objective(p):
        total, _, n = dpo.dpo_sums(p, r_params, mcfg, batch, tcfg)
        return total / n
    grads = jax.jit(jax.grad(objective))(p_params)
    layers = policy.model.layers
    d = mcfg.d_model
    q0 = np.asarray(grads["layers"]["attn"]["q"][0]).reshape(d, -1).T  # [H*hd, D]
    np.testing.assert_allclose(q0, layers[0].self_attn.q_proj.weight.grad.numpy(),
                               atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["layers"]["mlp"]["down"][1]).T,
                               layers[1].mlp.down_proj.weight.grad.numpy(), atol=1e-5, rtol=1e-4)


def test_lora_dpo_steps_raise_the_reward_margin(models):
    """Reference = the frozen base (adapters off): margin 0 at the first step, then up.
    Two microbatches per step."""
    _, _, mcfg, p_params, _ = models
    tcfg = TrainConfig(objective="dpo", dpo=DpoConfig(beta=0.5), steps=8, warmup_steps=0,
                       learning_rate=2e-2, grad_accum_steps=2,
                       lora=LoraConfig(rank=4, targets="layers/(attn/(q|v)|mlp/(up|down))"))
    cfg = Config(model=mcfg, train=tcfg, data=DataConfig(seq_len=S, batch_size=8),
                 mesh=MeshConfig(devices=1))
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(tcfg, trainable_specs(cfg))
    batch = preference_batch(1, pairs=8)
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, 0, p_params)
        sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        train, evaluate = compile_steps(mcfg, tx, learning_rate_schedule(tcfg),
                                        state_shardings(cfg, mesh, tx), sh, 0, tcfg=tcfg)
        history = []
        for _ in range(tcfg.steps):
            state, metrics = train(state, batch)
            history.append(jax.device_get(metrics))
        loss_sum, pairs, sums = evaluate(state, batch)
    assert history[0]["reward_margin"] == 0.0  # policy == reference exactly at init
    np.testing.assert_allclose(history[0]["dpo_loss"], np.log(2.0), rtol=1e-6)
    assert history[-1]["reward_margin"] > 0.5 and history[-1]["reward_accuracy"] == 1.0
    assert history[-1]["dpo_loss"] < 0.5 * np.log(2.0)
    assert float(pairs) == 8 and float(sums["reward_margin"]) / 8 > 0.5
    assert float(loss_sum) / 8 < history[0]["dpo_loss"]
