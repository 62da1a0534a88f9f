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


import collections  # noqa: E402

import pytest  # noqa: E402

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@pytest.fixture
def traces():
    """Counts, per function name, the jit traces made while the test runs, as JAX
    reports them through `jax.monitoring` (one event each time jit traces a
    function: a compile-cache miss). Nothing in the library keeps count."""
    counts = collections.Counter()

    def listen(event, duration, **kw):
        if event == _TRACE_EVENT:
            counts[kw.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
