"""jaxlm: a functional transformer framework for JAX.

    import jaxlm
    cfg, params = jaxlm.load("runs/tiny-llama")       # a jaxlm run dir or an HF dir
    cfg, params = jaxlm.load(path, mesh=mesh)         # every leaf loaded into its sharding
    logits, aux = jaxlm.forward(params, cfg, tokens)
    vectors = jaxlm.embed(params, cfg, tokens, mask)  # encoders: [B, D] masked-mean pooled
    scores = jaxlm.classify(params, cfg, tokens, mask)  # *ForSequenceClassification: [B, N]
    out = jaxlm.generate(params, cfg, [[1, 5, 9]], max_new_tokens=64)
    out = jaxlm.generate(params, cfg, ["def f"], tokenizer=tok, max_new_tokens=64)  # out.texts
    out = jaxlm.generate_many(params, cfg, prompts, max_new_tokens=[64, 8], slots=8)  # paged
    out = jaxlm.score(params, cfg, ["The sky is"], [" blue"], tokenizer=tok)  # lm-eval's loglikelihood
    jaxlm.save("exported", cfg, params)
    tok = jaxlm.load_tokenizer("runs/tiny-llama")

Names are imported on first use, so `import jaxlm` (and `jaxlm --help`) stay fast.
"""

import importlib

from .errors import CheckpointError, ConfigError, InputError, JaxlmError
from .lazy import submodule_getattr

_submodule = submodule_getattr(__name__)

_LAZY = {
    "load": "jaxlm.api", "save": "jaxlm.api",
    "model_config_of": "jaxlm.api", "load_params": "jaxlm.api",
    "forward": "jaxlm.validate", "init_params": "jaxlm.validate", "ModelConfig": "jaxlm.model",
    "generate": "jaxlm.infer.text",
    "generate_many": "jaxlm.infer.generate",
    "score": "jaxlm.infer.score",
    "embed": "jaxlm.validate", "classify": "jaxlm.validate",
    "load_tokenizer": "jaxlm.model.tokenizer",
    "Config": "jaxlm.config", "load_config": "jaxlm.config",
}

__all__ = sorted(_LAZY) + ["JaxlmError", "ConfigError", "CheckpointError", "InputError"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    return _submodule(name)  # jaxlm.model, jaxlm.infer.text, ...


def __dir__():
    return __all__
