"""Non-finite steps are skipped on device: a NaN batch leaves params and optimizer
state bit-identical, and training goes on with the next batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import model_specs
from jaxlm.config import TrainConfig
from jaxlm.errors import ConfigError
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import train_step
from tiny_models import LLAMA as MCFG

TCFG = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-2)


def batch_of(seed, nan=False, b=4, s=12):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 64, (b, s + 1)).astype(np.int32)
    mask = np.ones((b, s), np.float32)
    if nan:
        mask[1, 3] = np.nan  # one poisoned weight: the loss (and every gradient) is NaN
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "loss_mask": mask}


@pytest.fixture(scope="module")
def setup(tiny_llama):
    tx = make_optimizer(TCFG, model_specs(MCFG))
    params = tiny_llama.params
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(train_step, mcfg=MCFG, tx=tx,
                                     lr_schedule=learning_rate_schedule(TCFG), vocab_chunk=0,
                                     tcfg=TCFG))
    return state, step


def same(a, b, rtol=0.0, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_a_nan_batch_is_skipped_and_training_goes_on(setup):
    state, step = setup
    s1, m1 = jax.device_get(step(state, batch_of(1, nan=True)))
    assert not np.isfinite(m1["loss"])
    assert int(m1["skipped"]) == 1 and int(m1["consecutive_skipped"]) == 1
    assert int(s1.step) == 1 and int(s1.skipped) == 1
    same(s1.params, state.params)  # bit-identical
    same(s1.opt_state, state.opt_state)  # Adam's moments and count untouched

    s2, m2 = jax.device_get(step(s1, batch_of(2, nan=True)))
    assert int(m2["consecutive_skipped"]) == 2 and int(s2.skipped) == 2

    s3, m3 = jax.device_get(step(s2, batch_of(3)))  # a good batch: applied, count reset
    assert np.isfinite(m3["loss"]) and int(m3["skipped"]) == 0
    assert int(s3.skipped) == 0 and int(s3.step) == 3
    # oracle: the good batch applied to the untouched state at step 2
    want, wm = jax.device_get(step(state.replace(step=jnp.asarray(2, jnp.int32)), batch_of(3)))
    same(s3.params, want.params)
    same(s3.opt_state, want.opt_state)
    assert float(m3["loss"]) == float(wm["loss"])
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(s3.params), jax.tree.leaves(state.params))]
    assert all(changed)


def test_a_finite_step_is_unchanged_by_the_guard(setup):
    """The skip guard is a select: a finite step equals the plain optax update."""
    import optax
    state, step = setup
    batch = batch_of(4)
    got, _ = jax.device_get(step(state, batch))
    tx = make_optimizer(TCFG, model_specs(MCFG))

    def plain(params, opt_state):
        from jaxlm.train.step import loss_fn
        grads = jax.grad(lambda p: loss_fn(p, MCFG, batch)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.device_get(jax.jit(plain)(state.params, state.opt_state))
    # two programs, fused differently by XLA: equal up to float rounding (a few ulps;
    # an Adam step is ~1e-3 here)
    same(got.params, params, rtol=1e-6, atol=1e-8)
    same(got.opt_state, opt_state, rtol=1e-6, atol=1e-8)


def test_max_skipped_steps_is_validated():
    with pytest.raises(ConfigError, match="train.max_skipped_steps=0 must be > 0"):
        TrainConfig(max_skipped_steps=0)
