"""Pure-function models over parameter pytrees."""

from .config import ModelConfig
from .families import forward, model_specs
from .layers.embeddings import head_weights, unembed
from .params import abstract, initialize, logical_axes


def init_params(cfg: ModelConfig, key):
    """Initialised parameters for cfg (unsharded; see jaxlm.sharding for sharded init)."""
    return initialize(model_specs(cfg), key)


__all__ = ["ModelConfig", "forward", "unembed", "head_weights", "model_specs", "init_params", "abstract", "initialize",
           "logical_axes"]

from ..lazy import submodule_getattr as _submodule_getattr  # noqa: E402

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
