"""The compiled decode loop reads each layer's weights and KV cache without a
layout-changing copy per step (issue 9), checked on the optimised HLO of the
loop's while body: no materialised op there has the shape of a layer's MLP
weight (a copy out of the stacked weights), and none with a per-layer cache's
element count has a shape other than the cache's own head-major row-major order
[B,KVH,T,D] (merging adjacent dims is a bitcast; [B,T,KVH,D] or [KVH,D,T] would be
a transposed copy of it), and the only ones of that size are the cache's in-place
writes (a slice of layer i out of a stacked [L, ...] carry is a copy per layer
per step: the loop carries the cache split per layer instead)."""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from jaxlm.infer.engine import Engine
from jaxlm.model import ModelConfig, init_params
from jaxlm.config import GenerateConfig

# distinct sizes: d_model*d_ff = 3072, per-layer cache B*KVH*T*D = 2*2*64*8 = 2048
CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=64, dtype="float32", param_dtype="float32")
B, T = 2, 64
CACHE = (B, CFG.n_kv_heads, T, CFG.head_dim)  # head-major (infer.cache)

_OP = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]\{[\d,]*\} ([\w\-]+)\(")
_SKIP = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}


def _while_body_ops(hlo: str):
    """(shape, opcode, name) of each materialised instruction of the while bodies
    (instructions inside fusion computations are not materialised)."""
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    out = []
    for comp in re.split(r"\n(?=(?:ENTRY )?%\S+ [^\n]*\{\n)", hlo):
        if comp.split(" ", 1)[0].lstrip() not in bodies:
            continue
        for m in _OP.finditer(comp):
            if m.group(3) not in _SKIP:
                out.append((tuple(int(d) for d in m.group(2).split(",") if d), m.group(3),
                            m.group(1)))
    return out


def _merges_of(shape, own) -> bool:
    """Whether `shape` (1s dropped) is `own` with adjacent dims merged: a bitcast of it."""
    shape, own = [d for d in shape if d != 1], [d for d in own if d != 1]
    i = 0
    for d in shape:
        n = 1
        while n < d and i < len(own):
            n *= own[i]
            i += 1
        if n != d:
            return False
    return i == len(own)


@pytest.fixture(scope="module")
def body_ops():
    params = init_params(CFG, jax.random.key(0))
    engine = Engine(params, CFG, settings=GenerateConfig(max_new_tokens=8), max_prompt_len=8,
                    max_new_tokens=8, slots=B, cache="contiguous", max_len=T)
    hlo = engine.lower().compile().as_text()
    ops = _while_body_ops(hlo)
    assert ops, "no while body found in the compiled decode loop"
    return ops


def test_merges_of():
    b, h, t, d = CACHE
    assert _merges_of((1, b * h, t * d), CACHE) and _merges_of((b * h * t, d), CACHE)
    assert not _merges_of((b, t, h, d), CACHE) and not _merges_of((b * h, d, t), CACHE)
    assert not _merges_of((b * t, h, d), CACHE)


def test_no_layer_weight_copied_per_step(body_ops):
    weight = CFG.d_model * CFG.d_ff
    assert [op for op in body_ops if math.prod(op[0]) in (weight, 2 * weight)] == []  # gate|up


def test_no_transposed_cache_copy_per_step(body_ops):
    n = math.prod(CACHE)
    bad = [op for op in body_ops if math.prod(op[0]) == n and not _merges_of(op[0], CACHE)]
    assert bad == []


def test_no_cache_slice_copied_per_step(body_ops):
    """Each layer's K and V are written in place (a scatter into its own buffer) and
    read where they are: nothing else of a per-layer cache's size is materialised."""
    n = math.prod(CACHE)
    sized = [op for op in body_ops if math.prod(op[0]) == n]
    writes = [op for op in sized if "scatter" in op[2] or "dynamic-update-slice" in op[2]]
    assert len(writes) == 2 * CFG.n_layers  # k and v of each layer: the check sees them
    assert [op for op in sized if op not in writes] == []
