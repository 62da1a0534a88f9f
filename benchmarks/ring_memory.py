"""Compiled temp memory of ring attention (8 CPU devices, mesh.context=8) vs
the unsharded flash kernel (interpret mode) for one causal attention call.

    python -m jaxlm.benchmarks.ring_memory [--seq 1024 2048 8192] [--impl xla pallas]
    (or python benchmarks/ring_memory.py)

Prints one JSON line per (seq, pass): per-device temp bytes of the ring and
of flash (`compile().memory_analysis().temp_size_in_bytes`), and the ratio.
--impl: the ring's per-chunk math (xla tiles, or the flash kernels per chunk).
Nothing is run: both are only compiled.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlm.config import MeshConfig  # noqa: E402
from jaxlm.model.kernels import MaskSpec, attention, flash_attention  # noqa: E402
from jaxlm.sharding.mesh import make_mesh  # noqa: E402
from jaxlm.sharding.rules import use_mesh  # noqa: E402


def temps(s, impl="xla", h=4, kvh=2, d=32):
    mesh = make_mesh(MeshConfig(data=1, context=8))
    rules = MeshConfig().rules
    pos = jnp.arange(s, dtype=jnp.int32)[None]

    def ring(q, k, v):
        with use_mesh(mesh, rules):
            return jnp.sum(attention(q, k, v, MaskSpec(causal=True, q_positions=pos,
                                                       kv_positions=pos), impl=impl))

    def flash(q, k, v):
        return jnp.sum(flash_attention(q, k, v, MaskSpec(causal=True)))

    def temp(f, grad, sharding=None):
        args = [jax.ShapeDtypeStruct((1, s, n, d), jnp.float32, sharding=sharding)
                for n in (h, kvh, kvh)]
        fn = jax.value_and_grad(f, (0, 1, 2)) if grad else f
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    sh = NamedSharding(mesh, P(None, "context", None, None))
    for grad in (False, True):
        r, f = temp(ring, grad, sh), temp(flash, grad)
        print(json.dumps({"seq": s, "impl": impl, "heads": h, "kv_heads": kvh, "head_dim": d,
                          "pass": "fwd+bwd" if grad else "fwd", "ring_temp_bytes": r,
                          "flash_temp_bytes": f, "ratio": round(r / f, 3)}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 8192])
    ap.add_argument("--impl", nargs="+", default=["xla"], choices=["xla", "pallas"])
    args = ap.parse_args()
    for s in args.seq:
        for impl in args.impl:
            temps(s, impl)
