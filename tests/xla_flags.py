"""XLA_FLAGS for the suite's processes: the test processes (conftest.py) and the
multi-process workers the tests start, which set their own device count.

The suite is bound by compiling many tiny programs, and two flags make XLA's CPU
compiler much faster on them, for a slower run of the compiled code, which tiny
programs barely notice:
- LLVM at -O0 (`xla_backend_optimization_level=0`): about a third faster;
- the classic elemental emitters in place of the MLIR fusion emitters
  (`xla_cpu_use_fusion_emitters=false`): about 40% faster again on the decode and
  train programs here (the same HLO is emitted by other code).
Results can differ from the default's by float rounding (a few ulps: vectorised
math, FMA contraction), well inside every tolerance here; the tests that compare two
jaxlm programs for equality compile both under the same flags.
"""

import os

SPEED = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def with_speed(flags: str) -> str:
    """`flags` plus each SPEED flag whose name it does not give (a given one wins)."""
    for f in SPEED:
        if f.split("=")[0] not in flags:
            flags += " " + f
    return flags.strip()


def for_devices(n: int) -> str:
    """XLA_FLAGS for a CPU process of `n` devices: the speed flags (from the
    environment's XLA_FLAGS when it gives them) and the device count."""
    given = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    return with_speed(given) + f" --xla_force_host_platform_device_count={n}"
