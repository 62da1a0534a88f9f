"""Training: data, objectives, the step, the loop, checkpoints."""

from ..lazy import submodule_getattr as _submodule_getattr

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
