"""Inference: the engine, sampling, processors, guided, beam, speculative, batch-infer."""

from ..lazy import submodule_getattr as _submodule_getattr

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
