"""The train state pytree and its sharded creation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.model import model_specs
from jaxlm.model.params import abstract, initialize, logical_axes
from jaxlm.sharding.rules import tree_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def state_shardings(cfg, mesh, tx):
    """Shardings of every leaf: params by their logical axes, optimizer
    moments like the params they follow, everything else replicated."""
    specs = model_specs(cfg.model)
    param_sh = tree_shardings(mesh, logical_axes(specs), cfg.mesh.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract(specs))
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def abstract_state(cfg, mesh, tx):
    """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
    shardings = state_shardings(cfg, mesh, tx)
    shapes = jax.eval_shape(lambda: _new_state(cfg, tx, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def create_state(cfg, mesh, tx, seed: int) -> TrainState:
    """Initialise params and optimizer state directly with their shardings."""
    init = jax.jit(lambda key: _new_state(cfg, tx, key), out_shardings=state_shardings(cfg, mesh, tx))
    return init(jax.random.key(seed))


def _new_state(cfg, tx, key):
    params = initialize(model_specs(cfg.model), key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
