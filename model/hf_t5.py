"""Hugging Face T5 checkpoints <-> (ModelConfig, params), encoder-decoder family.

* `t5_config_from_hf(config_json_dict) -> ModelConfig`, `hf_t5_config(cfg) -> dict`.
* `load_t5(dir) -> (cfg, params)` reads `config.json` and the safetensors
  (`model.safetensors`, or the shards of `model.safetensors.index.json`) with
  numpy, no torch, one parameter leaf at a time (its per-layer tensors read,
  transposed, stacked, cast, made a jax array).
* `save_t5(dir, cfg, params)` writes `config.json` + safetensors (sharded past
  `max_shard_bytes`) that `transformers.T5ForConditionalGeneration.from_pretrained`
  loads.

Variants (`feed_forward_proj`): "relu" (T5 v1.0: `wi`, `wo`), "gated-gelu"
(T5 v1.1 / mT5 / Flan-T5: `wi_0` the gelu_new gate, `wi_1` the linear part,
`wo`); also "gelu", "gelu_new", "gated-silu", "gated-gelu_new".

Head: T5 v1.0 ties the head to the shared embedding and scales the decoder
output by d_model ** -0.5 (our `tie_embeddings: true`); v1.1 has a separate
`lm_head` and no scaling (`tie_embeddings: false`). Hugging Face decides the
scaling from `tie_word_embeddings` (transformers < 5) or the saved
`scale_decoder_outputs` (transformers 5, which always ties in memory and
writes `tie_word_embeddings: true` even for v1.1): an unscaled checkpoint
without an `lm_head.weight` loads as an untied head copied from the
embedding, which is what Hugging Face computes.

Names (HF Linear weights are [out, in], ours [in, out]; q/k/v [D, H*Dk] ->
[D, H, Dk], o [H*Dk, D] -> [H, Dk, D]):
    shared.weight                                        embed.tokens
    lm_head.weight                                       head.kernel (untied)
    {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                         {stack}.relative.table
    {stack}.block.N.layer.0.SelfAttention.{q,k,v,o}      {stack}.layers.attn.*
    {stack}.block.N.layer.0.layer_norm                   {stack}.layers.ln1
    decoder.block.N.layer.1.EncDecAttention.{q,k,v,o}    decoder.layers.cross.*
    decoder.block.N.layer.1.layer_norm                   decoder.layers.ln_cross
    {stack}.block.N.layer.F.DenseReluDense.{wi|wi_0,wi_1,wo}  {stack}.layers.mlp.{up|gate,up,down}
    {stack}.block.N.layer.F.layer_norm                   {stack}.layers.ln2   (F: 1 enc, 2 dec)
    {stack}.final_layer_norm.weight                      {stack}.final_ln.scale
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy for safetensors
import numpy as np

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.model.families import model_specs
from jaxlm.model.families.encoder_decoder import decoder_layers
from jaxlm.model.params import abstract

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = ("t5", "mt5")
# feed_forward_proj -> (our mlp, gelu_approximate). HF maps "gated-gelu" to gelu_new.
_ACTS = {"relu": ("relu", False), "gelu": ("gelu", False), "gelu_new": ("gelu", True),
         "gated-gelu": ("geglu", True), "gated-gelu_new": ("geglu", True),
         "gated-silu": ("swiglu", False), "gated-swish": ("swiglu", False)}


# ------------------------------------------------------------------ configs

def _scaled_head(hf: dict) -> bool:
    """Whether HF scales the decoder output before the head (= T5 v1.0 tied head)."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def t5_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A `config.json` dict of a T5 / mT5 checkpoint -> ModelConfig (family encoder_decoder)."""
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not a T5 model "
                              f"(supported: {', '.join(MODEL_TYPES)})")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _ACTS:
        raise CheckpointError(f"config.json: feed_forward_proj={proj!r} is not supported "
                              f"({', '.join(_ACTS)})")
    mlp, approximate = _ACTS[proj]
    try:
        n_layers = int(hf["num_layers"])
        fields = dict(
            family="encoder_decoder", vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]), n_layers=n_layers,
            n_decoder_layers=int(hf.get("num_decoder_layers") or n_layers),
            n_heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), d_ff=int(hf["d_ff"]),
            max_seq_len=int(hf.get("n_positions") or 512), norm="rmsnorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), norm_position="pre",
            mlp=mlp, gelu_approximate=approximate, positions="t5_relative",
            relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            attn_scale=1.0, tie_embeddings=_scaled_head(hf))
    except KeyError as e:
        raise CheckpointError(f"config.json: required key {e.args[0]!r} is missing") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def _export_problems(cfg: ModelConfig) -> list[str]:
    p = []
    if cfg.family != "encoder_decoder":
        p.append(f"model.family={cfg.family!r} (needs 'encoder_decoder')")
    if cfg.positions != "t5_relative":
        p.append(f"model.positions={cfg.positions!r} (T5 has 't5_relative')")
    if cfg.norm != "rmsnorm" or cfg.norm_position != "pre":
        p.append("T5 has pre-norm rmsnorm")
    if cfg.attn_scale != 1.0:
        p.append(f"model.attn_scale={cfg.attn_scale} (T5 has 1.0)")
    if cfg.n_kv_heads != cfg.n_heads:
        p.append("T5 has no grouped-query attention (n_kv_heads must equal n_heads)")
    if cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        p.append("T5 has no biases")
    if cfg.mlp == "geglu" and not cfg.gelu_approximate:
        p.append("exact-GELU geglu has no feed_forward_proj (HF's 'gated-gelu' is tanh GELU)")
    return p


def _feed_forward_proj(cfg: ModelConfig) -> str:
    return {"relu": "relu", "gelu": "gelu_new" if cfg.gelu_approximate else "gelu",
            "geglu": "gated-gelu", "swiglu": "gated-silu"}[cfg.mlp]


def hf_t5_config(cfg: ModelConfig) -> dict:
    """ModelConfig -> a `config.json` dict for T5ForConditionalGeneration."""
    problems = _export_problems(cfg)
    if problems:
        raise ConfigError("cannot export as T5: " + "; ".join(problems))
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff, "num_layers": cfg.n_layers, "num_decoder_layers": decoder_layers(cfg),
        "num_heads": cfg.n_heads, "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": _feed_forward_proj(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings,
        "dropout_rate": 0.0, "initializer_factor": 1.0, "is_encoder_decoder": True,
        "n_positions": cfg.max_seq_len, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "use_cache": True,
        "torch_dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------ name table

class Rule(NamedTuple):
    name: str  # HF tensor name; "{i}" is the layer index of a stacked leaf
    contract: int  # 0: same layout; n: HF Linear [out, in] whose `in` is our first n axes
    stacked: bool


def _rules(cfg: ModelConfig) -> dict[str, Rule]:
    """Our leaf path ("encoder/layers/attn/q") -> its HF tensor."""
    gated = cfg.mlp in ("geglu", "swiglu")
    r = {"embed/tokens": Rule("shared.weight", 0, False)}
    if not cfg.tie_embeddings:
        r["head/kernel"] = Rule("lm_head.weight", 1, False)
    for stack in ("encoder", "decoder"):
        block = f"{stack}.block.{{i}}.layer."
        r[f"{stack}/relative/table"] = Rule(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 0, False)
        r[f"{stack}/final_ln/scale"] = Rule(f"{stack}.final_layer_norm.weight", 0, False)
        attn = [("attn", "0.SelfAttention", "ln1", "0.layer_norm")]
        if stack == "decoder":
            attn.append(("cross", "1.EncDecAttention", "ln_cross", "1.layer_norm"))
        for ours, theirs, ln, ln_theirs in attn:
            for w in "qkv":
                r[f"{stack}/layers/{ours}/{w}"] = Rule(f"{block}{theirs}.{w}.weight", 1, True)
            r[f"{stack}/layers/{ours}/o"] = Rule(f"{block}{theirs}.o.weight", 2, True)
            r[f"{stack}/layers/{ln}/scale"] = Rule(f"{block}{ln_theirs}.weight", 0, True)
        ff = f"{block}{1 if stack == 'encoder' else 2}."
        r[f"{stack}/layers/ln2/scale"] = Rule(f"{ff}layer_norm.weight", 0, True)
        dense = f"{ff}DenseReluDense."
        if gated:
            r[f"{stack}/layers/mlp/gate"] = Rule(f"{dense}wi_0.weight", 1, True)
            r[f"{stack}/layers/mlp/up"] = Rule(f"{dense}wi_1.weight", 1, True)
        else:
            r[f"{stack}/layers/mlp/up"] = Rule(f"{dense}wi.weight", 1, True)
        r[f"{stack}/layers/mlp/down"] = Rule(f"{dense}wo.weight", 1, True)
    return r


def _leaves(tree) -> dict[str, object]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _hf_shape(rule: Rule, shape: tuple) -> tuple:
    if rule.contract == 0:
        return tuple(shape)
    n = rule.contract
    return (math.prod(shape[n:]), math.prod(shape[:n]))


def _to_ours(w: np.ndarray, rule: Rule, shape: tuple) -> np.ndarray:
    return w if rule.contract == 0 else w.T.reshape(shape)


def _to_hf(x: np.ndarray, rule: Rule) -> np.ndarray:
    if rule.contract == 0:
        return x
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:rule.contract]), -1).T)


# ------------------------------------------------------------------ loading

class _Reader:
    """Tensors by name across `model.safetensors` or the shards of an index."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        from safetensors import safe_open
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS_FILE).is_file():
            weight_map, files = None, [WEIGHTS_FILE]
        else:
            raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} nor {INDEX_FILE}")
        self.handles = {}
        for f in files:
            if not (directory / f).is_file():
                raise CheckpointError(f"{directory}: shard {f} listed in {INDEX_FILE} is missing")
            try:
                self.handles[f] = stack.enter_context(
                    safe_open(str(directory / f), framework="numpy"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{directory / f} is not a readable safetensors file: "
                                      f"{e}") from None
        if weight_map is None:
            weight_map = {k: WEIGHTS_FILE for k in self.handles[WEIGHTS_FILE].keys()}
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: tuple, needed_for: str) -> np.ndarray:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing "
                                  f"(needed for {needed_for})")
        handle = self.handles.get(self.weight_map[name])
        if handle is None:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing "
                                  f"(its shard {self.weight_map[name]} is not in the index)")
        w = handle.get_tensor(name)
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"{self.directory}: tensor {name!r} has shape "
                                  f"{tuple(w.shape)}, expected {tuple(shape)} from config.json")
        return w


def _read_config(directory: pathlib.Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: {CONFIG_FILE} "
                              "is missing")
    try:
        hf = json.loads(path.read_text())
    except ValueError:
        raise CheckpointError(f"{path} is not valid JSON") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return hf


def load_t5(directory, *, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a Hugging Face T5 checkpoint dir (safetensors).

    dtype: the param dtype (default float32; "bfloat16" halves host memory).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint dir {directory} does not exist")
    hf = _read_config(directory)
    overrides = {"param_dtype": dtype} if dtype else {}
    cfg = t5_config_from_hf(hf, **overrides)
    specs = _leaves(abstract(model_specs(cfg)))
    rules = _rules(cfg)
    params = {}
    with contextlib.ExitStack() as stack:
        reader = _Reader(directory, stack)
        if not cfg.tie_embeddings and "lm_head.weight" not in reader \
                and hf.get("tie_word_embeddings", True) is not False:
            # transformers 5 wrote a tied-in-memory, unscaled head as shared.weight only
            rules["head/kernel"] = Rule("shared.weight", 1, False)
        for path, spec in specs.items():
            rule = rules[path]
            n = spec.shape[0] if rule.stacked else 0
            slot = spec.shape[1:] if rule.stacked else spec.shape
            want = _hf_shape(rule, slot)
            if rule.stacked:
                host = np.empty(spec.shape, spec.dtype)
                for i in range(n):
                    name = rule.name.format(i=i)
                    host[i] = _to_ours(reader.get(name, want, path), rule, slot)
            else:
                host = _to_ours(reader.get(rule.name, want, path), rule, slot).astype(spec.dtype)
            _set(params, path, jnp.asarray(host))
            del host
    return cfg, params


def _set(tree: dict, path: str, value):
    *parents, last = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = value


# ------------------------------------------------------------------ saving

def save_t5(directory, cfg: ModelConfig, params, *, max_shard_bytes: int | None = None
            ) -> pathlib.Path:
    """Write `config.json` + safetensors that T5ForConditionalGeneration.from_pretrained
    loads; more than `max_shard_bytes` of tensors are split into shards with an
    index. Returns the directory."""
    from safetensors.numpy import save_file
    config = hf_t5_config(cfg)
    specs = _leaves(abstract(model_specs(cfg)))
    leaves = _leaves(params)
    if set(leaves) != set(specs):
        raise ConfigError(f"save_t5: params do not match the config's tree: missing "
                          f"{sorted(set(specs) - set(leaves))}, "
                          f"extra {sorted(set(leaves) - set(specs))}")
    for path, spec in specs.items():
        if tuple(leaves[path].shape) != tuple(spec.shape):
            raise ConfigError(f"save_t5: {path} has shape {tuple(leaves[path].shape)}, the config "
                              f"says {tuple(spec.shape)}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("model*.safetensors*"):
        old.unlink()
    tensors = {}
    for path, rule in _rules(cfg).items():
        x = np.asarray(jax.device_get(leaves[path]))
        if rule.stacked:
            for i in range(x.shape[0]):
                tensors[rule.name.format(i=i)] = _to_hf(x[i], rule)
        else:
            tensors[rule.name] = _to_hf(x, rule)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _shard(tensors: dict, max_bytes: int | None) -> list[dict]:
    if not max_bytes:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    return shards + [current] if current else shards


__all__ = ["t5_config_from_hf", "hf_t5_config", "load_t5", "save_t5"]
