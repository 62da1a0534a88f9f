"""Logical axes -> mesh axes, and activation constraints.

`constrain(x, ("batch", "seq", "embed"))` is the identity unless a mesh and a
rules table are active (`with use_mesh(mesh, rules): ...` around tracing), in
which case it pins the activation's sharding. Model code only ever names
logical axes.

The mesh and rules reach traced code in a way jit keys on: `use_mesh` enters
`jax.set_mesh(mesh)` (jit keys on the mesh in context; raw PartitionSpecs
work under it) and puts (mesh, rules as a hashable tuple) into a jit-keyed
user context (`jax.make_user_context`), which `active_mesh` reads. A function
traced outside a mesh is therefore retraced inside one (and the reverse), and
changing only the rules retraces.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

# (mesh, rules) of the enclosing `use_mesh` (rules: a tuple of (logical, mesh
# axes)), or None. A jit-keyed user context: a change of value is a tracing
# cache miss, so no cached trace outlives the mesh it was traced under.
_ACTIVE = jax.make_user_context(default_value=None)


def partition_spec(axes, rules) -> PartitionSpec:
    """Map a tuple of logical axis names to a PartitionSpec under `rules`."""
    table = dict(rules)
    used = set()
    out = []
    for name in axes:
        mesh_axes = table.get(name) if name is not None else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def named_sharding(mesh, axes, rules) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, rules))


def tree_shardings(mesh, axes_tree, rules):
    from ..model.params import LogicalAxes
    return jax.tree.map(lambda a: named_sharding(mesh, a, rules), axes_tree,
                        is_leaf=lambda x: isinstance(x, LogicalAxes))


def _hashable_rules(rules) -> tuple:
    """((logical, mesh axes tuple or None), ...): lists from YAML become tuples."""
    def axes(v):
        if v is None or isinstance(v, str):
            return v
        return tuple(v)
    return tuple((str(name), axes(v)) for name, v in (dict(rules).items()
                                                        if isinstance(rules, dict) else rules))


@contextlib.contextmanager
def use_mesh(mesh, rules):
    """Make (mesh, rules) active: for tracing (jit keys on both) and for eager code.

    Outside jit it enters `jax.set_mesh(mesh)`; inside a trace (where set_mesh
    is refused) `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`."""
    sets_mesh = _set_mesh(mesh)
    with sets_mesh, _ACTIVE((mesh, _hashable_rules(rules))):
        yield


def _set_mesh(mesh):
    try:
        return jax.set_mesh(mesh)
    except ValueError:  # inside jit: "set_mesh can only be used outside of jax.jit"
        return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def active_mesh():
    """(mesh, rules) of the enclosing `use_mesh`, or None: the concrete
    `jax.sharding.Mesh` (what NamedSharding and `jax.shard_map` take) and the
    rules as a tuple of (logical axis, mesh axes)."""
    return _ACTIVE.value


def constrain(x: jax.Array, axes) -> jax.Array:
    active = active_mesh()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, rules))
