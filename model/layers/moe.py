"""Mixture of experts: a top-k router over SwiGLU experts (Mixtral style).

Routing: softmax over the k selected router logits (= softmax over all, top-k,
renormalised); with model.moe.normalize_top_k false, the k probabilities of the
softmax over all experts as they are (Qwen3-MoE's norm_topk_prob false). With
model.moe.router=sigmoid (DeepSeek-V3): sigmoid scores, the choice by score plus a
per-expert bias within the best groups (`_sigmoid_route`); the routed weights times
model.moe.routed_scale; shared experts (model.moe.n_shared) added beside them.
Dropless by default: assignments are sorted by expert and run
as grouped matmuls (`lax.ragged_dot`). With `model.moe.capacity_factor` c > 0
each expert takes at most ceil(c * tokens * k / experts) assignments, in token
order; the rest are dropped (their weight is zeroed) and counted. Tokens the
token mask leaves out (padding) take no capacity.

Expert parallelism: under a mesh (`use_mesh`) whose rules put `experts` on
the `expert` axis and the batch over it, with a capacity factor set (fixed
shapes), each device routes its own tokens into per-expert buffers of
ceil(c * local tokens * k / experts) rows (capacity and token order per
device), and `shard_map` + `all_to_all` over `expert` carry them to the
devices holding their experts and back. Dropless MoE (c = 0), or other rules,
leave the sharded grouped matmuls to XLA's SPMD partitioner.

Aux outputs per layer: the load-balancing loss (Switch / Mixtral form,
experts * sum_e f_e * p_e), the router z-loss (mean logsumexp(logits)^2), the
fraction of assignments per expert, and the fraction dropped.
"""

import math

import jax
import jax.numpy as jnp

from .dense import dense, expert_einsum, grouped
from ..params import Spec, normal, zeros
from ...sharding.rules import active_mesh, constrain


def moe_specs(cfg):
    init, dt = normal(cfg.init_std), cfg.param_dtype
    e, d, f = cfg.moe.n_experts, cfg.d_model, cfg.d_ff
    specs = {
        "router": Spec((d, e), ("embed", None), init, dt),
        "gate": Spec((e, d, f), ("experts", "embed", "mlp"), init, dt),
        "up": Spec((e, d, f), ("experts", "embed", "mlp"), init, dt),
        "down": Spec((e, f, d), ("experts", "mlp", "embed"), init, dt),
    }
    if cfg.moe.router == "sigmoid":  # selection bias (DeepSeek's e_score_correction_bias)
        specs["router_bias"] = Spec((e,), (None,), zeros, "float32")
    if cfg.moe.n_shared:  # the shared experts: one SwiGLU MLP of n_shared * d_ff
        fs = cfg.moe.n_shared * f
        specs["shared"] = {"gate": Spec((d, fs), ("embed", "mlp"), init, dt),
                           "up": Spec((d, fs), ("embed", "mlp"), init, dt),
                           "down": Spec((fs, d), ("mlp", "embed"), init, dt)}
    return specs


def _sigmoid_route(p, logits, cfg):
    """DeepSeek-V3's routing: scores sigmoid(logits); experts chosen by score + router_bias
    (no gradient through the choice) within each token's topk_groups best groups (a group
    scored by its two best); weights the chosen scores (normalised when normalize_top_k)."""
    m = cfg.moe
    scores = jax.nn.sigmoid(logits)
    choice = scores + jax.lax.stop_gradient(p["router_bias"].astype(jnp.float32))
    if m.n_groups > 1:
        t = choice.shape[0]
        grouped_choice = choice.reshape(t, m.n_groups, -1)
        group_score = jnp.sum(jax.lax.top_k(grouped_choice, 2)[0], axis=-1)  # [T, G]
        _, best = jax.lax.top_k(group_score, m.topk_groups)
        keep = jnp.zeros_like(group_score, bool).at[jnp.arange(t)[:, None], best].set(True)
        choice = jnp.where(keep[:, :, None], grouped_choice, -jnp.inf).reshape(t, -1)
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(choice), m.experts_per_token)
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if m.normalize_top_k:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * m.routed_scale, experts


def route(p, x, cfg):
    """x [T,D] -> (weights [T,k], experts [T,k], router logits [T,E] float32)."""
    logits = dense(x, p["router"].astype(x.dtype), out_dtype=jnp.float32)
    if cfg.moe.router == "sigmoid":
        return (*_sigmoid_route(p, logits, cfg), logits)
    top_logits, experts = jax.lax.top_k(logits, cfg.moe.experts_per_token)
    if cfg.moe.normalize_top_k:
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:  # each its probability over all experts: exp(top - logsumexp(all))
        weights = jnp.exp(top_logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    return weights * cfg.moe.routed_scale, experts, logits


def _expert_rank(flat_experts, n_experts: int, counted):
    """[N] each assignment's place among its expert's counted ([N] bool) assignments,
    in order (0 for one not counted)."""
    onehot = jax.nn.one_hot(flat_experts, n_experts, dtype=jnp.int32) * counted[:, None]
    return jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)


def _keep_within_capacity(experts, cfg, valid):
    """[T,k] bool: which assignments of valid ([T] bool) tokens fit their expert's
    capacity (token order). Masked tokens (padding) take no capacity."""
    t, k = experts.shape
    capacity = math.ceil(cfg.moe.capacity_factor * t * k / cfg.moe.n_experts)
    counted = jnp.repeat(valid, k)
    rank = _expert_rank(experts.reshape(-1), cfg.moe.n_experts, counted)
    return (counted & (rank < capacity)).reshape(t, k)


def _experts_grouped(p, x, weights, experts, cfg):
    """Every kept assignment through its expert with grouped matmuls."""
    t, k = experts.shape
    flat_expert = experts.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    token = order // k
    rows = x[token]  # [T*k, D]
    sizes = jnp.bincount(flat_expert, length=cfg.moe.n_experts).astype(jnp.int32)
    dt = x.dtype
    row_expert = flat_expert[order]
    gate = grouped(rows, p["gate"], sizes, row_expert)
    up = grouped(rows, p["up"], sizes, row_expert)
    h = jax.nn.silu(gate) * up
    out = grouped(h, p["down"], sizes, row_expert)  # [T*k, D]
    out = out * weights.reshape(-1)[order][:, None].astype(dt)
    return jnp.zeros_like(x).at[token].add(out)


def expert_parallel_plan(cfg, tokens: int):
    """(mesh, batch mesh axes, token shards) when the experts run with all-to-all, else None."""
    active = active_mesh()
    if active is None or cfg.moe.capacity_factor <= 0:
        return None
    mesh, rules = active
    table = dict(rules)
    batch_axes = tuple(a for a in (table.get("batch") or ()) if a in mesh.shape)
    n_ep = mesh.shape.get("expert", 1)
    if (tuple(table.get("experts") or ()) != ("expert",) or n_ep == 1
            or "expert" not in batch_axes or cfg.moe.n_experts % n_ep):
        return None
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    return (mesh, batch_axes, shards) if tokens % shards == 0 else None


def _experts_all_to_all(p, x, weights, experts, keep, cfg, plan):
    """The experts of `_experts_grouped`, expert-parallel: x [T,D] split over the
    batch axes; per device, capacity buffers [E, C, D] go to their experts' devices."""
    mesh, batch_axes, shards = plan
    from jax.sharding import PartitionSpec as P
    e, n_ep = cfg.moe.n_experts, mesh.shape["expert"]
    t, k = experts.shape
    d = x.shape[1]
    capacity = math.ceil(cfg.moe.capacity_factor * (t // shards) * k / e)
    dt = x.dtype

    def local(x, weights, experts, keep, gate, up, down):
        tl = x.shape[0]
        flat_e = experts.reshape(-1)  # [Tl*k], token-major
        rank = _expert_rank(flat_e, e, keep.reshape(-1))  # the kept: their capacity rank
        slot = jnp.where(keep.reshape(-1), flat_e * capacity + rank, e * capacity)  # drop: OOB
        buf = jnp.zeros((e * capacity, d), dt).at[slot].set(jnp.repeat(x, k, axis=0),
                                                            mode="drop")
        buf = jax.lax.all_to_all(buf.reshape(e, capacity, d), "expert", 0, 0, tiled=True)
        buf = buf.reshape(n_ep, e // n_ep, capacity, d)  # [source device, local expert, C, D]
        h = (jax.nn.silu(expert_einsum("secd,edf->secf", buf, gate))
             * expert_einsum("secd,edf->secf", buf, up))
        out = expert_einsum("secf,efd->secd", h, down).reshape(e, capacity, d)
        out = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True).reshape(e * capacity, d)
        rows = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # [Tl*k, D]
        return jnp.sum(rows.reshape(tl, k, d) * weights[..., None].astype(dt), axis=1)

    tok, w = P(batch_axes, None), P("expert", None, None)
    run = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, tok, w, w, w), out_specs=tok)
    return run(x, weights, experts, keep, p["gate"], p["up"], p["down"])  # int8: + scales


def moe(p, x, cfg, token_mask=None):
    """x [B,S,D] -> (y [B,S,D], aux dict of per-layer scalars and [E] load); the shared
    experts (model.moe.n_shared) added to the routed ones'."""
    y, aux = _routed(p, x, cfg, token_mask)
    if "shared" in p:
        sh = p["shared"]
        y = y + dense(jax.nn.silu(dense(x, sh["gate"])) * dense(x, sh["up"]), sh["down"])
    return y, aux


def _routed(p, x, cfg, token_mask=None):
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    weights, experts, logits = route(p, flat, cfg)
    valid = (jnp.ones((b * s,), bool) if token_mask is None
             else token_mask.reshape(-1).astype(bool))
    plan = expert_parallel_plan(cfg, b * s)
    if plan is not None:  # capacity per device's tokens, as the all-to-all buffers hold them
        shards = plan[2]
        keep = jax.vmap(lambda ex, v: _keep_within_capacity(ex, cfg, v))(
            experts.reshape(shards, -1, experts.shape[-1]),
            valid.reshape(shards, -1)).reshape(experts.shape)
        y = _experts_all_to_all(p, flat, jnp.where(keep, weights, 0.0), experts, keep, cfg, plan)
        aux = router_stats(logits, experts, keep, valid, cfg)
        return constrain(y.reshape(b, s, d), ("batch", "seq", "embed")), aux
    keep = (_keep_within_capacity(experts, cfg, valid) if cfg.moe.capacity_factor > 0
            else valid[:, None])
    y = _experts_grouped(p, flat, jnp.where(keep, weights, 0.0), experts, cfg)
    aux = router_stats(logits, experts, keep, valid, cfg)
    return constrain(y.reshape(b, s, d), ("batch", "seq", "embed")), aux


def router_stats(logits, experts, keep, valid, cfg):
    e, k = cfg.moe.n_experts, cfg.moe.experts_per_token
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
