"""`jaxlm.load` / `jaxlm.save`: checkpoints as (ModelConfig, params)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model import hf, hf_bert, hf_t5, model_specs
from jaxlm.model.config import Config, DataConfig, ModelConfig
from jaxlm.model.params import abstract
from jaxlm.train import checkpoint
from jaxlm.train.loop import CONFIG_FILE, _write_config, read_run_config


def load(path: str, step: int | None = None) -> tuple[ModelConfig, dict]:
    """(model config, params) from a jaxlm run/checkpoint dir (latest step by default)
    or a Hugging Face directory (config.json + *.safetensors)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load: path must be a checkpoint directory (a str), "
                              f"got {type(path).__name__}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise CheckpointError(f"load: step must be a checkpoint step (an int >= 0), got {step!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint dir {path} does not exist")
    if not os.path.exists(os.path.join(path, CONFIG_FILE)):
        if hf.is_hf_checkpoint(path):
            return load_hf_any(path)
        if not os.path.exists(os.path.join(path, "config.json")) and any(
                name.endswith(".safetensors") for name in os.listdir(path)):
            raise CheckpointError(f"{path} looks like a Hugging Face dir (safetensors) but its "
                                  "config.json is missing")
    cfg = read_run_config(path).model
    params = checkpoint.restore_params(path, abstract(model_specs(cfg)), step)
    return cfg, params


def _chmod_umask(directory) -> None:
    """Modes of a fresh export as the user's umask makes them (dirs 0777, files
    0666, less the umask): tempfile.mkdtemp made it 0700 and its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


HF_LOADERS = {"bert": hf_bert.load_bert, "t5": hf_t5.load_t5,
              **{model_type: hf.load_hf for model_type in hf.SUPPORTED}}


def load_hf_any(path: str):
    """A Hugging Face directory of any supported model_type."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')} cannot be read as JSON: "
                              f"{e}") from None
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in HF_LOADERS:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(HF_LOADERS)})")
    try:
        return HF_LOADERS[model_type](path)
    except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type or value
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: a field has the wrong type "
                              f"or value ({detail})") from None


def save(path: str, cfg: ModelConfig | Config, params, format: str = "jaxlm") -> str:
    """Write params + config as a jaxlm checkpoint dir that `load` reads back, or
    (format="hf") as a Hugging Face directory that `transformers` loads."""
    if format == "hf":
        model_cfg = cfg.model if isinstance(cfg, Config) else cfg
        save_fn = {"encoder": hf_bert.save_bert,
                   "encoder_decoder": hf_t5.save_t5}.get(model_cfg.family, hf.save_hf)
        out = save_fn(path, model_cfg, params)
        _chmod_umask(out)  # the temporary dir it was written in is 0700
        return str(out / "config.json")
    if format != "jaxlm":
        raise ConfigError(f"save: unknown format {format!r} (supported: 'jaxlm', 'hf')")
    full = cfg if isinstance(cfg, Config) else Config(
        model=cfg, data=DataConfig(seq_len=min(DataConfig().seq_len, cfg.max_seq_len)))
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(full.model)))
    got = jax.tree.map(lambda a: a.shape, params)
    if expected != got:
        raise ConfigError("save: params do not match the config's parameter shapes")
    if checkpoint.latest_step(path) is not None:
        raise CheckpointError(f"save: {path} already holds a checkpoint; choose a new directory")
    os.makedirs(path, exist_ok=True)
    _write_config(dataclasses.replace(full, run_dir=path))
    mngr = checkpoint.manager(path, keep=1)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": params})))
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(path, CONFIG_FILE)
