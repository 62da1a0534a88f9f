"""What keeps a run dir whole: one writer, finite saves, exactly-once metrics.

* `RunDirLock`: an `fcntl.flock` on `<run_dir>/.lock` (holding the pid and
  host), taken before a run writes anything and held for its life; a second
  `jaxlm train` on the same dir is refused with one line naming the holder.
  The OS releases the flock when the holder exits or is killed, so a stale
  file left by a crash is not a lock. Multi-host: process 0 holds it.
* `all_finite(tree)`: one jitted reduction; no save path writes a state
  whose params are not finite.
* `truncate_metrics(path, step)`: after resuming step `step`, the lines of
  later steps (logged by the run that went past it) are dropped, atomically,
  before the resumed run appends its own.
* `stop_signals()`: Ctrl-C and SIGTERM stop a run once; a second signal
  cannot tear the save the first started (`masked_sigint` for the save itself).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading

import jax
import jax.numpy as jnp

from ..errors import ConfigError

LOCK_FILE = ".lock"


class RunDirLock:
    """An exclusive, non-blocking flock on `<run_dir>/.lock` (a context manager)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "RunDirLock":
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise ConfigError(f"run_dir {self.run_dir} is a file, not a directory")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write run_dir {self.run_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock run_dir {self.run_dir}: {e.strerror}") from None
            raise ConfigError(
                f"run_dir {self.run_dir} is in use by another jaxlm train (pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}); wait for it to "
                "finish or choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def run_dir_lock(run_dir: str):
    """The run-dir lock on process 0, nothing on the others (one writer of the dir)."""
    return RunDirLock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one device reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


def truncate_metrics(path: str, step: int) -> int:
    """Drop the lines of `path` whose "step" is after `step` (atomically, by rename);
    returns how many were dropped. A torn last line (a crash mid-write) goes too."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep, dropped = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            later = isinstance(row, dict) and row.get("step", 0) > step
        except (ValueError, TypeError):
            later = True  # unparsable: a torn write
        if later:
            dropped += 1
        else:
            keep.append(raw)
    if dropped:
        rewrite_lines(path, keep)
    return dropped


def rewrite_lines(path: str, lines: list[bytes]) -> None:
    """Replace `path` by these lines, atomically (a temp file, fsynced, renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def masked_sigint():
    """SIGINT (and SIGTERM) ignored inside: a final save runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the loop saves as on Ctrl-C."""


class StopRequest:
    """What `stop_signals` hands the loop: `signum` once a stop was asked for.

    Until the loop `arm`s it (start-up: reading data, compiling), a signal
    raises at once, as nothing is there to save. Armed, a signal only records
    itself: the loop finishes the step it is in, logs, saves and then raises
    (`interrupt()`), so a stop never lands between a step and its bookkeeping.
    """

    def __init__(self):
        self.signum = None
        self.armed = False

    def interrupt(self) -> KeyboardInterrupt:
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def arm(self):
        """From now on a signal ends the current step. A start-up signal whose raise
        was swallowed (it landed in a gc callback, where Python only reports an
        exception) stops the run here, still with nothing to save."""
        if self.signum is not None:
            raise self.interrupt()
        self.armed = True


@contextlib.contextmanager
def stop_signals():
    """Inside: the first SIGINT / SIGTERM stops the run (see `StopRequest`: at once
    during start-up, at the end of the current step once the loop runs); any
    signal after that is ignored, so that the save the first one started runs to
    its end, except that a SIGTERM after a pending Ctrl-C makes the stop a
    preemption (exit 0). Yields the StopRequest."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signum is not None:
            if request.armed and signum == signal.SIGTERM:  # a preemption wins: exit 0
                request.signum = signum  # (Python runs SIGINT's handler first when both wait)
            return
        request.signum = signum
        if not request.armed:
            raise request.interrupt()

    def unraisable(hook_args):  # our start-up raise, swallowed: `arm` raises it again
        if not (request.signum is not None and isinstance(hook_args.exc_value, KeyboardInterrupt)):
            old_hook(hook_args)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield request
    finally:
        sys.unraisablehook = old_hook
        for s, h in old.items():
            signal.signal(s, h)
