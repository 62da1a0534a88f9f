"""Pallas flash attention, TPU lowering (Mosaic kernels) in TPU interpret mode.

TPU interpret mode (`pltpu.InterpretParams()`) runs the Mosaic kernels on CPU,
simulating VMEM / SMEM, scalar prefetch and the grid pipeline. Same case table
and tolerances as test_kernels.py (kernel_cases.py).
"""

import jax
import pytest

from jaxlm.model.kernels.flash import BlockSizes, flash_attention
from kernel_cases import FLASH_CASES, INTERPRET, assert_close, flash_case, vjp_both

pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu",
                                reason="the TPU lowering runs on a TPU or interpreted on CPU")

UNIFORM = BlockSizes.uniform(32)  # fewer grid steps: TPU interpret mode is slow
MIXED = BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                   block_k_dkv=16)


def tpu_flash(blocks):
    def fn(q, k, v, mask, bias, **kw):
        return flash_attention(q, k, v, mask, bias, backend="tpu", interpret=INTERPRET,
                               block_sizes=blocks, **kw)
    return fn


# The largest case (130 rows, GQA 8, head_dim 128) is ~10 s in TPU interpret mode: it runs
# under -m slow; the smaller causal / GQA / d128 cases here and its GPU-lowering twin in
# test_kernels.py stay in the default run.
_SLOW_TPU = {"causal_len130_gqa8_d128"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in _SLOW_TPU
                                               else []) for n in FLASH_CASES])
def test_flash_tpu_matches_reference(name):
    q, k, v, do, bias, mask, kw = flash_case(name)
    assert_close(*vjp_both(tpu_flash(UNIFORM), q, k, v, do, bias, mask, **kw), q.dtype)


@pytest.mark.parametrize("name", ["packed_segments_gqa2", "bias_grad_window"])
def test_flash_tpu_unequal_tiles(name):
    """Forward, dq and dk/dv passes with different tilings (their block ranges differ)."""
    q, k, v, do, bias, mask, kw = flash_case(name)
    assert_close(*vjp_both(tpu_flash(MIXED), q, k, v, do, bias, mask, **kw), q.dtype)
