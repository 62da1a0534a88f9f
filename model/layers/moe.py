"""Mixture of experts: a top-k router over SwiGLU experts (Mixtral style).

Routing: softmax over the k selected router logits (= softmax over all, top-k,
renormalised). Dropless by default: assignments are sorted by expert and run
as grouped matmuls (`lax.ragged_dot`). With `moe_capacity_factor` c > 0 each
expert takes at most ceil(c * tokens * k / experts) assignments, in token
order; the rest are dropped (their weight is zeroed) and counted.

Aux outputs per layer: the load-balancing loss (Switch / Mixtral form,
experts * sum_e f_e * p_e), the router z-loss (mean logsumexp(logits)^2), the
fraction of assignments per expert, and the fraction dropped.
"""

import math

import jax
import jax.numpy as jnp

from jaxlm.model.layers.dense import dense
from jaxlm.model.params import Spec, normal
from jaxlm.sharding.rules import constrain


def moe_specs(cfg):
    init, dt = normal(cfg.init_std), cfg.param_dtype
    e, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
    return {
        "router": Spec((d, e), ("embed", None), init, dt),
        "gate": Spec((e, d, f), ("experts", "embed", "mlp"), init, dt),
        "up": Spec((e, d, f), ("experts", "embed", "mlp"), init, dt),
        "down": Spec((e, f, d), ("experts", "mlp", "embed"), init, dt),
    }


def route(p, x, cfg):
    """x [T,D] -> (weights [T,k], experts [T,k], router logits [T,E] float32)."""
    logits = dense(x, p["router"].astype(x.dtype), out_dtype=jnp.float32)
    top_logits, experts = jax.lax.top_k(logits, cfg.experts_per_token)
    return jax.nn.softmax(top_logits, axis=-1), experts, logits


def _keep_within_capacity(experts, cfg):
    """[T,k] bool: which assignments fit their expert's capacity (token order)."""
    t, k = experts.shape
    capacity = math.ceil(cfg.moe_capacity_factor * t * k / cfg.n_experts)
    onehot = jax.nn.one_hot(experts.reshape(-1), cfg.n_experts, dtype=jnp.int32)  # [T*k,E]
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # place in its expert
    return (rank < capacity).reshape(t, k)


def _experts_grouped(p, x, weights, experts, cfg):
    """Every kept assignment through its expert with grouped matmuls."""
    t, k = experts.shape
    flat_expert = experts.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    token = order // k
    rows = x[token]  # [T*k, D]
    sizes = jnp.bincount(flat_expert, length=cfg.n_experts).astype(jnp.int32)
    dt = x.dtype
    gate = jax.lax.ragged_dot(rows, p["gate"].astype(dt), sizes)
    up = jax.lax.ragged_dot(rows, p["up"].astype(dt), sizes)
    h = jax.nn.silu(gate) * up
    out = jax.lax.ragged_dot(h, p["down"].astype(dt), sizes)  # [T*k, D]
    out = out * weights.reshape(-1)[order][:, None].astype(dt)
    return jnp.zeros_like(x).at[token].add(out)


def moe(p, x, cfg, token_mask=None):
    """x [B,S,D] -> (y [B,S,D], aux dict of per-layer scalars and [E] load)."""
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    weights, experts, logits = route(p, flat, cfg)
    valid = (jnp.ones((b * s,), bool) if token_mask is None
             else token_mask.reshape(-1).astype(bool))
    keep = valid[:, None] & (_keep_within_capacity(experts, cfg)
                             if cfg.moe_capacity_factor > 0 else True)
    y = _experts_grouped(p, flat, jnp.where(keep, weights, 0.0), experts, cfg)
    aux = router_stats(logits, experts, keep, valid, cfg)
    return constrain(y.reshape(b, s, d), ("batch", "seq", "embed")), aux


def router_stats(logits, experts, keep, valid, cfg):
    e, k = cfg.n_experts, cfg.experts_per_token
    n = jnp.maximum(jnp.sum(valid), 1)
    w = valid.astype(jnp.float32)[:, None]
    assigned = jax.nn.one_hot(experts, e) * w[..., None]  # [T,k,E]
    fraction = jnp.sum(assigned, axis=0) / n  # [k,E]: tokens sent to e in slot j
    probs = jnp.sum(jax.nn.softmax(logits, axis=-1) * w, axis=0) / n  # [E]
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * w[:, 0]) / n
    dropped = jnp.sum(valid[:, None] & ~keep) / (n * k)
    return {"load_balancing_loss": e * jnp.sum(fraction * probs[None]),
            "router_z_loss": z, "expert_load": jnp.sum(fraction, axis=0) / k,
            "dropped_fraction": dropped}
