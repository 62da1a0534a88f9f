"""Orbax checkpoints of the train state and the data iterator state.

A run directory holds `config.yaml`, `tokenizer.model`, `metrics.jsonl` and
`checkpoints/<step>/{state,data}`. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never shows
up as the latest checkpoint.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxlm.errors import CheckpointError

CHECKPOINTS = "checkpoints"


def manager(run_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    path = os.path.abspath(os.path.join(run_dir, CHECKPOINTS))
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(path, options=options, item_names=("state", "data"))


def _as_dict(state):
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save(mngr: ocp.CheckpointManager, state, data_state: dict, force: bool = False):
    """Start an async save of step `state.step` (returns before it is written)."""
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(_as_dict(state)),
                                            data=ocp.args.JsonSave(data_state)), force=force)


def _restore_args(abstract_tree):
    return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def latest_step(run_dir: str) -> int | None:
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        return None
    return manager(run_dir, read_only=True).latest_step()


def restore_state(mngr, abstract_state, step: int | None = None):
    """Restore (train state, data iterator state) into the given shardings."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    target = _as_dict(abstract_state)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
            data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} could not be read: "
                              f"{_one_line(e)}") from None
    s = out["state"]
    state = type(abstract_state)(step=s["step"], params=s["params"], opt_state=s["opt_state"])
    return state, out["data"]


def restore_params(run_dir: str, abstract_params, step: int | None = None, shardings=None):
    """Only the params of a checkpoint (the optimizer state is not read).

    shardings: None, or a tree of Shardings matching abstract_params: each leaf is
    restored straight into its sharding (orbax reads each device's slice), cast to
    the abstract dtype. Shapes are checked against the checkpoint's metadata first.
    """
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        raise CheckpointError(f"{run_dir} has no {CHECKPOINTS}/ directory: not a jaxlm run dir")
    mngr = manager(run_dir, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {mngr.directory}")
    if shardings is not None:
        abstract_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_params, shardings)
    _check_stored_shapes(mngr, step, abstract_params)
    target = {"params": abstract_params}
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args(target), partial_restore=True)))
    except Exception as e:
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} could not be read: "
                              f"{_one_line(e)}") from None
    params = out["state"]["params"]
    _check_shapes(params, abstract_params)
    return params


def _check_stored_shapes(mngr, step: int, abstract_params):
    """CheckpointError naming the first param whose stored shape differs (when the
    checkpoint's metadata can be read; else the restore itself reports)."""
    try:
        meta = ocp.PyTreeCheckpointer().metadata(
            os.path.join(str(mngr.directory), str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)  # StepMetadata (newer orbax)
        stored = getattr(meta, "tree", meta)["params"]
    except Exception:  # corrupt metadata: the restore below gives the error
        return
    flat = dict(jax.tree_util.tree_leaves_with_path(stored))
    for path, want in jax.tree_util.tree_leaves_with_path(abstract_params):
        got = flat.get(path)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                                  f"{tuple(got.shape)}, the config expects {tuple(want.shape)}")


def _check_shapes(params, abstract_params):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(abstract_params)):
        if a.shape != b.shape:
            raise CheckpointError(f"checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                                  f"{a.shape}, the config expects {b.shape}")


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
