"""Attention implementations behind one dispatcher (`attention`).

reference (XLA, the oracle) | flash (Pallas flash attention, fwd + bwd) |
decode (Pallas decode attention over a KV cache); GPU (Triton) and TPU
(Mosaic) lowerings in flash_gpu / flash_tpu / decode_gpu / decode_tpu.
"""

from .decode import decode_attention
from .dispatch import attention
from .flash import BlockSizes, flash_attention
from .mask import MaskSpec

__all__ = ["attention", "MaskSpec", "flash_attention", "decode_attention", "BlockSizes"]

from ...lazy import submodule_getattr as _submodule_getattr  # noqa: E402

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
