"""One process of the 2-process x 4-CPU-device test (tests/test_multihost.py).

argv: coordinator process_id out.json. Runs one train step of a tiny decoder
on a data=8 mesh spanning both processes, each process feeding its 4 rows.
"""

import json
import os
import sys

import xla_flags  # noqa: E402  (this script's directory is on sys.path)

os.environ["XLA_FLAGS"] = xla_flags.for_devices(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(coordinator, process_id, out):
    from jaxlm.sharding.distributed import initialize, local_rows, put_batch
    initialize(coordinator, 2, int(process_id))
    sys.path.insert(0, os.path.dirname(__file__))
    from test_sharding import make_cfg, synthetic_batch

    from jaxlm.model import model_specs
    from jaxlm.sharding.mesh import make_mesh
    from jaxlm.sharding.rules import named_sharding, use_mesh
    from jaxlm.train.optimizer import learning_rate_schedule, make_optimizer
    from jaxlm.train.state import create_state, state_shardings
    from jaxlm.train.step import compile_steps

    cfg = make_cfg("llama", dict(data=8))
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train, model_specs(cfg.model))
    with use_mesh(mesh, cfg.mesh.rules):
        state = create_state(cfg, mesh, tx, seed=0)
        batch_sh = named_sharding(mesh, ("batch", "seq"), cfg.mesh.rules)
        step, _ = compile_steps(cfg.model, tx, learning_rate_schedule(cfg.train),
                                state_shardings(cfg, mesh, tx), batch_sh,
                                cfg.train.loss_vocab_chunk)
        batch = put_batch(local_rows(synthetic_batch(cfg.model), cfg.data.batch_size), batch_sh)
        state, metrics = step(state, batch)
    with open(out, "w") as f:
        json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                   "local_devices": jax.local_device_count(),
                   "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
