"""The decode loop's fused projections (q|k|v and gate|up concatenated once per call,
model/layers/fused.py): with biases and int8 weights its logits equal a full no-cache
forward of the unfused model; LoRA-adapted weights and tensor-sharded outputs stay
unfused."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxlm.infer.generate import generate
from jaxlm.model import forward, init_params
from jaxlm.model.adapters import LoraWeight, QuantizedWeight
from jaxlm.model.layers.fused import fuse_layer
from jaxlm.model.quantize import quantize_params
from jaxlm.sharding.rules import use_mesh
import tiny_models

# Qwen-like: q/k/v biases, gated MLP with biases; init_std 0.2 for peaked logits
CFG = dataclasses.replace(tiny_models.LLAMA, qkv_bias=True, mlp_bias=True)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [40]]
NEW = 8
INT8 = dataclasses.replace(CFG, weight_dtype="int8")


def _randomize_biases(params):
    """Biases init to zeros: give them values so that a dropped or misplaced one shows."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(3)
    out = [jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)
           if str(path[-1]).endswith("_bias']") else x for path, x in leaves]
    return jax.tree_util.tree_unflatten(tree, out)


@functools.partial(jax.jit, static_argnums=2)
def _full_logits(params, tokens, cfg):  # no cache, unfused: the oracle
    return forward(params, cfg, tokens)[0]


@pytest.mark.parametrize("weights", ["float32", "int8", "nf4"])
def test_fused_decode_logits_equal_full_forward(weights):
    params = _randomize_biases(init_params(CFG, jax.random.key(0)))
    cfg = CFG
    if weights != "float32":  # nf4: packed codes and group scales fused along the output
        cfg = dataclasses.replace(CFG, weight_dtype=weights, quant_group=16)
        params = quantize_params(params, cfg)
    out = generate(params, cfg, PROMPTS, max_new_tokens=NEW, return_logits=True)
    for b, prompt in enumerate(PROMPTS):
        seq = np.zeros((1, 32), np.int32)
        full = prompt + out.tokens[b].tolist()
        seq[0, :len(full)] = full
        ref = np.asarray(_full_logits(params, jnp.asarray(seq), cfg))[0]
        ref = ref[len(prompt) - 1:len(prompt) - 1 + NEW]
        np.testing.assert_allclose(out.logits[b], ref, atol=2e-5, rtol=1e-5)
        assert out.tokens[b].tolist() == np.argmax(ref, -1).tolist()


def _layer(params):
    return jax.tree.map(lambda a: a[0], params["layers"])


def test_fuse_layer_concatenates_weights_scales_and_biases():
    params = _randomize_biases(init_params(CFG, jax.random.key(0)))
    layer = _layer(quantize_params(params, dataclasses.replace(CFG, weight_dtype="int8")))
    fused = fuse_layer(layer, CFG)
    attn, mlp = fused["attn"], fused["mlp"]
    assert not {"q", "k", "v", "q_bias"} & attn.keys() and not {"gate", "up"} & mlp.keys()
    qkv = attn["qkv"]
    assert isinstance(qkv, QuantizedWeight) and qkv.q.shape == (32, 4 + 2 + 2, 8)
    h = CFG.n_heads
    np.testing.assert_array_equal(qkv.q[:, h:h + 2], layer["attn"]["k"].q)
    np.testing.assert_array_equal(qkv.scale[:, h + 2:], layer["attn"]["v"].scale)
    np.testing.assert_array_equal(attn["qkv_bias"][:h], layer["attn"]["q_bias"])
    np.testing.assert_array_equal(mlp["gate_up"].q[:, CFG.d_ff:], layer["mlp"]["up"].q)
    np.testing.assert_array_equal(mlp["gate_up_bias"][:CFG.d_ff], layer["mlp"]["gate_bias"])


def test_lora_and_tensor_sharded_layers_stay_unfused():
    layer = _layer(init_params(CFG, jax.random.key(0)))
    lora = dict(layer, attn=dict(layer["attn"], q=LoraWeight(
        layer["attn"]["q"], jnp.zeros((32, 2)), jnp.zeros((2, 4, 8)), 1.0)))
    assert "qkv" not in fuse_layer(lora, CFG)["attn"]
    assert "gate_up" in fuse_layer(lora, CFG)["mlp"]
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("tensor",))
    with use_mesh(mesh, (("heads", ("tensor",)), ("mlp", ("tensor",)))):
        fused = fuse_layer(layer, CFG)
    assert fused["attn"].keys() == layer["attn"].keys()
    assert fused["mlp"].keys() == layer["mlp"].keys()
    with use_mesh(mesh, (("batch", ("tensor",)),)):  # outputs whole: fused
        assert "qkv" in fuse_layer(layer, CFG)["attn"]
