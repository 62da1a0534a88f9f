"""Multi-host start-up and placing host batches on a (possibly multi-process) mesh.

`initialize` must run before anything touches the devices: it calls
`jax.distributed.initialize` with an explicit coordinator (`--coordinator
host:port --num-processes N --process-id i`), or with no arguments where the
environment describes the job (Cloud TPU pods, SLURM with more than one
task), which JAX detects itself. One process: nothing to do.

Each process then reads its own share of the documents (`make_batches(...,
process_index, process_count)`) into `batch_size / process_count` rows, and
`put_batch` assembles the global batch with
`jax.make_array_from_process_local_data` (one process: `jax.device_put`).
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax

from ..errors import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = 300.0) -> bool:
    """Start jax.distributed when asked or when the environment is multi-host
    (waiting up to `timeout_s` for every process). Returns whether it was started."""
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id={process_id} must be in [0, --num-processes="
                              f"{num_processes})")
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator={coordinator!r} must be host:port")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU hosts: collectives over gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not timeout_s > 0:
            raise ConfigError(f"--coordinator-timeout={timeout_s} must be > 0 seconds")
        print(f"process {process_id}: waiting up to {timeout_s:g}s for the coordinator "
              f"{coordinator} and all {num_processes} processes", file=sys.stderr, flush=True)
        if process_id != 0:  # XLA aborts the process (no exception) on an unreachable one
            _wait_for_coordinator(coordinator, timeout_s)
        try:
            jax.distributed.initialize(coordinator_address=coordinator,
                                       num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=max(1, int(timeout_s)))
        except Exception as e:  # noqa: BLE001 - XLA raises bare runtime errors here
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--coordinator {coordinator}: not all {num_processes} processes "
                              f"connected within {timeout_s:g}s (--coordinator-timeout); is "
                              "process 0 running there, and the port reachable?") from None
        return True
    if num_processes is not None or process_id is not None:
        raise ConfigError("--num-processes/--process-id need --coordinator host:port")
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in \
            os.environ or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()  # JAX reads the cluster from the environment
        return True
    return False


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Until process 0's coordinator accepts a TCP connection at `address`, or a
    one-line ConfigError after timeout_s."""
    host, _, port = address.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(f"--coordinator={address!r}: the port must be a number") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port),
                                          timeout=max(0.1, min(2.0, timeout_s))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"--coordinator {address}: no coordinator answered within {timeout_s:g}s "
                    f"(--coordinator-timeout; last error: {e.strerror or e}); start process 0 "
                    "first, and check the host and port") from None
            time.sleep(0.25)


def local_batch_size(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ConfigError(f"data.batch_size={global_batch} does not divide over {n} processes")
    return global_batch // n


def local_rows(batch: dict, global_batch: int) -> dict:
    """This process's block of rows of a batch (a dict of arrays, nested for DPO pairs)
    that every process built whole."""
    n = local_batch_size(global_batch)
    i = jax.process_index()
    return jax.tree.map(lambda v: v[i * n:(i + 1) * n], batch)


def put_batch(batch: dict, sharding):
    """Host batch (this process's rows) -> one global jax.Array per key."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v), batch)


def fetch(tree):
    """`jax.device_get`, also for arrays that span other processes' devices: those are
    gathered whole to every process (`process_allgather`, a collective: every process
    must call it with the same tree)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def share_from_zero(obj):
    """Process 0's `obj` (JSON-serialisable), in every process (one process: `obj`).

    Every process calls it; the others pass anything (None)."""
    if jax.process_count() == 1:
        return obj
    import json
    data = json.dumps(obj).encode() if jax.process_index() == 0 else b""
    return json.loads(share_bytes(data)[0].decode())


def share_bytes(data: bytes, flag: bool = False) -> tuple[bytes, bool]:
    """(process 0's `data`, whether any process passed flag=True), in every process.

    Every process calls it (a collective); the others' data is ignored. Two
    collectives: an allgather of (length, flag), then the broadcast of the bytes."""
    if jax.process_count() == 1:
        return data, bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils
    head = np.asarray([len(data) if jax.process_index() == 0 else 0, int(bool(flag))], np.int32)
    heads = np.asarray(multihost_utils.process_allgather(head)).reshape(-1, 2)
    n, any_flag = int(heads[0, 0]), bool(heads[:, 1].any())
    if n == 0:
        return b"", any_flag
    buf = np.zeros(n, np.uint8)
    if jax.process_index() == 0:
        buf[:] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return buf.tobytes(), any_flag
