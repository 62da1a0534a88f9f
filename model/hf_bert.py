"""Hugging Face BERT checkpoints <-> (ModelConfig, params) of the encoder family.

* `bert_config_from_hf(config_json_dict) -> ModelConfig`, `hf_bert_config(cfg) -> dict`.
* `load_bert(dir) -> (cfg, params)` reads `config.json` and the safetensors
  (`model.safetensors`, or the shards of `model.safetensors.index.json`)
  with numpy, no torch, one parameter leaf at a time (its per-layer tensors
  stacked, transposed, cast, made a jax array).
* `save_bert(dir, cfg, params)` writes `config.json` + `model.safetensors`
  that `transformers.BertForMaskedLM.from_pretrained` loads.

Accepted checkpoints: BertForMaskedLM / BertForPreTraining (keys under
`bert.` and `cls.predictions.`). Old names (`LayerNorm.gamma/beta`) and the
tied `cls.predictions.decoder.bias` are read too; tensors the MLM model does
not use (pooler, next-sentence head, position_ids buffers) are ignored.

One table (`_rules`) maps each leaf of our tree to its HF tensor: HF Linear
weights are [out, in]; ours are [in..., out...] (q: [D, H, hd], o: [H, hd, D]).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy
import numpy as np

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.model.families import model_specs
from jaxlm.model.params import abstract

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF hidden_act -> (our mlp, gelu_approximate)
_ACTS = {"gelu": ("gelu", False), "gelu_new": ("gelu", True), "gelu_pytorch_tanh": ("gelu", True),
         "relu": ("relu", False)}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# ------------------------------------------------------------------ configs

def bert_config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a BERT `config.json` dict; CheckpointError if unsupported."""
    def get(key, default=None):
        value = hf.get(key, default)
        if value is None:
            raise CheckpointError(f"{CONFIG_FILE}: missing {key!r}")
        return value

    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{CONFIG_FILE}: model_type {hf.get('model_type')!r} is not bert")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise CheckpointError(f"{CONFIG_FILE}: BERT as a decoder (is_decoder, "
                              "add_cross_attention) is not supported")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(f"{CONFIG_FILE}: position_embedding_type {kind!r} is not supported "
                              "(supported: absolute)")
    act = get("hidden_act", "gelu")
    if act not in _ACTS:
        raise CheckpointError(f"{CONFIG_FILE}: hidden_act {act!r} is not supported "
                              f"(supported: {', '.join(_ACTS)})")
    mlp, approximate = _ACTS[act]
    dtype = _DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
                        .replace("torch.", ""), "float32")
    try:
        return ModelConfig(
            family="encoder", vocab_size=get("vocab_size"), d_model=get("hidden_size", 768),
            n_layers=get("num_hidden_layers", 12), n_heads=get("num_attention_heads", 12),
            d_ff=get("intermediate_size", 3072),
            max_seq_len=get("max_position_embeddings", 512),
            type_vocab_size=get("type_vocab_size", 2), norm="layernorm",
            norm_eps=float(get("layer_norm_eps", 1e-12)), norm_position="post", mlp=mlp,
            gelu_approximate=approximate, positions="learned", qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(get("initializer_range", 0.02)), dtype=dtype, param_dtype=dtype)
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


def hf_bert_config(cfg: ModelConfig) -> dict:
    """The `config.json` of cfg as a BertForMaskedLM; ConfigError naming what BERT lacks."""
    bad = [what for ok, what in (
        (cfg.family == "encoder", "family=encoder"),
        (cfg.norm_position == "post", "norm_position=post"),
        (cfg.norm == "layernorm", "norm=layernorm"),
        (cfg.positions == "learned", "positions=learned"),
        (cfg.mlp in ("gelu", "relu"), "mlp=gelu or relu"),
        (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias, "qkv_bias, out_bias, mlp_bias all true"),
        (cfg.n_kv_heads == cfg.n_heads, "n_kv_heads == n_heads"),
        (cfg.head_dim * cfg.n_heads == cfg.d_model, "head_dim * n_heads == d_model"),
        (cfg.attn_scale in (0.0, cfg.head_dim ** -0.5), "attn_scale=0"),
        (cfg.type_vocab_size > 0, "type_vocab_size > 0")) if not ok]
    if bad:
        raise ConfigError(f"save_bert: the config is not a BERT; it needs {', '.join(bad)}")
    act = "relu" if cfg.mlp == "relu" else ("gelu_new" if cfg.gelu_approximate else "gelu")
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "hidden_act": act,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": 0, "dtype": cfg.param_dtype,
    }


# ------------------------------------------------------------------ the table

class Rule(NamedTuple):
    key: str  # HF name; "{i}" is the layer
    n_in: int = 0  # n > 0: a Linear weight; the first n of our axes are its inputs
    flat: bool = False  # HF holds it flat (the [H, hd] attention biases)


def _rules(cfg: ModelConfig) -> dict[str, Rule]:
    """Our leaf path ("layers/attn/q") -> its HF tensor."""
    emb, layer, head = "bert.embeddings.", "bert.encoder.layer.{i}.", "cls.predictions."
    rules = {"embed/tokens": Rule(emb + "word_embeddings.weight"),
             "positions/table": Rule(emb + "position_embeddings.weight"),
             "token_types/table": Rule(emb + "token_type_embeddings.weight"),
             "mlm/dense/kernel": Rule(head + "transform.dense.weight", 1),
             "mlm/dense/bias": Rule(head + "transform.dense.bias"),
             "mlm/bias": Rule(head + "bias"),
             "head/kernel": Rule(head + "decoder.weight", 1)}
    norms = {"embed_ln": emb + "LayerNorm", "layers/ln1": layer + "attention.output.LayerNorm",
             "layers/ln2": layer + "output.LayerNorm", "mlm/ln": head + "transform.LayerNorm"}
    for ours, hf in norms.items():
        rules[ours + "/scale"], rules[ours + "/bias"] = Rule(hf + ".weight"), Rule(hf + ".bias")
    linears = {"attn/q": ("attention.self.query", 1), "attn/k": ("attention.self.key", 1),
               "attn/v": ("attention.self.value", 1), "attn/o": ("attention.output.dense", 2),
               "mlp/up": ("intermediate.dense", 1), "mlp/down": ("output.dense", 1)}
    for ours, (hf, n_in) in linears.items():
        rules["layers/" + ours] = Rule(layer + hf + ".weight", n_in)
        rules["layers/" + ours + "_bias"] = Rule(layer + hf + ".bias", flat=True)
    return rules


def _aliases(key: str) -> list[str]:
    """Names a tensor may have in a checkpoint: as written by save_pretrained, older
    TF-era names (LayerNorm gamma/beta), the tied decoder bias, no `bert.` prefix."""
    names = [key]
    if key.endswith("LayerNorm.weight"):
        names.append(key[:-len("weight")] + "gamma")
    if key.endswith("LayerNorm.bias"):
        names.append(key[:-len("bias")] + "beta")
    if key == "cls.predictions.bias":
        names.append("cls.predictions.decoder.bias")
    return names + [n[len("bert."):] for n in names if n.startswith("bert.")]


def _hf_shape(rule: Rule, shape: tuple) -> tuple:
    if rule.n_in:
        return (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
    return (math.prod(shape),) if rule.flat else shape


def _named_leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(k.key for k in path), leaf) for path, leaf in flat], treedef


# ------------------------------------------------------------------ reading

class _Reader:
    """Tensors of a safetensors checkpoint (one file or an index of shards)."""

    def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
        from safetensors import safe_open
        self._dir, self._stack, self._safe_open, self._open = directory, stack, safe_open, {}
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self.where = {k: directory / f for k, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which is missing")
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weights in {directory}")
            self.where = {k: f for f in files for k in self._file(f).keys()}

    def _file(self, path: pathlib.Path):
        if path not in self._open:
            try:
                self._open[path] = self._stack.enter_context(
                    self._safe_open(str(path), framework="numpy"))
            except Exception as e:  # a corrupt or truncated file
                raise CheckpointError(f"cannot read {path}: {e}") from None
        return self._open[path]

    def read(self, key: str, shape: tuple) -> np.ndarray:
        """Tensor `key` (or an alias of it), which must have `shape`."""
        name = next((n for n in _aliases(key) if n in self.where), None)
        if name is None:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self._dir} "
                                  f"(expected shape {list(shape)})")
        f = self._file(self.where[name])
        try:
            found = tuple(f.get_slice(name).get_shape())
            if found != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {list(found)} in the "
                                      f"checkpoint but the config implies {list(shape)}")
            return f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.where[name]}: {e}") \
                from None


def _read_config(directory: pathlib.Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory} (not a Hugging Face checkpoint)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return hf


def load_bert(directory) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF BERT checkpoint directory."""
    directory = pathlib.Path(os.fspath(directory))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint dir {directory} does not exist")
    cfg = bert_config_from_hf(_read_config(directory))
    rules = _rules(cfg)
    named, treedef = _named_leaves(abstract(model_specs(cfg)))
    leaves = []
    with contextlib.ExitStack() as stack:
        reader = _Reader(directory, stack)
        for name, spec in named:
            rule = rules[name]
            if name.startswith("layers/"):
                hf_shape = _hf_shape(rule, spec.shape[1:])
                buf = np.empty(spec.shape, spec.dtype)
                for i in range(cfg.n_layers):
                    buf[i] = _to_ours(reader.read(rule.key.format(i=i), hf_shape), rule,
                                      spec.shape[1:])
            else:
                buf = _to_ours(reader.read(rule.key, _hf_shape(rule, spec.shape)), rule,
                               spec.shape).astype(spec.dtype)
            leaves.append(jnp.asarray(buf))
            del buf
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


def _to_ours(a: np.ndarray, rule: Rule, shape: tuple) -> np.ndarray:
    return (a.T if rule.n_in else a).reshape(shape)


def _to_hf(x: np.ndarray, rule: Rule) -> np.ndarray:
    if rule.n_in:
        return x.reshape(math.prod(x.shape[:rule.n_in]), -1).T
    return x.reshape(-1) if rule.flat else x


# ------------------------------------------------------------------ writing

def save_bert(directory, cfg: ModelConfig, params) -> pathlib.Path:
    """Write cfg + params as an HF BertForMaskedLM checkpoint dir; returns it.

    Weights keep the param dtype. Refuses a directory that exists and is not
    empty; writes a temporary directory next to it and renames it at the end.
    """
    from safetensors.numpy import save_file
    hf = hf_bert_config(cfg)
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(cfg)))
    if jax.tree.map(lambda a: tuple(np.shape(a)), params) != expected:
        raise ConfigError("save_bert: params do not match the config's parameter shapes")
    target = pathlib.Path(os.fspath(directory)).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"save_bert: {target} already exists and is not empty")
    rules = _rules(cfg)
    tensors = {}
    for name, leaf in _named_leaves(params)[0]:
        rule, host = rules[name], np.asarray(leaf)
        if name.startswith("layers/"):
            for i in range(cfg.n_layers):
                tensors[rule.key.format(i=i)] = np.ascontiguousarray(_to_hf(host[i], rule))
        else:
            tensors[rule.key] = np.ascontiguousarray(_to_hf(host, rule))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        os.replace(tmp, target)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["bert_config_from_hf", "hf_bert_config", "load_bert", "save_bert"]
