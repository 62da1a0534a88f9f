"""Gradient accumulation: k microbatches inside one step are exactly the full batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.model import init_params, model_specs
from jaxlm.config import TrainConfig
from jaxlm.model.config import ModelConfig
from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import microbatches, train_step

MCFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=16)


def batch_of(b=8, s=12, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 64, (b, s + 1)).astype(np.int32)
    mask = (rng.random((b, s)) < 0.7).astype(np.float32)  # uneven token counts per row
    mask[3] = 0.0  # a row with no counted token
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "segment_ids": np.ones((b, s), np.int32), "loss_mask": mask}


def one_step(k, batch, vocab_chunk):
    # eps 1e-4: Adam's first update lr * g / (|g| + eps) stays smooth for g near 0
    tcfg = TrainConfig(steps=2, warmup_steps=0, learning_rate=1e-2, grad_accum_steps=k,
                       eps=1e-4)
    tx = make_optimizer(tcfg, model_specs(MCFG))
    params = init_params(MCFG, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(functools.partial(train_step, mcfg=MCFG, tx=tx,
                                     lr_schedule=learning_rate_schedule(tcfg),
                                     vocab_chunk=vocab_chunk, tcfg=tcfg))
    return jax.device_get(step(state, batch))


def test_microbatches_take_strided_rows():
    x = np.arange(8)[:, None] * np.ones((1, 3), np.int32)
    parts = np.asarray(microbatches({"x": x}, 4)["x"])
    assert parts.shape == (4, 2, 3)
    np.testing.assert_array_equal(parts[1, :, 0], [1, 5])


def test_four_microbatches_of_two_equal_one_batch_of_eight():
    batch = batch_of()
    full_state, full = one_step(1, batch, vocab_chunk=0)
    accum_state, accum = one_step(4, batch, vocab_chunk=24)  # chunked loss inside the scan
    assert float(full["tokens"]) == float(batch["loss_mask"].sum()) == float(accum["tokens"])
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(accum[key], full[key], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
