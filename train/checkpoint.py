"""Orbax checkpoints of the train state and the data iterator state.

A run directory holds `config.yaml`, `tokenizer.model`, `metrics.jsonl` and
`checkpoints/<step>/{state,data}`. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never shows
up as the latest checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..errors import CheckpointError

CHECKPOINTS = "checkpoints"


def manager(run_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    path = os.path.abspath(os.path.join(run_dir, CHECKPOINTS))
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0)
        with _absl_quiet():  # orbax warns "Given directory is read only" on every open
            return ocp.CheckpointManager(path, options=options, item_names=("state", "data"))
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    return ocp.CheckpointManager(path, options=options, item_names=("state", "data"))


@contextlib.contextmanager
def _absl_quiet(level: int = logging.ERROR):
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _as_dict(state):
    out = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if getattr(state, "skipped", None) is not None:  # consecutive non-finite steps skipped
        out["skipped"] = state.skipped
    return out


def _stored_keys(mngr, step) -> set | None:
    """The top-level keys of step `step`'s stored state, or None when unreadable."""
    try:
        with _loop_kept_on_failure(), _absl_quiet(logging.CRITICAL):
            meta = ocp.PyTreeCheckpointer().metadata(
                os.path.join(str(mngr.directory), str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)
        return set(getattr(meta, "tree", meta))
    except Exception:  # corrupt: the restore itself reports
        return None


def save(mngr: ocp.CheckpointManager, state, data_state: dict, force: bool = False):
    """Start an async save of step `state.step` (returns before it is written)."""
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(_as_dict(state)),
                                            data=ocp.args.JsonSave(data_state)), force=force)


def no_space(e: BaseException | None) -> bool:
    """Whether `e` (or an exception it was raised from) is a full disk: an OSError
    ENOSPC, or orbax / tensorstore's error naming it ("No space left on device")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _NoSpaceFilter(logging.Filter):
    """Drops orbax's log records of a write that failed on a full disk (one per writer
    thread, with its traceback): the run reports the full disk in one line."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (no_space(exc) or "No space left on device" in record.getMessage()
                    or "RESOURCE_EXHAUSTED" in record.getMessage())


@contextlib.contextmanager
def quiet_full_disk():
    """While saving: a full disk is reported once, by the caller, not by orbax's
    threads. Their log records (absl) of the failed write are dropped, and so are the
    tracebacks that tensorstore's callbacks print through sys.excepthook after the
    write's event loop closed ("Event loop is closed"), or for the failed write."""
    log = logging.getLogger("absl")
    flt = _NoSpaceFilter()
    hook = sys.excepthook

    def excepthook(kind, value, tb):
        if no_space(value) or (isinstance(value, RuntimeError)
                               and str(value) == "Event loop is closed"):
            return
        hook(kind, value, tb)

    log.addFilter(flt)
    sys.excepthook = excepthook
    try:
        yield
    finally:
        log.removeFilter(flt)
        sys.excepthook = hook


def _restore_args(abstract_tree):
    return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def latest_step(run_dir: str) -> int | None:
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        return None
    return manager(run_dir, read_only=True).latest_step()


SET_ASIDE = "checkpoints.set-aside"


def set_aside_after(mngr: ocp.CheckpointManager, run_dir: str, step: int) -> list[int]:
    """Move the checkpoints after `step` to `<run_dir>/checkpoints.set-aside/`
    (resuming an earlier step: the run will write those steps again)."""
    later = sorted(s for s in mngr.all_steps() if s > step)
    if not later:
        return []
    dest = os.path.join(run_dir, SET_ASIDE)
    os.makedirs(dest, exist_ok=True)
    for s in later:
        src = os.path.join(str(mngr.directory), str(s))
        target = os.path.join(dest, str(s))
        n = 1
        while os.path.exists(target):
            target, n = os.path.join(dest, f"{s}.{n}"), n + 1
        os.rename(src, target)
    mngr.reload()
    return later


def restore_state(mngr, abstract_state, step: int | None = None):
    """Restore (train state, data iterator state) into the given shardings: the
    latest step, or `step`. A step that cannot be read (or holds non-finite
    params) is a one-line CheckpointError naming the latest earlier intact step."""
    full = _as_dict(abstract_state)

    def read(s):
        target = dict(full)
        keys = _stored_keys(mngr, s)
        if keys is not None and "skipped" not in keys:  # written before skip counting
            target.pop("skipped", None)
        return mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target)),
            data=ocp.args.JsonRestore()))

    out, _ = _restore_verified(mngr, step, read, lambda out: out["state"]["params"],
                               "--resume --step {}")
    s = out["state"]
    skipped = s.get("skipped")
    if skipped is None and "skipped" in full:  # an older checkpoint: no skips in a row
        a = full["skipped"]
        skipped = jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
    state = type(abstract_state)(step=s["step"], params=s["params"], opt_state=s["opt_state"],
                                 skipped=skipped)
    return state, out["data"]


def restore_params(run_dir: str, abstract_params, step: int | None = None, shardings=None,
                   under: str | None = None):
    """Only the params of a checkpoint (the optimizer state is not read).

    shardings: None, or a tree of Shardings matching abstract_params: each leaf is
    restored straight into its sharding (orbax reads each device's slice), cast to
    the abstract dtype. Shapes are checked against the checkpoint's metadata first.
    under: the key of the params' subtree to read (a PPO run's "policy"), or None.
    """
    if not os.path.isdir(os.path.join(run_dir, CHECKPOINTS)):
        raise CheckpointError(f"{run_dir} has no {CHECKPOINTS}/ directory: not a jaxlm run dir")
    mngr = manager(run_dir, read_only=True)
    if shardings is not None:
        abstract_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_params, shardings)
    wanted = mngr.latest_step() if step is None else step
    if isinstance(wanted, int) and wanted in mngr.all_steps():
        _check_stored_shapes(mngr, wanted, abstract_params, under)
    target = {"params": abstract_params if under is None else {under: abstract_params}}

    def read(s):
        return mngr.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args(target), partial_restore=True)))

    out, _ = _restore_verified(mngr, step, read, lambda out: out["state"]["params"],
                               "--step {0} (jaxlm.load(path, step={0}))")
    params = out["state"]["params"]
    params = params if under is None else params[under]
    _check_shapes(params, abstract_params)
    return params


def _check_stored_shapes(mngr, step: int, abstract_params, under: str | None = None):
    """CheckpointError naming the first param whose stored shape differs (when the
    checkpoint's metadata can be read; else the restore itself reports)."""
    try:
        with _loop_kept_on_failure(), _absl_quiet(logging.CRITICAL):  # a corrupt step: below
            meta = ocp.PyTreeCheckpointer().metadata(
                os.path.join(str(mngr.directory), str(step), "state"))
        meta = getattr(meta, "item_metadata", meta)  # StepMetadata (newer orbax)
        stored = getattr(meta, "tree", meta)["params"]
        stored = stored if under is None else stored[under]
    except Exception:  # corrupt metadata: the restore below gives the error
        return
    flat = dict(jax.tree_util.tree_leaves_with_path(stored))
    for path, want in jax.tree_util.tree_leaves_with_path(abstract_params):
        got = flat.get(path)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                                  f"{tuple(got.shape)}, the config expects {tuple(want.shape)}")


def _restore_verified(mngr, step, read, params_of, how: str):
    """read(step) checked (readable, finite params); on failure, one line that
    names the step and the latest earlier step that reads back intact."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {mngr.directory}")
    if step is None:
        step = steps[-1]
    elif not isinstance(step, int) or isinstance(step, bool) or step not in steps:
        raise CheckpointError(f"no checkpoint of step {step!r} in {mngr.directory} "
                              f"(steps: {', '.join(map(str, steps))})")
    problem = _try_read(read, params_of, step)
    if isinstance(problem, str):
        intact = next((s for s in reversed(steps) if s < step
                       and not isinstance(_try_read(read, params_of, s), str)), None)
        hint = (f"step {intact} is intact: choose it with {how.format(intact)}"
                if intact is not None else "no earlier step is intact")
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} could not be read "
                              f"({problem}); {hint}")
    return problem, step


def _try_read(read, params_of, step):
    """The restored tree, or a one-line reason why step `step` is not usable."""
    from .guard import all_finite
    try:
        with _loop_kept_on_failure(), _absl_quiet(logging.CRITICAL):  # the error says it all
            out = read(step)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        return _one_line(e)
    if not all_finite(params_of(out)):
        return "its params are not finite"
    return out


def _check_shapes(params, abstract_params):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(abstract_params)):
        if a.shape != b.shape:
            raise CheckpointError(f"checkpoint tensor {jax.tree_util.keystr(path)} has shape "
                                  f"{a.shape}, the config expects {b.shape}")


@contextlib.contextmanager
def _loop_kept_on_failure():
    """Orbax runs a restore in a fresh event loop and closes it when the first read
    fails; the reads still in flight then call back into the closed loop and
    tensorstore prints a traceback for each. On failure the loop is left open
    (those callbacks land in it harmlessly) and silent (their never-retrieved
    exceptions are not logged); on success it is closed as before."""
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:
        yield
        return
    original = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if original is None:
        yield
        return

    def run(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            result = loop.run_until_complete(coro)
        except BaseException:
            # The reads still in flight fail too; when their tasks are collected the
            # loop would log "Task exception was never retrieved" with a traceback
            # for each. The first failure is the one reported.
            loop.set_exception_handler(lambda _loop, _context: None)
            raise
        finally:
            asyncio.set_event_loop(None)
        loop.close()
        return result

    asyncio_utils._run_sync_via_new_loop = run
    try:
        yield
    finally:
        asyncio_utils._run_sync_via_new_loop = original


def _one_line(e: Exception) -> str:
    """A short reason: the root cause's first line, never a multi-line repr."""
    chain = []
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in reversed(chain):  # the root cause names the file; wrappers add reprs
        text = [line for line in str(err).strip().splitlines() if line.strip()]
        if text and not text[0].startswith("<") and "pybind11" not in text[0]:
            return text[0][:240] if len(text[0]) > 20 else f"{type(err).__name__}: {text[0]}"
    return type(chain[0]).__name__
