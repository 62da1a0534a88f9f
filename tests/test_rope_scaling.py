"""Long-context RoPE (`model.rope.scaling` = linear | dynamic | yarn) against
transformers: logits of a tiny Llama built with that rope_scaling, at a
sequence (40) longer than the original context (16), loaded from its config.json."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.model.config import ModelConfig, RopeConfig, YarnConfig  # noqa: E402
from jaxlm.model.layers.positions import rope_attention_factor, rope_frequencies  # noqa: E402

V, SEQ, ORIG = 97, 40, 16
TOKENS = np.random.default_rng(0).integers(0, V, (2, SEQ))
ROPES = {
    "linear": (dict(rope_type="linear", factor=2.5), 64),
    # HF's dynamic NTK starts past max_position_embeddings: 16 here
    "dynamic": (dict(rope_type="dynamic", factor=3.0), ORIG),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG,
                  beta_fast=16.0, beta_slow=2.0), 64),
    # mscale / mscale_all_dim ratio as the attention factor, no truncation
    "yarn_mscale": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG,
                         mscale=1.0, mscale_all_dim=0.5, truncate=False), 64),
}


def hf_llama(rope, max_pos):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": 10000.0, **rope}, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(ROPES))
def pair(request, tmp_path_factory):
    model = hf_llama(*ROPES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    cfg, params = jaxlm.load(str(path))
    return request.param, model, cfg, params


def ours(cfg, params, tokens=TOKENS):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = jaxlm.forward(params, cfg, jnp.asarray(tokens), positions)
    return np.asarray(logits)


def theirs(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def test_logits_match_transformers_past_the_original_context(pair):
    name, model, cfg, params = pair
    assert cfg.rope.scaling == name.split("_")[0]
    np.testing.assert_allclose(ours(cfg, params), theirs(model), atol=1e-4, rtol=0)
    # the scaling matters at this length: without it the logits differ
    plain = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, scaling="none"))
    assert np.abs(ours(plain, params) - theirs(model)).max() > 1e-3


def test_frequencies_and_attention_factor_are_transformers(pair):
    name, model, cfg, _ = pair
    rotary = model.model.rotary_emb
    assert rope_attention_factor(cfg) == pytest.approx(rotary.attention_scaling, rel=1e-6)
    if name != "dynamic":  # dynamic's buffer is the original one until a long call
        np.testing.assert_allclose(rope_frequencies(cfg), rotary.inv_freq.numpy(), rtol=1e-6)


def test_dynamic_within_the_original_context_is_plain_rope(pair):
    name, model, cfg, params = pair
    if name != "dynamic":
        pytest.skip("dynamic only")
    short = TOKENS[:, :ORIG]
    plain = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, scaling="none"))
    np.testing.assert_allclose(ours(cfg, params, short), ours(plain, params, short), atol=1e-6)
    # a fresh HF model: one that ran a long call keeps its grown base (HF's rotary
    # embedding is stateful, jaxlm's is not)
    fresh = hf_llama(*ROPES["dynamic"])
    np.testing.assert_allclose(ours(cfg, params, short), theirs(fresh, short), atol=1e-4)


def test_export_round_trip_through_transformers(pair, tmp_path):
    name, _, cfg, params = pair
    jaxlm.save(str(tmp_path), cfg, params, format="hf")
    rope = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == name.split("_")[0]
    again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(ours(cfg, params), theirs(again), atol=1e-4, rtol=0)


def test_bad_scaling_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"rope\.factor"):
        ModelConfig(rope=RopeConfig(scaling="linear", factor=0.5))
    with pytest.raises(ConfigError, match="beta_fast"):
        ModelConfig(rope=RopeConfig(scaling="yarn", yarn=YarnConfig(beta_fast=1.0, beta_slow=2.0)))
    with pytest.raises(ConfigError, match=r"not one of|rope\.scaling"):
        ModelConfig(rope=RopeConfig(scaling="ntk"))
