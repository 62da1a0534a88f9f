"""Shared test setup: 8 forced CPU devices (set before jax is imported)."""

import os

# The suite is bound by compiling many tiny programs: LLVM at -O0 compiles them about a
# third faster. The HLO is the same; results can differ from -O2's by float rounding
# (a few ulps: vectorised math and FMA contraction), well inside every tolerance here.
# A level given in XLA_FLAGS wins.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
