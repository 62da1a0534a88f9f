"""Multi-token prediction (model.mtp_depth, DeepSeek-V3's sequential MTP modules): the
training loss against a numpy forward of the modules, and self-speculative decoding
(draft="mtp") against plain greedy decoding. HF import / export: tests/test_deepseek.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import InputError
from jaxlm.infer.generate import generate
from jaxlm.model import forward, model_specs
from jaxlm.model.config import MlaConfig, ModelConfig, MoeConfig, RopeConfig
from jaxlm.model.params import initialize
from jaxlm.train.step import loss_fn

DENSE = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=40, max_seq_len=32,
                    norm_eps=1e-6, rope=RopeConfig(theta=500.0), mtp_depth=2)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x [S, H, hd]: pairs (i, i + hd/2), as HF's rotate_half
    half = x.shape[-1] // 2
    ang = pos[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_block(p, x, pos, seg, cfg):
    """A pre-norm Llama layer in numpy over one row x [S, D]."""
    eps = cfg.norm_eps
    h = _rms(x, p["ln1"]["scale"], eps)
    q, k, v = (np.einsum("sd,dhk->shk", h, p["attn"][n]) for n in "qkv")
    q, k = _rope(q, pos, cfg.rope.theta), _rope(k, pos, cfg.rope.theta)
    scores = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(cfg.head_dim)
    s = len(x)
    allowed = (np.arange(s)[None] <= np.arange(s)[:, None]) & (seg[:, None] == seg[None])
    scores = np.where(allowed[None], scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    x = x + np.einsum("qhv,hvd->qd", np.einsum("hqs,shv->qhv", w, v), p["attn"]["o"])
    h = _rms(x, p["ln2"]["scale"], eps)
    g = h @ p["mlp"]["gate"]
    return x + (g / (1 + np.exp(-g)) * (h @ p["mlp"]["up"])) @ p["mlp"]["down"]


def _np_mtp_loss(params, cfg, hidden, batch):
    """DeepSeek-V3's L_MTP (before the weight): the mean over depths k of module k's
    cross-entropy sum on token t + 1 + k, over the batch's counted tokens, with each
    module run in numpy from the params (module 1 from the model's hidden states)."""
    p = jax.tree.map(np.asarray, params)
    tokens, targets, mask = (np.asarray(batch[n]) for n in ("tokens", "targets", "loss_mask"))
    pos, seg = np.asarray(batch["positions"]), np.asarray(batch["segment_ids"])
    b, s = tokens.shape
    total = 0.0
    h = np.asarray(hidden, np.float64)
    for k in range(cfg.mtp_depth):
        m = jax.tree.map(lambda a: a[k], p["mtp"])
        rows, ce = [], 0.0
        for r in range(b):
            ahead = np.arange(s) + k + 1
            inside = ahead < s
            tok = np.where(inside, tokens[r, np.minimum(ahead, s - 1)], 0)
            e = _rms(p["embed"]["tokens"][tok], m["enorm"]["scale"], cfg.norm_eps)
            x = np.concatenate([e, _rms(h[r], m["hnorm"]["scale"], cfg.norm_eps)], -1)
            x = _np_block(m["block"], x @ m["eh_proj"], pos[r], seg[r], cfg)
            rows.append(x)
            logits = _rms(x, m["norm"]["scale"], cfg.norm_eps) @ p["head"]["kernel"]
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            j = np.minimum(ahead, s - 1)
            tgt = targets[r, j]
            counted = inside & (mask[r, j] > 0) & (seg[r, j] == seg[r])
            ce += np.sum(np.where(counted, lse - logits[np.arange(s), tgt], 0.0))
        h = np.stack(rows)
        total += ce
    return total / cfg.mtp_depth / mask.sum()


def test_mtp_loss_equals_numpy_recomputation():
    """loss_fn's MTP term (plain logits and vocab-chunked) equals a numpy forward of both
    modules from the params, on a packed row (two documents: no target across them) and
    a padded one; the objective is the model's own loss plus that term times the weight."""
    cfg = DENSE
    params = initialize(model_specs(cfg), jax.random.key(3))
    rng = np.random.default_rng(0)
    s = 14
    toks = rng.integers(0, cfg.vocab_size, (2, s + 1))
    seg = np.array([[1] * 8 + [2] * 6, [1] * 10 + [0] * 4])
    pos = np.array([list(range(8)) + list(range(6)), list(range(10)) + [0] * 4])
    mask = (seg > 0).astype(np.float32)
    mask[0, 7] = 0  # the last token of the first document predicts nothing
    batch = {"tokens": jnp.array(toks[:, :-1]), "targets": jnp.array(toks[:, 1:]),
             "loss_mask": jnp.array(mask), "positions": jnp.array(pos),
             "segment_ids": jnp.array(seg)}
    hidden, _ = forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                        return_hidden=True)
    want = 0.3 * _np_mtp_loss(params, cfg, hidden, batch)
    logits = np.asarray(forward(params, cfg, batch["tokens"], batch["positions"],
                                batch["segment_ids"])[0], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    own = np.sum((lse - np.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0]) * mask)
    for chunk in (0, 16):
        objective, (loss_sum, n, extra) = loss_fn(params, cfg, batch, chunk, mtp_weight=0.3)
        assert float(n) == mask.sum()
        np.testing.assert_allclose(float(extra["mtp_loss"]) / float(n), want, rtol=2e-5)
        np.testing.assert_allclose(float(loss_sum), own, rtol=1e-5)  # the model's own loss
        np.testing.assert_allclose(float(objective), own / mask.sum() + want, rtol=2e-5)
    assert want > 0.1


# ------------------------------------------------------------ self-speculative decoding

LATENT = ModelConfig(
    vocab_size=53, d_model=32, n_layers=2, n_heads=4, d_ff=16, max_seq_len=64, norm_eps=1e-6,
    mla=MlaConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                  v_head_dim=5),
    moe=MoeConfig(n_experts=4, experts_per_token=2, router="sigmoid", n_groups=2,
                  topk_groups=1, n_shared=1, first_dense=1, dense_d_ff=24, routed_scale=2.5,
                  capacity_factor=0.0),
    mtp_depth=2)
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 35], [8, 9, 7, 9, 3, 2, 3, 8, 4]]


def _bigram(params, cfg):
    """params whose layers add nothing (o and down projections zero): the model's next
    token is a function of the current one. Module 1 reads only its token embedding
    (eh_proj [I; 0]), so it predicts what the model will say one token later: its drafts
    are right; module 2 keeps its random weights (partly wrong drafts)."""
    def zero(path, a):
        name = getattr(path[-1], "key", "")
        return jnp.zeros_like(a) if name in ("o", "down") else a
    out = jax.tree_util.tree_map_with_path(zero, params)
    d = cfg.d_model
    eh = out["mtp"]["eh_proj"].at[0].set(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]))
    return {**out, "mtp": {**out["mtp"], "eh_proj": eh}}


@pytest.fixture(scope="module")
def latent_params():
    return initialize(model_specs(LATENT), jax.random.key(1))


def test_self_speculative_greedy_equals_plain_greedy(latent_params):
    """draft="mtp" (the model's own two MTP modules, over the latent cache, contiguous and
    paged) emits plain greedy's tokens exactly, with drafts accepted (module 1's) and
    rejected (module 2's: random weights) along the way."""
    params = _bigram(latent_params, LATENT)
    plain = np.asarray(generate(params, LATENT, PROMPTS, max_new_tokens=13).tokens)
    rates = []
    for cache in ("contiguous", "paged"):
        out = generate(params, LATENT, PROMPTS, max_new_tokens=13, draft="mtp", cache=cache)
        np.testing.assert_array_equal(np.asarray(out.tokens), plain, err_msg=cache)
        assert 0 < out.stats["drafted"] <= 2 * out.stats["cycles"] * len(PROMPTS)
        rates.append(out.stats["acceptance_rate"])
    assert rates[0] == rates[1]
    assert 0.3 <= rates[0] < 0.9, rates  # module 1's drafts (a first cycle verifies none)


def test_self_speculation_bad_input_is_one_line(latent_params):
    no_mtp = dataclasses.replace(LATENT, mtp_depth=0)
    params = {k: v for k, v in latent_params.items() if k != "mtp"}
    with pytest.raises(InputError, match="model.mtp_depth > 0"):
        generate(params, no_mtp, PROMPTS, max_new_tokens=4, draft="mtp")
    with pytest.raises(InputError, match="num_speculative=3 is more than model.mtp_depth=2"):
        generate(latent_params, LATENT, PROMPTS, max_new_tokens=4, draft="mtp",
                 num_speculative=3)
    with pytest.raises(InputError, match="draft='eagle'"):
        generate(latent_params, LATENT, PROMPTS, max_new_tokens=4, draft="eagle")
