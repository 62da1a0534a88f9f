"""`jaxlm quantize`: a checkpoint (jaxlm run or Hugging Face dir) -> a new jaxlm run
dir whose layer matmul weights are quantized (`--dtype` int8 | int4 | nf4 | fp8, the
run's `model.weight_dtype`; int4 / nf4 in groups of `--group` input rows,
`model.quant_group`; model/qformat.py) by `--method rtn` (round to nearest), or int4 by
`--method gptq | awq` calibrated on `--calibration FILES` (model/calibration.py).
`jaxlm.load`, `jaxlm generate --checkpoint OUT` and `batch-infer` read it like any run dir.

The output is written to a temporary sibling dir and renamed into place, so a
failure leaves no half-written OUT, and an existing non-empty OUT is refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import yaml

from ..errors import CheckpointError, ConfigError


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new directory")


METHODS = ("rtn", "gptq", "awq")  # round to nearest; calibrated int4 (model/calibration.py)


def check_method(method: str, calibration) -> None:
    """One line for a method this build cannot run on these inputs."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if method == "rtn" and calibration:
        raise ConfigError("--calibration: --method rtn (round to nearest) uses no "
                          "calibration data; drop it, or choose --method gptq | awq")
    if method != "rtn" and not calibration:
        raise ConfigError(f"--method {method} needs calibration data: --calibration FILES "
                          f"({method.upper()} without calibration data has no activations "
                          "to measure)")


def run_quantize(src: str, out: str, weight_dtype: str = "int8", step: int | None = None,
                 init_from: str | None = None, accept_base_change: bool = False,
                 method: str = "rtn", calibration=(), group: int | None = None,
                 samples: int = 256, seq_len: int = 0, act_order: bool = False,
                 progress=None) -> str:
    """Quantize `src` into the new run dir `out`; returns the one-line summary.
    `init_from` / `accept_base_change`: a LoRA run's moved / changed base (`jaxlm.load`).
    method: "rtn" (round to nearest), or "gptq" / "awq" (int4, calibrated on `samples`
    windows of `seq_len` tokens (default min(512, model.max_seq_len)) of the text /
    .jsonl files / prepared dirs in `calibration`, read as `jaxlm eval` reads its data);
    group: model.quant_group (int4 / nf4); act_order: GPTQ's rows in order of decreasing
    Hessian diagonal."""
    from ..api import load, save
    from ..api import _chmod_umask, checkpoint_kind, model_config_of
    from ..config import Config, DataConfig
    from ..model.quantize import WEIGHT_DTYPES, param_bytes
    from ..model.companions import copy_companions
    from ..sharding.plan import fmt_bytes
    from ..config import to_dict
    from ..train.loop import CONFIG_FILE, read_run_config

    from ..model import qformat
    from ..model.quantize import params_specs
    if weight_dtype not in qformat.FORMATS:
        raise ConfigError(f"--dtype {weight_dtype!r} is not one of {', '.join(qformat.FORMATS)}")
    if group is not None and group < 0:
        raise ConfigError(f"--group {group} must be >= 0 (0: one scale per output channel)")
    check_method(method, calibration)
    if act_order and method != "gptq":
        raise ConfigError(f"--act-order orders GPTQ's rows; --method {method} has none")
    if method != "rtn" and weight_dtype != "int4":
        raise ConfigError(f"--method {method} writes int4 weights (--dtype int4), "
                          f"not {weight_dtype}")
    _check_out(out)
    base = model_config_of(src, init_from)  # a missing / unreadable checkpoint stops here
    if base.weight_dtype:
        raise CheckpointError(f"--checkpoint {src} is already {base.weight_dtype} "
                              f"(model.weight_dtype={base.weight_dtype}); quantize its float "
                              "source")
    cfg = dataclasses.replace(base, weight_dtype=weight_dtype,
                              quant_group=base.quant_group if group is None else group)
    params_specs(cfg)  # a group size that does not divide a weight: one line, before reading
    if checkpoint_kind(src) == "jaxlm":
        run = read_run_config(src)  # keep its data/generate settings; it is no LoRA run now
        full = dataclasses.replace(run, model=cfg, train=dataclasses.replace(
            run.train, lora=dataclasses.replace(run.train.lora, rank=0, base_dtype="same"),
            init_from=""))
    else:
        full = Config(model=cfg, data=DataConfig(seq_len=min(DataConfig().seq_len,
                                                             cfg.max_seq_len)))
    if method == "rtn":
        _, params = load(src, cfg=cfg, step=step, init_from=init_from,
                         accept_base_change=accept_base_change)
    else:
        params = _calibrated(src, cfg, method, calibration, samples, seq_len, act_order,
                             progress,
                             step=step, init_from=init_from,
                             accept_base_change=accept_base_change)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        save(tmp, full, params)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:  # run_dir: its final name
            yaml.safe_dump(to_dict(dataclasses.replace(full, run_dir=out)), f, sort_keys=False)
        copy_companions(src, tmp)  # tokenizer, chat template, generation_config.json
        _chmod_umask(tmp)
        _check_out(out)  # nothing appeared meanwhile
        os.rename(tmp, out)  # atomic; replaces an empty dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    b = param_bytes(cfg)
    fmt = weight_dtype + ("" if weight_dtype in qformat.PER_CHANNEL
                          else f" (groups of {cfg.quant_group})")
    return (f"wrote {weight_dtype} checkpoint {out} ({cfg.family}, {cfg.n_layers} layers, "
            f"{method}): "
            f"{b['quantized_params']:,} weights {fmt}, params {fmt_bytes(b['float'])} at "
            f"{cfg.param_dtype} -> {fmt_bytes(b[weight_dtype])}")


def _calibrated(src, cfg, method, calibration, samples, seq_len, act_order, progress,
                **load_kw):
    """GPTQ / AWQ int4 params of `src` (model/calibration.py) on the calibration files."""
    import dataclasses as dc

    from ..api import load
    from ..infer.evaluate import read_eval_data, tokenizer_for
    from ..api import companions_dir
    from ..model.calibration import calibrate, calibration_windows, quantized_params
    from ..errors import InputError
    if cfg.family != "decoder":
        raise ConfigError(f"--method {method} calibrates decoder-only models; {cfg.family} "
                          "quantizes with --method rtn")
    tok = tokenizer_for(companions_dir(src, load_kw.get("init_from")))
    docs = read_eval_data(list(calibration), tok)
    length = seq_len or min(512, cfg.max_seq_len)
    if length > cfg.max_seq_len:
        raise InputError(f"--calibration-len {length} exceeds model.max_seq_len "
                         f"{cfg.max_seq_len}")
    windows = calibration_windows(docs.ids, length, samples)
    _, params = load(src, cfg=dc.replace(cfg, weight_dtype=""), **load_kw)
    params, codes = calibrate(params, cfg, windows, method, cfg.quant_group,
                              act_order=act_order, progress=progress)
    return quantized_params(params, cfg, codes, cfg.quant_group)

