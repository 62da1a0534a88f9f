"""Per-device memory of a config on a mesh, without allocating (`jaxlm plan` prints it).

Everything comes from abstract trees (`jax.eval_shape`, the param specs) and
the PartitionSpecs the rules give, divided arithmetically by the mesh axis
sizes: no devices are needed, so a 256-device mesh plans on a laptop.

Per device (a sharded dim of size n over mesh axes of total size m holds
ceil(n / m)):
  params       every param leaf, at param_dtype
  gradients    the trained tree's shapes (the train step holds one gradient tree):
               the params, or with LoRA (train.lora.rank) the adapters alone
  optimizer    every optimizer-state leaf of the trained tree (Adam mu, nu like
               their params; counters replicated)
  frozen       what a fine-tuning run holds without training it: LoRA's base
               (int8 weights with train.lora.base_dtype=int8), full-weight DPO's
               reference copy of the params, or distillation's teacher (its params
               by its own specs, placed by the same rules; its forward keeps no
               activations for the backward pass); PPO: the reference and the reward
               model (the value model trains: in params, gradients and optimizer)
  activations  estimate of what the backward pass keeps, with t = local
               tokens = batch * seq / (batch shards), d = d_model, q = heads *
               head_dim / tp, kv = kv_heads * head_dim / tp, f = d_ff / tp
               (x k experts per token for MoE), tp = shards of "heads"/"mlp",
               bytes at model.dtype:
                 dots   = t * (q + 2 kv + q + d + g f + d)   matmul outputs
                          (g = 3 gated: gate, up, product; 2 otherwise)
                 all    = dots + t * (4 d + f) + b * heads/tp * s^2 * 2
                          (norms, residuals, activation; attention scores +
                          probs as the XLA reference materialises them)
               per layer saved: remat none -> all; dots / dots_no_batch ->
               dots; full -> t * d (the layer input). Total = layers * saved
               + one layer's `all` (recomputed / live during backward) +
               logits t * V/tp * 4 bytes (t * loss_vocab_chunk * 4 when
               chunked).
               Context parallelism (seq over mesh axes of total size c > 1):
               t uses seq / c, and the attention scores term becomes ring
               attention's one f32 tile, b * heads/tp * blk^2 * 2 * 4 (blk =
               ring.BLOCK when it divides seq / c, else seq / c).
               Pipeline stages (mesh.stage S > 1, M microbatches, R repeats):
               the layers are split over `stage` by the rules (params,
               gradients and optimizer shrink with them); per stage, with t_mb
               = t / M the tokens of one microbatch, the backward keeps every
               tick's saved activations of its block of L' = L / (S R)
               layers, T = R M + S - 1 ticks (idle ticks included):
               T * L' * saved(t_mb) + one layer's `all`(t_mb) + the stage's
               microbatch buffer and its cotangent 2 * M * t_mb * d; the
               logits (embedding and head run outside the stages) stay at t.
  bubble       stage > 1: the schedule's idle fraction (S-1) / (R M + S-1).
  ring kv      context > 1: the ring's K/V buffers per layer call, the
               visiting chunk and the one in flight, K and V at model.dtype
               (2 * 2 * b * seq/c * kv), plus the backward's travelling dK/dV
               accumulators, f32 (2 * 2 * b * seq/c * kv * 4); with stages
               the ring runs on one microbatch at a time (b / M rows).
  kv cache     2 * layers * batch * cache_len * kv_heads * head_dim at
               model.dtype, sharded like [layers, batch, seq, kv_heads,
               head_dim]; cache_len = --cache-len or data.seq_len +
               generate.max_new_tokens (encoder-decoder: the decoder's
               self-attention cache).
  cross kv     encoder-decoder: the cross-attention K/V, the same with
               data.seq_len (the encoded input) for cache_len.
  int8 kv      both with generate.kv_dtype=int8: int8 values + a float32
               scale per (layer, row, position, head).
  int8 weights params with model.weight_dtype=int8: the layer matmul weights
               int8 (1 byte) + float32 scales per output channel, the rest at
               param_dtype (model/quantize.py)
train total = trained params (params, or LoRA's adapters) + frozen + gradients +
optimizer + activations + ring kv;
inference total = params (int8 weights when model.weight_dtype=int8) + kv cache
(+ cross kv; int8 kv when generate.kv_dtype=int8).
"""

from __future__ import annotations

import math
import re

import numpy as np

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--device-memory {text!r}: expected a size like 16GiB, 80GB or 1e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def shard_bytes(shape, dtype, spec, sizes) -> int:
    """Bytes of one device's shard of an array of `shape` under `spec`."""
    n = 1
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        n *= math.ceil(dim / math.prod(sizes[a] for a in axes))
    return n * np.dtype(dtype).itemsize


def _axes_count(logical, rules, sizes) -> int:
    axes = dict(rules).get(logical) or ()
    return math.prod(sizes[a] for a in axes)


def plan(cfg, n_devices: int | None = None, cache_len: int | None = None,
         batch: int | None = None) -> dict:
    """{"mesh": sizes, "params": bytes, ...} per device for `cfg` on its mesh."""
    import jax
    import optax

    from ..model.kv import cache_axes, cache_shapes
    from ..model import model_specs
    from ..model.params import LogicalAxes, abstract, logical_axes
    from .mesh import check_divisible, mesh_shape, model_dims
    from .pipeline import bubble_fraction, check_pipeline_mesh, microbatches_of
    from .rules import partition_spec
    from ..train.lora import trainable_specs
    from ..train.optimizer import make_optimizer

    for flag, value in (("--devices", n_devices), ("--cache-len", cache_len),
                        ("--batch", batch)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1")
    m, rules = cfg.model, cfg.mesh.rules
    sizes_cfg = cfg.mesh.sizes
    if n_devices is None:
        if -1 in sizes_cfg.values():
            n_devices = jax.device_count() if not cfg.mesh.devices else cfg.mesh.devices
        else:
            n_devices = math.prod(sizes_cfg.values())
    sizes = mesh_shape(cfg.mesh, n_devices)
    check_divisible(sizes, rules, model_dims(cfg))
    check_pipeline_mesh(cfg, sizes)
    specs = model_specs(m)
    shapes, axes = abstract(specs), logical_axes(specs)
    is_axes = lambda x: isinstance(x, LogicalAxes)  # noqa: E731

    def leaf_bytes(s, a):
        return shard_bytes(s.shape, s.dtype, partition_spec(a, rules), sizes)
    params = sum(jax.tree.leaves(jax.tree.map(leaf_bytes, shapes, axes, is_leaf=is_axes)))
    params_q = {f: _quantized_param_bytes(m, f, leaf_bytes, is_axes)
                for f in ("int8", "int4", "nf4", "fp8")}
    params_int8 = params_q["int8"]
    # what the train step differentiates and the optimizer follows (LoRA: the adapters)
    trained_specs = trainable_specs(cfg)
    trained_shapes, trained_axes = abstract(trained_specs), logical_axes(trained_specs)
    trained = sum(jax.tree.leaves(jax.tree.map(leaf_bytes, trained_shapes, trained_axes,
                                               is_leaf=is_axes)))
    if cfg.train.lora.rank:  # the base, frozen
        base = cfg.train.lora.base_dtype
        frozen = params if base == "same" else _quantized_param_bytes(
            m, base, leaf_bytes, is_axes, double=base in ("int4", "nf4"))
    elif cfg.train.objective == "distill":  # the teacher, another model's params
        from ..train.distill import teacher_config
        t_specs = model_specs(teacher_config(cfg.train))
        frozen = sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract(t_specs),
                                                  logical_axes(t_specs), is_leaf=is_axes)))
    else:  # full-weight DPO / KTO: a frozen reference copy of the params
        from ..train.state import needs_reference
        frozen = params if needs_reference(cfg.train) else 0
    if cfg.train.objective == "ppo":  # the reward model, held by the rollouts
        from ..train.ppo import reward_config
        r_specs = model_specs(reward_config(cfg.train))
        frozen += sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract(r_specs),
                                                   logical_axes(r_specs), is_leaf=is_axes)))
    tx = make_optimizer(cfg.train, trained_specs)
    opt_shapes = jax.eval_shape(tx.init, trained_shapes)
    opt_tree = optax.tree_map_params(
        tx, leaf_bytes, opt_shapes, trained_axes, is_leaf=is_axes,
        transform_non_params=lambda s: int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize)
    optimizer = sum(x for x in jax.tree.leaves(opt_tree) if isinstance(x, (int, np.integer)))

    act = np.dtype(m.dtype).itemsize
    b = cfg.data.batch_size
    s = cfg.data.seq_len
    b_local = math.ceil(b / _axes_count("batch", rules, sizes))
    s_local = math.ceil(s / _axes_count("seq", rules, sizes))
    t = b_local * s_local
    tp_h = _axes_count("heads", rules, sizes)
    tp_kv = _axes_count("kv_heads", rules, sizes)
    tp_f = _axes_count("mlp", rules, sizes)
    d = m.d_model
    q = math.ceil(m.n_heads / tp_h) * m.head_dim
    kv = math.ceil(m.n_kv_heads / tp_kv) * m.head_dim
    f = math.ceil(m.d_ff / tp_f) * (m.moe.experts_per_token if m.moe.n_experts else 1)
    gated = 3 if m.mlp in ("swiglu", "geglu") else 2
    dots = t * (q + 2 * kv + q + d + gated * f + d) * act
    scores = b_local * math.ceil(m.n_heads / tp_h) * s * s * 2 * act
    ring_kv = 0
    if _axes_count("seq", rules, sizes) > 1:  # ring attention (model/kernels/ring.py)
        from ..model.kernels.ring import BLOCK
        blk = BLOCK if s_local % BLOCK == 0 else s_local
        scores = b_local * math.ceil(m.n_heads / tp_h) * blk * blk * 2 * 4
        ring_kv = 2 * 2 * b_local * s_local * kv * (act + 4)
    def layer_bytes(frac):  # (one layer's `all`, what remat saves) for frac of the tokens
        full = (dots + t * (4 * d + f) * act) * frac + scores * frac
        return full, {"none": full, "full": t * d * act * frac}.get(m.remat, dots * frac)
    full_layer, saved = layer_bytes(1)
    layers = m.n_layers + (m.n_decoder_layers or m.n_layers if m.family == "encoder_decoder" else 0)
    vocab_local = math.ceil(m.vocab_size / _axes_count("vocab", rules, sizes))
    chunk = cfg.train.loss_vocab_chunk
    logits = t * (min(chunk, vocab_local) if chunk else vocab_local) * 4
    activations = layers * saved + full_layer + logits
    bubble = 0.0
    if sizes["stage"] > 1:  # pipeline: every tick's block of layers on one microbatch
        n_st, reps, mbs = sizes["stage"], cfg.mesh.pipeline_repeats, microbatches_of(cfg)
        full_mb, saved_mb = layer_bytes(1 / mbs)
        ticks = reps * mbs + n_st - 1
        activations = (ticks * (m.n_layers // (n_st * reps)) * saved_mb + full_mb
                       + 2 * t * d * act + logits)
        bubble = bubble_fraction(n_st, mbs, reps)
        ring_kv //= mbs  # each tick's ring attention sees one microbatch

    cache_len = cache_len or (s + cfg.generate.max_new_tokens)
    cache_batch = batch or b
    dec_layers = (m.n_decoder_layers or m.n_layers) if m.family == "encoder_decoder" else m.n_layers
    kv_axes = cache_axes()

    def kv_bytes(length: int) -> tuple:
        """(at model.dtype, int8) bytes of K and V [dec_layers, batch, length, KVH, D]
        (+ the int8 scales): the leaves `cache_shapes` gives generate's cache."""
        if m.family == "encoder":
            return 0, 0
        return tuple(sum(shard_bytes(x.shape, x.dtype, partition_spec(kv_axes[n], rules), sizes)
                         for n, x in cache_shapes(m, cache_batch, length, kv_dtype=kv_dtype,
                                                  layers=dec_layers).items() if n != "lengths")
                     for kv_dtype in ("auto", "int8"))

    kv_cache, kv_cache_int8 = kv_bytes(cache_len)
    # an encoder-decoder's cross-attention K/V over the encoded input (data.seq_len)
    cross_kv, cross_kv_int8 = kv_bytes(s) if m.family == "encoder_decoder" else (0, 0)
    out = {"mesh": sizes, "devices": n_devices, "params": params, "trained": trained,
           "frozen": frozen, "gradients": trained, "optimizer": optimizer,
           "activations": activations, "kv_cache": kv_cache, "kv_cache_int8": kv_cache_int8,
           "cross_kv": cross_kv, "cross_kv_int8": cross_kv_int8, "cache_len": cache_len,
           "ring_kv": ring_kv, "bubble": bubble}
    out["train_total"] = 2 * trained + frozen + optimizer + activations + ring_kv
    out["params_int8"] = params_int8
    out["params_by_dtype"] = params_q  # None: model.quant_group does not fit the weights
    kv = kv_cache_int8 + cross_kv_int8 if cfg.generate.kv_dtype == "int8" else kv_cache + cross_kv
    weights = params_q.get(m.weight_dtype) if m.weight_dtype else params
    out["inference_total"] = (params if weights is None else weights) + kv
    return out


def _quantized_param_bytes(m, fmt: str, leaf_bytes, is_axes, double: bool = False):
    """Per-device param bytes with the layer matmul weights in `fmt` (codes + scales +
    zero points, model.quant_group for int4 / nf4; `double`: QLoRA's double-quantized
    scales), the rest at param_dtype; None when the group size does not fit."""
    import jax

    from ..errors import ConfigError
    from ..model import model_specs, quantize
    from ..model.params import abstract, logical_axes
    try:
        specs = quantize.quantized_specs(model_specs(m), fmt, m.quant_group, double)
    except ConfigError:
        return None
    return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, abstract(specs), logical_axes(specs),
                                            is_leaf=is_axes)))
