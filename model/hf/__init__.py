"""Hugging Face checkpoint directories <-> (ModelConfig, params), every family.

    cfg = model_config(dir)                       # config.json only, nothing read
    cfg, params = load_hf(dir)                    # float32 masters, one leaf at a time
    cfg, params = load_hf(dir, shardings=tree)    # each leaf a sharded jax.Array
    save_hf(out_dir, cfg, params)                 # a directory transformers loads

Families (`model_type`): llama, mistral, qwen2, mixtral, gpt2 (`decoder`), bert
(`bert`), t5 / mt5 (`t5`); decoders and bert also as `*ForSequenceClassification`
(model.num_labels > 0: `labels`). Each family module gives `config_from_hf`,
`hf_config` and `rules(cfg, hf, keys)`: one table of `rules.Rule`s read by the
one leaf loader (`rules.load_leaf`) and the one exporter (`rules.export_tensors`).

Weights are read with numpy from the safetensors files (no torch). Without
shardings a leaf is built on the host and made a jax array (host memory peaks
at about one leaf); with shardings each device's callback reads only its own
block of the leaf, so no process holds a whole copy of a sharded leaf.

param_dtype and dtype default to float32 whatever the checkpoint holds (bf16 ->
f32 is exact): master weights for fine-tuning. Ask for bfloat16 to keep it.
"""

from __future__ import annotations

import contextlib
import itertools
import dataclasses
import os
import pathlib

import jax
import numpy as np

from ...errors import CheckpointError, ConfigError
from ..config import ModelConfig
from ..families import model_specs
from . import bert, decoder, packed, t5
from .io import (CONFIG_FILE, CheckpointReader,
                               is_hf_checkpoint, named_leaves,
                               read_config, write_checkpoint)
from .rules import Rule, check_table, export_tensors, load_leaf
from ..params import abstract

_FAMILIES = (decoder, bert, t5)
_BY_MODEL_TYPE = {t: f for f in _FAMILIES for t in f.MODEL_TYPES}
_BY_FAMILY = {"decoder": decoder, "encoder": bert, "encoder_decoder": t5}
SUPPORTED = tuple(_BY_MODEL_TYPE)
infer_model_type = decoder.infer_model_type


def _family_of(hf: dict):
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise CheckpointError(f"{CONFIG_FILE}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    return _BY_MODEL_TYPE[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of an HF `config.json` dict (float32); CheckpointError if unsupported.
    A GPTQ / AWQ int4 checkpoint (`packed.packed_config`) is model.weight_dtype=int4 with
    its group size as model.quant_group; any other quantization_config is refused."""
    method = packed.packed_config(hf)
    if method is None:
        return _family_of(hf).config_from_hf(hf)
    cfg = _family_of(hf).config_from_hf(_unpacked_config(hf))
    return dataclasses.replace(cfg, weight_dtype="int4", quant_group=method[1])


def _unpacked_config(hf: dict) -> dict:
    return {k: v for k, v in hf.items() if k != "quantization_config"}


def _packed_leaf(reader, rule, in_axes, shape, fmt_cfg, sharding):
    """A GPTQ / AWQ Linear as an int4 QuantizedWeight: its codes, scales and zero points
    read through the weight's own rule from `PackedReader`'s virtual tensors."""
    from .. import qformat
    n_in, n_out = len(in_axes), len(shape) - in_axes[-1] - 1
    g = qformat.n_groups(shape, n_in, n_out, fmt_cfg.quant_group)
    sshape = qformat.scale_shape(shape, n_in, n_out, g)
    sh = sharding
    def part(name, shp, dtype, s):
        r = rule._replace(key=rule.key.replace(".weight", "." + name),
                          aliases=tuple(a.replace(".weight", "." + name) for a in rule.aliases))
        return load_leaf(reader, r, jax.ShapeDtypeStruct(shp, dtype), s)
    codes = part("weight", shape, "uint8", None if sh is None else sh.q)
    scale = part("weight_scale", sshape, "float32", None if sh is None else sh.scale)
    zero = part("weight_zero", sshape, "uint8", None if sh is None else sh.zero)
    node = qformat.from_codes(codes, scale, zero, fmt="int4", n_in=n_in, n_out=n_out)
    if sh is not None:  # the packed codes where the spec puts them
        node = dataclasses.replace(node, q=jax.device_put(node.q, sh.q))
    return node


def hf_config_from(cfg: ModelConfig, model_type: str | None = None) -> dict:
    """The `config.json` dict of cfg (as model_type, else as its family's usual type);
    ConfigError if cfg cannot be expressed so."""
    family = _BY_MODEL_TYPE.get(model_type) if model_type else _BY_FAMILY.get(cfg.family)
    if family is None:
        raise ConfigError(f"hf export: model_type {model_type!r} / family {cfg.family!r} is not "
                          f"supported (supported: {', '.join(SUPPORTED)})")
    return family.hf_config(cfg, model_type)


def _with_dtypes(cfg: ModelConfig, dtype: str | None, param_dtype: str | None) -> ModelConfig:
    try:
        return dataclasses.replace(cfg, dtype=dtype or cfg.dtype,
                                   param_dtype=param_dtype or cfg.param_dtype)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _fit_to_weights(family, cfg: ModelConfig, hf: dict, keys) -> ModelConfig:
    """cfg less what config.json declares and the weights lack (DeepSeek-V3's MTP modules
    in a transformers save: `decoder.fit_to_weights`)."""
    fit = getattr(family, "fit_to_weights", None)
    return cfg if fit is None else fit(cfg, hf, frozenset(keys))


def model_config(directory, *, dtype: str | None = None,
                 param_dtype: str | None = None) -> ModelConfig:
    """The ModelConfig of an HF checkpoint dir, from its config.json and the tensor names
    of its weights (float32 unless dtype / param_dtype say otherwise)."""
    hf = read_config(directory)
    family = _family_of(hf)
    cfg = config_from_hf(hf)
    if cfg.mtp_depth:
        with contextlib.ExitStack() as stack:
            cfg = _fit_to_weights(family, cfg, hf, CheckpointReader(
                pathlib.Path(os.fspath(directory)), stack).keys())
    return _with_dtypes(cfg, dtype, param_dtype)


def _quantized_paths(cfg) -> dict:
    """{path: input axes} of the weights `cfg` keeps quantized ({} for float)."""
    if not cfg.weight_dtype:
        return {}
    from ..quantize import quantized_in_axes
    return quantized_in_axes(model_specs(cfg))


def load_hf(directory, *, cfg: ModelConfig | None = None, dtype: str | None = None,
            param_dtype: str | None = None, shardings=None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of an HF checkpoint directory (config.json + safetensors).

    cfg: the config to load into (default: `model_config(directory)`); its shapes
      must match the checkpoint's tensors (CheckpointError naming the tensor).
    dtype / param_dtype: override cfg's (activations / weights; default float32).
    shardings: None (each leaf on the default device), or a tree of Shardings
      matching the params tree (e.g. `jaxlm.sharding.rules.tree_shardings(mesh,
      logical_axes(model_specs(cfg)), rules)`): each leaf is built device by
      device, every device's block read on its own (`rules.load_leaf`).
    """
    directory = pathlib.Path(os.fspath(directory))
    hf = read_config(directory)
    family = _family_of(hf)
    method = packed.packed_config(hf)
    with contextlib.ExitStack() as stack:
        reader = CheckpointReader(directory, stack)
        if cfg is None:
            cfg = _fit_to_weights(family, config_from_hf(hf), hf, reader.keys())
        cfg = _with_dtypes(cfg, dtype, param_dtype)
        if method is not None:
            hf = _unpacked_config(hf)
            if cfg.weight_dtype != "int4" or cfg.quant_group != method[1]:
                raise CheckpointError(f"{directory} holds {method[0]} int4 weights in groups "
                                      f"of {method[1]}: load it with model.weight_dtype=int4, "
                                      f"model.quant_group={method[1]}")
            reader = packed.PackedReader(reader, method[0], method[2])
        named, treedef = named_leaves(abstract(model_specs(cfg)), sep=None)
        if shardings is None:
            placed = [None] * len(named)
        else:
            placed = treedef.flatten_up_to(shardings)
        table = family.rules(cfg, hf, frozenset(reader.keys()))
        check_table(table, [n for n, _ in named])
        by_path = {r.path: r for r in table}
        quantized = _quantized_paths(cfg)

        def leaf(name, spec, sharding):
            rule = by_path[name]
            if name not in quantized:
                return load_leaf(reader, rule, spec, sharding)
            first = rule.names()[0]  # layer (and expert) 0's tensor
            if first.endswith(".weight") and first[:-7] in getattr(reader, "prefixes", ()):
                return _packed_leaf(reader, rule, quantized[name], spec.shape, cfg, sharding)
            from ..quantize import quantize  # a Linear the checkpoint keeps float
            return quantize(load_leaf(reader, rule, spec), quantized[name], cfg.weight_dtype,
                            cfg.quant_group)
        leaves = [leaf(name, spec, sharding) for (name, spec), sharding in zip(named, placed)]
        unused = [] if family.unused_ok is None else sorted(
            k for k in reader.keys() if k not in reader.used and not family.unused_ok(k, cfg))
    if unused:
        raise CheckpointError(
            f"{len(unused)} tensors in {directory} are not used by its {CONFIG_FILE} "
            f"({hf['model_type']}): {', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")
    return cfg, jax.tree_util.tree_unflatten(treedef, leaves)


def save_hf(directory, cfg: ModelConfig, params, model_type: str | None = None, *,
            max_shard_bytes: int | None = 5 * 2**30, extra_config: dict | None = None,
            extra_files: dict | None = None) -> pathlib.Path:
    """Write cfg + params as an HF checkpoint dir that transformers loads; returns it.

    model_type: default by cfg.family (decoders: `infer_model_type`; bert; t5).
    Weights keep the param dtype. Past `max_shard_bytes` (None: never), weights go
    into shards `model-0000k-of-0000n.safetensors` listed in
    `model.safetensors.index.json`. Refuses a directory that exists and is not
    empty; writes a temporary directory next to it and renames it at the end.
    `extra_config` (the special-token ids) joins config.json (a sequence classifier
    keeps its model.pad_token_id: HF pools at the last token that is not it);
    `extra_files` ({name: bytes}: the tokenizer, chat template, generation_config.json)
    are written with the weights (`jaxlm.model.companions`).
    """
    if model_type is None and cfg.family == "decoder":
        model_type = infer_model_type(cfg)
    own = hf_config_from(cfg, model_type)
    hf = {**own, **(extra_config or {})}
    if cfg.num_labels:  # a classifier pools by its own pad id, whatever the tokenizer's
        hf["pad_token_id"] = own["pad_token_id"]
    from ..adapters import is_node
    expected = jax.tree.map(lambda s: s.shape, abstract(model_specs(cfg)))
    try:
        got = jax.tree.map(lambda a: tuple(a.shape), params, is_leaf=is_node)
    except AttributeError:
        got = None
    if expected != got:
        raise ConfigError("save_hf: params do not match the config's parameter shapes")
    family = _family_of(hf)
    table = family.rules(cfg, hf)
    if cfg.weight_dtype == "int4":
        tensors, hf["quantization_config"] = _gptq_tensors(table, cfg, params)
    else:
        tensors = export_tensors(table, params)
    extra = getattr(family, "extra_tensors", None)
    if extra is not None:  # copies the table does not list (DeepSeek-V3's MTP layers')
        tensors = itertools.chain(tensors, extra(cfg, params))
    return write_checkpoint(directory, hf, tensors, max_shard_bytes,
                            who="save_hf", extra_files=extra_files)


def _gptq_tensors(table, cfg, params):
    """int4 params -> (HF tensors with each int4 weight in GPTQ's packed layout
    (`packed.pack_gptq`), the config's quantization_config): checkpoint_format "gptq"
    (zeros stored minus 1) unless a zero point is 0, then "gptq_v2"."""
    from .. import qformat
    from ..adapters import materialize
    quantized = _quantized_paths(cfg)
    nodes = {}

    def walk(tree, path=()):
        for k, v in tree.items():
            if isinstance(v, qformat.QuantizedWeight) and path + (k,) in quantized:
                nodes[path + (k,)] = v
            elif isinstance(v, dict):
                walk(v, path + (k,))
    walk(params)
    zall = {int(z) for n in nodes.values() for z in np.unique(np.asarray(n.zero))}
    zmin = min(zall, default=1)
    v1 = zmin >= 1

    def tree_of(fn):
        out = {}
        for path, node in nodes.items():
            d = out
            for k in path[:-1]:
                d = d.setdefault(k, {})
            d[path[-1]] = fn(node)
        return out
    qtable = [r for r in table if r.path in nodes]
    streams = [export_tensors(qtable, tree_of(f)) for f in (
        qformat.codes, qformat.scales, lambda n: n.zero)]

    def tensors():
        names = set()
        for (name, c), (_, s), (_, z) in zip(*streams):
            prefix = name[:-len(".weight")]
            names.add(name)
            for part, t in packed.pack_gptq(c.T, z.T.astype("int64"), s.T, v1=v1).items():
                yield f"{prefix}.{part}", t
        rest = [r for r in table if r.path not in nodes]
        yield from export_tensors(rest, _without(materialize(params), nodes))
    qc = packed.quantization_config("gptq", cfg.quant_group, zall == {8}, v1)
    return tensors(), qc


def _without(tree, paths):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _without(v, {p[1:] for p in paths if p[0] == k})
            if sub:
                out[k] = sub
        elif (k,) not in paths:
            out[k] = v
    return out


__all__ = ["SUPPORTED", "config_from_hf", "hf_config_from", "infer_model_type", "model_config",
           "load_hf", "save_hf", "is_hf_checkpoint", "read_config", "CheckpointReader",
           "write_checkpoint", "Rule", "load_leaf", "export_tensors"]

from ...lazy import submodule_getattr as _submodule_getattr  # noqa: E402

__getattr__ = _submodule_getattr(__name__)  # its submodules as attributes
