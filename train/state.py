"""The train state pytree and its sharded creation.

Three kinds of run share one state type:

* plain: `params` are the model's, `frozen` is None;
* LoRA / QLoRA (`train.lora.rank` > 0): `params` are the adapters only (the
  optimizer's whole world), `frozen` the base (int8 `QuantizedWeight` leaves
  under QLoRA), never updated, never donated;
* DPO / KTO without LoRA (`train.objective=dpo|kto`): `frozen` is a copy of the
  starting params, the reference policy. (With LoRA the base alone is the
  reference: no second copy.) ORPO and SimPO (train.dpo.loss) need no reference:
  `frozen` is None (or the LoRA base). GRPO with train.grpo.beta > 0 likewise keeps
  one; with beta 0 it keeps no reference (`frozen` None without LoRA).
* PPO (`train.objective=ppo`): `params` is {"policy": the policy's params (LoRA: its
  adapters), "value": the value model's}, one optimizer over both (TRL's
  PolicyAndValueWrapper); `frozen` the reference as GRPO's (with LoRA the base). The
  reward model is not in the state: the rollouts hold it (train/ppo.py).
* distillation (`train.objective=distill`): `frozen` is the teacher, another model's
  params (train.distill.teacher), read into its shardings by `distill.load_teacher`
  and attached after the state is made (`with_teacher`): it is never a jit output,
  so no step or init copies it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from ..model import model_specs
from ..model.params import abstract, initialize, logical_axes
from ..sharding.rules import tree_shardings
from . import lora


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    frozen: Any = None
    skipped: Any = None  # int32 []: consecutive non-finite steps skipped (train/step.py)


def needs_frozen(cfg) -> bool:
    """Whether the state holds a frozen tree made from the starting params (LoRA base,
    DPO / KTO reference), rebuilt from train.init_from on a resume. (A distillation
    teacher is frozen too, but read from train.distill.teacher: `with_teacher`.)"""
    return bool(cfg.train.lora.rank) or needs_reference(cfg.train)


def needs_reference(tcfg) -> bool:
    """Whether the objective compares the policy with a frozen reference: DPO / IPO, KTO,
    PPO and GRPO with a KL penalty (train.grpo.beta != 0) do; ORPO, SimPO
    (train.dpo.loss) and the others do not."""
    return (tcfg.objective in ("kto", "ppo")
            or (tcfg.objective == "dpo" and not tcfg.dpo.reference_free)
            or (tcfg.objective == "grpo" and tcfg.grpo.beta != 0.0))


def _has_frozen(cfg) -> bool:
    return needs_frozen(cfg) or cfg.train.objective == "distill"


def _made_shardings(cfg, shardings):
    """The shardings of what init / restore make: all but a teacher, attached later."""
    return shardings.replace(frozen=None) if cfg.train.objective == "distill" else shardings


def state_shardings(cfg, mesh, tx):
    """Shardings of every leaf: params (or adapters) and the frozen tree by their
    logical axes, optimizer moments like the params they follow, everything
    else replicated."""
    specs = lora.trainable_specs(cfg)
    param_sh = tree_shardings(mesh, logical_axes(specs), cfg.mesh.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, abstract(specs))
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    frozen_sh = None
    if cfg.train.objective == "distill":
        from .distill import teacher_shardings
        frozen_sh = teacher_shardings(cfg, mesh)
    elif _has_frozen(cfg):
        frozen_sh = tree_shardings(mesh, lora.frozen_axes(cfg.model, cfg.train), cfg.mesh.rules)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, frozen=frozen_sh,
                      skipped=replicated)


def abstract_state(cfg, mesh, tx):
    """ShapeDtypeStructs with shardings: the target for restoring a checkpoint."""
    shardings = _made_shardings(cfg, state_shardings(cfg, mesh, tx))
    shapes = jax.eval_shape(lambda: _new_state(cfg, tx, jax.random.key(0), None))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def create_state(cfg, mesh, tx, seed: int, params=None) -> TrainState:
    """The train state, created directly with its shardings.

    `params`: the starting (base) params, e.g. a loaded checkpoint; None:
    initialised from `seed`. LoRA runs hold them frozen (int8 under QLoRA)
    beside fresh adapters; DPO runs without LoRA keep a frozen copy as the
    reference policy; a distillation state's teacher comes after (`with_teacher`).
    PPO: {"policy": the starting params, "value": the value model's}
    (`jaxlm.train.ppo.initial_params`).
    """
    shardings = _made_shardings(cfg, state_shardings(cfg, mesh, tx))
    key = jax.random.key(seed)
    if params is None:
        init = jax.jit(lambda key: _new_state(cfg, tx, key, None), out_shardings=shardings)
        return init(key)
    base_sh = tree_shardings(mesh, logical_axes(model_specs(cfg.model)), cfg.mesh.rules)
    if cfg.train.objective == "ppo":
        from .ppo import value_config
        base_sh = {"policy": base_sh, "value": tree_shardings(
            mesh, logical_axes(model_specs(value_config(cfg))), cfg.mesh.rules)}
    params = jax.device_put(params, base_sh)
    init = jax.jit(lambda key, p: _new_state(cfg, tx, key, p), out_shardings=shardings)
    return init(key, params)


def create_lora_state(cfg, mesh, tx, base_params, seed: int) -> TrainState:
    """A LoRA (QLoRA) state: `base_params` frozen (quantized), adapters from `seed`."""
    if not cfg.train.lora.rank:
        raise ValueError("create_lora_state needs train.lora.rank > 0")
    return create_state(cfg, mesh, tx, seed, base_params)


def with_teacher(cfg, mesh, state: TrainState, step: int | None = None) -> TrainState:
    """A distillation state (new or restored) with the teacher as its frozen tree (a
    jaxlm teacher's checkpoint `step`: default its latest), read straight into its
    shardings; other states unchanged."""
    if cfg.train.objective != "distill":
        return state
    from .distill import load_teacher
    return state.replace(frozen=load_teacher(cfg, mesh, step))


def _frozen(cfg, base):
    """The frozen tree made from the starting params: the (quantized) LoRA base, or the
    DPO reference policy (its own buffers); None for other runs."""
    if cfg.train.lora.rank:
        fmt = cfg.train.lora.base_dtype
        return base if fmt == "same" else lora.quantize_base(base, cfg.model, fmt)
    if needs_reference(cfg.train):
        return jax.tree.map(jnp.copy, base)
    return None


def attach_frozen(cfg, mesh, state: TrainState, base) -> TrainState:
    """A restored state (checkpoints hold no frozen tree) with its frozen tree rebuilt
    from the starting params `base` (train.init_from, placed in its shardings)."""
    if not _has_frozen(cfg):
        return state
    if base is None:
        raise ValueError("attach_frozen: this run needs its starting params (train.init_from)")
    sh = tree_shardings(mesh, lora.frozen_axes(cfg.model, cfg.train), cfg.mesh.rules)
    frozen = jax.jit(lambda p: _frozen(cfg, p), out_shardings=sh)(base)
    return state.replace(frozen=frozen)


def _new_state(cfg, tx, key, base):
    value = None
    if cfg.train.objective == "ppo":  # base: {"policy", "value"} (None: both initialised)
        from .ppo import value_config
        value = (initialize(model_specs(value_config(cfg)), jax.random.fold_in(key, 2))
                 if base is None else jax.tree.map(jnp.copy, base["value"]))
        base = None if base is None else base["policy"]
    given = base is not None
    if not given:
        base = initialize(model_specs(cfg.model), key)
    frozen = _frozen(cfg, base)
    if cfg.train.lora.rank:
        params = initialize(lora.lora_specs(cfg.model, cfg.train), jax.random.fold_in(key, 1))
    else:
        params = jax.tree.map(jnp.copy, base) if given else base  # own buffers: donated
    if value is not None:
        params = {"policy": params, "value": value}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      frozen=frozen, skipped=jnp.zeros((), jnp.int32))
