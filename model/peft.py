"""LoRA adapters in Hugging Face peft's on-disk format.

    save_peft(dir, cfg, adapters, rank=r, alpha=a, base_model_name_or_path=...)

writes `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM) and
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained(hf_base, dir)`
loads. Key names: `base_model.model.<HF module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r], HF's (out, in) Linear layout, with the same
scale alpha / r as ours. Our adapters A [L, *in, r], B [L, r, *out] flatten
to A.reshape(in, r).T and B.reshape(r, out).T per layer, because our HF
import rules map each Linear by a plain reshape + transpose (llama, mistral,
qwen2, and mixtral's attention).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from ..errors import ConfigError

PEFT_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def hf_modules(cfg, model_type: str) -> dict[tuple[str, ...], str]:
    """Our parameter path -> HF module name template ("model.layers.{i}.self_attn.q_proj"),
    read from jaxlm.model.hf's import/export table. (The one place that knows the table.)"""
    from .hf import decoder
    return {r.path: r.key[: -len(".weight")] for r in decoder.rules(cfg, {"model_type": model_type})
            if r.key.endswith(".weight") and r.part is None and "{e}" not in r.key}


def _leaves(adapters, prefix=()):
    if set(adapters) == {"a", "b"}:
        yield prefix, adapters["a"], adapters["b"]
        return
    for k, v in adapters.items():
        yield from _leaves(v, prefix + (k,))


def peft_tensors(cfg, adapters, model_type: str) -> dict[str, np.ndarray]:
    """{peft key: float32 tensor} for every adapted weight and layer."""
    modules = hf_modules(cfg, model_type)
    out = {}
    for path, a, b in _leaves(adapters):
        if path not in modules or path[0] != "layers":
            raise ConfigError(f"save_peft: no {model_type} module for adapted weight "
                              f"{'/'.join(path)}")
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            name = "base_model.model." + modules[path].format(i=i)
            out[name + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[name + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out


def save_peft(directory, cfg, adapters, *, rank: int, alpha: float,
              base_model_name_or_path: str = "", model_type: str | None = None) -> pathlib.Path:
    """Write a peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    from .hf import infer_model_type
    model_type = model_type or infer_model_type(cfg)
    if model_type not in PEFT_TYPES:
        raise ConfigError(f"save_peft: model type {model_type!r} is not one of "
                          f"{', '.join(PEFT_TYPES)}")
    tensors = peft_tensors(cfg, adapters, model_type)
    modules = hf_modules(cfg, model_type)
    targets = sorted({modules[p].rsplit(".", 1)[-1] for p, _, _ in _leaves(adapters)})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
              "lora_alpha": float(alpha), "target_modules": targets, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}
    directory = pathlib.Path(os.fspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def save_lora_run(directory, cfg, adapters, base_model_name_or_path: str = ""):
    """save_peft with the run's train.lora.rank / train.lora.alpha (alpha 0: 2 * rank)."""
    t = cfg.train
    return save_peft(directory, cfg.model, adapters, rank=t.lora.rank,
                     alpha=t.lora.alpha or 2.0 * t.lora.rank,
                     base_model_name_or_path=base_model_name_or_path)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(directory) -> dict:
    """A peft LoRA adapter dir's adapter_config.json, checked for what jaxlm can read:
    plain LoRA (no DoRA, rsLoRA or per-module rank / alpha patterns)."""
    from ..errors import CheckpointError
    file = pathlib.Path(os.fspath(directory), ADAPTER_CONFIG)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file} is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                          "modules_to_save")
                   if config.get(k)]
    if unsupported:
        raise CheckpointError(f"{file}: {', '.join(unsupported)} is not supported (plain LoRA "
                              "adapters only)")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise CheckpointError(f"{file}: r={config.get('r')!r} is not a positive int")
    return config


def lora_settings(config: dict, cfg, model_type: str | None = None) -> dict:
    """train.lora's {rank, alpha, targets} of a peft adapter config for model `cfg`:
    target_modules (q_proj, ...) as the regex of our weight paths they name."""
    from .hf import infer_model_type
    modules = hf_modules(cfg, model_type or infer_model_type(cfg))
    wanted = config.get("target_modules") or []
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    paths = sorted("/".join(p) for p, m in modules.items()
                   if p[0] == "layers" and m.rsplit(".", 1)[-1] in wanted)
    if not paths:
        raise ConfigError(f"the adapter's target_modules {wanted} name no weight of this "
                          f"{cfg.family} model")
    return {"rank": int(config["r"]), "alpha": float(config.get("lora_alpha") or 0.0),
            "targets": "|".join(paths)}


def read_peft(directory, cfg, specs, model_type: str | None = None) -> dict:
    """The adapter tree (as `jaxlm.train.lora.lora_specs` shapes it: A [L, *in, r],
    B [L, r, *out]) of a peft adapter dir: the inverse of `peft_tensors`."""
    from safetensors.numpy import load_file

    from ..errors import CheckpointError
    from .hf import infer_model_type
    file = pathlib.Path(os.fspath(directory), ADAPTER_WEIGHTS)
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(str(file)).items()}
    modules = hf_modules(cfg, model_type or infer_model_type(cfg))
    out: dict = {}
    for path, a_spec, b_spec in _leaves(specs):
        a = np.zeros(a_spec.shape, np.float32)
        b = np.zeros(b_spec.shape, np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            name = "base_model.model." + modules[path].format(i=i)
            for part, dst in (("lora_A", a), ("lora_B", b)):
                t = tensors.get(f"{name}.{part}.weight")
                if t is None:
                    raise CheckpointError(f"{file}: tensor {name}.{part}.weight is missing")
                want = (r, dst[i].size // r) if part == "lora_A" else (dst[i].size // r, r)
                if t.shape != want:
                    raise CheckpointError(f"{file}: {name}.{part}.weight has shape "
                                          f"{list(t.shape)}, expected {list(want)}")
            a[i] = tensors[f"{name}.lora_A.weight"].T.reshape(a.shape[1:])
            b[i] = tensors[f"{name}.lora_B.weight"].T.reshape(b.shape[1:])
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"a": a, "b": b}
    return out
