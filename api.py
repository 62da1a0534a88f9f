"""`jaxlm.load` / `jaxlm.save`: checkpoints as (ModelConfig, params).

Both kinds of directories work everywhere: a jaxlm run/checkpoint dir
(`config.yaml` + `checkpoints/<step>/`, orbax) and a Hugging Face dir
(`config.json` + `*.safetensors`). Fine-tuning (`train.init_from`) reads one as

    cfg = model_config_of(path)                 # then allowed overrides (dtype, remat, ...)
    params = load_params(path, cfg, shardings)  # straight into the train state's shardings
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from .errors import CheckpointError, ConfigError, InputError
from .model import hf, qformat, quantize
from .config import Config, DataConfig, LoraConfig, MeshConfig, TrainConfig
from .model.companions import copy_companions
from .model.config import ModelConfig
from .model.params import Spec, abstract
from .train import checkpoint
from .train.loop import CONFIG_FILE, _write_config, read_run_config


def checkpoint_kind(path) -> str:
    """"jaxlm", "hf" or "peft" (a LoRA adapter dir); CheckpointError (one line) for a missing dir or one that is neither."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load: path must be a checkpoint directory (a str), "
                              f"got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint dir {path} does not exist")
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return "jaxlm"
    if hf.is_hf_checkpoint(path):
        return "hf"
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "peft"
    if not os.path.exists(os.path.join(path, "config.json")) and any(
            name.endswith(".safetensors") for name in os.listdir(path)):
        raise CheckpointError(f"{path} looks like a Hugging Face dir (safetensors) but its "
                              "config.json is missing")
    raise CheckpointError(f"{path} is neither a jaxlm run dir ({CONFIG_FILE} is missing) nor a "
                          "Hugging Face dir (no config.json with a model_type)")


def model_config_of(path, init_from: str | None = None) -> ModelConfig:
    """The ModelConfig of a jaxlm run dir (its config.yaml), an HF dir (its config.json;
    param_dtype and dtype float32) or a peft adapter dir (its base's; `init_from`: a
    base dir other than the one it names). Reads no weights."""
    kind = checkpoint_kind(path)
    if kind == "peft":
        return model_config_of(peft_base(path, init_from))
    if kind == "hf":
        try:
            return hf.model_config(path)
        except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type or value
            detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"{os.path.join(os.fspath(path), 'config.json')}: a field has "
                                  f"the wrong type or value ({detail})") from None
    return read_run_config(os.fspath(path)).model


def load_params(path, cfg: ModelConfig, shardings=None, step: int | None = None, *,
                init_from: str | None = None, accept_base_change: bool = False):
    """The params of a jaxlm run dir (step: default the latest) or an HF dir, shaped and
    typed as `cfg` says (weights cast to cfg.param_dtype).

    shardings: None (default device) or a tree of Shardings matching the params:
    every leaf is then read straight into its sharding (orbax restore args for a
    run dir; per-device slices of the safetensors for an HF dir), never gathered
    whole on one process. CheckpointError (one line) for a missing dir, a dir that
    is neither kind, a missing tensor or one whose shape does not match cfg.

    A LoRA run dir or a peft adapter dir is read over its base, merged:
    init_from points to a moved base (its weights digest must match the run's
    base.json, see `jaxlm.train.base`), accept_base_change takes a changed one.
    """
    base = {"init_from": init_from, "accept_base_change": accept_base_change}
    kind = checkpoint_kind(path)
    if kind == "peft":
        return _peft_params(os.fspath(path), cfg, shardings, **base)
    # an HF dir: float, or GPTQ / AWQ int4 (its config.json's quantization_config)
    stored = read_run_config(os.fspath(path)).model if kind == "jaxlm" else \
        hf.model_config(path)
    if _weight_format(stored) != _weight_format(cfg):  # quantized from float weights, ...
        return _convert_weights(path, cfg, stored, shardings, step, base)
    if kind == "hf":
        if step is not None:
            raise CheckpointError(f"{path} is a Hugging Face dir: it has no steps (step={step})")
        return hf.load_hf(path, cfg=cfg, shardings=shardings)[1]
    run = read_run_config(os.fspath(path))
    if run.train.lora.rank:
        return _lora_run_params(os.fspath(path), run, cfg, shardings, step, **base)
    tree = checkpoint.restore_params(os.fspath(path), quantize.storable(
        quantize.params_abstract(cfg)), step, shardings=quantize.storable(shardings),
        under=_policy_key(run))
    return quantize.from_storable(tree, quantize.params_specs(cfg))


def _weight_format(mcfg) -> tuple:
    """How a checkpoint stores its layer matmul weights: (weight_dtype, group size for
    the group-wise formats); ("", 0) for float weights (and Hugging Face dirs)."""
    if mcfg is None or not mcfg.weight_dtype:
        return ("", 0)
    grouped = mcfg.weight_dtype not in qformat.PER_CHANNEL
    return (mcfg.weight_dtype, mcfg.quant_group if grouped else 0)


def _convert_weights(path, cfg: ModelConfig, stored, shardings, step, base: dict):
    """Params of `cfg` from a checkpoint whose weights are stored in another format
    (float, or another weight_dtype / quant_group): load as stored, then dequantize and
    quantize as `cfg` says (under jit, into `shardings`)."""
    from .model.adapters import QuantizedWeight
    from .model.config import dtype_of
    fmt, group = _weight_format(stored)
    src = dataclasses.replace(cfg, weight_dtype=fmt, quant_group=group or cfg.quant_group)
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    if shardings is None:
        src_shardings = None
    else:  # a weight shards like its codes in any format; the small scales are replicated
        plain = jax.tree.map(lambda s: s.q if is_q(s) else s, shardings, is_leaf=is_q)
        src_shardings = jax.tree.map(_shards_like_codes, quantize.params_specs(src), plain,
                                     is_leaf=lambda x: is_q(x) or isinstance(x, Spec))
    params = load_params(path, src, src_shardings, step, **base)
    dt = dtype_of(cfg.param_dtype)

    def fn(p):
        p = quantize.dequantize_params(p, dt)
        return quantize.quantize_params(p, cfg) if cfg.weight_dtype else p
    return (jax.jit(fn) if shardings is None else jax.jit(fn, out_shardings=shardings))(params)


def _shards_like_codes(spec, sharding):
    """A stored QuantizedWeight's shardings: its codes like the float weight, the rest
    (scales, zero points) replicated; plain leaves' unchanged."""
    from .model.adapters import QuantizedWeight
    if not isinstance(spec, QuantizedWeight):
        return sharding
    rep = _replicated(sharding)
    return dataclasses.replace(spec, q=sharding, scale=rep,
                               zero=None if spec.zero is None else rep,
                               scale2=None if spec.scale2 is None else rep)


def _replicated(sharding):
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return sharding
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _policy_key(run: Config) -> str | None:
    """Where a run's checkpoints hold the model's params: a PPO run's params are
    {"policy": ..., "value": the value model's} (train/state.py); others: the params."""
    return "policy" if run.train.objective == "ppo" else None


def lora_adapters(path, step: int | None = None):
    """(run config, adapters) of a LoRA run dir (train.lora.rank > 0): the A/B tree
    its checkpoint holds (the base is not in it: train.init_from names it)."""
    from .train import lora
    path = os.fspath(path)
    if checkpoint_kind(path) != "jaxlm" or not read_run_config(path).train.lora.rank:
        raise CheckpointError(f"{path} is not a LoRA run dir (train.lora.rank > 0)")
    run = read_run_config(path)
    adapters = checkpoint.restore_params(path, abstract(lora.lora_specs(run.model, run.train)),
                                         step, under=_policy_key(run))
    return run, adapters


def peft_base(path, init_from: str | None = None) -> str:
    """The base dir of a peft adapter dir: `init_from`, else its adapter_config.json's
    base_model_name_or_path, which must be a local directory (no hub)."""
    from .model.peft import read_adapter_config
    base = init_from or read_adapter_config(path).get("base_model_name_or_path") or ""
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{path} is a peft adapter over base_model_name_or_path="
                              f"{base!r}, which is not a local directory: point to the base "
                              "with train.init_from=DIR (init_from=DIR in Python)")
    return base


def companions_dir(path, init_from: str | None = None) -> str:
    """Where a checkpoint's tokenizer, chat template and generation_config.json are: the
    dir itself, or for a peft adapter dir without a tokenizer (peft saves none) its base."""
    path = os.fspath(path)
    if checkpoint_kind(path) != "peft" or any(
            os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model")):
        return path
    return peft_base(path, init_from)


def _peft_params(path: str, cfg: ModelConfig, shardings, init_from: str | None = None,
                 accept_base_change: bool = False):
    """A peft adapter dir's params: its base with the adapters merged in."""
    from .model.peft import lora_settings, read_adapter_config, read_peft
    from .train import lora
    base_dir = peft_base(path, init_from)
    settings = lora_settings(read_adapter_config(path), cfg)
    tcfg = TrainConfig(lora=LoraConfig(**settings))
    adapters = read_peft(path, cfg, lora.lora_specs(cfg, tcfg))
    base = load_params(base_dir, cfg, shardings, accept_base_change=accept_base_change)
    run = types.SimpleNamespace(model=cfg, train=tcfg)  # what merge_lora reads
    merge = jax.jit(lambda b, a: lora.merge_lora(b, a, run), out_shardings=shardings)
    return merge(base, adapters)


def _lora_run_params(path: str, run: Config, cfg: ModelConfig, shardings, step,
                     init_from: str | None = None, accept_base_change: bool = False):
    """A LoRA run's params: its base (train.init_from, checked against base.json) with
    the adapters merged in."""
    from .train import base as pinned, lora
    base_dir, base_step, _ = pinned.resolve(path, run.train.init_from, init_from,
                                            accept_base_change)
    base = load_params(base_dir, run.model, shardings, base_step)
    _, adapters = lora_adapters(path, step)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model,
                                                             param_dtype=cfg.param_dtype))
    merge = jax.jit(lambda b, a: lora.merge_lora(b, a, run), out_shardings=shardings)
    return merge(base, adapters)


def load(path, cfg: ModelConfig | None = None, mesh=None, rules=None,
         param_dtype: str | None = None, dtype: str | None = None,
         step: int | None = None, *, init_from: str | None = None,
         accept_base_change: bool = False) -> tuple[ModelConfig, dict]:
    """(model config, params) from a jaxlm run/checkpoint dir or a Hugging Face dir.

    cfg: the config to load into (default `model_config_of(path)`: the run's
      config, or for an HF dir its config.json with float32 weights and
      activations); its parameter shapes must match the checkpoint.
    param_dtype / dtype: override the config's (e.g. "bfloat16" to keep a bf16
      HF checkpoint in bf16; the default float32 holds it exactly).
    mesh: a `jax.sharding.Mesh` (axes data/fsdp/expert/tensor, e.g. from
      `jaxlm.sharding.mesh.make_mesh`): every leaf is loaded directly into the
      NamedSharding its logical axes ask for under `rules` (default: the mesh
      config's rules, `jaxlm.config.DEFAULT_RULES`). None: unsharded.
    step: which checkpoint of a run dir (default: the latest).
    init_from / accept_base_change: a LoRA run's (or a peft dir's) base moved to
      another dir / replaced by other weights: see `load_params`.
    """
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise CheckpointError(f"load: step must be a checkpoint step (an int >= 0), got {step!r}")
    if cfg is not None and not isinstance(cfg, ModelConfig):
        raise ConfigError(f"load: cfg must be a ModelConfig, got {type(cfg).__name__} "
                          "(pass a checkpoint step as step=N)")
    cfg = cfg or model_config_of(path, init_from)
    if param_dtype or dtype:
        try:
            cfg = dataclasses.replace(cfg, param_dtype=param_dtype or cfg.param_dtype,
                                      dtype=dtype or cfg.dtype)
        except ConfigError as e:
            raise CheckpointError(f"load: {e}") from None
    shardings = None
    if mesh is not None:
        from .sharding.rules import tree_shardings
        rules = MeshConfig(rules=rules).rules if rules is not None else MeshConfig().rules
        shardings = tree_shardings(mesh, quantize.params_logical_axes(cfg), rules)
    elif rules is not None:
        raise ConfigError("load: rules without a mesh; pass mesh=... too")
    return cfg, load_params(path, cfg, shardings, step, init_from=init_from,
                            accept_base_change=accept_base_change)


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


def _hf_companions(src: str) -> tuple[dict, dict]:
    """(config.json's special-token ids, {file name: bytes}) an HF export of the
    checkpoint dir `src` carries."""
    import json
    from .model.companions import FILES, GENERATION_CONFIG, generation_config, special_token_ids
    from .model.tokenizer import load_tokenizer
    try:
        tok = load_tokenizer(src)
    except InputError:
        tok = None  # no tokenizer: the files it has still go along
    run = read_run_config(src) if os.path.isfile(os.path.join(src, CONFIG_FILE)) else None
    files = {name: pathlib.Path(src, name).read_bytes() for name in FILES
             if name != GENERATION_CONFIG and os.path.isfile(os.path.join(src, name))}
    if tok is None:
        return {}, files
    gen = generation_config(src, tok, run.generate if run is not None else None)
    files[GENERATION_CONFIG] = (json.dumps(gen, indent=2) + "\n").encode()
    ids = {k: v for k, v in special_token_ids(gen, tok).items() if v is not None}
    return ids, files


def save(path: str, cfg: ModelConfig | Config, params, format: str = "jaxlm",
         companions: str | None = None) -> str:
    """Write params + config as a jaxlm checkpoint dir that `load` reads back, or
    (format="hf") as a Hugging Face directory that `transformers` loads. `path` must
    be new or an empty directory: anything else is a one-line CheckpointError, and
    nothing is written.

    companions: a checkpoint dir (a jaxlm run or an HF dir) whose tokenizer files,
    chat template and generation_config.json go along (`jaxlm.model.companions`); an
    HF export's config.json then names its special-token ids, and it gets a
    generation_config.json (the source's, else one made from the tokenizer and the
    run's generate settings), so transformers stops where jaxlm stops."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(f"save: {path} is a file, not a directory; choose a new "
                              "directory")
    if companions is not None and not os.path.isdir(companions):
        raise CheckpointError(f"save: companions={companions} is not a checkpoint directory")
    if format == "hf":
        model_cfg = cfg.model if isinstance(cfg, Config) else cfg
        if model_cfg.weight_dtype not in ("", "int4"):  # int4: GPTQ's layout; else float
            from .model.config import dtype_of
            params = quantize.dequantize_params(params, dtype_of(model_cfg.param_dtype))
            model_cfg = dataclasses.replace(model_cfg, weight_dtype="")
        extra_config, extra_files = _hf_companions(companions) if companions else ({}, {})
        out = hf.save_hf(path, model_cfg, params, extra_config=extra_config,
                         extra_files=extra_files)
        _chmod_umask(out)  # the temporary dir it was written in is 0700
        return str(out / "config.json")
    if format != "jaxlm":
        raise ConfigError(f"save: unknown format {format!r} (supported: 'jaxlm', 'hf')")
    full = cfg if isinstance(cfg, Config) else Config(
        model=cfg, data=DataConfig(seq_len=min(DataConfig().seq_len, cfg.max_seq_len)))
    kind = lambda d: "float" if jnp.issubdtype(d, jnp.floating) and jnp.dtype(  # noqa: E731
        d).itemsize > 1 else str(d)
    expected = jax.tree.map(lambda s: (s.shape, kind(s.dtype)),
                            quantize.params_abstract(full.model))
    got = jax.tree.map(lambda a: (a.shape, kind(a.dtype)), params)
    if expected != got:
        raise ConfigError("save: params do not match the config's parameter shapes")
    if checkpoint.latest_step(path) is not None:
        raise CheckpointError(f"save: {path} already holds a checkpoint; choose a new directory")
    if os.path.isdir(path) and os.listdir(path):
        raise CheckpointError(f"save: {path} already exists and is not empty; choose a new "
                              "directory")
    os.makedirs(path, exist_ok=True)
    _write_config(dataclasses.replace(full, run_dir=path))
    if companions:  # before the weights: a dir with a checkpoint is complete
        copy_companions(companions, path)
    mngr = checkpoint.manager(path, keep=1)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
        {"params": quantize.storable(params)})))
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(path, CONFIG_FILE)
