"""Pipeline parallelism: the decoder's layer stack split into stages over the
`stage` mesh axis, microbatches flowing through them (GPipe, optionally circular).

Layout. The stacked `layers` axis [L, ...] is sharded over `stage` by the rules
(`("layers", "stage")`): stage s holds the contiguous rows [s L/S, (s+1) L/S).
With `mesh.pipeline_repeats` R > 1 (circular schedule) the stack is viewed as
[R, S, L', ...] (L' = L / (S R)) and stage s runs the blocks r S L' + s L' + [0, L')
for r = 0..R-1: a microbatch goes round the ring of stages R times. (The params
stay stored in layer order, sharded contiguously, so checkpoints are the same
for every mesh; for R > 1 the step regroups them into the round-robin blocks,
one all-to-all over `stage` per step and its transpose for the gradient.)

Schedule (`schedule`). The batch [B, ...] is cut into M microbatches (rows j,
j + M, ...: each data shard keeps its share). At tick t stage s works on the
virtual index i = t - s, microbatch i mod M of repeat i div M, when 0 <= i < R M
(else it idles). After every tick each stage passes its output to its neighbour
s + 1 with one `ppermute` (stage S-1 to stage 0: the next repeat, or the
finished output). That needs M >= S (a microbatch comes back to stage 0 no
sooner than it is due). T = R M + S - 1 ticks, S R M busy stage-ticks of S T:
bubble (S - 1) / (R M + S - 1). The backward is jax.grad through the loop
(the transposed ppermutes run the ticks in reverse): GPipe, all M microbatches'
activations (or their remat inputs) held per stage.

Embedding and head. They run outside the pipelined region, on every stage
(replicated over `stage`, sharded over data / fsdp / tensor as usual): the
embedding is a gather and the head one matmul + loss per token, small next to
L / S layers, and keeping them out of the stage loop keeps the stage function
one uniform block of layers (every stage the same program, as shard_map
needs) and the loss code unchanged. The cost is redundant embed/head compute
on the S stage groups and their weights held replicated over `stage`.

Inside a stage `jax.shard_map` is manual over `stage` only; data, fsdp,
context, expert and tensor stay automatic: the model's `constrain` calls pin
the activations as usual, under `use_mesh` of the body's abstract mesh. The
model's own shard_maps (ring attention over `context`, the MoE all-to-all
over `expert`) take that abstract mesh from `active_mesh()` and nest: jax
makes manual only the axes not already manual (`stage` stays as it is). The
causal load-balancing reorder of the sequence (sharding/context.py) is done
on the batch before the layers; the microbatch split is along rows, so every
microbatch keeps the balanced order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..errors import ConfigError
from .rules import active_mesh, use_mesh


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The static pipeline settings a train step is compiled with (stages: the mesh's)."""
    microbatches: int
    repeats: int = 1


def pipeline_of(cfg) -> Pipeline | None:
    """The Pipeline of a full Config, or None when mesh.stage is 1."""
    if cfg.mesh.stage == 1:
        return None
    return Pipeline(microbatches_of(cfg), cfg.mesh.pipeline_repeats)


def microbatches_of(cfg) -> int:
    return cfg.train.pipeline_microbatches or cfg.mesh.stage


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle fraction of stage-ticks: (S - 1) / (R M + S - 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def schedule(stages: int, microbatches: int, repeats: int = 1):
    """(microbatch [T, S], repeat [T, S]) int32 tables, -1 where stage s idles at tick t."""
    s_, m_, r_ = stages, microbatches, repeats
    ticks = r_ * m_ + s_ - 1
    i = np.arange(ticks)[:, None] - np.arange(s_)[None, :]
    busy = (i >= 0) & (i < r_ * m_)
    mb = np.where(busy, i % m_, -1).astype(np.int32)
    rep = np.where(busy, i // m_, -1).astype(np.int32)
    return mb, rep


def check_pipeline_config(cfg) -> None:
    """The mesh.stage checks a Config can make without devices (one line naming the key)."""
    s, r = cfg.mesh.stage, cfg.mesh.pipeline_repeats
    m = cfg.train.pipeline_microbatches
    if m < 0:
        raise ConfigError(f"train.pipeline_microbatches={m} must be >= 0 (0: one per stage)")
    if s == -1:
        raise ConfigError("mesh.stage=-1: give the number of pipeline stages explicitly")
    if s == 1:
        return
    mc = cfg.model
    if mc.family != "decoder":
        raise ConfigError(f"mesh.stage={s}: pipeline parallelism supports model.family="
                          f"'decoder' only, not {mc.family!r}")
    if mc.n_layers % (s * r):
        raise ConfigError(f"model.n_layers={mc.n_layers} does not divide into mesh.stage={s} x "
                          f"mesh.pipeline_repeats={r} = {s * r} stages")
    m = microbatches_of(cfg)
    if m < s:
        raise ConfigError(f"train.pipeline_microbatches={m} is fewer than mesh.stage={s} stages")
    per_step = cfg.data.batch_size // cfg.train.grad_accum_steps
    if per_step % m:
        raise ConfigError(f"train.pipeline_microbatches={m} does not divide the batch of "
                          f"{per_step} rows (data.batch_size / train.grad_accum_steps)")
    if mc.positions in ("alibi", "t5_relative"):
        raise ConfigError(f"model.positions={mc.positions!r} (an attention bias) is not "
                          f"supported with pipeline stages (mesh.stage={s})")


def check_pipeline_mesh(cfg, sizes: dict[str, int]) -> None:
    """With the mesh resolved: every microbatch must split over the batch's mesh axes."""
    if cfg.mesh.stage == 1:
        return
    m = microbatches_of(cfg)
    rows = cfg.data.batch_size // cfg.train.grad_accum_steps // m
    shards = math.prod(sizes[a] for a in (dict(cfg.mesh.rules).get("batch") or ()))
    if rows % shards:
        raise ConfigError(f"train.pipeline_microbatches={m}: a microbatch of {rows} rows does "
                          f"not divide over the {shards} batch shards of the mesh "
                          "(data.batch_size must divide by microbatches x data axes)")


def stage_count() -> int:
    """Stages of the active mesh (1: none, or no mesh)."""
    active = active_mesh()
    return 1 if active is None else dict(active[0].shape).get("stage", 1)


def split_microbatches(x, m: int):
    """[B, ...] -> [M, B/M, ...]; microbatch j holds rows j, j + M, ..."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def merge_microbatches(x):
    """[M, B/M, ...] -> [B, ...], the inverse of `split_microbatches`."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipelined_layers(stage_fn, layers, x, side, pipe: Pipeline):
    """Run the layer stack over the stages of the active mesh.

    stage_fn(layers [L', ...], x [b, S, D], side_b) -> (x [b, S, D], stats summed over
    its L' layers) runs one microbatch through one block of layers (b = B / M).
    layers: the stacked tree [L, ...]; x [B, S, D]; side: a tree of [B, ...] per-row
    inputs (positions, segment ids) cut into microbatches with x.
    Returns (x [B, S, D] after all L layers, stats summed over microbatches and
    layers, {"busy": busy stage-ticks, "ticks": T}).
    """
    mesh, rules = active_mesh()
    n_stage = dict(mesh.shape)["stage"]
    m, r = pipe.microbatches, pipe.repeats
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    per_block = n_layers // (n_stage * r)
    blocks = jax.tree.map(lambda w: w.reshape(r, n_stage, per_block, *w.shape[1:]), layers)
    xs = split_microbatches(x, m)
    sides = jax.tree.map(lambda a: split_microbatches(a, m), side)
    mb_table, rep_table = schedule(n_stage, m, r)
    ticks = mb_table.shape[0]
    ring = [(i, (i + 1) % n_stage) for i in range(n_stage)]

    def local(blocks, xs, sides):
        blocks = jax.tree.map(lambda w: w[:, 0], blocks)  # [R, L', ...]: this stage's blocks
        s = jax.lax.axis_index("stage")
        mb_t, rep_t = jnp.asarray(mb_table), jnp.asarray(rep_table)
        with use_mesh(jax.sharding.get_abstract_mesh(), rules):
            shapes = jax.eval_shape(stage_fn, jax.tree.map(lambda w: w[0], blocks), xs[0],
                                    jax.tree.map(lambda a: a[0], sides))
            zero_stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[1])

            def tick(carry, t):
                buf, state, stats, busy = carry
                mb, rep = mb_t[t, s], rep_t[t, s]
                valid = mb >= 0
                mb0, rep0 = jnp.maximum(mb, 0), jnp.maximum(rep, 0)
                inp = jnp.where(s == 0, jax.lax.dynamic_index_in_dim(buf, mb0, keepdims=False),
                                state)
                out, st = stage_fn(
                    jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, rep0, keepdims=False),
                                 blocks), inp,
                    jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, mb0, keepdims=False),
                                 sides))
                stats = jax.tree.map(lambda a, b: a + jnp.where(valid, b, 0).astype(a.dtype),
                                     stats, st)
                recv = jax.lax.ppermute(out, "stage", ring)
                # stage 0 keeps what stage S-1 finished: the next repeat's input or the output
                done = mb_t[t, n_stage - 1]
                slot = jnp.maximum(done, 0)
                keep = (s == 0) & (done >= 0)
                old = jax.lax.dynamic_index_in_dim(buf, slot, keepdims=False)
                buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, recv, old), slot, 0)
                return (buf, recv, stats, busy + valid.astype(jnp.int32)), None

            init = (xs, jnp.zeros_like(xs[0]), zero_stats, jnp.zeros((), jnp.int32))
            (buf, _, stats, busy), _ = jax.lax.scan(tick, init, jnp.arange(ticks))
        stats = jax.tree.map(lambda a: jax.lax.psum(a, "stage"), stats)
        return buf[None], stats, jax.lax.psum(busy, "stage")

    run = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "stage"), P(), P()),
                        out_specs=(P("stage"), P(), P()), axis_names={"stage"},
                        check_vma=False)
    out, stats, busy = run(blocks, xs, sides)
    return merge_microbatches(out[0]), stats, {"busy": busy, "ticks": ticks}


def pipeline_summary(cfg) -> str:
    """One line: stages, repeats, microbatches and the bubble of `cfg`'s schedule."""
    s, r, m = cfg.mesh.stage, cfg.mesh.pipeline_repeats, microbatches_of(cfg)
    kind = f"circular GPipe, {r} repeats" if r > 1 else "GPipe"
    return (f"pipeline: {s} stages x {cfg.model.n_layers // (s * r)} layers per block, "
            f"{m} microbatches ({kind}): bubble {bubble_fraction(s, m, r):.1%} "
            f"= (S-1)/({'R*' if r > 1 else ''}M+S-1)")
