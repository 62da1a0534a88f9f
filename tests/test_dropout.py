"""Dropout (model.dropout, model.attention_dropout) for BERT / T5 pretraining:
inverted (the mean is kept), keyed by (train.seed, step) so resume is exact,
off without a key (eval, generation) and bit-identical to no dropout at 0."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm
from jaxlm.errors import ConfigError
from jaxlm.model import forward, init_params, model_specs
from jaxlm.config import TrainConfig, load_config
from jaxlm.model.config import ModelConfig
from jaxlm.model.kernels import MaskSpec
from jaxlm.model.kernels.reference import attention_reference
from jaxlm.model.layers.dropout import dropout
from jaxlm.train.loop import train
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import dropout_key, eval_step, train_step
import tiny_models

# the shared tiny families, on the XLA reference attention (the one with dropout)
BERT = dataclasses.replace(tiny_models.BERT, attention_impl="xla")
T5 = dataclasses.replace(tiny_models.T5, attention_impl="xla")


def with_dropout(cfg, p=0.1, a=0.1):
    return dataclasses.replace(cfg, dropout=p, attention_dropout=a)


def tokens(b=2, s=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (b, s)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _run(cfg, params, key):
    keyed = {} if key is None else {"dropout_key": key}
    if cfg.family == "encoder_decoder":
        return forward(params, cfg, tokens(), tokens(seed=1), **keyed)[0]
    return forward(params, cfg, tokens(), **keyed)[0]


def run(cfg, params, key=None):
    return np.asarray(_run(cfg, params, key))


def test_inverted_dropout_keeps_the_mean():
    x = jnp.full((400_000,), 3.0)
    for rate in (0.1, 0.5):
        y = np.asarray(dropout(x, rate, jax.random.key(1)))
        dropped = np.mean(y == 0)
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / x.size)
        np.testing.assert_allclose(y[y != 0], 3.0 / (1 - rate), rtol=1e-6)
        # E[x'] = x: within 5 standard errors of the mean
        assert abs(y.mean() - 3.0) < 5 * y.std() / np.sqrt(x.size)
    assert dropout(x, 0.5, None) is x and dropout(x, 0.0, jax.random.key(1)) is x


def test_attention_probability_dropout_is_unbiased():
    """The mean over many keys of the dropped attention is the plain attention."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(3))
    plain = attention_reference(q, k, v, MaskSpec())
    keys = jax.random.split(jax.random.key(0), 4000)
    outs = jax.vmap(lambda key: attention_reference(q, k, v, MaskSpec(), dropout_rate=0.3,
                                                    dropout_key=key))(keys)
    assert not np.allclose(outs[0], plain, atol=1e-3)
    se = np.asarray(outs.std(0)) / np.sqrt(len(keys))
    assert np.all(np.abs(np.asarray(outs.mean(0) - plain)) < 5 * se + 1e-6)


@pytest.mark.parametrize("cfg", [BERT, T5], ids=["bert", "t5"])
def test_forward_dropout_is_keyed_and_off_without_a_key(cfg):
    params = init_params(cfg, jax.random.key(0))
    base = run(cfg, params)
    drop = with_dropout(cfg)
    np.testing.assert_array_equal(run(drop, params), base)  # eval / generation: no key
    np.testing.assert_array_equal(run(cfg, params, jax.random.key(3)), base)  # rate 0
    a = run(drop, params, jax.random.key(3))
    np.testing.assert_array_equal(run(drop, params, jax.random.key(3)), a)  # deterministic
    assert not np.allclose(a, base, atol=1e-4)
    assert not np.allclose(run(drop, params, jax.random.key(4)), a, atol=1e-4)
    only_attn = with_dropout(cfg, p=0.0, a=0.2)  # the attention dropout alone acts too
    assert not np.allclose(run(only_attn, params, jax.random.key(3)), base, atol=1e-4)


def test_dropout_config_is_validated():
    for bad in ({"dropout": 1.0}, {"attention_dropout": -0.1}):
        with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
            dataclasses.replace(BERT, **bad)
    with pytest.raises(ConfigError, match="encoder and encoder_decoder families"):
        ModelConfig(dropout=0.1)
    cfg = dataclasses.replace(with_dropout(BERT), attention_impl="pallas")
    with pytest.raises(ConfigError, match="needs the XLA reference attention"):
        run(cfg, init_params(cfg, jax.random.key(0)), jax.random.key(0))


def test_train_step_dropout_is_keyed_by_seed_and_step_and_eval_is_deterministic():
    cfg = with_dropout(BERT)
    tcfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-2)
    tx = make_optimizer(tcfg, model_specs(cfg))
    params = init_params(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       skipped=jnp.zeros((), jnp.int32))
    b = tokens(4, 12)
    batch = {"tokens": b, "targets": b, "positions": jnp.broadcast_to(jnp.arange(12), (4, 12)),
             "segment_ids": jnp.ones((4, 12), jnp.int32), "loss_mask": jnp.ones((4, 12))}

    @functools.lru_cache(maxsize=None)
    def compiled(mcfg, tc):
        return jax.jit(functools.partial(train_step, mcfg=mcfg, tx=tx, vocab_chunk=0, tcfg=tc,
                                         lr_schedule=learning_rate_schedule(tc)))

    def step(mcfg, tc, s):
        return jax.device_get(compiled(mcfg, tc)(s, batch)[1]["loss"])

    at = lambda n: state.replace(step=jnp.asarray(n, jnp.int32))
    loss0 = step(cfg, tcfg, at(0))
    assert step(cfg, tcfg, at(0)) == loss0  # the same (seed, step): the same masks
    assert step(cfg, tcfg, at(1)) != loss0  # another step: other masks
    # (the loss before the update depends on the step only through the masks: dropout is on)
    other_seed = dropout_key(cfg, dataclasses.replace(tcfg, seed=1), 0)
    assert not np.array_equal(jax.random.key_data(other_seed),
                              jax.random.key_data(dropout_key(cfg, tcfg, 0)))
    assert dropout_key(BERT, tcfg, 0) is None  # no dropout configured: no key
    evaluate = jax.jit(functools.partial(eval_step, mcfg=cfg, vocab_chunk=0, tcfg=tcfg))
    plain = jax.jit(functools.partial(eval_step, mcfg=BERT, vocab_chunk=0, tcfg=tcfg))
    first = jax.device_get(evaluate(params, batch))
    assert jax.device_get(evaluate(params, batch))[0] == first[0]  # eval: no dropout
    assert jax.device_get(plain(params, batch))[0] == first[0]


# ------------------------------------------------ a real run: resume is exact

@pytest.fixture(scope="module")
def tok(sp_tokenizer_file):
    return sp_tokenizer_file


def bert_cfg(tok, run_dir):  # vocab: the tokenizer's 512 ids + the reserved [MASK] id
    return load_config("tiny-bert", [
        "model.vocab_size=513", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.d_ff=64", "model.max_seq_len=64", "model.dropout=0.1",
        "model.attention_dropout=0.1", "model.attention_impl=xla", "data.seq_len=32",
        "data.batch_size=2", "data.max_docs=20", "data.shuffle_rows=64",
        "train.steps=6", "train.warmup_steps=1",
        "train.eval_every=100000", "train.eval_batches=1", "train.checkpoint_every=100000",
        "train.log_every=1", "mesh.devices=1", f"data.tokenizer={tok}", f"run_dir={run_dir}"])


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow  # covered by test_train_step_dropout_is_keyed_by_seed_and_step... above and
# test_train.py::test_resume_is_exact
def test_a_stopped_and_resumed_dropout_run_equals_an_uninterrupted_one(tok, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(bert_cfg(tok, a), stop_after=3, progress=False)
    train(bert_cfg(tok, a), resume=True, progress=False)
    train(bert_cfg(tok, b), progress=False)
    assert losses(a) == losses(b) and [s for s, _ in losses(a)] == list(range(1, 7))
    _, pa = jaxlm.load(a, step=6)
    _, pb = jaxlm.load(b, step=6)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
