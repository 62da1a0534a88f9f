"""Model building blocks: embeddings, positions, norms, attention, MLP, MoE."""

from ...lazy import submodule_getattr as _submodule_getattr

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
