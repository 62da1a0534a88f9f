"""Attention implementations behind one dispatcher (`attention`)."""

from jaxlm.model.kernels.dispatch import attention
from jaxlm.model.kernels.mask import MaskSpec

__all__ = ["attention", "MaskSpec"]
