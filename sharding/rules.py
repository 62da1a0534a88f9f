"""Logical axes -> mesh axes, and activation constraints.

`constrain(x, ("batch", "seq", "embed"))` is the identity unless a mesh and a
rules table are active (`with use_mesh(mesh, rules): ...` around tracing), in
which case it pins the activation's sharding. Model code only ever names
logical axes.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding, PartitionSpec

_ACTIVE = contextvars.ContextVar("jaxlm_mesh", default=None)


def partition_spec(axes, rules) -> PartitionSpec:
    """Map a tuple of logical axis names to a PartitionSpec under `rules`."""
    table = dict(rules)
    used = set()
    out = []
    for name in axes:
        mesh_axes = table.get(name) if name is not None else None
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def named_sharding(mesh, axes, rules) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, rules))


def tree_shardings(mesh, axes_tree, rules):
    from jaxlm.model.params import LogicalAxes
    return jax.tree.map(lambda a: named_sharding(mesh, a, rules), axes_tree,
                        is_leaf=lambda x: isinstance(x, LogicalAxes))


@contextlib.contextmanager
def use_mesh(mesh, rules):
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    """(mesh, rules) of the enclosing `use_mesh`, or None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, rules))
