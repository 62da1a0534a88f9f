"""Parameters declared once as `Spec` leaves.

From one spec tree come the abstract tree (`jax.ShapeDtypeStruct`, for
planning and sharded init), the initialised tree, and the logical-axes tree
(for sharding). Repeated layers are stacked on a leading `layers` axis.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

Init = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


def normal(std: float) -> Init:
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Init
    dtype: str = "float32"

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x) -> bool:
    return isinstance(x, Spec)


def stack(specs, n: int, axis_name: str = "layers"):
    """Prepend a stacked axis of size n to every spec (for `lax.scan`)."""
    return jax.tree.map(
        lambda s: Spec((n, *s.shape), (axis_name, *s.axes), s.init, s.dtype), specs, is_leaf=is_spec)


def abstract(specs):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), specs,
                        is_leaf=is_spec)


def logical_axes(specs):
    return jax.tree.map(lambda s: LogicalAxes(s.axes), specs, is_leaf=is_spec)


class LogicalAxes(tuple):
    """A tuple of logical axis names; an unregistered tuple subclass, so a pytree leaf."""


def initialize(specs, key: jax.Array):
    """Initialise every leaf from a key folded with a hash of its path.

    The key of a weight depends on its name only, so adding a weight does not
    change the others' values.
    """
    def init_leaf(path, s: Spec):
        name = jax.tree_util.keystr(path)
        leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        return s.init(leaf_key, s.shape, jnp.dtype(s.dtype))
    return jax.tree_util.tree_map_with_path(init_leaf, specs, is_leaf=is_spec)


def count(specs) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))
