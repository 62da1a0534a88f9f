"""Attention implementations behind one dispatcher (`attention`).

reference (XLA, the oracle) | flash (Pallas flash attention, fwd + bwd) |
decode (Pallas decode attention over a KV cache); GPU (Triton) and TPU
(Mosaic) lowerings in flash_gpu / flash_tpu / decode_gpu / decode_tpu.
"""

from jaxlm.model.kernels.decode import decode_attention
from jaxlm.model.kernels.dispatch import attention
from jaxlm.model.kernels.flash import BlockSizes, flash_attention
from jaxlm.model.kernels.mask import MaskSpec

__all__ = ["attention", "MaskSpec", "flash_attention", "decode_attention", "BlockSizes"]
