"""Shared test setup: 8 forced CPU devices (set before jax is imported)."""

import os

# The suite is bound by compiling many tiny programs: LLVM at -O0 compiles them about a
# third faster. The HLO, and so every number, is the same (fast-math stays off); only
# the machine code is less tuned. A level given in XLA_FLAGS wins.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
