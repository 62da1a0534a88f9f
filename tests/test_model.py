"""The decoder against independent oracles: HF Llama, naive attention, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import forward, init_params, model_specs
from jaxlm.model.config import ModelConfig, RopeConfig
from jaxlm.model.kernels import MaskSpec, attention
from jaxlm.model.params import abstract, is_spec, logical_axes

SMALL = ModelConfig(vocab_size=101, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80,
                    max_seq_len=64, rope=RopeConfig(theta=500.0), norm_eps=1e-6)


@pytest.fixture(scope="module")
def params():
    return init_params(SMALL, jax.random.key(0))


def test_spec_trees_agree(params):
    specs = model_specs(SMALL)
    shapes = jax.tree.map(lambda s: s.shape, abstract(specs))
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    axes = jax.tree.leaves(logical_axes(specs))
    assert all(len(a) == len(s.shape) for a, s in zip(axes, jax.tree.leaves(specs, is_leaf=is_spec)))
    assert params["layers"]["attn"]["q"].shape == (2, 48, 6, 8)
    assert logical_axes(specs)["layers"]["attn"]["k"] == ("layers", "embed", "kv_heads", "head_dim")


def naive_attention(q, k, v, visible):
    """Per batch, per head loops in numpy; K/V heads repeated explicitly."""
    q, k, v = map(np.asarray, (q, k, v))
    b, sq, h, d = q.shape
    rep = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi // rep].T / np.sqrt(d)
            s = np.where(visible[bi], s, -np.inf)
            with np.errstate(invalid="ignore"):
                p = np.exp(s - s.max(-1, keepdims=True))
                p = p / p.sum(-1, keepdims=True)
            out[bi, :, hi] = np.nan_to_num(p) @ v[bi, :, hi // rep]
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_reference_attention_matches_naive_loop(kv_heads):
    kq, kk, kv = jax.random.split(jax.random.key(kv_heads), 3)
    q = jax.random.normal(kq, (2, 9, 6, 8))
    k = jax.random.normal(kk, (2, 9, kv_heads, 8))
    v = jax.random.normal(kv, (2, 9, kv_heads, 8))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 3]])
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 0], list(range(8)) + [0]])
    mask = MaskSpec(causal=True, q_positions=pos, kv_positions=pos,
                    q_segment_ids=seg, kv_segment_ids=seg)
    ours = attention(q, k, v, mask, impl="xla")
    i = np.arange(9)
    visible = np.zeros((2, 9, 9), bool)
    for b in range(2):
        s = np.asarray(seg[b])
        visible[b] = (s[:, None] == s[None, :]) & (s[:, None] != 0) & (i[None, :] <= i[:, None])
    np.testing.assert_allclose(ours, naive_attention(q, k, v, visible), atol=1e-5)
    assert not np.any(ours[0, 7:]), "padding rows see nothing"


def test_packed_documents_never_attend_across(params):
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 101, 7), rng.integers(0, 101, 5)
    tokens = jnp.array([np.concatenate([doc_a, doc_b, [0, 0]])])
    seg = jnp.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = jnp.array([list(range(7)) + list(range(5)) + [0, 0]])
    packed, _ = forward(params, SMALL, tokens, pos, seg)
    alone_a, _ = forward(params, SMALL, jnp.array([doc_a]))
    alone_b, _ = forward(params, SMALL, jnp.array([doc_b]))
    np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 7:12], alone_b[0], atol=1e-5)
    # Changing document A leaves document B's logits exactly as they were.
    other = tokens.at[0, :7].set(jnp.array((doc_a + 1) % 101))
    changed, _ = forward(params, SMALL, other, pos, seg)
    np.testing.assert_array_equal(changed[0, 7:12], packed[0, 7:12])


def to_hf_llama(params, cfg):
    """Our params -> a `LlamaForCausalLM` state dict (torch tensors)."""
    import torch
    t = lambda a: torch.tensor(np.asarray(a))
    d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    sd = {"model.embed_tokens.weight": t(params["embed"]["tokens"]),
          "model.norm.weight": t(params["final_ln"]["scale"]),
          "lm_head.weight": t(np.asarray(params["head"]["kernel"]).T)}
    L = params["layers"]
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        a = jax.tree.map(lambda x: np.asarray(x[i]), L)
        sd[pre + "self_attn.q_proj.weight"] = t(a["attn"]["q"].reshape(d, h * hd).T)
        sd[pre + "self_attn.k_proj.weight"] = t(a["attn"]["k"].reshape(d, kvh * hd).T)
        sd[pre + "self_attn.v_proj.weight"] = t(a["attn"]["v"].reshape(d, kvh * hd).T)
        sd[pre + "self_attn.o_proj.weight"] = t(a["attn"]["o"].reshape(h * hd, d).T)
        sd[pre + "mlp.gate_proj.weight"] = t(a["mlp"]["gate"].T)
        sd[pre + "mlp.up_proj.weight"] = t(a["mlp"]["up"].T)
        sd[pre + "mlp.down_proj.weight"] = t(a["mlp"]["down"].T)
        sd[pre + "input_layernorm.weight"] = t(a["ln1"]["scale"])
        sd[pre + "post_attention_layernorm.weight"] = t(a["ln2"]["scale"])
    return sd


def test_logits_match_transformers_llama(params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = SMALL
    # Random (non-unit) norm scales, so a mix-up of the norms would show.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1 + 0.1 * jax.random.normal(jax.random.key(7), x.shape))
        if "scale" in jax.tree_util.keystr(p) else x, params)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope.theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(to_hf_llama(params, cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _ = forward(params, cfg, jnp.array(tokens))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_tied_head_uses_the_embedding():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16,
                      tie_embeddings=True)
    p = init_params(cfg, jax.random.key(0))
    assert "head" not in p
    logits, _ = forward(p, cfg, jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(params, remat):
    import dataclasses
    tokens = jnp.array(np.random.default_rng(2).integers(0, 101, (2, 12)))
    def loss(p, cfg):
        return jnp.mean(forward(p, cfg, tokens)[0] ** 2)
    g0 = jax.grad(loss)(params, SMALL)
    g1 = jax.grad(loss)(params, dataclasses.replace(SMALL, remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "alibi", "t5_relative", "none"])
def test_every_position_scheme_decodes_like_the_full_forward(positions):
    """Any positions in the decoder: cached decoding equals the full forward."""
    import dataclasses
    from jaxlm.model.kv import Contiguous, init_cache
    cfg = dataclasses.replace(SMALL, positions=positions, relative_buckets=8, init_std=0.3, n_layers=1,
                              relative_max_distance=16, n_heads=6, n_kv_heads=6)
    p = init_params(cfg, jax.random.key(5))
    if positions == "t5_relative":  # a random (non-zero) bias table
        p["relative"]["table"] = jax.random.normal(jax.random.key(6), p["relative"]["table"].shape)
    tokens = jnp.array(np.random.default_rng(3).integers(0, 101, (2, 10)))
    fwd = jax.jit(forward, static_argnames="cfg")  # three compiles, not eager op by op
    full, _ = fwd(p, cfg, tokens)
    _, aux = fwd(p, cfg, tokens[:, :6], store=Contiguous.of(init_cache(cfg, 2, 16)))
    cache = aux["store"]
    for i in range(6, 10):
        step, aux = fwd(p, cfg, tokens[:, i:i + 1], store=cache)
        cache = aux["store"]
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5)
    # Positions matter: swapping two earlier tokens changes the last token's
    # logits, except without positions (one layer of attention is order-blind).
    swapped, _ = fwd(p, cfg, tokens[:, jnp.array([0, 1, 2, 3, 4, 5, 6, 8, 7, 9])])
    moved = np.abs(np.asarray(swapped[:, -1]) - np.asarray(full[:, -1])).max()
    assert (moved > 1e-4) == (positions != "none"), moved


def test_recording_store_keeps_every_layers_kv_as_the_cache_holds_it():
    """The Recording store attends as NoCache does (the same logits) and keeps each
    layer's K/V (after RoPE): what a prefill writes into a contiguous cache."""
    from jaxlm.model.kv import Contiguous, Recording, init_cache
    p = init_params(SMALL, jax.random.key(2))
    tokens = jnp.array(np.random.default_rng(4).integers(0, SMALL.vocab_size, (2, 7)))
    fwd = jax.jit(forward, static_argnames="cfg")
    plain, _ = fwd(p, SMALL, tokens)
    rec, aux = fwd(p, SMALL, tokens, store=Recording.create(SMALL, 2, 7))
    np.testing.assert_array_equal(np.asarray(rec), np.asarray(plain))
    _, cached = fwd(p, SMALL, tokens, store=Contiguous.of(init_cache(SMALL, 2, 16), fresh=True))
    kv = cached["store"].kv
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(getattr(aux["store"], name)),
                                   np.asarray(kv[name][:, :, :7]), atol=1e-6)
    assert float(jnp.abs(aux["store"].k).max()) > 0
