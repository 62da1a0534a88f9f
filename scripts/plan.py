"""`jaxlm plan`: prints `jaxlm.sharding.plan.plan` (per-device memory of a config on its
mesh) and whether it fits --device-memory."""

from __future__ import annotations

from ..sharding.plan import fmt_bytes, parse_bytes, plan


def run_plan(args) -> int:
    from ..config import load_config
    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, args.devices, args.cache_len, args.batch)
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    print(f"mesh {mesh} ({p['devices']} devices); per device:")
    if cfg.train.objective == "ppo":  # the policy (or its adapters) and the value model
        print(f"  {'params':<12} {fmt_bytes(p['trained'])}  (the policy"
              + ("'s LoRA adapters" if cfg.train.lora.rank else "") + " and the value model)")
    elif p["trained"] != p["params"]:  # LoRA: the adapters train, the base is frozen
        print(f"  {'params':<12} {fmt_bytes(p['trained'])}  (the LoRA adapters, trained)")
    else:
        print(f"  {'params':<12} {fmt_bytes(p['params'])}")
    if p["frozen"]:
        base = cfg.train.lora.base_dtype
        what = ("the LoRA base" + (f", {base}" if base != "same" else "")
                if cfg.train.lora.rank else
                f"the distillation teacher, {cfg.train.distill.teacher}"
                if cfg.train.objective == "distill" else "the reference policy, a frozen copy")
        if cfg.train.objective == "ppo":
            what += f"; the reward model, {cfg.train.ppo.reward_model_path}"
        print(f"  {'frozen':<12} {fmt_bytes(p['frozen'])}  ({what})")
    for key in ("gradients", "optimizer", "activations"):
        print(f"  {key:<12} {fmt_bytes(p[key])}")
    if p["ring_kv"]:
        print(f"  {'ring kv':<12} {fmt_bytes(p['ring_kv'])}  (ring attention K/V chunks in "
              f"flight, seq {cfg.data.seq_len} / context {p['mesh']['context']})")
    if p["bubble"]:
        from ..sharding.pipeline import pipeline_summary
        print(f"  {'bubble':<12} {p['bubble']:.1%}  ({pipeline_summary(cfg)})")
    print(f"  {'train':<12} {fmt_bytes(p['train_total'])}  (remat={cfg.model.remat}, "
          f"batch {cfg.data.batch_size} x seq {cfg.data.seq_len})")
    print(f"  {'kv cache':<12} {fmt_bytes(p['kv_cache'])}  (cache_len {p['cache_len']})")
    if p["cross_kv"]:
        print(f"  {'cross kv':<12} {fmt_bytes(p['cross_kv'])}  (cross-attention K/V over "
              f"the encoded seq {cfg.data.seq_len})")
    kv, kv8 = p["kv_cache"] + p["cross_kv"], p["kv_cache_int8"] + p["cross_kv_int8"]
    if kv:
        print(f"  {'int8 kv':<12} {fmt_bytes(kv8)}  (generate.kv_dtype=int8: saves "
              f"{fmt_bytes(kv - kv8)} per device vs {cfg.model.dtype})")
    for fmt, b in p["params_by_dtype"].items():  # model.weight_dtype=fmt
        if b is None:
            print(f"  {fmt + ' weights':<12} -  (model.quant_group={cfg.model.quant_group} "
                  "does not divide every weight's input dimension)")
            continue
        group = "" if fmt in ("int8", "fp8") else f", groups of {cfg.model.quant_group}"
        print(f"  {fmt + ' weights':<12} {fmt_bytes(b)}  (params with model.weight_dtype={fmt}"
              f"{group}: saves {fmt_bytes(p['params'] - b)} per device vs "
              f"{cfg.model.param_dtype})")
    weights = (f"{cfg.model.weight_dtype} weights" if cfg.model.weight_dtype
               else "float weights")
    if kv:
        weights += ", int8 kv" if cfg.generate.kv_dtype == "int8" else f", {cfg.model.dtype} kv"
    print(f"  {'inference':<12} {fmt_bytes(p['inference_total'])} ({weights})")
    if args.device_memory:
        limit = parse_bytes(args.device_memory)
        worst = max(p["train_total"], p["inference_total"])
        if worst > limit:
            print(f"does not fit: {fmt_bytes(worst)} per device > --device-memory "
                  f"{fmt_bytes(limit)}")
            return 1
        print(f"fits: {fmt_bytes(worst)} per device <= {fmt_bytes(limit)}")
    return 0
