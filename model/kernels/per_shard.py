"""Run a Pallas kernel per shard when a mesh is active.

XLA cannot partition a kernel's custom call: given sharded operands it would
gather them and run the whole batch on every device. Under
`jaxlm.sharding.rules.use_mesh` the kernel runs inside `shard_map` instead,
over the mesh axes the rules give "batch" and "heads" / "kv_heads" (the
sequence and head_dim stay whole: a sharded sequence is gathered first).
Heads stay whole when the query and KV heads cannot be split alike (GQA groups
must not straddle shards); an axis that does not divide stays whole too.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from .mask import MaskSpec
from ...sharding.rules import active_mesh


def _axes(rules, name):
    axes = dict(rules).get(name) or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def per_shard(kernel, q, k, v, mask: MaskSpec, bias):
    """kernel(q, k, v, mask, bias), under shard_map when a mesh is active."""
    active = active_mesh()
    if active is None:
        return kernel(q, k, v, mask, bias)
    mesh, rules = active
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    b, h, kvh = q.shape[0], q.shape[2], k.shape[2]
    batch = _axes(rules, "batch")
    batch = batch if b % size(batch) == 0 else ()
    heads, kv_heads = _axes(rules, "heads"), _axes(rules, "kv_heads")
    if heads != kv_heads or h % size(heads) or kvh % size(heads) or set(heads) & set(batch):
        heads = ()
    if size(batch) * size(heads) == 1:
        return kernel(q, k, v, mask, bias)
    bt, hd = _entry(batch), _entry(heads)

    def rows(x):  # [B or 1, ...]: batch-sharded when it has the batch
        return P(bt if x.shape[0] == b else None, *([None] * (x.ndim - 1)))

    names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids", "kv_lengths")
    arrays, same = {}, {}  # one operand per distinct array (q and kv often share theirs)
    for n in names:
        x = getattr(mask, n)
        first = next((m for m, y in arrays.items() if y is x), None)
        if first is not None:
            same[n] = first
        elif x is not None:
            arrays[n] = x
    args = {"q": q, "k": k, "v": v, "mask": arrays}
    specs = {"q": P(bt, None, hd, None), "k": P(bt, None, hd, None), "v": P(bt, None, hd, None),
             "mask": {n: rows(x) for n, x in arrays.items()}}
    if bias is not None:
        args["bias"] = bias
        specs["bias"] = P(bt if bias.shape[0] == b else None, hd, None, None)

    def local(a):
        m = mask._replace(**a["mask"], **{n: a["mask"][first] for n, first in same.items()})
        return kernel(a["q"], a["k"], a["v"], m, a.get("bias"))

    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=specs["q"],
                         check_vma=False)(args)
