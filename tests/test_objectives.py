"""The chunked cross-entropy equals the plain one, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.train.objectives import causal_lm_loss, chunked_lm_loss


def numpy_loss(hidden, w, targets, mask):
    logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), w.astype(np.float64))
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * mask).sum(), mask.sum()


@pytest.mark.parametrize("vocab, chunk", [(96, 32), (101, 32), (101, 4096), (50, 7)])
def test_chunked_loss_matches_plain(vocab, chunk):
    rng = np.random.default_rng(vocab + chunk)
    hidden = rng.normal(size=(2, 9, 16)).astype(np.float32)
    w = rng.normal(size=(16, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (2, 9))
    mask = (rng.random((2, 9)) > 0.3).astype(np.float32)
    expected, count = numpy_loss(hidden, w, targets, mask)
    got, got_count = chunked_lm_loss(hidden, w, targets, mask, chunk)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got_count == count

    def plain(h, w):
        return causal_lm_loss(jnp.einsum("btd,dv->btv", h, w), targets, mask)[0]

    def chunked(h, w):
        return chunked_lm_loss(h, w, targets, mask, chunk)[0]

    g_plain = jax.grad(plain, argnums=(0, 1))(hidden, w)
    g_chunked = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    for a, b in zip(g_plain, g_chunked):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Masked tokens get no gradient at all.
    dh = np.asarray(g_chunked[0])
    assert not np.any(dh[mask == 0])
