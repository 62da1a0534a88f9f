"""Samplers against numpy: argmax, softmax frequencies, top-k and nucleus supports."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import InputError
from jaxlm.infer.sampling import greedy, sample

N = 20000  # draws per frequency test: one batch row per draw


@partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def jsample(logits, key, temperature=0.0, top_k=0, top_p=1.0):
    return sample(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def draws(logits, seed=0, **kw):
    """N draws from one distribution: counts per token, as frequencies."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, len(logits)))
    tokens = np.asarray(jsample(batch, jax.random.key(seed), **kw))
    assert tokens.dtype == np.int32 and tokens.shape == (N,)
    return np.bincount(tokens, minlength=len(logits)) / N


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(0, 2.0, size=(16, 1000)).astype(np.float32)


def test_greedy_is_argmax(logits):
    out = jsample(jnp.asarray(logits), jax.random.key(0))
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_greedy_equals_jnp_argmax_on_ties_infs_and_nans():
    """The first index of the max, and in a row with NaN the first NaN's (jnp.argmax's rule)."""
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(4, 12, 40)).astype(np.float32)  # many ties
    x[0, 0] = -np.inf
    x[0, 1, 5:] = np.inf
    x[0, 2, [7, 3, 30]] = np.nan
    x[0, 3] = np.nan
    x[0, 4, [39]] = np.nan
    x[0, 5, :2] = [-0.0, 0.0]
    x[0, 5, 2:] = -1.0
    x[1, :, 11] = np.nan  # a NaN after a tie
    got = jax.jit(greedy)(jnp.asarray(x))
    assert got.dtype == jnp.int32 and got.shape == (4, 12)
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


@pytest.mark.parametrize("vocab", [4096, 4099, 32000])
@pytest.mark.parametrize("case", ["finite", "infs", "nans"])
def test_chunked_greedy_equals_argmax(vocab, case):
    """From GREEDY_CHUNK_MIN ids greedy goes by chunks (a padded last chunk when the
    vocab is not a multiple): still the first max, and with a NaN anywhere in the
    batch the first NaN of each row that has one. XLA:CPU's max over a long row
    skips NaNs, so a row with its NaN after its max is the case that bites."""
    rng = np.random.default_rng(vocab)
    x = rng.integers(-3, 4, size=(2, 6, vocab)).astype(np.float32)  # ties in every chunk
    x[0, 0, :2], x[0, 0, 2:] = [-0.0, 0.0], -1.0
    x[0, 1, vocab - 1] = 9.0  # the max in the (padded) last chunk
    x[0, 2, 300:] = -np.inf
    if case != "finite":
        x[1, 0] = -np.inf
        x[1, 1, 5:] = np.inf
        x[1, 2, 200] = -np.inf
    if case == "nans":
        x[1, 3, [vocab - 3, 700]] = np.nan  # after the row's first max
        x[1, 4] = np.nan
        x[1, 5, 10], x[1, 5, vocab - 2] = 9.0, -np.nan
    got = jax.jit(greedy)(jnp.asarray(x))
    assert got.dtype == jnp.int32 and got.shape == (2, 6)
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_greedy(logits, temperature):
    out = jsample(jnp.asarray(logits), jax.random.key(1), temperature=temperature, top_k=1)
    np.testing.assert_array_equal(out, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    x = np.random.default_rng(1).normal(0, 1.5, size=20).astype(np.float32)
    freq = draws(x, temperature=temperature)
    assert np.abs(freq - softmax(x / temperature)).max() < 0.02


def test_top_k_samples_only_the_k_largest():
    x = np.random.default_rng(2).normal(0, 1.0, size=50).astype(np.float32)
    k = 5
    top = np.argsort(-x)[:k]
    freq = draws(x, temperature=1.0, top_k=k)
    assert set(np.flatnonzero(freq)) <= set(top)
    expected = np.zeros_like(freq)
    expected[top] = softmax(x[top])
    assert np.abs(freq - expected).max() < 0.02


def nucleus_logits():
    """Probabilities 0.5, 0.3, 0.1, 0.05, 0.05 placed at shuffled ids of a vocab of 12."""
    probs = np.full(12, 1e-9)
    ids = np.array([7, 2, 10, 0, 5])
    probs[ids] = [0.5, 0.3, 0.1, 0.05, 0.05]
    return np.log(probs).astype(np.float32), ids


def test_top_p_samples_only_the_nucleus():
    x, ids = nucleus_logits()
    freq = draws(x, temperature=1.0, top_p=0.75)  # 0.5 < 0.75 <= 0.8: nucleus = {ids 7, 2}
    assert set(np.flatnonzero(freq)) == {7, 2}
    assert abs(freq[7] - 0.5 / 0.8) < 0.02
    freq = draws(x, temperature=1.0, top_p=0.85)  # 0.8 < 0.85 <= 0.9: adds id 10
    assert set(np.flatnonzero(freq)) == {7, 2, 10}
    assert abs(freq[10] - 0.1 / 0.9) < 0.02


def test_top_p_always_keeps_the_top_token():
    x, _ = nucleus_logits()
    freq = draws(x, temperature=3.0, top_p=1e-6)
    assert freq[7] == 1.0


def test_top_k_then_top_p_on_the_renormalised_top_k():
    x, _ = nucleus_logits()
    # top-3 renormalised: 0.5/0.9, 0.3/0.9, 0.1/0.9 -> cumulative 0.556, 0.889: p=0.85 keeps 2
    freq = draws(x, temperature=1.0, top_k=3, top_p=0.85)
    assert set(np.flatnonzero(freq)) == {7, 2}
    freq = draws(x, temperature=1.0, top_k=3, top_p=0.95)
    assert set(np.flatnonzero(freq)) == {7, 2, 10}


def test_deterministic_for_a_key(logits):
    x = jnp.asarray(logits)
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    a = jsample(x, jax.random.key(3), **kw)
    b = jsample(x, jax.random.key(3), **kw)
    c = jsample(x, jax.random.key(4), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kw", [{}, {"top_k": 30}, {"top_p": 0.8}])
def test_per_row_keys_make_rows_independent(logits, kw):
    keys = jax.random.split(jax.random.key(5), 16)
    x = jnp.asarray(logits)
    batch = jsample(x, keys, temperature=1.0, **kw)
    alone = [int(jsample(x[i:i + 1], keys[i:i + 1], temperature=1.0, **kw)[0]) for i in (0, 9)]
    assert alone == [int(batch[0]), int(batch[9])]
    raw = jsample(x, jax.random.key_data(keys), temperature=1.0, **kw)  # [B, 2] uint32 keys
    np.testing.assert_array_equal(raw, batch)


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0},
                                {"top_p": 1.5}])
def test_bad_settings_raise(logits, kw):
    with pytest.raises(InputError):
        sample(jnp.asarray(logits), jax.random.key(0), **kw)
