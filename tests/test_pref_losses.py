"""The preference losses against TRL 1.16 as the oracle: jaxlm's loss and its gradient
(jax.grad) equal TRL's own loss code (torch autograd) on the same log-probs / scores,
f32, within 1e-5: DPO (sigmoid, ipo, label smoothing), ORPO, SimPO, KTO and the reward
model's Bradley-Terry loss (with a margin). TRL's losses are methods: each is called
on a minimal trainer object (object.__new__ plus the attributes it reads) and, where
TRL computes the loss inside `_compute_loss` / `compute_loss`, a stand-in model whose
outputs are the given per-token log-probs or scores."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from jaxlm.train import dpo, kto, reward  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 6, 7  # rows, completion positions


def _trainer(cls, **attrs):
    """A TRL trainer object without __init__: the attributes its loss reads."""
    t = object.__new__(cls)
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)
    defaults = dict(accelerator=acc, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
                    _metrics={"train": collections.defaultdict(list),
                              "eval": collections.defaultdict(list)})
    for k, v in {**defaults, **attrs}.items():
        object.__setattr__(t, k, v)
    return t


class _Model:
    """Stands in for a causal LM with TRL's fused head: returns `log_probs` [N, T] per
    input_ids tensor it is called with (by identity)."""
    training = True

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids=None, **_):
        lp = self.table[id(input_ids)]
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                                     mean_logits=torch.zeros_like(lp), logits=lp,
                                     is_top1=torch.zeros_like(lp, dtype=torch.bool))


def _t(x, grad=False):
    return torch.tensor(np.asarray(x, np.float32), requires_grad=grad)


def _per_token(rng, n, mask):
    return (rng.normal(size=(n, T)) - 1.5).astype(np.float32) * mask


def _mask(rng, n):
    lengths = rng.integers(2, T + 1, n)
    return (np.arange(T)[None] < lengths[:, None]).astype(np.float32)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_equals_trl(loss_type):
    """DPOTrainer._compute_loss (precomputed reference log-probs) on per-token log-probs."""
    from trl import DPOTrainer
    rng = np.random.default_rng(0)
    mask = _mask(rng, 2 * B)
    per_token = _per_token(rng, 2 * B, mask)
    ref = rng.normal(size=2 * B).astype(np.float32) * 3 - 8
    beta = 0.3
    input_ids = torch.zeros(2 * B, T + 1, dtype=torch.long)
    lp = _t(per_token, grad=True)
    trainer = _trainer(DPOTrainer, model=_Model({}), beta=beta, loss_types=[loss_type],
                       loss_weights=[1.0], ld_alpha=None, precompute_ref_logps=True,
                       f_divergence_type="reverse_kl", use_weighting=False, label_smoothing=0.0)
    model = _Model({id(input_ids): lp})
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": torch.cat([torch.zeros(2 * B, 1), _t(mask)], 1).long(),
              "ref_chosen_logps": _t(ref[:B]), "ref_rejected_logps": _t(ref[B:])}
    loss = trainer._compute_loss(model, inputs, False)
    loss.backward()

    def ours(per_token):
        policy = jnp.sum(per_token, -1)
        counts = jnp.sum(jnp.asarray(mask), -1)
        losses, _ = dpo.dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta, loss_type,
                                 0.0, counts[:B], counts[B:])
        return jnp.mean(losses)
    value, grad = jax.value_and_grad(ours)(jnp.asarray(per_token))
    np.testing.assert_allclose(value, loss.item(), **TOL)
    np.testing.assert_allclose(np.asarray(grad) * mask, lp.grad.numpy() * mask, **TOL)


def test_dpo_label_smoothing_equals_trl():
    """cDPO: TRL 1.16's DPO sigmoid has no label smoothing; its CPOTrainer.cpo_loss
    (sigmoid, label_smoothing) over the policy/reference log-ratios is the formula."""
    from trl.experimental.cpo import CPOTrainer
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(size=B).astype(np.float32) * 3 for _ in range(4))
    beta, ls = 0.4, 0.2
    trainer = _trainer(CPOTrainer, alpha=0.0, beta=beta, label_smoothing=ls, loss_type="sigmoid")
    tc, tr = _t(pc, True), _t(pr, True)
    losses, _, _ = trainer.cpo_loss(tc - _t(rc), tr - _t(rr))
    losses.mean().backward()
    f = lambda a, b: jnp.mean(dpo.dpo_loss(a, b, rc, rr, beta, "sigmoid", ls)[0])  # noqa: E731
    value, (ga, gb) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    np.testing.assert_allclose(value, losses.mean().item(), **TOL)
    np.testing.assert_allclose(ga, tc.grad.numpy(), **TOL)
    np.testing.assert_allclose(gb, tr.grad.numpy(), **TOL)


def test_orpo_equals_trl():
    """ORPOTrainer.odds_ratio_loss on average log-probs (ORPO's loss: NLL - mean of it)."""
    from trl.experimental.orpo import ORPOTrainer
    rng = np.random.default_rng(2)
    ac = -rng.uniform(0.05, 3.0, B).astype(np.float32)  # both sides of -log 2
    ar = -rng.uniform(0.05, 3.0, B).astype(np.float32)
    beta = 0.25
    tc, tr = _t(ac, True), _t(ar, True)
    losses, chosen, rejected, ratio, log_odds = _trainer(ORPOTrainer, beta=beta).odds_ratio_loss(
        tc, tr)
    (-losses.mean()).backward()
    f = lambda a, b: jnp.mean(dpo.orpo_loss(a, b, beta)[0])  # noqa: E731
    value, (ga, gb) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(ac), jnp.asarray(ar))
    np.testing.assert_allclose(value, -losses.mean().item(), **TOL)
    np.testing.assert_allclose(ga, tc.grad.numpy(), **TOL)
    np.testing.assert_allclose(gb, tr.grad.numpy(), **TOL)
    _, metrics = dpo.orpo_loss(jnp.asarray(ac), jnp.asarray(ar), beta)
    np.testing.assert_allclose(metrics["rewards_chosen"], chosen.detach().numpy(), **TOL)
    np.testing.assert_allclose(jnp.mean(metrics["log_odds_ratio"]), ratio.item(), **TOL)
    np.testing.assert_allclose(jnp.mean(metrics["log_odds_chosen"]), log_odds.item(), **TOL)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_equals_trl(ls):
    """CPOTrainer.cpo_loss with loss_type="simpo" on average log-probs."""
    from trl.experimental.cpo import CPOTrainer
    rng = np.random.default_rng(3)
    ac, ar = (-rng.uniform(0.1, 3.0, B).astype(np.float32) for _ in range(2))
    beta, gamma = 2.0, 0.7
    trainer = _trainer(CPOTrainer, alpha=0.0, beta=beta, label_smoothing=ls, loss_type="simpo",
                       simpo_gamma=gamma)
    tc, tr = _t(ac, True), _t(ar, True)
    losses, chosen, rejected = trainer.cpo_loss(tc, tr)
    losses.mean().backward()
    f = lambda a, b: jnp.mean(dpo.simpo_loss(a, b, beta, gamma, ls)[0])  # noqa: E731
    value, (ga, gb) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(ac), jnp.asarray(ar))
    np.testing.assert_allclose(value, losses.mean().item(), **TOL)
    np.testing.assert_allclose(ga, tc.grad.numpy(), **TOL)
    np.testing.assert_allclose(gb, tr.grad.numpy(), **TOL)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_equals_trl(weights):
    """KTOTrainer._compute_loss (precomputed reference log-probs, KL rows) on per-token
    log-probs of the completions and of the mismatched KL completions."""
    from trl.trainer.kto_trainer import KTOTrainer
    rng = np.random.default_rng(4)
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    mask, kl_mask = _mask(rng, B), _mask(rng, B)
    per_token, kl_token = _per_token(rng, B, mask), _per_token(rng, B, kl_mask)
    # reference log-probs near the policy's: the KL estimate is positive
    ref, ref_kl = (x.sum(-1) - rng.uniform(0.5, 2, B).astype(np.float32)
                   for x in (per_token, kl_token))
    beta, (dw, uw) = 0.5, weights
    input_ids, kl_ids = torch.zeros(B, T + 1, dtype=torch.long), torch.ones(B, T + 1,
                                                                             dtype=torch.long)
    lp = _t(per_token, grad=True)
    model = _Model({id(input_ids): lp, id(kl_ids): _t(kl_token)})
    trainer = _trainer(KTOTrainer, model=model, calculate_KL=True, precompute_ref_logps=True,
                       loss_type="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw)
    completion_mask = torch.cat([torch.zeros(B, 1), _t(mask)], 1).long()
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "KL_input_ids": kl_ids,
              "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": torch.cat([torch.zeros(B, 1), _t(kl_mask)], 1).long(),
              "label": torch.tensor(labels), "ref_logps": _t(ref), "ref_KL_logps": _t(ref_kl)}
    loss = trainer._compute_loss(model, inputs, False)
    loss.backward()

    def ours(per_token):
        losses, z, _ = kto.kto_loss(jnp.sum(per_token, -1), ref, jnp.sum(kl_token, -1), ref_kl,
                                    labels, jnp.ones(B), beta, dw, uw)
        return jnp.mean(losses), z
    (value, z), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(per_token))
    assert float(z) > 0 and abs(float(z) - trainer._metrics["train"]["kl"][0]) < 1e-5
    np.testing.assert_allclose(value, loss.item(), **TOL)
    np.testing.assert_allclose(np.asarray(grad) * mask, lp.grad.numpy() * mask, **TOL)


def test_kto_kl_estimate_is_clamped_at_zero_and_padding_rows_count_for_nothing():
    pol, ref = jnp.asarray([-3.0, -2.0, -5.0]), jnp.asarray([-2.5, -2.5, -1.0])
    losses, z, _ = kto.kto_loss(pol, ref, jnp.asarray([-9.0, -9.0, 0.0]),
                                jnp.asarray([-1.0, -1.0, 0.0]), jnp.asarray([1, 0, 1]),
                                jnp.asarray([1, 1, 0]), 0.1)
    assert float(z) == 0.0 and float(losses[2]) == 0.0


@pytest.mark.parametrize("margin", [False, True])
def test_reward_loss_equals_trl(margin):
    """RewardTrainer.compute_loss on the scores of [chosen; rejected] (and a margin)."""
    from trl.trainer.reward_trainer import RewardTrainer
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(2 * B, 1)).astype(np.float32) * 2
    margins = rng.uniform(0, 1, B).astype(np.float32)
    coef = 0.01
    logits = _t(scores, grad=True)
    model = types.SimpleNamespace(training=True)
    trainer = _trainer(RewardTrainer, model=model,
                       args=types.SimpleNamespace(center_rewards_coefficient=coef))
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = _t(margins)
    loss = trainer.compute_loss(lambda **kw: types.SimpleNamespace(logits=logits), inputs)
    loss.backward()

    def ours(s):
        losses, _ = reward.reward_loss(s[:B, 0], s[B:, 0], margins if margin else None, coef)
        return jnp.mean(losses)
    value, grad = jax.value_and_grad(ours)(jnp.asarray(scores))
    np.testing.assert_allclose(value, loss.item(), **TOL)
    np.testing.assert_allclose(grad, logits.grad.numpy(), **TOL)
    _, metrics = reward.reward_loss(jnp.asarray(scores[:B, 0]), jnp.asarray(scores[B:, 0]))
    np.testing.assert_allclose(jnp.mean(metrics["reward_accuracy"]),
                               trainer._metrics["train"]["accuracy"][0], **TOL)
    np.testing.assert_allclose(jnp.mean(metrics["reward_margin"]),
                               trainer._metrics["train"]["margin"][0], **TOL)
