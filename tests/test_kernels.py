"""Pallas attention kernels, GPU lowering in interpret mode, against the XLA reference.

Values and gradients (dq, dk, dv, dbias) over the shared case table, block
skipping, the dispatcher, and the memory check: the compiled train step with
the kernel holds no [seq, seq] array. The TPU lowering (TPU interpret mode),
decode attention and the model-level checks are in test_kernels_tpu.py.

Tolerances (inputs ~ N(0,1)), from tests/kernel_cases.py (TOLERANCE):
float32 output 2e-5 abs/rel, gradients 1e-4 (abs, times max |grad|) / 1e-4 rel;
bfloat16 output 3e-2, gradients 1e-1 / 5e-2 (the reference runs in float32).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.model.kernels import MaskSpec, attention, decode, dispatch, flash
from jaxlm.model.kernels.blocks import block_range, mask_arrays, visible_blocks
from jaxlm.model.kernels.flash import BlockSizes, flash_attention
from jaxlm.model.kernels.reference import attention_reference
from kernel_cases import (FLASH_CASES, INTERPRET, assert_close, flash_case,
                                         on_accelerator, packed_segments, random_qkv, vjp_both)

# Small, unequal tiles: several blocks per grid axis, different dq / dkv tilings.
BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                    block_k_dkv=16)


def gpu_flash(q, k, v, mask, bias, **kw):
    return flash_attention(q, k, v, mask, bias, backend="gpu", interpret=INTERPRET,
                           block_sizes=BLOCKS, **kw)


@pytest.mark.parametrize("name", list(FLASH_CASES))
def test_flash_gpu_matches_reference(name):
    q, k, v, do, bias, mask, kw = flash_case(name)
    out, grads, r_out, r_grads = vjp_both(gpu_flash, q, k, v, do, bias, mask, **kw)
    assert_close(out, grads, r_out, r_grads, q.dtype)


def test_flash_bias_gradient_only_when_bias_is_differentiated():
    """A constant bias (ALiBi) gets no [B,H,Sq,Sk] gradient buffer; a learned one (T5) does."""
    q, k, v, do, bias, mask, _ = flash_case("bias_grad_window")  # B=2, H=4, padded 37 -> 64
    dbias_buffer = "f32[2,4,64,64]"
    const = jax.make_jaxpr(jax.grad(lambda q: gpu_flash(q, k, v, mask, bias).sum()))(q)
    learned = jax.make_jaxpr(jax.grad(lambda q, b: gpu_flash(q, k, v, mask, b).sum(), (0, 1)))(
        q, bias)
    assert dbias_buffer not in str(const) and dbias_buffer in str(learned)


def test_flash_skips_hidden_blocks():
    """Keys in the blocks past kv_lengths are NaN: a block that was read would
    poison its rows (0 * NaN), forward and backward."""
    q, k, v, do = random_qkv(jax.random.key(3), 2, 20, 96, 2, 1, 64)
    mask = MaskSpec(kv_lengths=jnp.array([40, 5], jnp.int32))
    hidden = jnp.arange(96)[None, :, None, None] >= jnp.array([64, 32])[:, None, None, None]
    kp, vp = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)  # KV blocks <= 32
    out, grads, r_out, r_grads = vjp_both(gpu_flash, q, kp, vp, do, None, mask)
    _, _, r_out, r_grads = vjp_both(gpu_flash, q, jnp.where(hidden, 0, k),
                                    jnp.where(hidden, 0, v), do, None, mask)
    assert_close(out, grads[:3], r_out, r_grads[:3], jnp.float32)


@pytest.mark.parametrize("layout", ["causal", "window", "packed", "packed_window", "lengths"])
def test_block_ranges_are_exact_for_contiguous_layouts(layout):
    """The computed block range holds every block with a visible entry and,
    for these contiguous layouts, nothing else: hidden blocks are skipped."""
    b, s, bq, bk = 2, 96, 16, 32
    mask = {"causal": MaskSpec(causal=True),
            "window": MaskSpec(causal=True, window=20),
            "lengths": MaskSpec(causal=True, kv_lengths=jnp.array([96, 40]))}.get(layout)
    if layout.startswith("packed"):
        seg, pos = packed_segments(b, s, [[30, 40], [50, 10, 20]])
        mask = MaskSpec(causal=True, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                        kv_segment_ids=seg, window=20 if layout == "packed_window" else None)
    arrs = mask_arrays(mask, b, s, s, s, s)
    vis = visible_blocks(arrs, b=b, sq=s, sk=s, sq_pad=s, sk_pad=s, block_q=bq, block_k=bk,
                         causal=mask.causal, window=mask.window, self_attn=True)
    dense = jnp.broadcast_to(mask.visible(s, s), (b, s, s))
    exact = dense.reshape(b, s // bq, bq, s // bk, bk).any((2, 4))
    lo, hi = block_range(vis, 2)
    j = jnp.arange(s // bk)[None, None]
    in_range = (j >= lo[..., None]) & (j < hi[..., None])
    np.testing.assert_array_equal(in_range, exact)
    if layout == "causal":  # the upper triangle of blocks is never computed
        assert int(in_range.sum()) < in_range.size * 0.7


def test_softcap_reference_semantics():
    q, k, v, _ = random_qkv(jax.random.key(1), 1, 8, 8, 2, 2, 16)
    capped = attention_reference(q, k, v, MaskSpec(), softcap=1e6)
    np.testing.assert_allclose(capped, attention_reference(q, k, v, MaskSpec()), atol=1e-5)
    out = attention(q * 10, k, v, MaskSpec(causal=True), impl="pallas", softcap=2.0)
    np.testing.assert_allclose(out, attention_reference(q * 10, k, v, MaskSpec(causal=True),
                                                        softcap=2.0), atol=2e-5)


@pytest.mark.parametrize("sq,h,kvh", [(1, 4, 4), (1, 8, 2), (3, 4, 2)])
def test_heads_major_kv_matches_token_major(sq, h, kvh):
    """attention(kv_heads_major=True) on k, v [B,KVH,Sk,D] (a decode loop's per-layer
    cache) is the token-major call, for the XLA reference and the kernels."""
    q, k, v, _ = random_qkv(jax.random.key(2), 3, sq, 32, h, kvh, 16)
    lengths = jnp.array([5, 32, 17])
    mask = MaskSpec(causal=True, q_positions=lengths[:, None] - sq + jnp.arange(sq),
                    kv_positions=jnp.arange(32)[None], kv_lengths=lengths)
    want = attention_reference(q, k, v, mask, softcap=3.0)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    for impl in ("xla", "pallas"):
        got = attention(q, kh, vh, mask, impl=impl, softcap=3.0, kv_heads_major=True)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=impl)


# ------------------------------------------------------------ dispatcher

@pytest.mark.skipif(on_accelerator(), reason="checks the CPU choices")
def test_resolve_impl_on_cpu():
    assert dispatch.resolve_impl("auto") == "xla"
    assert dispatch.resolve_impl("pallas") == "pallas"
    assert dispatch.resolve_impl("xla") == "xla"
    with pytest.raises(ConfigError, match="needs a GPU") as e:
        dispatch.resolve_impl("cudnn")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not one of"):
        dispatch.resolve_impl("triton")


def test_dispatch_routes_decode_and_flash(monkeypatch):
    calls = []
    real_decode, real_flash = decode.decode_attention, flash.flash_attention
    monkeypatch.setattr(decode, "decode_attention",
                        lambda *a, **kw: calls.append("decode") or real_decode(*a, **kw))
    monkeypatch.setattr(flash, "flash_attention",
                        lambda *a, **kw: calls.append("flash") or real_flash(*a, **kw))
    q, k, v, _ = random_qkv(jax.random.key(2), 2, 1, 32, 4, 2, 64)
    lengths = jnp.array([3, 32], jnp.int32)
    decode_mask = MaskSpec(causal=True, q_positions=(lengths - 1)[:, None], kv_lengths=lengths)
    for mask, bias, want in [
        (decode_mask, None, "decode"),
        (decode_mask, jnp.zeros((1, 4, 1, 32)), "flash"),  # bias: flash
        (MaskSpec(causal=True), None, "flash"),  # no lengths: flash
        (decode_mask._replace(q_segment_ids=jnp.ones((2, 1), jnp.int32),
                              kv_segment_ids=jnp.ones((2, 32), jnp.int32)), None, "flash"),
    ]:
        calls.clear()
        out = attention(q, k, v, mask, bias, impl="pallas")
        assert calls == [want]
        np.testing.assert_allclose(out, attention_reference(q, k, v, mask, bias=bias), atol=2e-5)


def test_dispatch_rejects_traced_mask_flags():
    q, k, v, _ = random_qkv(jax.random.key(2), 1, 8, 8, 2, 2, 16)
    f = jax.jit(lambda q, m: attention(q, k, v, m, impl="pallas"))
    with pytest.raises(ValueError, match="MaskSpec.causal must be a Python value"):
        f(q, MaskSpec(causal=True))


def test_cudnn_support_check():
    q16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert dispatch.cudnn_supports(q16, MaskSpec(causal=True, window=4), None)
    assert not dispatch.cudnn_supports(q16, MaskSpec(causal=True), 30.0)  # softcap
    assert not dispatch.cudnn_supports(q16.astype(jnp.float32), MaskSpec(), None)
    assert not dispatch.cudnn_supports(q16, MaskSpec(kv_lengths=jnp.ones(1, jnp.int32)), None)
    assert not dispatch.cudnn_supports(q16, MaskSpec(window=4), None)  # window without causal


@pytest.mark.parametrize("plat", ["cpu", "gpu", "tpu"])
def test_auto_choice_per_platform(monkeypatch, plat):
    """auto: cudnn on GPU, splash on TPU, xla on CPU, and xla for calls the chosen
    kernel cannot express; explicit impls keep their meaning (backend name faked)."""
    monkeypatch.setattr(dispatch, "platform", lambda: plat)
    q16, k16 = jnp.zeros((1, 128, 4, 64), jnp.bfloat16), jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    causal, bias = MaskSpec(causal=True), jnp.zeros((1, 4, 128, 128))
    positions = MaskSpec(causal=True, q_positions=jnp.zeros((1, 128), jnp.int32),
                         kv_positions=jnp.zeros((1, 128), jnp.int32))
    pick = lambda impl, mask=causal, b=None, q=q16, k=k16, cap=None: dispatch.call_impl(
        impl, q, k, mask, b, cap)
    assert pick("auto") == {"cpu": "xla", "gpu": "cudnn", "tpu": "splash"}[plat]
    for mask, b in [(causal, bias), (positions, None),  # a bias (ALiBi, T5); explicit positions
                    (MaskSpec(causal=True, kv_lengths=jnp.ones(1, jnp.int32)), None)]:
        assert pick("auto", mask, b) == "xla"
    if plat == "gpu":
        assert pick("auto", q=q16.astype(jnp.float32)) == "xla"  # cudnn refuses float32
        assert pick("auto", cap=30.0) == "xla"
        assert pick("cudnn", positions) == "pallas"  # an explicit cudnn keeps its fallback
    if plat == "tpu":
        assert pick("auto", MaskSpec(causal=True, window=16)) == "splash"
        assert pick("auto", q=q16[:, :100], k=k16[:, :100]) == "xla"  # not whole 128 blocks
    assert pick("pallas") == "pallas" and pick("xla") == "xla"


def test_splash_wrapper_matches_reference_interpreted():
    """The TPU splash kernel as `auto` calls it (GQA repeat, q pre-scaled, window as a
    LocalMask, soft-cap), run in interpret mode on CPU."""
    q, k, v, _ = random_qkv(jax.random.key(3), 1, 128, 128, 4, 2, 32)
    mask = MaskSpec(causal=True, window=16)
    out = dispatch._splash(q, k, v, mask, None, 5.0, interpret=True)
    np.testing.assert_allclose(out, attention_reference(q, k, v, mask, softcap=5.0), atol=2e-5)

# ------------------------------------------------------------ memory

SEQ = 8192


def _compile(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile()


def _seq_by_seq_arrays(compiled, seq: int) -> set:
    """Array shapes in the optimised HLO with two or more dims >= seq."""
    shapes = set(re.findall(r"[a-z0-9]+\[[0-9,]+\]", compiled.as_text()))
    return {s for s in shapes if sum(int(d) >= seq for d in s[s.index("[") + 1:-1].split(",")) >= 2}


def test_compiled_flash_grad_holds_no_seq_by_seq_array():
    """Forward + backward at seq 8k, compiled (not run) on CPU: no [seq, seq]
    array, and the temporaries stay far below one; the XLA reference has both."""
    q = jax.ShapeDtypeStruct((1, SEQ, 2, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, SEQ, 1, 64), jnp.float32)
    mask = MaskSpec(causal=True)
    seq_sq = SEQ * SEQ * 4

    def grad_of(attn):
        return jax.grad(lambda q, k, v: attn(q, k, v).sum(), argnums=(0, 1, 2))

    kernel = _compile(grad_of(lambda q, k, v: flash_attention(
        q, k, v, mask, backend="gpu", interpret=INTERPRET)), q, kv, kv)
    reference = _compile(grad_of(lambda q, k, v: attention_reference(q, k, v, mask)), q, kv, kv)
    k_temp = kernel.memory_analysis().temp_size_in_bytes
    r_temp = reference.memory_analysis().temp_size_in_bytes
    print(f"\nseq {SEQ}: flash grad temp {k_temp / 2**20:.1f} MiB, reference "
          f"{r_temp / 2**20:.1f} MiB, one [seq, seq] f32 = {seq_sq / 2**20:.0f} MiB")
    assert not _seq_by_seq_arrays(kernel, SEQ) and _seq_by_seq_arrays(reference, SEQ)
    assert k_temp < seq_sq / 8 < seq_sq < r_temp


def test_compiled_train_step_with_pallas_holds_no_seq_by_seq_array():
    """The model's loss gradient (tiny decoder, impl=pallas, packed batch) at seq 8k."""
    from jaxlm.model import ModelConfig, abstract, model_specs
    from jaxlm.train.step import loss_fn

    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128,
                      max_seq_len=SEQ, attention_impl="pallas")
    params = abstract(model_specs(cfg))
    ints = jax.ShapeDtypeStruct((1, SEQ), jnp.int32)
    batch = {"tokens": ints, "targets": ints, "positions": ints, "segment_ids": ints,
             "loss_mask": jax.ShapeDtypeStruct((1, SEQ), jnp.float32)}
    step = _compile(jax.grad(lambda p, b: loss_fn(p, cfg, b)[0]), params, batch)
    temp = step.memory_analysis().temp_size_in_bytes
    print(f"\nseq {SEQ}: train-step gradient temp {temp / 2**20:.1f} MiB")
    assert not _seq_by_seq_arrays(step, SEQ)
    assert temp < SEQ * SEQ * 4 / 4
