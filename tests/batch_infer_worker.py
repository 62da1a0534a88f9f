"""One process of the 2-process x 4-CPU-device batch-infer test (tests/test_batch_infer_scale.py).

argv: coordinator process_id exit_at_batch then `jaxlm batch-infer` arguments. With
exit_at_batch N > 0 the process dies (os._exit, no clean-up: as a kill would leave
it) when it is about to run batch N, i.e. after N - 1 batches.
"""

import os
import sys

import xla_flags  # noqa: E402  (this script's directory is on sys.path)

os.environ["XLA_FLAGS"] = xla_flags.for_devices(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(coordinator, process_id, exit_at_batch, *args):
    from jaxlm.infer import batch as batch_infer
    from jaxlm.scripts import cli
    exit_at, calls = int(exit_at_batch), [0]
    run_batch = batch_infer.generate_rows

    def counted(*a, **k):
        calls[0] += 1
        if calls[0] == exit_at:
            os._exit(9)
        return run_batch(*a, **k)
    batch_infer.generate_rows = counted
    return cli.main(["batch-infer", "--coordinator", coordinator, "--num-processes", "2",
                     "--process-id", process_id, *args])


if __name__ == "__main__":
    rc = main(*sys.argv[1:])
    jax.distributed.shutdown()
    sys.exit(rc)
